"""A blockwise call's autograd function, and the same call as a torch custom
operator where ``torch.compile`` traces the layer.

A ring or a halo passes keys and gradients between ranks with
``isend``/``irecv``, which Dynamo does not trace. Eagerly, a call is the
autograd function :class:`Attend`. Under ``torch.compile`` a call that
passes keys is the operator ``patternc::pass_keys`` (its backward
``patternc::pass_keys_backward``): opaque to Dynamo, shaped by a fake
implementation, so the whole layer is one graph with the operator in it
and ``fullgraph=True`` holds. The operator finds its call's blocks through
an integer handle (:func:`register`): an operator's arguments are tensors
and plain values, and the blocks (kernels, the ring's ranks, the process
group) are neither. Dropout keeps the graph break: its backward replays the
forward's random state, which the autograd function carries and the
operator would have to return.
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import weakref
from collections.abc import Hashable, Iterator, Sequence
from typing import Any, Protocol

import torch
from torch import Tensor

from patternc.distributed.blockwise import Kernel, StepArgs

__all__ = ["Attend", "CallRun", "Gradients", "RunSource", "attend", "register"]

Gradients = tuple[Tensor, Tensor | None, list[Tensor]]
"""The gradients of a call's queries, its main keys/values (this rank's own
or the ring's first block) and each of its fixed blocks."""


class CallRun(Protocol):
    """A call's blocks and the arguments of its steps (a ring's or a halo's)."""

    @property
    def args(self) -> StepArgs: ...

    def forward(self, q: Tensor, main_kv: Tensor, kvs: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
        """The merged output ``[B, N, H, D]`` and its log-sum-exp ``[B, H, N]``."""
        ...

    def backward(
        self, grad: Tensor, q: Tensor, main_kv: Tensor, out: Tensor, lse: Tensor, kvs: Sequence[Tensor]
    ) -> Gradients:
        """The gradients from the merged output, its gradient and log-sum-exp."""
        ...


class RunSource(Protocol):
    """What builds a call's run from the operator's plain arguments: which
    fixed blocks (``blocks``, codes of the call's own choosing) and the
    steps' arguments."""

    def run_of(self, blocks: Sequence[int], kvs: Sequence[Tensor], args: StepArgs) -> CallRun: ...


@contextlib.contextmanager
def _replayed_dropout(state: Tensor | None, device: torch.device) -> Iterator[None]:
    """Inside: the random state the forward's dropout started from (the
    backward draws the same masks in the same order), restored after."""
    if state is None:
        yield
        return
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices, device_type=device.type):
        if device.type == "cuda":
            torch.cuda.set_rng_state(state, device)
        else:
            torch.set_rng_state(state)
        yield


_AUTOGRAD_KEYS = tuple(
    getattr(torch._C.DispatchKey, name)
    for name in ("ADInplaceOrView", "AutogradCPU", "AutogradCUDA", "AutogradOther", "AutogradFunctionality")
    if hasattr(torch._C.DispatchKey, name)
)


@contextlib.contextmanager
def _autograd_inside() -> Iterator[None]:
    """Autograd inside an operator's implementation: the dispatcher runs a
    custom operator's backward below autograd (its keys excluded), where the
    blocks that need a mask compute their gradients with
    ``torch.autograd.grad`` through their recomputed forward. Only the keys
    found excluded are let through, and they are excluded again in reverse
    order (a backend's autograd key and the autograd functionality share a
    bit: the last write wins)."""
    excluded = [key for key in _AUTOGRAD_KEYS if torch._C._dispatch_tls_is_dispatch_key_excluded(key)]
    try:
        for key in excluded:
            torch._C._dispatch_tls_set_dispatch_key_excluded(key, False)
        with torch.enable_grad():
            yield
    finally:
        for key in reversed(excluded):
            torch._C._dispatch_tls_set_dispatch_key_excluded(key, True)


def _rng_state(device: torch.device) -> Tensor:
    return torch.cuda.get_rng_state(device) if device.type == "cuda" else torch.get_rng_state()


class Attend(torch.autograd.Function):
    """A call's merged output from its run, its queries ``q``, its main
    keys/values (the ring's first block, or this rank's own keys of a halo)
    and its fixed blocks ``kvs``. Only the inputs, the output and its
    log-sum-exp are kept; the backward recomputes each block (dropout from
    the forward's random state)."""

    @staticmethod
    def forward(ctx: Any, run: CallRun, q: Tensor, main_kv: Tensor, *kvs: Tensor) -> Tensor:
        ctx.state = _rng_state(q.device) if run.args.dropout_p > 0 else None
        out, lse = run.forward(q, main_kv, kvs)
        ctx.run = run
        ctx.save_for_backward(q, main_kv, out, lse, *kvs)
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        q, main_kv, out, lse, *kvs = ctx.saved_tensors
        with _replayed_dropout(ctx.state, q.device):
            dq, d_main, dkvs = ctx.run.backward(grad, q, main_kv, out, lse, kvs)
        return (None, dq, d_main, *dkvs)


KEPT = 16
"""How many of the most recently used calls are held besides their owners."""
_LIVE: weakref.WeakValueDictionary[int, RunSource] = weakref.WeakValueDictionary()
"""Handle -> the newest live call of that handle's definition."""
_KEPT: collections.OrderedDict[int, RunSource] = collections.OrderedDict()
"""The :data:`KEPT` most recently used calls, least recent first."""
_HANDLES: dict[Hashable, int] = {}
"""A call's definition -> its handle, while some call of it lives."""
_DEFINITIONS: dict[int, Hashable] = {}
_COUNTER = itertools.count()


def register(source: RunSource, definition: Hashable) -> int:
    """The handle the operator finds ``source`` by. Calls of one
    ``definition`` (everything that decides what they compute) share a
    handle, so a compiled graph, which holds the handle as a constant, needs
    no new compile for a new ``ContextParallel`` of the same layout, and
    finds the newest such call. The :data:`KEPT` most recently used calls
    are held, so a backward still finds its call after the
    ``ContextParallel`` that built it is gone; older ones live as long as
    their owners (a call holds its blocks' tables, so a layout that changes
    every step does not pile them up)."""
    handle = _HANDLES.get(definition)
    if handle is None:
        handle = next(_COUNTER)
        _HANDLES[definition], _DEFINITIONS[handle] = handle, definition
    _LIVE[handle] = source
    weakref.finalize(source, _forget, handle)
    _hold(handle, source)
    return handle


def _forget(handle: int) -> None:
    """A call is gone: its definition's handle goes too unless a newer call of it lives."""
    if handle not in _LIVE:
        definition = _DEFINITIONS.pop(handle, None)
        if definition is not None:
            _HANDLES.pop(definition, None)


def _hold(handle: int, source: RunSource) -> None:
    _KEPT[handle] = source
    _KEPT.move_to_end(handle)
    while len(_KEPT) > KEPT:
        _KEPT.popitem(last=False)


def _run(handle: int, blocks: Sequence[int], kvs: Sequence[Tensor], args: StepArgs) -> CallRun:
    source = _LIVE.get(handle)
    if source is None:
        raise RuntimeError(
            "patternc::pass_keys: the context-parallel call this compiled graph was traced with is no "
            f"longer held (its ContextParallel is gone, and {KEPT} other calls ran since); run a step "
            "with that layout eagerly or build its ContextParallel again, and the graph finds the new call"
        )
    _hold(handle, source)
    return source.run_of(blocks, kvs, args)


@torch.library.custom_op("patternc::pass_keys", mutates_args=())
def _pass_keys(
    handle: int,
    blocks: list[int],
    q: Tensor,
    main_kv: Tensor,
    kvs: list[Tensor],
    slopes: Tensor | None,
    dim: int,
    scale: float,
    padded: bool,
    kernel: str,
) -> tuple[Tensor, Tensor]:
    args = StepArgs(dim, scale, 0.0, slopes, padded, _kernel(kernel))
    out, lse = _run(handle, blocks, kvs, args).forward(q, main_kv, kvs)
    return out.contiguous(), lse.contiguous()


@_pass_keys.register_fake  # type: ignore[misc,unused-ignore]
def _pass_keys_shapes(
    handle: int,
    blocks: list[int],
    q: Tensor,
    main_kv: Tensor,
    kvs: list[Tensor],
    slopes: Tensor | None,
    dim: int,
    *_: object,
) -> tuple[Tensor, Tensor]:
    batch, n, heads, _width = q.shape
    lse_dtype = torch.promote_types(q.dtype, torch.float32)
    return q.new_empty((batch, n, heads, dim)), q.new_empty((batch, heads, n), dtype=lse_dtype)


@torch.library.custom_op("patternc::pass_keys_backward", mutates_args=())
def _pass_keys_backward(
    handle: int,
    blocks: list[int],
    grad: Tensor,
    q: Tensor,
    main_kv: Tensor,
    out: Tensor,
    lse: Tensor,
    kvs: list[Tensor],
    slopes: Tensor | None,
    dim: int,
    scale: float,
    padded: bool,
    kernel: str,
) -> list[Tensor]:
    args = StepArgs(dim, scale, 0.0, slopes, padded, _kernel(kernel))
    run = _run(handle, blocks, kvs, args)
    grad, q, main_kv, out, lse = (t.detach() for t in (grad, q, main_kv, out, lse))  # none differentiated
    with _autograd_inside():  # but a masked block's backward recomputes it under autograd
        dq, d_main, dkvs = run.backward(grad, q, main_kv, out, lse, [kv.detach() for kv in kvs])
    grads = [dq, d_main if d_main is not None else torch.zeros_like(main_kv), *dkvs]
    return [g.contiguous() for g in grads]  # the layout the fake promises


@_pass_keys_backward.register_fake  # type: ignore[misc,unused-ignore]
def _pass_keys_backward_shapes(
    handle: int,
    blocks: list[int],
    grad: Tensor,
    q: Tensor,
    main_kv: Tensor,
    out: Tensor,
    lse: Tensor,
    kvs: list[Tensor],
    *_: object,
) -> list[Tensor]:
    return [t.new_empty(t.shape) for t in (q, main_kv, *kvs)]


def _keep_for_backward(ctx: Any, inputs: tuple[Any, ...], output: tuple[Tensor, Tensor]) -> None:
    handle, blocks, q, main_kv, kvs, slopes, dim, scale, padded, kernel = inputs
    out, lse = output
    ctx.plain = (handle, blocks, dim, scale, padded, kernel, len(kvs), slopes is not None)
    ctx.save_for_backward(q, main_kv, out, lse, *kvs, *([slopes] if slopes is not None else []))


def _backward(ctx: Any, grad: Tensor | None, _grad_lse: Tensor | None) -> tuple[Any, ...]:
    handle, blocks, dim, scale, padded, kernel, n_kvs, has_slopes = ctx.plain
    q, main_kv, out, lse, *rest = ctx.saved_tensors
    kvs, slopes = rest[:n_kvs], (rest[n_kvs] if has_slopes else None)
    if grad is None:
        grad = torch.zeros_like(out)
    grads = torch.ops.patternc.pass_keys_backward(
        handle, blocks, grad, q, main_kv, out, lse, kvs, slopes, dim, scale, padded, kernel
    )
    # one entry per input, in the structure the operator checks: None for a
    # list of ints, but an empty list stays a list (it could hold tensors)
    no_grad_blocks: list[None] | None = None if blocks else []
    return None, no_grad_blocks, grads[0], grads[1], list(grads[2:]), None, None, None, None, None


_pass_keys.register_autograd(_backward, setup_context=_keep_for_backward)


def _kernel(name: str) -> Kernel:
    if name not in ("auto", "flex", "reference"):
        raise ValueError(f"unknown block kernel {name!r}")
    return name  # type: ignore[return-value]


@torch.compiler.disable  # type: ignore[misc,untyped-decorator,unused-ignore]
def _eagerly(run: CallRun, q: Tensor, main_kv: Tensor, kvs: Sequence[Tensor]) -> Tensor:
    """:class:`Attend` run eagerly under ``torch.compile`` (a graph break:
    dropout, whose random state the autograd function carries)."""
    out: Tensor = Attend.apply(run, q, main_kv, *kvs)  # type: ignore[no-untyped-call]
    return out


def attend(
    run: CallRun, handle: int, blocks: Sequence[int], q: Tensor, main_kv: Tensor, kvs: Sequence[Tensor]
) -> Tensor:
    """A call that passes keys between ranks: its merged output, by
    :class:`Attend` eagerly and by the operator under ``torch.compile``
    (``handle`` and ``blocks``: how the operator finds ``run`` again)."""
    if not torch.compiler.is_compiling():
        out: Tensor = Attend.apply(run, q, main_kv, *kvs)  # type: ignore[no-untyped-call]
        return out
    args = run.args
    if args.dropout_p > 0:
        eager: Tensor = _eagerly(run, q, main_kv, kvs)
        return eager
    plain = (args.slopes, args.dim, args.scale, args.padded, args.kernel)
    operator: Any = torch.ops.patternc.pass_keys
    merged: tuple[Tensor, Tensor] = operator(handle, list(blocks), q, main_kv, list(kvs), *plain)
    return merged[0]
