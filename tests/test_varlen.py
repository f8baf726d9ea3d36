"""The ``varlen`` executor (every call one segment of a variable-length
launch) and ``auto`` (a cost model picks the executor). GPU tests skip
without CUDA; on CPU both fall back to ``batched``."""

from __future__ import annotations

import warnings

import pytest
import torch
from reference import relative_error
from test_flex import MODIFIED, make, reference_with_modifiers

import patternc
from patternc.nn.executors import varlen
from patternc.nn.executors.auto import _estimates, choose
from patternc.nn.executors.common import AttentionInputs
from patternc.nn.schedule import schedule_for

AB = patternc.compile(open("examples/ab_upt.pc").read())
DOCS = patternc.compile("groups doc*\ndoc* -> self [causal]").patterns["default"]
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def ab_sizes(anchors: int, queries: int) -> dict[str, int]:
    return {
        "surface_anchors": anchors,
        "surface_queries": queries,
        "volume_anchors": anchors,
        "volume_queries": queries,
    }


def test_launch_layout_views_where_it_can() -> None:
    device = torch.device("cpu")
    # anchors: queries are the input in order, keys are the two anchor groups (gathered)
    schedule = schedule_for(AB["self_anchor"].token_specs(ab_sizes(3, 5)), AB["self_anchor"])
    (launch,) = varlen._launches(schedule, 2, device)  # type: ignore[misc]
    assert launch.q_index is None
    assert launch.kv_index is not None and launch.kv_index.tolist() == [
        0,
        1,
        2,
        8,
        9,
        10,
        16,
        17,
        18,
        24,
        25,
        26,
    ]
    assert launch.cu_seq_q.tolist() == [0, 8, 16, 24, 32] and launch.cu_seq_k.tolist() == [0, 3, 6, 9, 12]
    assert (launch.max_q, launch.max_k, launch.window) == (8, 3, (-1, -1))
    # documents attending to themselves: no copy at all, causal as the kernel's window
    docs = schedule_for(DOCS.token_specs({"doc0": 4, "doc1": 7}), DOCS)
    (launch,) = varlen._launches(docs, 1, device)  # type: ignore[misc]
    assert launch.q_index is None and launch.kv_index is None
    assert launch.window == (-1, 0) and launch.cu_seq_q.tolist() == [0, 4, 11]


def test_modifiers_split_launches_or_refuse() -> None:
    plan = MODIFIED.patterns["default"]
    sizes = {"doc0": 5, "doc1": 6, "image": 3, "text": 4}
    reason = varlen._launches(schedule_for(plan.token_specs(sizes), plan), 1, torch.device("cpu"))
    assert reason == "[causal] across groups of different positions"  # text -> image, text [causal]
    windowed = patternc.compile("groups a b\na -> a [causal]\nb -> b [window 3]").patterns["default"]
    launches = varlen._launches(
        schedule_for(windowed.token_specs({"a": 4, "b": 6}), windowed), 1, torch.device("cpu")
    )
    assert not isinstance(launches, str)
    assert [launch.window for launch in launches] == [(-1, 0), (2, 2)]
    assert launches[0].q_index is not None and launches[0].q_index.tolist() == [0, 1, 2, 3]


def test_cpu_falls_back_to_batched_with_a_warning() -> None:
    varlen._warned.clear()
    module = make(AB["joint"], "varlen")
    sizes = ab_sizes(3, 6)
    x = torch.randn(2, 18, 16)
    with pytest.warns(UserWarning, match="implementation='varlen' runs as 'batched' for CPU tensors"):
        out, _ = module(x, sizes)
    assert relative_error(out, reference_with_modifiers(module, x, sizes)) < 1e-5


def test_auto_picks_batched_on_cpu() -> None:
    plan = AB["joint"]
    schedule = schedule_for(plan.token_specs(ab_sizes(3, 6)), plan)
    q = torch.randn(1, 18, 2, 8)
    assert choose(AttentionInputs(q, q, q, schedule, {}, None, 0.0, None)) == "batched"
    module = make(plan, "auto")
    x = torch.randn(2, 18, 16)
    out, _ = module(x, ab_sizes(3, 6))
    assert relative_error(out, reference_with_modifiers(module, x, ab_sizes(3, 6))) < 1e-5


def test_cost_model_ranks_layouts_sensibly() -> None:
    """Many small documents: one varlen launch beats dozens of SDPA launches;
    a dense layout: dense attention is never worse than masking it."""
    docs = schedule_for(DOCS.token_specs({f"doc{i}": 300 + 7 * i for i in range(64)}), DOCS)
    for training in (False, True):
        ranked = [e.backend for e in _estimates(docs, 1, 12, 64, torch.device("cpu"), True, True, training)]
        assert ranked[0] == "varlen" and ranked[-1] == "dense"
    full = patternc.compile("groups a b\n* -> *").patterns["default"]
    dense = schedule_for(full.token_specs({"a": 512, "b": 512}), full)
    ranked = [e.backend for e in _estimates(dense, 1, 12, 64, torch.device("cpu"), True, False)]
    assert ranked.index("dense") < ranked.index("flex")


def test_cost_model_prices_the_backward_in_float32() -> None:
    """float32 on AB-UPT self-anchor 2x(1k+4k): flex with three-TF32
    products leads forward and trails forward+backward (H200: 0.90x and
    1.05x of ideal, batched 0.98x and 1.01x); with IEEE products it trails
    both, on joint attention too."""

    def first(pattern: str, training: bool, products: str) -> str:
        plan = AB[pattern]
        layout = schedule_for(plan.token_specs(ab_sizes(1024, 4096)), plan)
        args = (layout, 1, 12, 64, torch.device("cuda"), False, False, training, products)
        return _estimates(*args)[0].backend

    assert first("self_anchor", False, "'tf32x3'") == "flex"
    assert first("self_anchor", True, "'tf32x3'") == "batched"
    for pattern in ("self_anchor", "joint"):
        assert first(pattern, False, "'ieee'") == first(pattern, True, "'ieee'") == "batched"


def test_auto_picks_per_training_condition(monkeypatch: pytest.MonkeyPatch) -> None:
    """A call that will be differentiated and one that will not are priced
    and memoised apart (a no-grad call reuses none of a training pick)."""
    from patternc.nn.executors import auto

    priced = []

    def candidates(*args: object) -> tuple[auto.Estimate, ...]:
        training = args[-1][-1]  # (layout, conditions): training is the conditions' last
        priced.append(training)
        return (auto.Estimate("flex" if training else "batched", 0.0),)

    monkeypatch.setattr(auto, "_candidates", candidates)
    auto.PICKS.clear()
    plan = AB["joint"]
    schedule = schedule_for(plan.token_specs(ab_sizes(3, 6)), plan)
    q = torch.randn(1, 18, 2, 8, requires_grad=True)
    inputs = AttentionInputs(q, q, q, schedule, {}, None, 0.0, None)
    assert choose(inputs) == "flex"
    with torch.no_grad():
        assert choose(inputs) == "batched"
    frozen = q.detach()
    assert choose(AttentionInputs(frozen, frozen, frozen, schedule, {}, None, 0.0, None)) == "batched"
    assert choose(inputs) == "flex"
    assert priced == [True, False]  # each condition priced once, then memoised
    auto.PICKS.clear()


# ---------------------------------------------------------------- on a GPU


def _gpu_reference_case(plan: patternc.Plan, sizes: dict[str, int], impl: str, seed: int) -> None:
    """bf16 on CUDA, forward and backward, against the float64 CPU reference."""
    module = make(plan.bind(list(sizes)), impl, seed, dim=128)  # 2 heads of 64
    n = sum(sizes.values())
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2, n, 128, generator=gen)
    weight = torch.randn(2, n, 128, generator=gen)
    x_ref = x.double().requires_grad_()
    (reference_with_modifiers(module, x_ref, sizes) * weight.double()).sum().backward()
    expected = reference_with_modifiers(module, x, sizes).detach()
    assert x_ref.grad is not None
    gpu = module.cuda().to(torch.bfloat16)
    xg = x.cuda().to(torch.bfloat16).requires_grad_()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no silent fallback
        out, _ = gpu(xg, sizes)
    (out.float() * weight.cuda()).sum().backward()
    assert relative_error(out.float().cpu(), expected) < 2e-2  # bf16
    assert xg.grad is not None and relative_error(xg.grad.float().cpu(), x_ref.grad) < 5e-2


@cuda
@pytest.mark.parametrize("impl", ["varlen", "auto"])
@pytest.mark.parametrize("pattern", ["self_anchor", "cross_anchor", "joint"])
@pytest.mark.parametrize(("anchors", "queries"), [(1, 7), (64, 129), (129, 1)])
def test_gpu_varlen_ab_upt(impl: str, pattern: str, anchors: int, queries: int) -> None:
    _gpu_reference_case(AB[pattern], ab_sizes(anchors, queries), impl, seed=anchors + queries)


@cuda
@pytest.mark.parametrize("impl", ["varlen", "auto"])
def test_gpu_varlen_documents_causal_and_windowed(impl: str) -> None:
    sizes = {f"doc{i}": n for i, n in enumerate([1, 17, 300, 64, 129])}
    _gpu_reference_case(DOCS, sizes, impl, seed=3)
    windowed = patternc.compile("groups a b\na -> a [causal, window 9]\nb -> b [window 5]").patterns[
        "default"
    ]
    _gpu_reference_case(windowed, {"a": 77, "b": 130}, impl, seed=4)
