"""FlexAttention's block classes (empty, partial, full) from a layout's
allowed rectangles, split between the host and the device.

The rule is :class:`~patternc.lower.blocks.AllowedRects`'s: a block is
non-empty where some rectangle allows a pair in it, full where the areas of
the rectangles full on it add up to the block's. The work sized by the
rectangles (their corners in a difference array, their blocks where there
are up to :data:`HOST_INCIDENCES`) is done on the host and travels in the
table builder's one upload; the device runs the work sized by the block
grid: one scatter, two prefix sums and the comparisons (or a sort, for
sparse grids), and cuts the rectangles itself where they touch more blocks
than that, or where ``torch.compile`` traces the build. On a GPU each
tensor operation costs host time to launch whatever its size, so the count
of device operations, not their work, is what a block mask of a new layout
costs.

Each block's tally is one int64: the area the rectangles cover where they
allow every pair, times ``2 ** AREA_SHIFT``, plus how many rectangles allow
some pair there. One scatter then sums both.
"""

from __future__ import annotations

import array
import itertools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from patternc.lower.blocks import AllowedRects
from patternc.lower.blocks import incidences as python_incidences
from patternc.modifiers import UNBOUNDED

__all__ = ["BlockWork", "block_work", "dense_cells", "host_columns", "host_int64"]

DENSE_CELLS_PER_BLOCK = 16
"""Block classes are reduced into a dense ``[rows, cols]`` grid (no sort,
no host sync) when it has at most this many cells per (rectangle, block)
incidence, else by sorting the incidences; the tables then hold the
non-empty blocks only. Either way they stay linear in the non-empty blocks."""

PYTHON_INCIDENCES = 64
"""Up to this many (rectangle, block) incidences of banded rectangles (a
causal prompt, a few windows), the host cuts them one at a time in Python
(:func:`patternc.lower.blocks.incidences`): fewer microseconds than the
tensor operations' fixed cost."""

HOST_INCIDENCES = 4096
"""Banded rectangles (or, for a sparse grid, all of them) are cut into
their blocks on the host up to this many (rectangle, block) incidences:
about eighty small tensor operations there, where on a GPU each would be a
launch. Past it the device cuts them (the work is then in the data)."""

AREA_SHIFT = 32
"""A block's covered area sits above this bit of its tally, the count of
rectangles that allow a pair in it below (both far from overflowing: the
area is at most a block's, the count at most the rectangles')."""

_AREA_UNIT = 1 << AREA_SHIFT
_COUNT_BITS = _AREA_UNIT - 1


def dense_cells(cells: Tensor, shape: tuple[int, int]) -> Tensor:
    """``[rows, cols]`` bool from the flat indices of the true cells (or the grid as it is)."""
    if cells.dim() == 2:
        return cells
    out = torch.zeros(shape[0] * shape[1], dtype=torch.bool, device=cells.device)
    return out.index_fill_(0, cells, True).view(shape)


def rect_tallies(rects: Tensor, count: int, block: int, n_cols: int) -> tuple[Tensor, Tensor]:
    """Each (rectangle, block) of ``[8, P]`` banded rectangles (``q_start,
    q_stop, k_start, k_stop, low, high, dilation, residue``; ``count`` of
    them): its flat block index (``row * n_cols + col``) and its tally
    (see the module's docstring), by interval arithmetic on positions
    within the rectangle: a block's differences ``j - i`` are the integers
    of ``[klo - qhi, khi - qlo]`` (see :meth:`patternc.modifiers.Band.cell_class`)."""
    device = rects.device
    q_start, q_stop, k_start, k_stop, low, high, dilation, residue = rects
    r0, c0 = q_start // block, k_start // block
    cols_of = (k_stop - 1) // block - c0 + 1
    per_rect = ((q_stop - 1) // block - r0 + 1) * cols_of
    owner = torch.repeat_interleave(torch.arange(rects.shape[1], device=device), per_rect, output_size=count)
    local = torch.arange(count, device=device) - (torch.cumsum(per_rect, 0) - per_rect)[owner]
    width = cols_of[owner]
    row = r0[owner] + local // width
    col = c0[owner] + local % width
    qs, ks = q_start[owner], k_start[owner]
    qlo = torch.maximum(row * block, qs) - qs
    qhi = torch.minimum(row * block + block, q_stop[owner]) - 1 - qs
    klo = torch.maximum(col * block, ks) - ks
    khi = torch.minimum(col * block + block, k_stop[owner]) - 1 - ks
    low, high, dilation, residue = low[owner], high[owner], dilation[owner], residue[owner]
    lo, hi = klo - qhi, khi - qlo  # the differences j - i the block holds
    a, b = torch.maximum(lo, low), torch.minimum(hi, high)
    # a multiple of the dilation (shifted by the residue) within [a, b]
    nonempty = (a <= b) & ((b - residue) // dilation > (a - 1 - residue) // dilation)
    one_diagonal = (lo == hi) & ((lo - residue) % dilation == 0)
    full = (lo >= low) & (hi <= high) & ((dilation == 1) | one_diagonal)
    area = torch.where(full, (qhi - qlo + 1) * (khi - klo + 1), 0)
    return row * n_cols + col, area * _AREA_UNIT + nonempty.to(torch.int64)


def _point_corners(flat: Tensor, tally: Tensor, width: int) -> tuple[Tensor, Tensor]:
    """A tally at one cell of a grid ``width`` wide, as the four corners of
    its 2-D difference array."""
    corners = torch.stack([flat, flat + 1, flat + width, flat + width + 1])
    return corners.flatten(), torch.stack([tally, -tally, -tally, tally]).flatten()


def _plain_corners(plain: Tensor, block: int, width: int) -> tuple[Tensor, Tensor]:
    """The plain rectangles' (``[4, P]``: ``q_start, q_stop, k_start,
    k_stop``; every pair inside allowed) tallies as corners of a 2-D
    difference array ``width`` wide: ten weighted block rectangles of four
    corners each, whatever the number of blocks a rectangle covers. A
    rectangle's overlap with block row ``r`` is ``block`` on its rows, less
    what its first and last rows miss: three weighted intervals of rows,
    times three of columns, are nine areas; the tenth counts one on every
    block it touches."""
    q_start, q_stop, k_start, k_stop = plain

    def terms(start: Tensor, stop: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        first, last = start // block, (stop - 1) // block
        weight = torch.stack(
            [torch.full_like(start, block), first * block - start, stop - (last + 1) * block]
        )
        return weight, torch.stack([first, first, last]), torch.stack([last + 1, first + 1, last + 1])

    (row_weight, top, bottom), (col_weight, left, right) = terms(q_start, q_stop), terms(k_start, k_stop)
    weight = row_weight[:, None] * col_weight[None, :] * _AREA_UNIT  # [3, 3, P]
    top, bottom, left, right = top[:, None] * width, bottom[:, None] * width, left[None, :], right[None, :]
    corners = torch.stack([top + left, top + right, bottom + left, bottom + right]).flatten()
    values = torch.stack([weight, -weight, -weight, weight]).flatten()
    # the count: one on each block of [first row, last row] x [first column, last column]
    top, bottom = top[0, 0], bottom[2, 0]
    left, right = left[0, 0], right[0, 2]
    ones = torch.ones_like(q_start)
    count_corners = torch.stack([top + left, top + right, bottom + left, bottom + right]).flatten()
    return torch.cat([corners, count_corners]), torch.cat(
        [values, torch.stack([ones, -ones, -ones, ones]).flatten()]
    )


def _open_bands(plain: Tensor) -> Tensor:
    """Plain rectangles as banded ones whose band allows every pair."""
    band = torch.tensor([-UNBOUNDED, UNBOUNDED, 1, 0], dtype=torch.int64)
    return torch.cat([plain, band[:, None].expand(4, plain.shape[1])])


@dataclass(frozen=True)
class BlockWork:
    """What the host prepared for classifying one layout's blocks: CPU
    tensors to upload with the other tables (:attr:`pieces`), and how the
    device finishes (:meth:`classify`)."""

    shape: tuple[int, int]
    """``(query blocks, key blocks)``."""
    block: int
    dense: bool
    """Classify into a dense grid (else list the non-empty blocks by sorting)."""
    pieces: tuple[Tensor, ...]
    """1-D int64 CPU tensors: the tallies the host computed (dense: the
    difference array's corner indices and values; sorted: flat block indices
    and tallies), then the columns of the rectangles the device cuts: the
    four of the plain ones where :attr:`device_plain`, then the eight of
    banded ones where :attr:`device_count`."""
    device_plain: bool
    """The device computes the plain rectangles' corners (inside ``torch.compile``)."""
    device_count: int
    """The (rectangle, block) incidences of banded rectangles the device cuts (0: none)."""

    def classify(self, uploaded: tuple[Tensor, ...]) -> tuple[Tensor, Tensor]:
        """``(partial, full)`` from :attr:`pieces` on the device: dense
        ``[rows, cols]`` bool, else the ascending flat indices
        (``row * cols + col``) of the partial and of the full blocks."""
        n_rows, n_cols = self.shape
        indices, values = [uploaded[0]], [uploaded[1]]
        columns = uploaded[2:]
        width = n_cols + 1 if self.dense else n_cols
        if self.device_plain:
            index, value = _plain_corners(torch.stack(columns[:4]), self.block, width)
            indices.append(index)
            values.append(value)
            columns = columns[4:]
        if self.device_count:
            flat, tally = rect_tallies(torch.stack(columns), self.device_count, self.block, width)
            if self.dense:
                flat, tally = _point_corners(flat, tally, width)
            indices.append(flat)
            values.append(tally)
        index = torch.cat(indices) if len(indices) > 1 else indices[0]
        value = torch.cat(values) if len(values) > 1 else values[0]
        whole = self.block * self.block
        if self.dense:
            # one more row and column: the difference array's
            diff = torch.zeros((n_rows + 1) * width, dtype=torch.int64, device=index.device)
            grid = diff.scatter_add_(0, index, value).view(n_rows + 1, width).cumsum(1)
            if grid.is_cuda:
                # the outer-dim scan as an inner-dim one between transposes: a GPU
                # scan along the outer dim runs one thread per column (several times slower)
                grid = grid.t().contiguous().cumsum(1).t()
            else:
                grid = grid.cumsum(0)
            tally = grid[:n_rows, :n_cols].contiguous()
            is_full = (tally >> AREA_SHIFT) == whole
            return ((tally & _COUNT_BITS) > 0) & ~is_full, is_full
        cells, inverse = torch.unique(index, sorted=True, return_inverse=True)
        tally = torch.zeros(cells.shape[0], dtype=torch.int64, device=index.device)
        tally = tally.scatter_add_(0, inverse, value)
        is_full = (tally >> AREA_SHIFT) == whole
        return cells[((tally & _COUNT_BITS) > 0) & ~is_full], cells[is_full]


def _banded_on_host(rects: AllowedRects, count: int, block: int, n_cols: int) -> tuple[Tensor, Tensor]:
    """:func:`rect_tallies` of the banded rectangles on the host: in Python
    up to :data:`PYTHON_INCIDENCES`, else as CPU tensor operations."""
    if count > PYTHON_INCIDENCES:
        return rect_tallies(host_columns(rects.banded), count, block, n_cols)
    flat: list[int] = []
    tally: list[int] = []
    for at, some, area in python_incidences((), rects.banded, block, n_cols):
        flat.append(at)
        tally.append(area * _AREA_UNIT + some)
    flat_t, tally_t = host_columns((flat, tally))
    return flat_t, tally_t


def host_int64(values: Iterable[int], traced: bool = False) -> Tensor:
    """Host ints as a 1-D int64 CPU tensor: through ``array`` (several times
    faster than ``torch.tensor`` on long lists), or ``torch.tensor`` where
    ``torch.compile`` traces (``traced``: Dynamo cannot trace ``array``)."""
    if traced:
        return torch.tensor(list(values), dtype=torch.int64)
    packed = array.array("q", values)
    return torch.frombuffer(packed, dtype=torch.int64) if packed else torch.zeros(0, dtype=torch.int64)


def host_columns(columns: Sequence[Sequence[int]], traced: bool = False) -> Tensor:
    """Equal-length host lists as one ``[len(columns), n]`` int64 CPU tensor
    (see :func:`host_int64`)."""
    n = len(columns[0]) if columns else 0
    return host_int64(itertools.chain.from_iterable(columns), traced).view(len(columns), n)


def block_work(rects: AllowedRects, block: int, shape: tuple[int, int], traced: bool = False) -> BlockWork:
    """The host's half of classifying the blocks of ``rects`` (see
    :class:`BlockWork`), into a dense grid where it has at most
    :data:`DENSE_CELLS_PER_BLOCK` cells per (rectangle, block) incidence or
    inside ``torch.compile`` (no shape may depend on data there), else by
    sorting the incidences.

    Args:
        rects: the layout's allowed rectangles, cut by ``block``.
        block: the block size (tokens a side).
        shape: ``(query blocks, key blocks)``.
        traced: the tables are built inside ``torch.compile``: the rectangles
            go up as they are and every tensor operation is the device's (CPU
            work in the graph would be code generated for the CPU).
    """
    plain_count, banded_count = rects.block_counts(block)
    empty = torch.zeros(0, dtype=torch.int64)
    plain = host_columns(rects.plain, traced)
    if traced:
        return BlockWork(
            shape,
            block,
            True,
            (empty, empty, *plain, *host_columns(rects.banded, traced)),
            True,
            banded_count,
        )
    dense = shape[0] * shape[1] <= DENSE_CELLS_PER_BLOCK * max(plain_count + banded_count, 1)
    if dense:
        width = shape[1] + 1
        index, values = _plain_corners(plain, block, width)
        if banded_count > HOST_INCIDENCES:
            return BlockWork(
                shape, block, dense, (index, values, *host_columns(rects.banded)), False, banded_count
            )
        if banded_count:
            flat, tally = _point_corners(*_banded_on_host(rects, banded_count, block, width), width)
            index, values = torch.cat([index, flat]), torch.cat([values, tally])
        return BlockWork(shape, block, dense, (index, values), False, 0)
    everything = torch.cat([_open_bands(plain), host_columns(rects.banded)], dim=1)
    count = plain_count + banded_count
    if count > HOST_INCIDENCES:
        return BlockWork(shape, block, dense, (empty, empty, *everything), False, count)
    return BlockWork(shape, block, dense, rect_tallies(everything, count, block, shape[1]), False, 0)
