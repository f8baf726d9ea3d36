"""The fast executor: calls of equal shape run as one stacked attention launch.

Stacking reads each call's tokens through a view when the calls' segments sit
at evenly spaced offsets (two equal branches, say): no copy of Q, K or V is
made then. Otherwise the calls are stacked with one copy. Segments are read
from one split of each tensor (``TokenSplit``), never as separate slices,
so the backward pass stays one pass over the input however many groups.
"""

from __future__ import annotations

import functools
import itertools
import warnings
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from patternc.lower.layout import KeySpace, Layout, PeriodicLaunch, Segment
from patternc.nn.executors.common import (
    AttentionInputs,
    TokenSplit,
    assemble,
    attend,
    call_bias,
    gather,
    gather_mask,
    modifier_args,
    within_group_positions,
)
from patternc.nn.tables import table

__all__ = ["run_as_batched", "run_batched", "stack_segments"]


def stack_segments(
    t: Tensor | TokenSplit,
    segment_lists: Sequence[Sequence[Segment]],
    cache: Mapping[str, Tensor],
    space: KeySpace | None = None,
) -> Tensor:
    """``[B, N, ...]`` -> ``[B * n, L, ...]`` holding each call's tokens (call
    ``i`` of batch ``b`` at ``b * n + i``). All calls have ``L`` tokens.

    Calls reading one input segment each at evenly spaced offsets are read
    through a view: a plain reshape when the segments tile the whole input
    (free in the backward pass too), else strided windows. Other calls are
    stacked with one copy, from ``t``'s pieces when it is a :class:`TokenSplit`.
    ``space``: ``t`` holds that key space only (segments are input tokens)."""
    whole = t.tensor if isinstance(t, TokenSplit) else t
    n = len(segment_lists)
    if all(len(segs) == 1 and segs[0].cached is None for segs in segment_lists):
        starts = [segs[0].start for segs in segment_lists]
        if space is not None:
            starts = [space.position(start) for start in starts]
        length = segment_lists[0][0].length
        step = starts[1] - starts[0]
        if step > 0 and all(b - a == step for a, b in itertools.pairwise(starts)):
            if step == length and starts[0] == 0 and n * length == whole.shape[1]:
                return whole.view(whole.shape[0], n, length, *whole.shape[2:]).flatten(0, 1)
            window = whole.narrow(1, starts[0], step * (n - 1) + length)
            view = window.unfold(1, length, step).movedim(-1, 2)  # [B, n, L, ...]
            return view.flatten(0, 1)
    take = t.take if isinstance(t, TokenSplit) else functools.partial(gather, t)
    return torch.stack([take(segs, cache) for segs in segment_lists], dim=1).flatten(0, 1)


def _periods(t: Tensor, count: int, period: int, start: int, length: int) -> Tensor:
    """``[B, N, H, D]`` -> head-major ``[B * count, H, length, D]``: tokens
    ``[start, start + length)`` of every ``period`` tokens, as a view (its
    backward is one pass into the input's gradient).

    Without a gradient to carry, the view is one ``as_strided`` instead of a
    reshape, a narrow and a transpose: one dispatch where the chain makes
    three, a third of the host time per launch. With one,
    the chain stays: ``as_strided``'s backward writes a zeroed copy of the
    whole input, where the chain's is free but for the narrow."""
    batch, tokens, heads, dim = t.shape
    s_batch, s_token, s_head, s_dim = t.stride()
    if not (t.requires_grad and torch.is_grad_enabled()) and (batch == 1 or s_batch == tokens * s_token):
        return t.as_strided(
            (batch * count, heads, length, dim),
            (period * s_token, s_head, s_token, s_dim),
            t.storage_offset() + start * s_token,
        )
    periods = t.reshape(t.shape[0] * count, period, *t.shape[2:])
    if length != period:
        periods = periods.narrow(1, start, length)
    return periods.transpose(1, 2)


def _run_periodic(inputs: AttentionInputs, launch: PeriodicLaunch, keys: tuple[int, int]) -> Tensor:
    """A periodic launch: views in, one SDPA (``[B * count, H, Lq, D]``).
    ``keys``: the key period and start in the period, of the space K/V are in."""
    count, (k_period, k_start) = launch.count, keys
    return F.scaled_dot_product_attention(
        _periods(inputs.q, count, launch.period, launch.q_start, launch.q_length),
        _periods(inputs.k, count, k_period, k_start, launch.k_length),
        _periods(inputs.v, count, k_period, k_start, launch.k_length),
        dropout_p=inputs.dropout_p,
        scale=inputs.scale,
        is_causal=launch.is_causal,
    )


def _back_to_tokens(out: Tensor, batch: int, tokens: int) -> Tensor:
    """A tiling launch's ``[B * count, H, L, D]`` output -> ``[B, N, H, D]``.
    SDPA's CUDA kernels (and CPU's flash kernel) leave it token-major in
    memory: without a gradient that is one ``as_strided`` (one dispatch
    instead of a transpose and a reshape). Otherwise, or
    laid out head-major (CPU's math kernel), the transpose and reshape, the
    shape as ints: a ``torch.Size`` argument parses at twice the cost."""
    _, heads, length, dim = out.shape
    if not out.requires_grad and out.stride() == (length * heads * dim, dim, heads * dim, 1):
        return out.as_strided((batch, tokens, heads, dim), (tokens * heads * dim, heads * dim, dim, 1))
    return out.transpose(1, 2).reshape(batch, tokens, heads, dim)


def _key_index(layout: Layout, ranges: tuple[tuple[int, int], ...], device: torch.device) -> Tensor:
    """The token indices of ``ranges``, in order, as one device tensor (kept
    in the layout's tables: built on the first call, so warm up before
    capturing a CUDA graph)."""
    return table(
        layout,
        ("whole-call keys", ranges, device),
        lambda: torch.cat([torch.arange(start, stop, device=device) for start, stop in ranges]),
    )


def _run_whole_call(inputs: AttentionInputs, ranges: tuple[tuple[int, int], ...]) -> Tensor:
    """The layout's one call, reading every query: its keys are a view when
    they are one token range, else one ``index_select`` per tensor (half the
    host time of a split and a concatenation, which dispatch once per range;
    its backward is one ``index_add`` into a zeroed
    gradient, as the split's is one concatenation with zeros), then one SDPA
    on head-major views."""
    q, k, v = inputs.q, inputs.k, inputs.v
    if len(ranges) == 1:
        ((start, stop),) = ranges
        if (start, stop) != (0, k.shape[1]):
            k, v = k.narrow(1, start, stop - start), v.narrow(1, start, stop - start)
    else:
        index = _key_index(inputs.layout, ranges, k.device)
        k, v = k.index_select(1, index), v.index_select(1, index)
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2),
        k.transpose(1, 2),
        v.transpose(1, 2),
        dropout_p=inputs.dropout_p,
        scale=inputs.scale,
        is_causal=inputs.layout.batched.whole_call_is_causal,  # the call with queries, not calls[0]
    )
    return out.transpose(1, 2)


def run_batched(inputs: AttentionInputs) -> Tensor:
    """Reads K/V in token space or in the layout's key space (``keys_compact``)."""
    q, k, v, layout, cache = inputs.q, inputs.k, inputs.v, inputs.layout, inputs.cache
    key_padding_mask, dropout_p, scale = inputs.key_padding_mask, inputs.dropout_p, inputs.scale
    batch = q.shape[0]
    slopes = inputs.alibi_slopes
    plain = key_padding_mask is None and slopes is None
    compact = inputs.keys_compact
    space = layout.key_space if compact else None
    if plain:  # the hot paths: one launch giving the output in input order
        first = layout.batched.periodic_launches[0] if layout.batched.tiled_output else None
        if first is not None:
            # one periodic launch whose queries tile the input: views in and out
            first_keys = layout.key_space.periodic[0] if compact else (first.period, first.k_start)
            if first_keys is not None:
                return _back_to_tokens(_run_periodic(inputs, first, first_keys), batch, q.shape[1])
        whole = layout.key_space.whole_call_keys if compact else layout.batched.whole_call_keys
        if whole is not None:
            return _run_whole_call(inputs, whole)
    cached_k, cached_v = inputs.cached_keys, inputs.cached_values
    outputs: list[Tensor | None] = [None] * len(layout.calls)
    needs_positions = layout.has_modifiers or slopes is not None
    positions = within_group_positions(layout, q.device) if needs_positions else None
    padded = key_padding_mask is not None
    direct = layout.batched.direct_launches if plain else (None,) * len(layout.launches)
    periodic_launches = layout.batched.periodic_launches if plain else (None,) * len(layout.launches)
    # one split per tensor, read as pieces below (see TokenSplit: slices would
    # each cost a full-size pass in the backward)
    qs = TokenSplit(q, layout)
    ks, vs = (TokenSplit(t, layout, keys=True, compact=compact) for t in (k, v))
    # direct launches read head-major pieces: no per-call transposes; split
    # once here, not asked of the splits per launch (64 documents: 64 launches)
    head_major = None
    if any(pieces is not None for pieces in direct):
        head_major = (
            TokenSplit(q.transpose(1, 2), layout, dim=2).pieces,
            *(
                TokenSplit(t.transpose(1, 2), layout, keys=True, dim=2, compact=compact).pieces
                for t in (k, v)
            ),
        )
    for number, (launch, pieces, periodic) in enumerate(zip(layout.launches, direct, periodic_launches)):
        periodic_keys = None
        if periodic is not None:  # its keys repeat in the space K/V are in, too?
            periodic_keys = (periodic.period, periodic.k_start)
            if compact:
                periodic_keys = layout.key_space.periodic[number]
        if periodic is not None and periodic_keys is not None:
            stacked = _run_periodic(inputs, periodic, periodic_keys).transpose(1, 2)  # [B * n, Lq, H, D]
            for index, piece in zip(launch, stacked.view(batch, len(launch), *stacked.shape[1:]).unbind(1)):
                outputs[index] = piece
            continue
        if pieces is not None:
            assert head_major is not None
            q_piece, kv_piece, causal = pieces
            q_pieces, k_pieces, v_pieces = head_major
            out = F.scaled_dot_product_attention(
                q_pieces[q_piece], k_pieces[kv_piece], v_pieces[kv_piece],
                dropout_p=dropout_p, scale=scale, is_causal=causal,
            )  # fmt: skip
            outputs[launch[0]] = out.transpose(1, 2)
            continue
        calls = [layout.calls[i] for i in launch]
        modifiers = [modifier_args(c, positions, cache, padded) for c in calls]
        if len(calls) == 1:
            (call,) = calls
            outputs[launch[0]] = attend(
                qs.take(call.queries, {}),
                ks.take(call.keys, cached_k),
                vs.take(call.keys, cached_v),
                gather_mask(key_padding_mask, call.keys),
                dropout_p,
                scale,
                *modifiers[0],
                call_bias(call, positions, cache, slopes),
            )
            continue
        queries = stack_segments(qs, [c.queries for c in calls], {})
        keys = stack_segments(ks, [c.keys for c in calls], cached_k, space)
        values = stack_segments(vs, [c.keys for c in calls], cached_v, space)
        mask = None
        if key_padding_mask is not None:
            mask = stack_segments(
                key_padding_mask, [[s for s in c.keys if s.cached is None] for c in calls], {}
            )
        pair_mask, is_causal = None, modifiers[0][1]  # calls of a launch share their modifiers
        if modifiers[0][0] is not None:
            stacked = torch.stack([m[0] for m in modifiers if m[0] is not None])  # [n, Lq, Lk]
            pair_mask = stacked.expand(batch, *stacked.shape).flatten(0, 1)
        bias = None
        if slopes is not None:
            biases = torch.stack([call_bias(c, positions, cache, slopes) for c in calls])  # type: ignore[misc]
            bias = biases.expand(batch, *biases.shape).flatten(0, 1)  # [B * n, H, Lq, Lk]
        out = attend(queries, keys, values, mask, dropout_p, scale, pair_mask, is_causal, bias)
        if layout.batched.tiled_output:
            return out.reshape(batch, layout.n_tokens, *out.shape[2:])
        # unbind, not indexing: its backward is one stack, where each index
        # would allocate and fill a gradient of the whole output
        for index, piece in zip(launch, out.reshape(batch, len(calls), *out.shape[1:]).unbind(1)):
            outputs[index] = piece
    return assemble(outputs, layout, q)


def run_as_batched(inputs: AttentionInputs, implementation: str, reason: str, warned: set[str]) -> Tensor:
    """Run ``inputs`` with this executor on behalf of ``implementation``, which
    cannot take them for ``reason``; warn once per reason (``warned`` is the
    caller's record of reasons already reported)."""
    if reason not in warned:
        warned.add(reason)
        warnings.warn(
            f"implementation={implementation!r} runs as 'batched' for {reason}; use "
            "implementation='batched' (or 'auto') to silence this",
            stacklevel=4,
        )
    return run_batched(inputs)
