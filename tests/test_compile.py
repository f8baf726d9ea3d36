"""``torch.compile(fullgraph=True)`` of a PatternAttention: no graph break and
no Dynamo warning from patternc code, cold or after an eager warm-up."""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import sys
import warnings
from collections.abc import Callable, Iterator

import pytest
import torch
from conftest import EXAMPLES, forget_tables

import patternc
from patternc.nn import PatternAttention

PLANS = {
    "vlm": (
        patternc.compile(EXAMPLES / "cookbook" / "vlm.patc").patterns["default"],
        {"registers": 2, "image": 5, "text": 4},
    ),
    "joint": (
        patternc.compile(EXAMPLES / "ab_upt.patc").patterns["joint"],
        {"surface_anchors": 3, "surface_queries": 5, "volume_anchors": 2, "volume_queries": 4},
    ),
    "documents": (
        patternc.compile(EXAMPLES / "cookbook" / "packed_causal.patc").patterns["default"],
        {"doc0": 3, "doc1": 6},
    ),
}


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@contextlib.contextmanager
def _captured() -> Iterator[tuple[list[warnings.WarningMessage], list[logging.LogRecord]]]:
    """Python warnings and Dynamo's log warnings raised inside the block."""
    handler = _Records()
    logger = logging.getLogger("torch._dynamo")
    logger.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield caught, handler.records
    finally:
        logger.removeHandler(handler)


def _forget_layouts() -> None:
    """Empty the compiler's caches, so that a trace finds no layout an
    earlier test built (a cold compile is then cold)."""
    from patternc.plan import BINDINGS, LAYOUTS

    for cache in (LAYOUTS, BINDINGS):
        cache.clear()


@pytest.mark.parametrize("warm", [False, True], ids=["cold", "warm"])
@pytest.mark.parametrize("name", sorted(PLANS))
def test_fullgraph_compile_has_no_warnings(name: str, warm: bool) -> None:
    plan, sizes = PLANS[name]
    torch.manual_seed(0)
    module = PatternAttention(patternc.MixedAttentionConfig(hidden_dim=16, num_heads=2), plan)
    x = torch.randn(2, sum(sizes.values()), 16)
    _forget_layouts()
    if warm:
        module(x, sizes)
    torch._dynamo.reset()
    compiled = torch.compile(module, fullgraph=True, backend="eager")
    with _captured() as (caught, records):
        out, _ = compiled(x, sizes)
    messages = [str(w.message) for w in caught] + [r.getMessage() for r in records]
    assert not [m for m in messages if "patternc" in m or "lru_cache" in m or "Dynamo" in m], messages
    expected, _ = module(x, sizes)
    assert torch.allclose(out, expected, atol=1e-6)


@pytest.mark.parametrize("warm", [False, True], ids=["cold", "warm"])
def test_ab_upt_stack_training_step_compiles_fullgraph(warm: bool) -> None:
    """The whole-model benchmark's step (benchmarks/bench_step.py, tiny):
    the untied AB-UPT stack compiles with fullgraph=True, Dynamo and Python
    warn nothing about patternc code, and the compiled step's loss and
    gradients match the hand-written model on the same parameters. Cold
    (compiled before any eager call) too, on torch 2.11 as on 2.13: its layouts are
    built outside the trace (:mod:`patternc.nn.traced_layouts`)."""
    import argparse
    import sys

    sys.path.insert(0, str(EXAMPLES.parent / "benchmarks"))
    import bench_step

    args = argparse.Namespace(anchors=5, queries=11, layers=3, dim=16, heads=2, backend="auto")
    model = bench_step.build(args, torch.device("cpu"))
    hand = bench_step.HandModel(model, args.anchors, args.queries)
    sizes = {"surface_anchors": 5, "surface_queries": 11, "volume_anchors": 5, "volume_queries": 11}
    x, target = torch.randn(2, 32, 16), torch.randn(2, 32, 16)
    _forget_layouts()
    if warm:
        model(x, sizes)
    torch._dynamo.reset()
    compiled = torch.compile(lambda t: model(t, sizes), fullgraph=True, backend="aot_eager")
    with _captured() as (caught, records):
        loss = torch.nn.functional.mse_loss(compiled(x), target)
        grads = torch.autograd.grad(loss, list(model.parameters()))
    messages = [f"{w.filename}: {w.message}" for w in caught] + [r.getMessage() for r in records]
    assert not [m for m in messages if "patternc" in m], messages
    ref_loss = torch.nn.functional.mse_loss(hand(x), target)
    ref_grads = torch.autograd.grad(ref_loss, list(model.parameters()))
    assert abs(float(loss) - float(ref_loss)) < 1e-5 * float(ref_loss)
    for mine, theirs in zip(grads, ref_grads):
        assert torch.allclose(mine, theirs, atol=1e-5, rtol=1e-4)


def test_auto_choice_is_a_constant_to_dynamo(monkeypatch: pytest.MonkeyPatch) -> None:
    """``auto``'s cost model is host work (frozen records, ``max(..., default=)``,
    device tables) that Dynamo on torch 2.11 cannot trace: under
    ``torch.compile`` the pick is computed eagerly at trace time and the graph
    specialises on it. A cost model that Dynamo would choke on must not break
    a fullgraph compile."""
    from dataclasses import dataclass

    from patternc.nn.executors import auto

    @dataclass(frozen=True)
    class Record:
        backend: str

    calls = []

    def untraceable(*args: object) -> tuple[auto.Estimate, ...]:
        calls.append(args)
        torch._dynamo.graph_break()  # stands for whatever a torch version cannot trace
        record = Record(max((n for n in ()), default="batched"))
        return (auto.Estimate(record.backend, 0.0),)

    monkeypatch.setattr(auto, "_candidates", untraceable)
    forget_tables()
    plan, sizes = PLANS["joint"]
    module = PatternAttention(patternc.MixedAttentionConfig(hidden_dim=16, num_heads=2), plan, backend="auto")
    x = torch.randn(2, sum(sizes.values()), 16)
    module(x, sizes)
    forget_tables()  # the trace must make the pick itself
    calls.clear()
    torch._dynamo.reset()
    out, _ = torch.compile(module, fullgraph=True, backend="eager")(x, sizes)
    assert calls, "the cost model was never consulted while tracing"
    assert torch.allclose(out, module(x, sizes)[0], atol=1e-6)


def test_auto_runs_its_flex_pick_inside_a_compiled_graph(
    monkeypatch: pytest.MonkeyPatch, cpu_flex_kernel: None
) -> None:
    """Where the cost model ranks flex first (float32 inference on a GPU),
    ``auto`` runs flex eagerly and inside a user's fullgraph compile
    (Inductor, CPU, flex's CPU fallback switched off), with the tables the
    eager call stored, and the two agree."""
    from patternc.nn.executors import auto, flex

    ran: list[str] = []
    for name in ("batched", "flex"):
        monkeypatch.setitem(
            auto._RUN, name, lambda inputs, name=name, run=auto._RUN[name]: ran.append(name) or run(inputs)
        )
    ranking = (auto.Estimate("flex", 1.0), auto.Estimate("batched", 2.0))
    monkeypatch.setattr(auto, "_candidates", lambda layout, conditions: ranking)
    monkeypatch.setattr(flex, "_fallback_reason", lambda q, dropout_p: None)
    plan, sizes = PLANS["joint"]
    module = PatternAttention(patternc.MixedAttentionConfig(hidden_dim=16, num_heads=2), plan, backend="auto")
    x = torch.randn(2, sum(sizes.values()), 16)
    forget_tables()
    with torch.no_grad():
        expected, _ = module(x, sizes)
        torch._dynamo.reset()
        out, _ = torch.compile(module, fullgraph=True)(x, sizes)
    assert ran == ["flex", "flex"], ran
    assert float((out - expected).norm() / expected.norm()) < 1e-5


@pytest.mark.parametrize("setting", ["none", "ieee", "tf32"])
def test_flex_host_queries_are_constants_to_dynamo(
    monkeypatch: pytest.MonkeyPatch, matmul_precision: Callable[[str], None], setting: str
) -> None:
    """flex reads torch's float32 precision and the GPU's capability on the
    host. Inside a user's ``torch.compile(fullgraph=True)`` those reads must
    not break the graph (torch's precision getters cannot be traced): they
    run once at trace time and agree with the eager answer."""
    from patternc.nn.executors import common, flexkernels

    if getattr(torch.backends.cuda.matmul, "fp32_precision", None) is None:
        pytest.skip("torch < 2.9 has no fp32_precision setting")
    monkeypatch.setattr(common, "_CAPABILITY", {0: (9, 0)})
    device = torch.device("cuda", 0)
    matmul_precision(setting)
    eager = flexkernels.float32_products(device)
    torch._dynamo.reset()

    def scaled(x: torch.Tensor) -> torch.Tensor:
        return x * (2.0 if flexkernels.float32_products(device) == eager else 3.0)

    with _captured() as (caught, records):
        out = torch.compile(scaled, fullgraph=True, backend="eager")(torch.ones(2))
    torch._dynamo.reset()
    messages = [str(w.message) for w in caught] + [r.getMessage() for r in records]
    assert not [m for m in messages if "patternc" in m or "Dynamo" in m], messages
    assert torch.equal(out, torch.full((2,), 2.0))


def _flex_on_cpu(monkeypatch: pytest.MonkeyPatch) -> tuple[PatternAttention, dict[str, int], list[str]]:
    """A joint flex layer with flex's CPU fallback switched off (so its own
    path runs on CPU), and a record of table builds made while tracing."""
    from patternc.nn import flexmask
    from patternc.nn.executors import flex
    from patternc.tracing import compiling as _compiling

    monkeypatch.setattr(flex, "_fallback_reason", lambda q, dropout_p: None)
    traced_builds: list[str] = []
    build = flexmask.FlexTables.build

    def recording_build(*args: object, **kwargs: object) -> object:
        if _compiling():
            traced_builds.append("tables")
        return build(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(flexmask.FlexTables, "build", staticmethod(recording_build))
    plan, sizes = PLANS["joint"]
    torch.manual_seed(0)
    module = PatternAttention(patternc.MixedAttentionConfig(hidden_dim=32, num_heads=2), plan, backend="flex")
    return module, sizes, traced_builds


def _eager_then_compiled(
    module: PatternAttention, x: torch.Tensor, sizes: dict[str, int]
) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Without gradients: the eager output (which stores the layout's
    tables), then the output of a fresh fullgraph compile (Inductor) and the
    warnings raised while compiling it."""
    with torch.no_grad():
        expected, _ = module(x, sizes)
        torch._dynamo.reset()
        with _captured() as (caught, records):
            out, _ = torch.compile(module, fullgraph=True)(x, sizes)
    return expected, out, [str(w.message) for w in caught] + [r.getMessage() for r in records]


def test_flex_compiles_inside_a_user_graph_with_the_eager_tables(
    monkeypatch: pytest.MonkeyPatch, cpu_flex_kernel: None
) -> None:
    """A user's fullgraph compile (Inductor, CPU) of a flex layer that ran
    eagerly once: the trace takes the tables the eager call stored (their
    tensors enter the user's graph as inputs; Inductor cannot lower
    flex_attention on tables computed in the graph), warns nothing naming
    patternc (the executor's own cached compiled function is not reached),
    and matches the eager layer."""
    module, sizes, traced_builds = _flex_on_cpu(monkeypatch)
    x = torch.randn(2, sum(sizes.values()), 32)
    forget_tables()
    expected, out, messages = _eager_then_compiled(module, x, sizes)
    assert not [m for m in messages if "patternc" in m or "lru_cache" in m], messages
    assert traced_builds == []
    assert float((out - expected).norm() / expected.norm()) < 1e-5


def test_flex_with_a_kv_cache_compiles_inside_a_user_graph(
    monkeypatch: pytest.MonkeyPatch, cpu_flex_kernel: None
) -> None:
    """Cached anchors under a user's fullgraph compile (Inductor, CPU): the
    queries-only call with ``kv_cache`` takes its stored tables (their key
    includes the cached lengths) and matches eager and the full pass."""
    module, _, traced_builds = _flex_on_cpu(monkeypatch)
    module.plan = patternc.compile("groups a q\n* -> a\n").patterns["default"]
    x = torch.randn(2, 40, 32)
    with torch.no_grad():
        full, cache = module(x, {"a": 8, "q": 32})
        assert cache is not None
        expected, _ = module(x[:, 8:], {"a": None, "q": 32}, kv_cache=cache)
        torch._dynamo.reset()
        out, _ = torch.compile(module, fullgraph=True)(x[:, 8:], {"a": None, "q": 32}, kv_cache=cache)
    assert traced_builds == []
    assert float((out - expected).norm() / expected.norm()) < 1e-5
    assert float((out - full[:, 8:]).norm() / full[:, 8:].norm()) < 1e-5


@pytest.mark.parametrize("case", ["cold", "key padding"])
def test_flex_without_stored_tables_in_a_user_graph_runs_as_batched(
    monkeypatch: pytest.MonkeyPatch, case: str, cpu_flex_kernel: None
) -> None:
    """Inside a user's fullgraph compile, a flex call whose tables no eager
    call stored (compiled before any eager call with these sizes; or with a
    key padding mask, whose block mask is built per call) would build them
    in the user's graph, which fails Inductor's lowering: the trace runs the
    call as ``batched`` instead (same numbers)."""
    from patternc.nn.executors import batched

    module, sizes, traced_builds = _flex_on_cpu(monkeypatch)
    ran: list[str] = []
    monkeypatch.setattr(
        "patternc.nn.executors.flex.run_batched",
        lambda inputs: ran.append("batched") or batched.run_batched(inputs),
    )
    n = sum(sizes.values())
    x = torch.randn(2, n, 32)
    mask = None
    if case == "key padding":
        mask = torch.ones(2, n, dtype=torch.bool)
        mask[1, 2:5] = False
    with torch.no_grad():
        module(x, sizes)  # the layout is known (torch 2.11 needs it); the tables are stored
        if case == "cold":
            forget_tables()
        torch._dynamo.reset()
        out, _ = torch.compile(module, fullgraph=True, backend="eager")(x, sizes, key_padding_mask=mask)
        reference = PatternAttention(module.config, module.plan, backend="batched")
        reference.load_state_dict(module.state_dict())
        expected, _ = reference(x, sizes, key_padding_mask=mask)
    assert ran == ["batched"] and traced_builds == []
    assert float((out - expected).norm() / expected.norm()) < 1e-5


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_flex_layer_compiles_fullgraph(dtype: torch.dtype) -> None:
    """A flex layer on the GPU inside a user's fullgraph compile (Inductor):
    the kernel options (tiles, float32 products) are chosen without a graph
    break, and the trace takes the tables the eager call stored (computed in
    the graph, Inductor's lowering failed: ``convert FlexibleLayout to
    FixedLayout first``)."""
    plan, sizes = PLANS["joint"]
    torch.manual_seed(0)
    config = patternc.MixedAttentionConfig(hidden_dim=32, num_heads=2)
    module = PatternAttention(config, plan, backend="flex").cuda().to(dtype)
    x = torch.randn(2, sum(sizes.values()), 32, device="cuda", dtype=dtype)
    expected, out, messages = _eager_then_compiled(module, x, sizes)
    assert not [m for m in messages if "patternc" in m], messages
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    assert float((out.float() - expected.float()).norm() / expected.float().norm()) < tolerance


def test_traced_table_lookups_compile_in_one_graph() -> None:
    """Compiled layers ask a layout's tables for what eager calls stored
    (flex does on every trace), so their lookups must trace without a
    break. A bound builtin ``dict.get`` as the lookup broke the graph under
    torch 2.11, which is why only ``auto``'s untraced hot path reads
    ``tables.entries.get`` itself; torch 2.13 traces either, so here this
    guards the traced path itself."""
    from conftest import ab_sizes

    from patternc.nn.schedule import schedule_for
    from patternc.nn.tables import kept_table, table

    plan = patternc.compile(open(EXAMPLES / "ab_upt.patc").read())["joint"]
    layout = schedule_for(plan.token_specs(ab_sizes(3, 6)), plan)
    key = ("traced lookup test", 3)
    kept_table(layout, key, lambda: 5)
    torch._dynamo.reset()
    compiled = torch.compile(
        lambda t: t + table(layout, key, lambda: 0, traceable=True), fullgraph=True, backend="eager"
    )
    assert torch.equal(compiled(torch.zeros(2)), torch.full((2,), 5.0))
    layout.tables.clear()


def test_a_cold_trace_builds_each_layers_layout_outside_the_graph() -> None:
    """Three layers with three plans in one function, compiled before any
    eager call: each layout is built outside the trace and read from its own
    slot (a dict entry added while tracing would be missed by the second
    layer's lookup, Dynamo having read the dict for the first), and the
    outputs equal the eager ones. A second call reuses the graph."""
    from patternc.nn.traced_layouts import TRACED_RECORDS, for_trace

    torch.manual_seed(0)
    layers = [
        (PatternAttention(patternc.MixedAttentionConfig(hidden_dim=16, num_heads=2), plan), sizes)
        for plan, sizes in PLANS.values()
    ]
    xs = [torch.randn(2, sum(sizes.values()), 16) for _, sizes in layers]

    def run(*xs: torch.Tensor) -> list[torch.Tensor]:
        return [layer(x, sizes)[0] for (layer, sizes), x in zip(layers, xs)]

    _forget_layouts()
    torch._dynamo.reset()
    compiled = torch.compile(run, fullgraph=True, backend="eager")
    with _captured() as (caught, records):
        first = compiled(*xs)
        again = compiled(*xs)
    messages = [str(w.message) for w in caught] + [r.getMessage() for r in records]
    assert not [m for m in messages if "patternc" in m or "Dynamo" in m], messages
    for layer, sizes in layers:  # a record each: the trace's view of the layout eager calls now find
        name = TRACED_RECORDS._names[("layout", layer.plan, tuple(sizes.items()), True)]
        assert getattr(TRACED_RECORDS, name) is for_trace(layer.plan.layout(sizes))
    for out, same, expected in zip(first, again, run(*xs)):
        assert torch.allclose(out, expected, atol=1e-6) and torch.equal(out, same)


def test_bad_sizes_in_a_cold_trace_say_what_is_wrong() -> None:
    """Sizes that name no group of the plan, in a cold trace: the error
    carries the compiler's own diagnostics (code, hint), as eagerly."""
    plan, _ = PLANS["joint"]
    layer = PatternAttention(patternc.MixedAttentionConfig(hidden_dim=16, num_heads=2), plan)
    sizes = {"surface_anchors": 3, "surface_querys": 5, "volume_anchors": 2, "volume_queries": 4}
    _forget_layouts()
    torch._dynamo.reset()
    compiled = torch.compile(layer, fullgraph=True, backend="eager")
    with pytest.raises(Exception) as caught:
        compiled(torch.randn(1, 14, 16), sizes)
    assert "E401" in str(caught.value) and "did you mean `surface_queries`?" in str(caught.value)
    with pytest.raises(patternc.PatternError, match="did you mean `surface_queries`"):
        layer(torch.randn(1, 14, 16), sizes)


def test_traced_records_are_one_per_key_and_hold_the_latest() -> None:
    """A record per key, read as an attribute; asked again, the attribute
    holds the record given now (the layout ``LAYOUTS`` holds, after an
    eviction say), as a trace reads it; a plan not in ``PLANS_BY_ID`` (made
    inside a trace) raises with the fix."""
    from patternc.nn.traced_layouts import TRACED_RECORDS, TracedRecords, _build_for_trace, for_trace
    from patternc.plan import PLANS_BY_ID

    (plan, sizes), (other, other_sizes) = PLANS["joint"], PLANS["vlm"]
    key, other_key = tuple(sizes.items()), tuple(other_sizes.items())
    layout, other_layout = plan.layout(sizes), other.layout(other_sizes)
    records = TracedRecords()
    name = records.hold(("layout", plan, key, True), layout)
    assert records.hold(("layout", plan, key, True), layout) == name and getattr(records, name) is layout
    _forget_layouts()
    rebuilt = plan.layout(sizes)  # another record of that layout, as after an eviction
    assert rebuilt is not layout
    assert records.hold(("layout", plan, key, True), rebuilt) == name and getattr(records, name) is rebuilt
    other_name = records.hold(("layout", other, other_key, True), other_layout)
    assert len({name, records.hold(("layout", plan, key, False), layout), other_name}) == 3
    assert getattr(records, other_name) is other_layout and getattr(records, name) is rebuilt
    compiled = patternc.compile("groups a q\na -> a\nq -> a").patterns["default"]
    built = _build_for_trace(id(compiled), (("a", 2), ("q", 3)), True)
    traced = getattr(TRACED_RECORDS, built)
    assert traced is for_trace(compiled.layout({"a": 2, "q": 3})) and traced.tables.traced
    assert traced.calls == compiled.layout({"a": 2, "q": 3}).calls
    del PLANS_BY_ID[id(compiled)]  # as a plan made inside a trace
    with pytest.raises(ValueError, match="make the plan .* outside the compiled function"):
        _build_for_trace(id(compiled), (("a", 2), ("q", 3)), True)


def test_every_plan_made_outside_a_trace_is_found_by_id_while_it_lives() -> None:
    """Compiled, copied or unpickled plans enter ``PLANS_BY_ID`` (an unpickled
    plan with this process's hash); the entry ends with the plan."""
    import copy
    import gc
    import pickle

    from patternc.plan import PLANS_BY_ID

    plan = patternc.compile("groups a q\na -> a\nq -> a, q").patterns["default"]
    copies = [copy.deepcopy(plan), copy.copy(plan), pickle.loads(pickle.dumps(plan))]
    for made in (plan, *copies):
        assert PLANS_BY_ID[id(made)] is made
    for made in copies:
        assert made == plan and hash(made) == hash(plan) and made.calls == plan.calls
    # a pickle from another process: its string hashes are that process's
    made_elsewhere = subprocess.run(
        [sys.executable, "-c", _PICKLE_A_PLAN],
        capture_output=True,
        check=True,
        env={**os.environ, "PYTHONHASHSEED": "12345"},
    ).stdout
    unpickled = pickle.loads(made_elsewhere)
    assert unpickled == plan and hash(unpickled) == hash(plan) and PLANS_BY_ID[id(unpickled)] is unpickled
    gc.collect()  # plans held only by earlier tests' reference cycles leave now, not mid-count
    before = len(PLANS_BY_ID)
    temporary = copy.deepcopy(plan)
    assert len(PLANS_BY_ID) == before + 1
    del temporary
    gc.collect()
    assert len(PLANS_BY_ID) == before


_PICKLE_A_PLAN = """
import pickle, sys, patternc
plan = patternc.compile("groups a q\\na -> a\\nq -> a, q").patterns["default"]
sys.stdout.buffer.write(pickle.dumps(plan))
"""


def _seed_calls() -> dict[str, tuple[Callable[[torch.Tensor], torch.Tensor], int]]:
    """The seed API's calls: (the call on x, tokens in x)."""
    from patternc import AttentionPattern, TokenSpec
    from patternc.configs import (
        CrossAnchorAttentionConfig,
        JointAnchorAttentionConfig,
        SelfAnchorAttentionConfig,
    )
    from patternc.nn import CrossAnchorAttention, JointAnchorAttention, MixedAttention, SelfAnchorAttention

    config = {"hidden_dim": 16, "num_heads": 2}
    mixed = MixedAttention(patternc.MixedAttentionConfig(**config))
    specs = [TokenSpec("anchors", 3), TokenSpec("queries", 4)]
    patterns = [AttentionPattern(["anchors"], ["anchors"]), AttentionPattern(["queries"], ["anchors"])]
    plan = patternc.compile("groups anchors queries\nanchors, queries -> anchors").patterns["default"]
    causal = patternc.compile("groups anchors queries\n* -> * [causal]").patterns["default"]
    branches = [TokenSpec("surface_anchors", 3), TokenSpec("surface_queries", 5)]
    branches += [TokenSpec("volume_anchors", 2), TokenSpec("volume_queries", 4)]
    anchors: dict[str, torch.nn.Module] = {
        "self-anchor": SelfAnchorAttention(
            SelfAnchorAttentionConfig(**config, branches=["surface", "volume"])
        ),
        "cross-anchor": CrossAnchorAttention(
            CrossAnchorAttentionConfig(**config, branches=["surface", "volume"])
        ),
        "joint-anchor": JointAnchorAttention(
            JointAnchorAttentionConfig(**config, branches=["surface", "volume"])
        ),
    }
    calls: dict[str, tuple[Callable[[torch.Tensor], torch.Tensor], int]] = {
        "mixed, TokenSpec list": (lambda x: mixed(x, specs, patterns)[0], 7),
        "mixed, size dict": (lambda x: mixed(x, {"anchors": 3, "queries": 4}, patterns)[0], 7),
        "mixed, size dicts": (lambda x: mixed(x, [{"anchors": 3}, {"queries": 4}], patterns)[0], 7),
        "mixed, a compiled plan": (lambda x: mixed(x, specs, plan)[0], 7),
        "mixed, a plan with modifiers": (lambda x: mixed(x, specs, causal)[0], 7),
    }
    for name, module in anchors.items():
        calls[name] = (lambda x, module=module: module(x, branches), 14)
    return calls


@pytest.mark.parametrize("warm", [False, True], ids=["cold", "warm"])
@pytest.mark.parametrize("call", sorted(_seed_calls()))
def test_the_seed_api_compiles_fullgraph(call: str, warm: bool) -> None:
    """``MixedAttention(x, token_specs, patterns)`` with a hand-written list,
    and the anchor modules, compile with ``fullgraph=True``, before or after
    an eager call. Dynamo cannot hash the list's frozen pydantic patterns
    (the check's cache key), run pydantic's validator (size dicts made
    ``TokenSpec``), or trace the compiler's parser (``re.finditer``, the
    anchor modules compile their source per call), so those are built
    outside the trace; a plan handed per call is found by ``id`` in
    ``PLANS_BY_ID``, so a cold trace does not build its layout."""
    torch.manual_seed(0)
    run, tokens = _seed_calls()[call]
    x = torch.randn(2, tokens, 16)
    _forget_layouts()
    if warm:
        run(x)
    torch._dynamo.reset()
    compiled = torch.compile(run, fullgraph=True, backend="eager")
    with _captured() as (caught, records):
        out, again = compiled(x), compiled(x)
    messages = [str(w.message) for w in caught] + [r.getMessage() for r in records]
    assert not [m for m in messages if "patternc" in m or "lru_cache" in m], messages
    expected = run(x)
    assert torch.allclose(out, expected, atol=1e-6) and torch.equal(out, again)
