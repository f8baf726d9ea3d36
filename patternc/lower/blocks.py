"""Block classes of a plan's attention mask, in plain Python (no torch).

The tokens are cut into blocks of ``block`` queries by ``block`` keys, and
each block is *empty* (no pair allowed: skipped), *full* (every pair
allowed: no mask needed) or *partial*. This module holds the one rule both
classifiers follow: :func:`allowed_rects` describes the allowed token pairs
as disjoint rectangles, and :func:`classify` reads the blocks off them.
:func:`block_classes` (what ``patternc compile --mask`` draws) runs the rule
here; :mod:`patternc.nn.flexmask` runs the same rule as tensor operations on
the device, from the same rectangles. :func:`pair_runs` describes the
allowed group pairs as runs of key groups, what the device tables the
``mask_mod`` reads are filled from.

Both records are built from the layout's calls, whose key segments already
merge adjacent groups of equal modifiers: a block-causal family of ``M``
members (``frame* -> frame*[upto]``) is ``M`` rectangles and ``M`` runs, not
its ``M(M+1)/2`` group pairs. Only pairs whose modifiers count positions
within each group (``[causal]``, windows) are one rectangle per group pair.
"""

from __future__ import annotations

import bisect
import itertools
import math
import operator
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass

from patternc.lower.layout import Layout
from patternc.modifiers import UNBOUNDED, Band, Modifiers, Neighbourhood, pair_band

__all__ = [
    "BLOCK_SIZE",
    "EMPTY",
    "FULL",
    "PARTIAL",
    "AllowedRects",
    "BandTest",
    "BlockClasses",
    "PairRuns",
    "allowed_rects",
    "block_classes",
    "classify",
    "group_segments",
    "pair_runs",
]

EMPTY, PARTIAL, FULL = 0, 1, 2

BLOCK_SIZE = 128
"""FlexAttention's sparse block size (queries and keys): the default grain of
block classes, and of the blocks ``flex`` computes."""

BandTest = tuple[int | None, int | None, int, bool, Neighbourhood | None]
"""``(low, high, dilation, across, grid)`` of a modifier list
(:meth:`Modifiers.band <patternc.modifiers.Modifiers.band>`, whether
positions count in the input, and its neighbourhood on a shaped group):
what a ``mask_mod`` tests on the pairs that share it."""

_NOT_FULL = (-UNBOUNDED, UNBOUNDED, 2, 0)
"""A band that allows a pair in every block part of two or more pairs and
is full on none: the band row of a block part a neighbourhood leaves
partial (:func:`_neighbourhood_cells`)."""

SegmentList = list[tuple[int, int, int]]
"""``(group index, start, stop)`` token segments."""


def group_segments(
    layout: Layout, cache_lengths: Mapping[str, int], compact: bool = False
) -> tuple[SegmentList, SegmentList]:
    """``(group, start, stop)`` of the query tokens (the input) and of the key
    tokens (the input, then each cached group), skipping empty groups.
    ``compact``: the input's keys are those of the layout's key space, at
    their places there (K/V given for the key space only).

    Raises:
        KeyError: a cached group missing from ``cache_lengths``.
    """
    queries = []
    start = 0
    for gid, size in zip(layout.group_ids, layout.input_sizes):
        if size:
            queries.append((gid, start, start + size))
        start += size
    if compact:
        space = layout.key_space
        keys = [
            (gid, space.position(a), space.position(a) + b - a) for gid, a, b in queries if space.holds(a, b)
        ]
        start = space.size
    else:
        keys = list(queries)
    for name in layout.cached_groups:
        length = cache_lengths[name]
        if length:
            keys.append((layout.all_groups.index(name), start, start + length))
        start += length
    return queries, keys


def _band_row(band: Band) -> tuple[int, int, int, int]:
    """A band as four integers (an open side :data:`~patternc.modifiers.UNBOUNDED` away)."""
    return (
        -UNBOUNDED if band.low is None else band.low,
        UNBOUNDED if band.high is None else band.high,
        band.dilation,
        band.residue,
    )


@dataclass(frozen=True)
class AllowedRects:
    """The allowed (query token, key token) pairs of a layout as rectangles
    that do not overlap (a query group is in one call, a key group once in
    its keys), in the coordinates FlexAttention indexes: queries are input
    tokens, keys the input's (or the key space's) tokens, then each cached
    group's. Each column is one list (what a device table is filled from).

    The block rule: a block is *non-empty* when some rectangle allows a pair
    in it, and *full* when the rectangles that allow every pair of their
    part of it cover it whole (their areas add up to the block's)."""

    plain: tuple[list[int], list[int], list[int], list[int]]
    """``q_start, q_stop, k_start, k_stop``: every pair inside is allowed."""
    banded: tuple[list[int], list[int], list[int], list[int], list[int], list[int], list[int], list[int]]
    """``q_start, q_stop, k_start, k_stop, low, high, dilation, residue``:
    one (query group, key group) pair whose pairs are those of its
    :class:`~patternc.modifiers.Band` (positions within the groups; an
    open side :data:`~patternc.modifiers.UNBOUNDED` away)."""

    @property
    def count(self) -> int:
        return len(self.plain[0]) + len(self.banded[0])

    def block_counts(self, block: int) -> tuple[int, int]:
        """How many (rectangle, block) incidences the plain and the banded
        rectangles have: the work of :func:`classify`."""
        return _incidences(self.plain, block), _incidences(self.banded, block)


def _incidences(columns: tuple[list[int], ...], block: int) -> int:
    total = 0
    for q_start, q_stop, k_start, k_stop in zip(*columns[:4]):
        total += ((q_stop - 1) // block - q_start // block + 1) * (
            (k_stop - 1) // block - k_start // block + 1
        )
    return total


def _cached_places(
    layout: Layout, cache_lengths: Mapping[str, int], compact: bool
) -> dict[str, tuple[int, int]]:
    """Where each cached group's keys sit: after the input's keys, in group order."""
    places = {}
    start = layout.key_space.size if compact else layout.n_tokens
    for name in layout.cached_groups:
        length = cache_lengths.get(name, 0)
        places[name] = (start, start + length)
        start += length
    return places


def allowed_rects(
    layout: Layout,
    cache_lengths: Mapping[str, int] | None = None,
    compact: bool = False,
    block: int | None = None,
) -> AllowedRects:
    """The layout's :class:`AllowedRects`. ``cache_lengths``: each cached
    group's length (a group missing from it has none: it is left out);
    ``compact``: keys index the key space (see :func:`group_segments`).
    One rectangle per (query segment, key segment) of each call without
    modifiers, one per (query group, key group) pair with them, except that
    a pair under a neighbourhood (``image[kernel 7]``) is cut at the blocks
    of ``block`` tokens (default :data:`BLOCK_SIZE`: classify with the same
    size) and each part classified here (:func:`_neighbourhood_cells`)."""
    cached_at = _cached_places(layout, cache_lengths or {}, compact)
    space = layout.key_space
    slots = {s.name: s for s in layout.slots}
    # input groups with tokens, in input order: (offset, size)
    inputs = [(s.offset, s.size) for s in layout.slots if s.size]
    offsets = [offset for offset, _ in inputs]
    plain: tuple[list[int], list[int], list[int], list[int]] = ([], [], [], [])
    q_start, q_stop, k_start, k_stop = plain
    banded: tuple[list[int], ...] = ([], [], [], [], [], [], [], [])
    if block is None:
        block = BLOCK_SIZE
    bands: dict[
        int, tuple[int, int, int, int]
    ] = {}  # id(modifiers) -> band row, where offsets do not move it

    for call in layout.calls:
        if not call.n_queries:
            continue
        for segment in call.keys:
            if segment.cached is not None:
                first, stop = cached_at[segment.cached]
                if stop == first:
                    continue
                groups = [(0, first, stop)]
            else:
                first = space.position(segment.start) if compact else segment.start
                stop = first + segment.stop - segment.start
                groups = None
            mods = segment.modifiers
            if not mods:
                for query in call.queries:
                    q_start.append(query.start)
                    q_stop.append(query.stop)
                    k_start.append(first)
                    k_stop.append(stop)
                continue
            if groups is None:  # the groups of the segment, each at its place among the keys
                groups = []
                at = bisect.bisect_left(offsets, segment.start)
                while at < len(inputs) and inputs[at][0] < segment.stop:
                    offset, size = inputs[at]
                    place = first + offset - segment.start
                    groups.append((offset, place, place + size))
                    at += 1
            for q in call.query_tokens:
                q_slot = slots[q]
                if not q_slot.size:
                    continue
                span = (q_slot.offset, q_slot.offset + q_slot.size)
                for k_offset, k_first, k_last in groups:
                    if mods.grid is not None:
                        _neighbourhood_cells(mods.grid, (*span, k_first, k_last), block, plain, banded)
                        continue
                    row = bands.get(id(mods))
                    if row is None:
                        row = _band_row(pair_band(mods, k_offset - q_slot.offset))
                        if not mods.across:
                            bands[id(mods)] = row
                    for column, value in zip(banded, (*span, k_first, k_last, *row)):
                        column.append(value)
    return AllowedRects(plain, banded)  # type: ignore[arg-type]


def _neighbourhood_cells(
    grid: Neighbourhood,
    rect: tuple[int, int, int, int],
    block: int,
    plain: tuple[list[int], ...],
    banded: tuple[list[int], ...],
) -> None:
    """A (query group, key group) pair under ``grid`` at ``rect`` (``q_start,
    q_stop, k_start, k_stop``), cut at the blocks: each part the grid fills
    becomes a plain rectangle, each it leaves partial a banded one whose
    band (:data:`_NOT_FULL`) makes it non-empty and not full; parts it
    leaves empty are dropped (:meth:`Neighbourhood.cell_class
    <patternc.modifiers.Neighbourhood.cell_class>`, sound both ways)."""
    q_start, q_stop, k_start, k_stop = rect
    for row in range(q_start // block, (q_stop - 1) // block + 1):
        qlo, qhi = _overlap(q_start, q_stop, row, block)
        # only the key blocks between the lowest and highest key the row may read
        lowest, highest = grid.reach(qlo, qhi)
        first = (k_start + lowest) // block
        last = (k_start + min(highest, k_stop - k_start - 1)) // block
        for col in range(first, last + 1):
            klo, khi = _overlap(k_start, k_stop, col, block)
            some, whole = grid.cell_class(qlo, qhi, klo, khi)
            if not some:
                continue
            cell = (q_start + qlo, q_start + qhi + 1, k_start + klo, k_start + khi + 1)
            if whole:
                for column, value in zip(plain, cell):
                    column.append(value)
            else:
                for column, value in zip(banded, (*cell, *_NOT_FULL)):
                    column.append(value)


def _overlap(start: int, stop: int, index: int, block: int) -> tuple[int, int]:
    """Positions ``[lo, hi]`` (from ``start``) of ``[start, stop)`` inside block ``index``."""
    return max(index * block, start) - start, min(index * block + block, stop) - 1 - start


def incidences(
    plain: Sequence[Sequence[int]], banded: Sequence[Sequence[int]], block: int, n_cols: int
) -> Iterator[tuple[int, bool, int]]:
    """Each (rectangle, block) of the rectangles' columns (``plain`` and
    ``banded`` as in :class:`AllowedRects`), one at a time: the block
    (``row * n_cols + col``), whether the rectangle allows a pair in it,
    and the area it covers there where it allows every pair (else 0)."""
    rows = [(*r, None) for r in zip(*plain)] + [(*r[:4], Band(*r[4:])) for r in zip(*banded)]
    for q_start, q_stop, k_start, k_stop, band in rows:
        for row in range(q_start // block, (q_stop - 1) // block + 1):
            qlo, qhi = _overlap(q_start, q_stop, row, block)
            for col in range(k_start // block, (k_stop - 1) // block + 1):
                klo, khi = _overlap(k_start, k_stop, col, block)
                some, whole = (True, True) if band is None else band.cell_class(qlo, qhi, klo, khi)
                yield row * n_cols + col, some, (qhi - qlo + 1) * (khi - klo + 1) if whole else 0


def classify(rects: AllowedRects, block: int, n_cols: int) -> dict[int, bool]:
    """The block rule of :class:`AllowedRects`, one block at a time: every
    non-empty block (``row * n_cols + col``) and whether it is full."""
    full_area: dict[int, int] = {}
    nonempty: set[int] = set()
    for at, some, area in incidences(rects.plain, rects.banded, block, n_cols):
        if some:
            nonempty.add(at)
        if area:
            full_area[at] = full_area.get(at, 0) + area
    return {at: full_area.get(at, 0) == block * block for at in sorted(nonempty)}


@dataclass(frozen=True)
class PairRuns:
    """The allowed (query group, key group) pairs as runs: query group
    ``query[r]`` reads the key groups ``[key_start[r], key_stop[r])``
    (indices into ``all_groups``) under one band. Runs of one query group
    follow each other, by key group. A run may hold groups with no tokens
    (those between the groups of a merged key segment): they pair no
    tokens. Linear in the groups and the runs, never in group pairs."""

    query: list[int]
    key_start: list[int]
    key_stop: list[int]
    low: list[int]
    high: list[int]
    dilation: list[int]
    residue: list[int]
    """The band of each run (:func:`~patternc.modifiers.pair_band`; an open
    side :data:`~patternc.modifiers.UNBOUNDED` away)."""
    test: list[int]
    """Index into ``tests`` of each run's modifier list, -1: none."""
    tests: tuple[BandTest, ...]
    """The layout's distinct modifier lists (of runs with modifiers), in the order first met."""

    @property
    def count(self) -> int:
        return len(self.query)

    def same_group(self, layout: Layout) -> bool:
        """Whether every query group with tokens reads itself alone, without modifiers."""
        if any(t >= 0 for t in self.test):
            return False
        runs = zip(self.query, self.key_start, self.key_stop)
        if any(stop - start != 1 or start != q for q, start, stop in runs):
            return False
        reading = set(self.query)
        return all(g in reading for g, size in zip(layout.group_ids, layout.input_sizes) if size)


def pair_runs(layout: Layout) -> PairRuns:
    """The layout's :class:`PairRuns`, from its calls: each key segment is a
    run of the groups between its first and last group (modifiers that
    count positions in the input, ``across``, are one run per group: their
    band moves with the groups' offsets)."""
    index = {g: i for i, g in enumerate(layout.all_groups)}
    first_at: dict[int, int] = {}
    last_at: dict[int, int] = {}
    for slot in layout.slots:
        if slot.size:
            first_at.setdefault(slot.offset, index[slot.name])
            last_at[slot.offset + slot.size] = index[slot.name]
    offsets = {index[s.name]: s.offset for s in layout.slots}
    tests: list[BandTest] = []
    test_of: dict[int, int] = {}  # id(modifiers) -> index into tests
    by_test: dict[BandTest, int] = {}
    rows: list[tuple[int, ...]] = []  # query, key start, key stop, band (4), test

    def test_index(mods: Modifiers) -> int:
        at = test_of.get(id(mods))
        if at is None:
            test = (*mods.band(), mods.across, mods.grid)
            at = test_of[id(mods)] = by_test.setdefault(test, len(by_test))
            if at == len(tests):
                tests.append(test)
        return at

    described: dict[int, tuple[int, int, int, int, int]] = {}  # id(modifiers) -> band row, test

    def describe(mods: Modifiers, shift: int = 0) -> tuple[int, int, int, int, int]:
        """Band row and test index of a modifier list (``shift``: under ``across``)."""
        if mods.across:
            return (*_band_row(pair_band(mods, shift)), test_index(mods))
        found = described.get(id(mods))
        if found is None:
            found = described[id(mods)] = (*_band_row(pair_band(mods)), test_index(mods) if mods else -1)
        return found

    for call in layout.calls:
        runs: list[tuple[int, int, Modifiers]] = []
        for segment in call.keys:
            if segment.cached is not None:
                g = index[segment.cached]
                runs.append((g, g + 1, segment.modifiers))
            elif segment.length:
                runs.append((first_at[segment.start], last_at[segment.stop] + 1, segment.modifiers))
        if len(runs) > 1:
            runs.sort(key=lambda run: run[0])
        across = any(mods.across for _, _, mods in runs)
        for q in call.query_tokens:
            gq = index[q]
            if across:  # one run per key group under `across`: offsets shift each band
                mine: list[tuple[int, int, tuple[int, int, int, int, int]]] = []
                for start, stop, mods in runs:
                    if mods.across:
                        mine.extend(
                            (k, k + 1, describe(mods, offsets[k] - offsets[gq])) for k in range(start, stop)
                        )
                    else:
                        mine.append((start, stop, describe(mods)))
            else:
                mine = [(start, stop, describe(mods)) for start, stop, mods in runs]
            rows.extend((gq, start, stop, *described_run) for start, stop, described_run in mine)
    # runs of one query group together (a group is the query of one call)
    if any(a[0] > b[0] for a, b in itertools.pairwise(rows)):
        rows.sort(key=operator.itemgetter(0))
    columns = [list(column) for column in zip(*rows)] if rows else [[] for _ in range(8)]
    query, key_start, key_stop, low, high, dilation, residue, test = columns
    return PairRuns(query, key_start, key_stop, low, high, dilation, residue, test, tuple(tests))


_LETTERS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"


@dataclass(frozen=True)
class BlockClasses:
    """``classes[i][j]`` for query block ``i`` and key block ``j``."""

    classes: tuple[tuple[int, ...], ...]
    block: int
    row_groups: tuple[tuple[str, int], ...]
    """``(group, first block)`` of each input group, for labels (keys are the same tokens)."""
    cached_keys: tuple[tuple[str, tuple[int, ...]], ...] = ()
    """``(group, class per query block)`` of each group read as keys from a KV
    cache: its length is known at run time only, so it is one column, *full*
    where the queries read all of it, *partial* where a modifier limits them."""

    @property
    def counts(self) -> tuple[int, int, int]:
        flat = [c for row in self.classes for c in row]
        return flat.count(EMPTY), flat.count(PARTIAL), flat.count(FULL)

    @property
    def sparsity(self) -> float:
        """Fraction of blocks skipped entirely."""
        empty, partial, full = self.counts
        total = empty + partial + full
        return empty / total if total else 0.0

    def text(self, max_width: int = 64) -> str:
        """Text picture: ``#`` full, ``+`` partial, ``.`` empty; blocks are
        merged into cells (the densest class wins) to fit ``max_width``.

        Each group has a letter: rows are labelled with the group's name and
        letter, columns (the same tokens, as keys) with the letter above the
        group's first cell; groups read from a KV cache follow a ``|``, one
        column each."""
        rows, cols = len(self.classes), len(self.classes[0]) if self.classes else 0
        step = max(1, math.ceil(cols / max_width))
        chars = {EMPTY: ".", PARTIAL: "+", FULL: "#"}
        names = [name for name, _ in self.row_groups] + [name for name, _ in self.cached_keys]
        letter = {name: _LETTERS[i] if i < len(_LETTERS) else "?" for i, name in enumerate(names)}
        starting: dict[int, list[str]] = {}
        for name, first in self.row_groups:
            starting.setdefault(first // step, []).append(name)
        labels = {cell: ", ".join(f"{g} {letter[g]}" for g in group) for cell, group in starting.items()}
        width = max((len(label) for label in labels.values()), default=0)
        n_cells = math.ceil(cols / step)
        header = "".join(letter[starting[c][0]] if c in starting else " " for c in range(n_cells))
        cached_header = " ".join(letter[name] for name, _ in self.cached_keys)
        lines = [(f"{'':>{width}} {header}" + (f" | {cached_header}" if self.cached_keys else "")).rstrip()]
        for r in range(0, rows, step):
            band = self.classes[r : r + step]
            cells = [_merge(x for row in band for x in row[c : c + step]) for c in range(0, cols, step)]
            line = f"{labels.get(r // step, ''):>{width}} {''.join(chars[x] for x in cells)}"
            if self.cached_keys:
                cached = [_merge(per_row[r : r + step]) for _, per_row in self.cached_keys]
                line += " | " + " ".join(chars[x] for x in cached)
            lines.append(line)
        empty, partial, full = self.counts
        scale = f"{self.block * step} x {self.block * step} tokens per cell"
        lines.append(
            f"{'':>{width}} # full {full}, + partial {partial}, . empty {empty} blocks "
            f"(sparsity {self.sparsity:.3f}; {scale})"
        )
        if self.cached_keys:
            listed = ", ".join(f"{letter[name]} {name}" for name, _ in self.cached_keys)
            lines.append(f"{'':>{width}} after |: keys read from the KV cache ({listed}), one column each")
        return "\n".join(lines) + "\n"


def _merge(classes: Iterable[int]) -> int:
    """The class of a cell of several blocks: full or empty if every block is, else partial."""
    seen = set(classes)
    if seen <= {FULL}:
        return FULL if seen else EMPTY
    return EMPTY if seen == {EMPTY} else PARTIAL


def _block_groups(layout: Layout, n_blocks: int, block: int) -> list[list[str | None]]:
    """For each block, the input groups in it (None for padding)."""
    segments = [(s.name, s.offset, s.offset + s.size) for s in layout.slots if s.size]
    out: list[list[str | None]] = []
    index = 0
    total = layout.n_tokens
    for b in range(n_blocks):
        lo, hi = b * block, (b + 1) * block - 1
        while index < len(segments) and segments[index][2] <= lo:
            index += 1
        parts: list[str | None] = []
        i = index
        while i < len(segments) and segments[i][1] <= hi:
            parts.append(segments[i][0])
            i += 1
        if hi >= total:
            parts.append(None)
        out.append(parts)
    return out


def block_classes(layout: Layout, block: int = BLOCK_SIZE) -> BlockClasses:
    """Classify every block of a layout (the rule of :class:`AllowedRects`);
    lengths are padded to whole blocks. A group read from a KV cache (its
    length known at run time only) is one column of
    :attr:`BlockClasses.cached_keys`, apart from the blocks."""
    n_blocks = max(1, math.ceil(layout.n_tokens / block))
    found = classify(allowed_rects(layout, block=block), block, n_blocks)
    classes = [[EMPTY] * n_blocks for _ in range(n_blocks)]
    for at, whole in found.items():
        classes[at // n_blocks][at % n_blocks] = FULL if whole else PARTIAL
    starts = tuple((s.name, s.offset // block) for s in layout.slots if s.size)
    cached = []
    if layout.cached_groups:
        # which cached groups each query group reads, and whether under modifiers
        reads: dict[str, dict[str, int]] = {}
        for call in layout.calls:
            for segment in call.keys:
                if segment.cached is not None:
                    for q in call.query_tokens:
                        reads.setdefault(q, {})[segment.cached] = PARTIAL if segment.modifiers else FULL
        per_block = _block_groups(layout, n_blocks, block)
        for group in layout.cached_groups:
            per_row = tuple(
                _merge(EMPTY if q is None else reads.get(q, {}).get(group, EMPTY) for q in parts)
                for parts in per_block
            )
            cached.append((group, per_row))
    return BlockClasses(tuple(tuple(row) for row in classes), block, starts, tuple(cached))
