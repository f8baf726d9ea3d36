"""CUDA-graph capture of the executors and of a whole attention module.

A captured graph replays kernels with no host work, which is what removes the
per-call Python cost on layouts with many small calls. Capture fails on any
host synchronisation or pageable host-to-device copy inside the step, so these
tests are also the check that the hot path has none after its first call for
a layout (which builds and caches the layout's device tables).
GPU only: every test here is skipped without CUDA.
"""

from __future__ import annotations

import pytest
import torch
from reference import relative_error
from torch import Tensor

import patternc
from patternc.nn import PatternAttention
from patternc.nn.executors import EXECUTORS
from patternc.nn.executors.common import AttentionInputs
from patternc.nn.schedule import schedule_for

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

LAYOUTS = {
    "ab-upt joint": (
        "groups sa sq va vq\nsa, va -> sa, va\nsq -> sa\nvq -> va",
        {"sa": 96, "sq": 200, "va": 96, "vq": 200},
    ),
    "documents": ("groups doc*\ndoc* -> self", {f"doc{i}": 17 + 23 * i for i in range(7)}),
    "windowed causal": ("groups a b\na -> a [window 33]\nb -> a, b [causal]", {"a": 130, "b": 77}),
}


def _capture(step: object, warmups: int = 3) -> tuple[torch.cuda.CUDAGraph, Tensor]:
    """Warm ``step`` up on a side stream (caches fill there), then capture it."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(warmups):
            step()  # type: ignore[operator]
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()  # type: ignore[operator]
    return graph, out


@pytest.mark.parametrize("executor", ["batched", "varlen", "auto"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_executor_replays_a_captured_graph(executor: str, layout: str) -> None:
    source, sizes = LAYOUTS[layout]
    plan = patternc.compile(source).patterns["default"]
    schedule = schedule_for(plan.token_specs(sizes), plan)
    n, heads, dim = schedule.n_tokens, 4, 32
    static = [torch.randn(2, n, heads, dim, device="cuda", dtype=torch.bfloat16) for _ in range(3)]
    run = EXECUTORS[executor]

    def step() -> Tensor:
        return run(AttentionInputs(*static, schedule, {}, None, 0.0, None))

    graph, out = _capture(step)
    for _ in range(2):  # new data through the same graph
        fresh = [torch.randn_like(t) for t in static]
        for buffer, value in zip(static, fresh):
            buffer.copy_(value)
        graph.replay()
        torch.cuda.synchronize()
        eager = step()
        assert torch.equal(out, eager), f"{executor} on {layout}: replay differs from an eager run"
        ref = EXECUTORS["dense"](
            AttentionInputs(*(t.double().cpu() for t in fresh), schedule, {}, None, 0.0, None)
        )
        error = relative_error(out.double().cpu(), ref)
        assert error < 2e-2, f"{executor} on {layout}: replay is {error:.2e} from the float64 dense reference"


def test_module_forward_and_backward_graphed() -> None:
    """``make_graphed_callables`` captures forward and backward of a whole
    ``PatternAttention`` (projections, executor, cache views); gradients of the
    graphed module match the eager module's."""
    source, sizes = LAYOUTS["ab-upt joint"]
    plan = patternc.compile(source).patterns["default"]
    config = patternc.MixedAttentionConfig(hidden_dim=64, num_heads=4)
    eager = PatternAttention(config, plan).cuda()
    graphed_module = PatternAttention(config, plan).cuda()
    graphed_module.load_state_dict(eager.state_dict())
    n = sum(sizes.values())
    sample = torch.randn(2, n, 64, device="cuda", requires_grad=True)
    graphed = patternc.nn.graphed(graphed_module, sizes, sample)
    x = torch.randn(2, n, 64, device="cuda", requires_grad=True)
    x_eager = x.detach().clone().requires_grad_()
    weight = torch.randn(2, n, 64, device="cuda")
    (graphed(x) * weight).sum().backward()
    (eager(x_eager, sizes)[0] * weight).sum().backward()
    assert x.grad is not None and x_eager.grad is not None
    assert relative_error(x.grad.double(), x_eager.grad.double()) < 1e-4
    for (name, p_graph), p_eager in zip(graphed_module.named_parameters(), eager.parameters()):
        assert p_graph.grad is not None and p_eager.grad is not None, name
        assert relative_error(p_graph.grad.double(), p_eager.grad.double()) < 1e-4, name
