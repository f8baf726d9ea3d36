"""FlexAttention lowering and rule modifiers: block masks, executors, caching."""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable

import pytest
import torch
from conftest import warnings_as_errors
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from reference import relative_error
from torch import Tensor
from torch.nn.attention.flex_attention import create_block_mask

import patternc
from patternc.export import to_dot
from patternc.lower.blocks import FULL, PARTIAL, block_classes
from patternc.nn import PatternAttention, rope_frequencies
from patternc.nn.executors import common, flex, flexkernels
from patternc.nn.flexmask import FlexTables, bucket_length
from patternc.nn.schedule import schedule_for

IMPLEMENTATIONS = ["batched", "loop", "dense", "flex"]


def reference_with_modifiers(
    module: PatternAttention, x: Tensor, sizes: dict[str, int], key_padding_mask: Tensor | None = None
) -> Tensor:
    """float64 reference written from the language's definition: a query of group
    G (position i in G) attends to a key of group H (position j in H) iff G's rule
    lists H, and j <= i under [causal], |i - j| < N under [window N]."""
    plan = module.plan
    rule_of = {q: rule for rule in plan.rules for q in rule.queries}
    names, positions = [], []
    for group, size in sizes.items():
        names += [group] * size
        positions += list(range(size))
    n = len(names)
    allowed = torch.zeros(n, n, dtype=torch.bool)
    for a in range(n):
        keys = {k.name: k.modifiers for k in rule_of[names[a]].keys}
        for b in range(n):
            mods = keys.get(names[b])
            ok = mods is not None
            if ok and mods.causal:
                ok = positions[b] <= positions[a]
            if ok and mods.window is not None:
                ok = abs(positions[a] - positions[b]) < mods.window
            allowed[a, b] = ok
    x = x.double()
    heads, dim = module.num_heads, module.head_dim
    qkv = x @ module.qkv.weight.double().T + module.qkv.bias.double()
    q, k, v = qkv.view(x.shape[0], n, 3, heads, dim).unbind(2)
    mask = allowed[None, None]
    if key_padding_mask is not None:
        mask = mask & key_padding_mask[:, None, None, :]
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / dim**0.5
    weights = torch.softmax(scores.masked_fill(~mask, float("-inf")), -1).nan_to_num(0.0)
    out = torch.einsum("bhqk,bkhd->bqhd", weights, v).reshape(x.shape[0], n, heads * dim)
    return out @ module.proj.weight.double().T + module.proj.bias.double()


def make(plan: patternc.Plan, impl: str, seed: int = 0, dim: int = 16) -> PatternAttention:
    torch.manual_seed(seed)
    module = PatternAttention(
        patternc.MixedAttentionConfig(hidden_dim=dim, num_heads=2, implementation=impl), plan
    )
    for p in module.parameters():
        torch.nn.init.normal_(p, std=0.3)
    return module


MODIFIED = patternc.compile("""
groups doc0 doc1 image text
doc0 -> doc0 [causal]
doc1 -> doc1 [causal, window 5]
image -> image
text -> image, text [causal]
""")


# ---------------------------------------------------------------- modifiers everywhere


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("padded", [False, True])
def test_modifiers_match_reference(impl: str, padded: bool) -> None:
    plan = MODIFIED.patterns["default"]
    sizes = {"doc0": 9, "doc1": 13, "image": 7, "text": 11}
    module = make(plan, impl)
    x = torch.randn(2, 40, 16)
    mask = torch.rand(2, 40) > 0.3 if padded else None
    with flex.compiled(False), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # eager FlexAttention warns that it is slow
        with torch.no_grad():
            out, _ = module(x, sizes, key_padding_mask=mask)
    assert torch.isfinite(out).all()
    assert relative_error(out, reference_with_modifiers(module, x, sizes, mask)) < 1e-5


def test_causal_between_single_groups_uses_sdpa_is_causal(monkeypatch: pytest.MonkeyPatch) -> None:
    plan = patternc.compile("groups a b\na -> a\nb -> a [causal]\n").patterns["default"]
    seen = []
    real = torch.nn.functional.scaled_dot_product_attention

    def spy(*args: object, **kwargs: object) -> Tensor:
        seen.append((kwargs.get("is_causal"), kwargs.get("attn_mask") is None))
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    module = make(plan, "loop")
    sizes = {"a": 6, "b": 9}  # b's 9 queries see the first i + 1 of a's 6 keys
    x = torch.randn(1, 15, 16)
    out, _ = module(x, sizes)
    assert seen == [(False, True), (True, True)]  # no mask tensor built for [causal]
    assert relative_error(out, reference_with_modifiers(module, x, sizes)) < 1e-5


def test_window_rows_with_no_key_are_zero() -> None:
    plan = patternc.compile("groups a q\na -> a\nq -> a [window 2]\n").patterns["default"]
    module = make(plan, "batched")
    sizes = {"a": 3, "q": 6}  # queries 4 and 5 of q are 2+ positions past a's last key
    out, _ = module(torch.randn(1, 9, 16), sizes)
    assert torch.allclose(out[0, 3 + 4 :], module.proj.bias.expand(2, -1), atol=1e-6)


def test_modifier_errors_are_reported() -> None:
    with pytest.raises(patternc.PatternError) as info:
        patternc.compile("groups a b\na -> a [casual]\nb -> b [window 0]\n")
    assert [d.code for d in info.value.diagnostics] == ["E020", "E021"]
    assert info.value.diagnostics[0].hint == "did you mean `causal`?"
    assert "`window` must be at least 1, got 0" in str(info.value)
    with pytest.raises(patternc.PatternError, match="`causal` takes no argument"):
        patternc.compile("groups a\na -> a [causal 3]\n")


def test_rules_with_different_modifiers_do_not_merge() -> None:
    plan = patternc.compile("groups a b\na -> a, b [causal]\nb -> a, b\n").patterns["default"]
    assert len(plan.calls) == 2
    assert [c.keys[0].modifiers.causal for c in plan.calls] == [True, False]
    assert "[causal]" in to_dot(patternc.compile("groups a\na -> a [causal]"))


# ---------------------------------------------------------------- block masks


@st.composite
def layouts(draw: st.DrawFn) -> tuple[patternc.Plan, dict[str, int]]:
    n = draw(st.integers(1, 5))
    names = [f"g{i}" for i in range(n)]
    lines = ["groups " + " ".join(names)]
    for name in names:
        keys = draw(st.lists(st.sampled_from(names), min_size=1, unique=True))
        mods = []
        if draw(st.booleans()):
            mods.append("causal")
        if draw(st.booleans()):
            mods.append(f"window {draw(st.integers(1, 300))}")
        lines.append(f"{name} -> {', '.join(keys)}" + (f" [{', '.join(mods)}]" if mods else ""))
    sizes = {name: draw(st.integers(0, 300)) for name in names}
    if not any(sizes.values()):
        sizes[names[0]] = 1
    return patternc.compile("\n".join(lines)).patterns["default"], sizes


def dense_blocks(num: Tensor, indices: Tensor, n_kv: int) -> Tensor:
    out = torch.zeros(num.shape[-1], n_kv, dtype=torch.bool)
    for row in range(num.shape[-1]):
        out[row, indices[0, 0, row, : num[0, 0, row]].long()] = True
    return out


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=layouts())
def test_analytic_block_mask_equals_create_block_mask(case: tuple[patternc.Plan, dict[str, int]]) -> None:
    """The block classes from group intervals equal those torch finds by
    evaluating the mask_mod on every element."""
    plan, sizes = case
    tables = FlexTables.build(schedule_for(plan.token_specs(sizes), plan), {}, "cpu")
    ref = create_block_mask(tables.mask_mod(), None, None, tables.q_len, tables.kv_len, device="cpu")
    n_kv = tables.kv_len // 128
    assert torch.equal(dense_blocks(ref.kv_num_blocks, ref.kv_indices, n_kv), tables.partial)
    assert torch.equal(dense_blocks(ref.full_kv_num_blocks, ref.full_kv_indices, n_kv), tables.full)
    # the pure-Python classes (what `patternc compile --mask` shows) agree too
    python = block_classes(plan.layout(sizes))
    rows = len(python.classes)
    for i in range(rows):
        for j in range(rows):
            assert (python.classes[i][j] == FULL) == bool(tables.full[i, j])
            assert (python.classes[i][j] == PARTIAL) == bool(tables.partial[i, j])


@settings(max_examples=15, deadline=None)
@given(case=layouts())
def test_block_mask_structures_equal_from_kv_blocks(case: tuple[patternc.Plan, dict[str, int]]) -> None:
    """The BlockMask assembled without sorting (kv- and q-major orders) equals the
    one torch's ``from_kv_blocks`` derives from the same block classes."""
    from torch.nn.attention.flex_attention import BlockMask

    from patternc.nn.flexmask import _ordered

    plan, sizes = case
    tables = FlexTables.build(schedule_for(plan.token_specs(sizes), plan), {}, "cpu")
    ours = tables.block_mask()
    theirs = BlockMask.from_kv_blocks(
        *_ordered(tables.partial[None, None]), *_ordered(tables.full[None, None]), BLOCK_SIZE=128
    )
    for name in ("kv", "full_kv", "q", "full_q"):
        num, idx = getattr(ours, f"{name}_num_blocks"), getattr(ours, f"{name}_indices")
        want_num, want_idx = getattr(theirs, f"{name}_num_blocks"), getattr(theirs, f"{name}_indices")
        assert torch.equal(num, want_num), name
        for row in range(num.shape[-1]):
            count = int(num[0, 0, row])
            assert torch.equal(idx[0, 0, row, :count], want_idx[0, 0, row, :count]), (name, row)


def test_block_mask_with_cached_keys() -> None:
    plan = patternc.compile("groups a q\n* -> a\n").patterns["default"]
    schedule = schedule_for(plan.token_specs({"a": None, "q": 300}), plan)
    tables = FlexTables.build(schedule, {"a": 200}, "cpu")
    assert (tables.q_len, tables.kv_len) == (384, 512)
    ref = create_block_mask(tables.mask_mod(), None, None, tables.q_len, tables.kv_len, device="cpu")
    assert torch.equal(dense_blocks(ref.full_kv_num_blocks, ref.full_kv_indices, 4), tables.full)
    assert torch.equal(dense_blocks(ref.kv_num_blocks, ref.kv_indices, 4), tables.partial)


MEMBER_LAYOUTS = {
    "video": (
        "groups prompt frame*\nprompt -> prompt [causal]\nframe* -> prompt, frame*[upto]",
        {"prompt": 37, "frame0": 129, "frame1": 0, "frame2": 200, "frame3": 1, "frame4": 255},
    ),
    "interleaved": (
        "groups system run*{text, image}\nsystem -> system [causal]\n"
        "run*.text -> system, run*[before], self[causal, window 70]\nrun*.image -> system, run*[before], self",
        {"system": 5, "run0.text": 140, "run1.image": 256, "run2.text": 77, "run3.image": 0, "run4.text": 301},
    ),
    "prefixed documents": (
        "groups doc*{prefix, text}\ndoc*.prefix -> self\ndoc*.text -> doc*.prefix[same], self[causal]",
        {"doc0.prefix": 3, "doc0.text": 250, "doc1.text": 129, "doc2.prefix": 128, "doc2.text": 1},
    ),
    "frame window": (
        "groups frame*\nframe* -> frame*[upto 2, causal, across]",
        {f"frame{i}": n for i, n in enumerate([64, 200, 1, 129, 77, 300])},
    ),
}


@pytest.mark.parametrize("name", list(MEMBER_LAYOUTS))
@pytest.mark.parametrize("cached", [False, True], ids=["input", "cached-first"])
def test_member_structures_block_classes(name: str, cached: bool) -> None:
    """Families bound over members (block-causal frames, interleaved runs,
    documents with parts; odd, empty and one-token members): the block
    classes paired on the device equal those torch finds by evaluating the
    mask_mod on every element, and those paired from the host's lists (the
    path ``torch.compile`` traces)."""
    source, sizes = MEMBER_LAYOUTS[name]
    plan = patternc.compile(source).patterns["default"]
    first = next(iter(sizes))
    if cached and "across" in source:
        pytest.skip("`across` refuses a group read from a KV cache")
    given = {g: (None if cached and g == first else n) for g, n in sizes.items()}
    lengths = {first: 19} if cached else {}
    layout = schedule_for(plan.token_specs(given), plan)
    tables = FlexTables.build(layout, lengths, "cpu")
    ref = create_block_mask(tables.mask_mod(), None, None, tables.q_len, tables.kv_len, device="cpu")
    n_kv = tables.kv_len // 128
    assert torch.equal(dense_blocks(ref.kv_num_blocks, ref.kv_indices, n_kv), tables.partial)
    assert torch.equal(dense_blocks(ref.full_kv_num_blocks, ref.full_kv_indices, n_kv), tables.full)
    layout.tables.clear()
    from patternc.nn.traced_layouts import for_trace

    listed = FlexTables.build(for_trace(layout), lengths, "cpu")  # as a trace builds them
    layout.tables.clear()
    assert torch.equal(listed.partial, tables.partial)
    assert torch.equal(listed.full, tables.full)


def test_bucket_lengths() -> None:
    assert [bucket_length(n) for n in (1, 128, 129, 1024, 1025)] == [128, 128, 256, 1024, 1280]
    lengths = {bucket_length(n) for n in range(1000, 20000, 7)}
    assert len(lengths) < 25  # few kernels for many sizes
    assert all(bucket_length(n) >= n and bucket_length(n) <= 1.26 * n + 128 for n in range(1, 50000, 97))


# ---------------------------------------------------------------- executor


@pytest.mark.parametrize("pattern", ["self_anchor", "joint"])
@pytest.mark.parametrize(("anchors", "queries"), [(1, 7), (129, 7)])
def test_flex_eager_matches_dense(pattern: str, anchors: int, queries: int) -> None:
    plan = patternc.compile(open("examples/ab_upt.patc").read()).patterns[pattern]
    sizes = {g: anchors if g.endswith("anchors") else queries for g in plan.groups}
    x = torch.randn(2, 2 * (anchors + queries), 16)
    with flex.compiled(False), warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        out, _ = make(plan, "flex")(x, sizes)
    expected, _ = make(plan, "dense")(x, sizes)
    assert relative_error(out, expected) < 1e-5


def test_flex_with_kv_cache() -> None:
    plan = patternc.compile("groups a q\n* -> a\n").patterns["default"]
    module = make(plan, "flex")
    x = torch.randn(1, 9, 16)
    with torch.no_grad(), flex.compiled(False), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        full, cache = module(x, {"a": 4, "q": 5})
        assert cache is not None
        out, _ = module(x[:, 4:], {"a": None, "q": 5}, kv_cache=cache)
    assert torch.allclose(out, full[:, 4:], atol=1e-5)


def test_block_masks_are_built_once_per_layout() -> None:
    plan = patternc.compile("groups a q\n* -> a\n").patterns["default"]
    module = make(plan, "flex")
    x = torch.randn(1, 77, 16)
    before = flex.block_mask_builds()
    with torch.no_grad(), flex.compiled(False), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(3):
            module(x, {"a": 7, "q": 70})
        assert flex.block_mask_builds() == before + 1
        module(x, {"a": 17, "q": 60})  # a new layout: one more
    assert flex.block_mask_builds() == before + 2


@pytest.mark.parametrize("pattern", ["joint", "self_anchor"])
def test_flex_tables_build_inside_a_fullgraph_compile(pattern: str) -> None:
    """A user's ``torch.compile(fullgraph=True)`` traces the table build (no
    cached tables under tracing): the host packing has a traceable path, and
    the traced tables and block mask equal the eager ones. The trace reads
    the layout as the compile boundary hands it to a trace."""
    from patternc.nn.traced_layouts import for_trace

    sizes = {"surface_anchors": 130, "surface_queries": 70, "volume_anchors": 9, "volume_queries": 200}
    plan = patternc.compile(open("examples/ab_upt.patc").read()).patterns[pattern]
    layout = schedule_for(plan.token_specs(sizes), plan)
    view = for_trace(layout)

    def tables(x: Tensor) -> tuple[Tensor, ...]:
        built = flex.flex_tables(layout if x.dim() else view, {}, x.device)
        mask = built.block_mask()
        return (built.q_group, built.kv_group, built.allowed, built.partial, built.full, mask.kv_num_blocks,
                mask.kv_indices, mask.full_kv_num_blocks)  # fmt: skip

    eager = tables(torch.zeros(1))
    layout.tables.clear()
    torch._dynamo.reset()
    traced = torch.compile(tables, fullgraph=True, backend="eager")(torch.zeros(()))
    assert len(traced) == len(eager)
    for got, want in zip(traced, eager):
        assert torch.equal(got, want)


def test_cpu_gradients_fall_back_to_batched_with_one_warning() -> None:
    plan = patternc.compile("groups a q\n* -> a\n").patterns["default"]
    module = make(plan, "flex")
    reference = make(plan, "batched")
    x = torch.randn(1, 10, 16, requires_grad=True)
    flex._warned.clear()
    with pytest.warns(UserWarning, match="implementation='flex' runs as 'batched' for gradients on CPU"):
        out, _ = module(x, {"a": 3, "q": 7})
    with warnings_as_errors():  # the second call is silent
        module(x, {"a": 3, "q": 7})
    out.sum().backward()
    assert torch.allclose(out, reference(x, {"a": 3, "q": 7})[0])


@pytest.mark.parametrize("sizes", [{"a": 3, "q": 7}, {"a": 130, "q": 61}])
def test_one_head_on_cpu_falls_back_to_batched_with_one_warning(sizes: dict[str, int]) -> None:
    """With one head Inductor fuses the guard's re-poisoning into its C++
    FlexAttention template, which raises "Unsupported for `epilogue_nodes`"
    (torch 2.13): such calls run as ``batched``, said once."""
    plan = patternc.compile("groups a q\na -> a\nq -> a, q [causal]\n").patterns["default"]
    torch.manual_seed(0)
    config = patternc.MixedAttentionConfig(hidden_dim=8, num_heads=1, implementation="flex")
    module = PatternAttention(config, plan)
    x = torch.randn(2, sum(sizes.values()), 8)
    flex._warned.clear()
    with torch.no_grad():
        with pytest.warns(UserWarning, match="implementation='flex' runs as 'batched' for one head on CPU"):
            out, _ = module(x, sizes)
        with warnings_as_errors():  # the second call is silent
            again, _ = module(x, sizes)
    assert torch.equal(out, again)
    assert relative_error(out, reference_with_modifiers(module, x, sizes)) < 1e-5


def test_two_heads_on_cpu_run_flex(cpu_flex_kernel: None) -> None:
    """The one-head fallback above is for one head only: two heads run the kernel."""
    plan = patternc.compile("groups a q\na -> a\nq -> a, q [causal]\n").patterns["default"]
    module = make(plan, "flex")
    sizes = {"a": 3, "q": 7}
    x = torch.randn(1, 10, 16)
    with torch.no_grad(), warnings_as_errors(UserWarning):
        out, _ = module(x, sizes)
    assert relative_error(out, reference_with_modifiers(module, x, sizes)) < 1e-5


def test_a_cpu_kernel_torch_cannot_build_runs_as_batched_and_is_not_retried(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Where torch fails to build FlexAttention's C++ kernel for the CPU
    (torch 2.8.0 does, for every mask), flex warns once, naming torch and the
    cause, runs the call as batched (right numbers), and later calls go to
    batched without another compile. Other errors still raise."""

    class CppCompileError(RuntimeError):
        pass

    tries: list[int] = []

    def failing_kernel(guard: flex.Guard, traced: bool) -> Callable[..., Tensor]:
        def attend(*args: object) -> Tensor:
            tries.append(1)
            try:
                raise CppCompileError("C++ compile error")
            except CppCompileError as cause:  # as Inductor wraps it
                raise RuntimeError("backend='inductor' raised: compile failed") from cause

        return attend

    monkeypatch.setattr(flex, "_attend_fn", failing_kernel)
    monkeypatch.setattr(flex, "_CPU_KERNEL_FAILED", [])
    monkeypatch.setattr(flex, "_warned", set())
    plan = patternc.compile("groups a q\na -> a\nq -> a, q [causal]\n").patterns["default"]
    module = make(plan, "flex")
    sizes = {"a": 3, "q": 7}
    x = torch.randn(1, 10, 16)
    with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out, _ = module(x, sizes)
        again, _ = module(x, sizes)
    said = [str(w.message) for w in caught if "runs as 'batched'" in str(w.message)]
    assert len(said) == 1, said
    assert f"for torch {torch.__version__} failing to build FlexAttention's CPU kernel" in said[0]
    assert tries == [1]
    assert relative_error(out, reference_with_modifiers(module, x, sizes)) < 1e-5 and torch.equal(out, again)
    cpu = torch.zeros(1)
    assert flex._cpu_kernel_build_failed(ValueError("another failure"), cpu) is None
    assert flex._cpu_kernel_build_failed(CppCompileError("on a GPU"), cpu.to("meta")) is None


@pytest.mark.slow
def test_compiled_flex_matches_reference_and_bounds_recompiles(cpu_flex_kernel: None) -> None:
    """torch.compile(flex_attention) on CPU (forward): correct at several sizes,
    and changing sizes reuse a few kernels instead of recompiling each time."""
    import torch._dynamo

    plan = MODIFIED.patterns["default"]
    module = make(plan, "flex")
    counters = torch._dynamo.utils.counters
    graphs = counters["stats"]["unique_graphs"]
    with torch.no_grad(), warnings_as_errors(UserWarning):  # e.g. hitting the recompile limit
        for step, n in enumerate([40, 61, 90, 117, 150, 201, 260, 300]):
            sizes = {"doc0": n // 4, "doc1": n // 4, "image": n // 4, "text": n - 3 * (n // 4)}
            x = torch.randn(1, n, 16)
            out, _ = module(x, sizes)
            if step in (0, 3):
                assert relative_error(out, reference_with_modifiers(module, x, sizes)) < 1e-5
    # 8 sizes, 3 bucketed lengths (128, 256, 384 tokens): 3 kernels
    assert counters["stats"]["unique_graphs"] - graphs <= 3


@pytest.mark.slow
def test_past_the_recompile_limit_flex_runs_as_batched_and_says_so(
    monkeypatch: pytest.MonkeyPatch, cpu_flex_kernel: None
) -> None:
    """A new bucketed shape past Dynamo's recompile limit would fail the
    compiled graph (fullgraph): flex warns once, naming the limit and the
    fix, and runs the call as batched (right numbers at every size)."""
    import torch._dynamo
    import torch._dynamo.config as dynamo_config
    import torch._dynamo.exc as dynamo_errors

    if not any(hasattr(dynamo_errors, n) for n in ("FailOnRecompileLimitHit", "FailOnCacheLimitHit")):
        pytest.skip("this torch runs past the limit eagerly instead of raising")
    plan = MODIFIED.patterns["default"]
    module = make(plan, "flex")
    flex._compiled(flex._attend)  # raises the limit to 64 once, before it is lowered here
    torch._dynamo.reset()
    name, _ = flex._recompile_limit()
    monkeypatch.setattr(flex, "_warned", set())
    # the config's own patch: on torch 2.11, monkeypatch's undo leaves the
    # setting missing, and every later compile in the process fails on it
    with dynamo_config.patch(**{name: 1}), torch.no_grad():
        for n, warns in ((40, False), (300, True), (301, False)):  # buckets 128, 384, 384
            sizes = {"doc0": n // 4, "doc1": n // 4, "image": n // 4, "text": n - 3 * (n // 4)}
            x = torch.randn(1, n, 16)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                out, _ = module(x, sizes)
            messages = [str(w.message) for w in caught if "recompile limit" in str(w.message)]
            assert bool(messages) == warns, messages
            if warns:
                assert "runs as 'batched'" in messages[0]
                assert f"raise torch._dynamo.config.{name} to compile more" in messages[0]
            assert relative_error(out, reference_with_modifiers(module, x, sizes)) < 1e-5
    torch._dynamo.reset()


@pytest.mark.parametrize("capability", [(9, 0), (8, 0), (7, 5)])
@pytest.mark.parametrize(
    ("dtype", "head_dim"),
    [(torch.bfloat16, 64), (torch.float16, 32), (torch.bfloat16, 128), (torch.bfloat16, 256),
     (torch.float32, 64), (torch.float32, 32)],
)  # fmt: skip
def test_kernel_options_are_the_measured_tiles_only_where_measured(
    monkeypatch: pytest.MonkeyPatch,
    matmul_precision: Callable[[str], None],
    capability: tuple[int, int],
    dtype: torch.dtype,
    head_dim: int,
) -> None:
    """Forward tiles for half precision up to head_dim 128; the backward tiles
    only on Hopper, at the head sizes they were chosen for;
    float32's product precision (three TF32 products from Ampere on while
    torch's setting is untouched), with tiles for it on Hopper at head_dim
    64; torch's own options everywhere else (None), and never on CPU."""
    from types import SimpleNamespace

    matmul_precision("none")
    monkeypatch.setattr(common, "_CAPABILITY", {0: capability})
    q = SimpleNamespace(is_cuda=True, dtype=dtype, shape=(1, 8, 2, head_dim), device=torch.device("cuda", 0))
    options = flexkernels.kernel_options(q)  # type: ignore[arg-type]
    hopper = capability[0] == 9
    half = dtype != torch.float32
    forward = options is not None and "fwd_BLOCK_M" in options
    backward = options is not None and "bwd_BLOCK_M1" in options
    products = options is not None and "FLOAT32_PRECISION" in options
    assert forward == (half and head_dim <= 128)
    assert backward == (hopper and head_dim <= 64 and (half or head_dim == 64))
    assert products == (not half)
    # an untouched setting: three TF32 products where torch can tell it is
    # untouched (>= 2.9), else torch's own IEEE; no TF32 before Ampere
    untouched = "'tf32x3'" if hasattr(torch.backends.cuda.matmul, "fp32_precision") else "'ieee'"
    expected_products = untouched if capability[0] >= 8 else "'ieee'"
    if backward:
        assert options is not None
        assert options["bwd_BLOCK_M1"] == (64 if half or expected_products == "'ieee'" else 32)
    if products:
        assert options is not None and options["FLOAT32_PRECISION"] == expected_products
    assert flexkernels.kernel_options(q) is options  # the same dict each call: one compiled graph
    assert flexkernels.kernel_options(torch.zeros(1, 8, 2, head_dim, dtype=dtype)) is None  # CPU


@pytest.mark.parametrize("products", ["'ieee'", "'tf32'"])
def test_float32_tiles_follow_the_products(
    monkeypatch: pytest.MonkeyPatch, matmul_precision: Callable[[str], None], products: str
) -> None:
    """IEEE products keep the CUDA-core tiles swept for them; TF32 ones the tensor-core tiles."""
    from types import SimpleNamespace

    matmul_precision(products.strip("'"))
    monkeypatch.setattr(common, "_CAPABILITY", {0: (9, 0)})
    q = SimpleNamespace(
        is_cuda=True, dtype=torch.float32, shape=(1, 8, 2, 64), device=torch.device("cuda", 0)
    )
    options = flexkernels.kernel_options(q)  # type: ignore[arg-type]
    assert options is not None and options["FLOAT32_PRECISION"] == products
    assert (options["bwd_BLOCK_M1"], options["bwd_num_warps"]) == (
        (64, 8) if products == "'ieee'" else (32, 4)
    )


@pytest.mark.parametrize(
    ("setting", "products"), [("none", "'tf32x3'"), ("ieee", "'ieee'"), ("tf32", "'tf32'")]
)
def test_float32_products_follow_torchs_setting(
    matmul_precision: Callable[[str], None], setting: str, products: str
) -> None:
    """Untouched, float32 products are three TF32 ones; an explicit IEEE
    setting keeps IEEE products and an allowed TF32 plain TF32 ones."""
    if getattr(torch.backends.cuda.matmul, "fp32_precision", None) is None:
        pytest.skip("torch < 2.9 has no untouched state to tell from an explicit 'highest'")
    matmul_precision(setting)
    assert flexkernels._float32_products() == products


# ---------------------------------------------------------------- on a GPU (skipped without CUDA)

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
AB_PC = open("examples/ab_upt.patc").read()


def _gpu_case(
    plan: patternc.Plan, sizes: dict[str, int], padded: bool, seed: int, tolerance: float = 1e-5
) -> None:
    """flex (compiled, on CUDA) forward and backward against the float64 CPU reference
    (head_dim 16: FlexAttention's GPU kernels need at least 16)."""
    module = make(plan, "flex", seed, dim=32)
    n = sum(sizes.values())
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2, n, 32, generator=gen)
    weight = torch.randn(2, n, 32, generator=gen)
    mask = torch.rand(2, n, generator=gen) > 0.3 if padded else None
    x_ref = x.double().requires_grad_()
    (reference_with_modifiers(module, x_ref, sizes, mask) * weight.double()).sum().backward()
    ref_grads = [x_ref.grad] + [p.grad for p in module.parameters()]
    expected = reference_with_modifiers(module, x, sizes, mask).detach()
    module.zero_grad()
    gpu = module.cuda()
    xg = x.cuda().requires_grad_()
    out, _ = gpu(xg, sizes, key_padding_mask=mask.cuda() if mask is not None else None)
    (out * weight.cuda()).sum().backward()
    assert torch.isfinite(out).all()
    assert relative_error(out.cpu(), expected) < tolerance
    grads = [xg.grad] + [p.grad for p in gpu.parameters()]
    for got, want in zip(grads, ref_grads):
        assert got is not None and want is not None
        assert relative_error(got.cpu(), want) < tolerance


@cuda
@pytest.mark.parametrize("pattern", ["self_anchor", "cross_anchor", "joint"])
@pytest.mark.parametrize(("anchors", "queries"), [(1, 7), (7, 129), (129, 1)])
@pytest.mark.parametrize("padded", [False, True])
def test_gpu_flex_forward_backward(
    matmul_precision: Callable[[str], None], pattern: str, anchors: int, queries: int, padded: bool
) -> None:
    """With torch's precision untouched: float32 products as three TF32 ones."""
    matmul_precision("none")
    plan = patternc.compile(AB_PC).patterns[pattern]
    sizes = {g: anchors if g.endswith("anchors") else queries for g in plan.groups}
    _gpu_case(plan, sizes, padded, seed=anchors * 1000 + queries)


@cuda
@pytest.mark.parametrize("products", ["ieee", "tf32"])
def test_gpu_flex_float32_products_as_torch_sets_them(
    matmul_precision: Callable[[str], None], products: str
) -> None:
    """IEEE products when torch is told so; TF32 when allowed (a looser
    tolerance: one TF32 product keeps 10 mantissa bits)."""
    matmul_precision(products)
    plan = patternc.compile(AB_PC).patterns["joint"]
    sizes = {"surface_anchors": 7, "surface_queries": 129, "volume_anchors": 7, "volume_queries": 129}
    _gpu_case(plan, sizes, padded=True, seed=3, tolerance=1e-5 if products == "ieee" else 5e-3)


@cuda
@pytest.mark.parametrize("padded", [False, True])
def test_gpu_flex_modifiers_forward_backward(padded: bool) -> None:
    _gpu_case(
        MODIFIED.patterns["default"], {"doc0": 129, "doc1": 300, "image": 7, "text": 77}, padded, seed=7
    )


@cuda
def test_gpu_flex_kv_cache_and_bf16() -> None:
    plan = patternc.compile(AB_PC).patterns["joint"]
    module = make(plan, "flex", dim=32).cuda()
    sizes = {"surface_anchors": 100, "surface_queries": 300, "volume_anchors": 60, "volume_queries": 200}
    x = torch.randn(2, 660, 32, device="cuda")
    with torch.no_grad():
        full, cache = module(x, sizes)
        assert cache is not None
        cached = {g: (None if g.endswith("anchors") else s) for g, s in sizes.items()}
        queries = torch.cat([x[:, 100:400], x[:, 460:]], dim=1)
        out, _ = module(queries, cached, kv_cache=cache)
        assert relative_error(out, torch.cat([full[:, 100:400], full[:, 460:]], dim=1)) < 1e-5
        dense = make(plan, "dense", dim=32).cuda()
        half, _ = module.to(torch.bfloat16)(x.bfloat16(), sizes)
        ref, _ = dense(x, sizes)
        assert relative_error(half.float(), ref) < 2e-2


@cuda
def test_gpu_small_head_dim_falls_back_to_batched() -> None:
    plan = patternc.compile("groups a q\n* -> a\n").patterns["default"]
    module = make(plan, "flex").cuda()  # head_dim 8
    flex._warned.clear()
    with pytest.warns(UserWarning, match="head_dim 8 < 16"), torch.no_grad():
        out, _ = module(torch.randn(1, 10, 16, device="cuda"), {"a": 3, "q": 7})
    assert torch.isfinite(out).all()


@cuda
def test_gpu_block_mask_built_on_device_matches_cpu() -> None:
    plan = MODIFIED.patterns["default"]
    schedule = schedule_for(plan.token_specs({"doc0": 1000, "doc1": 3000, "image": 700, "text": 2100}), plan)
    on_gpu = FlexTables.build(schedule, {}, "cuda")
    on_cpu = FlexTables.build(schedule, {}, "cpu")
    assert torch.equal(on_gpu.partial.cpu(), on_cpu.partial) and torch.equal(on_gpu.full.cpu(), on_cpu.full)


def test_block_mask_index_tensors_are_contiguous() -> None:
    """FlexAttention's GPU kernels read block indices row by row; the q-major
    copies come from a transposed matrix and must still be contiguous."""
    plan = MODIFIED.patterns["default"]
    tables = FlexTables.build(
        schedule_for(plan.token_specs({"doc0": 300, "doc1": 500, "image": 129, "text": 77}), plan), {}, "cpu"
    )
    mask = tables.block_mask()
    for name in (
        "kv_indices",
        "full_kv_indices",
        "q_indices",
        "full_q_indices",
        "kv_num_blocks",
        "q_num_blocks",
    ):
        assert getattr(mask, name).is_contiguous(), name


def test_pattern_attention_backend_argument() -> None:
    plan = patternc.compile("groups a q\n* -> a\n").patterns["default"]
    config = patternc.MixedAttentionConfig(hidden_dim=16, num_heads=2)
    assert PatternAttention(config, plan, backend="flex").config.implementation == "flex"
    assert PatternAttention(config, plan).config.implementation == "batched"
    with pytest.raises(ValueError, match="implementation"):
        PatternAttention(config, plan, backend="fast")  # type: ignore[arg-type]


AB_UPT = patternc.compile("""
groups surface_anchors surface_queries volume_anchors volume_queries
surface_* -> surface_anchors
volume_* -> volume_anchors
""").patterns["default"]


@pytest.mark.parametrize(
    ("plan", "sizes", "needs"),
    [
        (
            AB_UPT,
            {"surface_anchors": 128, "surface_queries": 256, "volume_anchors": 128, "volume_queries": 90},
            False,
        ),
        (
            AB_UPT,
            {"surface_anchors": 128, "surface_queries": 0, "volume_anchors": 256, "volume_queries": 5},
            False,
        ),
        (
            AB_UPT,
            {"surface_anchors": 100, "surface_queries": 156, "volume_anchors": 128, "volume_queries": 128},
            True,
        ),
        (
            AB_UPT,
            {"surface_anchors": 3, "surface_queries": 4, "volume_anchors": 3, "volume_queries": 4},
            True,
        ),
        (MODIFIED.patterns["default"], {"doc0": 128, "doc1": 128, "image": 128, "text": 128}, True),
    ],
)
def test_the_value_guard_is_needed_only_where_a_block_mixes_groups(
    plan: patternc.Plan, sizes: dict[str, int], needs: bool
) -> None:
    """Whole-block groups (the tail may end mid-block, an empty group is no
    boundary) need no guard; a boundary off a block edge or a modifier's
    diagonal does. The host's answer agrees with the device's block classes:
    some computed block holds a real key that one of its real queries must not see."""
    layout = schedule_for(plan.token_specs(sizes), plan)
    tables = FlexTables.build(layout, {}, "cpu")
    assert tables.needs_value_guard is needs
    if layout.has_modifiers:
        return  # the group table alone does not say what a modifier masks
    n = layout.n_tokens
    q_group, kv_group = tables.q_group[:n], tables.kv_group[:n]
    allowed = tables.allowed[q_group[:, None], kv_group[None, :]]  # [n, n]
    computed = (tables.partial | tables.full).repeat_interleave(128, 0).repeat_interleave(128, 1)[:n, :n]
    assert bool((computed & ~allowed).any()) is needs


def test_keys_of_cached_groups_mix_blocks_off_their_edges() -> None:
    """Key segments: the input, then each cached group appended: a cached
    group that ends mid-block before another starts mixes a block."""
    from patternc.nn.flexmask import _blocks_mix_groups

    assert not _blocks_mix_groups([(0, 0, 128), (1, 128, 300)], 128)
    assert not _blocks_mix_groups([(0, 0, 100), (0, 100, 256), (1, 256, 300)], 128)  # one group, two segments
    assert _blocks_mix_groups([(0, 0, 128), (1, 128, 300), (2, 300, 400)], 128)


# ---------------------------------------------------------------- the FLASH backend (FlashAttention 4)


def _spy_flash(monkeypatch: pytest.MonkeyPatch, min_flops: float | None = None) -> list[bool]:
    """Record flex's FLASH decisions; ``min_flops`` replaces the thresholds."""
    if min_flops is not None:
        monkeypatch.setattr(flexkernels, "_FLASH_MIN_FLOPS", {False: min_flops, True: min_flops})
    decisions: list[bool] = []
    decide = flexkernels.flash_backend

    def recording(inputs: object) -> bool:
        decisions.append(decide(inputs))  # type: ignore[arg-type]
        return decisions[-1]

    monkeypatch.setattr(flexkernels, "flash_backend", recording)
    return decisions


def _inputs_of(n: int, dtype: torch.dtype, grad: bool, padded: bool = False) -> object:
    """AttentionInputs of AB-UPT self-anchor at ``n`` tokens, 12 heads of 64,
    on expanded (unallocated) tensors: only shapes, dtypes and flags are read."""
    from patternc.nn.executors.common import AttentionInputs

    plan = AB_UPT
    quarter = n // 4
    layout = schedule_for(plan.token_specs(dict.fromkeys(plan.groups, quarter)), plan)
    base = torch.empty(1, 1, 12, 64, dtype=dtype, requires_grad=grad)
    q = base.expand(1, layout.n_tokens, 12, 64)
    mask = torch.ones(1, layout.n_tokens, dtype=torch.bool) if padded else None
    return AttentionInputs(q, q, q, layout, {}, mask, 0.0, None)


@pytest.mark.parametrize(
    ("n", "dtype", "grad", "padded", "slopes", "flash"),
    [
        (65536, torch.bfloat16, False, False, False, True),  # 3.3 TFLOP forward
        (10240, torch.bfloat16, False, False, False, False),  # 0.08: FLASH's fixed cost loses
        (16384, torch.bfloat16, False, False, False, False),  # 0.21: not for inference...
        (16384, torch.bfloat16, True, False, False, True),  # ...but past training's 0.13
        (65536, torch.float32, False, False, False, False),
        (65536, torch.bfloat16, False, True, False, False),  # key padding: not measured there
        (65536, torch.bfloat16, False, False, True, False),  # ALiBi: not measured there
    ],
)
def test_flex_asks_for_flash_where_it_runs_and_pays(
    monkeypatch: pytest.MonkeyPatch,
    n: int,
    dtype: torch.dtype,
    grad: bool,
    padded: bool,
    slopes: bool,
    flash: bool,
) -> None:
    from patternc.nn.executors import flash4

    monkeypatch.setattr(flash4, "usable", lambda device, head_dim: True)
    monkeypatch.setattr(flexkernels, "_torch_lowers_flash", lambda: True)
    inputs = _inputs_of(n, dtype, grad, padded)
    if slopes:
        inputs = dataclasses.replace(inputs, alibi_slopes=torch.ones(12))  # type: ignore[type-var]
    assert flexkernels.flash_backend(inputs) is flash  # type: ignore[arg-type]
    monkeypatch.setattr(flash4, "usable", lambda device, head_dim: False)
    assert flexkernels.flash_backend(inputs) is False  # type: ignore[arg-type]


def test_the_flash_block_mask_reads_int32_groups_and_masks_alike() -> None:
    """FLASH's block mask: the same blocks, a mask_mod on int32 group tables
    giving the same answer at every (query, key)."""
    sizes = {"surface_anchors": 100, "surface_queries": 156, "volume_anchors": 128, "volume_queries": 40}
    layout = schedule_for(AB_UPT.token_specs(sizes), AB_UPT)
    tables = FlexTables.build(layout, {}, "cpu")
    key = ("test",)
    wide, narrow = tables.block_mask(), flex._flash_block_mask(layout, tables, key)
    assert torch.equal(wide.kv_num_blocks, narrow.kv_num_blocks)
    assert torch.equal(wide.full_kv_indices, narrow.full_kv_indices)
    captured = [
        c.cell_contents for c in narrow.mask_mod.__closure__ or () if isinstance(c.cell_contents, Tensor)
    ]
    assert {t.dtype for t in captured if t.dtype != torch.bool} == {torch.int32}
    q_idx = torch.arange(tables.q_len)[:, None]
    kv_idx = torch.arange(tables.kv_len)[None, :]
    zero = torch.zeros((), dtype=torch.int64)
    assert torch.equal(wide.mask_mod(zero, zero, q_idx, kv_idx), narrow.mask_mod(zero, zero, q_idx, kv_idx))


def _flash_usable() -> bool:
    from patternc.nn.executors import flash4

    return (
        torch.cuda.is_available()
        and flash4.usable(torch.device("cuda"), 64)
        and flexkernels._torch_lowers_flash()
    )


flash_gpu = pytest.mark.skipif(
    not _flash_usable(), reason="needs flash-attn-4 and torch >= 2.10 on a Hopper or Blackwell GPU"
)


@flash_gpu
@pytest.mark.parametrize(
    ("pattern", "anchors", "queries"),
    [("self_anchor", 128, 256), ("joint", 7, 129), ("cross_anchor", 129, 1)],
)
def test_gpu_flex_on_flash_forward_backward(
    monkeypatch: pytest.MonkeyPatch, pattern: str, anchors: int, queries: int
) -> None:
    """flex on FlashAttention 4 (threshold lowered to take it at test sizes),
    bf16, forward and backward against the float64 reference."""
    decisions = _spy_flash(monkeypatch, min_flops=0.0)
    plan = patternc.compile(AB_PC).patterns[pattern]
    sizes = {g: anchors if g.endswith("anchors") else queries for g in plan.groups}
    module = make(plan, "flex", 5, dim=128)  # 2 heads of 64
    n = sum(sizes.values())
    gen = torch.Generator().manual_seed(5)
    x, weight = torch.randn(2, n, 128, generator=gen), torch.randn(2, n, 128, generator=gen)
    x_ref = x.double().requires_grad_()
    (reference_with_modifiers(module, x_ref, sizes) * weight.double()).sum().backward()
    expected = reference_with_modifiers(module, x, sizes).detach()
    gpu = module.cuda().to(torch.bfloat16)
    xg = x.cuda().to(torch.bfloat16).requires_grad_()
    out, _ = gpu(xg, sizes)
    (out.float() * weight.cuda()).sum().backward()
    assert decisions and all(decisions)
    assert relative_error(out.float().cpu(), expected) < 2e-2
    assert xg.grad is not None and x_ref.grad is not None
    assert relative_error(xg.grad.float().cpu(), x_ref.grad) < 5e-2


@flash_gpu
@pytest.mark.parametrize("where", ["k", "v"])
def test_gpu_flex_on_flash_contains_a_nan_like_separate_calls(
    monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    from patternc.nn.executors import EXECUTORS
    from patternc.nn.executors.common import AttentionInputs

    decisions = _spy_flash(monkeypatch, min_flops=0.0)
    sizes = {"surface_anchors": 128, "surface_queries": 256, "volume_anchors": 128, "volume_queries": 100}
    layout = schedule_for(AB_UPT.token_specs(sizes), AB_UPT)
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, layout.n_tokens, 2, 64, generator=gen).cuda().bfloat16() for _ in range(3))
    ({"k": k, "v": v}[where])[0, 384 + 1, 1, 3] = float("nan")  # token 1 of volume_anchors
    inputs = AttentionInputs(q, k, v, layout, {}, None, 0.0, None)
    with torch.no_grad():
        expected = ~torch.isfinite(EXECUTORS["batched"](inputs)).all(-1)
        got = ~torch.isfinite(EXECUTORS["flex"](inputs)).all(-1)
    assert decisions == [True]
    assert expected.any() and torch.equal(got, expected)


@pytest.mark.parametrize(("batch", "n", "length"), [(1, 5, 128), (2, 130, 256), (1, 128, 128)])
def test_one_pad_serves_the_thirds_of_a_fused_projection(batch: int, n: int, length: int) -> None:
    """Q, K and V split from one fused projection (an ``nn.Linear``, as the
    layer's) are padded as one tensor (their padded versions are views of
    one buffer), with the values and weight gradients three separate pads
    give; anything else (separate tensors, thirds in another order or cut,
    K/V of another length, a trace) is padded one by one."""
    torch.manual_seed(n)
    heads, dim = 3, 8
    projection = torch.nn.Linear(5, 3 * heads * dim)
    x = torch.randn(batch, n, 5)
    weights = [torch.randn(batch, length, heads, dim) for _ in range(3)]

    def loss(parts: tuple[Tensor, ...]) -> Tensor:
        return sum((p * w).sum() for p, w in zip(parts, weights))  # type: ignore[return-value]

    def thirds() -> tuple[Tensor, ...]:
        return tuple(projection(x).view(batch, n, 3, heads, dim).unbind(2))

    q, k, v = thirds()
    found = flex._fused_projection(q, k, v)
    assert found is not None and torch.equal(found, projection(x))
    fused = flex._padded(q, k, v, length, length, traced=False)
    if length != n:
        assert fused[0]._base is not None and fused[0]._base is fused[1]._base is fused[2]._base
    separate = tuple(flex._pad_tokens(t, length) for t in thirds())
    for a, b in zip(fused, separate):
        assert a.shape == (batch, length, heads, dim) and torch.equal(a, b)
    grad_fused = torch.autograd.grad(loss(fused), list(projection.parameters()))
    grad_separate = torch.autograd.grad(loss(separate), list(projection.parameters()))
    for a, b in zip(grad_fused, grad_separate):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-5)
    # not the thirds of one tensor, or not in q, k, v order: one pad each
    apart = tuple(t.detach().clone() for t in (q, k, v))
    assert flex._fused_projection(*apart) is None
    assert flex._fused_projection(k, q, v) is None
    assert flex._fused_projection(q[:, 1:], k[:, 1:], v[:, 1:]) is None
    for a, b in zip(flex._padded(*apart, length, length, traced=False), separate):
        assert torch.equal(a, b)
    # the traced path (a user's torch.compile) and keys of another length pad one by one
    for a, b in zip(flex._padded(q, k, v, length, length, traced=True), separate):
        assert torch.equal(a, b)
    got = flex._padded(q, k, v, length, length + 128, traced=False)
    assert got[1].shape[1] == length + 128 and torch.equal(got[0], separate[0])
    assert got[0]._base is None or got[0]._base is not got[1]._base


def test_a_warm_plain_call_takes_its_decisions_from_one_lookup(monkeypatch: pytest.MonkeyPatch) -> None:
    """A layout's second plain call (same shape, dtype, device, grad mode)
    reads its tables, block mask, options and guard from the record the
    first call kept, with the same output (checked against the float64
    reference); a call under other conditions (another batch size, a key
    padding mask) decides afresh, and dropping the layout's tables drops the
    record with them."""
    plan = MODIFIED.patterns["default"]
    module = make(plan, "flex")
    sizes = {"doc0": 9, "doc1": 30, "image": 11, "text": 77}
    x = torch.randn(1, 127, 16)
    layout = plan.layout(sizes)
    layout.tables.clear()
    with torch.no_grad(), flex.compiled(False), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # flex_attention run eagerly says so
        first, _ = module(x, sizes)
        kept = [key for key in layout.tables.entries if key[0] == "flex call"]
        assert len(kept) == 1

        def decided_again(*args: object, **kwargs: object) -> None:
            raise AssertionError("decided again")

        for name in ("flex_tables", "_block_mask", "_guard", "_score_mod"):
            monkeypatch.setattr(flex, name, decided_again)
        again, _ = module(x, sizes)
        assert torch.equal(first, again)
        assert relative_error(first, reference_with_modifiers(module, x, sizes)) < 1e-5
        with pytest.raises(AssertionError, match="decided again"):
            module(x.expand(2, -1, -1), sizes)
        with pytest.raises(AssertionError, match="decided again"):
            module(x, sizes, key_padding_mask=torch.ones(1, 127, dtype=torch.bool))
        layout.tables.clear()
        with pytest.raises(AssertionError, match="decided again"):
            module(x, sizes)


def test_a_layer_pads_its_fused_projection_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """``PatternAttention``'s flex call hands over the thirds of its fused
    projection: they are padded as one tensor, none by itself; with RoPE
    (Q and K rotated apart) each is padded. Both match the float64 reference."""
    plan = MODIFIED.patterns["default"]
    sizes = {"doc0": 9, "doc1": 30, "image": 11, "text": 77}  # 127 tokens -> 128
    x = torch.randn(2, 127, 16)
    one_by_one: list[int] = []
    pad_tokens = flex._pad_tokens
    monkeypatch.setattr(flex, "_pad_tokens", lambda t, length: one_by_one.append(1) or pad_tokens(t, length))
    module = make(plan, "flex")
    with torch.no_grad(), flex.compiled(False), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # flex_attention run eagerly says so
        out, _ = module(x, sizes)
        assert one_by_one == []
        assert relative_error(out, reference_with_modifiers(module, x, sizes)) < 1e-5
        rotating = PatternAttention(
            patternc.MixedAttentionConfig(hidden_dim=16, num_heads=2, implementation="flex", use_rope=True), plan
        )
        rotating(x, sizes, freqs=rope_frequencies(torch.arange(127), 8))
    assert len(one_by_one) == 3
