"""The two collectives context-parallel attention needs, differentiable.

- :func:`all_gather_tokens`: every rank's tokens (uneven counts), stacked
  into one padded buffer; its backward reduce-scatters the gradient, so each
  rank gets the gradient of the tokens it sent, summed over every rank that
  read them. :func:`post_all_gather` starts the same gather and returns a
  :class:`PendingGather` to wait on later, so work that needs none of the
  gathered tokens runs while they travel (and, in the backward, while their
  gradients are reduce-scattered).
- :func:`shift_tokens`: the ring step, rank ``r`` sends to ``r + 1`` and
  receives from ``r - 1``; its backward sends the gradient the other way.
- :func:`post_exchange`: a send/receive started now and waited for later
  (:class:`PendingExchange`), so the ring computes one block while the next
  is on its way.

Token counts are static (the placement knows them), so no sizes are sent.
A collective that fails (a rank died, ranks disagree) raises
:class:`DistributedError` with what was being done instead of torch's bare
message.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = [
    "BLOCKS",
    "GRADIENTS",
    "DistributedError",
    "Group",
    "PendingExchange",
    "PendingGather",
    "agree",
    "all_gather_tokens",
    "exchange_tokens",
    "guarded",
    "post_all_gather",
    "post_exchange",
    "shift_tokens",
]

Group = Any
"""A ``torch.distributed`` process group (None: the default group)."""

T = TypeVar("T")


class DistributedError(RuntimeError):
    """A collective failed or the ranks disagree (raised on the rank that saw it)."""


def guarded(what: str, group: Group, run: Callable[[], T]) -> T:
    """``run()``, with a failure explained: which rank, doing what, and the
    likely cause (a rank that failed or runs another layout)."""
    try:
        return run()
    except DistributedError:
        raise
    except (RuntimeError, ValueError) as error:
        rank = dist.get_rank(group)
        raise DistributedError(
            f"rank {rank}: {what} failed ({type(error).__name__}: {str(error).splitlines()[0][:200]}). "
            "Another rank probably failed or ran a different layout; the process group's "
            "timeout (timeout= of init_process_group or new_group) bounds how long a rank waits. "
            "A group whose collective failed cannot be used again: end the process "
            "(torchrun restarts it) rather than retry"
        ) from error


SAME_BUILD = (
    "every rank must build ContextParallel from the same plans and global sizes, "
    "and run the same layers in the same order"
)


def agree(what: str, value: str, group: Group, fix: str = SAME_BUILD) -> None:
    """Raise on every rank unless every rank of ``group`` passes the same
    ``value`` (a digest, or a short description); ``fix`` ends the message."""
    world = dist.get_world_size(group)
    values: list[Any] = [None] * world
    guarded(
        f"checking that every rank has the same {what}",
        group,
        lambda: dist.all_gather_object(values, value, group=group),
    )
    if len(set(values)) > 1:
        shown = ", ".join(f"rank {r}: {v}" for r, v in enumerate(values))
        raise DistributedError(f"the ranks disagree on the {what} ({shown}); {fix}")


# the fused collectives were renamed in torch 2.13 (the old names warn)
_ALL_GATHER = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_REDUCE_SCATTER = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def _global(group: Group, rank: int) -> int:
    return rank if group is None else dist.get_global_rank(group, rank)


class _GatherState:
    """One all-gather and its backward's reduce-scatter, shared by the two
    autograd nodes of :class:`PendingGather` (posted, received). The buffers
    a collective reads or writes are kept here until it is waited for."""

    def __init__(self, counts: tuple[int, ...], group: Group) -> None:
        self.counts, self.group = counts, group
        self.rank = dist.get_rank(group)
        self.longest = max(counts)
        self.out: Tensor | None = None
        self.buffers: tuple[Tensor, ...] = ()
        self.work: Any = None
        self.fallback: Tensor | None = None
        """The all-reduced gradient, where the backend has no reduce-scatter."""

    def post_gather(self, local: Tensor) -> None:
        padded = local.new_zeros((self.longest, *local.shape[1:]))
        padded[: local.shape[0]] = local
        out = local.new_empty((self.longest * len(self.counts), *local.shape[1:]))

        def gather() -> Any:
            try:
                return _ALL_GATHER(out, padded, group=self.group, async_op=True)
            except (RuntimeError, NotImplementedError):  # backends without the fused form
                parts = list(out.chunk(len(self.counts)))
                return dist.all_gather(parts, padded, group=self.group, async_op=True)

        self.work = guarded("all-gathering keys/values", self.group, gather)
        self.out, self.buffers = out, (padded,)

    def wait_gather(self) -> Tensor:
        work, out = self.work, self.out
        guarded("all-gathering keys/values", self.group, lambda: work.wait())
        assert out is not None
        self.work, self.out, self.buffers = None, None, ()
        return out

    def post_reduce(self, grad: Tensor) -> Tensor:
        """Start reduce-scattering ``grad``; returns the buffer this rank's
        part lands in, filled once :meth:`wait_reduce` returns."""
        grad = grad.contiguous()
        mine = grad.new_empty((self.longest, *grad.shape[1:]))

        def reduce() -> Any:
            try:
                return _REDUCE_SCATTER(mine, grad, group=self.group, async_op=True)
            except (RuntimeError, NotImplementedError):  # older gloo: no reduce_scatter
                self.fallback = grad.clone()
                return dist.all_reduce(self.fallback, group=self.group, async_op=True)

        self.work = guarded("reduce-scattering key/value gradients", self.group, reduce)
        self.buffers = (grad, mine)
        return mine[: self.counts[self.rank]]

    def wait_reduce(self) -> Tensor:
        work, mine = self.work, self.buffers[1]
        guarded("reduce-scattering key/value gradients", self.group, lambda: work.wait())
        if self.fallback is not None:
            at = self.rank * self.longest
            mine.copy_(self.fallback[at : at + self.longest])
        self.work, self.buffers, self.fallback = None, (), None
        return mine[: self.counts[self.rank]]


class _GatherPosted(torch.autograd.Function):
    """Posts the all-gather and passes ``local`` on. Its backward waits for
    the reduce-scatter that :class:`_GatherReceived`'s backward posted: this
    node is created before the work done while the gather is in flight, and
    the autograd engine runs later nodes first, so that work's backward runs
    between the two while the gradients travel."""

    @staticmethod
    def forward(ctx: Any, local: Tensor, state: _GatherState) -> Tensor:
        state.post_gather(local)
        ctx.state = state
        return local.view_as(local)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        # ``grad`` is the buffer the reduce-scatter fills: complete after the wait
        return ctx.state.wait_reduce(), None


class _GatherReceived(torch.autograd.Function):
    """Waits for the all-gather; its backward posts the reduce-scatter and returns at once."""

    @staticmethod
    def forward(ctx: Any, posted: Tensor, state: _GatherState) -> Tensor:
        ctx.state = state
        return state.wait_gather()

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        return ctx.state.post_reduce(grad), None


class _GatherAtOnce(torch.autograd.Function):
    """The all-gather and, in the backward, the reduce-scatter, each run to
    completion in place: the form a ``torch.compile`` trace takes into its
    graph (Dynamo does not trace ``async_op=True``, a work's ``wait``, or the
    state two autograd nodes share)."""

    @staticmethod
    def forward(ctx: Any, local: Tensor, counts: tuple[int, ...], group: Group) -> Tensor:
        world, longest = len(counts), max(counts)
        ctx.counts, ctx.group, ctx.rank = counts, group, dist.get_rank(group)
        padded = torch.cat([local, local.new_zeros((longest - local.shape[0], *local.shape[1:]))])
        out = local.new_empty((longest * world, *local.shape[1:]))
        _ALL_GATHER(out, padded.contiguous(), group=group)
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None]:
        counts = ctx.counts
        mine = grad.new_empty((max(counts), *grad.shape[1:]))
        _REDUCE_SCATTER(mine, grad.contiguous(), group=ctx.group)
        return mine[: counts[ctx.rank]], None, None


class PendingGather:
    """An all-gather posted by :func:`post_all_gather`: work done before
    :meth:`wait` overlaps the transfer, and in the backward the
    reduce-scatter of the gradient overlaps that work's backward. Where
    ``state`` is None, ``posted`` is the gathered buffer already."""

    def __init__(self, posted: Tensor, state: _GatherState | None) -> None:
        self._posted, self._state = posted, state

    def wait(self) -> Tensor:
        """``[world * max(counts), ...]``: rank ``s``'s tokens at
        ``s * max(counts)``, zero padding after them."""
        if self._state is None:
            return self._posted
        out: Tensor = _GatherReceived.apply(self._posted, self._state)  # type: ignore[no-untyped-call]
        return out


def post_all_gather(
    local: Tensor, counts: Sequence[int], group: Group, overlap: bool = True
) -> PendingGather:
    """Start gathering every rank's tokens (``local`` is ``[counts[rank], ...]``);
    :meth:`PendingGather.wait` returns them, differentiable. The backward
    reduce-scatters the gradient, so each rank gets the gradient of the
    tokens it sent, summed over every rank that read them: posted as soon
    as the gradient of the gathered tokens is complete, waited for when the
    gradient of ``local`` is needed. On NCCL both waits are stream waits (no
    host synchronisation); on gloo they block the host. ``overlap=False``
    runs both collectives at once, synchronously (in a ``torch.compile``
    trace: Dynamo does not trace ``async_op=True`` or a work's ``wait``)."""
    if not overlap:
        done: Tensor = _GatherAtOnce.apply(local, tuple(counts), group)  # type: ignore[no-untyped-call]
        return PendingGather(done, None)
    state = _GatherState(tuple(counts), group)
    posted: Tensor = _GatherPosted.apply(local, state)  # type: ignore[no-untyped-call]
    return PendingGather(posted, state)


def all_gather_tokens(local: Tensor, counts: Sequence[int], group: Group) -> Tensor:
    """``local`` is ``[counts[rank], ...]``; returns ``[world * max(counts), ...]``:
    rank ``s``'s tokens at ``s * max(counts)``, zero padding after them."""
    return post_all_gather(local, counts, group).wait()


BLOCKS, GRADIENTS = 0, 1
"""Tags of a ring's two streams of messages: the key/value blocks, and the
backward's block gradients, which travel between the same ranks while a
block is in flight (gloo matches by tag; NCCL by order, which is the same
on every rank)."""


class PendingExchange:
    """An exchange posted by :func:`post_exchange`, not yet waited for.

    :meth:`wait` returns the received tensor. Until then the send buffer
    must not change and the receive buffer is not filled; this object keeps
    both alive. On NCCL ``wait()`` makes the current stream wait for the
    transfer (no host synchronisation); on gloo it blocks the host."""

    def __init__(self, received: Tensor, requests: list[Any], send: Tensor | None, group: Group) -> None:
        self.received, self._requests, self._send, self._group = received, requests, send, group

    def wait(self) -> Tensor:
        """The received tensor, once the transfer (both directions) is done."""
        if self._requests:
            requests = self._requests

            def run() -> None:
                for request in requests:
                    request.wait()

            guarded("passing keys/values around the ring", self._group, run)
        self._requests, self._send = [], None
        return self.received


def post_exchange(
    send: Tensor, to: int, receive_shape: Sequence[int], source: int, group: Group, tag: int = BLOCKS
) -> PendingExchange:
    """Start sending ``send`` to rank ``to`` and receiving ``receive_shape``
    from rank ``source`` (ranks of ``group``); returns at once. Work done
    before :meth:`PendingExchange.wait` overlaps with the transfer: the
    isend/irecv run on the backend's own threads (gloo) or its own stream
    (NCCL), so no side stream is needed here. ``tag`` keeps apart messages
    that are in flight between the same ranks at once (:data:`BLOCKS`,
    :data:`GRADIENTS`)."""
    world = dist.get_world_size(group)
    send = send.contiguous()
    received = send.new_empty(tuple(receive_shape))
    ops = []
    if send.numel():
        ops.append(dist.P2POp(dist.isend, send, _global(group, to % world), group, tag))
    if received.numel():
        ops.append(dist.P2POp(dist.irecv, received, _global(group, source % world), group, tag))
    requests: list[Any] = []
    if ops:
        requests = guarded(
            "passing keys/values around the ring", group, lambda: list(dist.batch_isend_irecv(ops) or [])
        )
    return PendingExchange(received, requests, send, group)


def _exchange(send: Tensor, to: int, receive_shape: Sequence[int], source: int, group: Group) -> Tensor:
    return post_exchange(send, to, receive_shape, source, group).wait()


class _Shift(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, block: Tensor, receive_shape: tuple[int, ...], group: Group) -> Tensor:
        rank, world = dist.get_rank(group), dist.get_world_size(group)
        ctx.shape, ctx.group, ctx.rank, ctx.world = tuple(block.shape), group, rank, world
        return _exchange(block, (rank + 1) % world, receive_shape, (rank - 1) % world, group)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None]:
        rank, world = ctx.rank, ctx.world
        back = _exchange(grad, (rank - 1) % world, ctx.shape, (rank + 1) % world, ctx.group)
        return back, None, None


def exchange_tokens(send: Tensor, to: int, receive_shape: Sequence[int], source: int, group: Group) -> Tensor:
    """Send ``send`` to rank ``to`` and return what rank ``source`` sends
    (``receive_shape``), not differentiable: for code that runs its own
    backward (the ring's). Ranks are those of ``group``."""
    world = dist.get_world_size(group)
    return _exchange(send, to % world, receive_shape, source % world, group)


def shift_tokens(block: Tensor, receive_shape: Sequence[int], group: Group) -> Tensor:
    """Send ``block`` to the next rank; return the previous rank's block
    (``receive_shape``: known from the placement)."""
    out: Tensor = _Shift.apply(block, tuple(receive_shape), group)  # type: ignore[no-untyped-call]
    return out
