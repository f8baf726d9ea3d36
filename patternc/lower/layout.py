"""Layouts: a plan at concrete group sizes, in tensor-index terms.

:func:`build_layout` is the last stage of the compiler. It places every
group in the input (offsets), turns each :class:`~patternc.ir.AttentionCall`
into one :class:`Call` (its query and key segments, per-segment modifiers,
shapes, exact allowed-pair count), stacks calls of equal shape into launches,
and records how call outputs go back into input order. Every executor reads
these records as they are; nothing downstream re-derives them from the plan.
Layouts are built once per (plan, sizes) and kept in the one layout cache
(:data:`patternc.plan.LAYOUTS`); each owns the slot where the runtime keeps
what it derives from the layout (:class:`~patternc.lower.tables.Tables`).

Everything here is linear in the number of groups and calls: a layout of
10,000 packed documents holds one record per document, never a table of
every pair of groups. A member relation's keys are slices of one run of
members (:class:`~patternc.ir.Keys`), read slice by slice: a block-causal
family of ``M`` frames costs ``M`` calls of O(1) work each, not one step per
(query, key) group pair. What still goes key group by key group: a slice
that is not one input range (its members interleave with another family's,
or one is read from a KV cache) and the allowed-pair count of a slice under
token modifiers (``frame*[upto, causal]``).
"""

from __future__ import annotations

import bisect
import dataclasses
import itertools
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, Union

from patternc.diagnostics import Code, Diagnostic, PatternError, count_tokens, suggest
from patternc.ir import AttentionCall, KeyGroup, KeyRun, Keys
from patternc.lower.tables import Tables
from patternc.modifiers import NO_MODIFIERS, UNBOUNDED, Band, Modifiers, allowed_pairs, band_allows, pair_band
from patternc.schemas import TokenSpec

__all__ = [
    "Access",
    "BatchedLaunches",
    "BoundPlan",
    "Call",
    "GroupPairs",
    "GroupSlot",
    "KeySpace",
    "Layout",
    "PeriodicLaunch",
    "Segment",
    "ShardSizes",
    "Sizes",
    "build_layout",
    "normalize_sizes",
]

Sizes = Union[Mapping[str, Union[int, None]], Sequence[TokenSpec]]
"""Group sizes: ``{"surface_anchors": 1024, ...}`` or a list of ``TokenSpec``.
A size of ``None`` marks a group whose keys/values come from a KV cache."""


class ShardSizes(dict[str, Union[int, None]]):
    """The sizes of one rank's shards under context parallelism
    (``ContextParallel.local_sizes``): a group declared with a shape may hold
    part of it here, its coordinates coming from global positions, so a
    layout at these sizes is not refused for that (E409)."""


class BoundPlan(Protocol):
    """What a layout is built from: a plan whose families are bound to
    run-time groups (:class:`patternc.Plan` is one)."""

    @property
    def name(self) -> str: ...

    @property
    def groups(self) -> tuple[str, ...]: ...

    @property
    def calls(self) -> tuple[AttentionCall, ...]: ...


Access = Literal["view", "gather", "empty"]
"""How a call reads its tokens: one contiguous slice (``view``, no copy),
several slices copied together (``gather``), or no tokens at all."""


@dataclass(frozen=True, slots=True)
class GroupSlot:
    """Where a group sits: ``offset`` into the input (or into the cache when
    ``size`` is None, in which case ``offset`` is -1)."""

    name: str
    offset: int
    size: int | None

    @property
    def cached(self) -> bool:
        return self.size is None


@dataclass(frozen=True, slots=True)
class Segment:
    """Tokens ``[start, stop)`` of the input (``cached`` None) or of a cached
    group, and the modifiers of the call's queries with these keys (query
    segments carry none)."""

    start: int
    stop: int
    cached: str | None = None
    modifiers: Modifiers = NO_MODIFIERS

    @property
    def length(self) -> int:
        return self.stop - self.start


@dataclass(frozen=True, slots=True)
class Call:
    """One attention call at concrete sizes: the record every executor reads.

    Counts cover input tokens; cached groups add their cache length at run time.
    """

    index: int
    attention: AttentionCall
    """What the call computes, at group level (from the plan)."""
    query_tokens: tuple[str, ...]
    """Input query groups (cached groups never query)."""
    queries: tuple[Segment, ...]
    keys: tuple[Segment, ...]
    """Key segments: contiguous input runs of equal modifiers, then cached groups."""
    n_queries: int
    n_keys: int
    query_access: Access
    key_access: Access
    allowed_entries: int
    """Exactly how many (query, key) input pairs the call allows (modifiers counted)."""
    single_groups: bool
    """One query group and one key group: positions within groups are plain
    ``arange``s, so ``[causal]`` is SDPA's ``is_causal``."""

    @property
    def key_value_tokens(self) -> tuple[str, ...]:
        return self.attention.key_names

    @property
    def modifiers(self) -> Modifiers | None:
        """The modifiers all key groups share, or None when they differ."""
        return self.attention.uniform_modifiers

    @property
    def has_modifiers(self) -> bool:
        return self.attention.has_modifiers

    @property
    def is_causal(self) -> bool:
        """Plain ``[causal]`` between one query group and one key group."""
        return self.single_groups and self.modifiers == Modifiers(causal=True)

    @property
    def score_entries(self) -> int:
        return self.n_queries * self.n_keys


PieceRanges = Mapping[tuple[int, int], tuple[int, int]]


@dataclass(frozen=True, slots=True)
class PeriodicLaunch:
    """A stacked launch whose ``count`` calls repeat with a period: call ``i``
    reads queries ``[q_start, q_start + q_length)`` and keys
    ``[k_start, k_start + k_length)`` of period ``i`` (``period`` tokens from
    ``i * period``), and the periods tile the input (two equal branches, say).

    Such a launch reads Q, K and V as views (``[B * count, period, ...]``,
    narrowed) with no copy and no per-call work: the hot path of multi-branch
    models, where host time per call is what the launch costs at 10k tokens."""

    count: int
    period: int
    q_start: int
    q_length: int
    k_start: int
    k_length: int
    is_causal: bool


@dataclass(frozen=True, slots=True)
class KeySpace:
    """The input tokens some call reads as keys, laid end to end in input
    order: the key/value groups' tokens. A layer may project K and V for
    these tokens only (``[B, size, H, D]``) and hand them over so
    (``AttentionInputs.keys_compact``): AB-UPT's queries are never keys,
    so half the K/V projection and joint anchors' K/V gather go away.

    Every input key segment lies inside the key space, so it maps to one
    range there; the records below are the layout's key-side records
    translated once, so an executor reads them without host work."""

    ranges: tuple[tuple[int, int], ...]
    """Input token ranges ``(start, stop)`` that are keys, adjacent ones merged."""
    n_tokens: int
    """Input tokens (the token space's length)."""
    split_sizes: tuple[int, ...]
    """Sizes cutting the token space into alternating runs of non-keys and
    keys (first and last may be keys), covering every token."""
    kept: tuple[int, ...]
    """Indices of ``split_sizes`` that are keys."""
    piece_sizes: tuple[int, ...]
    """The layout's ``key_pieces`` sizes in key space: a piece of non-keys
    has size 0, so piece indices and ranges are those of the token space."""
    periodic: tuple[tuple[int, int] | None, ...]
    """Per launch with a :class:`PeriodicLaunch`: ``(key period, key start
    in the period)`` when its keys repeat with a period in key space too,
    else None (the launch then stacks its keys like any other)."""
    whole_call_keys: tuple[tuple[int, int], ...] | None
    """The layout's ``whole_call_keys`` in key space."""
    range_offsets: tuple[int, ...] = ()
    """Where each of ``ranges`` starts in key space (so :meth:`position` is a
    binary search, not a scan: layouts of many documents ask it per call)."""
    size: int = 0
    """Tokens in the key space."""

    @property
    def identity(self) -> bool:
        """Every input token is a key: key space and token space coincide."""
        return self.size == self.n_tokens

    def _range_of(self, token: int) -> int:
        """Index of the last key range starting at or before ``token`` (-1:
        none). A binary search in plain Python, not ``bisect``: executors
        ask it inside ``torch.compile`` traces, and Dynamo cannot trace the
        C function."""
        ranges, lo, hi = self.ranges, 0, len(self.ranges)
        while lo < hi:
            mid = (lo + hi) // 2
            if ranges[mid][0] <= token:
                lo = mid + 1
            else:
                hi = mid
        return lo - 1

    def holds(self, start: int, stop: int) -> bool:
        """Whether input tokens ``[start, stop)`` are all keys."""
        i = self._range_of(start)
        return i >= 0 and stop <= self.ranges[i][1]

    def position(self, token: int) -> int:
        """Where input token ``token`` (a key, or the stop of a key range) sits in key space."""
        i = self._range_of(token)
        if i >= 0 and token <= self.ranges[i][1]:
            return self.range_offsets[i] + token - self.ranges[i][0]
        raise ValueError(f"token {token} is not a key of this layout")


@dataclass(frozen=True, slots=True)
class BatchedLaunches:
    """The shapes of a layout's launches that let ``batched`` read Q, K and V
    as views and skip per-call work: one record, so the layout's other
    fields are what every executor reads."""

    direct_launches: tuple[tuple[int, int, bool] | None, ...]
    """Per launch: ``(query piece, key piece, is_causal)`` when it is one call
    reading one piece of queries and one of keys with no modifier but a plain
    ``[causal]`` (documents, anchors: SDPA on the pieces as they are), else None."""
    tiled_output: bool
    """One stacked launch whose calls' queries tile the input in launch order:
    its ``[B * n, L, ...]`` output already is the input order."""
    periodic_launches: tuple[PeriodicLaunch | None, ...]
    """Per launch: its :class:`PeriodicLaunch` when it is one (at least two
    calls, each one query and one input key segment, no modifier but a plain
    ``[causal]``), else None."""
    whole_call_keys: tuple[tuple[int, int], ...] | None
    """When the layout is one call whose queries are the whole input in order,
    reading input keys only, with no modifier but a plain ``[causal]`` (joint
    anchors, dense, one causal sequence): the token ranges ``(start, stop)``
    its keys are, in order, adjacent ranges merged; else None."""
    whole_call_is_causal: bool
    """That call's plain ``[causal]`` (False when there is no such call)."""


@dataclass(frozen=True, slots=True, eq=False)
class Layout:
    """A plan laid out for concrete sizes: everything an executor needs, as integers.

    Compared and hashed by identity: layouts are built once per (plan, sizes)
    and looked up, never compared field by field."""

    plan_name: str
    slots: tuple[GroupSlot, ...]
    calls: tuple[Call, ...]
    launches: tuple[tuple[int, ...], ...]
    """Calls of equal shape and modifier kind; each tuple is one stacked launch."""
    n_tokens: int
    """Tokens in the input tensor (cached groups excluded)."""
    output_order: tuple[tuple[int, int], ...]
    """``(call, piece)`` in input order: piece ``i`` of a call's output split at its query segments."""
    input_groups: tuple[str, ...]
    """Groups in ``x``, in input order (empty ones included)."""
    group_ids: tuple[int, ...]
    """Index into ``all_groups`` of every input group, in input order."""
    all_groups: tuple[str, ...]
    input_sizes: tuple[int, ...]
    cached_groups: tuple[str, ...]
    """Cached groups some call reads, in group order."""
    key_value_groups: tuple[str, ...]
    """Input groups other patterns can reuse from a KV cache (groups used as keys/values)."""
    key_value_indices: tuple[int, ...]
    """Input-order index of each of ``key_value_groups``."""
    pairs: Mapping[tuple[int, int], Modifiers]
    """``{(q, k): modifiers}`` for every group pair a call allows: group ``q``
    attends to group ``k`` (indices into ``all_groups``). A
    :class:`GroupPairs` read from the calls on demand: nothing is held per
    pair, so the record grows with the calls, not with the ``M(M+1)/2``
    pairs of a block-causal family (a lookup reads the query's call only)."""
    has_modifiers: bool
    query_pieces: tuple[tuple[int, ...], PieceRanges]
    """Split sizes along the tokens at every query-segment boundary, and each
    segment's ``(first, stop)`` piece range (see the executors' ``TokenSplit``)."""
    key_pieces: tuple[tuple[int, ...], PieceRanges]
    """The same for input key segments (which may overlap)."""
    sizes: tuple[tuple[str, int | None], ...]
    """``(group, size)`` of every group in the plan's order (None: cached)."""
    batched: BatchedLaunches
    """The launch shapes only the ``batched`` executor reads."""
    key_space: KeySpace
    """The tokens read as keys, and the key-side records in their space."""
    token_specs: tuple[TokenSpec, ...] = ()
    """``TokenSpec`` of every group in the plan's order (what ``MixedAttention`` takes)."""
    off_shape: tuple[Diagnostic, ...] = ()
    """A group a neighbourhood relates whose size is not its shape's (E409):
    refused by ``Plan.layout`` unless the sizes are a rank's
    (:class:`ShardSizes`)."""
    group_types: tuple[str, ...] = ()
    """Token type (weight bank) of every group in the plan's order, when the
    plan names them (untied layers read them here instead of re-binding)."""
    tables: Tables = field(default_factory=lambda: Tables(), init=False, repr=False)
    """What the runtime derives from this layout (device tables, ``auto``'s
    pick), filled by executors on a layout's first calls: the one owner of
    per-layout state (see :mod:`patternc.lower.tables`). A copy made with
    ``dataclasses.replace`` starts with empty tables. (The factory is a
    function: a trace that lays out a plan calls it, and Dynamo (torch 2.13)
    cannot call a class that ``dataclasses`` holds as a factory.)"""

    @property
    def score_entries(self) -> int:
        return sum(c.score_entries for c in self.calls)

    @property
    def allowed_entries(self) -> int:
        """Allowed (query, key) pairs over all calls: what attention computes."""
        return sum(c.allowed_entries for c in self.calls)

    @property
    def dense_entries(self) -> int:
        """Score entries of dense attention: every input token to every token."""
        return self.n_tokens * self.n_tokens

    @property
    def density(self) -> float:
        return self.allowed_entries / self.dense_entries if self.dense_entries else 0.0

    def flops(self, dim: int) -> int:
        """Attention FLOPs (``QK^T`` and ``PV``) at model width ``dim`` on allowed pairs."""
        return 4 * self.allowed_entries * dim

    def slot(self, name: str) -> GroupSlot:
        for s in self.slots:
            if s.name == name:
                return s
        raise KeyError(name)

    def __repr__(self) -> str:
        groups = ", ".join(f"{g}={'cached' if n is None else n}" for g, n in self.sizes[:8])
        more = f", ... {len(self.sizes) - 8} more" if len(self.sizes) > 8 else ""
        return (
            f"Layout({self.plan_name!r}: {groups}{more}; {self.n_tokens} tokens, "
            f"{len(self.calls)} calls in {len(self.launches)} launches, density {self.density:.3f})"
        )

    def dense_mask(self, cache_lengths: Mapping[str, int] | None = None) -> Any:
        """The ``[N, N + cached]`` bool tensor: query token ``i`` may attend to
        key token ``j`` (input tokens, then each cached group's
        ``cache_lengths[group]`` tokens). For looking at a mask and for tests:
        it is quadratic in tokens, which no executor builds.

        >>> import patternc
        >>> plan = patternc.compile("groups a b\\na -> a [causal]\\nb -> a, b").patterns["default"]
        >>> plan.layout({"a": 2, "b": 1}).dense_mask().int().tolist()
        [[1, 0, 0], [1, 1, 0], [1, 1, 1]]

        Raises:
            KeyError: a cached group missing from ``cache_lengths``.
        """
        import torch  # the lowering floor stays torch-free until a mask is asked for

        lengths = dict(cache_lengths or {})
        index = {g: i for i, g in enumerate(self.all_groups)}
        pieces = [(index[s.name], s.offset, s.size or 0) for s in self.slots if s.size]
        key_pieces = list(pieces)
        start = self.n_tokens
        for name in self.cached_groups:
            key_pieces.append((index[name], start, lengths[name]))
            start += lengths[name]
        mask = torch.zeros(self.n_tokens, start, dtype=torch.bool)
        by_group: dict[int, list[tuple[int, int]]] = {}
        for group, offset, size in key_pieces:
            by_group.setdefault(group, []).append((offset, size))
        keys_of: dict[int, list[int]] = {}
        for q, k in self.pairs:
            keys_of.setdefault(q, []).append(k)
        for q, q_offset, q_size in pieces:
            q_pos = torch.arange(q_size)[:, None]
            for k in keys_of.get(q, ()):
                band = self.pair_band(q, k)
                for k_offset, k_size in by_group.get(k, ()):
                    allowed = band_allows(band, q_pos, torch.arange(k_size)[None, :])
                    mask[q_offset : q_offset + q_size, k_offset : k_offset + k_size] |= allowed
        return mask

    def pair_band(self, q: int, k: int) -> Band:
        """The :class:`~patternc.modifiers.Band` group ``q`` reads group
        ``k`` under (indices into ``all_groups``; the pair must be allowed),
        in positions within the groups: under ``across`` the groups'
        offsets shift it."""
        mods = self.pairs[q, k]
        if not mods.across:
            return pair_band(mods)
        return pair_band(mods, self.slots[k].offset - self.slots[q].offset)

    def allows(self, q: int, k: int) -> bool:
        """Whether group ``q`` attends to group ``k`` (indices into ``all_groups``)."""
        return (q, k) in self.pairs

    def pair_columns(self) -> tuple[list[int], list[int], list[int], list[int], list[int], list[int]]:
        """The allowed group pairs as six aligned columns: query group, key
        group, and the ``low``, ``high``, ``dilation`` and ``residue`` of
        each pair's :meth:`pair_band` (an open side is
        :data:`~patternc.modifiers.UNBOUNDED` away). What device tables of
        group pairs are filled from, one scatter each."""
        # one band per distinct modifier list (bound families share them),
        # except under `across`, whose band moves with the groups' offsets
        by_list: dict[int, tuple[int, int, int, int]] = {}
        rows = []
        for (q, k), mods in self.pairs.items():
            row = None if mods.across else by_list.get(id(mods))
            if row is None:
                band = self.pair_band(q, k)
                row = (
                    -UNBOUNDED if band.low is None else band.low,
                    UNBOUNDED if band.high is None else band.high,
                    band.dilation,
                    band.residue,
                )
                if not mods.across:
                    by_list[id(mods)] = row
            rows.append(row)
        queries = [q for q, _ in self.pairs]
        keys = [k for _, k in self.pairs]
        lows = [r[0] for r in rows]
        highs = [r[1] for r in rows]
        dilations = [r[2] for r in rows]
        residues = [r[3] for r in rows]
        return queries, keys, lows, highs, dilations, residues


def normalize_sizes(groups: Sequence[str], sizes: Sizes) -> dict[str, int | None]:
    """Sizes as ``{group: size}`` for exactly the declared groups, or a
    :class:`PatternError` naming unknown and missing groups."""
    if isinstance(sizes, Mapping):
        given: dict[str, int | None] = dict(sizes)
    else:
        given = {spec.name: spec.size for spec in sizes}
    diagnostics = []
    declared = set(groups)
    for name, size in given.items():
        if name not in declared:
            diagnostics.append(
                Diagnostic(
                    Code.SIZE_FOR_UNKNOWN_GROUP,
                    f"size given for unknown group `{name}`",
                    where="sizes",
                    hint=suggest(name, groups) or f"groups are: {', '.join(groups)}",
                )
            )
        elif size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 0):
            diagnostics.append(
                Diagnostic(
                    Code.BAD_SIZE, f"size of `{name}` must be an integer >= 0, got {size!r}", where="sizes"
                )
            )
    missing = [g for g in groups if g not in given]
    if missing:
        diagnostics.append(
            Diagnostic(
                Code.MISSING_SIZE,
                "no size given for " + ", ".join(f"`{g}`" for g in missing),
                where="sizes",
                hint="give every group a size (None for a group read from the KV cache)",
            )
        )
    if diagnostics:
        raise PatternError(diagnostics)
    return {g: given[g] for g in groups}


def _access(names: Sequence[str], slots: Mapping[str, GroupSlot]) -> Access:
    # size None: cached, present; size 0: absent
    present = [slot for slot in map(slots.__getitem__, names) if slot.size != 0]
    if not present:
        return "empty"
    if any(s.size is None for s in present):
        return "view" if len(present) == 1 else "gather"
    present.sort(key=lambda s: s.offset)
    end = present[0].offset
    for slot in present:
        if slot.offset != end:
            return "gather"
        end += slot.size or 0
    return "view"


def _segments(groups: Sequence[tuple[str, Modifiers]], slots: Mapping[str, GroupSlot]) -> tuple[Segment, ...]:
    """Input runs (adjacent groups of equal modifiers merged), then cached groups."""
    inputs: list[tuple[int, int, Modifiers]] = []
    cached = []
    for name, mods in groups:
        slot = slots[name]
        if slot.size is None:
            cached.append(Segment(0, -1, name, mods))  # length known at run time
        elif slot.size:
            inputs.append((slot.offset, slot.offset + slot.size, mods))
    return _merged_segments(inputs, cached)


def _merged_segments(
    inputs: list[tuple[int, int, Modifiers]], cached: Sequence[Segment]
) -> tuple[Segment, ...]:
    """Input ranges ``(start, stop, modifiers)`` sorted, adjacent ones of
    equal modifiers merged (as plain tuples, one Segment per run), then
    ``cached``."""
    inputs.sort(key=lambda s: s[0])
    merged: list[list[Any]] = []
    for start, stop, mods in inputs:
        if merged and merged[-1][1] == start and (merged[-1][2] is mods or merged[-1][2] == mods):
            merged[-1][1] = stop
        else:
            merged.append([start, stop, mods])
    return (*(Segment(a, b, None, m) for a, b, m in merged), *cached)


def _pieces(segments: set[tuple[int, int]], n_tokens: int) -> tuple[tuple[int, ...], PieceRanges]:
    bounds = {0, n_tokens}
    for start, stop in segments:
        bounds.update((start, stop))
    ordered = sorted(bounds)
    index = {b: i for i, b in enumerate(ordered)}
    sizes = tuple(b - a for a, b in itertools.pairwise(ordered))
    return sizes, {(a, b): (index[a], index[b]) for a, b in segments}


def _launch_key(call: Call) -> tuple[object, ...]:
    """Calls stack when their shapes match (cached key groups add their cache
    length at run time, so they must be the same groups) and their modifiers
    need the same treatment: none, SDPA's ``is_causal``, or a per-call mask."""
    cached = tuple(s.cached for s in call.keys if s.cached is not None)
    return (call.n_queries, call.n_keys, cached, call.has_modifiers, call.is_causal)


def _direct_launches(
    calls: Sequence[Call],
    launches: Sequence[tuple[int, ...]],
    query_ranges: PieceRanges,
    key_ranges: PieceRanges,
) -> tuple[tuple[int, int, bool] | None, ...]:
    out: list[tuple[int, int, bool] | None] = []
    for launch in launches:
        call = calls[launch[0]]
        simple = (
            len(launch) == 1
            and len(call.queries) == 1
            and len(call.keys) == 1
            and call.keys[0].cached is None
            and (not call.has_modifiers or call.is_causal)
        )
        if not simple:
            out.append(None)
            continue
        q_first, q_stop = query_ranges[(call.queries[0].start, call.queries[0].stop)]
        k_first, k_stop = key_ranges[(call.keys[0].start, call.keys[0].stop)]
        one_piece = q_stop - q_first == 1 and k_stop - k_first == 1
        out.append((q_first, k_first, call.is_causal) if one_piece else None)
    return tuple(out)


def _periodic_launches(
    calls: Sequence[Call], launches: Sequence[tuple[int, ...]], n_tokens: int
) -> tuple[PeriodicLaunch | None, ...]:
    return tuple(_periodic([calls[i] for i in launch], n_tokens) for launch in launches)


def _periodic(calls: Sequence[Call], n_tokens: int) -> PeriodicLaunch | None:
    count = len(calls)
    if count < 2 or n_tokens % count:
        return None
    first = calls[0]
    if any(len(c.queries) != 1 or len(c.keys) != 1 or c.keys[0].cached is not None for c in calls) or (
        first.has_modifiers and not first.is_causal
    ):
        return None
    period = n_tokens // count
    q, k = first.queries[0], first.keys[0]
    if q.stop > period or k.stop > period:
        return None
    for i, call in enumerate(calls):
        shift = i * period
        if (call.queries[0].start, call.keys[0].start) != (q.start + shift, k.start + shift):
            return None
    return PeriodicLaunch(count, period, q.start, q.length, k.start, k.length, first.is_causal)


def _whole_call_keys(calls: Sequence[Call], n_tokens: int) -> tuple[tuple[int, int], ...] | None:
    present = [c for c in calls if c.n_queries]
    if len(present) != 1:
        return None
    (call,) = present
    whole = len(call.queries) == 1 and (call.queries[0].start, call.queries[0].stop) == (0, n_tokens)
    simple = (not call.has_modifiers or call.is_causal) and call.n_keys > 0
    if not whole or not simple or any(s.cached is not None for s in call.keys):
        return None
    ranges: list[tuple[int, int]] = []
    for segment in call.keys:
        if not segment.length:
            continue
        if ranges and ranges[-1][1] == segment.start:
            ranges[-1] = (ranges[-1][0], segment.stop)
        else:
            ranges.append((segment.start, segment.stop))
    return tuple(ranges)


def _tiled_output(calls: Sequence[Call], launches: Sequence[tuple[int, ...]], n_tokens: int) -> bool:
    if len(launches) != 1 or len(launches[0]) < 2:
        return False
    stacked = [calls[i] for i in launches[0]]
    length = stacked[0].n_queries
    return length * len(stacked) == n_tokens and all(
        len(c.queries) == 1 and c.queries[0].start == i * length and c.queries[0].length == length
        for i, c in enumerate(stacked)
    )


def _merged(ranges: Sequence[tuple[int, int]]) -> tuple[tuple[int, int], ...]:
    out: list[tuple[int, int]] = []
    for start, stop in sorted(r for r in ranges if r[1] > r[0]):
        if out and start <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], stop))
        else:
            out.append((start, stop))
    return tuple(out)


def _key_space(
    key_groups: Sequence[GroupSlot],
    n_tokens: int,
    key_pieces: tuple[tuple[int, ...], PieceRanges],
    calls: Sequence[Call],
    launches: Sequence[tuple[int, ...]],
    periodic_launches: Sequence[PeriodicLaunch | None],
    whole_call_keys: tuple[tuple[int, int], ...] | None,
) -> KeySpace:
    ranges = _merged([(s.offset, s.offset + (s.size or 0)) for s in key_groups])
    split_sizes: list[int] = []
    kept: list[int] = []
    at = 0
    for start, stop in ranges:
        if start > at:
            split_sizes.append(start - at)
        kept.append(len(split_sizes))
        split_sizes.append(stop - start)
        at = stop
    if at < n_tokens:
        split_sizes.append(n_tokens - at)
    inside = set()
    bounds = list(itertools.accumulate(key_pieces[0], initial=0))
    r = 0  # pieces and ranges both ascend: one pass over each
    for i, (a, b) in enumerate(itertools.pairwise(bounds)):
        while r < len(ranges) and ranges[r][1] < b:
            r += 1
        if r < len(ranges) and ranges[r][0] <= a and b <= ranges[r][1]:
            inside.add(i)
    piece_sizes = tuple(n if i in inside else 0 for i, n in enumerate(key_pieces[0]))
    offsets = tuple(itertools.accumulate((b - a for a, b in ranges), initial=0))
    space = KeySpace(
        ranges, n_tokens, tuple(split_sizes), tuple(kept), piece_sizes, (), None, offsets[:-1], offsets[-1]
    )

    def key_period(launch: tuple[int, ...], record: PeriodicLaunch | None) -> tuple[int, int] | None:
        """The launch's (key period, key start) in key space, if its keys repeat there too."""
        if record is None or space.size % record.count:
            return None
        period = space.size // record.count
        first = space.position(calls[launch[0]].keys[0].start)
        if first + record.k_length > period:
            return None
        for i, index in enumerate(launch):
            if space.position(calls[index].keys[0].start) != first + i * period:
                return None
        return period, first

    whole = None
    if whole_call_keys is not None:
        whole = _merged([(space.position(a), space.position(a) + b - a) for a, b in whole_call_keys])
    periodic_keys = tuple(key_period(launch, p) for launch, p in zip(launches, periodic_launches))
    return dataclasses.replace(space, periodic=periodic_keys, whole_call_keys=whole)


def _refuse_across_the_cache(plan: BoundPlan, slots: Mapping[str, GroupSlot]) -> None:
    """``across`` counts positions in the input; a group read from a KV cache
    has no place there, so a pair under ``across`` with one is refused."""
    for attention in plan.calls:
        for run, lo, hi in Keys.of(attention.keys).parts:
            shared = run.slice_modifiers(lo, hi)
            if shared is not None and not shared.across:
                continue  # one test per slice of a run: no key of it is under `across`
            for key in run.groups[lo:hi]:
                if key.modifiers.across and slots[key.name].cached:
                    raise PatternError(
                        [
                            Diagnostic(
                                Code.BAD_SIZE,
                                f"`{key.name}` is read from a KV cache (size None) under "
                                f"{key.modifiers.text()}, whose positions count in the input",
                                where="sizes",
                                hint=f"give `{key.name}` a size (its tokens in the input), or drop `across`",
                            )
                        ]
                    )


@dataclass(frozen=True, slots=True)
class _RunPlace:
    """Where a :class:`~patternc.ir.KeyRun`'s groups sit at these sizes, as
    prefix sums over the run: a slice's tokens, present groups and cached
    groups are two lookups each, and the slice is one input range when its
    groups lie end to end (``joined``). Built once per run, so the calls of
    a block-causal family cost O(1) each, not one step per key group."""

    starts: list[int]
    """Each group's offset (-1: cached)."""
    tokens: list[int]
    """Input tokens of the groups before index ``i`` (cached groups count 0)."""
    present: list[int]
    """Groups before index ``i`` that a call reads something from: non-empty or cached."""
    cached: list[int]
    """Cached groups before index ``i``."""
    joined: list[int]
    """The first index ``j`` such that groups ``j..i`` lie end to end in the input."""

    @classmethod
    def of(cls, run: KeyRun, slots: Mapping[str, GroupSlot]) -> _RunPlace:
        starts, tokens, present, cached, joined = [], [0], [0], [0], []
        end = None
        for i, key in enumerate(run.groups):
            slot = slots[key.name]
            starts.append(slot.offset)
            tokens.append(tokens[-1] + (slot.size or 0))
            present.append(present[-1] + (slot.size != 0))
            cached.append(cached[-1] + slot.cached)
            joined.append(joined[-1] if end is not None and slot.offset == end else i)
            end = None if slot.size is None else slot.offset + slot.size
        return cls(starts, tokens, present, cached, joined)

    def one_range(self, lo: int, hi: int) -> bool:
        """Whether groups ``lo..hi-1`` (none cached) lie end to end in the input."""
        return self.cached[hi] == self.cached[lo] and self.joined[hi - 1] <= lo


class _KeySide:
    """A call's keys at these sizes, read slice by slice of their runs (see
    :class:`_RunPlace`); key group by key group only where a slice is not
    one input range with one modifier list."""

    def __init__(
        self, keys: Keys, slots: Mapping[str, GroupSlot], places: dict[int, tuple[KeyRun, _RunPlace]]
    ) -> None:
        inputs: list[tuple[int, int, Modifiers]] = []
        self.cached: list[Segment] = []
        self.n_keys = 0
        self.present = 0
        self.slices: list[tuple[_RunPlace, int, int, Modifiers | None, tuple[KeyGroup, ...]]] = []
        for run, lo, hi in keys.parts:
            held = places.get(id(run))
            if held is None:
                held = places[id(run)] = (run, _RunPlace.of(run, slots))
            place = held[1]
            self.n_keys += place.tokens[hi] - place.tokens[lo]
            self.present += place.present[hi] - place.present[lo]
            mods = run.slice_modifiers(lo, hi)
            if mods is not None and place.one_range(lo, hi):
                start = place.starts[lo]
                stop = start + place.tokens[hi] - place.tokens[lo]
                if stop > start:
                    inputs.append((start, stop, mods))
                self.slices.append((place, lo, hi, mods, ()))
                continue
            groups = run.groups[lo:hi]
            self.slices.append((place, lo, hi, mods, groups))
            for key in groups:
                slot = slots[key.name]
                if slot.size is None:
                    self.cached.append(Segment(0, -1, key.name, key.modifiers))  # length known at run time
                elif slot.size:
                    inputs.append((slot.offset, slot.offset + slot.size, key.modifiers))
        self.segments = _merged_segments(inputs, self.cached)
        """Input runs (adjacent ranges of equal modifiers merged), then cached groups."""
        self.inputs = inputs  # sorted by _merged_segments

    def access(self) -> Access:
        if not self.present:
            return "empty"
        if self.cached:
            return "view" if self.present == 1 else "gather"
        end = self.inputs[0][0]
        for start, stop, _ in self.inputs:
            if start != end:
                return "gather"
            end = stop
        return "view"

    def allowed(self, queries: Sequence[GroupSlot]) -> int:
        """Allowed (query, key) input pairs of ``queries`` with these keys."""
        total = 0
        for place, lo, hi, mods, groups in self.slices:
            tokens = place.tokens[hi] - place.tokens[lo]
            if mods is not None and not mods:  # every query reads every key of the slice
                total += sum(q.size or 0 for q in queries) * tokens
                continue
            for q in queries:
                for i in range(lo, hi):
                    size = place.tokens[i + 1] - place.tokens[i]
                    modifiers = mods if mods is not None else groups[i - lo].modifiers
                    total += allowed_pairs(q.size or 0, size, modifiers, place.starts[i] - q.offset)
        return total


class GroupPairs(Mapping[tuple[int, int], Modifiers]):
    """``{(q, k): modifiers}`` for every group pair a call allows, read from
    the calls on demand: a block-causal family of ``M`` members has
    ``M(M+1)/2`` pairs, which a layout does not build unless something asks
    for all of them (iterating does; a lookup reads the query's call only)."""

    def __init__(self, calls: Sequence[AttentionCall], index: Mapping[str, int]) -> None:
        self._calls = calls
        self._index = index
        self._by_query: dict[int, list[int]] | None = None
        self._keys: dict[int, dict[int, Modifiers]] = {}
        self._length: int | None = None

    def _call_keys(self, call: int) -> dict[int, Modifiers]:
        found = self._keys.get(call)
        if found is None:
            index = self._index
            found = self._keys[call] = {index[k.name]: k.modifiers for k in self._calls[call].keys}
        return found

    def __getitem__(self, pair: tuple[int, int]) -> Modifiers:
        if self._by_query is None:
            by_query: dict[int, list[int]] = {}
            for c, attention in enumerate(self._calls):
                for name in attention.queries:
                    by_query.setdefault(self._index[name], []).append(c)
            self._by_query = by_query
        q, k = pair
        # a later call's pair wins, as in a dict filled call by call
        for c in reversed(self._by_query.get(q, [])):
            mods = self._call_keys(c).get(k)
            if mods is not None:
                return mods
        raise KeyError(pair)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        seen: set[tuple[int, int]] = set()
        for c, call in enumerate(self._calls):
            keys = self._call_keys(c)
            for name in call.queries:
                q = self._index[name]
                for k in keys:
                    if (q, k) not in seen:
                        seen.add((q, k))
                        yield q, k

    def __len__(self) -> int:
        if self._length is None:
            self._length = sum(1 for _ in self)
        return self._length


def _read_as_keys(calls: Sequence[AttentionCall], places: Mapping[int, tuple[KeyRun, _RunPlace]]) -> set[str]:
    """The groups some call reads as keys: per run, the union of its slices
    (one sweep over each run, not one step per key of every call)."""
    covered: dict[int, list[int]] = {}
    for attention in calls:
        for run, lo, hi in Keys.of(attention.keys).parts:
            steps = covered.setdefault(id(run), [0] * (len(run) + 1))
            steps[lo] += 1
            steps[hi] -= 1
    names = set()
    for run_id, steps in covered.items():
        run = places[run_id][0]
        depth = 0
        for key, step in zip(run.groups, steps):
            depth += step
            if depth:
                names.add(key.name)
    return names


def _off_shape(plan: BoundPlan, slots: Mapping[str, GroupSlot]) -> tuple[Diagnostic, ...]:
    """A neighbourhood reads positions as coordinates on a shape: each group
    it relates holds the shape's tokens (or none at all: then it pairs none).
    The first group that does not (E409), kept with the layout: a rank's
    shard of a shaped group (:class:`ShardSizes`) holds part of it. Keys
    are read by their runs' slices (a run's neighbourhood keys found once),
    so block-causal families cost their calls, not their (query, key) pairs."""
    on_shape: dict[int, tuple[list[int], list[KeyGroup]]] = {}
    for attention in plan.calls:
        for run, lo, hi in Keys.of(attention.keys).parts:
            if run.modifiers is not None and run.modifiers.grid is None:
                continue
            found = on_shape.get(id(run))
            if found is None:
                shaped = [(i, k) for i, k in enumerate(run.groups) if k.modifiers.grid is not None]
                found = on_shape[id(run)] = ([i for i, _ in shaped], [k for _, k in shaped])
            at, keys = found
            for key in keys[bisect.bisect_left(at, lo) : bisect.bisect_left(at, hi)]:
                off = _off_shape_of(key, attention.queries, slots)
                if off is not None:
                    return (off,)
    return ()


def _off_shape_of(key: KeyGroup, queries: Sequence[str], slots: Mapping[str, GroupSlot]) -> Diagnostic | None:
    """E409 for the first of ``key`` and its ``queries`` not holding the
    shape's tokens of ``key``'s neighbourhood (or none at all). A call none
    of whose queries has a token here (all empty or read from the KV cache,
    as an image's own neighbourhood is while text decodes over it) pairs
    nothing, whatever its key holds."""
    grid = key.modifiers.grid
    assert grid is not None
    present = [q for q in queries if slots[q].size]
    if not present:
        return None
    for name in (key.name, *present):
        size = slots[name].size
        if size is not None and size in (0, grid.n_tokens):
            continue
        shape = ", ".join(map(str, grid.shape))
        got = "is read from a KV cache (size None)" if size is None else f"has {count_tokens(size)}"
        return Diagnostic(
            Code.SHAPE_SIZE,
            f"`{name}` {got}, but `{key.name}[{grid.text()}]` lays its tokens on the shape "
            f"[{shape}]: {count_tokens(grid.n_tokens)}",
            where="sizes",
            hint=f"give `{name}` {count_tokens(grid.n_tokens)}, or declare the shape it has "
            f"(`groups {key.name}[...]` whose sizes multiply to its size)",
        )
    return None


def build_layout(plan: BoundPlan, sizes: Mapping[str, int | None]) -> Layout:
    """Lay ``plan`` (already bound to its run-time groups) out at ``sizes``
    (``{group: size}`` for every group of the plan, in the plan's order)."""
    slots: dict[str, GroupSlot] = {}
    offset = 0
    for name in plan.groups:
        size = sizes[name]
        slots[name] = GroupSlot(name, -1, None) if size is None else GroupSlot(name, offset, size)
        offset += size or 0
    _refuse_across_the_cache(plan, slots)
    off_shape = _off_shape(plan, slots)
    calls = []
    places: dict[int, tuple[KeyRun, _RunPlace]] = {}
    key_sides = []
    for i, attention in enumerate(plan.calls):
        queries = tuple(q for q in attention.queries if not slots[q].cached)
        query_slots = [slots[q] for q in queries]
        keys = _KeySide(Keys.of(attention.keys), slots, places)
        key_sides.append(keys)
        n_queries = sum(s.size or 0 for s in query_slots)
        if attention.has_modifiers:
            allowed = keys.allowed(query_slots)
        else:  # every query reads every input key
            allowed = n_queries * keys.n_keys
        calls.append(
            Call(
                index=i,
                attention=attention,
                query_tokens=queries,
                queries=_segments([(q, NO_MODIFIERS) for q in queries], slots),
                keys=keys.segments,
                n_queries=n_queries,
                n_keys=keys.n_keys,
                query_access=_access(queries, slots),
                key_access=keys.access(),
                allowed_entries=allowed,
                single_groups=sum(1 for s in query_slots if s.size) == 1 and keys.present == 1,
            )
        )
    by_shape: dict[tuple[object, ...], list[int]] = {}
    for call in calls:
        if call.n_queries and call.attention.keys:  # a call that reads nothing is never launched
            by_shape.setdefault(_launch_key(call), []).append(call.index)
    # where each input group's outputs live: (input start, call, piece of the call's output)
    pieces = sorted((seg.start, c.index, p) for c in calls for p, seg in enumerate(c.queries))
    inputs = [s for s in slots.values() if not s.cached]
    index = {g: i for i, g in enumerate(plan.groups)}
    used_as_keys = _read_as_keys(plan.calls, places)
    read_from_cache = {s.cached for c, side in zip(calls, key_sides) if c.n_queries for s in side.cached}
    cached = tuple(g for g in plan.groups if g in read_from_cache)
    key_value_groups = tuple(s.name for s in inputs if s.name in used_as_keys)
    input_names = [s.name for s in inputs]
    input_index = {name: i for i, name in enumerate(input_names)}
    launches = tuple(tuple(v) for v in by_shape.values())
    query_pieces = _pieces({(s.start, s.stop) for c in calls for s in c.queries}, offset)
    key_pieces = _pieces({(s.start, s.stop) for c in calls for s in c.keys if s.cached is None}, offset)
    periodic_launches = _periodic_launches(calls, launches, offset)
    whole_call_keys = _whole_call_keys(calls, offset)
    key_slots = [slots[g] for g in key_value_groups]
    return Layout(
        off_shape=off_shape,
        plan_name=plan.name,
        slots=tuple(slots.values()),
        calls=tuple(calls),
        launches=launches,
        n_tokens=offset,
        output_order=tuple((call, piece) for _, call, piece in pieces),
        input_groups=tuple(input_names),
        group_ids=tuple(index[s.name] for s in inputs),
        all_groups=plan.groups,
        input_sizes=tuple(s.size or 0 for s in inputs),
        cached_groups=cached,
        key_value_groups=key_value_groups,
        key_value_indices=tuple(input_index[g] for g in key_value_groups),
        pairs=GroupPairs(plan.calls, index),
        has_modifiers=any(a.has_modifiers for a in plan.calls),
        query_pieces=query_pieces,
        key_pieces=key_pieces,
        sizes=tuple((g, sizes[g]) for g in plan.groups),
        batched=BatchedLaunches(
            direct_launches=_direct_launches(calls, launches, query_pieces[1], key_pieces[1]),
            tiled_output=_tiled_output(calls, launches, offset),
            periodic_launches=periodic_launches,
            whole_call_keys=whole_call_keys,
            whole_call_is_causal=whole_call_keys is not None
            and any(c.n_queries and c.is_causal for c in calls),
        ),
        key_space=_key_space(
            key_slots, offset, key_pieces, calls, launches, periodic_launches, whole_call_keys
        ),
        group_types=tuple(getattr(plan, "group_types", ())),
    )
