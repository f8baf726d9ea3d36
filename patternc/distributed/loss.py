"""The loss of a sharded batch, normalised so the reduced gradients are those of one process.

Under context parallelism each rank holds some tokens of every sample, so a
loss that averages over the rank's own tokens weights each rank equally
rather than each token, and a data-parallel wrapper then reduces those
gradients once more (a sum, or a mean over ranks). :func:`global_mean_loss`
divides each rank's sum by the token count of every rank together and
scales for the wrapper's reduction.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.distributed as dist
from torch import Tensor

from patternc.distributed.collectives import DistributedError, Group, guarded

__all__ = ["GradReduction", "global_mean_loss"]

GradReduction = Literal["mean", "sum"]
"""How parameter gradients are reduced over the ranks: ``"mean"``
(``DistributedDataParallel``; FSDP2's ``fully_shard`` by default) or
``"sum"`` (``torch.distributed.all_reduce`` of each ``.grad``; ``fully_shard``
after ``set_gradient_divide_factor(1.0)``)."""


def global_mean_loss(
    local_sum: Tensor,
    local_count: Tensor | int | float,
    *,
    grads: GradReduction,
    group: Group = None,
) -> Tensor:
    """The loss a rank calls ``backward()`` on when the loss is a mean over every token of every rank.

    Each rank passes the sum of its tokens' losses and how many tokens it
    counted (those not ignored; a sum of weights for a weighted mean). One
    all-reduce of the sums and counts over ``group`` gives the global token
    count ``N``; the gradient of the result is ``local_sum``'s times ``R / N``
    for ``grads="mean"`` (``R``: the ranks of ``group``) or ``1 / N`` for
    ``grads="sum"``, so that after the wrapper reduces the parameter gradients
    they equal those of one process computing ``sum(losses) / N`` over all
    tokens. The returned value is that global mean itself, the same on every
    rank (for logging). A step in which no rank counts a token gives 0.

    ``group`` is the group the parameter gradients are reduced over (that of
    ``DistributedDataParallel`` or of ``fully_shard``'s mesh), which holds the
    tokens of the whole batch: the context-parallel ranks, and with data
    parallelism on top the data-parallel ranks too.

    >>> # with cp:                                                 # doctest: +SKIP
    >>> #     out = ddp_model(x, cp.local_sizes)
    >>> # per_token = criterion(out, cp.shard(target))             # reduction="none"
    >>> # keep = cp.shard(target_mask)
    >>> # loss = global_mean_loss((per_token * keep).sum(), keep.sum(), grads="mean")
    >>> # loss.backward()

    Args:
        local_sum: a scalar, the sum of this rank's per-token losses
            (differentiable; a rank without tokens passes a zero that still
            depends on the model's output, so every rank runs the backward).
        local_count: the number of tokens (or the total weight) in
            ``local_sum``: an int, a float or a scalar tensor.
        grads: how parameter gradients are reduced over ``group``:
            ``"mean"`` (DDP, and FSDP2's ``fully_shard`` by default) or
            ``"sum"`` (an all-reduce of each ``.grad``).
        group: the process group the gradients are reduced over; None for
            the default group.

    Returns:
        A scalar tensor of ``local_sum``'s dtype and device whose value is the
        mean over every counted token of every rank and whose gradient is the
        scaled one described above.

    Raises:
        ValueError: ``local_sum`` or ``local_count`` is not a scalar, or
            ``grads`` is neither ``"mean"`` nor ``"sum"``.
        DistributedError: ``torch.distributed`` is not initialized, or the
            all-reduce failed (another rank failed or skipped the loss).
    """
    if grads not in ("mean", "sum"):
        raise ValueError(
            f'grads must be "mean" (DistributedDataParallel, fully_shard) or "sum" '
            f"(an all_reduce of each .grad), got {grads!r}"
        )
    if local_sum.dim() != 0:
        raise ValueError(
            f"local_sum must be a scalar, the sum of this rank's per-token losses; got shape "
            f"{tuple(local_sum.shape)} (sum it, e.g. (per_token * keep).sum())"
        )
    count = torch.as_tensor(local_count, device=local_sum.device).detach()
    if count.dim() != 0:
        raise ValueError(
            "local_count must be a scalar (the number of tokens in local_sum), got shape "
            f"{tuple(count.shape)}"
        )
    if not dist.is_available() or not dist.is_initialized():
        raise DistributedError(
            "torch.distributed is not initialized: call torch.distributed.init_process_group first"
        )
    # sums and counts in one all-reduce; float64 keeps counts exact to 2**53
    totals = torch.stack([local_sum.detach().to(torch.float64), count.to(torch.float64)])
    guarded("summing the loss and token counts", group, lambda: dist.all_reduce(totals, group=group))
    total_sum, total_count = totals.unbind()
    denominator = torch.where(total_count > 0, total_count, torch.ones_like(total_count))
    ranks = dist.get_world_size(group) if grads == "mean" else 1
    scaled = local_sum * (ranks / denominator).to(local_sum.dtype)
    value = (total_sum / denominator).to(local_sum.dtype)
    # the value of the global mean, the gradient of this rank's scaled share
    return scaled + (value - scaled).detach()
