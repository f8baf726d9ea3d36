"""The hybrid of the two context-parallel modes, on a two-dimensional mesh.

The mesh's first dimension runs the placement's schedule (gather, ring and
halo calls) between groups of ranks, its second the head-parallel
all-to-all within each group (the GPUs of one host, say, where an
all-to-all is cheap): the placement is made for the groups, and each
group's tokens are then cut into as many contiguous pieces as it has
ranks. In one layer:

1. an all-to-all within the group gives each of its ``h`` ranks all of the
   group's tokens for ``heads / h`` heads;
2. the group's schedule runs on those heads, exchanging keys and values
   with the ranks of the same head slice in the other groups;
3. a second all-to-all returns each rank's tokens for every head.

Across groups a rank moves keys and values of ``heads / h`` heads only, so
the schedule's traffic per rank falls by ``h``; within the group the
all-to-alls move what head-parallel mode over ``h`` ranks moves
(:func:`~patternc.distributed.heads.hybrid_rows` estimates both).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from torch import Tensor

from patternc.distributed.alltoall import return_heads, share_heads
from patternc.distributed.placement import GroupShards, Placement
from patternc.distributed.rank import Comm
from patternc.lower.layout import Layout
from patternc.nn.context import FullKV
from patternc.nn.executors.common import AttentionInputs, Executor
from patternc.ranges import Range

__all__ = ["HybridRunner", "within_groups"]


class GroupRunner(Protocol):
    """What runs a group's tokens on the schedule between groups (the
    schedule's runner of :mod:`~patternc.distributed.parallel`)."""

    def run(self, inputs: AttentionInputs, executor: Executor, full_cache: bool) -> tuple[Tensor, FullKV]: ...


def within_groups(outer: Placement, ranks_per_group: int) -> Placement:
    """The placement of every rank of a two-dimensional mesh: rank ``g * h +
    j`` holds the ``j``-th of ``h`` contiguous, nearly equal pieces of group
    ``g``'s tokens in ``outer``'s local order (groups in plan order, each
    group's positions ascending), so the pieces of a group, rank after rank,
    are that group's tokens in its local order.

    Args:
        outer: the placement over the groups of ranks.
        ranks_per_group: ``h``, the ranks of each group.

    Returns:
        A placement over ``outer.world_size * h`` ranks (each group ``split``).
    """
    h = ranks_per_group
    world = outer.world_size * h
    ranges: dict[str, list[tuple[Range, ...]]] = {g.name: [()] * world for g in outer.groups}
    for g_rank in range(outer.world_size):
        total = outer.tokens(g_rank)
        cuts = [total * j // h for j in range(h + 1)]
        offset = 0  # of the current group's tokens within this group of ranks' local order
        for shard in outer.groups:
            if shard.size is None:
                continue
            for j in range(h):
                lo, hi = max(cuts[j] - offset, 0), cuts[j + 1] - offset
                ranges[shard.name][g_rank * h + j] = _slice_ranges(shard.ranges[g_rank], lo, hi)
            offset += shard.local_size(g_rank)
    return Placement(
        world,
        tuple(
            GroupShards(g.name, g.size, "cached" if g.size is None else "split", tuple(ranges[g.name]))
            for g in outer.groups
        ),
    )


def _slice_ranges(ranges: tuple[Range, ...], lo: int, hi: int) -> tuple[Range, ...]:
    """The positions ``lo .. hi - 1`` (counted across ``ranges`` in order) as ranges."""
    out: list[Range] = []
    seen = 0
    for a, b in ranges:
        start, stop = max(a, a + lo - seen), min(b, a + hi - seen)
        if start < stop:
            out.append((start, stop))
        seen += b - a
    return tuple(out)


@dataclass(frozen=True)
class HybridRunner:
    """One local layout in the hybrid mode, built once per (layout, heads).

    ``outer``: the schedule's runner for the group's layout
    (``outer_layout``: the plan at the group's sizes), whose collectives run
    over the mesh's first dimension; ``comm``: the group's ranks (the mesh's
    second dimension), ``rank`` this rank's place among them; ``counts``:
    tokens of each rank of the group, in rank order."""

    outer: GroupRunner
    outer_layout: Layout
    comm: Comm
    rank: int
    counts: tuple[int, ...]

    def run(self, inputs: AttentionInputs, executor: Executor, full_cache: bool) -> tuple[Tensor, FullKV]:
        if full_cache:
            raise ValueError(
                "a two-dimensional mesh does not build full key/value caches: run the layer with "
                "full_kv_cache=False, or use a one-dimensional group for decoding"
            )
        # the group's pieces, rank after rank, are its tokens in its local order: no reordering
        group_inputs = share_heads(inputs, self.counts, self.rank, self.comm, self.outer_layout, None)
        out, _ = self.outer.run(group_inputs, executor, False)
        return return_heads(out, self.counts, inputs.q.shape[1], self.comm, None), {}
