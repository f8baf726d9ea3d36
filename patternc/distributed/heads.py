"""Head-parallel (all-to-all) attention against the placement's schedule: what each moves, which runs.

Torch-free, like :mod:`~patternc.distributed.placement`: the choice is made
from integers, so ``patternc compile --world-size`` prints it and every rank
makes it before any tensor moves.

Head-parallel mode (known as Ulysses): after the Q/K/V projection each rank
holds its tokens for all ``H`` heads; one all-to-all gives every rank all
``N`` tokens for ``H / R`` heads; the rank runs the single-device executor
on the whole sequence for its heads (the plan's layout at the global sizes,
the same kernel as one process); a second all-to-all returns the outputs to
the ranks holding their tokens. What moves does not depend on the mask:

- rank ``r`` (holding ``n_r`` of the ``N`` tokens) receives Q, K and V of the
  ``N - n_r`` tokens it does not hold for its ``H / R`` heads, and the output
  of its own ``n_r`` tokens for the ``R - 1`` other ranks' heads:
  ``(3 (N - n_r) + (R - 1) n_r) / R`` token rows of the model width, about
  ``4 N / R`` rows when tokens are even;
- the schedule (``local``/``gather``/``ring`` calls) receives the keys and
  values of :attr:`~patternc.distributed.placement.ShardedSchedule.received`
  tokens: two rows each.

Rows count the model width (``heads x head_dim``); K/V are counted at the
query's heads, as both modes move them (grouped-query K/V heads are repeated
for the query heads they serve before the sharded call). The backward moves
the same again in both modes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

from patternc.distributed.placement import Placement, ShardedSchedule, place, schedule
from patternc.ir import AttentionCall

__all__ = ["Mode", "ModeChoice", "choose_mode", "head_parallel_rows", "hybrid_rows", "schedule_rows"]

Mode = Literal["auto", "ring", "heads", "hybrid"]
"""``ContextParallel(mode=...)``: ``"ring"`` runs the placement's schedule
(local, gather and ring calls), ``"heads"`` the all-to-all head-parallel
mode, ``"auto"`` whichever moves fewer bytes per layout; ``"hybrid"`` (a
two-dimensional mesh) the schedule between groups of ranks and heads
within them (:mod:`~patternc.distributed.hybrid`)."""


def head_parallel_rows(placement: Placement) -> tuple[float, ...]:
    """Token rows (of the model width) each rank receives in one forward of head-parallel mode."""
    world = placement.world_size
    held = [placement.tokens(r) for r in range(world)]
    total = sum(held)
    return tuple((3 * (total - n) + (world - 1) * n) / world for n in held)


def schedule_rows(plan_schedule: ShardedSchedule) -> tuple[float, ...]:
    """Token rows each rank receives in one forward of the schedule: keys and values, two per token."""
    return tuple(2.0 * n for n in plan_schedule.received)


def hybrid_rows(
    groups: Sequence[str],
    calls: Sequence[AttentionCall],
    sizes: Mapping[str, int | None],
    world_size: int,
    head_ranks: int,
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """What the hybrid of the two modes moves (``ContextParallel`` on a
    two-dimensional mesh, :mod:`~patternc.distributed.hybrid`): the
    ``world_size`` ranks form ``world_size / head_ranks`` groups of
    ``head_ranks`` (the GPUs of one host, say); the placement and schedule
    run over the groups, each group's tokens spread evenly over its ranks;
    within a group an all-to-all gives each rank the group's tokens for
    ``heads / head_ranks`` heads, and across groups the rank receives the
    schedule's keys/values for those heads only.

    Args:
        groups: the plan's groups.
        calls: the plan's calls.
        sizes: global group sizes.
        world_size: all ranks.
        head_ranks: ranks per group (heads must be a multiple of it).

    Returns:
        Per group of ranks, the token rows (model width) each of its ranks
        receives in one forward: within the group (the all-to-alls), and
        from other groups (the schedule).

    Raises:
        ValueError: ``head_ranks`` does not divide ``world_size``.
    """
    if head_ranks < 1 or world_size % head_ranks:
        raise ValueError(f"head_ranks={head_ranks} must divide world_size={world_size}")
    outer = world_size // head_ranks
    placement = place(groups, calls, sizes, outer)
    received = schedule(calls, placement).received
    within, across = [], []
    for g in range(outer):
        held = placement.tokens(g)
        within.append(4 * held * (head_ranks - 1) / head_ranks**2)
        across.append(2 * received[g] / head_ranks)
    return tuple(within), tuple(across)


@dataclass(frozen=True)
class ModeChoice:
    """The mode one layout runs in, why, and what either mode moves.

    ``schedule_rows``/``head_rows``: per rank, token rows of the model width
    received in one forward (multiply by the width and the element size for
    bytes)."""

    mode: Literal["ring", "heads"]
    reason: str
    schedule_rows: tuple[float, ...]
    head_rows: tuple[float, ...]

    def summary(self) -> str:
        """One line: the mode, and the rows of both modes for the rank that receives most."""
        return (
            f"{self.mode}: {self.reason} (rows received per rank, max: schedule "
            f"{max(self.schedule_rows, default=0):g}, head-parallel {max(self.head_rows, default=0):g})"
        )


def choose_mode(
    plan_schedule: ShardedSchedule,
    mode: Mode = "auto",
    heads: int | None = None,
    unavailable: str | None = None,
    strategy: str | None = None,
) -> ModeChoice:
    """The mode a layout runs in.

    Args:
        plan_schedule: the layout's schedule under the placement (what the
            ring mode runs).
        mode: ``"auto"`` takes head-parallel mode where its rank receiving
            most receives fewer rows than the schedule's (ties keep the
            schedule); ``"ring"``/``"heads"`` force one.
        heads: the attention heads of the call (None: not known, as in
            ``patternc compile``; divisibility is then not checked).
        unavailable: why head-parallel mode cannot run this layout at all
            (None: it can), e.g. a plan the ``ContextParallel`` was not given.
        strategy: the strategy the schedule was forced to (``ContextParallel(strategy=...)``):
            under ``"auto"`` a forced strategy keeps the schedule, which it asked for.

    Returns:
        The choice, with the reason and both modes' rows per rank.

    Raises:
        ValueError: ``mode="heads"`` where the heads do not divide over the
            ranks or the layout cannot run head-parallel, or an unknown mode.
    """
    if mode not in ("auto", "ring", "heads"):
        raise ValueError(f"mode={mode!r}: use 'auto', 'ring' or 'heads'")
    placement = plan_schedule.placement
    world = placement.world_size
    ring, head = schedule_rows(plan_schedule), head_parallel_rows(placement)
    problem = unavailable
    if problem is None and heads is not None and heads % world:
        problem = (
            f"{heads} heads do not divide over {world} ranks (head-parallel mode gives each rank "
            f"heads / ranks of them)"
        )
    if mode == "heads":
        if problem is not None:
            raise ValueError(
                f"mode='heads' cannot run this layout: {problem}; use mode='ring' or 'auto', or a "
                f"number of heads that is a multiple of the {world} ranks"
            )
        return ModeChoice("heads", "forced (mode='heads')", ring, head)
    if mode == "ring":
        return ModeChoice("ring", "forced (mode='ring')", ring, head)
    if strategy is not None:
        return ModeChoice("ring", f"strategy={strategy!r} asks for the schedule", ring, head)
    if problem is not None:
        return ModeChoice("ring", problem, ring, head)
    if _worst(head) < _worst(ring):
        return ModeChoice("heads", "the all-to-alls move less than the schedule", ring, head)
    return ModeChoice("ring", "the schedule moves no more than the all-to-alls", ring, head)


def _worst(rows: Sequence[float]) -> float:
    return max(rows, default=0.0)
