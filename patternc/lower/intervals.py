"""The keys each query reads, as at most two intervals of key indices.

On most layouts users write, a query token reads one contiguous stretch of
keys, or two: a text token of a VLM reads the registers, the image and the
text up to itself; a causal document's token reads its document up to
itself; a video frame reads the prompt and the frames up to its own; a
window reads its neighbours. A ``mask_mod`` that compares a key's index with
two bounds looked up per query costs the kernel what the hand-written
``kv_idx <= q_idx`` costs it, where testing group pairs and bands per score
costs several times more in partial blocks.

This module decides, on the host and in one pass over the allowed group
pairs, whether a layout has that shape, and if so gives each query segment's
bounds as functions of the query's position ``p`` within its group
(:class:`Run`); :func:`patternc.nn.flexmask.interval_tables` expands them per
token on the device. Where the shape is absent (a dilated band, positions
across groups, a group whose keys lie in two places, more than two runs)
the answer is None and the ``mask_mod`` tests pairs as before.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import NamedTuple

from patternc.lower.blocks import PairRuns
from patternc.modifiers import Modifiers

__all__ = ["MAX_RUNS", "NO_BOUND", "Run", "query_runs", "query_runs_of_runs"]

MAX_RUNS = 2
"""Intervals per query: each costs the kernel two comparisons per score."""

NO_BOUND = 1 << 30
"""An unbounded side of a band; it fits the int32 tables, whose indices
stay below it."""

Segment = tuple[int, int, int]
"""``(group, start, stop)`` in token indices, as
:func:`patternc.nn.flexmask.group_segments` gives them."""


class Run(NamedTuple):
    """Adjacent key segments a query group reads, as one interval per query.

    For a query at position ``p`` within its group the keys read are
    ``[lo(p), hi(p)]`` with ``lo(p) = min(first + max(0, p + low), cap)``
    and ``hi(p) = max(last + min(last_top, p + high), floor)``: the first
    segment may start late (a window's back edge), the last may stop early
    (causal, a window's front edge), the ones between are read whole. ``cap``
    and ``floor`` keep the interval right where the first or last segment is
    empty for some ``p``: the run then starts at the second segment, or ends
    at the one before the last. ``lo > hi`` is an empty interval."""

    first: int
    low: int
    cap: int
    last: int
    last_top: int
    high: int
    floor: int


class _Read(NamedTuple):
    """One key segment a query group reads, with the pair's band (a tuple:
    a layout of many documents makes one per document)."""

    start: int
    size: int
    low: int
    high: int


def query_runs(
    queries: Sequence[Segment], keys: Sequence[Segment], pairs: Mapping[tuple[int, int], Modifiers]
) -> list[list[Run]] | None:
    """Each query segment's runs (at most :data:`MAX_RUNS`), or None when a
    layout's masks are not intervals of keys; from every allowed group pair.
    The reference form of :func:`query_runs_of_runs` (what the runtime
    calls, one read per run of key groups), which tests compare it with.

    Args:
        queries: the query segments, one per non-empty query group.
        keys: the key segments; each group's keys must lie in one segment
            whose token ``i`` is position ``i`` within the group.
        pairs: the allowed ``(query group, key group)`` pairs and their modifiers.

    Returns:
        Per query segment, its runs in key order (empty: it reads nothing).
    """
    key_of = _key_places(keys)
    if key_of is None:
        return None
    reads: dict[int, list[_Read]] = {}
    for (q, k), mods in pairs.items():
        place = key_of.get(k)
        if place is None:
            continue  # an empty key group
        if mods.across or mods.dilation > 1 or mods.grid is not None:
            return None
        low, high, _ = mods.band()
        reads.setdefault(q, []).append(
            _Read(place[0], place[1], -NO_BOUND if low is None else low, NO_BOUND if high is None else high)
        )
    return _query_runs(queries, reads)


def query_runs_of_runs(
    queries: Sequence[Segment], keys: Sequence[Segment], runs: PairRuns
) -> list[list[Run]] | None:
    """:func:`query_runs` from the allowed pairs as runs of key groups
    (:class:`~patternc.lower.blocks.PairRuns`): a run without modifiers is
    one read of its groups' tokens however many groups it holds (they are
    adjacent: it is one key segment of a call), so a block-causal family of
    ``M`` members costs ``M`` steps here, not its ``M(M+1)/2`` pairs."""
    key_of = _key_places(keys)
    if key_of is None:
        return None
    refused = [across or dilation > 1 or grid is not None for _, _, dilation, across, grid in runs.tests]
    reads: dict[int, list[_Read]] = {}
    for q, first, stop, low, high, test in zip(
        runs.query, runs.key_start, runs.key_stop, runs.low, runs.high, runs.test
    ):
        band = (max(low, -NO_BOUND), min(high, NO_BOUND))
        head, tail = key_of.get(first), key_of.get(stop - 1)
        if test < 0 and head is not None and tail is not None:
            reads.setdefault(q, []).append(_Read(head[0], tail[0] + tail[1] - head[0], *band))
            continue
        for k in range(first, stop):
            place = key_of.get(k)
            if place is None:
                continue  # an empty key group
            if test >= 0 and refused[test]:  # positions across groups, or dilated
                return None
            reads.setdefault(q, []).append(_Read(place[0], place[1], *band))
    return _query_runs(queries, reads)


def _key_places(keys: Sequence[Segment]) -> dict[int, tuple[int, int]] | None:
    """``(start, size)`` of each key group's one segment (None: a group in two places)."""
    key_of: dict[int, tuple[int, int]] = {}
    for group, start, stop in keys:
        if group in key_of:
            return None
        key_of[group] = (start, stop - start)
    return key_of


def _query_runs(queries: Sequence[Segment], reads: Mapping[int, list[_Read]]) -> list[list[Run]] | None:
    out = []
    for group, start, stop in queries:
        mine = reads.get(group, [])
        runs = _runs(sorted(mine, key=_start) if len(mine) > 1 else mine, stop - start)
        if runs is None or len(runs) > MAX_RUNS:
            return None
        out.append(runs)
    return out


def _start(read: _Read) -> int:
    return read.start


def _runs(reads: list[_Read], n_queries: int) -> list[Run] | None:
    """The runs of one query group's key segments (sorted by start), or None
    where a segment inside a run is not read whole for every query."""
    chains: list[list[_Read]] = []
    for read in reads:
        if chains and chains[-1][-1].start + chains[-1][-1].size == read.start:
            chains[-1].append(read)
        else:
            chains.append([read])
    runs = []
    for chain in chains:
        for i, read in enumerate(chain):
            whole_start = read.low <= -(n_queries - 1)  # p + low <= 0 for every p
            whole_end = read.high >= read.size - 1  # p + high >= size - 1 for every p
            if (i > 0 and not whole_start) or (i < len(chain) - 1 and not whole_end):
                return None
        head, tail = chain[0], chain[-1]
        many = len(chain) > 1
        runs.append(
            Run(
                first=head.start,
                low=head.low,
                cap=chain[1].start if many else NO_BOUND,
                last=tail.start,
                last_top=tail.size - 1,
                high=tail.high,
                floor=tail.start - 1 if many else -NO_BOUND,
            )
        )
    return runs
