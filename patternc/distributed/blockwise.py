"""Attention over key blocks, merged by their log-sum-exp.

Under a placement a rank's queries see keys in pieces: a ring step's
block, the gathered keys, a cached group. Each piece's mask follows from
tokens' groups and *global* positions within the groups, so ``[causal]`` and
``[window N]`` mean what they mean on one device wherever the tokens sit.
Both sides of a piece are runs of consecutive positions of one group
(:class:`Segment`), so for a query the keys it may read in a segment are
one interval of positions (a dilated band: a subset of it): which tiles of
a piece are empty, partial or full follows from interval arithmetic on the
segments (:func:`classify`), without an ``[Lq, Lk]`` mask anywhere.
A piece whose (query segment, key segment) pairs are each read whole or
causally on the diagonal needs no mask at all (:func:`rectangles`):
torch's flash kernels attend it, and its backward takes the merged output
directly (:mod:`~patternc.distributed.dense`).

:class:`BlockKernel` attends one piece with the log-sum-exp of its scores:
FlexAttention with a block mask built from those classes, or the reference
(plain PyTorch, ``query_chunk`` rows at a time against the non-empty key
tiles only, the mask of a partial tile built inside the chunk from the
tokens' positions). A piece with no non-empty tile is not computed.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from patternc.distributed import dense
from patternc.distributed.merge import LseMerge
from patternc.modifiers import Neighbourhood
from patternc.nn.executors.flexkernels import KernelOptions, kernel_options
from patternc.nn.flexmask import INT32_BOUND

if TYPE_CHECKING:
    from torch.nn.attention.flex_attention import BlockMask

__all__ = [
    "BLOCK_SHAPES",
    "KEY_TILE",
    "BlockKernel",
    "Kernel",
    "Rectangle",
    "Segment",
    "StepArgs",
    "classify",
    "pair_mask",
    "partial_attention",
    "rectangles",
    "split_kv",
]

Kernel = Literal["auto", "flex", "reference"]
"""Which kernel attends a block: ``"auto"`` (torch's flash kernels on a
block with no mask, :mod:`~patternc.distributed.dense`; FlexAttention on
CUDA and the reference elsewhere on the others), ``"flex"`` (FlexAttention's
forward wherever torch runs it; the gradient of a block with no mask from
the flash backward, of the others from FlexAttention on CUDA and the
reference on CPU) or ``"reference"``."""

KEY_TILE = 128
"""Keys per tile: the reference skips empty tiles, FlexAttention's blocks have this size."""

BLOCK_SHAPES = 64
"""Block shapes FlexAttention may be compiled for in one process: torch's
recompile limit is raised to this when the kernel first compiles it."""

EMPTY, PARTIAL, FULL = 0, 1, 2


def split_kv(kv: Tensor, dim: int) -> tuple[Tensor, Tensor]:
    """Keys and values of a packed ``[..., 2 * dim (+ 1 padding channel)]`` tensor (views)."""
    return kv[..., :dim], kv[..., dim : 2 * dim]


class Segment(NamedTuple):
    """Consecutive tokens of one group: the group's index in the call, the
    first token's position within the group, and how many there are. A
    piece's tokens are its segments one after another."""

    group: int
    position: int
    length: int


Attend = Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]
"""``(queries, packed keys/values) -> (output, log-sum-exp)`` of one piece."""

Band = tuple[tuple[tuple[int, int, int, int], ...], ...]
"""Per (query group, key group) of a call: ``(low, high, dilation, residue)``
of ``d = key position - query position`` (open sides far away)."""

Grids = tuple[tuple["Neighbourhood | None", ...], ...]
"""Per (query group, key group) of a call: the neighbourhood on a shaped
group (its band is open), or None. Positions within the groups are global,
so a shard's tokens have their coordinates on the whole shape."""


def _spans(segments: Sequence[Segment], block: int, n_blocks: int) -> list[tuple[Tensor, Tensor, Tensor]]:
    """Per segment: for each block of ``block`` rows, whether they overlap and
    the first and last position of the overlap (``[n_blocks]`` each)."""
    starts = torch.arange(n_blocks, dtype=torch.long) * block
    ends = starts + block
    out, row = [], 0
    for seg in segments:
        lo = starts.clamp(min=row)
        hi = ends.clamp(max=row + seg.length)
        out.append((hi > lo, seg.position + lo - row, seg.position + hi - 1 - row))
        row += seg.length
    return out


def classify(
    queries: Sequence[Segment],
    keys: Sequence[Segment],
    band: Band,
    q_block: int,
    k_block: int,
    grids: Grids | None = None,
) -> Tensor:
    """``[query blocks, key blocks]`` int8: :data:`EMPTY` where no pair of a
    tile is allowed, :data:`FULL` where every pair is, :data:`PARTIAL` else
    (a dilated band is never full). Computed per (query segment, key segment)
    from the range of ``d`` over the tile, so its cost follows the tiles,
    not the tokens; a pair under a neighbourhood (``grids``) from the
    coordinate ranges of each tile (:meth:`Neighbourhood.cell_class
    <patternc.modifiers.Neighbourhood.cell_class>`, one tile at a time)."""
    n_q, n_k = sum(s.length for s in queries), sum(s.length for s in keys)
    n_qb, n_kb = -(-n_q // q_block), -(-n_k // k_block)
    nonempty = torch.zeros(n_qb, n_kb, dtype=torch.bool)
    partial = torch.zeros(n_qb, n_kb, dtype=torch.bool)
    k_spans = _spans(keys, k_block, n_kb)
    for q_seg, (q_ok, x0, x1) in zip(queries, _spans(queries, q_block, n_qb)):
        for k_seg, (k_ok, y0, y1) in zip(keys, k_spans):
            low, high, dilation, _ = band[q_seg.group][k_seg.group]
            both = q_ok[:, None] & k_ok[None, :]
            grid = grids[q_seg.group][k_seg.group] if grids is not None else None
            if grid is not None:
                some, full = _grid_tiles(grid, both, x0, x1, y0, y1)
                nonempty |= some
                partial |= both & ~full
                continue
            d_min = y0[None, :] - x1[:, None]
            d_max = y1[None, :] - x0[:, None]
            some = both & (d_max >= low) & (d_min <= high)
            full = (d_min >= low) & (d_max <= high) & (dilation == 1)
            nonempty |= some
            partial |= both & ~full
    classes = torch.full((n_qb, n_kb), FULL, dtype=torch.int8)
    classes[partial] = PARTIAL
    classes[~nonempty] = EMPTY
    return classes


class Rectangle(NamedTuple):
    """Query rows by key rows of a block that every query reads whole
    (``causal`` False) or causally on the diagonal: the same positions on
    both sides, query ``i`` reading keys up to ``i``."""

    rows: slice
    keys: slice
    causal: bool

    def covers(self, n_q: int) -> bool:
        """Whether every one of ``n_q`` query rows reads every key of the rectangle."""
        return self.rows == slice(0, n_q) and not self.causal


def rectangles(
    queries: Sequence[Segment], keys: Sequence[Segment], band: Band | None, grids: Grids | None = None
) -> tuple[Rectangle, ...] | None:
    """A block (``band`` None: every pair allowed) as the rectangles of its
    (query segment, key segment) pairs that some query reads, or None if a
    pair needs a mask: one read in part, other than a causal diagonal, or
    under a neighbourhood. A pair's keys are read whole when the range of
    ``d = key position - query position`` over the pair lies in its band
    (undilated). Neighbouring whole rectangles are joined: key segments
    side by side for a query segment, then query segments above one another
    with the same keys, so a block read whole is one rectangle."""
    rows: list[list[Rectangle]] = []
    q_start = 0
    for q_seg in queries:
        row: list[Rectangle] = []
        k_start = 0
        q_rows = slice(q_start, q_start + q_seg.length)
        for k_seg in keys:
            k_rows = slice(k_start, k_start + k_seg.length)
            k_start += k_seg.length
            if not q_seg.length or not k_seg.length:
                continue
            if grids is not None and grids[q_seg.group][k_seg.group] is not None:
                return None
            read: _Read | None = "whole"
            if band is not None:
                read = _pair_read(q_seg, k_seg, band[q_seg.group][k_seg.group])
            if read is None:
                return None
            if read == "none":
                continue
            causal = read == "causal"
            if row and not causal and not row[-1].causal and row[-1].keys.stop == k_rows.start:
                row[-1] = Rectangle(q_rows, slice(row[-1].keys.start, k_rows.stop), False)
            else:
                row.append(Rectangle(q_rows, k_rows, causal))
        rows.append(row)
        q_start += q_seg.length
    joined: list[Rectangle] = []
    below: dict[tuple[int, int], int] = {}  # a whole rectangle's keys -> its index in joined
    for row in rows:
        for r in row:
            at = below.get((r.keys.start, r.keys.stop))
            if not r.causal and at is not None and joined[at].rows.stop == r.rows.start:
                joined[at] = Rectangle(slice(joined[at].rows.start, r.rows.stop), r.keys, False)
                continue
            if not r.causal:
                below[(r.keys.start, r.keys.stop)] = len(joined)
            joined.append(r)
    return _join_causal(joined)


def _join_causal(pieces: list[Rectangle]) -> tuple[Rectangle, ...]:
    """Join a causal square ``A``, the rectangle of the next rows reading
    ``A``'s keys whole, and the next causal square ``B`` (rows and keys each
    following ``A``'s) into one causal square over both: row ``i`` then
    reads key ``j`` exactly where ``j <= i`` in the square. A causal
    document's two chunks on one rank become one launch instead of three.
    Squares in row order, each joined square carried on to the next."""

    def span(r: Rectangle) -> tuple[int, int, int, int]:  # slices are not hashable before Python 3.12
        return (r.rows.start, r.rows.stop, r.keys.start, r.keys.stop)

    whole = {span(r) for r in pieces if not r.causal}
    squares = sorted((r for r in pieces if r.causal), key=lambda r: r.rows.start)
    used: set[tuple[int, int, int, int]] = set()
    joined: list[Rectangle] = []
    for b in squares:
        a = joined[-1] if joined else None
        if a is not None and a.rows.stop == b.rows.start and a.keys.stop == b.keys.start:
            between = (b.rows.start, b.rows.stop, a.keys.start, a.keys.stop)
            if between in whole:  # each square's rows are its own: no whole rectangle joins twice
                used.add(between)
                joined[-1] = Rectangle(
                    slice(a.rows.start, b.rows.stop), slice(a.keys.start, b.keys.stop), True
                )
                continue
        joined.append(b)
    rest = [r for r in pieces if not r.causal and span(r) not in used]
    return tuple(sorted([*rest, *joined], key=lambda r: (r.rows.start, r.keys.start)))


_Read = Literal["none", "whole", "causal"]


def _pair_read(q: Segment, k: Segment, band: tuple[int, int, int, int]) -> _Read | None:
    """How a query segment reads a key segment under ``band``: ``"none"``,
    ``"whole"``, ``"causal"`` (the same positions, keys up to the query's),
    or None (a mask is needed)."""
    low, high, dilation, _ = band
    d_min, d_max = _d_range(q, k)
    if d_max < low or d_min > high:
        return "none"
    if dilation == 1 and low <= d_min and d_max <= high:
        return "whole"
    square = q.position == k.position and q.length == k.length
    if square and dilation == 1 and high == 0 and low <= -(q.length - 1):
        return "causal"
    return None


def _grid_tiles(
    grid: Neighbourhood, both: Tensor, x0: Tensor, x1: Tensor, y0: Tensor, y1: Tensor
) -> tuple[Tensor, Tensor]:
    """``(some, full)`` per tile of a (query segment, key segment) pair under
    ``grid``: tiles where both overlap, classified from their positions."""
    some = torch.zeros_like(both)
    full = torch.zeros_like(both)
    for i, j in both.nonzero().tolist():
        some[i, j], full[i, j] = grid.cell_class(int(x0[i]), int(x1[i]), int(y0[j]), int(y1[j]))
    return some, full


def _d_range(q: Segment, k: Segment) -> tuple[int, int]:
    """The least and greatest ``d = key position - query position`` over a
    query segment and a key segment (both non-empty)."""
    return k.position - (q.position + q.length - 1), k.position + k.length - 1 - q.position


def reads_any(
    queries: Sequence[Segment], keys: Sequence[Segment], band: Band, grids: Grids | None = None
) -> bool:
    """Whether any query of ``queries`` may read any key of ``keys`` (segment arithmetic only)."""
    for q in queries:
        for k in keys:
            low, high, _, _ = band[q.group][k.group]
            grid = grids[q.group][k.group] if grids is not None else None
            if grid is not None and q.length and k.length:
                some, _ = grid.cell_class(
                    q.position, q.position + q.length - 1, k.position, k.position + k.length - 1
                )
                if some:
                    return True
                continue
            if q.length and k.length:
                d_min, d_max = _d_range(q, k)
                if d_max >= low and d_min <= high:
                    return True
    return False


def pair_mask(
    q_pos: Tensor,
    q_group: Tensor,
    k_pos: Tensor,
    k_group: Tensor,
    band: tuple[Tensor, Tensor, Tensor, Tensor],
    grids: Sequence[tuple[Neighbourhood, Tensor]] = (),
) -> Tensor:
    """``[Lq, Lk]`` bool: allowed pairs. ``band`` is the ``low``, ``high``,
    ``dilation`` and ``residue`` ``[qg, kg]`` tables of each (query group, key
    group) pair's :class:`~patternc.modifiers.Band` (positions within groups);
    ``grids``: each neighbourhood and the ``[qg, kg]`` bool table of the
    pairs under it (coordinates by div/mod of the positions)."""
    low, high, dilation, residue = (table[q_group][:, k_group] for table in band)
    d = k_pos[None, :] - q_pos[:, None]
    ok = (d >= low) & (d <= high) & ((d - residue) % dilation == 0)
    for grid, holds in grids:
        ok = ok & (~holds[q_group][:, k_group] | grid.allows(q_pos[:, None], k_pos[None, :]))
    return ok


def partial_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    allowed: Tensor | None,
    bias: Tensor | None,
    scale: float,
    dropout_p: float,
) -> tuple[Tensor, Tensor]:
    """Softmax attention of ``q`` ``[B, Lq, H, D]`` to one key block
    ``k``/``v`` ``[B, Lk, H, D]``: the block-normalised output ``[B, Lq, H, D]``
    and the log-sum-exp ``[B, H, Lq]`` of the allowed scores (``-inf`` for a
    query that sees no key of the block). ``allowed``: ``[Lq, Lk]`` or
    ``[B, Lq, Lk]``; ``bias``: additive, broadcast to ``[B, H, Lq, Lk]``."""
    work = torch.promote_types(q.dtype, torch.float32)
    scores = torch.einsum("bqhd,bkhd->bhqk", q.to(work), k.to(work)) * scale
    if bias is not None:
        scores = scores + bias
    if allowed is not None:
        mask = allowed[:, None] if allowed.dim() == 3 else allowed
        scores = scores.masked_fill(~mask, float("-inf"))
    # rows with no allowed key: a logsumexp of all -inf has a NaN gradient,
    # so it runs on zeros there and the row is marked -inf afterwards
    seen = torch.isfinite(scores).any(dim=-1)
    lse = torch.logsumexp(scores.masked_fill(~seen[..., None], 0.0), dim=-1)
    probs = torch.exp(scores - lse[..., None])
    lse = lse.masked_fill(~seen, float("-inf"))
    if dropout_p > 0:
        probs = F.dropout(probs, dropout_p)
    out = torch.einsum("bhqk,bkhd->bqhd", probs, v.to(work))
    return out.to(q.dtype), lse


@dataclass(frozen=True)
class StepArgs:
    """What every block of one call's run shares: head size, scale, dropout,
    ALiBi slopes, whether keys carry a padding channel, and the kernel."""

    dim: int
    scale: float
    dropout_p: float
    slopes: Tensor | None
    padded: bool
    kernel: Kernel


@dataclass(frozen=True)
class _Chunk:
    """``query_chunk`` rows of the reference and the keys they read: all of
    the block (``keys`` None), a slice, or the rows of its non-empty tiles."""

    start: int
    stop: int
    keys: slice | Tensor | None
    masked: bool


class BlockKernel:
    """A rank's queries against one key block: positions, groups and the
    tile classes, built once per (call, block).

    Args:
        queries: the query segments, in the order of the query rows.
        keys: the key segments, in the order of the block's rows.
        band: each (query group, key group) pair's band.
        modified: whether the call has modifiers (else every pair is allowed).
        device: where the tables live.
        query_chunk: query rows per step of the reference.
        grids: each (query group, key group) pair's neighbourhood, if any.
    """

    def __init__(
        self,
        queries: Sequence[Segment],
        keys: Sequence[Segment],
        band: Band,
        modified: bool,
        device: torch.device,
        query_chunk: int,
        grids: Grids | None = None,
    ) -> None:
        self.queries, self.keys, self.band = tuple(queries), tuple(keys), band
        self.grids = grids if grids is not None and any(g for row in grids for g in row) else None
        self.modified, self.device = modified, device
        self.n_q = sum(s.length for s in queries)
        self.n_k = sum(s.length for s in keys)
        self.query_chunk = max(1, query_chunk)
        self.empty = not (self.n_q and self.n_k and reads_any(queries, keys, band, self.grids))
        """Nothing to compute: no query may read any key of the block."""
        self._chunks: tuple[_Chunk, ...] | None = None
        self._masks: dict[int | None, tuple[BlockMask, Tensor | None]] = {}
        self._score_mods: dict[tuple[int, torch.dtype], tuple[Tensor, Callable[..., Tensor]]] = {}

    # ----------------------------------------------------------- tables

    @functools.cached_property
    def _tokens(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Per query and per key: position within its group and group index."""

        def expand(segments: Sequence[Segment]) -> tuple[Tensor, Tensor]:
            pos = [torch.arange(s.position, s.position + s.length) for s in segments]
            grp = [torch.full((s.length,), s.group, dtype=torch.long) for s in segments]
            empty = torch.zeros(0, dtype=torch.long)
            return torch.cat(pos) if pos else empty, torch.cat(grp) if grp else empty

        q_pos, q_grp = expand(self.queries)
        k_pos, k_grp = expand(self.keys)
        d = self.device
        return q_pos.to(d), q_grp.to(d), k_pos.to(d), k_grp.to(d)

    @functools.cached_property
    def _grid_tables(self) -> tuple[tuple[Neighbourhood, Tensor], ...]:
        """Each distinct neighbourhood and the ``[qg, kg + 1]`` bool table of
        the pairs under it (the last key group: padding, under none)."""
        if self.grids is None:
            return ()
        out: dict[Neighbourhood, Tensor] = {}
        n_q, n_k = len(self.grids), len(self.grids[0]) if self.grids else 0
        for qg, row in enumerate(self.grids):
            for kg, grid in enumerate(row):
                if grid is not None:
                    out.setdefault(grid, torch.zeros(n_q, n_k + 1, dtype=torch.bool))[qg, kg] = True
        return tuple((grid, table.to(self.device)) for grid, table in out.items())

    @functools.cached_property
    def _band_tables(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        table = torch.tensor(self.band, dtype=torch.long).reshape(len(self.band), -1, 4)
        return tuple(table[:, :, i].contiguous().to(self.device) for i in range(4))  # type: ignore[return-value]

    def chunks(self, padded: bool) -> tuple[_Chunk, ...]:
        """The reference's query chunks that read something, with their key tiles."""
        if self._chunks is None:
            self._chunks = self._build_chunks()
        if padded:  # every chunk needs the key padding mask
            return tuple(_Chunk(c.start, c.stop, c.keys, True) for c in self._chunks)
        return self._chunks

    def _build_chunks(self) -> tuple[_Chunk, ...]:
        if self.empty:
            return ()
        classes = classify(self.queries, self.keys, self.band, self.query_chunk, KEY_TILE, self.grids)
        n_tiles = classes.shape[1]
        out = []
        for i, row in enumerate(classes.tolist()):
            tiles = [t for t, c in enumerate(row) if c != EMPTY]
            if not tiles:
                continue
            masked = self.modified and any(row[t] == PARTIAL for t in tiles)
            keys: slice | Tensor | None
            if len(tiles) == n_tiles:
                keys = None
            elif tiles[-1] - tiles[0] + 1 == len(tiles):
                keys = slice(tiles[0] * KEY_TILE, min((tiles[-1] + 1) * KEY_TILE, self.n_k))
            else:
                keys = torch.cat(
                    [torch.arange(t * KEY_TILE, min((t + 1) * KEY_TILE, self.n_k)) for t in tiles]
                ).to(self.device)
            start = i * self.query_chunk
            out.append(_Chunk(start, min(start + self.query_chunk, self.n_q), keys, masked))
        return tuple(out)

    # ------------------------------------------------------------ kernels

    def uses_flex(self, q: Tensor, args: StepArgs) -> bool:
        """Whether FlexAttention runs this block's forward: asked for (or
        ``auto`` on CUDA below float64), without dropout (FlexAttention has none), with
        heads of at least 16 on a GPU."""
        if args.kernel == "reference" or args.dropout_p > 0:
            return False
        if args.kernel == "auto" and (q.device.type != "cuda" or q.dtype == torch.float64):
            return False
        return not (q.device.type == "cuda" and args.dim < 16)

    @functools.cached_property
    def rectangles(self) -> tuple[Rectangle, ...] | None:
        """The block as rectangles of query rows by key rows that need no
        mask (:func:`rectangles`), or None where some pair of segments does."""
        if self.empty:
            return None
        return rectangles(self.queries, self.keys, self.band if self.modified else None, self.grids)

    def uses_dense(self, q: Tensor, args: StepArgs) -> bool:
        """Whether torch's flash kernels run this block's forward
        (:mod:`patternc.distributed.dense`): under ``auto``, where they run
        its backward (:meth:`dense_backward`)."""
        return args.kernel == "auto" and self.dense_backward(q, args)

    def dense_backward(self, q: Tensor, args: StepArgs) -> bool:
        """Whether torch's flash backward kernel takes this block's gradient:
        a block of :attr:`rectangles`, with no key padding, ALiBi or dropout,
        where the kernels take ``q``, under ``auto`` or ``flex``. The flash
        backward reads only the merged output and log-sum-exp, so it serves
        a forward that ran on FlexAttention as well, and nothing is
        recomputed; ``reference`` keeps the reference's backward."""
        plain = args.kernel != "reference" and not args.padded and args.slopes is None and args.dropout_p == 0
        return plain and self.rectangles is not None and dense.fits(q, args.dim)

    def attend(self, q: Tensor, kv: Tensor, args: StepArgs, merge: LseMerge) -> None:
        """Add this block's softmax over ``q`` against the packed ``kv`` to
        ``merge``: rectangle by rectangle on torch's flash kernels, else
        as one block (:meth:`forward`)."""
        if not self.uses_dense(q, args):
            merge.add(*self.forward(q, kv, args))
            return
        assert self.rectangles is not None  # uses_dense
        dim = args.dim
        every_row = len(self.rectangles) == 1 and self.rectangles[0].covers(self.n_q)
        for r in self.rectangles:
            out, lse = dense.forward(q[:, r.rows], *split_kv(kv[:, r.keys], dim), args.scale, r.causal)
            merge.add(out, lse, None if every_row else r.rows)

    def add_dense_gradients(
        self,
        q: Tensor,
        kv: Tensor,
        grad_out: Tensor,
        out: Tensor,
        lse: Tensor,
        args: StepArgs,
        dq: Tensor,
        dkv: Tensor,
    ) -> None:
        """Add this block's gradients to ``dq`` and ``dkv`` (the packed
        block's), rectangle by rectangle on the flash backward, from the
        merged output ``out``, its gradient ``grad_out`` and the merged
        log-sum-exp ``lse`` (where :meth:`dense_backward`)."""
        assert self.rectangles is not None  # dense_backward
        dim = args.dim
        for r in self.rectangles:
            k, v = split_kv(kv[:, r.keys], dim)
            rows, merged = r.rows, (out[:, r.rows], lse[:, :, r.rows])
            d_q, d_k, d_v = dense.backward(grad_out[:, rows], q[:, rows], k, v, *merged, args.scale, r.causal)
            dq[:, rows] += d_q
            dk, dv = split_kv(dkv[:, r.keys], dim)
            dk += d_k
            dv += d_v

    def forward(self, q: Tensor, kv: Tensor, args: StepArgs) -> tuple[Tensor, Tensor]:
        """Output ``[B, Lq, H, D]`` (block-normalised) and log-sum-exp
        ``[B, H, Lq]`` of ``q`` against the packed ``kv`` ``[B, Lk, H, F]``."""
        if self.uses_dense(q, args):
            merge = LseMerge(q, args.dim)
            self.attend(q, kv, args, merge)
            return merge.result(q.dtype)
        if self.uses_flex(q, args) and (q.device.type == "cuda" or not torch.is_grad_enabled()):
            return self._flex(q, kv, args=args)
        return self._reference_all(q, kv, args)

    def pieces(self, q: Tensor, args: StepArgs) -> list[tuple[int, int, slice | Tensor | None, Attend]]:
        """The backward's recomputation: ``(start, stop, keys, attend)`` per
        piece of the query rows, ``attend(q rows, kv rows keys)`` giving the
        output and log-sum-exp (``keys``: all of the block (None), a slice or
        rows): one piece on FlexAttention (on CUDA), else the reference's chunks."""
        if self.uses_flex(q, args) and q.device.type == "cuda":
            return [(0, self.n_q, None, functools.partial(self._flex, args=args))]
        return [
            (c.start, c.stop, c.keys, functools.partial(self._reference_chunk, c, args=args))
            for c in self.chunks(args.padded)
        ]

    def _reference_all(self, q: Tensor, kv: Tensor, args: StepArgs) -> tuple[Tensor, Tensor]:
        work = torch.promote_types(q.dtype, torch.float32)
        b, _, h, _ = q.shape
        out = q.new_zeros((b, self.n_q, h, args.dim))
        lse = torch.full((b, h, self.n_q), float("-inf"), dtype=work, device=q.device)
        for chunk in self.chunks(args.padded):
            if chunk.keys is None:
                kv_read = kv
            elif isinstance(chunk.keys, slice):
                kv_read = kv[:, chunk.keys]
            else:
                kv_read = kv.index_select(1, chunk.keys)
            o, m = self._reference_chunk(chunk, q[:, chunk.start : chunk.stop], kv_read, args=args)
            out[:, chunk.start : chunk.stop] = o
            lse[:, :, chunk.start : chunk.stop] = m
        return out, lse

    def _reference_chunk(
        self, chunk: _Chunk, qc: Tensor, kv: Tensor, args: StepArgs
    ) -> tuple[Tensor, Tensor]:
        """One chunk against the keys of its tiles (``kv``: those rows); its
        mask (a partial tile) is built here, ``[chunk, keys read]``, and
        dropped with the scores."""
        q_pos, q_grp, k_pos, k_grp = self._tokens
        if isinstance(chunk.keys, slice):
            k_pos, k_grp = k_pos[chunk.keys], k_grp[chunk.keys]
        elif chunk.keys is not None:
            k_pos, k_grp = k_pos.index_select(0, chunk.keys), k_grp.index_select(0, chunk.keys)
        dim = args.dim
        k, v = split_kv(kv, dim)
        qp, qg = q_pos[chunk.start : chunk.stop], q_grp[chunk.start : chunk.stop]
        allowed = None
        if chunk.masked and self.modified:
            allowed = pair_mask(qp, qg, k_pos, k_grp, self._band_tables, self._grid_tables)
        if args.padded:
            real = kv[:, :, 0, 2 * dim] > 0.5
            allowed = real[:, None, :] if allowed is None else allowed[None] & real[:, None, :]
        bias = None
        if args.slopes is not None:
            distance = (qp[:, None] - k_pos[None, :]).abs().to(args.slopes.dtype)
            bias = -args.slopes[:, None, None] * distance
        return partial_attention(qc, k, v, allowed, bias, args.scale, args.dropout_p)

    # -------------------------------------------------------------- flex

    @functools.cached_property
    def _flex_blocks(self) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, int, int]:
        """FlexAttention's block lists (partial, then full), the padded token
        tables and the padded lengths. A key block holding padding after the
        last key is partial: its padded keys get a group no query reads."""
        classes = classify(self.queries, self.keys, self.band, KEY_TILE, KEY_TILE, self.grids)
        if self.n_k % KEY_TILE:
            last = classes[:, -1]
            last[last == FULL] = PARTIAL
        full = classes == FULL
        partial = classes == PARTIAL

        def lists(chosen: Tensor) -> tuple[Tensor, Tensor]:
            counts = chosen.sum(dim=1).to(torch.int32)
            order = torch.argsort((~chosen).to(torch.int8), dim=1, stable=True).to(torch.int32)
            return counts[None, None].to(self.device), order[None, None].to(self.device)

        kv_num, kv_idx = lists(partial)
        full_num, full_idx = lists(full)
        q_len, k_len = classes.shape[0] * KEY_TILE, classes.shape[1] * KEY_TILE
        q_pos, q_grp, k_pos, k_grp = self._tokens
        groups = len(self.band[0]) if self.band else 0
        # int32, as the kernel's indices are: int64 division is emulated on a GPU
        q_pos = F.pad(q_pos, (0, q_len - self.n_q)).int()
        q_grp = F.pad(q_grp, (0, q_len - self.n_q)).int()
        k_pos = F.pad(k_pos, (0, k_len - self.n_k)).int()
        k_grp = F.pad(k_grp, (0, k_len - self.n_k), value=groups).int()
        return kv_num, kv_idx, full_num, full_idx, q_pos, q_grp, k_pos, k_grp, q_len, k_len

    @functools.cached_property
    def _flex_band(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """The band tables with one more key group (padding) that no query reads."""
        low, high, dilation, residue = self._band_tables
        low = F.pad(low.clamp(-INT32_BOUND, INT32_BOUND), (0, 1), value=1)
        high = F.pad(high.clamp(-INT32_BOUND, INT32_BOUND), (0, 1), value=0)
        return low.int(), high.int(), F.pad(dilation, (0, 1), value=1).int(), F.pad(residue, (0, 1)).int()

    @functools.cached_property
    def _one_band(self) -> _OneBand | None:
        """Where every (query group, key group) pair of this block has the same
        band and no neighbourhood, what its ``mask_mod`` reads (see
        :class:`_OneBand`); else None.

        The ``mask_mod`` then reads no group and no ``[groups, groups]``
        table per score (a causal document's own block, a split document's
        halo, a text run's causal part): a query's and a key's position and
        two comparisons, as a hand-written ``kv_idx <= q_idx`` on positions.
        The band is tensors, not Python numbers, so every such block of a
        shape shares one compiled kernel."""
        if self.grids is not None:
            return None
        q_groups = {s.group for s in self.queries}
        k_groups = {s.group for s in self.keys}
        rows = {self.band[q][k] for q in q_groups for k in k_groups}
        if len(rows) != 1:
            return None
        low, high, dilation, residue = rows.pop()
        bound = INT32_BOUND
        values = [max(-bound, min(bound, low)), max(-bound, min(bound, high)), dilation, residue, self.n_k]
        low_t, high_t, dilation_t, residue_t, n_keys = torch.tensor(
            values, dtype=torch.int32, device=self.device
        ).unbind(0)
        return _OneBand(low_t, high_t, dilation_t, residue_t, n_keys, dilation > 1)

    def _block_mask(self, batch: int | None) -> tuple[BlockMask, Tensor | None]:
        """The block mask, built once per kernel (and per batch size with key
        padding), so a compiled FlexAttention sees the same ``mask_mod`` on
        every call: with padding it reads a ``[batch, keys]`` buffer the
        caller fills before each call (a new closure would recompile)."""
        from torch.nn.attention.flex_attention import BlockMask

        stored = self._masks.get(batch)
        if stored is not None:
            return stored
        kv_num, kv_idx, full_num, full_idx, q_pos, q_grp, k_pos, k_grp, q_len, k_len = self._flex_blocks
        low, high, dilation, residue = self._flex_band
        real = None
        if batch is not None:  # padded keys inside a block: every non-empty block is partial
            real = torch.zeros(batch, k_len, dtype=torch.bool, device=self.device)
            kv_num, kv_idx = _merge_lists(kv_num, kv_idx, full_num, full_idx)
            full_num = full_idx = None  # type: ignore[assignment]

        grids = self._grid_tables
        one_band = self._one_band
        if one_band is not None:
            mask_mod = _one_band_mask_mod(one_band, q_pos, k_pos, real)
        else:
            dilated = any(d > 1 for row in self.band for _, _, d, _ in row)

            def mask_mod(b: Tensor, h: Tensor, qi: Tensor, ki: Tensor) -> Tensor:
                qg, kg = q_grp[qi], k_grp[ki]
                d = k_pos[ki] - q_pos[qi]
                ok = (d >= low[qg, kg]) & (d <= high[qg, kg])
                if dilated:
                    ok = ok & ((d - residue[qg, kg]) % dilation[qg, kg] == 0)
                for grid, holds in grids:  # coordinates on the shape, by div/mod of global positions
                    ok = ok & (~holds[qg, kg] | grid.allows(q_pos[qi], k_pos[ki]))
                return ok & real[b, ki] if real is not None else ok

        mask = BlockMask.from_kv_blocks(
            kv_num,
            kv_idx,
            full_num,
            full_idx,
            BLOCK_SIZE=KEY_TILE,
            mask_mod=mask_mod,
            seq_lengths=(q_len, k_len),
        )
        self._masks[batch] = (mask, real)
        return mask, real

    def _score_mod(self, slopes: Tensor) -> Callable[..., Tensor]:
        """ALiBi's ``score_mod``, one per slopes tensor (a model's buffer), kept for the same reason."""
        key = (slopes.data_ptr(), slopes.dtype)
        stored = self._score_mods.get(key)
        if stored is not None and stored[0] is slopes:
            return stored[1]
        q_pos, k_pos = self._flex_blocks[4], self._flex_blocks[6]

        def score_mod(score: Tensor, b: Tensor, h: Tensor, qi: Tensor, ki: Tensor) -> Tensor:
            return score - slopes[h] * (q_pos[qi] - k_pos[ki]).abs().to(score.dtype)

        self._score_mods[key] = (slopes, score_mod)
        return score_mod

    def _flex(self, q: Tensor, kv: Tensor, *, args: StepArgs) -> tuple[Tensor, Tensor]:
        *_, q_len, k_len = self._flex_blocks
        dim = args.dim
        k, v = split_kv(kv, dim)
        mask, real = self._block_mask(q.shape[0] if args.padded else None)
        if real is not None:
            real.copy_(F.pad(kv[:, :, 0, 2 * dim] > 0.5, (0, k_len - self.n_k), value=False))
        score_mod = self._score_mod(args.slopes) if args.slopes is not None else None

        def pad(t: Tensor, n: int) -> Tensor:
            """``[B, L, H, D]`` to the kernel's ``[B, H, n, D]``, contiguous
            in tokens (``k`` and ``v`` are slices of the packed block)."""
            return F.pad(t, (0, 0, 0, 0, 0, n - t.shape[1])).transpose(1, 2)

        # the queries, as many as the rank's tokens, are not copied per block
        # where they need no padding
        q_in = q.transpose(1, 2) if q.shape[1] == q_len and q.is_contiguous() else pad(q, q_len)
        out, lse = _flex_call(q.device.type == "cuda")(
            q_in, pad(k, k_len), pad(v, k_len), mask, score_mod, args.scale, kernel_options(q_in)
        )
        return out.transpose(1, 2)[:, : self.n_q].to(q.dtype), lse[:, :, : self.n_q].to(
            torch.promote_types(q.dtype, torch.float32)
        )


class _OneBand(NamedTuple):
    """What the ``mask_mod`` of a block whose pairs share one band reads
    (:attr:`BlockKernel._one_band`): the band as 0-d int32 tensors and the
    number of real keys."""

    low: Tensor
    high: Tensor
    dilation: Tensor
    residue: Tensor
    n_keys: Tensor
    dilated: bool
    """Whether some key in the band is skipped (the remainder is tested)."""


def _one_band_mask_mod(
    band: _OneBand, q_pos: Tensor, k_pos: Tensor, real: Tensor | None
) -> Callable[..., Tensor]:
    """The ``mask_mod`` of a block whose pairs share one band: ``d = key
    position - query position`` within the band, a real key (and, with key
    padding, one ``real`` marks). The dilation's remainder is tested only
    where some key is skipped."""
    low, high, dilation, residue, n_keys, dilated = band

    def one_band(b: Tensor, h: Tensor, qi: Tensor, ki: Tensor) -> Tensor:
        d = k_pos[ki] - q_pos[qi]
        ok = (d >= low) & (d <= high) & (ki < n_keys)
        if dilated:
            ok = ok & ((d - residue) % dilation == 0)
        return ok & real[b, ki] if real is not None else ok

    return one_band


def _merge_lists(num: Tensor, idx: Tensor, full_num: Tensor, full_idx: Tensor) -> tuple[Tensor, Tensor]:
    """The partial and full block lists as one list of partial blocks."""
    n_kb = idx.shape[-1]
    chosen = torch.zeros((*idx.shape[:-1], n_kb + 1), dtype=torch.bool, device=idx.device)
    columns = torch.arange(n_kb, device=idx.device)
    for count, index in ((num, idx), (full_num, full_idx)):
        valid = columns < count[..., None].long()
        chosen.scatter_(-1, torch.where(valid, index.long(), n_kb), True)
    chosen = chosen[..., :n_kb]
    counts = chosen.sum(-1).to(torch.int32)
    order = torch.argsort((~chosen).to(torch.int8), dim=-1, stable=True).to(torch.int32)
    return counts, order


def _flex_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    block_mask: BlockMask,
    score_mod: Callable[..., Tensor] | None,
    scale: float,
    options: KernelOptions | None = None,
) -> tuple[Tensor, Tensor]:
    """``[B, H, L, D]`` in; the output and the natural log-sum-exp ``[B, H, Lq]``.
    ``options``: the single-device executor's tiles for this dtype, head size
    and GPU (:func:`~patternc.nn.executors.flexkernels.kernel_options`):
    torch's own choice for some block shapes asks a Hopper GPU for more
    shared memory than it has, and the compile fails."""
    from torch.nn.attention.flex_attention import AuxRequest, flex_attention

    out, aux = flex_attention(
        q,
        k,
        v,
        score_mod=score_mod,
        block_mask=block_mask,
        scale=scale,
        return_aux=AuxRequest(lse=True),
        kernel_options=options,  # type: ignore[arg-type]  # torch's TypedDict lacks the fwd_ keys it takes
    )
    assert isinstance(out, Tensor) and aux.lse is not None
    return out, aux.lse


@functools.cache
def _flex_call(compiled: bool) -> Callable[..., tuple[Tensor, Tensor]]:
    """FlexAttention compiled once per process (on CUDA: the fused kernel;
    eager FlexAttention computes every score), or eager (the CPU forward).

    It is compiled for each block shape (``dynamic=False``): the blocks of a
    placement come in a few shapes per call, but a layout with many split
    documents has more than torch's default recompile limit (8), past which
    a ``fullgraph`` function raises. The limit is raised to
    :data:`BLOCK_SHAPES` (never lowered) when the compiled form is first asked for."""
    if compiled:
        import torch._dynamo.config as dynamo

        dynamo.recompile_limit = max(dynamo.recompile_limit, BLOCK_SHAPES)
        return torch.compile(_flex_attention, dynamic=False, fullgraph=True)
    return _flex_attention
