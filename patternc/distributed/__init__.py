"""Context-parallel attention: any compiled plan, sharded over a ``torch.distributed`` group.

>>> from patternc.distributed import ContextParallel  # doctest: +SKIP
>>> cp = ContextParallel(plan, sizes)                 # doctest: +SKIP
>>> with cp:                                          # doctest: +SKIP
...     out = model(cp.shard(x), cp.local_sizes)

:mod:`~patternc.distributed.placement` decides where tokens live and what
each call communicates (torch-free; :mod:`~patternc.distributed.report`
prints it). The runtime: :mod:`~patternc.distributed.collectives`
(differentiable all-gather and ring shift), :mod:`~patternc.distributed.rank`
(one rank's rows and gathers), :mod:`~patternc.distributed.blockwise` (the
per-block kernels with log-sum-exp), :mod:`~patternc.distributed.calls` (executor and
blockwise calls), :mod:`~patternc.distributed.parallel` (``ContextParallel``),
:mod:`~patternc.distributed.loss` (``global_mean_loss``: the loss normalisation
of sharded training). Head-parallel mode: :mod:`~patternc.distributed.heads`
(what it moves against the schedule, and the choice; torch-free) and
:mod:`~patternc.distributed.alltoall` (its all-to-alls). See docs/distributed.md.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from patternc.distributed.placement import (
    GroupShards,
    Placement,
    ShardedCall,
    ShardedSchedule,
    place,
    schedule,
)

if TYPE_CHECKING:
    from patternc.distributed.collectives import DistributedError
    from patternc.distributed.loss import global_mean_loss
    from patternc.distributed.parallel import ContextParallel

__all__ = [
    "ContextParallel",
    "DistributedError",
    "GroupShards",
    "Placement",
    "ShardedCall",
    "ShardedSchedule",
    "global_mean_loss",
    "place",
    "schedule",
]


def __getattr__(name: str) -> Any:
    # torch is imported only when the runtime is asked for
    if name == "ContextParallel":
        from patternc.distributed.parallel import ContextParallel

        return ContextParallel
    if name == "DistributedError":
        from patternc.distributed.collectives import DistributedError

        return DistributedError
    if name == "global_mean_loss":
        from patternc.distributed.loss import global_mean_loss

        return global_mean_loss
    raise AttributeError(name)
