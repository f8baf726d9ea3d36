"""One rank's view of a placement: its rows of every group, and the gathers it takes part in."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from patternc.distributed.collectives import Group, PendingGather, post_all_gather
from patternc.distributed.placement import Placement

__all__ = ["Comm", "GatherPlan", "RankTokens", "Tokens", "cat"]


def cat(parts: Sequence[Tensor], device: torch.device) -> Tensor:
    """``torch.cat`` of index tensors; an empty int64 tensor for none."""
    return torch.cat(list(parts)) if parts else torch.zeros(0, dtype=torch.long, device=device)


@dataclass(frozen=True)
class Tokens:
    """Some of a rank's tokens: rows of its local input, each token's
    position within its group, and its group's index in a call."""

    rows: Tensor
    positions: Tensor
    groups: Tensor


@dataclass(frozen=True)
class Comm:
    """The process group and the traffic counter collectives report to."""

    group: Group
    world_size: int
    traffic: dict[str, int]

    def count(self, label: str, received: Tensor, own_slot: bool = False) -> None:
        """Add the bytes that arrived in ``received`` (less this rank's own slot of an all-gather)."""
        total = received.numel() * received.element_size()
        if own_slot:
            total -= total // self.world_size
        self.traffic[label] = self.traffic.get(label, 0) + total


@dataclass(frozen=True, eq=False)
class RankTokens:
    """Rank ``rank``'s input rows of each group (local order: groups in plan
    order, each group's tokens ascending) and their positions within the group."""

    placement: Placement
    rank: int
    device: torch.device
    rows: dict[str, Tensor] = field(init=False)
    positions: dict[str, Tensor] = field(init=False)
    n_local: int = field(init=False)

    def __post_init__(self) -> None:
        rows, positions, offset = {}, {}, 0
        for g in self.placement.groups:
            if g.size is None:
                continue
            n = g.local_size(self.rank)
            rows[g.name] = torch.arange(offset, offset + n, device=self.device)
            positions[g.name] = cat(
                [torch.arange(a, b, device=self.device) for a, b in g.ranges[self.rank]], self.device
            )
            offset += n
        object.__setattr__(self, "rows", rows)
        object.__setattr__(self, "positions", positions)
        object.__setattr__(self, "n_local", offset)

    def tokens(self, names: Sequence[str]) -> Tokens:
        """The rows of ``names`` (input groups; others skipped), with group index = position in ``names``."""
        rows, positions, groups = [], [], []
        for i, name in enumerate(names):
            if name not in self.rows:
                continue
            rows.append(self.rows[name])
            positions.append(self.positions[name])
            groups.append(torch.full_like(self.rows[name], i))
        d = self.device
        return Tokens(cat(rows, d), cat(positions, d), cat(groups, d))

    def of_rank(self, names: Sequence[str], source: int) -> tuple[Tensor, Tensor]:
        """Positions and group indices of the tokens of ``names`` that rank ``source`` holds."""
        positions, groups = [], []
        for i, name in enumerate(names):
            g = self.placement.group(name)
            if g.size is None:
                continue
            for a, b in g.ranges[source]:
                positions.append(torch.arange(a, b, device=self.device))
                groups.append(torch.full((b - a,), i, dtype=torch.long, device=self.device))
        return cat(positions, self.device), cat(groups, self.device)


@dataclass(frozen=True)
class GatherPlan:
    """One all-gather of some groups' packed keys/values: the rows this rank
    sends, every rank's count, and where each group's tokens land (global order)."""

    names: tuple[str, ...]
    rows: Tensor
    counts: tuple[int, ...]
    index: dict[str, Tensor]

    @staticmethod
    def build(tokens: RankTokens, names: Sequence[str], world: int) -> GatherPlan:
        placement = tokens.placement
        counts = tuple(sum(placement.group(g).local_size(s) for g in names) for s in range(world))
        longest = max(counts, default=0)
        index = {}
        for position, name in enumerate(names):
            g = placement.group(name)
            at = torch.empty(g.size or 0, dtype=torch.long)
            for s in range(world):
                start = s * longest + sum(placement.group(h).local_size(s) for h in names[:position])
                for a, b in g.ranges[s]:
                    at[a:b] = torch.arange(start, start + b - a)
                    start += b - a
            index[name] = at.to(tokens.device)
        return GatherPlan(tuple(names), cat([tokens.rows[g] for g in names], tokens.device), counts, index)

    def post(self, packed: Tensor, comm: Comm, overlap: bool = True) -> PendingGather | None:
        """Start the all-gather of this rank's rows of ``packed`` (None: nothing
        to gather; ``overlap``: see :func:`~patternc.distributed.collectives.post_all_gather`)."""
        if not self.index:
            return None
        local = packed.index_select(1, self.rows).transpose(0, 1)
        return post_all_gather(local, self.counts, comm.group, overlap)

    def finish(self, pending: PendingGather | None, comm: Comm, links: list[Tensor]) -> dict[str, Tensor]:
        """Wait for the gather :meth:`post` started: ``{group: [B, n, H, F]}`` in
        global order; the raw buffer joins ``links``."""
        if pending is None:
            return {}
        stacked = pending.wait()
        links.append(stacked)
        comm.count(f"gather {','.join(self.names)}", stacked, own_slot=True)
        return {g: stacked.index_select(0, i).transpose(0, 1) for g, i in self.index.items()}

    def run(self, packed: Tensor, comm: Comm, links: list[Tensor], overlap: bool = True) -> dict[str, Tensor]:
        """:meth:`post` and :meth:`finish` at once."""
        return self.finish(self.post(packed, comm, overlap), comm, links)
