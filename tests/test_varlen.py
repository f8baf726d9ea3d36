"""The ``varlen`` executor (every call one segment of a variable-length
launch) and ``auto`` (a cost model picks the executor). GPU tests skip
without CUDA; on CPU both fall back to ``batched``."""

from __future__ import annotations

import itertools
import warnings

import pytest
import torch
from conftest import ab_sizes
from reference import relative_error
from test_flex import MODIFIED, make, reference_with_modifiers

import patternc
from patternc.nn.executors import flash4, varlen
from patternc.nn.executors.auto import _estimates, choose
from patternc.nn.executors.common import AttentionInputs
from patternc.nn.schedule import schedule_for

AB = patternc.compile(open("examples/ab_upt.pc").read())
DOCS = patternc.compile("groups doc*\ndoc* -> self [causal]").patterns["default"]
WINDOWED = patternc.compile("groups a b\na -> a [causal, window 9]\nb -> b [window 5]").patterns["default"]
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


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
        training = args[-1][4]  # (layout, conditions): training is the conditions' fifth
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


# ---------------------------------------------------------------- FlashAttention 4


@pytest.mark.parametrize(
    ("installed", "capability", "head_dim", "enabled", "compiling", "kernel"),
    [
        (False, (9, 0), 64, True, False, "flash2"),
        (True, (9, 0), 64, True, False, "flash4"),
        (True, (9, 0), 256, True, False, "flash4"),
        (True, (9, 0), 264, True, False, "flash2"),
        (True, (10, 0), 128, True, False, "flash4"),
        (True, (10, 0), 192, True, False, "flash2"),
        (True, (8, 0), 64, True, False, "flash2"),
        (True, (9, 0), 64, False, False, "flash2"),
        (True, (9, 0), 64, True, True, "flash2"),
    ],
)
def test_the_varlen_kernel_is_flash4_where_it_can_run(
    monkeypatch: pytest.MonkeyPatch,
    installed: bool,
    capability: tuple[int, int],
    head_dim: int,
    enabled: bool,
    compiling: bool,
    kernel: str,
) -> None:
    """FlashAttention 4 where its package imports, on Hopper and Blackwell,
    for its head sizes, unless switched off or inside a user's compile."""
    monkeypatch.setattr(flash4, "varlen_function", lambda: (lambda *a, **k: None) if installed else None)
    monkeypatch.setattr(flash4, "device_capability", lambda device: capability)
    monkeypatch.setattr(flash4, "_compiling", lambda: compiling)
    with flash4.enabled(enabled):
        assert varlen.varlen_kernel(torch.device("cuda"), head_dim) == kernel
    assert varlen.varlen_kernel(torch.device("cpu"), 64) == "flash2"


def test_cost_model_prices_flash4_varlen_faster() -> None:
    """On FlashAttention 4 varlen is priced at its measured rates: faster
    than on FlashAttention 2, forward and forward+backward."""
    layout = schedule_for(DOCS.token_specs({f"doc{i}": 1000 + 37 * i for i in range(64)}), DOCS)
    for training in (False, True):
        seconds = {
            kernel: {
                e.backend: e.seconds
                for e in _estimates(
                    layout, 1, 12, 64, torch.device("cpu"), True, True, training, varlen_on=kernel
                )
            }
            for kernel in ("flash2", "flash4")
        }
        assert seconds["flash4"]["varlen"] < seconds["flash2"]["varlen"]
        assert seconds["flash4"]["batched"] == seconds["flash2"]["batched"]


def _segment_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **kw: object
) -> tuple[torch.Tensor, None]:
    """A float64 stand-in for FlashAttention 4's varlen function, on its
    documented arguments: packed ``[T, H, D]``, cumulative lengths, a
    ``(left, right)`` window with None for unbounded."""
    cu_q, cu_k = kw["cu_seqlens_q"].tolist(), kw["cu_seqlens_k"].tolist()  # type: ignore[attr-defined]
    left, right = kw["window_size"]  # type: ignore[misc]
    scale = kw["softmax_scale"] or q.shape[-1] ** -0.5  # type: ignore[operator]
    out = torch.zeros_like(q)
    for (q0, q1), (k0, k1) in zip(itertools.pairwise(cu_q), itertools.pairwise(cu_k)):
        scores = torch.einsum("qhd,khd->hqk", q[q0:q1].double(), k[k0:k1].double()) * scale
        i = torch.arange(q1 - q0)[:, None] + (k1 - k0) - (q1 - q0)  # bottom-right aligned
        j = torch.arange(k1 - k0)[None, :]
        keep = torch.ones(q1 - q0, k1 - k0, dtype=torch.bool)
        if left is not None:
            keep &= j >= i - left
        if right is not None:
            keep &= j <= i + right
        weights = torch.softmax(scores.masked_fill(~keep, float("-inf")), -1).nan_to_num(0.0)
        out[q0:q1] = torch.einsum("hqk,khd->qhd", weights, v[k0:k1].double()).to(q.dtype)
    return out, None


@pytest.mark.parametrize(
    ("plan", "sizes"),
    [
        (AB["joint"], ab_sizes(5, 11)),
        (AB["self_anchor"], ab_sizes(3, 9)),
        (DOCS, {f"doc{i}": n for i, n in enumerate([1, 17, 30, 6])}),
        (WINDOWED, {"a": 23, "b": 30}),  # two launches: queries gathered and scattered
    ],
)
def test_run_varlen_on_flash4_packs_and_windows_like_separate_calls(
    monkeypatch: pytest.MonkeyPatch, plan: patternc.Plan, sizes: dict[str, int]
) -> None:
    """The FlashAttention 4 path (its kernel replaced by a float64 stand-in
    on CPU): packing, one launch or several, and the window translation
    (-1 -> None) give the float64 reference."""
    monkeypatch.setattr(varlen, "_fallback_reason", lambda inputs: None)
    monkeypatch.setattr(varlen, "varlen_kernel", lambda device, head_dim: "flash4")
    monkeypatch.setattr(flash4, "varlen_function", lambda: _segment_attention)
    module = make(plan.bind(list(sizes)), "varlen", 0, dim=32)
    x = torch.randn(2, sum(sizes.values()), 32)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback to batched
        out, _ = module(x, sizes)
        expected = reference_with_modifiers(module, x.double(), sizes)
    assert relative_error(out.double(), expected) < 1e-5


# ---------------------------------------------------------------- on a GPU


KERNELS = [
    "flash2",
    pytest.param(
        "flash4",
        marks=pytest.mark.skipif(flash4.varlen_function() is None, reason="needs the flash-attn-4 package"),
    ),
]


def _gpu_reference_case(
    plan: patternc.Plan, sizes: dict[str, int], impl: str, seed: int, kernel: str = "flash2"
) -> None:
    """bf16 on CUDA, forward and backward, against the float64 CPU reference,
    with varlen on FlashAttention 2 or 4."""
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
    with warnings.catch_warnings(), flash4.enabled(kernel == "flash4"):
        warnings.filterwarnings("error", message=r"implementation=.* runs as")  # no silent fallback
        assert varlen.varlen_kernel(xg.device, 64) == kernel
        out, _ = gpu(xg, sizes)
        (out.float() * weight.cuda()).sum().backward()
    assert relative_error(out.float().cpu(), expected) < 2e-2  # bf16
    assert xg.grad is not None and relative_error(xg.grad.float().cpu(), x_ref.grad) < 5e-2


@cuda
@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("impl", ["varlen", "auto"])
@pytest.mark.parametrize("pattern", ["self_anchor", "cross_anchor", "joint"])
@pytest.mark.parametrize(("anchors", "queries"), [(1, 7), (64, 129), (129, 1)])
def test_gpu_varlen_ab_upt(impl: str, pattern: str, anchors: int, queries: int, kernel: str) -> None:
    _gpu_reference_case(AB[pattern], ab_sizes(anchors, queries), impl, seed=anchors + queries, kernel=kernel)


@cuda
@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("impl", ["varlen", "auto"])
def test_gpu_varlen_documents_causal_and_windowed(impl: str, kernel: str) -> None:
    sizes = {f"doc{i}": n for i, n in enumerate([1, 17, 300, 64, 129])}
    _gpu_reference_case(DOCS, sizes, impl, seed=3, kernel=kernel)
    _gpu_reference_case(WINDOWED, {"a": 77, "b": 130}, impl, seed=4, kernel=kernel)


def test_kernel_of_says_what_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    """varlen's and flex's answers to "which kernel": the fallback first, then FlashAttention 4 or not."""
    from patternc.nn.executors import flex, flexkernels

    layout = schedule_for(DOCS.token_specs({"doc0": 5, "doc1": 9}), DOCS)
    q = torch.randn(1, 14, 2, 16)
    inputs = AttentionInputs(q, q, q, layout, {}, None, 0.0, None)
    assert varlen.kernel_of(inputs) == "batched"  # CPU
    assert flex.kernel_of(inputs) == "triton"  # flex runs its own kernel on CPU without gradients
    grad = AttentionInputs(q.clone().requires_grad_(), q, q, layout, {}, None, 0.0, None)
    assert flex.kernel_of(grad) == "batched"  # no CPU backward
    monkeypatch.setattr(varlen, "_fallback_reason", lambda inputs: None)
    assert varlen.kernel_of(inputs) == "flash2"
    monkeypatch.setattr(flash4, "usable", lambda device, head_dim: True)
    assert varlen.kernel_of(inputs) == "flash4"
    monkeypatch.setattr(flexkernels, "flash_backend", lambda inputs: True)
    assert flex.kernel_of(inputs) == "flash"


@pytest.mark.parametrize(
    ("backend", "kernel", "label"),
    [
        ("varlen", "flash4", "varlen[fa4]"),
        ("varlen", "flash2", "varlen"),
        ("auto", "flash4", "auto:varlen[fa4]"),
    ],
)
def test_bench_rows_name_flash4_where_it_runs(
    monkeypatch: pytest.MonkeyPatch, backend: str, kernel: str, label: str
) -> None:
    from patternc import benchmark
    from patternc.nn.executors import auto

    monkeypatch.setattr(varlen, "kernel_of", lambda inputs: kernel)
    monkeypatch.setattr(auto, "choose", lambda inputs: "varlen")
    sizes: dict[str, int | None] = {"doc0": 5, "doc1": 9}
    x = torch.randn(1, 14, 32)
    assert benchmark._row_label(backend, DOCS, sizes, x, 2, False) == label


def test_a_compiled_graph_is_priced_on_the_kernel_it_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    """With FlashAttention 4 installed, an eager call prices ``varlen`` on it;
    inside a user's ``torch.compile`` varlen runs FlashAttention 2, so the
    graph's pick is priced on that and memoised apart from the eager one."""
    from patternc.nn.executors import auto

    priced: list[str] = []

    def estimates(*args: object) -> tuple[auto.Estimate, ...]:
        kernel = args[9]  # _estimates' varlen_on
        assert isinstance(kernel, str)
        priced.append(kernel)
        return (auto.Estimate("varlen" if kernel == "flash4" else "batched", 0.0),)

    monkeypatch.setattr(auto, "_estimates", estimates)
    monkeypatch.setattr(auto, "varlen_available", lambda device: True)
    monkeypatch.setattr(auto, "_launches", lambda *args: ())
    monkeypatch.setattr(auto, "varlen_kernel", lambda device, head_dim: "flash4")
    auto.TABLES.clear()
    auto.PICKS.clear()
    plan = AB["joint"]
    layout = schedule_for(plan.token_specs(ab_sizes(3, 6)), plan)
    eager = ((1, 18, 2, 8), torch.bfloat16, torch.device("cuda"), True, True, False, False)
    compiled = (*eager[:6], True)
    assert auto._choice(layout, eager) == "varlen"
    assert auto._choice(layout, compiled) == "batched"
    assert auto._choice(layout, eager) == "varlen"  # memoised apart
    assert priced == ["flash4", "flash2"]
    auto.TABLES.clear()
    auto.PICKS.clear()
