"""Chunked linear attention over a plan's calls.

Softmax is replaced by the feature map ``phi(x) = elu(x) + 1``: a query's
output is ``sum_j phi(q).phi(k_j) v_j / sum_j phi(q).phi(k_j)`` over the keys
its rule allows. Without modifiers that is two small matmuls per call;
``[causal]`` (key position <= query position, both within their groups) runs
in chunks of ``chunk_size`` queries: a running ``phi(K)^T V`` state carries
the earlier chunks, and each chunk adds its own keys under a small causal mask.
``[window N]`` and ALiBi have no linear form: they raise, naming the
executors that can run them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from patternc.nn.executors.common import AttentionInputs, TokenSplit, assemble, gather_mask, zeros_from

__all__ = ["DEFAULT_CHUNK_SIZE", "linear_attention", "run_linear"]

DEFAULT_CHUNK_SIZE = 64
_EPS = 1e-6


def _features(x: Tensor) -> Tensor:
    return F.elu(x) + 1.0


def linear_attention(q: Tensor, k: Tensor, v: Tensor, causal: bool, chunk_size: int) -> Tensor:
    """``[b, Lq, H, D]`` queries over ``[b, Lk, H, D]`` keys/values, with
    feature maps already applied to ``q`` and ``k`` (padded keys zeroed)."""
    if not causal:
        state = torch.einsum("bkhd,bkhe->bhde", k, v)
        norm = k.sum(dim=1)  # [b, H, D]
        numerator = torch.einsum("bqhd,bhde->bqhe", q, state)
        denominator = torch.einsum("bqhd,bhd->bqh", q, norm)[..., None]
        return numerator / (denominator + _EPS)
    n_q = q.shape[1]
    if k.shape[1] > n_q:  # keys past the last query are never attended
        k, v = k[:, :n_q], v[:, :n_q]
    elif k.shape[1] < n_q:  # missing keys contribute nothing (zero features)
        k = F.pad(k, (0, 0, 0, 0, 0, n_q - k.shape[1]))
        v = F.pad(v, (0, 0, 0, 0, 0, n_q - v.shape[1]))
    b, _, heads, dim = q.shape
    state = q.new_zeros(b, heads, dim, v.shape[-1])
    norm = q.new_zeros(b, heads, dim)
    outputs = []
    # split, not sliced per chunk: each slice's backward fills a whole-size gradient
    chunks = (torch.split(t, chunk_size, dim=1) for t in (q, k, v))
    for qc, kc, vc in zip(*chunks):
        scores = torch.einsum("bqhd,bkhd->bhqk", qc, kc).tril()  # within the chunk: j <= i
        numerator = torch.einsum("bqhd,bhde->bqhe", qc, state) + torch.einsum("bhqk,bkhe->bqhe", scores, vc)
        denominator = torch.einsum("bqhd,bhd->bqh", qc, norm) + scores.sum(-1).transpose(1, 2)
        outputs.append(numerator / (denominator[..., None] + _EPS))
        state = state + torch.einsum("bkhd,bkhe->bhde", kc, vc)
        norm = norm + kc.sum(dim=1)
    return torch.cat(outputs, dim=1)


def run_linear(inputs: AttentionInputs, chunk_size: int = DEFAULT_CHUNK_SIZE) -> Tensor:
    inputs = inputs.in_token_space()  # K/V at input positions
    q, k, v, layout = inputs.q, inputs.k, inputs.v, inputs.layout
    if inputs.alibi_slopes is not None:
        raise ValueError("linear attention cannot add an ALiBi bias; use attention_type 'batched' or 'dense'")
    outputs: list[Tensor | None] = []
    qs = TokenSplit(q, layout)
    ks, vs = TokenSplit(k, layout, keys=True), TokenSplit(v, layout, keys=True)
    for call in layout.calls:
        if not call.n_queries or not call.attention.keys:
            outputs.append(None)
            continue
        mods = call.modifiers
        if mods is None:
            raise ValueError(
                f"linear attention needs one modifier list for all keys of a call; `{call.attention.text()}` "
                "gives its key groups different ones: use attention_type 'batched' or 'flex'"
            )
        if mods.window is not None or not mods.plain:
            # its running sums see every earlier key (causal) or all keys: no band, no skipped keys
            shown = f"[window {mods.window}]" if mods.plain else mods.text()
            raise ValueError(
                f"linear attention cannot express {shown}; run this pattern with 'flex' or 'batched'"
            )
        queries = _features(qs.take(call.queries, {}))
        keys = _features(ks.take(call.keys, inputs.cached_keys))
        values = vs.take(call.keys, inputs.cached_values)
        padding = gather_mask(inputs.key_padding_mask, call.keys)
        if padding is not None:
            n_cached = keys.shape[1] - padding.shape[1]
            real = F.pad(padding, (0, n_cached), value=True) if n_cached else padding
            keys = keys * real[:, :, None, None].to(keys.dtype)
        if keys.shape[1] == 0:
            outputs.append(zeros_from(queries))
            continue
        outputs.append(linear_attention(queries, keys, values, mods.causal, chunk_size))
    return assemble(outputs, layout, q)
