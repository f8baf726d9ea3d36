"""The ``varlen`` executor (every call one segment of a variable-length
launch) and ``auto`` (a cost model picks the executor). GPU tests skip
without CUDA; on CPU both fall back to ``batched``."""

from __future__ import annotations

import itertools
import random
import warnings
from collections.abc import Callable
from typing import Any

import pytest
import torch
from conftest import ab_sizes, forget_tables, warnings_as_errors
from reference import relative_error
from test_flex import MODIFIED, make, reference_with_modifiers

import patternc
from patternc.nn.executors import flash4, varlen
from patternc.nn.executors.auto import _estimates, choose
from patternc.nn.executors.common import AttentionInputs, once
from patternc.nn.schedule import schedule_for
from patternc.nn.traced_layouts import for_trace

AB = patternc.compile(open("examples/ab_upt.patc").read())
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
    full attention over 8k tokens: one SDPA call without a mask (batched)
    beats flex's kernel, which beats ``dense`` (SDPA under an ``[n, n]``
    mask). (Over 1k tokens flex's kernel is too short to hide its host
    work, which puts it behind both.)"""
    docs = schedule_for(DOCS.token_specs({f"doc{i}": 300 + 7 * i for i in range(64)}), DOCS)
    for training in (False, True):
        ranked = [e.backend for e in _estimates(docs, 1, 12, 64, torch.device("cpu"), True, True, training)]
        assert ranked[0] == "varlen" and ranked[-1] == "dense"
    full = patternc.compile("groups a b\n* -> *").patterns["default"]
    dense = schedule_for(full.token_specs({"a": 4096, "b": 4096}), full)
    ranked = [e.backend for e in _estimates(dense, 1, 12, 64, torch.device("cpu"), True, False)]
    assert ranked == ["batched", "flex", "dense"]


def test_cost_model_prices_the_backward_in_float32() -> None:
    """float32 on AB-UPT self-anchor 2x(1k+4k): flex with three-TF32
    products leads forward and trails forward+backward (as in
    ``benchmarks/results/h200_bench_gpu_small_fp32_2026-12.txt``); with IEEE
    products it trails both, on joint attention too."""

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
    forget_tables()
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
    schedule.tables.clear()


# ---------------------------------------------------------------- FlashAttention 4


def _segment_weights(
    q: torch.Tensor, k: torch.Tensor, scale: float, left: int | None, right: int | None
) -> torch.Tensor:
    """One segment's float64 softmax ``[H, Lq, Lk]`` (masked rows zero) and
    its log-sum-exp, on FlashAttention 4's conventions: windows aligned
    bottom-right, None for unbounded."""
    scores = torch.einsum("qhd,khd->hqk", q.double(), k.double()) * scale
    lq, lk = q.shape[0], k.shape[0]
    i = torch.arange(lq)[:, None] + lk - lq
    j = torch.arange(lk)[None, :]
    keep = torch.ones(lq, lk, dtype=torch.bool)
    if left is not None:
        keep &= j >= i - left
    if right is not None:
        keep &= j <= i + right
    scores = scores.masked_fill(~keep, float("-inf"))
    return torch.softmax(scores, -1).nan_to_num(0.0), torch.logsumexp(scores, -1)


def _pairs(cu_q: list[int], cu_k: list[int]) -> list[tuple[slice, slice]]:
    return [
        (slice(a, b), slice(c, d))
        for (a, b), (c, d) in zip(itertools.pairwise(cu_q), itertools.pairwise(cu_k))
    ]


def _segments_float64(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_q: list[int],
    cu_k: list[int],
    scale: float | None,
    left: int | None,
    right: int | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Segment-wise attention in float64 on packed ``[T, H, D]``:
    ``(out [T, H, D], lse [H, T])``, differentiable by autograd."""
    scale = scale or q.shape[-1] ** -0.5
    outs, lses = [], []
    for sq, sk in _pairs(cu_q, cu_k):
        weights, lse = _segment_weights(q[sq], k[sk], scale, left, right)
        outs.append(torch.einsum("hqk,khd->qhd", weights, v[sk].double()))
        lses.append(lse)
    return torch.cat(outs), torch.cat(lses, dim=1)


def _stand_in_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **kw: object) -> tuple[object, ...]:
    """``_flash_attn_fwd`` on CPU (float64 inside), on the arguments patternc passes."""
    assert kw["return_lse"] is True
    out, lse = _segments_float64(
        q, k, v, kw["cu_seqlens_q"].tolist(), kw["cu_seqlens_k"].tolist(),  # type: ignore[attr-defined]
        kw["softmax_scale"], kw["window_size_left"], kw["window_size_right"],  # type: ignore[arg-type]
    )  # fmt: skip
    return out.to(q.dtype), lse.float(), None, None, None


def _stand_in_backward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    dout: torch.Tensor,
    lse: torch.Tensor,
    scale: float | None,
    causal: bool,
    softcap: float,
    **kw: object,
) -> tuple[torch.Tensor, ...]:
    """``_flash_attn_bwd`` on CPU: softmax attention's gradients written out
    in float64 (a custom op's kernel runs below autograd, so none is
    recorded there)."""
    assert not causal and softcap == 0.0
    scale = scale or q.shape[-1] ** -0.5
    dq, dk, dv = (torch.zeros_like(t, dtype=torch.float64) for t in (q, k, v))
    left, right = kw["window_size_left"], kw["window_size_right"]
    for sq, sk in _pairs(kw["cu_seqlens_q"].tolist(), kw["cu_seqlens_k"].tolist()):  # type: ignore[attr-defined]
        p, _ = _segment_weights(q[sq], k[sk], scale, left, right)  # type: ignore[arg-type]
        do = dout[sq].double()
        dv[sk] = torch.einsum("hqk,qhd->khd", p, do)
        dp = torch.einsum("qhd,khd->hqk", do, v[sk].double())
        ds = p * (dp - (dp * p).sum(-1, keepdim=True)) * scale
        dq[sq] = torch.einsum("hqk,khd->qhd", ds, k[sk].double())
        dk[sk] = torch.einsum("hqk,qhd->khd", ds, q[sq].double())
    return tuple(g.to(t.dtype) for g, t in zip((dq, dk, dv), (q, k, v)))


def _counted(kernels: flash4.Kernels, launched: list[str]) -> flash4.Kernels:
    """``kernels`` that append ``"fwd"`` / ``"bwd"`` to ``launched`` when called."""
    forward, backward = kernels

    def run(name: str, kernel: Callable[..., Any]) -> Callable[..., Any]:
        return lambda *args, **kwargs: launched.append(name) or kernel(*args, **kwargs)

    return run("fwd", forward), run("bwd", backward)


STAND_IN = (_stand_in_forward, _stand_in_backward)
"""FlashAttention 4's two entry points replaced by float64 stand-ins: what
patternc's custom ops call, run on CPU."""


def _packed_case(seed: int) -> tuple[torch.Tensor, ...]:
    """Random packed Q/K/V of three segments (odd lengths) and their cumulative lengths."""
    gen = torch.Generator().manual_seed(seed)
    lengths_q, lengths_k = [5, 1, 12], [7, 3, 12]
    q = torch.randn(sum(lengths_q), 2, 8, generator=gen, dtype=torch.float64)
    k = torch.randn(sum(lengths_k), 2, 8, generator=gen, dtype=torch.float64)
    v = torch.randn(sum(lengths_k), 2, 8, generator=gen, dtype=torch.float64)
    cu_q = torch.tensor([0, *itertools.accumulate(lengths_q)], dtype=torch.int32)
    cu_k = torch.tensor([0, *itertools.accumulate(lengths_k)], dtype=torch.int32)
    return q, k, v, cu_q, cu_k


def test_flash4_custom_op_passes_opcheck(monkeypatch: pytest.MonkeyPatch) -> None:
    """The op's schema, shape function, autograd formula and tracing agree
    with what it computes (``torch.library.opcheck``, stand-in kernels)."""
    monkeypatch.setattr(flash4, "kernels", lambda: STAND_IN)
    q, k, v, cu_q, cu_k = _packed_case(0)
    # dense but head-major: gradients allocated like such inputs come out strided
    q_strided = q.transpose(0, 1).contiguous().transpose(0, 1)
    for window, query in (((-1, -1), q), ((3, 0), q_strided)):
        args = (
            query.requires_grad_(),
            k.requires_grad_(),
            v.requires_grad_(),
            cu_q,
            cu_k,
            12,
            12,
            None,
            *window,
        )
        torch.library.opcheck(flash4._forward, args)
        out, lse = (t.detach() for t in flash4._forward(*args))
        tensors = [t.detach() for t in args[:3]]
        backward = (torch.randn_like(out), *tensors, out, lse, *args[3:])
        torch.library.opcheck(flash4._backward_op, backward, test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("window", [(-1, -1), (-1, 0), (2, 1)])
def test_flash4_varlen_attention_gradients_match_float64(
    monkeypatch: pytest.MonkeyPatch, window: tuple[int, int]
) -> None:
    """Forward and gradients through the custom ops equal autograd through
    the float64 reference, windows translated (-1 -> None)."""
    monkeypatch.setattr(flash4, "kernels", lambda: STAND_IN)
    q, k, v, cu_q, cu_k = _packed_case(sum(window) + 5)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out = flash4.varlen_attention(*leaves, cu_q, cu_k, 12, 12, 0.3, window)
    weight = torch.randn_like(out)
    grads = torch.autograd.grad((out * weight).sum(), leaves)
    ref_leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    left, right = (None if w < 0 else w for w in window)
    ref, _ = _segments_float64(*ref_leaves, cu_q.tolist(), cu_k.tolist(), 0.3, left, right)
    ref_grads = torch.autograd.grad((ref * weight).sum(), ref_leaves)
    assert relative_error(out, ref) < 1e-12
    for mine, theirs in zip(grads, ref_grads):
        assert relative_error(mine, theirs) < 1e-12


@pytest.mark.parametrize("complete", [True, False])
def test_flash4_is_installed_only_with_both_entry_points(
    monkeypatch: pytest.MonkeyPatch, complete: bool
) -> None:
    """The package counts as installed when its interface has the forward and
    backward entry points the custom ops call; a release without them leaves
    ``varlen`` on FlashAttention 2 instead of failing."""
    import sys
    import types

    interface = types.ModuleType("flash_attn.cute.interface")
    interface._flash_attn_fwd = STAND_IN[0]  # type: ignore[attr-defined]
    if complete:
        interface._flash_attn_bwd = STAND_IN[1]  # type: ignore[attr-defined]
    cute = types.ModuleType("flash_attn.cute")
    cute.interface = interface  # type: ignore[attr-defined]
    package = types.ModuleType("flash_attn")
    package.cute = cute  # type: ignore[attr-defined]
    for name, module in (
        ("flash_attn", package),
        ("flash_attn.cute", cute),
        ("flash_attn.cute.interface", interface),
    ):
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.setattr(flash4, "kernels", once(flash4.kernels.__wrapped__))  # type: ignore[attr-defined]
    assert flash4.installed() is complete
    assert flash4.kernels() == (STAND_IN if complete else None)


def test_flash4_needs_its_package() -> None:
    """Called without the package, the op says what to install."""
    q, k, v, cu_q, cu_k = _packed_case(1)
    if flash4.installed():
        pytest.skip("flash-attn-4 is installed here")
    with pytest.raises(
        RuntimeError, match=r"needs the flash-attn-4 package \(pip install 'patternc\[flash4\]'\)"
    ):
        flash4.varlen_attention(q, k, v, cu_q, cu_k, 12, 12, None, (-1, -1))


@pytest.mark.parametrize(
    ("installed", "capability", "head_dim", "enabled", "kernel"),
    [
        (False, (9, 0), 64, True, "flash2"),
        (True, (9, 0), 64, True, "flash4"),
        (True, (9, 0), 256, True, "flash4"),
        (True, (9, 0), 264, True, "flash2"),
        (True, (10, 0), 128, True, "flash4"),
        (True, (10, 0), 192, True, "flash2"),
        (True, (8, 0), 64, True, "flash2"),
        (True, (9, 0), 64, False, "flash2"),
    ],
)
def test_the_varlen_kernel_is_flash4_where_it_can_run(
    monkeypatch: pytest.MonkeyPatch,
    installed: bool,
    capability: tuple[int, int],
    head_dim: int,
    enabled: bool,
    kernel: str,
) -> None:
    """FlashAttention 4 where its package imports, on Hopper and Blackwell,
    for its head sizes, unless switched off."""
    monkeypatch.setattr(flash4, "kernels", lambda: STAND_IN if installed else None)
    monkeypatch.setattr(flash4, "device_capability", lambda device: capability)
    with flash4.enabled(enabled):
        assert varlen.varlen_kernel(torch.device("cuda"), head_dim) == kernel
    assert varlen.varlen_kernel(torch.device("cpu"), 64) == "flash2"


@pytest.mark.parametrize("compiling", [False, True])
def test_varlen_keeps_flash4_inside_a_compile_and_flex_leaves_it(
    monkeypatch: pytest.MonkeyPatch, compiling: bool
) -> None:
    """Inside a user's ``torch.compile`` varlen still runs FlashAttention 4
    (its custom ops trace); flex's FLASH lowering is not measured inside a
    user's graph, so flex keeps its Triton kernel there."""
    from patternc.nn.executors import flexkernels

    monkeypatch.setattr(flash4, "kernels", lambda: STAND_IN)
    monkeypatch.setattr(flash4, "device_capability", lambda device: (9, 0))
    monkeypatch.setattr(flexkernels, "_torch_lowers_flash", lambda: True)
    monkeypatch.setattr(flash4, "usable", lambda device, head_dim: True)
    assert varlen.varlen_kernel(torch.device("cuda"), 64) == "flash4"
    layout = schedule_for(AB["joint"].token_specs(ab_sizes(4096, 16384)), AB["joint"])
    if compiling:  # the layout as the compile boundary hands it to a trace
        from patternc.nn.traced_layouts import for_trace

        layout = for_trace(layout)
    q = torch.empty(1, layout.n_tokens, 12, 64, dtype=torch.bfloat16, device="meta")
    assert flexkernels.flash_backend(AttentionInputs(q, q, q, layout, {}, None, 0.0, None)) is not compiling


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


@pytest.mark.parametrize(
    ("pattern", "sizes", "training", "winner"),
    [
        # single calls with FlashAttention 4 (bench_gpu.py's 10k AB-UPT and
        # document layouts, benchmarks/results/h100_bench_gpu_small_fa4_2026-12.txt):
        # ms of the pick against the runner-up
        ("joint", (1024, 4096), True, "batched"),  # 0.900 against varlen's 1.526
        ("self_anchor", (1024, 4096), True, "batched"),  # 0.679 against 1.373
        ("joint", (1024, 4096), False, "batched"),  # 0.219 against 0.365
        ("docs", 16, False, "varlen"),  # 0.384 against batched's 0.611
        ("docs", 16, True, "varlen"),  # 1.561 against 2.786
        ("docs", 64, True, "varlen"),  # 3.703 against 10.163
        # 65k tokens with FlashAttention 4 (h200_bench_gpu_large_fa4_2026-12.txt): varlen
        # 10.9 against batched's 13.1 ms (self-anchor), 21.0 against 25.9 (joint)
        ("joint", (8192, 24576), True, "varlen"),
        ("self_anchor", (8192, 24576), True, "varlen"),
    ],
)
def test_cost_model_on_flash4_picks_the_measured_winner(
    pattern: str, sizes: tuple[int, int] | int, training: bool, winner: str
) -> None:
    """varlen on FlashAttention 4 is priced with its launcher's host time,
    so a short training call at 10k tokens stays on ``batched`` while
    documents and 65k training go to varlen, as measured."""
    if isinstance(sizes, int):  # bench_gpu's documents: lengths drawn from 256-2048, seed 1 (16) or 0 (64)
        rng = random.Random(1 if sizes == 16 else 0)
        plan = patternc.compile("groups doc*\ndoc* -> self").patterns["default"]
        specs = {f"doc{i}": rng.randint(256, 2048) for i in range(sizes)}
    else:
        plan, specs = AB[pattern], ab_sizes(*sizes)
    layout = schedule_for(plan.token_specs(specs), plan)
    ranked = _estimates(layout, 1, 12, 64, torch.device("cpu"), True, True, training, "'ieee'", "flash4")
    assert ranked[0].backend == winner


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
    monkeypatch.setattr(flash4, "kernels", lambda: STAND_IN)
    module = make(plan.bind(list(sizes)), "varlen", 0, dim=32)
    x = torch.randn(2, sum(sizes.values()), 32)
    with torch.no_grad(), warnings_as_errors():  # no fallback to batched
        out, _ = module(x, sizes)
        expected = reference_with_modifiers(module, x.double(), sizes)
    assert relative_error(out.double(), expected) < 1e-5


@pytest.mark.parametrize("name", ["joint", "documents"])
def test_a_flash4_varlen_layer_compiles_fullgraph_with_its_gradients(
    monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    """Inside a user's ``torch.compile(fullgraph=True)`` the FlashAttention 4
    path is two custom-op nodes: no graph break, no warning naming patternc,
    and the compiled forward and gradients equal eager and the float64
    reference (kernels replaced by stand-ins on CPU)."""
    from test_compile import _captured

    launched: list[str] = []

    monkeypatch.setattr(varlen, "_fallback_reason", lambda inputs: None)
    monkeypatch.setattr(varlen, "varlen_kernel", lambda device, head_dim: "flash4")
    monkeypatch.setattr(flash4, "kernels", lambda: _counted(STAND_IN, launched))
    plan, sizes = (AB["joint"], ab_sizes(4, 9)) if name == "joint" else (DOCS, {"doc0": 7, "doc1": 12})
    module = make(plan.bind(list(sizes)), "varlen", 1, dim=32)
    x = torch.randn(2, sum(sizes.values()), 32, dtype=torch.float64)
    module = module.double()
    expected = reference_with_modifiers(module, x, sizes)
    module(x, sizes)  # warm: the layout is cached
    torch._dynamo.reset()
    compiled = torch.compile(lambda t: module(t, sizes)[0], fullgraph=True, backend="aot_eager")
    leaf = x.clone().requires_grad_()
    with _captured() as (caught, records):
        launched.clear()
        out = compiled(leaf)
        (grad,) = torch.autograd.grad(out.square().sum(), leaf)
    assert launched == ["fwd", "bwd"]  # the graph ran FlashAttention 4's two entry points, once each
    messages = [str(w.message) for w in caught] + [r.getMessage() for r in records]
    assert not [m for m in messages if "patternc" in m or "lru_cache" in m], messages
    eager_leaf = x.clone().requires_grad_()
    (eager_grad,) = torch.autograd.grad(module(eager_leaf, sizes)[0].square().sum(), eager_leaf)
    assert relative_error(out.detach(), expected) < 1e-10
    assert relative_error(grad, eager_grad) < 1e-10


def _functions() -> tuple[Callable[..., Any], Callable[..., Any]]:
    """A stand-in answer shaped like :func:`flash4.kernels`' where the package imports."""
    import json

    return json.dumps, json.loads


def _missing_package() -> object:
    """A stand-in probe of a package that is not installed."""
    try:
        import patternc_no_such_package  # type: ignore[import-not-found]  # noqa: F401
    except ImportError:
        return None
    return True


def test_installation_questions_trace_without_warnings() -> None:
    """What compiled layers ask about the installation (torch's varlen op,
    its FLASH lowering, FlashAttention 4) is memoised by :func:`once`, which
    Dynamo traces silently; ``functools.cache`` there warned in every
    compiled training step on a GPU with FlashAttention 4 installed.
    Asked first inside a trace, the probes would break the graph (torch
    2.11 will not trace ``importlib.util.find_spec``; a failed import breaks
    it on every version): there the answer is asked as plain Python and held
    as a constant. Each question gets a fresh memo here, so what the other
    tests asked first does not hide that."""
    from test_compile import _captured

    from patternc.nn.executors import flexkernels

    asked: list[int] = []

    @once
    def answer() -> int:
        """The answer."""
        asked.append(1)
        return 42

    assert (answer(), answer(), asked, answer.__doc__) == (42, 42, [1], "The answer.")
    probes = (
        varlen._has_varlen.__wrapped__,  # type: ignore[attr-defined]
        flexkernels._torch_lowers_flash.__wrapped__,  # type: ignore[attr-defined]
        flash4.kernels.__wrapped__,  # type: ignore[attr-defined]
        _functions,
        _missing_package,
    )
    expected = [probe() is not None and probe() is not False for probe in probes]
    for probe, found in zip(probes, expected):
        calls: list[int] = []

        def counted(probe: Callable[[], object] = probe, calls: list[int] = calls) -> object:
            calls.append(1)
            return probe()

        question = once(counted)
        torch._dynamo.reset()
        compiled = torch.compile(
            lambda t, question=question: t * (question() not in (None, False)),
            fullgraph=True,
            backend="eager",
        )
        with _captured() as (caught, records):
            first, again = compiled(torch.ones(3)), compiled(torch.ones(3))
        messages = [str(w.message) for w in caught] + [r.getMessage() for r in records]
        assert not [m for m in messages if "patternc" in m or "lru_cache" in m], (probe.__name__, messages)
        assert torch.equal(first, torch.ones(3) * found) and torch.equal(again, first), probe.__name__
        # asked once, in the trace, and remembered for eager calls after it
        assert (question() not in (None, False), len(calls)) == (found, 1), probe.__name__


def test_launches_priced_during_a_trace_are_kept_for_the_graph() -> None:
    """``auto`` prices a layout as plain Python while Dynamo traces (its
    constant function): the launches it builds there are stored as
    traceable, so the graph that picked ``varlen`` finds them; a lookup that
    is traced (the layout as the compile boundary hands it to a trace)
    stores nothing."""
    from patternc.nn.traced_layouts import for_trace

    layout = schedule_for(DOCS.token_specs({"doc0": 3, "doc1": 8}), DOCS)
    layout.tables.clear()
    view = for_trace(layout)
    key = varlen._launches_key(2, torch.device("cpu"), False)
    varlen._launches(view, 2, torch.device("cpu"))
    assert layout.tables.stored(key) is None
    kept = varlen.kept_launches(view, 2, torch.device("cpu"))
    assert not isinstance(kept, str) and layout.tables.stored(key) is kept
    assert varlen._launches(view, 2, torch.device("cpu")) is kept
    layout.tables.clear()


def test_varlen_in_a_user_graph_without_eager_launches_runs_as_batched(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A layout no eager call ran has no launches stored: inside a user's
    ``torch.compile`` they would be built in Python Dynamo cannot trace, so
    the call runs as ``batched`` there (and still equals the reference)."""
    launched: list[object] = []
    monkeypatch.setattr(varlen, "_fallback_reason", lambda inputs: None)
    monkeypatch.setattr(varlen, "varlen_kernel", lambda device, head_dim: "flash4")
    monkeypatch.setattr(flash4, "kernels", lambda: (lambda *a, **k: launched.append(a), STAND_IN[1]))
    sizes = {"doc0": 5, "doc1": 11}
    module = make(DOCS.bind(list(sizes)), "varlen", 2, dim=32).double()
    x = torch.randn(2, 16, 32, dtype=torch.float64)
    forget_tables()
    torch._dynamo.reset()
    out = torch.compile(lambda t: module(t, sizes)[0], fullgraph=True, backend="aot_eager")(x)
    assert launched == []
    assert relative_error(out, reference_with_modifiers(module, x, sizes)) < 1e-10


# ---------------------------------------------------------------- on a GPU


KERNELS = [
    "flash2",
    pytest.param(
        "flash4",
        marks=pytest.mark.skipif(not flash4.installed(), reason="needs the flash-attn-4 package"),
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


@cuda
@pytest.mark.skipif(not flash4.installed(), reason="needs the flash-attn-4 package")
@pytest.mark.parametrize("impl", ["varlen", "auto"])
def test_gpu_flash4_varlen_inside_torch_compile(monkeypatch: pytest.MonkeyPatch, impl: str) -> None:
    """Under ``torch.compile(fullgraph=True)`` (Inductor) the layer runs
    FlashAttention 4 through the custom ops, forward and backward, where
    eager does, and matches the float64 reference like the eager layer."""
    real = flash4.kernels()
    assert real is not None
    launched: list[str] = []

    monkeypatch.setattr(flash4, "kernels", lambda: _counted(real, launched))
    sizes = {f"doc{i}": n for i, n in enumerate([1, 17, 300, 64, 129])}
    module = make(DOCS.bind(list(sizes)), impl, 7, dim=128)
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(2, sum(sizes.values()), 128, generator=gen)
    weight = torch.randn(2, sum(sizes.values()), 128, generator=gen)
    x_ref = x.double().requires_grad_()
    (reference_with_modifiers(module, x_ref, sizes) * weight.double()).sum().backward()
    expected = reference_with_modifiers(module, x, sizes).detach()
    gpu = module.cuda().to(torch.bfloat16)
    xg = x.cuda().to(torch.bfloat16).requires_grad_()
    gpu(xg, sizes)[0].sum().backward()  # eager first: launches and auto's pick stored
    eager_launched = sorted(set(launched))
    xg.grad = None
    torch._dynamo.reset()
    compiled = torch.compile(lambda t: gpu(t, sizes)[0], fullgraph=True)
    launched.clear()
    out = compiled(xg)
    (out.float() * weight.cuda()).sum().backward()
    # varlen runs FlashAttention 4 both ways; auto runs its eager pick (at
    # this size it may be batched: the graph then launches FA4 no more than eager)
    assert sorted(set(launched)) == (["bwd", "fwd"] if impl == "varlen" else eager_launched)
    assert relative_error(out.float().cpu(), expected) < 2e-2  # bf16
    assert xg.grad is not None and relative_error(xg.grad.float().cpu(), x_ref.grad) < 5e-2


def test_kernel_of_says_what_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    """varlen's and flex's answers to "which kernel": the fallback first, then FlashAttention 4 or not."""
    from patternc.nn.executors import flex, flexkernels

    layout = schedule_for(DOCS.token_specs({"doc0": 5, "doc1": 9}), DOCS)
    q = torch.randn(1, 14, 2, 16)
    inputs = AttentionInputs(q, q, q, layout, {}, None, 0.0, None)
    assert varlen.kernel_of(inputs) == "batched"  # CPU
    monkeypatch.setattr(flex, "_CPU_KERNEL_FAILED", [])
    assert flex.kernel_of(inputs) == "triton"  # flex runs its own kernel on CPU without gradients
    monkeypatch.setattr(flex, "_CPU_KERNEL_FAILED", ["torch failing to build FlexAttention's CPU kernel"])
    assert flex.kernel_of(inputs) == "batched"  # where this torch cannot build it (2.8.0)
    monkeypatch.setattr(flex, "_CPU_KERNEL_FAILED", [])
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


def test_eager_and_traced_keys_find_one_pick(monkeypatch: pytest.MonkeyPatch) -> None:
    """Eager calls key ``auto``'s picks by ``q.shape`` as a ``torch.Size``
    (no copy on the hot path), a trace by a plain tuple: the two keys are
    one entry, so the graph reuses the eager pick without pricing again."""
    from patternc.nn.executors import auto

    priced: list[object] = []
    monkeypatch.setattr(
        auto, "_candidates", lambda *args: priced.append(args) or (auto.Estimate("flex", 0.0),)
    )
    forget_tables()
    layout = schedule_for(AB["joint"].token_specs(ab_sizes(3, 6)), AB["joint"])
    q = torch.randn(1, 18, 2, 8)
    inputs = AttentionInputs(q, q, q, layout, {}, None, 0.0, None)
    assert choose(inputs) == "flex"
    traced = auto._conditions(inputs, traced=True)
    assert type(traced[0]) is tuple and type(auto._conditions(inputs)[0]) is torch.Size
    view = for_trace(layout)  # what the compile boundary hands a trace: it names the layout by id
    assert auto._choice_by_id(view.tables.layout_id, traced) == "flex"  # type: ignore[attr-defined]
    assert choose(inputs) == "flex" and len(priced) == 1
    layout.tables.clear()


@pytest.mark.parametrize("grad_enabled", [True, False])
@pytest.mark.parametrize("which", [None, "q", "k", "v"])
def test_the_pick_key_reads_training_as_the_inputs_do(grad_enabled: bool, which: str | None) -> None:
    """``auto``'s hot-path key writes :attr:`AttentionInputs.differentiated`
    out (no property call): the two must agree whatever takes a gradient."""
    from patternc.nn.executors import auto

    layout = schedule_for(AB["joint"].token_specs(ab_sizes(3, 6)), AB["joint"])
    q, k, v = (torch.randn(1, 18, 2, 8, requires_grad=name == which) for name in "qkv")
    inputs = AttentionInputs(q, k, v, layout, {}, None, 0.0, None)
    with torch.set_grad_enabled(grad_enabled):
        key = auto._key(inputs)
        assert key[5] is inputs.differentiated is (grad_enabled and which is not None)
        assert key[1:] == auto._conditions(inputs) and key[0] == "auto pick"


def test_a_compiled_graph_shares_the_eager_pick_priced_on_flash4(monkeypatch: pytest.MonkeyPatch) -> None:
    """With FlashAttention 4 installed, ``varlen`` runs it eager and inside a
    user's ``torch.compile`` alike, so a layout is priced once, on it, and the
    graph (which asks by the layout's ``id``) gets the eager pick."""
    from patternc.nn.executors import auto

    priced: list[str] = []

    def estimates(*args: object) -> tuple[auto.Estimate, ...]:
        kernel = args[9]  # _estimates' varlen_on
        assert isinstance(kernel, str)
        priced.append(kernel)
        return (auto.Estimate("varlen" if kernel == "flash4" else "batched", 0.0),)

    monkeypatch.setattr(auto, "_estimates", estimates)
    monkeypatch.setattr(auto, "varlen_available", lambda device: True)
    monkeypatch.setattr(auto, "kept_launches", lambda *args: ())
    monkeypatch.setattr(auto, "varlen_kernel", lambda device, head_dim: "flash4")
    forget_tables()
    plan = AB["joint"]
    layout = schedule_for(plan.token_specs(ab_sizes(3, 6)), plan)
    conditions = ((1, 18, 2, 8), torch.bfloat16, torch.device("cuda"), True, True, False)
    assert auto._choice(layout, conditions) == "varlen"
    view = for_trace(layout)
    assert auto._choice_by_id(view.tables.layout_id, conditions) == "varlen"  # what a trace asks  # type: ignore[attr-defined]
    assert priced == ["flash4"]
    layout.tables.clear()
