"""FlexAttention block masks built analytically from the group layout.

``create_block_mask`` finds empty, partial and full blocks by evaluating the
mask per element: un-compiled it materialises an ``[n, n]`` tensor, compiled it
costs milliseconds per layout. Here the block classes follow from the
layout's allowed rectangles (:func:`patternc.lower.blocks.allowed_rects`):
the rule of :mod:`patternc.lower.blocks` (which ``patternc compile --mask``
runs one block at a time), the rectangles cut on the host and the blocks
tallied on the device (:mod:`patternc.nn.flexblocks`).

The ``mask_mod`` tests a token pair's groups as a bit of the query group's
words (:class:`PairSets`), or looks up the query group's runs of key groups
(:class:`GroupTables`), read through per-token group ids, so no ``[n, n]``
tensor exists anywhere and no table grows with the groups squared.

>>> import patternc
>>> from patternc.nn.schedule import schedule_for
>>> plan = patternc.compile("groups a q\\na, q -> a").patterns["default"]
>>> tables = FlexTables.build(schedule_for(plan.token_specs({"a": 256, "q": 512}), plan), {}, "cpu")
>>> tables.block_mask().shape
(1, 1, 768, 768)
"""

from __future__ import annotations

import copy
import functools
import itertools
import math
import operator
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from patternc.lower.blocks import BLOCK_SIZE, BandTest, PairRuns, allowed_rects, group_segments, pair_runs
from patternc.lower.intervals import query_runs_of_runs
from patternc.lower.layout import Layout
from patternc.nn.flexblocks import block_work, dense_cells, host_columns, host_int64
from patternc.nn.flexintervals import interval_mask_mod, interval_tables
from patternc.nn.tables import table

if TYPE_CHECKING:
    from torch.nn.attention.flex_attention import BlockMask

__all__ = [
    "BLOCK_SIZE",
    "FlexTables",
    "bucket_length",
    "group_segments",
    "values_cross_groups",
    "with_mask_mod",
]

INT32_BOUND = 1 << 30
"""An open side of a band in int32 tables: past any position difference."""

MaskMod = Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]
ScoreMod = Callable[[Tensor, Tensor, Tensor, Tensor, Tensor], Tensor]


def with_mask_mod(mask: BlockMask, mask_mod: MaskMod) -> BlockMask:
    """``mask`` with another ``mask_mod``, sharing its block lists (no device work)."""
    out = copy.copy(mask)
    out.mask_mod = mask_mod
    return out


def bucket_length(n: int, block: int = BLOCK_SIZE) -> int:
    """Pad lengths to few distinct values so changing sizes do not recompile the
    kernel each time: whole blocks, then steps of a quarter octave above 8 blocks
    (at most a quarter more tokens, just past a power of two; padded blocks are
    empty: they cost no compute, only the copy that pads Q, K and V)."""
    blocks = max(1, math.ceil(n / block))
    if blocks > 8:
        octave = 2 ** (blocks.bit_length() - 1)
        step = octave // 4
        blocks = math.ceil(blocks / step) * step
    return blocks * block


def _intervals(
    layout: Layout,
    pairs: PairRuns,
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
    runs = query_runs_of_runs(queries, keys, pairs)
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
    the group, expanded on the device from one row per segment (padding
    included). Both int32, as the kernel's own indices are: the ``mask_mod``
    computes in their type, and int64 division on a GPU (a neighbourhood's
    coordinates, a dilation) is emulated, several times slower per score."""
    group = torch.repeat_interleave(ids.int(), sizes, output_size=length)
    if not positions:
        return group, None
    first = torch.repeat_interleave(starts.int(), sizes, output_size=length)
    return group, torch.arange(length, dtype=torch.int32, device=ids.device) - first


class _Upload:
    """Gathers small integer arrays on the host and moves them to the device
    in one copy (a handful of tensor operations instead of dozens)."""

    def __init__(self, traced: bool) -> None:
        """Args:
        traced: the tables are built in a ``torch.compile`` graph (see :meth:`send`).
        """
        self._traced = traced
        self._pieces: list[Tensor] = []

    def add(self, values: list[int] | Tensor) -> None:
        """One array: a host list, or a 1-D int64 CPU tensor."""
        self._pieces.append(values if isinstance(values, Tensor) else host_int64(values, self._traced))

    def send(self, device: torch.device) -> tuple[Tensor, ...]:
        """One host-to-device copy; on a GPU from pinned memory and
        asynchronous, so the host does not wait for queued kernels to
        finish. Traced by ``torch.compile`` (a user's compiled model
        building the tables in its graph), the values are the graph's
        constants: Dynamo cannot trace pinning."""
        lengths = [piece.shape[0] for piece in self._pieces]
        flat = torch.cat(self._pieces) if self._pieces else torch.zeros(0, dtype=torch.int64)
        if device.type == "cuda" and not self._traced:
            flat = flat.pin_memory().to(device, non_blocking=True)
        elif device.type != "cpu":
            flat = flat.to(device)
        return torch.split(flat, lengths)


def _with_padding(
    segments: list[tuple[int, int, int]], length: int, pad_group: int
) -> list[tuple[int, int, int]]:
    real = segments[-1][2] if segments else 0
    return [*segments, (pad_group, real, length)] if real < length else list(segments)


def _same_offsets(
    queries: list[tuple[int, int, int]],
    keys: list[tuple[int, int, int]],
    modified: Sequence[Sequence[int]],
) -> bool:
    """Whether each modified pair's query group and key group start at the
    same token index (see :attr:`FlexTables.same_offsets`); pairs with an
    empty side hold no scores. ``modified``: ``(query group, first key
    group, key group stop)`` runs of pairs with modifiers (two key groups
    with tokens in one run start at different indices: one of them differs,
    so the scan ends there)."""
    q_start = {gid: start for gid, start, _ in queries}
    k_start: dict[int, int] = {}
    for gid, start, _ in keys:
        if gid in k_start:  # a group's keys in two places: positions are not token offsets
            return False
        k_start[gid] = start
    for q, first, stop in modified:
        if q not in q_start:
            continue
        for k in range(first, stop):
            if k in k_start and k_start[k] != q_start[q]:
                return False
    return True


WORD_BITS = 64
"""Key groups per word of :class:`PairSets`."""

MAX_WORDS = 8
"""The most words per query token the ``mask_mod`` tests (512 groups):
past that it reads the run tables (:class:`GroupTables`)."""


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
    """Device tables of a layout's group pairs, from its
    :class:`~patternc.lower.blocks.PairRuns` (see
    :func:`_build_group_tables`): linear in the groups and the runs."""

    runs: Tensor
    """``[3, R]`` int64: each run's query group, first key group and key
    group stop (the value guard reads them)."""
    row_start: Tensor
    """``[G + 2]`` int32: the runs of query group ``g`` are
    ``[row_start[g], row_start[g + 1])`` (group ``G``: the padding, none)."""
    run_keys: Tensor
    """``[2, R + pad]`` int32: first key group and key group stop per run,
    then empty runs (a search step past a row's last run reads one)."""
    run_bands: Tensor
    """``[4, R + pad]`` int32: ``low``, ``high``, ``dilation`` and
    ``residue`` of each run's band (positions within groups)."""
    max_runs: int
    """The most runs one query group has (how many search steps a lookup takes)."""
    modified: Tensor
    """``[3, M]`` int64, on the host: query group, first key group and key
    group stop of the runs with modifiers."""
    sets: PairSets | None
    """What the ``mask_mod`` tests (:class:`PairSets`); None where it reads
    the run tables instead, or compares key indices with intervals."""
    tests: tuple[BandTest, ...] = ()
    """The layout's distinct modifier lists (those of pairs with modifiers)."""
    run_tests: Tensor | None = None
    """``[R + pad]`` int64: each run's index into ``tests`` (-1: none), where
    some test is a neighbourhood (its pairs are told apart by it); else None."""


def _group_tables(layout: Layout, runs: PairRuns, device: torch.device, sets: bool) -> GroupTables:
    """:func:`_build_group_tables`, kept in the layout's tables per device;
    ``runs``: the layout's :func:`~patternc.lower.blocks.pair_runs`;
    ``sets``: with the :class:`PairSets` (a ``mask_mod`` that compares key
    indices with per-query intervals tests no group pairs)."""
    build = functools.partial(_build_group_tables, layout, runs, device, sets)
    return table(layout, ("flex groups", device, sets), build)


def _signed(bits: int) -> int:
    """A 64-bit pattern as the int64 that holds it."""
    return bits - (1 << WORD_BITS) if bits >= 1 << (WORD_BITS - 1) else bits


def _pair_sets(n_groups: int, runs: PairRuns, same_group: bool, traced: bool) -> PairSets | None:
    """The layout's allowed and modified pairs as :class:`PairSets`, or None
    where a set to test needs more than :data:`MAX_WORDS` words (then the
    ``mask_mod`` reads the run tables). CPU tensors out (the caller moves
    them): under ``torch.compile`` every value here is a constant."""
    size = n_groups + 1  # with the padding group, in no set
    n_words = -(-size // WORD_BITS)
    n_runs = runs.count
    members: list[list[int]] = [[] for _ in runs.tests]
    for at, test in enumerate(runs.test):
        if test >= 0:
            members[test].append(at)
    # a set needs no test where it holds every allowed pair (every run)
    tested = [len(m) != n_runs for m in members] + ([] if same_group else [n_runs > 0])
    if any(tested) and n_words > MAX_WORDS:
        return None
    # bit j of a word is 1 << j as an int64: a sum of distinct bits is their OR
    weights = torch.tensor([_signed(1 << j) for j in range(WORD_BITS)], dtype=torch.int64)
    q_ids, k_starts = host_int64(runs.query, traced), host_int64(runs.key_start, traced)
    k_stops = host_int64(runs.key_stop, traced)

    def words(chosen: list[int] | None) -> Tensor:
        """``[n_words, size]``: each query group's bits of the key groups of
        the chosen runs (None: all of them), from a difference array per query group."""
        q, lo, hi = q_ids, k_starts, k_stops
        if chosen is not None:
            index = torch.tensor(chosen, dtype=torch.int64)
            q, lo, hi = q[index], lo[index], hi[index]
        diff = torch.zeros(size, n_words * WORD_BITS + 1, dtype=torch.int64)
        ones = torch.ones_like(q)
        diff.index_put_((q, lo), ones, accumulate=True)
        diff.index_put_((q, hi), -ones, accumulate=True)
        bits = (diff.cumsum(1)[:, :-1] > 0).to(torch.int64)
        return (bits.view(size, n_words, WORD_BITS) * weights).sum(-1).t().contiguous()

    tests = runs.tests
    ordered = sorted(range(len(tests)), key=lambda i: repr(tests[i]))
    return PairSets(
        n_words=n_words,
        same_group=same_group,
        allowed=None if same_group else words(None),
        bands=tuple((tests[i], words(members[i]) if len(members[i]) != n_runs else None) for i in ordered),
        key_bits=torch.tensor([_signed(1 << (g % WORD_BITS)) for g in range(size)]),
    )


def _search_steps(max_runs: int) -> list[int]:
    """Powers of two, largest first, that reach any of ``max_runs`` runs from the first."""
    return [1 << j for j in reversed(range(max(0, max_runs - 1).bit_length()))]


def _build_group_tables(layout: Layout, runs: PairRuns, device: torch.device, with_sets: bool) -> GroupTables:
    """Device tables of a layout's allowed group pairs, from its
    :class:`~patternc.lower.blocks.PairRuns`: the runs by query group
    (compressed rows: a lookup is a short binary search within the query
    group's runs), each run's band (``low``, ``high``, ``dilation``,
    ``residue`` on positions within groups, see
    :func:`~patternc.modifiers.pair_band`), and the pair sets the
    ``mask_mod`` tests (:class:`PairSets`). Linear in the groups and the
    runs: no ``[groups, groups]`` table."""
    n = len(layout.all_groups)
    same_group = runs.same_group(layout)
    counts = [0] * (n + 1)
    for q in runs.query:
        counts[q] += 1
    max_runs = max(counts, default=0)
    pad = max(1, max_runs)  # empty runs after the last: a search step may land there
    row_start = torch.tensor(list(itertools.accumulate(counts, initial=0)), dtype=torch.int32)
    run_keys = torch.tensor([runs.key_start + [0] * pad, runs.key_stop + [0] * pad], dtype=torch.int32)
    bands = [runs.low, runs.high, runs.dilation, runs.residue]
    traced = layout.tables.traced
    # int32 like the token tables (see _token_tables): an open side clamped
    # to a bound past any position difference
    run_bands = (
        torch.stack([host_int64(column + [fill] * pad, traced) for column, fill in zip(bands, (0, 0, 1, 0))])
        .clamp(-INT32_BOUND, INT32_BOUND)
        .int()
    )
    triples = host_columns((runs.query, runs.key_start, runs.key_stop), traced)
    chosen = [at for at, test in enumerate(runs.test) if test >= 0]
    modified = triples[:, torch.tensor(chosen, dtype=torch.int64)] if len(chosen) < runs.count else triples
    sets = _pair_sets(n, runs, same_group, traced) if with_sets else None
    if sets is not None and device.type != "cpu":
        sets = PairSets(
            n_words=sets.n_words,
            same_group=sets.same_group,
            allowed=None if sets.allowed is None else sets.allowed.to(device),
            bands=tuple((test, None if w is None else w.to(device)) for test, w in sets.bands),
            key_bits=sets.key_bits.to(device),
        )
    run_tests = None
    if any(test[4] is not None for test in runs.tests):
        run_tests = host_int64(runs.test + [-1] * pad, traced).to(device)
    return GroupTables(
        runs=triples.to(device),
        row_start=row_start.to(device),
        run_keys=run_keys.to(device),
        run_bands=run_bands.to(device),
        max_runs=max_runs,
        modified=modified,
        sets=sets,
        tests=runs.tests,
        run_tests=run_tests,
    )


@dataclass(frozen=True)
class FlexTables:
    """Device tables of one layout: what the ``mask_mod`` reads and the
    block classes. Every table is linear in the groups, the allowed group
    runs and the non-empty blocks (:attr:`partial` and :attr:`full` are
    dense views made on demand where the classes are held sparse)."""

    q_len: int
    kv_len: int
    n_queries: int
    q_group: Tensor
    kv_group: Tensor
    q_pos: Tensor | None
    kv_pos: Tensor | None
    groups: GroupTables
    """The allowed group pairs, as runs (see :class:`GroupTables`)."""
    has_modifiers: bool
    partial_blocks: Tensor
    """The partial blocks: ``[rows, cols]`` bool, or the ascending flat
    indices (``row * cols + col``) of the partial blocks (see
    :data:`~patternc.nn.flexblocks.DENSE_CELLS_PER_BLOCK`)."""
    full_blocks: Tensor
    """The full blocks, held as :attr:`partial_blocks` is."""
    block_shape: tuple[int, int]
    """``(query blocks, key blocks)``."""
    key_segments: Tensor
    """``[3, S]`` int64: group, start and stop of each key segment (padding
    included): what the value guard counts non-finite keys per group by."""
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
    reads the run tables, or compares key indices with :attr:`intervals`)."""
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
    blocks_hold_one_pair: bool = False
    """Whether every block holds tokens of one query group and one key group
    (padding aside): a block is then listed only where its pair is allowed,
    so the ``mask_mod`` need not test the pair; it tests the modifiers, and
    the key count where the last block holds padded keys. Where the
    modifiers' tests are the whole mask (one image under a neighbourhood),
    this leaves the hand-written ``mask_mod``'s arithmetic and nothing else."""
    n_keys: int = 0
    """The real keys (the padding starts here)."""
    token_offsets: tuple[int, int] | None = None
    """``(q_start, kv_start)`` where the queries are one segment of one group
    and so are the keys (padding aside: one image, one video): a token's
    position within its group is then its index minus the start, which the
    ``mask_mod`` computes instead of reading the position tables (two loads
    per score fewer; a neighbourhood's coordinates come from the kernel's
    own indices, as a hand-written ``mask_mod``'s do)."""

    @property
    def partial(self) -> Tensor:
        """``[rows, cols]`` bool: the partial blocks (the ``mask_mod`` runs there)."""
        return dense_cells(self.partial_blocks, self.block_shape)

    @property
    def full(self) -> Tensor:
        """``[rows, cols]`` bool: the full blocks (every pair allowed)."""
        return dense_cells(self.full_blocks, self.block_shape)

    @property
    def allowed(self) -> Tensor:
        """``[G + 1, G + 1]`` bool: group ``q`` reads group ``k`` (the last row
        and column: padding, allowed nowhere). Quadratic in the groups, so
        made on each access and never by the executors: for tests and
        pictures."""
        query, first, stop = self.groups.runs
        size = self.groups.row_start.shape[0] - 1
        diff = torch.zeros(size, size + 1, dtype=torch.int64, device=query.device)
        ones = torch.ones_like(query)
        diff.index_put_((query, first), ones, accumulate=True)
        diff.index_put_((query, stop), -ones, accumulate=True)
        return diff.cumsum(1)[:, :size] > 0

    @property
    def guard_tables(self) -> tuple[Tensor, ...]:
        """What the value guard reads (``q_group``, the key segments' group,
        start and stop, the runs' query group, first key group and key group
        stop, and the run rows' starts, which size the groups): linear in the
        tokens, segments and runs."""
        return (self.q_group, *self.key_segments, *self.groups.runs, self.groups.row_start)

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

        runs = pair_runs(layout)
        intervals = _intervals(layout, runs, queries, keys, q_len, device, compact)
        groups = _group_tables(layout, runs, device, sets=intervals is None)
        q_segs, k_segs = _with_padding(queries, q_len, pad), _with_padding(keys, kv_len, pad)
        shape = (q_len // block, kv_len // block)
        rects = allowed_rects(layout, cache_lengths, compact, block)
        traced = layout.tables.traced
        work = block_work(rects, block, shape, traced)

        # The host works on one row per group, segment or rectangle; a single copy moves it all.
        upload = _Upload(traced)
        for segs in (q_segs, k_segs):
            upload.add([g for g, _, _ in segs])
            upload.add([stop - start for _, start, stop in segs])
            upload.add([start for _, start, _ in segs])
        for piece in work.pieces:
            upload.add(piece)
        # under `across` with compact keys, a key's place in the input is not
        # its index: one shift per key segment (cached keys are never `across`)
        across = any(test[3] for test in groups.tests)
        offsets = [s.offset for s in layout.slots]
        shifts = [offsets[g] - start if g < n_groups else 0 for g, start, _ in k_segs]
        upload.add(shifts if compact and across else [])
        q_ids, q_sizes, q_starts, k_ids, k_sizes, k_starts, *block_pieces, k_shifts = upload.send(device)
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
            kv_input = torch.arange(kv_len, dtype=torch.int32, device=device) + torch.repeat_interleave(
                k_shifts.int(), k_sizes, output_size=kv_len
            )
        partial, full = work.classify(tuple(block_pieces))
        mixed = _blocks_mix_groups(queries, block) or _blocks_mix_groups(
            keys, block
        )  # some block holds two groups
        return FlexTables(
            q_len=q_len,
            kv_len=kv_len,
            n_queries=n_q,
            q_group=q_group,
            kv_group=kv_group,
            q_pos=q_pos,
            kv_pos=kv_pos,
            groups=groups,
            has_modifiers=has_modifiers,
            partial_blocks=partial,
            full_blocks=full,
            block_shape=shape,
            key_segments=torch.stack([k_ids, k_starts, k_starts + k_sizes]),
            needs_value_guard=has_modifiers or mixed,
            pair_sets=groups.sets,
            same_offsets=_same_offsets(queries, keys, groups.modified.t().tolist()),
            dilated=any(test[2] > 1 for test in groups.tests),
            kv_input=kv_input,
            intervals=intervals,
            blocks_hold_one_pair=not mixed,
            n_keys=max([stop for _, _, stop in keys] or [0]),
            token_offsets=(queries[0][1], keys[0][1]) if len(queries) == len(keys) == 1 else None,
        )

    def mask_mod(
        self, key_padding_mask: Tensor | None = None, lookups: bool = False, within_blocks: bool = False
    ) -> MaskMod:
        """``mask_mod(b, h, q_idx, kv_idx)``: whether the tokens' groups pair,
        then the pair's modifiers on positions within groups, then key padding.

        The kernel evaluates it on every score of a partial block, so it
        looks up per query token and per key token only: a group pair is
        tested as a bit of the query group's words (:class:`PairSets`), not
        read from a ``[groups, groups]`` table at each score: table reads
        per score made the forward kernel several times slower than the same
        blocks with a hand-written ``mask_mod`` (figures in
        ``docs/performance.md``). ``lookups``: read the tables (FLASH's mask
        code, and layouts past :data:`MAX_WORDS`). ``within_blocks``: exact
        only inside the listed blocks, where :attr:`blocks_hold_one_pair`
        lets it skip the pair test: for a kernel that skips unlisted blocks
        (FlexAttention compiled, on a GPU or a CPU; eager FlexAttention and
        ``create_block_mask`` evaluate it everywhere)."""
        sets = self.pair_sets
        if lookups:
            mask = self._table_mask_mod()
        elif self.intervals is not None:
            mask = interval_mask_mod(self.intervals)
        else:
            mask = self._table_mask_mod() if sets is None else self._bits_mask_mod(sets, within_blocks)
        if key_padding_mask is None:
            return mask
        padding = key_padding_mask
        inner = mask

        def with_padding(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
            return inner(b, h, q_idx, kv_idx) & padding[b, kv_idx]

        return with_padding

    def _table_mask_mod(self) -> MaskMod:
        """Group pairs and modifiers read from the run tables
        (:class:`GroupTables`): the query group's run that could hold the key
        group, found by a binary search of a few steps (none where each
        query group has one run), then its band."""
        q_group, kv_group = self.q_group, self.kv_group
        groups = self.groups
        row_start, (key_start, key_stop) = groups.row_start, groups.run_keys
        steps = _search_steps(groups.max_runs)

        def run_of(gq: Tensor, gk: Tensor) -> tuple[Tensor, Tensor]:
            """The index of ``gq``'s last run starting at or before ``gk``, and whether it holds ``gk``."""
            at, stop = row_start[gq], row_start[gq + 1]
            for step in steps:
                ahead = at + step
                at = torch.where((ahead < stop) & (key_start[ahead] <= gk), ahead, at)
            return at, (at < stop) & (key_start[at] <= gk) & (gk < key_stop[at])

        def groups_only(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
            return run_of(q_group[q_idx], kv_group[kv_idx])[1]

        if not self.has_modifiers:
            return groups_only
        q_pos, kv_pos, dilated = self.q_pos, self.kv_pos, self.dilated
        low, high, dilation, residue = groups.run_bands
        assert q_pos is not None and kv_pos is not None

        run_tests = groups.run_tests
        grids = [(i, test[4]) for i, test in enumerate(groups.tests) if test[4] is not None]

        def with_modifiers(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
            at, ok = run_of(q_group[q_idx], kv_group[kv_idx])
            d = kv_pos[kv_idx] - q_pos[q_idx]  # the band is in positions within groups
            inside: Tensor = ok & (d >= low[at]) & (d <= high[at])
            if dilated:
                inside = inside & ((d - residue[at]) % dilation[at] == 0)
            if run_tests is not None:  # a neighbourhood's band is open: its coordinates decide
                test = run_tests[at]
                for i, grid in grids:
                    inside = inside & ((test != i) | grid.allows(q_pos[q_idx], kv_pos[kv_idx]))
            return inside

        return with_modifiers

    def _bits_mask_mod(self, sets: PairSets, within_blocks: bool) -> MaskMod:
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

        token_offsets = self.token_offsets

        def positions(q_idx: Tensor, kv_idx: Tensor) -> tuple[Tensor, Tensor]:
            """The query's and the key's positions within their groups."""
            if token_offsets is not None:  # one segment a side: index minus its start
                q_start, kv_start = token_offsets
                return q_idx - q_start if q_start else q_idx, kv_idx - kv_start if kv_start else kv_idx
            assert q_pos is not None and kv_pos is not None
            return q_pos[q_idx], kv_pos[kv_idx]

        def offset(q_idx: Tensor, kv_idx: Tensor, across: bool) -> Tensor:
            """A key's position minus a query's: within their groups, or
            ``across``, in the input (queries index the input as they are)."""
            if across:
                return (kv_idx if kv_input is None else kv_input[kv_idx]) - q_idx
            if same_offsets:
                return kv_idx - q_idx
            q_at, kv_at = positions(q_idx, kv_idx)
            return kv_at - q_at

        # the key's bit is a second lookup: only where some set is tested
        needs_bits = sets.allowed is not None or any(words is not None for _, words in sets.bands)

        one_pair, n_keys, kv_len = within_blocks and self.blocks_hold_one_pair, self.n_keys, self.kv_len

        def bits_mask(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
            gq, gk = q_group[q_idx], kv_group[kv_idx]
            bit = key_bits[gk] if needs_bits else gk  # gk: never read as a bit
            ok: Tensor | None
            if one_pair:  # the block mask lists allowed pairs only: padding is the test left
                ok = kv_idx < n_keys if n_keys < kv_len else None
            elif sets.allowed is None:  # each group reads itself (and padding nothing)
                ok = (gq == gk) & (gk != pad)
            else:
                ok = member(sets.allowed, gq, gk, bit)
            for (low, high, dilation, across, grid), words in sets.bands:
                if grid is not None:  # coordinates on the shape, by div/mod of positions within the group
                    inside = grid.allows(*positions(q_idx, kv_idx))
                else:
                    d = offset(q_idx, kv_idx, across)
                    # a modifier list bounds a side or dilates: at least one term
                    terms = [d >= low] if low is not None else []
                    terms += [d <= high] if high is not None else []
                    terms += [d % dilation == 0] if dilation > 1 else []
                    inside = functools.reduce(operator.and_, terms)
                test = inside if words is None else ~member(words, gq, gk, bit) | inside
                ok = test if ok is None else ok & test
            return kv_idx >= 0 if ok is None else ok  # None: every listed block is whole

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
        total = self.block_shape[0] * self.block_shape[1]
        if not total:
            return 0.0
        if self.partial_blocks.dim() == 2:
            return 1.0 - float((self.partial_blocks | self.full_blocks).sum()) / total
        return 1.0 - (self.partial_blocks.numel() + self.full_blocks.numel()) / total


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
