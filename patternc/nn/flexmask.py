"""FlexAttention block masks built analytically from the group layout.

``create_block_mask`` finds empty, partial and full blocks by evaluating the
mask per element: un-compiled it materialises an ``[n, n]`` tensor, compiled it
costs milliseconds per layout. Here the block classes follow from the group
intervals alone: for each ``(query block, key block)`` the few groups that
overlap each block are paired, and a pair is *full* (every token pair allowed)
or *empty* (none allowed) by interval arithmetic on the tokens' positions in
their groups; a block is full when all its pairs are, empty when all are.

The ``mask_mod`` tests a token pair's groups as a bit of the query group's
words (:class:`PairSets`), read through per-token group ids, so no ``[n, n]``
tensor exists anywhere and no score reads a two-dimensional table.

>>> import patternc
>>> from patternc.nn.schedule import schedule_for
>>> plan = patternc.compile("groups a q\\na, q -> a").patterns["default"]
>>> tables = FlexTables.build(schedule_for(plan.token_specs({"a": 256, "q": 512}), plan), {}, "cpu")
>>> tables.block_mask().shape
(1, 1, 768, 768)
"""

from __future__ import annotations

import array
import functools
import itertools
import math
import operator
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from patternc.lower.blocks import BLOCK_SIZE
from patternc.lower.intervals import query_runs
from patternc.lower.layout import Layout
from patternc.nn.flexintervals import interval_mask_mod, interval_tables
from patternc.nn.tables import table
from patternc.tracing import compiling as _compiling

if TYPE_CHECKING:
    from torch.nn.attention.flex_attention import BlockMask

__all__ = ["BLOCK_SIZE", "FlexTables", "bucket_length", "group_segments", "values_cross_groups"]

MaskMod = Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]
ScoreMod = Callable[[Tensor, Tensor, Tensor, Tensor, Tensor], Tensor]


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
    layout: Layout, cache_lengths: Mapping[str, int], compact: bool = False
) -> tuple[list[tuple[int, int, int]], list[tuple[int, int, int]]]:
    """``(group, start, stop)`` of the query tokens (the input) and of the key
    tokens (the input, then each cached group), skipping empty groups.
    ``compact``: the input's keys are those of the layout's key space, at
    their places there (K/V given for the key space only)."""
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


def _intervals(
    layout: Layout,
    queries: list[tuple[int, int, int]],
    keys: list[tuple[int, int, int]],
    q_len: int,
    device: torch.device,
    compact: bool,
) -> Tensor | None:
    """The per-query key intervals (:func:`interval_tables`), where keys are
    the input's tokens and the layout's masks are intervals of them."""
    if compact or layout.cached_groups:
        return None
    runs = query_runs(queries, keys, layout.pairs)
    if runs is None:
        return None
    return interval_tables(runs, [stop - start for _, start, stop in queries], q_len, device)


def _blocks_mix_groups(segments: list[tuple[int, int, int]], block: int) -> bool:
    """Whether a block holds tokens of two groups: a boundary between
    different groups off a block edge. (The padding after the last segment
    mixes nothing that matters: padded queries are dropped, padded keys are
    zeros.)"""
    return any(
        group != next_group and stop % block
        for (group, _, stop), (next_group, _, _) in itertools.pairwise(segments)
    )


MAX_GUARD_CLASSES = 4096
"""Above this many (query block class, key block class) pairs to test,
:func:`values_cross_groups` answers True without testing (the guard then
runs: always correct, only slower)."""


def values_cross_groups(
    queries: list[tuple[int, int, int]],
    keys: list[tuple[int, int, int]],
    pairs: Collection[tuple[int, int]],
    block: int,
) -> bool:
    """Whether a block the kernel may compute holds a real query and a real
    key whose groups are not a pair: a non-finite value there reaches, through
    the kernel's zero weight, a query of a group that does not read its group.
    Blocks that mix groups whose pairs all are (or none are) allowed, and a
    modifier's diagonal (its hidden keys belong to a group the query's group
    reads), cannot carry a value out of the groups that read it.

    ``queries``/``keys``: the real ``(group, start, stop)`` segments
    (:func:`group_segments`); ``pairs``: the allowed ``(query group, key
    group)`` pairs. A block counts as computed where some allowed pair
    overlaps it (a modifier may leave it empty: then this says True where
    False would do, never the reverse)."""
    q_classes, k_classes = _block_group_sets(queries, block), _block_group_sets(keys, block)
    tested = [(a, b) for a in q_classes for b in k_classes if len(a) > 1 or len(b) > 1]
    if len(tested) > MAX_GUARD_CLASSES:
        return True
    for q_set, k_set in tested:
        allowed = [(q, k) in pairs for q in q_set for k in k_set]
        if any(allowed) and not all(allowed):
            return True
    return False


def _block_group_sets(segments: list[tuple[int, int, int]], block: int) -> set[frozenset[int]]:
    """The distinct sets of groups that the blocks of ``segments`` hold (a
    block inside one segment holds its group alone)."""
    sets: set[frozenset[int]] = set()
    shared: dict[int, set[int]] = {}  # blocks that segments share, by index
    for gid, start, stop in segments:
        first, last = start // block, (stop - 1) // block
        if start % block:
            shared.setdefault(first, set()).add(gid)
            first += 1
        if stop % block and last >= first:
            shared.setdefault(last, set()).add(gid)
            last -= 1
        if last >= first:
            sets.add(frozenset((gid,)))
    sets.update(frozenset(groups) for groups in shared.values())
    return sets


def _token_tables(
    ids: Tensor, sizes: Tensor, starts: Tensor, length: int, positions: bool
) -> tuple[Tensor, Tensor | None]:
    """Per-token group id and (only where modifiers read it) position within
    the group, expanded on the device from one row per segment (padding included)."""
    group = torch.repeat_interleave(ids, sizes, output_size=length)
    if not positions:
        return group, None
    first = torch.repeat_interleave(starts, sizes, output_size=length)
    return group, torch.arange(length, device=ids.device) - first


class _Upload:
    """Gathers small integer arrays on the host and moves them to the device
    in one copy (a handful of tensor operations instead of dozens)."""

    def __init__(self) -> None:
        self._values: list[int] = []
        self._lengths: list[int] = []

    def add(self, values: list[int]) -> None:
        self._values.extend(values)
        self._lengths.append(len(values))

    def send(self, device: torch.device) -> tuple[Tensor, ...]:
        """One host-to-device copy. ``array`` packs the ints ~3x faster than
        ``torch.tensor(list)``; on a GPU the copy is from pinned memory and
        asynchronous, so the host does not wait for queued kernels to finish.
        Traced by ``torch.compile`` (a user's compiled model building the
        tables in its graph), the values become one constant tensor instead:
        Dynamo cannot trace ``array`` or pinning."""
        if _compiling():
            flat = torch.tensor(self._values, dtype=torch.int64, device=device)
            return torch.split(flat, self._lengths)
        packed = array.array("q", self._values)
        flat = torch.frombuffer(packed, dtype=torch.int64) if packed else torch.zeros(0, dtype=torch.int64)
        if device.type == "cuda":
            flat = flat.pin_memory().to(device, non_blocking=True)
        elif device.type != "cpu":
            flat = flat.to(device)
        return torch.split(flat, self._lengths)


def _with_padding(
    segments: list[tuple[int, int, int]], length: int, pad_group: int
) -> list[tuple[int, int, int]]:
    real = segments[-1][2] if segments else 0
    return [*segments, (pad_group, real, length)] if real < length else list(segments)


def _same_offsets(
    queries: list[tuple[int, int, int]],
    keys: list[tuple[int, int, int]],
    modified: frozenset[tuple[int, int]],
) -> bool:
    """Whether each modified pair's query group and key group start at the
    same token index (see :attr:`FlexTables.same_offsets`); pairs with an
    empty side hold no scores."""
    q_start = {gid: start for gid, start, _ in queries}
    k_start: dict[int, int] = {}
    for gid, start, _ in keys:
        if gid in k_start:  # a group's keys in two places: positions are not token offsets
            return False
        k_start[gid] = start
    return all(q_start[q] == k_start[k] for q, k in modified if q in q_start and k in k_start)


def _overlaps_per_block(segments: list[tuple[int, int, int]], n_blocks: int, block: int) -> list[int]:
    """How many segments (padding included) overlap each block."""
    diff = [0] * (n_blocks + 1)
    for _, start, stop in segments:
        diff[start // block] += 1
        diff[(stop - 1) // block + 1] -= 1
    return list(itertools.accumulate(diff[:n_blocks]))


def _modified_pair_blocks(p: Tensor, block: int, n_cols: int) -> Tensor:
    """Blocks of the (query segment, key segment) pairs that carry modifiers,
    classified one by one on each pair's block rectangle (one padded batch):
    ``[3, n]`` rows (flat block index, non-empty, full), from interval
    arithmetic on positions within the groups: a block's differences
    ``j - i`` are the integers of ``[klo - qhi, khi - qlo]``, so its class
    under a band is exact (see :meth:`patternc.modifiers.Band.cell_class`)."""
    # p: [P, 8] int64, columns q_start, q_stop, k_start, k_stop, low, high, dilation, residue
    device = p.device
    q_start, q_stop, k_start, k_stop = (p[:, i, None] for i in range(4))
    r0, r1 = q_start // block, (q_stop - 1) // block
    c0, c1 = k_start // block, (k_stop - 1) // block
    rows = r0 + torch.arange(int((r1 - r0).max()) + 1, device=device)  # [P, R]
    cols = c0 + torch.arange(int((c1 - c0).max()) + 1, device=device)  # [P, C]
    qlo = (torch.maximum(rows * block, q_start) - q_start)[:, :, None]
    qhi = (torch.minimum(rows * block + block - 1, q_stop - 1) - q_start)[:, :, None]
    klo = (torch.maximum(cols * block, k_start) - k_start)[:, None, :]
    khi = (torch.minimum(cols * block + block - 1, k_stop - 1) - k_start)[:, None, :]
    low, high, dilation, residue = (p[:, i, None, None] for i in range(4, 8))
    lo, hi = klo - qhi, khi - qlo  # the differences j - i the block holds
    a, b = torch.maximum(lo, low), torch.minimum(hi, high)
    # a multiple of the dilation (shifted by the residue) within [a, b]
    nonempty = (a <= b) & ((b - residue) // dilation > (a - 1 - residue) // dilation)
    one_diagonal = (lo == hi) & ((lo - residue) % dilation == 0)
    full = (lo >= low) & (hi <= high) & ((dilation == 1) | one_diagonal)
    inside = (rows <= r1)[:, :, None] & (cols <= c1)[:, None, :]
    flat = rows[:, :, None] * n_cols + cols[:, None, :]
    return torch.stack(
        [
            flat[inside],
            nonempty[inside].to(torch.int64),
            full[inside].to(torch.int64),
        ]
    )


SegmentPairs = tuple[tuple[Tensor, Tensor, Tensor, Tensor], Tensor, Tensor | None]
"""``(q_start, q_stop, k_start, k_stop)`` columns of (query segment, key
segment) pairs, each column's weight in the block counts (1: a pair without
modifiers; 0: one with modifiers, or a group with no segment here), and the
``[P, 8]`` rows :func:`_modified_pair_blocks` reads for the pairs with
modifiers (None: there are none)."""


def _segment_pairs(
    groups: GroupTables,
    q_ids: Tensor,
    q_sizes: Tensor,
    q_starts: Tensor,
    k_ids: Tensor,
    k_sizes: Tensor,
    k_starts: Tensor,
    n_groups: int,
) -> SegmentPairs:
    """The (query segment, key segment) pairs a rule allows, on the device:
    each allowed group pair joined to its groups' segments, where each
    group has at most one query segment and one key segment (the caller
    checks). The join is a gather per side, and a pair with a side missing
    here weighs 0: no shape depends on the data, so on a GPU the host never
    waits for the device (but for the rows with modifiers)."""
    device = q_ids.device
    size = n_groups + 1
    q_gid, k_gid, has_mods, low, high, dilation, residue = groups.pairs
    q_of = torch.full((size,), -1, dtype=torch.int64, device=device)
    q_of[q_ids] = torch.arange(q_ids.numel(), device=device)
    q_seg = q_of[q_gid]
    k_of = torch.full((size,), -1, dtype=torch.int64, device=device)
    k_of[k_ids] = torch.arange(k_ids.numel(), device=device)
    k_seg = k_of[k_gid]
    found = (q_seg >= 0) & (k_seg >= 0)
    q_seg, k_seg = q_seg.clamp_min(0), k_seg.clamp_min(0)
    q_start = q_starts[q_seg]
    k_start = k_starts[k_seg]
    columns = (q_start, q_start + q_sizes[q_seg], k_start, k_start + k_sizes[k_seg])
    plain = found & (has_mods == 0)
    if not groups.modified:
        return columns, plain.to(torch.int64), None
    rows = torch.stack([*columns, low, high, dilation, residue], dim=1)[found & (has_mods != 0)]
    return columns, plain.to(torch.int64), (rows if rows.shape[0] else None)


def _segment_pairs_listed(
    layout: Layout,
    queries: list[tuple[int, int, int]],
    keys: list[tuple[int, int, int]],
    device: torch.device,
) -> SegmentPairs:
    """:func:`_segment_pairs` from the host's lists, one step per pair (what
    ``torch.compile`` traces: its results are constants of the graph)."""
    q_segment = {gid: (start, stop) for gid, start, stop in queries}
    k_segments: dict[int, list[tuple[int, int]]] = {}
    for gid, start, stop in keys:
        k_segments.setdefault(gid, []).append((start, stop))
    q_col, k_col, *bands = layout.pair_columns()
    plain: list[tuple[int, int, int, int]] = []
    modified: list[tuple[int, ...]] = []
    for at, (q, k, mods) in enumerate(zip(q_col, k_col, layout.pairs.values())):
        if q not in q_segment:
            continue
        for k_start, k_stop in k_segments.get(k, ()):
            if mods:
                modified.append((*q_segment[q], k_start, k_stop, *(b[at] for b in bands)))
            else:
                plain.append((*q_segment[q], k_start, k_stop))
    rects = torch.tensor(plain, dtype=torch.int64, device=device).view(-1, 4)
    rows = torch.tensor(modified, dtype=torch.int64, device=device) if modified else None
    weight = torch.ones(rects.shape[0], dtype=torch.int64, device=device)
    return (rects[:, 0], rects[:, 1], rects[:, 2], rects[:, 3]), weight, rows


WORD_BITS = 64
"""Key groups per word of :class:`PairSets`."""

MAX_WORDS = 8
"""The most words per query token the ``mask_mod`` tests (512 groups):
past that it reads the ``[groups, groups]`` tables."""


BandTest = tuple[int | None, int | None, int, bool]
"""``(low, high, dilation, across)`` of a modifier list (:meth:`Modifiers.band
<patternc.modifiers.Modifiers.band>` and whether positions count in the
input): what the ``mask_mod`` tests on the pairs that share it."""


@dataclass(frozen=True)
class PairSets:
    """Sets of (query group, key group) pairs, held so that the ``mask_mod``
    tests them with no two-dimensional table lookup per score (see
    :meth:`FlexTables.mask_mod`): per query group, one bit per key group in
    int64 words (key group ``g`` is bit ``g % 64`` of word ``g // 64``).

    Each set's words are an ``[n_words, G + 1]`` table (the last group is
    the padding, in no set), or None where the set needs no test: ``allowed``
    when the allowed pairs are exactly each group with itself
    (``same_group``), a band's when every allowed pair has it."""

    n_words: int
    same_group: bool
    allowed: Tensor | None
    bands: tuple[tuple[BandTest, Tensor | None], ...]
    """Each modifier list of the layout and the pairs that have it."""
    key_bits: Tensor
    """``[G + 1]``: each key group's bit in its word."""


@dataclass(frozen=True)
class GroupTables:
    """Device tables of a layout's group pairs (see :func:`_build_group_tables`)."""

    allowed: Tensor
    """``[G + 1, G + 1]`` bool: group ``q`` reads group ``k`` (the last row
    and column: padding, allowed nowhere)."""
    band: tuple[Tensor, Tensor, Tensor, Tensor]
    """``[G + 1, G + 1]`` ``low``, ``high``, ``dilation`` and ``residue`` of each pair."""
    pairs: Tensor
    """``[7, P]``: every allowed pair as a column: query group, key group,
    whether it carries modifiers, then its band's four numbers. Block
    classes are computed from it as tensor operations, with no host work
    per pair (a block-causal family of M members has M(M+1)/2 pairs)."""
    modified: frozenset[tuple[int, int]]
    """The pairs that carry modifiers."""
    sets: PairSets | None
    """What the ``mask_mod`` tests (:class:`PairSets`)."""
    tests: tuple[BandTest, ...] = ()
    """The layout's distinct modifier lists (those of pairs with modifiers)."""


def _group_tables(layout: Layout, device: torch.device) -> GroupTables:
    """:func:`_build_group_tables`, kept in the layout's tables per device."""
    return table(layout, ("flex groups", device), lambda: _build_group_tables(layout, device))


def _signed(bits: int) -> int:
    """A 64-bit pattern as the int64 that holds it."""
    return bits - (1 << WORD_BITS) if bits >= 1 << (WORD_BITS - 1) else bits


def _int64(values: list[int]) -> Tensor:
    """A host list as an int64 tensor: through ``array`` (about 3x faster
    than ``torch.tensor`` on long lists), or ``torch.tensor`` where
    ``torch.compile`` traces (Dynamo cannot trace ``array``)."""
    if _compiling() or not values:
        return torch.tensor(values, dtype=torch.int64)
    return torch.frombuffer(array.array("q", values), dtype=torch.int64)


def _pair_sets(
    layout: Layout, q_col: list[int], k_col: list[int], tests: Sequence[BandTest], test_of: list[int]
) -> PairSets | None:
    """The layout's allowed and modified pairs as :class:`PairSets`, or None
    where a set to test needs more than :data:`MAX_WORDS` words (then the
    ``mask_mod`` reads the tables). ``q_col``, ``k_col``: the allowed pairs;
    ``tests``: the layout's modifier lists; ``test_of``: each pair's index
    into them (-1: no modifiers). Host lists in, CPU tensors out (the caller
    moves them): under ``torch.compile`` every value here is a constant."""
    n_groups = len(layout.all_groups)
    size = n_groups + 1  # with the padding group, in no set
    n_words = -(-size // WORD_BITS)
    n_pairs = len(q_col)
    # the pairs are distinct: n of them, each a group with itself, are all groups
    same_group = n_pairs == n_groups and all(q == k for q, k in zip(q_col, k_col))
    members: list[list[int]] = [[] for _ in tests]
    for at, test in enumerate(test_of):
        if test >= 0:
            members[test].append(at)
    # a set needs no test where it holds every allowed pair
    tested = [len(m) != n_pairs for m in members] + ([] if same_group else [n_pairs > 0])
    if any(tested) and n_words > MAX_WORDS:
        return None
    # bit j of a word is 1 << j as an int64: a sum of distinct bits is their OR
    weights = torch.tensor([_signed(1 << j) for j in range(WORD_BITS)], dtype=torch.int64)
    q_ids = _int64(q_col)
    k_ids = _int64(k_col)

    def words(chosen: list[int] | None) -> Tensor:
        """``[n_words, size]``: each query group's bits of the key groups of
        the chosen pairs (None: all of them)."""
        bits = torch.zeros(size, n_words * WORD_BITS, dtype=torch.int64)
        if chosen is None:
            bits[q_ids, k_ids] = 1
        else:
            index = torch.tensor(chosen, dtype=torch.int64)
            bits[q_ids[index], k_ids[index]] = 1
        return (bits.view(size, n_words, WORD_BITS) * weights).sum(-1).t().contiguous()

    ordered = sorted(range(len(tests)), key=lambda i: repr(tests[i]))
    return PairSets(
        n_words=n_words,
        same_group=same_group,
        allowed=None if same_group else words(None),
        bands=tuple((tests[i], words(members[i]) if len(members[i]) != n_pairs else None) for i in ordered),
        key_bits=torch.tensor([_signed(1 << (g % WORD_BITS)) for g in range(size)]),
    )


def _build_group_tables(layout: Layout, device: torch.device) -> GroupTables:
    """Device tables of a layout's plan: ``[G + 1, G + 1]`` ``allowed`` and
    each pair's band (``low``, ``high``, ``dilation``, ``residue`` on
    positions within groups, see :meth:`Layout.pair_band
    <patternc.lower.layout.Layout.pair_band>`; the last row and column:
    padding, allowed nowhere), the allowed pairs as columns, the pairs that
    carry modifiers, and the pair sets the ``mask_mod`` tests
    (:class:`PairSets`). One pass over the pairs on the host, with one
    lookup per distinct modifier list (bound families share them)."""
    n = len(layout.all_groups)
    q_col, k_col, *band_cols = layout.pair_columns()
    test_index: dict[int, int] = {}  # id(modifiers) -> index into tests, -1: none
    tests: list[BandTest] = []
    by_test: dict[BandTest, int] = {}
    test_of: list[int] = []
    for mods in layout.pairs.values():
        at = test_index.get(id(mods))
        if at is None:
            at = -1
            if mods:
                test = (*mods.band(), mods.across)
                at = by_test.setdefault(test, len(tests))
                if at == len(tests):
                    tests.append(test)
            test_index[id(mods)] = at
        test_of.append(at)
    modified = frozenset((q, k) for q, k, at in zip(q_col, k_col, test_of) if at >= 0)
    q_ids = _int64(q_col)
    k_ids = _int64(k_col)
    columns = [_int64(c) for c in band_cols]
    table = torch.zeros(n + 1, n + 1, dtype=torch.bool)
    table[q_ids, k_ids] = True
    bands = []
    for column, fill in zip(columns, (0, 0, 1, 0)):
        band = torch.full((n + 1, n + 1), fill, dtype=torch.int64)
        band[q_ids, k_ids] = column
        bands.append(band.to(device))
    sets = _pair_sets(layout, q_col, k_col, tests, test_of)
    if sets is not None and device.type != "cpu":
        sets = PairSets(
            n_words=sets.n_words,
            same_group=sets.same_group,
            allowed=None if sets.allowed is None else sets.allowed.to(device),
            bands=tuple((test, None if w is None else w.to(device)) for test, w in sets.bands),
            key_bits=sets.key_bits.to(device),
        )
    has_mods = _int64(test_of) >= 0
    pairs = torch.stack([q_ids, k_ids, has_mods.to(torch.int64), *columns]).to(device)
    low, high, dilation, residue = bands
    return GroupTables(table.to(device), (low, high, dilation, residue), pairs, modified, sets, tuple(tests))


@dataclass(frozen=True)
class FlexTables:
    """Device tables of one layout: what the ``mask_mod`` reads and the block classes."""

    q_len: int
    kv_len: int
    n_queries: int
    q_group: Tensor
    kv_group: Tensor
    q_pos: Tensor | None
    kv_pos: Tensor | None
    allowed: Tensor
    band: tuple[Tensor, Tensor, Tensor, Tensor]
    """``[G + 1, G + 1]`` ``low``, ``high``, ``dilation`` and ``residue`` of each
    pair's band on positions within groups (the ``lookups`` ``mask_mod``)."""
    has_modifiers: bool
    partial: Tensor
    full: Tensor
    needs_value_guard: bool
    """Whether a block the kernel computes can hold a real key that some real
    query of the block must not see: a block that mixes groups, or a
    modifier's diagonal. Only there can a non-finite value leak to queries
    of other groups, through the kernel's zero weights (``0 * NaN``), so
    only there does the executor guard values (narrowed further by
    :func:`values_cross_groups`: a modifier's hidden keys and blocks of
    groups that read each other carry nothing out). Known on the host, from
    the segments: AB-UPT layouts in whole blocks need no guard."""
    pair_sets: PairSets | None = None
    """The allowed and modified pairs as bit words (None: the ``mask_mod``
    reads the ``[groups, groups]`` tables)."""
    same_offsets: bool = False
    """Whether, for every modified pair, a query's and a key's positions
    within their groups differ as their token indices do (the groups' query
    and key tokens start at the same index, as a group's own tokens do
    without cached or compacted keys): the ``mask_mod`` then compares token
    indices, with no position lookups."""
    dilated: bool = False
    """Whether some pair keeps every ``D``-th key only (the ``mask_mod`` then
    tests a remainder)."""
    intervals: Tensor | None = None
    """``[R, 2, q_len]`` int32: per query, the bounds of the runs of keys it
    reads, where a layout's masks have that shape (see
    :mod:`patternc.lower.intervals`); the ``mask_mod`` then compares a
    key's index with them and tests no group pairs."""
    kv_input: Tensor | None = None
    """``[kv_len]``: each key's index in the input, where that is not its
    index (compact keys under ``across``); None otherwise."""

    @staticmethod
    def build(
        layout: Layout,
        cache_lengths: Mapping[str, int],
        device: torch.device | str,
        block: int = BLOCK_SIZE,
        positions: bool = False,
        compact: bool = False,
    ) -> FlexTables:
        """``positions``: build within-group positions even without modifiers
        (an ALiBi ``score_mod`` reads them); ``compact``: keys index the
        layout's key space, then the cached groups (K/V given for key tokens
        only: nothing is copied back to token space, and the key axis is
        the key space's length)."""
        device = torch.device(device)
        n_groups = len(layout.all_groups)
        pad = n_groups  # the padding "group": allowed nowhere
        queries, keys = group_segments(layout, cache_lengths, compact)
        n_q = layout.n_tokens
        n_input_keys = layout.key_space.size if compact else n_q
        n_kv = n_input_keys + sum(cache_lengths[g] for g in layout.cached_groups)
        q_len, kv_len = bucket_length(n_q, block), bucket_length(n_kv, block)

        groups = _group_tables(layout, device)
        q_segs, k_segs = _with_padding(queries, q_len, pad), _with_padding(keys, kv_len, pad)
        shape = (q_len // block, kv_len // block)

        # The host works on one row per group or segment; a single copy moves it all.
        upload = _Upload()
        for segs in (q_segs, k_segs):
            upload.add([g for g, _, _ in segs])
            upload.add([stop - start for _, start, stop in segs])
            upload.add([start for _, start, _ in segs])
        upload.add(_overlaps_per_block(q_segs, shape[0], block))
        upload.add(_overlaps_per_block(k_segs, shape[1], block))
        # under `across` with compact keys, a key's place in the input is not
        # its index: one shift per key segment (cached keys are never `across`)
        across = any(test[3] for test in groups.tests)
        offsets = [s.offset for s in layout.slots]
        shifts = [offsets[g] - start if g < n_groups else 0 for g, start, _ in k_segs]
        upload.add(shifts if compact and across else [])
        (
            q_ids, q_sizes, q_starts, k_ids, k_sizes, k_starts, q_overlaps, k_overlaps, k_shifts,
        ) = upload.send(device)  # fmt: skip
        has_modifiers = layout.has_modifiers
        positions = positions or has_modifiers
        q_group, q_pos = _token_tables(q_ids, q_sizes, q_starts, q_len, positions)
        # separate key tables even where they equal the query tables: the
        # mask_mod's tensors then never alias, whose guard Dynamo cannot
        # explain on a recompile (torch 2.13 raises IndexError building the
        # reason, for flex_attention called outside torch.compile)
        kv_group, kv_pos = _token_tables(k_ids, k_sizes, k_starts, kv_len, positions)
        kv_input = None
        if compact and across:
            kv_input = torch.arange(kv_len, device=device) + torch.repeat_interleave(
                k_shifts, k_sizes, output_size=kv_len
            )

        # block classes: a block is full when every (query segment, key segment)
        # pair overlapping it is full, empty when none is non-empty
        # (scatter_add: one atomic kernel where index_put_ would sort the indices)
        # (int64 like the upload: no conversion kernel; the matrices are small)
        width = shape[1] + 1
        # under torch.compile data-dependent shapes do not trace, and a group
        # whose keys lie in two places pairs once per place: the host's lists
        if _compiling() or len({gid for gid, _, _ in keys}) != len(keys):
            rects, weight, modified = _segment_pairs_listed(layout, queries, keys, device)
        else:
            rects, weight, modified = _segment_pairs(
                groups, q_ids, q_sizes, q_starts, k_ids, k_sizes, k_starts, n_groups
            )
        # without modifiers a (query segment, key segment) pair covers its
        # whole block rectangle: four corners of a 2-D difference array
        q_start, q_stop, k_start, k_stop = rects
        top, bottom = q_start // block * width, ((q_stop - 1) // block + 1) * width
        left, right = k_start // block, (k_stop - 1) // block + 1
        corners = torch.cat([top + left, top + right, bottom + left, bottom + right])
        signs = torch.cat([weight, -weight, -weight, weight])
        diff = torch.zeros((shape[0] + 1) * width, dtype=torch.int64, device=device)
        diff.scatter_add_(0, corners, signs)
        # 2-D prefix sum as two inner-dim scans with a transpose between: a GPU
        # scan along the outer dim runs one thread per column (several times slower)
        rows_done = diff.view(shape[0] + 1, width).cumsum(1)
        plain = rows_done.t().contiguous().cumsum(1).t()[: shape[0], : shape[1]]
        nonempty_pairs, full_pairs = plain, plain
        # pairs with modifiers are classified block by block
        if modified is not None:
            flat, pair_nonempty, pair_full = _modified_pair_blocks(modified, block, shape[1])
            plain_flat = plain.flatten()
            nonempty_pairs = plain_flat.scatter_add(0, flat, pair_nonempty).view(shape)
            full_pairs = plain_flat.scatter_add(0, flat, pair_full).view(shape)
        # a block with no allowed pair has full_pairs 0 < overlaps: full implies non-empty
        full = full_pairs == q_overlaps[:, None] * k_overlaps[None, :]
        partial = (nonempty_pairs > 0) ^ full
        return FlexTables(
            q_len=q_len,
            kv_len=kv_len,
            n_queries=n_q,
            q_group=q_group,
            kv_group=kv_group,
            q_pos=q_pos,
            kv_pos=kv_pos,
            allowed=groups.allowed,
            band=groups.band,
            has_modifiers=has_modifiers,
            partial=partial,
            full=full,
            needs_value_guard=has_modifiers
            or _blocks_mix_groups(queries, block)
            or _blocks_mix_groups(keys, block),
            pair_sets=groups.sets,
            same_offsets=_same_offsets(queries, keys, groups.modified),
            dilated=any(test[2] > 1 for test in groups.tests),
            kv_input=kv_input,
            intervals=_intervals(layout, queries, keys, q_len, device, compact),
        )

    def mask_mod(self, key_padding_mask: Tensor | None = None, lookups: bool = False) -> MaskMod:
        """``mask_mod(b, h, q_idx, kv_idx)``: whether the tokens' groups pair,
        then the pair's modifiers on positions within groups, then key padding.

        The kernel evaluates it on every score of a partial block, so it
        looks up per query token and per key token only: a group pair is
        tested as a bit of the query group's words (:class:`PairSets`), not
        read from a ``[groups, groups]`` table at each score: table reads
        per score made the forward kernel several times slower than the same
        blocks with a hand-written ``mask_mod`` (figures in
        ``docs/performance.md``). ``lookups``: read the tables (FLASH's mask
        code, and layouts past :data:`MAX_WORDS`)."""
        sets = self.pair_sets
        if lookups:
            mask = self._table_mask_mod()
        elif self.intervals is not None:
            mask = interval_mask_mod(self.intervals)
        else:
            mask = self._table_mask_mod() if sets is None else self._bits_mask_mod(sets)
        if key_padding_mask is None:
            return mask
        padding = key_padding_mask
        inner = mask

        def with_padding(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
            return inner(b, h, q_idx, kv_idx) & padding[b, kv_idx]

        return with_padding

    def _table_mask_mod(self) -> MaskMod:
        """Group pairs and modifiers read from the ``[groups, groups]`` tables."""
        q_group, kv_group, allowed = self.q_group, self.kv_group, self.allowed

        def groups(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
            return allowed[q_group[q_idx], kv_group[kv_idx]]

        if not self.has_modifiers:
            return groups
        q_pos, kv_pos, dilated = self.q_pos, self.kv_pos, self.dilated
        low, high, dilation, residue = self.band
        assert q_pos is not None and kv_pos is not None

        def with_modifiers(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
            gq, gk = q_group[q_idx], kv_group[kv_idx]
            d = kv_pos[kv_idx] - q_pos[q_idx]  # the band is in positions within groups
            ok = allowed[gq, gk] & (d >= low[gq, gk]) & (d <= high[gq, gk])
            if dilated:
                ok = ok & ((d - residue[gq, gk]) % dilation[gq, gk] == 0)
            return ok

        return with_modifiers

    def _bits_mask_mod(self, sets: PairSets) -> MaskMod:
        """Group pairs and modifiers tested as bits of the query group's words
        (per-token lookups only; the terms a layout does not need are left out)."""
        q_group, kv_group, key_bits = self.q_group, self.kv_group, sets.key_bits
        pad = sets.key_bits.shape[0] - 1
        n_words = sets.n_words
        q_pos, kv_pos = self.q_pos, self.kv_pos
        same_offsets = self.same_offsets

        def member(words: Tensor, gq: Tensor, gk: Tensor, bit: Tensor) -> Tensor:
            """Whether (gq, gk) is in the set: the query group's word that
            holds ``gk``, tested at ``gk``'s bit (one word: no choice)."""
            bits = words[0][gq]
            for w in range(1, n_words):
                bits = torch.where(gk // WORD_BITS == w, words[w][gq], bits)
            return (bits & bit) != 0

        kv_input = self.kv_input

        def offset(q_idx: Tensor, kv_idx: Tensor, across: bool) -> Tensor:
            """A key's position minus a query's: within their groups, or
            ``across``, in the input (queries index the input as they are)."""
            if across:
                return (kv_idx if kv_input is None else kv_input[kv_idx]) - q_idx
            if same_offsets:
                return kv_idx - q_idx
            assert q_pos is not None and kv_pos is not None
            return kv_pos[kv_idx] - q_pos[q_idx]

        def bits_mask(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
            gq, gk = q_group[q_idx], kv_group[kv_idx]
            bit = key_bits[gk]
            if sets.allowed is None:  # each group reads itself (and padding nothing)
                ok = (gq == gk) & (gk != pad)
            else:
                ok = member(sets.allowed, gq, gk, bit)
            for (low, high, dilation, across), words in sets.bands:
                d = offset(q_idx, kv_idx, across)
                # a modifier list bounds a side or dilates: at least one term
                terms = [d >= low] if low is not None else []
                terms += [d <= high] if high is not None else []
                terms += [d % dilation == 0] if dilation > 1 else []
                inside = functools.reduce(operator.and_, terms)
                ok = ok & (inside if words is None else ~member(words, gq, gk, bit) | inside)
            return ok

        return bits_mask

    def alibi_score_mod(self, slopes: Tensor) -> ScoreMod:
        """``score_mod`` adding ALiBi's ``-slope_h * |i - j|`` (positions within
        groups; the tables must have been built with ``positions=True``)."""
        q_pos, kv_pos = self.q_pos, self.kv_pos
        if q_pos is None or kv_pos is None:
            raise ValueError("these tables have no positions: build them with positions=True")

        def alibi(score: Tensor, b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
            return score - slopes[h] * (q_pos[q_idx] - kv_pos[kv_idx]).abs()

        return alibi

    def block_mask(self, key_padding_mask: Tensor | None = None, lookups: bool = False) -> BlockMask:
        """The ``BlockMask``: full blocks skip the ``mask_mod``; with key padding
        every non-empty block is partial (padding is checked per element).
        ``lookups``: its ``mask_mod`` reads the group tables (see :meth:`mask_mod`)."""
        from torch.nn.attention.flex_attention import BlockMask

        partial, full = self.partial, self.full
        if key_padding_mask is not None:
            partial, full = partial | full, torch.zeros_like(full)
        # kv-major for the forward pass, q-major (transposed) for the backward;
        # square masks order all four matrices in one batch
        if partial.shape[0] == partial.shape[1]:
            nums, idxs = _ordered(torch.stack([partial, full, partial.t(), full.t()])[:, None])
            kv_nums, q_nums, kv_idxs, q_idxs = nums[:2], nums[2:], idxs[:2], idxs[2:]
        else:
            kv_nums, kv_idxs = _ordered(torch.stack([partial, full])[:, None])  # [2, 1, rows, cols]
            q_nums, q_idxs = _ordered(torch.stack([partial.t(), full.t()])[:, None])
        kv_num, full_kv_num = kv_nums[:, None]
        kv_idx, full_kv_idx = kv_idxs[:, None]
        q_num, full_q_num = q_nums[:, None]
        q_idx, full_q_idx = q_idxs[:, None]
        block_size = (self.q_len // partial.shape[0], self.kv_len // partial.shape[1])
        mask_mod = self.mask_mod(key_padding_mask, lookups)
        try:
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
    """Dense ``[..., rows, cols]`` bool -> (count per row, column indices of the
    True entries first, in order, then the others) as FlexAttention stores them
    (int32, contiguous). Several matrices stacked on the leading dims are
    ordered in the same launches. On a GPU the cost is launches, so one stable
    sort per row; on CPU a prefix-sum partition is faster than sorting."""
    counts = blocks.sum(dim=-1, dtype=torch.int32)
    if blocks.is_cuda:
        # bool keys sort directly (descending: True first; stable keeps column order)
        return counts, torch.argsort(blocks, dim=-1, descending=True, stable=True).to(torch.int32)
    return counts, _partition(blocks, counts)


def _partition(blocks: Tensor, counts: Tensor) -> Tensor:
    """Stable partition of each row's column indices (True first) by prefix
    sums and one scatter."""
    taken = blocks.to(torch.int32)
    before_true = taken.cumsum(-1, dtype=torch.int32) - taken
    columns = torch.arange(blocks.shape[-1], device=blocks.device, dtype=torch.int32)
    slot = torch.where(blocks, before_true, counts[..., None] + columns - before_true)
    return torch.empty_like(taken).scatter_(-1, slot.to(torch.int64), columns.expand(blocks.shape))
