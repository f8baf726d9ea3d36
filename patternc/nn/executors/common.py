"""Pieces every executor shares: gathering segments, masks for rule
modifiers, one attention call, and putting call outputs back in input order.

Tensors are token-major, ``[B, N, H, D]``: a group's tokens are a slice along
dim 1 whatever the head layout, and the fused QKV projection yields this
layout without a copy.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from patternc.modifiers import Modifiers
from patternc.nn.schedule import CallSchedule, Schedule, Segment

__all__ = [
    "AttentionInputs",
    "Executor",
    "TokenSplit",
    "alibi_bias",
    "assemble",
    "attend",
    "call_bias",
    "call_pair_mask",
    "gather",
    "gather_mask",
    "group_positions",
    "modifier_args",
    "modifier_mask",
    "token_pieces",
    "within_group_positions",
]


@dataclass(frozen=True)
class AttentionInputs:
    """What every executor gets: ``q``/``k``/``v`` are ``[B, N, H, D]`` for the
    input tokens, ``cache`` maps cached groups to ``[B, n, H, D]`` keys and
    values, ``key_padding_mask`` is ``[B, N]`` (True = real token) or None."""

    q: Tensor
    k: Tensor
    v: Tensor
    schedule: Schedule
    cache: Mapping[str, tuple[Tensor, Tensor]]
    key_padding_mask: Tensor | None
    dropout_p: float
    scale: float | None
    alibi_slopes: Tensor | None = None
    """``[H]``: ALiBi adds ``-slope * |i - j|`` to each score, ``i``/``j`` the
    query's and key's positions within their groups (an additive bias)."""

    @property
    def cached_keys(self) -> dict[str, Tensor]:
        return {name: kv[0] for name, kv in self.cache.items()}

    @property
    def cached_values(self) -> dict[str, Tensor]:
        return {name: kv[1] for name, kv in self.cache.items()}


Executor = Callable[[AttentionInputs], Tensor]
"""An executor maps :class:`AttentionInputs` to the ``[B, N, H, D]`` output."""


def gather(t: Tensor, segments: Sequence[Segment], cache: Mapping[str, Tensor]) -> Tensor:
    """The tokens of ``segments`` along dim 1: a view for one input segment,
    else one concatenation."""
    parts = [t[:, s.start : s.stop] if s.cached is None else cache[s.cached] for s in segments]
    if len(parts) == 1:
        return parts[0]
    if not parts:
        return t[:, :0]
    return torch.cat(parts, dim=1)


@functools.lru_cache(maxsize=1024)
def token_pieces(
    schedule: Schedule, keys: bool
) -> tuple[tuple[int, ...], dict[tuple[int, int], tuple[int, int]]]:
    """Split sizes along the tokens at every boundary of the calls' query
    segments (``keys`` False) or input key/value segments (True), and each such
    segment's ``(first, stop)`` piece range. Query segments are disjoint, so
    each is one piece; key segments are one piece unless they partly overlap."""
    segments = {
        (s.start, s.stop)
        for call in schedule.calls
        for s in (call.keys_values if keys else call.queries)
        if s.cached is None
    }
    bounds = {0, schedule.n_tokens}
    for start, stop in segments:
        bounds.update((start, stop))
    ordered = sorted(bounds)
    index = {b: i for i, b in enumerate(ordered)}
    sizes = tuple(b - a for a, b in itertools.pairwise(ordered))
    return sizes, {(a, b): (index[a], index[b]) for a, b in segments}


class TokenSplit:
    """A ``[B, N, ...]`` tensor split once along its tokens at every segment
    boundary of a schedule; segments are read as pieces of that one split.

    Why not slices: autograd's backward of each slice allocates a zero tensor
    of the whole input and copies its gradient in, so ``n`` segments cost ``n``
    full-size passes (64 documents: 64 x the input, 40x slower than this on
    CPU). One split's backward is one concatenation of the pieces' gradients.
    """

    def __init__(self, t: Tensor, schedule: Schedule, keys: bool = False, dim: int = 1) -> None:
        """``keys``: split at the key/value segments' boundaries (else the
        queries'); ``dim``: the token dim (2 for head-major ``[B, H, N, D]``
        views). The split happens on the first :meth:`take` (stacked views
        never need it)."""
        self.tensor = t
        self._schedule, self._keys, self._dim = schedule, keys, dim
        self._ranges: dict[tuple[int, int], tuple[int, int]] = {}
        self._pieces: tuple[Tensor, ...] = ()

    @property
    def pieces(self) -> tuple[Tensor, ...]:
        """The split (made on first use), indexed like ``token_pieces``' ranges."""
        if not self._pieces:
            sizes, self._ranges = token_pieces(self._schedule, self._keys)
            t = self.tensor
            self._pieces = tuple(t.split_with_sizes(sizes, self._dim)) if len(sizes) > 1 else (t,)
        return self._pieces

    def take(self, segments: Sequence[Segment], cache: Mapping[str, Tensor]) -> Tensor:
        """The tokens of ``segments``: a piece for one input segment, else one concatenation."""
        parts: list[Tensor] = []
        for s in segments:
            if s.cached is not None:
                parts.append(cache[s.cached])
                continue
            pieces = self.pieces
            first, stop = self._ranges[(s.start, s.stop)]
            parts.extend(pieces[first:stop])
        if len(parts) == 1:
            return parts[0]
        if not parts:
            return self.tensor.narrow(self._dim, 0, 0)
        return torch.cat(parts, dim=self._dim)


def gather_mask(mask: Tensor | None, segments: Sequence[Segment]) -> Tensor | None:
    """Key padding for ``segments`` (cached keys are never padding)."""
    if mask is None:
        return None
    return gather(mask, [s for s in segments if s.cached is None], {})


@functools.lru_cache(maxsize=512)
def group_positions(sizes: tuple[int, ...], device: torch.device) -> Tensor:
    """``[sum(sizes)]``: each token's index within its group, for groups of
    ``sizes`` laid out in order. Built once per (sizes, device) with no host
    synchronisation, so later calls are free and CUDA-graph capturable (warm
    up before capturing: the first call copies ``sizes`` to the device)."""
    counts = torch.tensor(sizes, dtype=torch.int64, device=device)
    starts = torch.cumsum(counts, 0) - counts
    n = sum(sizes)
    return torch.arange(n, device=device) - torch.repeat_interleave(starts, counts, output_size=n)


def within_group_positions(schedule: Schedule, device: torch.device) -> Tensor:
    """``[N]``: each input token's index within its group."""
    return group_positions(schedule.input_sizes, device)


def modifier_mask(modifiers: Modifiers, q_pos: Tensor, k_pos: Tensor) -> Tensor:
    """``[Lq, Lk]`` bool: which pairs a rule's modifiers allow (positions within groups)."""
    diff = q_pos[:, None] - k_pos[None, :]
    allowed = torch.ones_like(diff, dtype=torch.bool)
    if modifiers.causal:
        allowed &= diff >= 0
    if modifiers.window is not None:
        allowed &= diff.abs() < modifiers.window
    return allowed


def alibi_bias(slopes: Tensor, q_pos: Tensor, k_pos: Tensor) -> Tensor:
    """``[H, Lq, Lk]`` ALiBi bias ``-slope * |i - j|`` (positions within groups)."""
    distance = (q_pos[:, None] - k_pos[None, :]).abs().to(slopes.dtype)
    return -slopes[:, None, None] * distance


def call_positions(
    call: CallSchedule, positions: Tensor, cache: Mapping[str, tuple[Tensor, Tensor]]
) -> tuple[Tensor, Tensor]:
    """Within-group positions of a call's queries and keys (cached keys count from 0)."""
    q_pos = gather(positions[None], call.queries, {})[0]
    cached = {name: torch.arange(kv[0].shape[1], device=positions.device)[None] for name, kv in cache.items()}
    return q_pos, gather(positions[None], call.keys_values, cached)[0]


def call_bias(
    call: CallSchedule,
    positions: Tensor | None,
    cache: Mapping[str, tuple[Tensor, Tensor]],
    slopes: Tensor | None,
) -> Tensor | None:
    """A call's ALiBi bias ``[H, Lq, Lk]``, or None without ALiBi."""
    if slopes is None:
        return None
    assert positions is not None
    return alibi_bias(slopes, *call_positions(call, positions, cache))


def call_pair_mask(
    call: CallSchedule, positions: Tensor, cache: Mapping[str, tuple[Tensor, Tensor]]
) -> Tensor | None:
    """The per-pattern mask of a call with modifiers (None when it has none)."""
    if not call.modifiers:
        return None
    return modifier_mask(call.modifiers, *call_positions(call, positions, cache))


def modifier_args(
    call: CallSchedule,
    positions: Tensor | None,
    cache: Mapping[str, tuple[Tensor, Tensor]],
    padded: bool,
) -> tuple[Tensor | None, bool]:
    """``(pair_mask, is_causal)`` for a call: plain ``[causal]`` between single
    groups is SDPA's ``is_causal`` (no mask built); other modifiers give a mask."""
    if not call.modifiers:
        return None, False
    if call.single_groups and call.modifiers == Modifiers(causal=True) and not padded:
        return None, True
    assert positions is not None
    return call_pair_mask(call, positions, cache), False


def attend(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    kv_mask: Tensor | None,
    dropout_p: float,
    scale: float | None,
    pair_mask: Tensor | None = None,
    is_causal: bool = False,
    bias: Tensor | None = None,
) -> Tensor:
    """Scaled dot-product attention on ``[b, L, H, D]`` tensors.

    ``kv_mask`` is ``[b, Lkv]`` (True = attend); ``pair_mask`` is ``[Lq, Lkv]``
    or ``[b, Lq, Lkv]`` (a rule's modifiers); ``bias`` is an additive
    ``[H, Lq, Lkv]`` or ``[b, H, Lq, Lkv]`` score bias (ALiBi). A query with no
    key left, or a call with no keys at all, yields zeros rather than NaN.
    """
    if k.shape[1] == 0:
        return torch.zeros_like(q)
    attn_mask = kv_mask[:, None, None, :] if kv_mask is not None else None
    if pair_mask is not None:
        pairs = pair_mask[:, None] if pair_mask.dim() == 3 else pair_mask[None, None]
        attn_mask = pairs if attn_mask is None else attn_mask & pairs
    keep = None
    if attn_mask is not None:
        keep = attn_mask.any(dim=-1, keepdim=True)  # [b|1, 1, Lq|1, 1]; no host sync
        attn_mask = attn_mask | ~keep
    if bias is not None:
        bias = (bias[None] if bias.dim() == 3 else bias).to(q.dtype)
        if is_causal and attn_mask is None:
            n_q, n_k = q.shape[1], k.shape[1]
            attn_mask = torch.ones(n_q, n_k, dtype=torch.bool, device=q.device).tril()
        attn_mask = bias if attn_mask is None else bias.masked_fill(~attn_mask, float("-inf"))
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2),
        k.transpose(1, 2),
        v.transpose(1, 2),
        attn_mask=attn_mask,
        dropout_p=dropout_p,
        scale=scale,
        is_causal=is_causal and attn_mask is None,
    )
    if keep is not None:
        out = out * keep.to(out.dtype)
    return out.transpose(1, 2)


@functools.lru_cache(maxsize=512)
def _output_pieces(schedule: Schedule) -> tuple[tuple[int, int], ...]:
    """``schedule.output_order`` as ``(call, index)`` into each call's output
    split at its query segments (a call's output lists its segments in order)."""
    offsets = {
        (call, start): index
        for call, c in enumerate(schedule.calls)
        for index, start in enumerate(itertools.accumulate((s.length for s in c.queries), initial=0))
    }
    return tuple((call, offsets[(call, start)]) for call, start, _ in schedule.output_order)


def assemble(outputs: Sequence[Tensor | None], schedule: Schedule, like: Tensor) -> Tensor:
    """Call outputs -> ``[B, N, H, D]`` in input order (one concatenation).
    A call with several query segments has its output split, not sliced: one
    backward pass for it, not one whole-size gradient per segment."""
    split: dict[int, tuple[Tensor, ...]] = {}
    pieces = []
    for call, index in _output_pieces(schedule):
        out = outputs[call]
        assert out is not None
        queries = schedule.calls[call].queries
        if len(queries) == 1:
            pieces.append(out)
            continue
        if call not in split:
            split[call] = tuple(out.split_with_sizes([s.length for s in queries], 1))
        pieces.append(split[call][index])
    if not pieces:
        return like[:, :0]
    if len(pieces) == 1:
        return pieces[0]
    return torch.cat(pieces, dim=1)
