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


def _token_tables(ids: Tensor, sizes: Tensor, starts: Tensor, length: int) -> tuple[Tensor, Tensor]:
    """Per-token group id and position within the group, expanded on the
    device from one row per segment (padding included)."""
    gids = torch.repeat_interleave(ids, sizes, output_size=length).to(torch.int32)
    offsets = torch.repeat_interleave(starts, sizes, output_size=length)
    pos = (torch.arange(length, device=ids.device) - offsets).to(torch.int32)
    return gids, pos


class _Upload:
    """Gathers small host tensors and moves them to the device in one copy."""

    def __init__(self) -> None:
        self._parts: list[tuple[Tensor, torch.dtype, tuple[int, ...]]] = []

    def add(self, t: Tensor) -> int:
        self._parts.append((t.reshape(-1).to(torch.int64), t.dtype, tuple(t.shape)))
        return len(self._parts) - 1

    def send(self, device: torch.device) -> list[Tensor]:
        flat = torch.cat([p for p, _, _ in self._parts]).to(device)
        out, start = [], 0
        for part, dtype, shape in self._parts:
            out.append(flat[start : start + part.numel()].reshape(shape).to(dtype))
            start += part.numel()
        return out


def _with_padding(
    segments: list[tuple[int, int, int]], length: int, pad_group: int
) -> list[tuple[int, int, int]]:
    real = segments[-1][2] if segments else 0
    return [*segments, (pad_group, real, length)] if real < length else list(segments)


def _overlaps_per_block(segments: list[tuple[int, int, int]], n_blocks: int, block: int) -> Tensor:
    """``[blocks]`` (host): how many segments (padding included) overlap each block."""
    diff = [0] * (n_blocks + 1)
    for _, start, stop in segments:
        diff[start // block] += 1
        diff[(stop - 1) // block + 1] -= 1
    return torch.cumsum(torch.tensor(diff, dtype=torch.int32), 0, dtype=torch.int32)[:n_blocks]


def _pair_updates(
    q_segs: list[tuple[int, int, int]],
    k_segs: list[tuple[int, int, int]],
    allowed: Tensor,
    causal: Tensor,
    window: Tensor,
    block: int,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Host side of the block classes, per allowed (query segment, key segment) pair.

    Pairs without modifiers are allowed on their whole block rectangle: they
    become the four corners of a 2-D difference array (rows, cols, signs).
    Pairs with modifiers are classified block by block on their rectangle (one
    padded batch for all of them) by interval arithmetic on positions within
    the groups: (rows, cols, non-empty, full) per block.
    """
    q = torch.tensor(q_segs, dtype=torch.int64)  # [Sq, 3]
    k = torch.tensor(k_segs, dtype=torch.int64)
    qi, ki = allowed[q[:, 0]][:, k[:, 0]].nonzero(as_tuple=True)
    gq = q[qi, 0]
    r0, r1 = q[qi, 1] // block, (q[qi, 2] - 1) // block
    c0, c1 = k[ki, 1] // block, (k[ki, 2] - 1) // block
    modified = causal[gq] | (window[gq] > 0)
    plain = ~modified
    corner_rows = torch.cat([r0[plain], r0[plain], r1[plain] + 1, r1[plain] + 1])
    corner_cols = torch.cat([c0[plain], c1[plain] + 1, c0[plain], c1[plain] + 1])
    signs = torch.tensor([1, -1, -1, 1], dtype=torch.int32).repeat_interleave(int(plain.sum()))
    empty = torch.zeros(0, dtype=torch.int64)
    if not bool(modified.any()):
        return corner_rows, corner_cols, signs, empty, empty, empty, empty
    m = modified.nonzero(as_tuple=True)[0]
    height = int((r1[m] - r0[m]).max()) + 1
    width = int((c1[m] - c0[m]).max()) + 1
    rows = r0[m, None] + torch.arange(height)  # [P, R]
    cols = c0[m, None] + torch.arange(width)  # [P, C]
    q_start, q_stop = q[qi[m], 1, None], q[qi[m], 2, None]
    k_start, k_stop = k[ki[m], 1, None], k[ki[m], 2, None]
    qlo = (torch.maximum(rows * block, q_start) - q_start)[:, :, None]
    qhi = (torch.minimum(rows * block + block - 1, q_stop - 1) - q_start)[:, :, None]
    klo = (torch.maximum(cols * block, k_start) - k_start)[:, None, :]
    khi = (torch.minimum(cols * block + block - 1, k_stop - 1) - k_start)[:, None, :]
    is_causal = causal[gq[m]][:, None, None]
    win = window[gq[m]].to(torch.int64)[:, None, None]
    has_window = win > 0
    pair_full = (~is_causal | (khi <= qlo)) & (~has_window | (torch.maximum(qhi - klo, khi - qlo) < win))
    pair_empty = (is_causal & (klo > qhi)) | (has_window & ((klo - qhi >= win) | (qlo - khi >= win)))
    inside = (rows <= r1[m, None])[:, :, None] & (cols <= c1[m, None])[:, None, :]
    return (
        corner_rows,
        corner_cols,
        signs,
        rows[:, :, None].expand_as(inside)[inside],
        cols[:, None, :].expand_as(inside)[inside],
        (~pair_empty)[inside].to(torch.int32),
        pair_full[inside].to(torch.int32),
    )


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
        q_segs, k_segs = _with_padding(queries, q_len, pad), _with_padding(keys, kv_len, pad)
        shape = (q_len // block, kv_len // block)

        # everything small is computed on the host and moved in one copy
        upload = _Upload()
        for t in (allowed, causal, window):
            upload.add(t)
        for segs in (q_segs, k_segs):
            seg = torch.tensor(segs, dtype=torch.int64)
            for t in (seg[:, 0], seg[:, 2] - seg[:, 1], seg[:, 1]):
                upload.add(t)
        upload.add(_overlaps_per_block(q_segs, shape[0], block))
        upload.add(_overlaps_per_block(k_segs, shape[1], block))
        for t in _pair_updates(q_segs, k_segs, allowed, causal, window, block):
            upload.add(t)
        (
            allowed, causal, window,
            q_ids, q_sizes, q_starts, k_ids, k_sizes, k_starts,
            q_overlaps, k_overlaps,
            corner_rows, corner_cols, signs, mod_rows, mod_cols, mod_nonempty, mod_full,
        ) = upload.send(device)  # fmt: skip
        q_group, q_pos = _token_tables(q_ids, q_sizes, q_starts, q_len)
        kv_group, kv_pos = _token_tables(k_ids, k_sizes, k_starts, kv_len)

        # block classes: a block is full when every (query segment, key segment)
        # pair overlapping it is full, empty when none is non-empty
        diff = torch.zeros(shape[0] + 1, shape[1] + 1, dtype=torch.int32, device=device)
        diff.index_put_((corner_rows, corner_cols), signs, accumulate=True)
        plain = diff.cumsum(0, dtype=torch.int32).cumsum(1, dtype=torch.int32)[: shape[0], : shape[1]]
        nonempty_pairs, full_pairs = plain.clone(), plain
        if mod_rows.numel():
            nonempty_pairs.index_put_((mod_rows, mod_cols), mod_nonempty, accumulate=True)
            full_pairs.index_put_((mod_rows, mod_cols), mod_full, accumulate=True)
        nonempty = nonempty_pairs > 0
        full = (full_pairs == q_overlaps[:, None] * k_overlaps[None, :]) & nonempty
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
        kv_num, kv_idx = _ordered(partial)
        full_kv_num, full_kv_idx = _ordered(full)
        block_size = (self.q_len // partial.shape[0], self.kv_len // partial.shape[1])
        mask_mod = self.mask_mod(key_padding_mask)
        try:  # the q-major copies (for the backward pass) from the same cheap ordering
            q_num, q_idx = _ordered(partial.t())
            full_q_num, full_q_idx = _ordered(full.t())
            return BlockMask(
                seq_lengths=(self.q_len, self.kv_len),
                kv_num_blocks=kv_num,
                kv_indices=kv_idx,
                full_kv_num_blocks=full_kv_num,
                full_kv_indices=full_kv_idx,
                q_num_blocks=q_num,
                q_indices=q_idx,
                full_q_num_blocks=full_q_num,
                full_q_indices=full_q_idx,
                BLOCK_SIZE=block_size,
                mask_mod=mask_mod,
            )
        except TypeError:  # a torch whose BlockMask takes other arguments
            return BlockMask.from_kv_blocks(
                kv_num,
                kv_idx,
                full_kv_num,
                full_kv_idx,
                BLOCK_SIZE=block_size,
                mask_mod=mask_mod,
                seq_lengths=(self.q_len, self.kv_len),
            )

    @property
    def sparsity(self) -> float:
        """Fraction of blocks skipped entirely."""
        total = self.partial.numel()
        return 1.0 - float((self.partial | self.full).sum()) / total if total else 0.0


def _ordered(blocks: Tensor) -> tuple[Tensor, Tensor]:
    """Dense ``[rows, cols]`` bool -> (count per row, column indices of the True
    entries first, in order, then the others) as FlexAttention stores them.
    A stable partition by prefix sums and one scatter: no sort."""
    taken = blocks.to(torch.int32).contiguous()  # kernels index rows with the last dim contiguous
    counts = taken.sum(dim=-1, dtype=torch.int32)
    before_true = taken.cumsum(-1, dtype=torch.int32) - taken
    before_false = torch.arange(blocks.shape[-1], device=blocks.device, dtype=torch.int32) - before_true
    slot = torch.where(taken.bool(), before_true, counts[:, None] + before_false).to(torch.int64)
    columns = torch.arange(blocks.shape[-1], device=blocks.device, dtype=torch.int32).expand_as(taken)
    indices = torch.empty_like(taken).scatter_(-1, slot, columns)
    return counts[None, None], indices[None, None]
