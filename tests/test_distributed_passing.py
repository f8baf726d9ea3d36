"""A blockwise call as the custom operator ``patternc::pass_keys`` under
``torch.compile`` (one process, fixed blocks standing in for received
ones): one graph with ``fullgraph=True`` under the ``eager`` and
``aot_eager`` backends (the latter traces the operator's fake shapes and its
backward), output and gradients against a float64 dense reference at
several sizes; torch's own operator checks in float32 and bfloat16; calls of
one definition share a handle; dropout runs eagerly; a call no longer held
and an unknown kernel name each raise a message that says what to do."""

from __future__ import annotations

import gc
import itertools
from typing import Any

import pytest
import torch

from patternc.distributed import passing
from patternc.distributed.blockwise import BlockKernel, Segment, StepArgs
from patternc.distributed.calls import _Run

_DEFINED = itertools.count()


class _Source:
    """A call's stand-in for :func:`passing.register`: its run over fixed blocks."""

    def __init__(self, kernels: list[BlockKernel], definition: object = None) -> None:
        self.kernels = kernels
        self.handle = passing.register(
            self, definition if definition is not None else ("test", next(_DEFINED))
        )

    def run_of(self, blocks: Any, kvs: Any, args: StepArgs) -> _Run:
        return _Run(tuple(self.kernels[code] for code in blocks), None, args)


def _case(
    n_q: int, first: int, second: int, window: int, dropout_p: float = 0.0
) -> tuple[_Source, StepArgs, torch.Tensor, list[torch.Tensor], torch.Tensor]:
    """``n_q`` queries after ``first + second`` keys in two blocks, each
    reading keys up to ``window`` before it (causal): the call, its step
    arguments, Q and the blocks' packed K/V (float64, random), and the
    dense mask of allowed pairs over both blocks."""
    start = first + second - n_q // 2
    queries = [Segment(0, start, n_q)]
    blocks = [[Segment(0, 0, first)], [Segment(0, first, second)]]
    band = (((-window, 0, 1, 0),),)
    kernels = [BlockKernel(queries, keys, band, True, torch.device("cpu"), 32) for keys in blocks]
    args = StepArgs(8, 8**-0.5, dropout_p, None, False, "reference")
    gen = torch.Generator().manual_seed(n_q + first + second)
    q = torch.randn(2, n_q, 2, 8, generator=gen, dtype=torch.float64)
    kvs = [torch.randn(2, n, 2, 16, generator=gen, dtype=torch.float64) for n in (first, second)]
    pos_q = torch.arange(start, start + n_q)[:, None]
    pos_k = torch.arange(first + second)[None, :]
    mask = (pos_k <= pos_q) & (pos_k >= pos_q - window)
    return _Source(kernels), args, q, kvs, mask


def _dense(q: torch.Tensor, kvs: list[torch.Tensor], mask: torch.Tensor, scale: float) -> torch.Tensor:
    """The float64 softmax over both blocks under ``mask`` (rows with no key: zeros)."""
    kv = torch.cat(kvs, dim=1)
    k, v = kv[..., :8], kv[..., 8:]
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) * scale
    weights = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1).nan_to_num(0.0)
    return torch.einsum("bhqk,bkhd->bqhd", weights, v)


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
@pytest.mark.parametrize(
    ("n_q", "first", "second", "window"), [(40, 33, 61, 20), (7, 5, 3, 2), (97, 64, 129, 200)]
)
def test_operator_compiles_in_one_graph_and_matches_dense(
    backend: str, n_q: int, first: int, second: int, window: int
) -> None:
    source, args, q, kvs, mask = _case(n_q, first, second, window)
    run = source.run_of([0, 1], kvs, args)
    empty = q.new_zeros(2, 0, 2, 16)

    def layer(q: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return passing.attend(run, source.handle, [0, 1], q * 1.0, empty, [a, b]) * 2.0

    torch._dynamo.reset()
    explained = torch._dynamo.explain(layer)(q, *kvs)
    assert explained.graph_count == 1 and explained.graph_break_count == 0, explained.break_reasons
    compiled = torch.compile(layer, backend=backend, fullgraph=True)
    inputs = [t.clone().requires_grad_(True) for t in (q, *kvs)]
    out = compiled(*inputs)
    probe = torch.randn_like(out)
    grads = torch.autograd.grad((out * probe).sum(), inputs)
    dense_inputs = [t.clone().requires_grad_(True) for t in (q, *kvs)]
    ref = _dense(dense_inputs[0], dense_inputs[1:], mask, args.scale) * 2.0
    ref_grads = torch.autograd.grad((ref * probe).sum(), dense_inputs)
    assert (out - ref).norm() / ref.norm() < 1e-12
    for got, want in zip(grads, ref_grads, strict=True):  # a block no query reaches: zero both ways
        assert (got - want).norm() <= 1e-12 * max(float(want.norm()), 1.0)


def test_dropout_runs_eagerly_inside_a_compiled_layer() -> None:
    """Dropout's backward replays the forward's random state, which only the
    autograd function carries: under compile the call runs eagerly (so
    ``fullgraph=True`` refuses it), with the same output as the eager call
    from the same seed."""
    source, args, q, kvs, _ = _case(30, 20, 25, 9, dropout_p=0.3)
    run = source.run_of([0, 1], kvs, args)
    empty = q.new_zeros(2, 0, 2, 16)

    def layer(q: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return passing.attend(run, source.handle, [0, 1], q * 1.0, empty, [a, b]) + 0.0

    torch._dynamo.reset()
    with pytest.raises(Exception, match="disable"):
        torch.compile(layer, backend="eager", fullgraph=True)(q, *kvs)
    torch._dynamo.reset()
    torch.manual_seed(3)
    compiled = torch.compile(layer, backend="eager")(q, *kvs)
    torch.manual_seed(3)
    eager = layer(q, *kvs)
    assert torch.equal(compiled, eager)


def test_calls_of_one_definition_share_a_handle_and_the_newest_is_found() -> None:
    """A new call of the same definition (a new ``ContextParallel`` of the
    same layout) gets the handle a compiled graph already holds, and the
    operator runs the newest call: its result is that call's."""
    first, args, q, kvs, mask = _case(9, 6, 7, 4)
    second = _Source(first.kernels, definition=("same", 1))
    third = _Source(list(reversed(first.kernels)), definition=("same", 1))
    assert second.handle == third.handle != first.handle
    empty = q.new_zeros(2, 0, 2, 16)
    plain = (None, args.dim, args.scale, False, "reference")
    out, _ = torch.ops.patternc.pass_keys(third.handle, [0, 1], q, empty, list(reversed(kvs)), *plain)
    ref = _dense(q, kvs, mask, args.scale)
    assert (out - ref).norm() / ref.norm() < 1e-12


def test_a_call_no_longer_held_and_an_unknown_kernel_say_what_to_do() -> None:
    """A call stays findable after its owner drops it while it is among the
    most recently used; once newer calls push it out it is gone."""
    source, args, q, kvs, _ = _case(6, 4, 5, 3)
    kernels, handle = source.kernels, source.handle
    empty = q.new_zeros(2, 0, 2, 16)
    plain = (None, args.dim, args.scale, False)
    with pytest.raises(ValueError, match="unknown block kernel 'fast'"):
        torch.ops.patternc.pass_keys(handle, [0, 1], q, empty, kvs, *plain, "fast")
    del source
    gc.collect()
    out, _ = torch.ops.patternc.pass_keys(handle, [0, 1], q, empty, kvs, *plain, "reference")  # still held
    newer = [_Source(kernels) for _ in range(passing.KEPT)]  # push it out
    gc.collect()
    with pytest.raises(
        RuntimeError, match=r"no longer held \(its ContextParallel is gone, and 16 other calls"
    ):
        torch.ops.patternc.pass_keys(handle, [0, 1], q, empty, kvs, *plain, "reference")
    assert len(newer) == passing.KEPT and out.isfinite().all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_operators_pass_torchs_checks(dtype: torch.dtype) -> None:
    """``torch.library.opcheck`` (schema, fake shapes and strides, autograd
    registration, AOT dispatch) on both operators, queries not contiguous."""
    source, args, q, kvs, _ = _case(24, 16, 20, 8)
    q = q.to(dtype).transpose(1, 2).contiguous().transpose(1, 2).requires_grad_(True)
    kvs = [kv.to(dtype).requires_grad_(True) for kv in kvs]
    empty = q.new_zeros(2, 0, 2, 16)
    plain = (None, args.dim, args.scale, False, "reference")
    torch.library.opcheck(torch.ops.patternc.pass_keys, (source.handle, [0, 1], q, empty, kvs, *plain))
    out, lse = torch.ops.patternc.pass_keys(source.handle, [0, 1], q, empty, kvs, *plain)
    assert lse.dtype == torch.float32
    grad = torch.randn_like(out)
    backward_args = (source.handle, [0, 1], grad, q.detach(), empty, out.detach(), lse.detach())
    torch.library.opcheck(
        torch.ops.patternc.pass_keys_backward, (*backward_args, [kv.detach() for kv in kvs], *plain)
    )


def test_dropped_calls_leave_nothing_behind() -> None:
    """Layouts that change every step build new calls each step: past the
    most recently used ones, a dropped call and its definition's handle are
    let go (the calls hold their blocks' tables)."""
    source, _, _, _, _ = _case(6, 4, 5, 3)
    before = len(passing._HANDLES)
    for _ in range(3 * passing.KEPT):
        _Source(source.kernels)
    gc.collect()
    assert len(passing._HANDLES) <= before + passing.KEPT
    assert len(passing._KEPT) == passing.KEPT
