"""FlexAttention block masks built analytically from the group layout.

``create_block_mask`` finds empty, partial and full blocks by evaluating the
mask per element: un-compiled it materialises an ``[n, n]`` tensor, compiled it
costs milliseconds per layout. Here the block classes follow from the group
intervals alone: for each ``(query block, key block)`` the few groups that
overlap each block are paired, and a pair is *full* (every token pair allowed)
or *empty* (none allowed) by interval arithmetic on the tokens' positions in
their groups; a block is full when all its pairs are, empty when all are.

The ``mask_mod`` reads a small ``[groups, groups]`` table through per-token
group ids, so no ``[n, n]`` tensor exists anywhere.

>>> import patternc
>>> from patternc.nn.schedule import schedule_for
>>> plan = patternc.compile("groups a q\\na, q -> a").patterns["default"]
>>> tables = FlexTables.build(schedule_for(plan.token_specs({"a": 256, "q": 512}), plan), {}, "cpu")
>>> tables.block_mask().shape
(1, 1, 768, 768)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from patternc.nn.schedule import Schedule

__all__ = ["BLOCK_SIZE", "FlexTables", "bucket_length", "group_segments"]

BLOCK_SIZE = 128
"""FlexAttention's sparse block size (queries and keys)."""

MaskMod = Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]


def bucket_length(n: int, block: int = BLOCK_SIZE) -> int:
    """Pad lengths to few distinct values so changing sizes do not recompile the
    kernel each time: whole blocks, then steps of a quarter octave above 8 blocks
    (at most ~19% padding, and padded blocks are empty: they cost no compute)."""
    blocks = max(1, math.ceil(n / block))
    if blocks > 8:
        octave = 2 ** (blocks.bit_length() - 1)
        step = octave // 4
        blocks = math.ceil(blocks / step) * step
    return blocks * block


def group_segments(
    schedule: Schedule, cache_lengths: Mapping[str, int]
) -> tuple[list[tuple[int, int, int]], list[tuple[int, int, int]]]:
    """``(group, start, stop)`` of the query tokens (the input) and of the key
    tokens (the input, then each cached group), skipping empty groups."""
    queries = []
    start = 0
    for gid, size in zip(schedule.group_ids, schedule.input_sizes):
        if size:
            queries.append((gid, start, start + size))
        start += size
    keys = list(queries)
    for name in schedule.cached_groups:
        length = cache_lengths[name]
        if length:
            keys.append((schedule.all_groups.index(name), start, start + length))
        start += length
    return queries, keys


def _token_tables(
    segments: list[tuple[int, int, int]], length: int, pad_group: int, device: torch.device
) -> tuple[Tensor, Tensor]:
    """Per-token group id (``pad_group`` beyond the real tokens) and position within the group."""
    gids = torch.full((length,), pad_group, dtype=torch.int32)
    pos = torch.zeros(length, dtype=torch.int32)
    for gid, start, stop in segments:
        gids[start:stop] = gid
        pos[start:stop] = torch.arange(stop - start, dtype=torch.int32)
    return gids.to(device), pos.to(device)


def _block_slots(
    segments: list[tuple[int, int, int]], length: int, pad_group: int, block: int, device: torch.device
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """For each block: the segments overlapping it (``[blocks, S]`` group ids,
    validity, first and last position within the group)."""
    segs = list(segments)
    real = segs[-1][2] if segs else 0
    if real < length:
        segs.append((pad_group, real, length))
    seg = torch.tensor(segs, dtype=torch.int64, device=device)  # [n_seg, 3]
    gid, s_start, s_stop = (seg[:, i].contiguous() for i in range(3))
    n_blocks = length // block
    b_start = torch.arange(n_blocks, device=device) * block
    b_last = b_start + block - 1
    first = torch.searchsorted(s_stop, b_start, right=True)  # first segment ending after the block start
    last = torch.searchsorted(s_start, b_last, right=True) - 1  # last segment starting inside the block
    width = int((last - first).max().item()) + 1 if n_blocks else 1
    slot = first[:, None] + torch.arange(width, device=device)[None, :]
    valid = slot <= last[:, None]
    slot = slot.clamp(max=len(segs) - 1)
    lo = torch.maximum(b_start[:, None], s_start[slot]) - s_start[slot]
    hi = torch.minimum(b_last[:, None], s_stop[slot] - 1) - s_start[slot]
    return gid[slot], valid, lo, hi


@dataclass(frozen=True)
class FlexTables:
    """Device tables of one layout: what the ``mask_mod`` reads and the block classes."""

    q_len: int
    kv_len: int
    n_queries: int
    q_group: Tensor
    kv_group: Tensor
    q_pos: Tensor
    kv_pos: Tensor
    allowed: Tensor
    causal: Tensor
    window: Tensor
    has_modifiers: bool
    partial: Tensor
    full: Tensor

    @staticmethod
    def build(
        schedule: Schedule,
        cache_lengths: Mapping[str, int],
        device: torch.device | str,
        block: int = BLOCK_SIZE,
    ) -> FlexTables:
        device = torch.device(device)
        n_groups = len(schedule.all_groups)
        pad = n_groups  # the padding "group": allowed nowhere
        queries, keys = group_segments(schedule, cache_lengths)
        n_q = schedule.n_tokens
        n_kv = n_q + sum(cache_lengths[g] for g in schedule.cached_groups)
        q_len, kv_len = bucket_length(n_q, block), bucket_length(n_kv, block)

        allowed = torch.zeros(n_groups + 1, n_groups + 1, dtype=torch.bool)
        allowed[:n_groups, :n_groups] = torch.tensor(schedule.allowed, dtype=torch.bool).reshape(
            n_groups, n_groups
        )
        mods = schedule.group_modifiers or ()
        causal = torch.tensor(
            [m.causal for m in mods] + [False] * (n_groups + 1 - len(mods)), dtype=torch.bool
        )
        window = torch.tensor(
            [m.window or 0 for m in mods] + [0] * (n_groups + 1 - len(mods)), dtype=torch.int32
        )
        allowed, causal, window = allowed.to(device), causal.to(device), window.to(device)
        q_group, q_pos = _token_tables(queries, q_len, pad, device)
        kv_group, kv_pos = _token_tables(keys, kv_len, pad, device)

        # block classes
        qg, qv, qlo, qhi = (t[:, None, :, None] for t in _block_slots(queries, q_len, pad, block, device))
        kg, kvv, klo, khi = (t[None, :, None, :] for t in _block_slots(keys, kv_len, pad, block, device))
        valid = qv & kvv
        pair_allowed = allowed[qg, kg] & valid
        is_causal = causal[qg]
        win = window[qg].to(torch.int64)
        has_window = win > 0
        full_causal = ~is_causal | (khi <= qlo)
        empty_causal = is_causal & (klo > qhi)
        full_window = ~has_window | (torch.maximum(qhi - klo, khi - qlo) < win)
        empty_window = has_window & ((klo - qhi >= win) | (qlo - khi >= win))
        pair_nonempty = pair_allowed & ~empty_causal & ~empty_window
        pair_full = pair_allowed & full_causal & full_window
        nonempty = pair_nonempty.any(dim=(2, 3))
        full = (pair_full | ~valid).all(dim=(2, 3)) & nonempty
        return FlexTables(
            q_len=q_len,
            kv_len=kv_len,
            n_queries=n_q,
            q_group=q_group,
            kv_group=kv_group,
            q_pos=q_pos,
            kv_pos=kv_pos,
            allowed=allowed,
            causal=causal,
            window=window,
            has_modifiers=bool(any(mods)),
            partial=nonempty & ~full,
            full=full,
        )

    def mask_mod(self, key_padding_mask: Tensor | None = None) -> MaskMod:
        """``mask_mod(b, h, q_idx, kv_idx)``: group table lookup, then the
        rule's modifiers on positions within groups, then key padding."""
        q_group, kv_group, allowed = self.q_group, self.kv_group, self.allowed

        def groups(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
            return allowed[q_group[q_idx], kv_group[kv_idx]]

        mask = groups
        if self.has_modifiers:
            q_pos, kv_pos, causal, window = self.q_pos, self.kv_pos, self.causal, self.window

            def with_modifiers(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
                gq = q_group[q_idx]
                qp, kp = q_pos[q_idx], kv_pos[kv_idx]
                ok = allowed[gq, kv_group[kv_idx]] & (~causal[gq] | (kp <= qp))
                w = window[gq]
                return ok & ((w == 0) | ((qp - kp).abs() < w))

            mask = with_modifiers
        if key_padding_mask is None:
            return mask
        padding = key_padding_mask
        inner = mask

        def with_padding(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
            return inner(b, h, q_idx, kv_idx) & padding[b, kv_idx]

        return with_padding

    def block_mask(self, key_padding_mask: Tensor | None = None) -> object:
        """The ``BlockMask``: full blocks skip the ``mask_mod``; with key padding
        every non-empty block is partial (padding is checked per element)."""
        from torch.nn.attention.flex_attention import BlockMask

        partial, full = self.partial, self.full
        if key_padding_mask is not None:
            partial, full = partial | full, torch.zeros_like(full)
        return BlockMask.from_kv_blocks(
            *_ordered(partial),
            *_ordered(full),
            BLOCK_SIZE=(self.q_len // partial.shape[0], self.kv_len // partial.shape[1]),
            mask_mod=self.mask_mod(key_padding_mask),
            seq_lengths=(self.q_len, self.kv_len),
        )

    @property
    def sparsity(self) -> float:
        """Fraction of blocks skipped entirely."""
        total = self.partial.numel()
        return 1.0 - float((self.partial | self.full).sum()) / total if total else 0.0


def _ordered(blocks: Tensor) -> tuple[Tensor, Tensor]:
    """Dense ``[Q_blocks, KV_blocks]`` bool -> (count per row, column indices
    of the True entries first) as FlexAttention stores them."""
    counts = blocks.sum(dim=-1, dtype=torch.int32)
    indices = torch.argsort(blocks.to(torch.int8), dim=-1, descending=True, stable=True).to(torch.int32)
    return counts[None, None], indices[None, None]
