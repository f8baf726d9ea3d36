"""Where each group's tokens live across ranks, and what each call must communicate.

Torch-free: a placement and a schedule are integers and names, so they can
be printed, hashed and checked across ranks before any tensor moves.

- :func:`place` decides, per group, whether its tokens are split over the
  ranks (``split``: contiguous shards; ``zigzag``: two shards per rank, for a
  group attending causally to itself, so every rank gets as many early as
  late positions) or placed whole on one rank (``whole``: groups that only
  attend within a small connected set, such as documents, balanced over the
  ranks by their attention FLOPs).
- :func:`schedule` reads the plan's calls and picks, per call, ``local``
  (every token its queries need is on the rank: nothing moves), ``gather``
  (all-gather the keys/values: small key sets such as anchors), ``ring``
  (key/value blocks passed around the ranks: key sets as large as the
  queries) or ``halo`` (each rank receives from each other rank only the
  keys its queries may read: windows, bands, global tokens), whichever
  moves the fewest key/value tokens. It counts the key/value tokens each
  rank receives against the minimum the plan implies (the keys its queries
  are allowed to see that it does not hold).
"""

from __future__ import annotations

import bisect
import hashlib
import itertools
from collections.abc import Collection, Iterable, Iterator, Mapping, Sequence, Set
from dataclasses import dataclass, field, replace
from typing import Literal

from patternc.ir import AttentionCall, KeyGroup, KeyRun, Keys
from patternc.lower.layout import ShardSizes
from patternc.modifiers import Band, Modifiers, allowed_pairs, pair_band
from patternc.ranges import Range, merge_ranges

__all__ = [
    "GroupShards",
    "Placement",
    "Range",
    "RankLoads",
    "ShardKind",
    "ShardedCall",
    "ShardedSchedule",
    "Strategy",
    "halo_slices",
    "place",
    "rank_loads",
    "ring_steps",
    "schedule",
]

ShardKind = Literal["split", "zigzag", "whole", "cached"]
HaloSlices = dict[int, tuple[tuple[int, Range], ...]]
"""What a halo sends one rank: per sending rank, (key index, positions) pieces."""
Strategy = Literal["local", "gather", "ring", "halo"]


@dataclass(frozen=True, slots=True)
class GroupShards:
    """One group's tokens on every rank: ``ranges[r]`` are the positions
    (within the group, ascending) that rank ``r`` holds. A cached group
    (``size`` None) holds no input tokens: every rank reads it from its cache."""

    name: str
    size: int | None
    kind: ShardKind
    ranges: tuple[tuple[Range, ...], ...]

    def local_size(self, rank: int) -> int:
        return sum(b - a for a, b in self.ranges[rank])

    def missing(self, rank: int) -> int:
        """Tokens of the group that ``rank`` does not hold (0 for a cached group)."""
        return (self.size or 0) - self.local_size(rank)

    def owner(self) -> int | None:
        """The rank of a ``whole`` group (None for the others)."""
        if self.kind != "whole":
            return None
        return next((r for r, rs in enumerate(self.ranges) if rs), 0)


@dataclass(frozen=True, eq=False)
class Placement:
    """The tokens of every group across ``world_size`` ranks (groups in plan order)."""

    world_size: int
    groups: tuple[GroupShards, ...]
    digest: str = field(init=False)
    """Short hash of the whole placement: ranks compare it before they communicate."""
    _by_name: dict[str, GroupShards] = field(init=False, repr=False)
    _owners: dict[str, tuple[list[int], list[tuple[int, int, int]]]] = field(init=False, repr=False)
    _held: dict[tuple[str, ...], tuple[int, ...]] = field(init=False, repr=False)
    _halos: dict[tuple[int, int, frozenset[int] | None], tuple[AttentionCall, HaloSlices]] = field(
        init=False, repr=False
    )
    """:func:`halo_slices` per (call's identity, rank, senders), with the call
    kept so an identity reused by another call is not taken for it."""
    offsets: dict[str, int] = field(init=False, repr=False)
    """Each group's first position in the whole input (groups in order; cached ones hold none)."""
    _index: dict[str, int] = field(init=False, repr=False)
    _local_prefix: tuple[tuple[int, ...], ...] = field(init=False, repr=False)
    """Per rank, prefix sums over the groups (plan order) of the tokens it holds."""
    _size_prefix: tuple[int, ...] = field(init=False, repr=False)
    """Prefix sums over the groups of their sizes (cached groups: 0)."""

    def __post_init__(self) -> None:
        text = repr((self.world_size, [(g.name, g.size, g.kind, g.ranges) for g in self.groups]))
        object.__setattr__(self, "digest", hashlib.sha1(text.encode()).hexdigest()[:12])
        object.__setattr__(self, "_by_name", {g.name: g for g in self.groups})
        object.__setattr__(self, "_owners", {})
        object.__setattr__(self, "_held", {})
        object.__setattr__(self, "_halos", {})
        object.__setattr__(self, "offsets", _offsets([g.name for g in self.groups], self.sizes))
        object.__setattr__(self, "_index", {g.name: i for i, g in enumerate(self.groups)})
        object.__setattr__(
            self,
            "_local_prefix",
            tuple(_prefix_sums(g.local_size(r) for g in self.groups) for r in range(self.world_size)),
        )
        object.__setattr__(self, "_size_prefix", _prefix_sums(g.size or 0 for g in self.groups))

    def group(self, name: str) -> GroupShards:
        return self._by_name[name]

    def holding(self, name: str, start: int, stop: int) -> Iterator[tuple[int, Range]]:
        """The ranks holding positions ``[start, stop)`` of group ``name``.

        Every position is on one rank, so the ranges of all ranks, sorted
        by start, are sorted by stop too: a bisect finds the first, and the
        cost is that of the ranges found, not of the ranks.

        Args:
            name: A group of the placement.
            start: The first position (within the group).
            stop: One past the last position.

        Yields:
            ``(rank, (a, b))`` for each range of a rank overlapping
            ``[start, stop)``: the overlap, in position order.
        """
        index = self._owners.get(name)
        if index is None:
            spans = sorted((a, b, r) for r, ranges in enumerate(self.group(name).ranges) for a, b in ranges)
            index = self._owners[name] = ([b for _, b, _ in spans], spans)
        stops, spans = index
        for i in range(bisect.bisect_right(stops, start), len(spans)):
            a, b, rank = spans[i]
            if a >= stop:
                break
            yield rank, (max(a, start), min(b, stop))

    def held_tokens(self, names: Sequence[str]) -> tuple[int, ...]:
        """Tokens of the groups ``names`` together on each rank (cached groups hold none).

        Args:
            names: Groups of the placement (each counted as often as named).

        Returns:
            One total per rank, remembered for the next call with the same names.
        """
        key = tuple(names)
        held = self._held.get(key)
        if held is None:
            held = self._held[key] = self._summed(key, self._local_prefix)
        return held

    def missing_tokens(self, names: Sequence[str]) -> tuple[int, ...]:
        """Tokens of the groups ``names`` each rank does not hold (an
        all-gather of them brings each rank this many; cached groups hold none)."""
        total, *held = self._summed(tuple(names), (self._size_prefix, *self._local_prefix))
        return tuple(total - tokens for tokens in held)

    def _summed(self, names: tuple[str, ...], prefixes: Sequence[Sequence[int]]) -> tuple[int, ...]:
        """Per prefix table, the sum of its entries at ``names``: the groups
        taken as runs of consecutive plan positions, one difference of
        prefix sums each, so a family's members ``frame0..frameK`` cost one
        run however many they are."""
        runs = self.group_runs(names)
        return tuple(sum(prefix[b] - prefix[a] for a, b in runs) for prefix in prefixes)

    def group_runs(self, names: Iterable[str]) -> list[Range]:
        """``names`` as runs ``[first, stop)`` of consecutive group indices
        (plan order); a group named twice starts a second run."""
        index = self._index
        runs: list[Range] = []
        for i in sorted(index[n] for n in names):
            if runs and runs[-1][1] == i:  # the next group: the run grows
                runs[-1] = (runs[-1][0], i + 1)
            else:  # a gap, or a group named again
                runs.append((i, i + 1))
        return runs

    def holds_any(self, runs: Sequence[Range], rank: int) -> bool:
        """Whether ``rank`` holds a token of some group in ``runs`` (from :meth:`group_runs`)."""
        prefix = self._local_prefix[rank]
        return any(prefix[b] > prefix[a] for a, b in runs)

    @property
    def sizes(self) -> dict[str, int | None]:
        return {g.name: g.size for g in self.groups}

    def local_sizes(self, rank: int) -> ShardSizes:
        """``{group: tokens on this rank}`` (None for cached groups), in plan
        order: the sizes a module on this rank is called with (a
        :class:`~patternc.lower.layout.ShardSizes`: a shaped group's shard
        holds part of its shape)."""
        return ShardSizes((g.name, None if g.size is None else g.local_size(rank)) for g in self.groups)

    def local_ranges(self, rank: int) -> tuple[Range, ...]:
        """This rank's tokens as ``[start, stop)`` ranges of the full input, in local order."""
        out: list[Range] = []
        offset = 0
        for g in self.groups:
            if g.size is None:
                continue
            out.extend((offset + a, offset + b) for a, b in g.ranges[rank])
            offset += g.size
        return tuple(out)

    def local_positions(self, rank: int) -> list[int]:
        """Position within its group of each of this rank's tokens, in local order."""
        return [p for g in self.groups if g.size is not None for a, b in g.ranges[rank] for p in range(a, b)]

    def tokens(self, rank: int) -> int:
        return sum(g.local_size(rank) for g in self.groups if g.size is not None)


def _even(start: int, stop: int, parts: int) -> list[Range]:
    n = stop - start
    return [(start + i * n // parts, start + (i + 1) * n // parts) for i in range(parts)]


def _split(size: int, world: int) -> tuple[tuple[Range, ...], ...]:
    return tuple((r,) if r[1] > r[0] else () for r in _even(0, size, world))


def _zigzag(size: int, world: int) -> tuple[tuple[Range, ...], ...]:
    chunks = _even(0, size, 2 * world)
    out = []
    for r in range(world):
        pair = [chunks[r], chunks[2 * world - 1 - r]]
        out.append(tuple(c for c in pair if c[1] > c[0]))
    return tuple(out)


class _RunFacts:
    """What :func:`place` reads of one :class:`~patternc.ir.KeyRun`, built
    once however many calls read slices of it: its groups' sizes as prefix
    sums, the indices of its groups with tokens (``live``), where each name
    sits, and which links between neighbouring live groups are already
    joined (a pointer past each joined link, so every link is joined once)."""

    __slots__ = ("live", "names", "prefix", "skip", "where")

    def __init__(self, run: KeyRun, sizes: Mapping[str, int | None], live: set[str]) -> None:
        self.names = [k.name for k in run.groups]
        self.prefix = [0]
        for name in self.names:
            self.prefix.append(self.prefix[-1] + (sizes[name] or 0))
        self.live = [i for i, name in enumerate(self.names) if name in live]
        self.where: dict[str, list[int]] = {}
        for i, name in enumerate(self.names):
            self.where.setdefault(name, []).append(i)
        self.skip = list(range(len(self.live) + 1))

    def tokens(self, lo: int, hi: int) -> int:
        """Tokens of the groups ``[lo, hi)`` of the run."""
        return self.prefix[hi] - self.prefix[lo]

    def unjoined(self, j: int) -> int:
        """The first link ``>= j`` (live group ``j`` to live group ``j + 1``) not yet joined."""
        root = j
        while self.skip[root] != root:
            root = self.skip[root]
        while self.skip[j] != root:
            self.skip[j], j = root, self.skip[j]
        return root


class _Facts:
    """:class:`_RunFacts` of every run the calls read (by identity)."""

    def __init__(self, sizes: Mapping[str, int | None], live: set[str]) -> None:
        self.sizes, self.live = sizes, live
        self._runs: dict[int, _RunFacts] = {}

    def __call__(self, run: KeyRun) -> _RunFacts:
        facts = self._runs.get(id(run))
        if facts is None:
            facts = self._runs[id(run)] = _RunFacts(run, self.sizes, self.live)
        return facts


def _components(groups: Sequence[str], calls: Iterable[AttentionCall], facts: _Facts) -> list[list[str]]:
    """Connected sets of input groups (a query and its keys are connected).

    A call's keys are slices of runs: its live keys are joined as a chain,
    each link of a run once over all the calls, so a block-causal family of
    ``M`` members costs ``O(M)`` joins, not the ``M^2 / 2`` keys it reads."""
    live = facts.live
    parent = {g: g for g in groups}

    def root(g: str) -> str:
        while parent[g] != g:
            parent[g] = parent[parent[g]]
            g = parent[g]
        return g

    def join(a: str | None, b: str) -> str:
        if a is not None:
            parent[root(b)] = root(a)
        return b if a is None else a

    for call in calls:
        first: str | None = None
        for q in call.queries:
            if q in live:
                first = join(first, q)
        for run, lo, hi in Keys.of(call.keys).parts:
            f = facts(run)
            a, b = bisect.bisect_left(f.live, lo), bisect.bisect_left(f.live, hi)
            if a == b:
                continue
            first = join(first, f.names[f.live[a]])
            j = f.unjoined(a)
            while j < b - 1:
                join(f.names[f.live[j]], f.names[f.live[j + 1]])
                f.skip[j] = j + 1
                j = f.unjoined(j + 1)
    out: dict[str, list[str]] = {}
    for g in groups:
        if g in live:
            out.setdefault(root(g), []).append(g)
    return list(out.values())


@dataclass(frozen=True, slots=True)
class _Component:
    """A connected set of groups: ``parts`` are ``(group, tokens, FLOPs)``."""

    parts: tuple[tuple[str, int, int], ...]

    @property
    def tokens(self) -> int:
        return sum(t for _, t, _ in self.parts)

    @property
    def flops(self) -> int:
        return sum(f for _, _, f in self.parts)

    @property
    def density(self) -> float:
        return self.flops / self.tokens if self.tokens else 0.0


@dataclass(frozen=True, slots=True)
class _Segment:
    """One group's tokens on the line, from ``start``, its FLOPs spread evenly over them."""

    group: str
    start: int
    tokens: int
    flops: int


class _Line:
    """Every component's tokens end to end, the densest (most attention
    FLOPs per token) first, each component's groups next to each other
    (densest first): a rank takes one stretch from the front and one from
    the back, so it holds as many FLOPs and as many tokens as every other
    rank, and only the components a cut falls inside are split."""

    def __init__(self, components: Sequence[_Component]) -> None:
        self.segments: list[_Segment] = []
        edges = {0}
        at = 0
        for c in sorted(components, key=lambda c: (-c.density, -c.tokens)):
            for group, tokens, flops in sorted(c.parts, key=lambda p: -(p[2] / p[1] if p[1] else 0.0)):
                self.segments.append(_Segment(group, at, tokens, flops))
                at += tokens
            edges.add(at)
        self.tokens = at
        self.flops = sum(c.flops for c in components)
        self.starts = [g.start for g in self.segments]
        self.boundaries = sorted(edges)
        """Where one component ends and the next begins (cuts there split nothing)."""
        self._prefix = [0.0]
        for g in self.segments:
            self._prefix.append(self._prefix[-1] + g.flops)

    def flops_before(self, x: int) -> float:
        """FLOPs of the line's first ``x`` tokens."""
        i = bisect.bisect_right(self.starts, x) - 1
        if i < 0:
            return 0.0
        g = self.segments[i]
        inside = min(x - g.start, g.tokens)
        return self._prefix[i] + (g.flops * inside / g.tokens if g.tokens else 0.0)

    def below(self, x: int, floor: int) -> int:
        """The last component boundary at or before ``x`` (not before ``floor``)."""
        i = bisect.bisect_right(self.boundaries, x) - 1
        return max(self.boundaries[i], floor) if i >= 0 else floor

    def above(self, x: int, ceiling: int) -> int:
        """The first component boundary at or after ``x`` (not after ``ceiling``)."""
        i = bisect.bisect_left(self.boundaries, x)
        return min(self.boundaries[i], ceiling) if i < len(self.boundaries) else ceiling

    def inside(self, x: int) -> bool:
        return x not in self.boundaries


def _cut_line(line: _Line, world: int, balance: float) -> list[list[Range]]:
    """Each rank's stretches of the line: rank ``r`` takes ``[front_r,
    front_{r+1})`` from the front and ``[back_{r+1}, back_r)`` from the back,
    the two chosen so that ranks ``0..r`` together hold ``(r + 1) / world``
    of the tokens and of the FLOPs. A cut moves to a component boundary
    (keeping the component whole) where the ranks stay within ``balance`` of
    the mean."""
    total_t, total_f = line.tokens, line.flops
    mean_t, mean_f = total_t / world, total_f / world
    slack = 0.8 * (balance - 1)
    front, back = 0, total_t
    out: list[list[Range]] = []

    def held(a: int, b: int) -> tuple[int, float]:
        """Tokens and FLOPs of the line outside ``[a, b)``."""
        return a + total_t - b, line.flops_before(a) + total_f - line.flops_before(b)

    for r in range(world - 1):
        done_t, done_f = held(front, back)
        n = min(max((r + 1) * total_t // world - done_t, 0), back - front)
        u = _denser_share(line, front, back, n, (r + 1) * mean_f, total_f)
        fronts = {front + u, front + n, front, line.below(front + u, front), line.above(front + u, back)}
        backs = {
            back - n + u,
            back - n,
            back,
            line.below(back - n + u, front),
            line.above(back - n + u, back),
        }
        pairs = {(a, b) for a in fronts for b in backs}
        # one side on a boundary, the other taking the rest of the rank's tokens
        pairs |= {(a, a - front + back - n) for a in fronts} | {(front + n - (back - b), b) for b in backs}
        pairs |= {(front + 1, back - n + 1), (front + n - 1, back - 1)}
        # a component cut at the front (or back) goes on to this rank, so the
        # ranks sharing it are neighbours
        # only cuts inside what is left (with fewer tokens than ranks, the
        # candidates one token past the front or back may fall outside it)
        pairs = {(a, b) for a, b in pairs if front <= a <= b <= back}
        ongoing = [
            (a, b)
            for a, b in pairs
            if (a > front or not line.inside(front)) and (b < back or not line.inside(back))
        ]
        best: tuple[tuple[int, int, float, int], int, int] | None = None
        for a, b in sorted(ongoing or pairs):
            cum_t, cum_f = held(a, b)
            errors = (
                (cum_t - (r + 1) * mean_t) / mean_t if mean_t else 0.0,
                (cum_f - (r + 1) * mean_f) / mean_f if mean_f else 0.0,
                (cum_t - done_t) / mean_t - 1 if mean_t else 0.0,
                (cum_f - done_f) / mean_f - 1 if mean_f else 0.0,
            )
            fits = max(abs(e) for e in errors) <= slack
            cuts = (a != front and line.inside(a)) + (b != back and line.inside(b))
            # fewest components cut, then the smallest error, then the most from the front
            key = (
                0 if fits else 1,
                cuts if fits else 0,
                round(abs(errors[0]) + abs(errors[1]), 9),
                front - a,
            )
            if best is None or key < best[0]:
                best = (key, a, b)
        assert best is not None  # (front + u, back - n + u) is always a candidate
        _, a, b = best
        out.append([(front, a), (b, back)])
        front, back = a, b
    out.append([(front, back)])
    return out


def _denser_share(line: _Line, front: int, back: int, n: int, target: float, total_f: float) -> int:
    """How many of a rank's ``n`` tokens to take from the front so that the
    ranks so far hold ``target`` FLOPs (the front is the denser end, so the
    FLOPs grow with the share)."""

    def cumulative(u: int) -> float:
        return line.flops_before(front + u) + total_f - line.flops_before(back - n + u)

    lo, hi = 0, n
    while lo < hi:
        mid = (lo + hi) // 2
        if cumulative(mid) < target:
            lo = mid + 1
        else:
            hi = mid
    if lo and abs(cumulative(lo - 1) - target) < abs(cumulative(lo) - target):
        return lo - 1
    return lo


def _pieces(line: _Line, stretches: list[list[Range]]) -> dict[str, list[list[Range]]]:
    """Per group: each rank's ranges in the group's own token order (before zigzag)."""
    out: dict[str, list[list[Range]]] = {g.group: [[] for _ in stretches] for g in line.segments}
    for rank, ranges in enumerate(stretches):
        for a, b in ranges:
            if b <= a:
                continue
            first = max(bisect.bisect_right(line.starts, a) - 1, 0)
            for g in line.segments[first:]:
                if g.start >= b:
                    break
                lo, hi = max(a, g.start) - g.start, min(b, g.start + g.tokens) - g.start
                if hi > lo:
                    out[g.group][rank].append((lo, hi))
    return out


def _positions(pieces: Sequence[Range], size: int, zigzag: bool) -> tuple[Range, ...]:
    """A group's positions for a rank's ``pieces`` of it. Zigzag: a piece
    ``[c0, c1)`` takes as many positions from the group's start as from its
    end, so causal work follows tokens."""
    if not zigzag:
        return tuple(merge_ranges(pieces))
    out: list[Range] = []
    for c0, c1 in pieces:
        out.append((c0 // 2, c1 // 2))
        out.append((size - (c1 - c1 // 2), size - (c0 - c0 // 2)))
    return tuple(merge_ranges(out))


def place(
    groups: Sequence[str],
    calls: Sequence[AttentionCall],
    sizes: Mapping[str, int | None],
    world_size: int,
    *,
    whole_groups: bool = True,
    balance: float = 1.1,
) -> Placement:
    """Place the tokens of every group on ``world_size`` ranks.

    Each connected set of groups (a query group and its keys are connected:
    a document, an AB-UPT branch) is a component. Components are laid end to
    end, the densest in attention FLOPs per token first, and every rank takes
    one stretch from the front and one from the back, so that it holds
    ``1 / world_size`` of the FLOPs and of the tokens. A component a cut
    falls inside is split over the neighbouring ranks that share it, in
    shards as uneven as the balance needs (zigzag where a group attends
    causally to itself, so every shard holds as many early as late
    positions); the others stay whole on one rank. A cut moves to a
    component's edge, keeping it whole, wherever the ranks stay within
    ``balance``.

    Args:
        groups: The plan's groups, in order.
        calls: The attention calls of every plan the model runs.
        sizes: ``{group: tokens}`` (None: read from a KV cache, on no rank).
        world_size: The number of ranks.
        whole_groups: False splits every group evenly over every rank.
        balance: The largest FLOPs and tokens per rank, as a multiple of the
            mean, that keeping a component whole may cost (a target: a
            component smaller than the tolerance is never cut).

    Returns:
        The placement: every group's ranges on every rank.

    Raises:
        ValueError: ``world_size`` below 1 or ``balance`` below 1.
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    if not balance >= 1:
        raise ValueError(f"balance must be >= 1 (a multiple of the mean load), got {balance}")
    live = {g for g in groups if sizes[g] is not None}
    facts = _Facts(sizes, live)
    flops = _group_flops(groups, calls, sizes, facts)
    self_causal = _self_causal(calls, facts)
    shards: dict[str, GroupShards] = {}
    for g in groups:
        if sizes[g] is None:
            shards[g] = GroupShards(g, None, "cached", tuple(() for _ in range(world_size)))
    if not whole_groups:
        for g in live:
            size = sizes[g] or 0
            if g in self_causal and world_size > 1:
                shards[g] = GroupShards(g, size, "zigzag", _zigzag(size, world_size))
            else:
                shards[g] = GroupShards(g, size, "split", _split(size, world_size))
        return Placement(world_size, tuple(shards[g] for g in groups))
    components = [
        _Component(tuple((g, sizes[g] or 0, flops[g]) for g in members))
        for members in _components(groups, calls, facts)
    ]
    line = _Line(components)
    stretches = _cut_line(line, world_size, balance)
    pieces = _pieces(line, stretches)
    for c in components:
        holders = [r for r in range(world_size) if any(pieces[g][r] for g, _, _ in c.parts)]
        for g, size, _ in c.parts:
            if len(holders) <= 1:
                owner = holders[0] if holders else 0
                whole = tuple(((0, size),) if r == owner and size else () for r in range(world_size))
                shards[g] = GroupShards(g, size, "whole", whole)
                continue
            zigzag = g in self_causal
            split = tuple(_positions(p, size, zigzag) for p in pieces[g])
            shards[g] = GroupShards(g, size, "zigzag" if zigzag else "split", split)
    return Placement(world_size, tuple(shards[g] for g in groups))


def _self_causal(calls: Iterable[AttentionCall], facts: _Facts) -> set[str]:
    """Query groups that attend causally to themselves (found by name in each run, not key by key)."""
    out = set()
    for call in calls:
        for run, lo, hi in Keys.of(call.keys).parts:
            where = facts(run).where
            for q in call.queries:
                for i in where.get(q, ()):
                    if lo <= i < hi and run.groups[i].modifiers.causal:
                        out.add(q)
    return out


def _group_flops(
    groups: Sequence[str], calls: Iterable[AttentionCall], sizes: Mapping[str, int | None], facts: _Facts
) -> dict[str, int]:
    """Attention FLOPs (allowed query-key pairs) of each query group. A
    slice of a run with no modifiers pairs every query with every key: its
    tokens come from the run's prefix sums, not key by key."""
    flops = {g: 0 for g in groups}
    offsets = _offsets(groups, sizes)
    for call in calls:
        for q in call.queries:
            n_q = sizes[q] or 0
            for run, lo, hi in Keys.of(call.keys).parts:
                mods = run.slice_modifiers(lo, hi)
                if mods is not None and not mods:
                    flops[q] += n_q * facts(run).tokens(lo, hi)
                    continue
                flops[q] += sum(
                    allowed_pairs(n_q, sizes[k.name] or 0, k.modifiers, offsets[k.name] - offsets[q])
                    for k in run.groups[lo:hi]
                )
    return flops


@dataclass(frozen=True, slots=True)
class RankLoads:
    """Attention FLOPs (allowed query-key pairs) and tokens on every rank."""

    flops: tuple[int, ...]
    tokens: tuple[int, ...]

    @staticmethod
    def _ratio(values: Sequence[int]) -> float:
        mean = sum(values) / len(values) if values else 0
        return max(values) / mean if mean else 1.0

    @property
    def flops_ratio(self) -> float:
        """Largest FLOPs on a rank over the mean (1.0: even)."""
        return self._ratio(self.flops)

    @property
    def tokens_ratio(self) -> float:
        """Largest token count on a rank over the mean (1.0: even)."""
        return self._ratio(self.tokens)


def rank_loads(calls: Iterable[AttentionCall], placement: Placement) -> RankLoads:
    """The attention FLOPs and tokens each rank of ``placement`` holds, counted
    exactly from its positions (queries on the rank against all their keys).

    Args:
        calls: The attention calls the placement was made for.
        placement: From :func:`place`.

    Returns:
        Per rank FLOPs (allowed query-key pairs) and tokens.
    """
    world = placement.world_size
    flops = [0] * world
    for shards, _, mods, n_k, shift in _read_pairs(placement, calls):
        for r in range(world):
            for a, b in shards.ranges[r]:
                flops[r] += allowed_pairs(b, n_k, mods, shift) - allowed_pairs(a, n_k, mods, shift)
    return RankLoads(tuple(flops), tuple(placement.tokens(r) for r in range(world)))


# ------------------------------------------------------------------ schedule


@dataclass(frozen=True, slots=True)
class ShardedCall:
    """One call of a plan under a placement: how its keys reach its queries."""

    index: int
    attention: AttentionCall
    strategy: Strategy
    key_groups: tuple[str, ...]
    """Input key groups the call reads (cached ones are read locally on every rank)."""
    blockwise: bool
    """Run by patternc's blockwise kernel (positions are global: modifiers or
    ALiBi on split groups, ring blocks, key padding) rather than the
    single-device executor on the rank's tokens."""
    query_tokens: int
    key_tokens: int
    ranks: tuple[int, ...] = ()
    """The ranks holding any of the call's query or key tokens (neighbours
    under :func:`place`), ascending: the only ones whose queries read its
    keys, and the ring's order (a ``ring`` call runs on these ranks alone,
    each passing blocks to the next of them)."""
    steps: int = 1
    """How many blocks each rank of a ``ring`` call holds in turn, its own
    included: blocks stop after the last step at which some rank's queries
    may read the block it holds. For a ``halo`` call, one more than the
    ring offsets at which some rank of ``ranks`` sends keys to another
    (1 for the other strategies)."""
    moved: tuple[tuple[Strategy, int], ...] = ()
    """Key/value tokens each strategy considered would move, over all ranks
    (the chosen one first; empty where nothing was to choose)."""


@dataclass(frozen=True, eq=False)
class ShardedSchedule:
    """A plan's calls under a placement: strategies, and the key/value tokens
    every rank receives against the minimum the plan implies."""

    placement: Placement
    calls: tuple[ShardedCall, ...]
    gathered: tuple[str, ...]
    """Key groups of ``gather`` calls, all-gathered once per forward (group order)."""
    received: tuple[int, ...]
    """Key/value tokens each rank receives in one forward."""
    minimum: tuple[int, ...]
    """Key/value tokens each rank must receive: keys its queries may see that it does not hold."""
    digest: str = field(init=False)

    def __post_init__(self) -> None:
        text = repr(
            (
                self.placement.digest,
                [(c.index, c.attention.text(), c.strategy, c.blockwise) for c in self.calls],
                self.gathered,
            )
        )
        object.__setattr__(self, "digest", hashlib.sha1(text.encode()).hexdigest()[:12])

    def call_received(self, call: ShardedCall, rank: int) -> int:
        """Key/value tokens ``rank`` receives for ``call`` (a gathered group
        counts once, at the first call that reads it)."""
        return _call_received(self.placement, _gathered_before(self.calls[: call.index]), call, rank)

    def call_minimum(self, call: ShardedCall, rank: int) -> int:
        return _needed(self.placement, [call.attention], rank)


def _gathered_before(calls: Iterable[ShardedCall]) -> set[str]:
    """The key groups gathered by ``calls`` (each moves once, for the first call that reads it)."""
    return {k for c in calls if c.strategy == "gather" for k in c.key_groups}


def _received_by_rank(placement: Placement, seen: Collection[str], call: ShardedCall) -> list[int]:
    """:func:`_call_received` on every rank at once: a ring's blocks summed
    as a window sliding round the ring (not ``steps`` blocks per rank), a
    halo's ranks given to :func:`halo_slices` as one set. ``seen``: the
    groups gathered by the calls before ``call``."""
    world = placement.world_size
    if call.strategy == "ring":
        held = placement.held_tokens(call.key_groups)
        ring = [held[r] for r in call.ranks]
        size = len(ring)
        prefix = [0]
        for tokens in ring + ring:
            prefix.append(prefix[-1] + tokens)
        out = [0] * world
        for at, rank in enumerate(call.ranks):  # ranks at - steps + 1 .. at - 1 along the ring
            start = at - call.steps + 1 + size
            out[rank] = prefix[at + size] - prefix[start]
        return out
    if call.strategy == "halo":
        out = [0] * world
        ranks = frozenset(call.ranks)
        for rank in call.ranks:
            slices = halo_slices(call.attention, placement, rank, ranks)
            out[rank] = sum(b - a for pieces in slices.values() for _, (a, b) in pieces)
        return out
    if call.strategy == "gather":
        return list(placement.missing_tokens([k for k in call.key_groups if k not in seen]))
    return [_call_received(placement, seen, call, rank) for rank in range(world)]


def _call_received(placement: Placement, seen: Collection[str], call: ShardedCall, rank: int) -> int:
    if call.strategy == "local":
        return 0
    keys = call.key_groups
    if call.strategy == "ring":  # the blocks of the ranks 1 .. steps - 1 back along the call's ring
        if rank not in call.ranks:
            return 0
        at, size = call.ranks.index(rank), len(call.ranks)
        held = placement.held_tokens(keys)
        return sum(held[call.ranks[(at - step) % size]] for step in range(1, call.steps))
    if call.strategy == "halo":  # the keys its queries may read, from the ranks holding them
        if rank not in call.ranks:
            return 0
        slices = halo_slices(call.attention, placement, rank, call.ranks)
        return sum(b - a for pieces in slices.values() for _, (a, b) in pieces)
    if call.strategy == "gather":  # one all-gather for every gather call: a group counts once
        keys = tuple(k for k in keys if k not in seen)
    return placement.missing_tokens(keys)[rank]


def _prefix_sums(values: Iterable[int]) -> tuple[int, ...]:
    return tuple(itertools.accumulate(values, initial=0))


def _offsets(groups: Sequence[str], sizes: Mapping[str, int | None]) -> dict[str, int]:
    """Each group's offset in the whole input (groups in plan order, cached ones hold no tokens)."""
    out, at = {}, 0
    for g in groups:
        out[g] = at
        at += sizes[g] or 0
    return out


def _band_interval(queries: Range, n_keys: int, band: Band) -> Range:
    """Key positions some query of ``queries`` may see under ``band`` (``[lo,
    hi)``; under ``dilate`` the interval holds the keys seen and the skipped
    ones between)."""
    a, b = queries
    if band.grid is not None and b > a:  # the box of keys the queries' coordinates reach
        first, last = band.grid.reach(a, b - 1)
        return (first, min(n_keys, last + 1)) if first < min(n_keys, last + 1) else (0, 0)
    lo = 0 if band.low is None else max(0, a + band.low)
    hi = n_keys if band.high is None else min(n_keys, b - 1 + band.high + 1)
    return (lo, hi) if lo < hi else (0, 0)


class _BandMemo:
    """:func:`~patternc.modifiers.pair_band` remembered per modifier list:
    the members of a bound family share one list, so a call reading
    thousands of them makes one band, not one per key (``shift`` counts
    only under ``across``). Lists are told apart by identity: a memo lives
    for one pass over calls that hold them."""

    def __init__(self) -> None:
        self._bands: dict[tuple[int, int], Band] = {}

    def __call__(self, modifiers: Modifiers, shift: int) -> Band:
        key = (id(modifiers), shift if modifiers.across else 0)
        band = self._bands.get(key)
        if band is None:
            band = self._bands[key] = pair_band(modifiers, shift)
        return band


def _read_whole(
    call: AttentionCall, placement: Placement, band_of: _BandMemo
) -> tuple[list[str], list[KeyGroup]]:
    """The call's key groups with tokens, split into those every query reads
    whole (no side of the band bounded, no grid: every block of them is read,
    under ``dilate`` too) and the others."""
    whole: list[str] = []
    bounded: list[KeyGroup] = []
    for key in call.keys:
        if placement.group(key.name).size is None:
            continue
        band = band_of(key.modifiers, 0)
        if band.grid is None and band.low is None and band.high is None:
            whole.append(key.name)
        else:
            bounded.append(key)
    return whole, bounded


def _count_outside(intervals: list[Range], held: Sequence[Range]) -> int:
    """Positions in the union of ``intervals`` not in ``held``."""
    total = 0
    for a, b in merge_ranges(intervals):
        total += b - a
        for c, d in held:
            total -= max(0, min(b, d) - max(a, c))
    return total


def _read_pairs(
    placement: Placement, calls: Iterable[AttentionCall]
) -> Iterator[tuple[GroupShards, str, Modifiers, int, int]]:
    """Each (query group, key group) a call reads, both with tokens on the
    ranks: the query group's shards, the key group's name, modifiers and
    size, and the key group's offset minus the query group's."""
    offsets = placement.offsets
    for call in calls:
        for q in call.queries:
            shards = placement.group(q)
            if shards.size is None:
                continue
            for key in call.keys:
                n_k = placement.group(key.name).size
                if n_k is not None:
                    yield shards, key.name, key.modifiers, n_k, offsets[key.name] - offsets[q]


def _needed(placement: Placement, calls: Sequence[AttentionCall], rank: int) -> int:
    """Key/value tokens ``rank`` needs for ``calls`` and does not hold."""
    return _needed_by_rank(placement, calls)[rank]


def _needed_by_rank(placement: Placement, calls: Sequence[AttentionCall]) -> tuple[int, ...]:
    """:func:`_needed` for every rank, each call's keys sorted once: keys
    its queries read whole (no side of the band bounded, no grid) count as
    whole groups, the others by the intervals their query ranges reach."""
    world, offsets = placement.world_size, placement.offsets
    band_of = _BandMemo()
    whole: list[set[str]] = [set() for _ in range(world)]
    wanted: list[dict[str, list[Range]]] = [{} for _ in range(world)]
    for call in calls:
        queries = [g for g in map(placement.group, call.queries) if g.size is not None]
        asking = [r for r in range(world) if any(g.ranges[r] for g in queries)]
        if not asking:
            continue
        read_whole, bounded = _read_whole(call, placement, band_of)
        for r in asking:
            whole[r].update(read_whole)
            for g in queries:
                for key in bounded:
                    band = band_of(key.modifiers, offsets[key.name] - offsets[g.name])
                    n_k = placement.group(key.name).size or 0
                    for q_range in g.ranges[r]:
                        wanted[r].setdefault(key.name, []).append(_band_interval(q_range, n_k, band))
    return tuple(
        placement.missing_tokens(sorted(whole[r]))[r]
        + sum(
            _count_outside(intervals, placement.group(k).ranges[r])
            for k, intervals in wanted[r].items()
            if k not in whole[r]
        )
        for r in range(world)
    )


def halo_slices(
    call: AttentionCall, placement: Placement, rank: int, sources: Iterable[int] | None = None
) -> HaloSlices:
    """The keys a ``halo`` call sends to ``rank``: per other rank holding
    some, the ranges (key index in ``call.keys``, positions within its
    group) that ``rank``'s queries may read, in key order then ascending.
    The same interval arithmetic as the minimum, so a halo receives exactly
    the keys the rank needs and does not hold (under ``dilate``: the span of
    the keys seen, skipped ones between included).

    Args:
        call: The attention call.
        placement: From :func:`place`.
        rank: The receiving rank.
        sources: The ranks that may send (default: every rank).

    Returns:
        ``{source rank: ((key index, (start, stop)), ...)}``, ascending by
        source, sources with nothing to send left out (kept by the placement
        for the next ask: read it, do not change it). The senders are found
        by bisect over every rank's ranges (:meth:`Placement.holding`), so
        the cost follows the pieces found, not the number of ranks.
    """
    allowed = None if sources is None else frozenset(sources)
    key = (id(call), rank, allowed)
    stored = placement._halos.get(key)
    if stored is not None and stored[0] is call:
        return stored[1]
    result = _halo_slices(call, placement, rank, allowed)
    if len(placement._halos) >= _HALO_MEMO:  # a long run's rebuilt layouts: start again
        placement._halos.clear()
    placement._halos[key] = (call, result)
    return result


_HALO_MEMO = 1 << 16
"""The most :func:`halo_slices` results a placement keeps."""


def _halo_slices(
    call: AttentionCall, placement: Placement, rank: int, allowed: Set[int] | None
) -> HaloSlices:
    offsets = placement.offsets
    band_of = _BandMemo()
    wanted: dict[int, list[Range]] = {}
    for q in call.queries:
        shards = placement.group(q)
        if shards.size is None or not shards.ranges[rank]:
            continue
        for i, key in enumerate(call.keys):
            n_k = placement.group(key.name).size
            if n_k is None:
                continue
            band = band_of(key.modifiers, offsets[key.name] - offsets[q])
            for r in shards.ranges[rank]:
                wanted.setdefault(i, []).append(_band_interval(r, n_k, band))
    found: dict[int, list[tuple[int, Range]]] = {}
    for i, intervals in sorted(wanted.items()):
        name = call.keys[i].name
        for a, b in merge_ranges(intervals):
            for source, piece in placement.holding(name, a, b):
                if source != rank and (allowed is None or source in allowed):
                    found.setdefault(source, []).append((i, piece))
    return {source: tuple(found[source]) for source in sorted(found)}


def halo_offsets(call: AttentionCall, placement: Placement, ranks: Sequence[int]) -> tuple[int, ...]:
    """The ring offsets ``s`` (1 to ``len(ranks) - 1``) at which some rank
    of ``ranks`` receives keys of a ``halo`` call from the rank ``s`` before
    it in ``ranks``: a halo exchanges at these offsets only, in this order."""
    size, found = len(ranks), set()
    where = {rank: at for at, rank in enumerate(ranks)}
    for at, rank in enumerate(ranks):
        for source in halo_slices(call, placement, rank, ranks):
            found.add((at - where[source]) % size)
    return tuple(sorted(found))


def ring_steps(call: AttentionCall, placement: Placement, ranks: Sequence[int]) -> int:
    """How many blocks each rank holds in turn when the call's key blocks
    pass round ``ranks`` (each rank sends to the next, its own block first):
    one more than the last step at which some rank's queries may read the
    block it holds. Interval arithmetic on the ranks' positions, as the
    blockwise kernel's test of whether a block is read at all (under
    ``dilate`` a block between two dilated keys counts as read), so every
    rank computes the same number and the traffic report counts what the
    ring sends.

    Args:
        call: The attention call.
        placement: From :func:`place`.
        ranks: The ring's ranks, in ring order.

    Returns:
        At least 1 (a rank's own block), at most ``len(ranks)``.
    """
    offsets = placement.offsets
    band_of = _BandMemo()
    queries = [q for q in call.queries if placement.group(q).size is not None]
    # keys read whole are tested as runs of groups: a rank reads a block
    # holding any of their tokens, so a family's thousand members cost one
    # run, not a key each
    whole, bounded = _read_whole(call, placement, band_of)
    whole_runs = placement.group_runs(whole)
    whole_holders = {at for at, source in enumerate(ranks) if placement.holds_any(whole_runs, source)}
    bands = [[(k.name, band_of(k.modifiers, offsets[k.name] - offsets[q])) for k in bounded] for q in queries]

    def asks(rank: int) -> bool:
        """Whether ``rank`` holds queries of the call."""
        return any(b > a for q in queries for a, b in placement.group(q).ranges[rank])

    def reads(rank: int, source: int) -> bool:
        if whole_runs and placement.holds_any(whole_runs, source) and asks(rank):
            return True
        for q, row in zip(queries, bands):
            for a, b in placement.group(q).ranges[rank]:
                for name, band in row:
                    for c, d in placement.group(name).ranges[source]:
                        if b <= a or d <= c:
                            continue
                        if band.grid is not None:
                            if band.grid.cell_class(a, b - 1, c, d - 1)[0]:
                                return True
                            continue
                        if (band.high is None or c - (b - 1) <= band.high) and (
                            band.low is None or d - 1 - a >= band.low
                        ):
                            return True
        return False

    size, steps = len(ranks), 1
    where = {rank: at for at, rank in enumerate(ranks)}
    # a band's interval of keys holds every key block the test above reads,
    # so the ranks holding that interval are the only candidates (found by
    # bisect, not by asking every rank); a grid's test may read blocks
    # between the corners of its box, so there every rank is one
    gridded = any(band.grid is not None for row in bands for _, band in row)
    for at, rank in enumerate(ranks):
        if gridded:
            candidates: Iterable[int] = range(steps, size)
        else:
            found: set[int] = set(whole_holders) if whole_holders and asks(rank) else set()
            for q, row in zip(queries, bands):
                for r in placement.group(q).ranges[rank]:
                    for name, band in row:
                        if len(found) == size:  # every rank is a candidate already
                            break
                        lo, hi = _band_interval(r, placement.group(name).size or 0, band)
                        found.update(where[s] for s, _ in placement.holding(name, lo, hi) if s in where)
            candidates = {(at - s) % size for s in found}
        for step in sorted((s for s in candidates if s >= steps), reverse=True):  # the farthest step read
            if reads(rank, ranks[(at - step) % size]):
                steps = step + 1
                break
    return steps


def _is_local(call: AttentionCall, placement: Placement) -> bool:
    """Every input group of the call is whole on one and the same rank (empty ones anywhere)."""
    owners = set()
    for name in (*call.queries, *call.key_names):
        g = placement.group(name)
        if g.size is None or g.size == 0:
            continue
        if g.kind != "whole":
            return False
        owners.add(g.owner())
    return len(owners) <= 1


def schedule(
    calls: Sequence[AttentionCall],
    placement: Placement,
    *,
    padded: bool = False,
    positional_bias: bool = False,
    gather_limit: float = 1.0,
    strategy: Strategy | None = None,
) -> ShardedSchedule:
    """The communication of each call under ``placement``.

    A call whose groups are all on one rank is ``local``. Otherwise its keys
    are all-gathered when they are no more than ``gather_limit`` times the
    queries one rank holds (anchors), else passed around the ring (keys as
    many as the queries: joint attention, long causal documents);
    ``strategy`` forces one of the two. A call whose keys its queries read
    only in part (a window, a band, causal documents split over ranks,
    global tokens) takes a ``halo`` instead where that moves fewer key/value
    tokens than both: each rank receives, from each rank holding some, only
    the keys its queries may read (:func:`halo_slices`); ``strategy="halo"``
    forces it. ``padded``/``positional_bias``: a key
    padding mask or ALiBi is in use (both need the blockwise kernel wherever
    tokens are not whole on their rank).
    """
    world = placement.world_size
    options: list[list[ShardedCall]] = []
    for index, call in enumerate(calls):
        n_q = sum(placement.group(q).size or 0 for q in call.queries)
        key_groups = tuple(k for k in call.key_names if placement.group(k).size is not None)
        n_k = sum(placement.group(k).size or 0 for k in key_groups)
        holders = tuple(
            r for r in range(world) if any(placement.group(g).ranges[r] for g in (*call.queries, *key_groups))
        )
        positional = call.has_modifiers or positional_bias
        kinds: tuple[Strategy, ...]
        if _is_local(call, placement) or n_q == 0:
            kinds = ("local",)
        elif strategy is not None:
            kinds = (strategy,)
        elif n_k * world <= gather_limit * n_q:
            kinds = ("gather", "ring", "halo")
        else:
            kinds = ("ring", "gather", "halo")
        candidates = []
        for kind in kinds:
            # the executor reads whole groups (local calls) and gathered keys whose
            # positions do not matter; key padding always goes to the blockwise
            # kernel, which carries the mask with the keys
            blockwise = kind in ("ring", "halo") or padded or (kind == "gather" and positional)
            steps = 1
            if kind == "ring":
                steps = ring_steps(call, placement, holders)
            elif kind == "halo":
                steps = len(halo_offsets(call, placement, holders)) + 1
            candidates.append(ShardedCall(index, call, kind, key_groups, blockwise, n_q, n_k, holders, steps))
        options.append(candidates)

    def choose(gather_first: bool) -> list[ShardedCall]:
        """Per call the candidate moving the fewest key/value tokens, given
        the calls before it (a group gathered for an earlier call costs
        nothing more); on a tie the first: gather or ring by the key/query
        ratio (one collective, or blocks overlapped with the kernel), or
        gather if ``gather_first``; a halo only where it moves less."""
        out: list[ShardedCall] = []
        seen: set[str] = set()  # groups gathered so far
        for candidates in options:
            if len(candidates) == 1:
                picked = candidates[0]
            else:
                if gather_first:
                    candidates = sorted(candidates, key=lambda c: c.strategy != "gather")
                moved = [sum(_received_by_rank(placement, seen, c)) for c in candidates]
                best = moved.index(min(moved))
                order = [best, *(i for i in range(len(candidates)) if i != best)]
                picked = replace(
                    candidates[best], moved=tuple((candidates[i].strategy, moved[i]) for i in order)
                )
            out.append(picked)
            if picked.strategy == "gather":
                seen.update(picked.key_groups)
        return out

    def per_call(chosen: list[ShardedCall]) -> list[list[int]]:
        """Each call's tokens received per rank, calls in order."""
        seen: set[str] = set()
        rows = []
        for c in chosen:
            rows.append(_received_by_rank(placement, seen, c))
            if c.strategy == "gather":
                seen.update(c.key_groups)
        return rows

    def total(chosen: list[ShardedCall]) -> int:
        return sum(sum(row) for row in per_call(chosen))

    out = choose(gather_first=False)
    if any(len(c.moved) > 1 for c in out):
        # a key group several calls read moves once if gathered for the first:
        # kept where that moves less over the whole forward and the gathered
        # keys, held on every rank until the backward, are at most
        # ``gather_limit`` times the tokens a rank holds (as anchors)
        gathering = choose(gather_first=True)
        held = sum(
            placement.group(k).size or 0
            for k in {k for c in gathering if c.strategy == "gather" for k in c.key_groups}
        )
        largest = max(placement.tokens(r) for r in range(world))
        if total(gathering) < total(out) and held <= gather_limit * largest:
            out = gathering
    gathered_set = {k for c in out if c.strategy == "gather" for k in c.key_groups}
    gathered = tuple(g.name for g in placement.groups if g.name in gathered_set)
    rows = per_call(out)
    received = tuple(sum(column) for column in zip(*rows)) if rows else (0,) * world
    minimum = _needed_by_rank(placement, [c.attention for c in out if c.strategy != "local"])
    return ShardedSchedule(placement, tuple(out), gathered, received, minimum)
