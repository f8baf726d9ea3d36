"""One-launch variable-length attention: every call of a plan is a segment.

FlashAttention's varlen kernel (``torch.nn.attention.varlen.varlen_attn``,
torch >= 2.10 on CUDA; called as the ATen op it wraps, which skips the
public wrapper's Python checks and dispatch on every call; or, where the
``flash-attn-4`` package is installed, on Hopper and Blackwell, FlashAttention
4's, see :func:`varlen_kernel`) takes packed ``[T, H, D]`` queries and keys with
separate cumulative lengths ``cu_seq_q`` / ``cu_seq_k``, so each (batch
element, call) pair is one segment: its queries laid out call by call, its
keys likewise. Queries of a plan already sit call by call in the input in
the common case (each call's query groups contiguous and in order): then Q
and the output are views, no copy. Keys that several calls read (anchors) are
gathered once into the packed key tensor; when every call reads exactly its
own queries' tokens as keys (documents attending to themselves) K and V are
views too.

Calls with different modifiers run as separate launches (the kernel takes
one window for all segments). What the kernel cannot express falls back to
``batched`` with a one-time warning: CPU tensors, a torch without
``varlen_attn``, float32, key padding, dropout, ALiBi, KV-cached groups,
calls without keys, and ``[causal]``/``[window N]`` on calls whose positions
within groups are not their positions within the segment (several groups, or
a different number of queries and keys).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
from torch import Tensor

from patternc.lower.layout import Layout
from patternc.lower.pairs import NotExpressible
from patternc.lower.varlen import varlen_launches
from patternc.nn.executors import flash4
from patternc.nn.executors.batched import run_as_batched, run_batched
from patternc.nn.executors.common import AttentionInputs, once
from patternc.nn.tables import kept_table, table

__all__ = ["kept_launches", "kernel_of", "run_varlen", "varlen_available", "varlen_kernel"]

_warned: set[str] = set()


@once
def _has_varlen() -> bool:
    """This torch has ``varlen_attn`` (>= 2.10), so the ATen op behind it takes
    cumulative lengths and windows as the executor passes them."""
    try:
        from torch.nn.attention.varlen import varlen_attn  # noqa: F401
    except ImportError:
        return False
    return True


def varlen_available(device: torch.device) -> bool:
    """``varlen_attn`` exists in this torch and ``device`` is a CUDA device."""
    return device.type == "cuda" and _has_varlen()


def varlen_kernel(device: torch.device, head_dim: int) -> str:
    """Which kernel ``varlen`` launches on ``device``: ``"flash4"`` where
    :func:`patternc.nn.executors.flash4.usable` says so (the package
    imports, a Hopper or Blackwell GPU, its head sizes), eager or inside a
    user's ``torch.compile``; else ``"flash2"`` (torch's own). It captures into
    CUDA graphs (warmed up first, as any capture). FlashAttention 4 runs
    64 documents about 1.3x as fast forward and 1.7x forward and backward
    as torch's FlashAttention 2 (see docs/performance.md)."""
    return "flash4" if flash4.usable(device, head_dim) else "flash2"


@dataclass(frozen=True)
class _Launch:
    """One kernel launch: packed indices and cumulative lengths on the device."""

    window: tuple[int, int]
    q_index: Tensor | None  # None: the packed queries are the input, in order
    kv_index: Tensor | None  # None: the packed keys are the input, in order
    cu_seq_q: Tensor
    cu_seq_k: Tensor
    max_q: int
    max_k: int
    n_queries: int


def _launches(
    layout: Layout, batch: int, device: torch.device, compact: bool = False
) -> tuple[_Launch, ...] | str:
    """The launches of a layout for ``batch`` elements, or why it cannot run
    (kept in the layout's tables per (batch, device, compact), as a
    traceable table: a user's ``torch.compile`` gets the one an eager call
    built, its index tensors as graph inputs); ``compact``: key rows index
    the layout's key space."""
    return table(
        layout,
        _launches_key(batch, device, compact),
        lambda: _build_launches(layout, batch, device, compact),
        traceable=True,
    )


def kept_launches(
    layout: Layout, batch: int, device: torch.device, compact: bool = False
) -> tuple[_Launch, ...] | str:
    """:func:`_launches` for host code that may run while Dynamo traces
    (``auto``'s pricing): built and stored even then, so a graph that picks
    ``varlen`` finds its launches stored."""
    return kept_table(
        layout, _launches_key(batch, device, compact), lambda: _build_launches(layout, batch, device, compact)
    )


def _launches_key(batch: int, device: torch.device, compact: bool) -> tuple[object, ...]:
    return ("varlen launches", batch, device, compact)


def _build_launches(
    layout: Layout, batch: int, device: torch.device, compact: bool
) -> tuple[_Launch, ...] | str:
    """The export's launches (one batch element) tiled over ``batch`` and uploaded."""
    try:
        plan = varlen_launches(layout)
    except NotExpressible as reason:
        return str(reason)
    n = layout.n_tokens
    space = layout.key_space
    n_keys = space.size if compact else n
    launches = []
    for launch in plan:
        rows = [space.position(r) for r in launch.kv_rows] if compact else launch.kv_rows
        q_rows = [b * n + r for b in range(batch) for r in launch.q_rows]
        kv_rows = [b * n_keys + r for b in range(batch) for r in rows]
        per_q = [b - a for a, b in itertools.pairwise(launch.cu_seqlens_q)]
        per_k = [b - a for a, b in itertools.pairwise(launch.cu_seqlens_k)]
        cu_q = list(itertools.accumulate(per_q * batch, initial=0))
        cu_k = list(itertools.accumulate(per_k * batch, initial=0))

        def index(rows: list[int], n: int) -> Tensor | None:
            identity = rows == list(range(batch * n))
            return None if identity else torch.tensor(rows, dtype=torch.int64, device=device)

        launches.append(
            _Launch(
                window=launch.window,
                q_index=index(q_rows, n),
                kv_index=index(kv_rows, n_keys),
                cu_seq_q=torch.tensor(cu_q, dtype=torch.int32, device=device),
                cu_seq_k=torch.tensor(cu_k, dtype=torch.int32, device=device),
                max_q=launch.max_seqlen_q,
                max_k=launch.max_seqlen_k,
                n_queries=len(q_rows),
            )
        )
    return tuple(launches)


def _fallback_reason(inputs: AttentionInputs) -> str | None:
    q = inputs.q
    if not varlen_available(q.device):
        return "CPU tensors" if q.device.type != "cuda" else "a torch without varlen_attn (needs >= 2.10)"
    if q.dtype not in (torch.float16, torch.bfloat16):
        return f"{q.dtype} (the varlen kernel takes float16/bfloat16)"
    if inputs.key_padding_mask is not None:
        return "key padding (the varlen kernel has no mask)"
    if inputs.dropout_p > 0:
        return "attention dropout"
    if inputs.alibi_slopes is not None:
        return "an ALiBi bias"
    if q.shape[-1] % 8 or q.shape[-1] > 256:
        return f"head_dim {q.shape[-1]} (the kernel needs a multiple of 8, at most 256)"
    return None


def kernel_of(inputs: AttentionInputs) -> str:
    """What :func:`run_varlen` runs these inputs on: ``"flash4"``,
    ``"flash2"``, or ``"batched"`` where it falls back."""
    q = inputs.q
    if _fallback_reason(inputs) is not None or isinstance(
        _launches(inputs.layout, q.shape[0], q.device), str
    ):
        return "batched"
    return varlen_kernel(q.device, q.shape[-1])


def _fall_back(inputs: AttentionInputs, reason: str) -> Tensor:
    return run_as_batched(inputs, "varlen", reason, _warned)


def run_varlen(inputs: AttentionInputs) -> Tensor:
    """Reads K/V in token space or in the layout's key space (``keys_compact``)."""
    reason = _fallback_reason(inputs)
    if reason is not None:
        return _fall_back(inputs, reason)
    q, k, v = inputs.q, inputs.k, inputs.v
    batch, n, heads, dim = q.shape
    if inputs.layout.tables.missing_in_trace(_launches_key(batch, q.device, inputs.keys_compact)):
        # inside a user's torch.compile, for a layout no eager call ran: its
        # launches would be built in the graph, in Python Dynamo cannot trace
        return run_batched(inputs)
    launches = _launches(inputs.layout, batch, q.device, inputs.keys_compact)
    if isinstance(launches, str):
        return _fall_back(inputs, launches)
    kernel = _flash4 if varlen_kernel(q.device, dim) == "flash4" else _flash2
    q_flat, k_flat, v_flat = q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1)
    if len(launches) == 1 and launches[0].q_index is None:
        (launch,) = launches
        out = kernel(launch, q_flat, *_keys(launch, k_flat, v_flat), inputs.scale)
        return out.view(batch, n, heads, dim)
    # several launches (one per modifier set): each gathers and scatters its queries
    out_flat = q_flat.new_empty(batch * n, heads, dim)
    for launch in launches:
        assert launch.q_index is not None  # only a launch holding every query is in order
        queries = q_flat.index_select(0, launch.q_index)
        result = kernel(launch, queries, *_keys(launch, k_flat, v_flat), inputs.scale)
        out_flat.index_copy_(0, launch.q_index, result)
    return out_flat.view(batch, n, heads, dim)


def _keys(launch: _Launch, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    """The launch's packed keys and values (views when they are the input in order)."""
    if launch.kv_index is None:
        return k, v
    return k.index_select(0, launch.kv_index), v.index_select(0, launch.kv_index)


def _flash2(launch: _Launch, q: Tensor, k: Tensor, v: Tensor, scale: float | None) -> Tensor:
    """One launch on the ATen op behind ``varlen_attn`` (its presence is the
    gate): the same kernel and autograd formula, without the custom-op
    wrapper's host time."""
    left, right = launch.window
    cu_q, cu_k = launch.cu_seq_q, launch.cu_seq_k
    out: Tensor = torch.ops.aten._flash_attention_forward(
        q, k, v, cu_q, cu_k, launch.max_q, launch.max_k, 0.0, False, False,
        scale=scale, window_size_left=left, window_size_right=right,
    )[0]  # fmt: skip
    return out


def _flash4(launch: _Launch, q: Tensor, k: Tensor, v: Tensor, scale: float | None) -> Tensor:
    """One launch on FlashAttention 4's varlen kernel, through patternc's
    custom op (:func:`~patternc.nn.executors.flash4.varlen_attention`): the
    same call eager and inside a user's ``torch.compile``."""
    return flash4.varlen_attention(
        q, k, v, launch.cu_seq_q, launch.cu_seq_k, launch.max_q, launch.max_k, scale, launch.window
    )
