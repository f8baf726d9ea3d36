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
  (all-gather the keys/values: small key sets such as anchors) or ``ring``
  (key/value blocks passed around the ranks: key sets as large as the
  queries). It counts the key/value tokens each rank receives against the
  minimum the plan implies (the keys its queries are allowed to see that it
  does not hold).
"""

from __future__ import annotations

import hashlib
import heapq
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

from patternc.ir import AttentionCall
from patternc.modifiers import Modifiers, allowed_pairs, pair_band
from patternc.ranges import Range, merge_ranges

__all__ = [
    "GroupShards",
    "Placement",
    "Range",
    "ShardKind",
    "ShardedCall",
    "ShardedSchedule",
    "Strategy",
    "place",
    "schedule",
]

ShardKind = Literal["split", "zigzag", "whole", "cached"]
Strategy = Literal["local", "gather", "ring"]


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

    def __post_init__(self) -> None:
        text = repr((self.world_size, [(g.name, g.size, g.kind, g.ranges) for g in self.groups]))
        object.__setattr__(self, "digest", hashlib.sha1(text.encode()).hexdigest()[:12])

    def group(self, name: str) -> GroupShards:
        for g in self.groups:
            if g.name == name:
                return g
        raise KeyError(name)

    @property
    def sizes(self) -> dict[str, int | None]:
        return {g.name: g.size for g in self.groups}

    def local_sizes(self, rank: int) -> dict[str, int | None]:
        """``{group: tokens on this rank}`` (None for cached groups), in plan
        order: the sizes a module on this rank is called with."""
        return {g.name: None if g.size is None else g.local_size(rank) for g in self.groups}

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


def _components(groups: Sequence[str], calls: Iterable[AttentionCall], live: set[str]) -> list[list[str]]:
    """Connected sets of input groups (a query and its keys are connected)."""
    parent = {g: g for g in groups}

    def root(g: str) -> str:
        while parent[g] != g:
            parent[g] = parent[parent[g]]
            g = parent[g]
        return g

    for call in calls:
        members = [g for g in (*call.queries, *call.key_names) if g in live]
        for other in members[1:]:
            parent[root(other)] = root(members[0])
    out: dict[str, list[str]] = {}
    for g in groups:
        if g in live:
            out.setdefault(root(g), []).append(g)
    return list(out.values())


def place(
    groups: Sequence[str],
    calls: Sequence[AttentionCall],
    sizes: Mapping[str, int | None],
    world_size: int,
    *,
    whole_groups: bool = True,
) -> Placement:
    """Place the tokens of every group on ``world_size`` ranks.

    A connected set of groups whose attention FLOPs fit one rank's share
    (at most ``1 / world_size`` of the total) is placed whole on one rank,
    largest first on the least loaded rank; the others are split over every
    rank, zigzag where a group attends causally to itself.
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    live = {g for g in groups if sizes[g] is not None}
    flops = {g: 0 for g in groups}
    offsets = _offsets(groups, sizes)
    for call in calls:
        for q in call.queries:
            flops[q] += sum(
                allowed_pairs(sizes[q] or 0, sizes[k.name] or 0, k.modifiers, offsets[k.name] - offsets[q])
                for k in call.keys
            )
    total = sum(flops.values())
    components = _components(groups, calls, live)
    whole: list[tuple[int, list[str]]] = []
    split: set[str] = set()
    for members in components:
        cost = sum(flops[g] for g in members)
        if whole_groups and (world_size == 1 or (cost * world_size <= total and len(components) > 1)):
            whole.append((cost, members))
        else:
            split.update(members)
    share = sum(flops[g] for g in split) // max(world_size, 1)
    loads = [(share, r) for r in range(world_size)]
    heapq.heapify(loads)
    owner: dict[str, int] = {}
    for cost, members in sorted(whole, key=lambda item: -item[0]):
        load, rank = heapq.heappop(loads)
        owner.update((g, rank) for g in members)
        heapq.heappush(loads, (load + cost, rank))
    self_causal = {
        q for call in calls for q in call.queries for k in call.keys if k.name == q and k.modifiers.causal
    }
    shards = []
    for g in groups:
        size = sizes[g]
        if size is None:
            shards.append(GroupShards(g, None, "cached", tuple(() for _ in range(world_size))))
        elif g in owner:
            ranges = tuple(((0, size),) if r == owner[g] and size else () for r in range(world_size))
            shards.append(GroupShards(g, size, "whole", ranges))
        elif g in self_causal and world_size > 1:
            shards.append(GroupShards(g, size, "zigzag", _zigzag(size, world_size)))
        else:
            shards.append(GroupShards(g, size, "split", _split(size, world_size)))
    return Placement(world_size, tuple(shards))


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
        return _call_received(self.placement, self.calls, call, rank)

    def call_minimum(self, call: ShardedCall, rank: int) -> int:
        return _needed(self.placement, [call.attention], rank)


def _call_received(placement: Placement, calls: Sequence[ShardedCall], call: ShardedCall, rank: int) -> int:
    if call.strategy == "local":
        return 0
    keys = call.key_groups
    if call.strategy == "gather":  # one all-gather for every gather call: a group counts once
        earlier = calls[: calls.index(call)]
        seen = {k for c in earlier if c.strategy == "gather" for k in c.key_groups}
        keys = tuple(k for k in keys if k not in seen)
    return sum(placement.group(k).missing(rank) for k in keys)


def _offsets(groups: Sequence[str], sizes: Mapping[str, int | None]) -> dict[str, int]:
    """Each group's offset in the whole input (groups in plan order, cached ones hold no tokens)."""
    out, at = {}, 0
    for g in groups:
        out[g] = at
        at += sizes[g] or 0
    return out


def _key_interval(queries: Range, n_keys: int, mods: Modifiers, shift: int = 0) -> Range:
    """Key positions some query of ``queries`` may see (``[lo, hi)``; under
    ``dilate`` the interval holds the keys seen and the skipped ones between)."""
    a, b = queries
    band = pair_band(mods, shift)
    lo = 0 if band.low is None else max(0, a + band.low)
    hi = n_keys if band.high is None else min(n_keys, b - 1 + band.high + 1)
    return (lo, hi) if lo < hi else (0, 0)


def _count_outside(intervals: list[Range], held: Sequence[Range]) -> int:
    """Positions in the union of ``intervals`` not in ``held``."""
    total = 0
    for a, b in merge_ranges(intervals):
        total += b - a
        for c, d in held:
            total -= max(0, min(b, d) - max(a, c))
    return total


def _needed(placement: Placement, calls: Sequence[AttentionCall], rank: int) -> int:
    """Key/value tokens ``rank`` needs for ``calls`` and does not hold."""
    wanted: dict[str, list[Range]] = {}
    offsets = _offsets([g.name for g in placement.groups], {g.name: g.size for g in placement.groups})
    for call in calls:
        for q in call.queries:
            shards = placement.group(q)
            if shards.size is None:
                continue
            for key in call.keys:
                k = placement.group(key.name)
                if k.size is None:
                    continue
                for r in shards.ranges[rank]:
                    shift = offsets[key.name] - offsets[q]
                    wanted.setdefault(key.name, []).append(_key_interval(r, k.size, key.modifiers, shift))
    return sum(_count_outside(iv, placement.group(k).ranges[rank]) for k, iv in wanted.items())


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
    ``strategy`` forces one of the two. ``padded``/``positional_bias``: a key
    padding mask or ALiBi is in use (both need the blockwise kernel wherever
    tokens are not whole on their rank).
    """
    world = placement.world_size
    out = []
    for index, call in enumerate(calls):
        n_q = sum(placement.group(q).size or 0 for q in call.queries)
        key_groups = tuple(k for k in call.key_names if placement.group(k).size is not None)
        n_k = sum(placement.group(k).size or 0 for k in key_groups)
        kind: Strategy
        if _is_local(call, placement) or n_q == 0:
            kind = "local"
        elif strategy is not None:
            kind = strategy
        else:
            kind = "gather" if n_k * world <= gather_limit * n_q else "ring"
        positional = call.has_modifiers or positional_bias
        # the executor reads whole groups (local calls) and gathered keys whose
        # positions do not matter; key padding always goes to the blockwise
        # kernel, which carries the mask with the keys
        blockwise = kind == "ring" or padded or (kind == "gather" and positional)
        out.append(ShardedCall(index, call, kind, key_groups, blockwise, n_q, n_k))
    gathered_set = {k for c in out if c.strategy == "gather" for k in c.key_groups}
    gathered = tuple(g.name for g in placement.groups if g.name in gathered_set)
    received = tuple(sum(_call_received(placement, out, c, rank) for c in out) for rank in range(world))
    minimum = tuple(
        _needed(placement, [c.attention for c in out if c.strategy != "local"], rank) for rank in range(world)
    )
    return ShardedSchedule(placement, tuple(out), gathered, received, minimum)
