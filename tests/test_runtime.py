"""The torch runtime: every executor against a float64 dense-mask reference."""

from __future__ import annotations

import pytest
import torch
from conftest import EXAMPLES
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from reference import reference_attention, relative_error
from torch.utils._python_dispatch import TorchDispatchMode

import patternc
from patternc import AttentionPattern as P
from patternc import MixedAttentionConfig, TokenSpec
from patternc.lower.layout import Layout
from patternc.nn import MixedAttention, PatternAttention, rope_frequencies
from patternc.nn.executors import EXECUTORS
from patternc.nn.executors.batched import stack_segments
from patternc.nn.executors.common import AttentionInputs
from patternc.nn.schedule import schedule_for

IMPLEMENTATIONS = ["batched", "loop", "dense"]
AB = patternc.compile(EXAMPLES / "ab_upt.patc")
AB_GROUPS = AB.groups


def make(impl: str, *, dim: int = 16, heads: int = 2, seed: int = 0, **kw: object) -> MixedAttention:
    torch.manual_seed(seed)
    module = MixedAttention(MixedAttentionConfig(hidden_dim=dim, num_heads=heads, implementation=impl, **kw))
    for p in module.parameters():  # non-trivial biases and norms, so they are checked too
        torch.nn.init.normal_(p, std=0.3)
    return module


def ab_specs(anchors: int, queries: int) -> list[TokenSpec]:
    return [TokenSpec(g, anchors if g.endswith("anchors") else queries) for g in AB_GROUPS]


# ---------------------------------------------------------------- forward


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("pattern", ["self_anchor", "cross_anchor", "joint"])
@pytest.mark.parametrize(
    ("anchors", "queries", "batch"), [(1, 1, 1), (7, 1, 2), (1, 7, 3), (129, 7, 2), (7, 129, 1)]
)
def test_ab_upt_patterns_match_reference(
    impl: str, pattern: str, anchors: int, queries: int, batch: int
) -> None:
    module = make(impl)
    specs = ab_specs(anchors, queries)
    patterns = AB.patterns[pattern].attention_patterns
    x = torch.randn(batch, 2 * (anchors + queries), 16)
    out, _ = module(x, specs, patterns)
    ref = reference_attention(module, x, specs, patterns)
    assert out.shape == x.shape and out.dtype == torch.float32
    assert relative_error(out, ref) < 1e-5


@st.composite
def pattern_sets(draw: st.DrawFn) -> tuple[list[TokenSpec], list[P]]:
    """Random valid pattern sets: groups split into rules, each with random keys."""
    n_groups = draw(st.integers(1, 5))
    names = [f"g{i}" for i in range(n_groups)]
    sizes = [draw(st.sampled_from([0, 1, 2, 3, 7, 9])) for _ in names]
    if not any(sizes):
        sizes[0] = 1
    owner = [draw(st.integers(0, n_groups - 1)) for _ in names]
    patterns = []
    for rule in sorted(set(owner)):
        queries = [g for g, o in zip(names, owner) if o == rule]
        keys = draw(st.lists(st.sampled_from(names), min_size=1, max_size=n_groups, unique=True))
        patterns.append(P(draw(st.permutations(queries)), keys))
    return [TokenSpec(n, s) for n, s in zip(names, sizes)], patterns


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    case=pattern_sets(),
    batch=st.integers(1, 3),
    heads=st.sampled_from([1, 2, 4]),
    padded=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_random_pattern_sets_match_reference(
    case: tuple[list[TokenSpec], list[P]], batch: int, heads: int, padded: bool, seed: int
) -> None:
    specs, patterns = case
    n = sum(s.size or 0 for s in specs)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, n, 8 * heads, generator=gen)
    mask = torch.rand(batch, n, generator=gen) > 0.4 if padded else None
    for impl in IMPLEMENTATIONS:
        module = make(impl, dim=8 * heads, heads=heads, seed=seed)
        out, _ = module(x, specs, patterns, key_padding_mask=mask)
        ref = reference_attention(module, x, specs, patterns, key_padding_mask=mask)
        assert torch.isfinite(out).all()
        assert relative_error(out, ref) < 1e-5, impl


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_float64_agrees_to_rounding(impl: str) -> None:
    module = make(impl).double()
    specs = ab_specs(7, 129)
    patterns = AB.patterns["joint"].attention_patterns
    x = torch.randn(2, 272, 16, dtype=torch.float64)
    out, _ = module(x, specs, patterns)
    assert relative_error(out, reference_attention(module, x, specs, patterns)) < 1e-12


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_rope_and_qk_norm(impl: str) -> None:
    module = make(impl, use_rope=True, qk_norm=True)
    specs = ab_specs(7, 9)
    x = torch.randn(2, 32, 16)
    freqs = rope_frequencies(torch.randn(2, 32, 2) * 10, head_dim=8)  # 2-D point coordinates per batch
    patterns = AB.patterns["cross_anchor"].attention_patterns
    out, _ = module(x, specs, patterns, freqs=freqs)
    ref = reference_attention(module, x, specs, patterns, freqs=freqs)
    assert relative_error(out, ref) < 1e-5
    with pytest.raises(ValueError, match="use_rope=True needs `freqs`"):
        module(x, specs, patterns)
    with pytest.raises(ValueError, match=r"frequencies cover input tokens only"):
        module(x, specs, patterns, freqs=rope_frequencies(torch.arange(40), head_dim=8))


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_all_padded_keys_give_zeros_not_nan(impl: str) -> None:
    module = make(impl)
    specs = ab_specs(3, 4)
    patterns = AB.patterns["self_anchor"].attention_patterns
    x = torch.randn(2, 14, 16, requires_grad=True)
    mask = torch.ones(2, 14, dtype=torch.bool)
    mask[0, 0:3] = False  # batch 0: every surface anchor is padding
    out, _ = module(x, specs, patterns, key_padding_mask=mask)
    assert torch.isfinite(out).all()
    # the surface tokens of batch 0 attend to nothing: their attention output is
    # zero, so the module's output there is the output projection's bias
    assert torch.allclose(out[0, :7], module.proj.bias.expand(7, -1), atol=1e-6)
    ref = reference_attention(module, x, specs, patterns, key_padding_mask=mask)
    assert relative_error(out, ref) < 1e-5
    out.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


# ---------------------------------------------------------------- gradients


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("pattern", ["self_anchor", "cross_anchor", "joint"])
@pytest.mark.parametrize("padded", [True, False])
def test_gradients_match_reference(impl: str, pattern: str, padded: bool) -> None:
    module = make(impl)
    specs = ab_specs(7, 5)
    patterns = AB.patterns[pattern].attention_patterns
    x = torch.randn(2, 24, 16, requires_grad=True)
    weight = torch.randn(2, 24, 16)
    mask = torch.rand(2, 24) > 0.3 if padded else None
    (module(x, specs, patterns, key_padding_mask=mask)[0] * weight).sum().backward()
    grads = [x.grad] + [p.grad for p in module.parameters()]
    module.zero_grad()
    x_ref = x.detach().double().requires_grad_()
    (
        reference_attention(module, x_ref, specs, patterns, key_padding_mask=mask) * weight.double()
    ).sum().backward()
    ref_grads = [x_ref.grad] + [p.grad for p in module.parameters()]
    for got, want in zip(grads, ref_grads):
        assert got is not None and want is not None
        assert relative_error(got, want) < 1e-5


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_gradcheck_float64(impl: str) -> None:
    module = make(impl, dim=8, heads=2).double()
    specs = [TokenSpec("a", 2), TokenSpec("b", 1), TokenSpec("c", 3)]
    patterns = [P(["a", "c"], ["a", "b"]), P(["b"], ["c", "b"])]
    x = torch.randn(2, 6, 8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: module(t, specs, patterns)[0], (x,))


# ---------------------------------------------------------------- KV cache


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("pattern", ["self_anchor", "cross_anchor", "joint"])
@pytest.mark.parametrize("rope", [False, True])
def test_kv_cache_round_trip(impl: str, pattern: str, rope: bool) -> None:
    module = make(impl, use_rope=rope).double()
    specs = ab_specs(7, 9)
    patterns = AB.patterns[pattern].attention_patterns
    x = torch.randn(2, 32, 16, dtype=torch.float64)
    positions = torch.randn(32, 2, dtype=torch.float64) * 5
    freqs = rope_frequencies(positions, head_dim=8) if rope else None
    query_rows = torch.cat([torch.arange(7, 16), torch.arange(23, 32)])
    query_freqs = freqs[query_rows] if freqs is not None else None
    full, cache = module(x, specs, patterns, freqs=freqs)
    assert cache is not None and sorted(cache) == ["surface_anchors", "volume_anchors"]
    assert cache["volume_anchors"]["k"].shape == (2, 2, 7, 8)  # [batch, heads, tokens, head_dim]
    # second call: anchors come from the cache, x holds only the queries
    cached_specs = [TokenSpec(s.name, None if s.name.endswith("anchors") else s.size) for s in specs]
    queries = torch.cat([x[:, 7:16], x[:, 23:32]], dim=1)
    out, new_cache = module(queries, cached_specs, patterns, kv_cache=cache, freqs=query_freqs)
    assert new_cache is None
    expected = torch.cat([full[:, 7:16], full[:, 23:32]], dim=1)
    assert torch.allclose(out, expected, rtol=0, atol=1e-12)
    ref = reference_attention(module, queries, cached_specs, patterns, kv_cache=cache, freqs=query_freqs)
    assert relative_error(out, ref) < 1e-12


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_kv_cache_with_patterns_that_leave_cached_groups_out(impl: str) -> None:
    module = make(impl)
    specs = [TokenSpec("anchors", 5), TokenSpec("queries", 4)]
    x = torch.randn(1, 9, 16)
    full, cache = module(x, specs, [P(["anchors", "queries"], ["anchors"])])
    out, _ = module(
        x[:, 5:],
        [TokenSpec("anchors", None), TokenSpec("queries", 4)],
        [P(["queries"], ["anchors"])],
        kv_cache=cache,
    )
    assert torch.allclose(out, full[:, 5:], atol=1e-6)


def test_kv_cache_errors() -> None:
    module = make("batched")
    specs = [TokenSpec("anchors", None), TokenSpec("queries", 4)]
    patterns = [P(["queries"], ["anchors"])]
    x = torch.randn(2, 4, 16)
    with pytest.raises(ValueError, match=r"groups \['anchors'\] have size=None.*kv_cache is None"):
        module(x, specs, patterns)
    with pytest.raises(
        ValueError, match=r"kv_cache has no entry 'anchors' with 'k' and 'v' \(it has \['other'\]\)"
    ):
        module(x, specs, patterns, kv_cache={"other": {}})
    bad = {"anchors": {"k": torch.randn(2, 2, 5, 4), "v": torch.randn(2, 2, 5, 8)}}
    with pytest.raises(
        ValueError,
        match=r"kv_cache\['anchors'\]\['k'\] has shape \(2, 2, 5, 4\); expected \[batch=2, heads=2, tokens, head_dim=8\]",
    ):
        module(x, specs, patterns, kv_cache=bad)
    mismatched = {"anchors": {"k": torch.randn(2, 2, 5, 8), "v": torch.randn(2, 2, 6, 8)}}
    with pytest.raises(ValueError, match="has 5 keys but 6 values"):
        module(x, specs, patterns, kv_cache=mismatched)
    wrong_dtype = {"anchors": {"k": torch.randn(2, 2, 5, 8).double(), "v": torch.randn(2, 2, 5, 8)}}
    with pytest.raises(ValueError, match="is torch.float64 on cpu; the queries are torch.float32"):
        module(x, specs, patterns, kv_cache=wrong_dtype)
    good = {"anchors": {"k": torch.randn(2, 2, 5, 8), "v": torch.randn(2, 2, 5, 8)}}
    with pytest.raises(ValueError, match="key_padding_mask cannot be combined with a KV cache"):
        module(x, specs, patterns, kv_cache=good, key_padding_mask=torch.ones(2, 4, dtype=torch.bool))


# ---------------------------------------------------------------- validation


def test_invalid_patterns_raise_pattern_error_with_compiler_messages() -> None:
    module = make("batched")
    specs = [TokenSpec("anchors", 3), TokenSpec("queries", 4)]
    with pytest.raises(patternc.PatternError) as info:
        module(torch.randn(1, 7, 16), specs, [P(["anchors"], ["anchor"])])
    assert isinstance(info.value, ValueError)
    assert [d.code for d in info.value.diagnostics] == ["E201", "E301"]
    assert "did you mean `anchors`?" in str(info.value)
    assert "group `queries` is a query in no rule" in str(info.value)


def test_input_shape_errors() -> None:
    module = make("loop")
    specs = [TokenSpec("a", 3), TokenSpec("b", 4)]
    patterns = [P(["a", "b"], ["a"])]
    with pytest.raises(
        ValueError, match=r"x has shape \(1, 6, 16\) but the sizes \(a=3, b=4; .*\) put 7 tokens in it"
    ):
        module(torch.randn(1, 6, 16), specs, patterns)
    with pytest.raises(ValueError, match=r"key_padding_mask must be bool \[batch, n_tokens\] = \[1, 7\]"):
        module(torch.randn(1, 7, 16), specs, patterns, key_padding_mask=torch.ones(1, 7))
    with pytest.raises(TypeError, match="expected TokenSpec or a {name: size} dict"):
        module(torch.randn(1, 7, 16), ["a"], patterns)  # type: ignore[list-item]
    with pytest.raises(ValueError, match="unknown attention implementation 'fast'"):
        from patternc.nn.executors import get_executor

        get_executor("fast")


def test_config_validation_messages() -> None:
    with pytest.raises(
        ValueError, match=r"hidden_dim \(30\) must be divisible by num_heads \(4\); use hidden_dim=28 or 32"
    ):
        MixedAttentionConfig(hidden_dim=30, num_heads=4)
    with pytest.raises(ValueError, match="implementation"):
        MixedAttentionConfig(hidden_dim=32, num_heads=4, implementation="fast")  # type: ignore[arg-type]
    assert MixedAttentionConfig(hidden_dim=30, num_heads=4, head_dim=8).inner_dim == 32


def test_token_specs_as_dicts_and_positional() -> None:
    module = make("batched")
    x = torch.randn(1, 7, 16)
    patterns = [P(["a", "b"], ["a"])]
    out_specs, _ = module(x, [TokenSpec("a", 3), TokenSpec("b", 4)], patterns)
    out_dicts, _ = module(x, [{"a": 3}, {"b": 4}], patterns)
    assert torch.equal(out_specs, out_dicts)


# ---------------------------------------------------------------- plans


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_compiled_plan_in_place_of_patterns(impl: str) -> None:
    module = make(impl)
    plan = AB.patterns["joint"]
    sizes = {"surface_anchors": 3, "surface_queries": 5, "volume_anchors": 2, "volume_queries": 7}
    x = torch.randn(2, 17, 16)
    out_plan, _ = module(x, plan.token_specs(sizes), plan)
    out_list, _ = module(x, plan.token_specs(sizes), plan.attention_patterns)
    assert torch.equal(out_plan, out_list)
    attn = PatternAttention(module.config, plan)
    attn.load_state_dict(module.state_dict())
    out_dict, _ = attn(x, sizes)
    out_tokens, _ = attn(x, plan.token_specs(sizes))
    assert torch.equal(out_dict, out_plan) and torch.equal(out_tokens, out_plan)
    assert "plan='joint'" in repr(attn)


def test_plan_requires_its_group_order() -> None:
    module = make("batched")
    plan = AB.patterns["joint"]
    specs = list(reversed(plan.token_specs(dict.fromkeys(AB_GROUPS, 2))))
    with pytest.raises(patternc.PatternError, match="build token_specs with plan.token_specs"):
        module(torch.randn(1, 8, 16), specs, plan)


def test_batched_reads_evenly_spaced_groups_as_views() -> None:
    specs = ab_specs(4, 12)
    schedule = schedule_for(specs, AB.patterns["self_anchor"])
    assert schedule.launches == ((0, 1),)
    t = torch.randn(2, 32, 3, 5)
    for segments in ([c.queries for c in schedule.calls], [c.keys for c in schedule.calls]):
        stacked = stack_segments(t, segments, {})
        assert stacked.untyped_storage().data_ptr() == t.untyped_storage().data_ptr()  # no copy
        expected = torch.stack([t[:, s[0].start : s[0].stop] for s in segments], dim=1).flatten(0, 1)
        assert torch.equal(stacked, expected)


def test_schedules_are_cached_per_layout() -> None:
    specs = ab_specs(4, 12)
    patterns = AB.patterns["joint"].attention_patterns
    assert schedule_for(specs, patterns) is schedule_for(list(specs), list(patterns))


def test_dot_product_attention_is_full_attention() -> None:
    from patternc.nn import DotProductAttention

    torch.manual_seed(0)
    plain = DotProductAttention(patternc.AttentionConfig(hidden_dim=16, num_heads=2))
    mixed = make("batched")
    mixed.load_state_dict(plain.state_dict())
    x = torch.randn(2, 9, 16)
    out, _ = mixed(x, [TokenSpec("all", 9)], [P(["all"], ["all"])])
    assert torch.allclose(plain(x), out, atol=1e-6)


def test_init_modes() -> None:
    zero = MixedAttention(MixedAttentionConfig(hidden_dim=16, num_heads=2, init_weights="zero"))
    assert torch.count_nonzero(zero.proj.weight) == 0 and zero.qkv.weight.std() < 0.03
    trunc = MixedAttention(MixedAttentionConfig(hidden_dim=64, num_heads=2, init_weights="truncnormal002"))
    assert trunc.qkv.weight.abs().max() <= 0.04 and torch.count_nonzero(trunc.qkv.bias) == 0
    torch_default = MixedAttention(MixedAttentionConfig(hidden_dim=64, num_heads=2, init_weights="torch"))
    assert torch_default.qkv.weight.abs().max() > 0.04


def test_dropout_only_in_training() -> None:
    module = make("batched", dropout=0.5)
    specs = ab_specs(5, 6)
    patterns = AB.patterns["joint"].attention_patterns
    x = torch.randn(2, 22, 16)
    module.eval()
    first, _ = module(x, specs, patterns)
    assert torch.equal(first, module(x, specs, patterns)[0])
    assert relative_error(first, reference_attention(module, x, specs, patterns)) < 1e-5
    module.train()
    torch.manual_seed(1)
    a, _ = module(x, specs, patterns)
    torch.manual_seed(2)
    b, _ = module(x, specs, patterns)
    assert not torch.allclose(a, b)


@pytest.mark.slow
def test_torch_compile_fixed_layout() -> None:
    module = make("batched")
    specs = ab_specs(8, 16)
    patterns = AB.patterns["self_anchor"].attention_patterns
    x = torch.randn(2, 48, 16)
    eager, _ = module(x, specs, patterns)
    compiled = torch.compile(module)
    out, _ = compiled(x, specs, patterns)
    assert relative_error(out, eager) < 1e-5


def _backward_node_names(out: torch.Tensor) -> list[str]:
    names, seen, stack = [], set(), [out.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.append(type(node).__name__)
        stack.extend(next_node for next_node, _ in node.next_functions)
    return names


@pytest.mark.parametrize(
    ("source", "sizes", "most_slices"),
    [
        ("groups doc*\ndoc* -> self", {f"doc{i}": 3 + 2 * i for i in range(12)}, 0),
        (EXAMPLES / "ab_upt.patc", dict.fromkeys(AB_GROUPS, 6), 2),
        ("groups a b c d\na, c -> a, c\nb, d -> b", {"a": 3, "b": 5, "c": 4, "d": 2}, 0),
    ],
)
@pytest.mark.parametrize("impl", ["batched", "loop"])
def test_backward_touches_each_input_once(
    impl: str, source: object, sizes: dict[str, int], most_slices: int
) -> None:
    """Each slice of an input in the graph costs a full-size zero-filled
    gradient in the backward pass; the executors read segments from one split
    per tensor instead, so slices do not grow with the groups (the
    self-anchor launch keeps one strided window for each of K and V)."""
    program = patternc.compile(source)  # type: ignore[arg-type]
    plans = (
        [program.patterns["default"]] if "default" in program.patterns else list(program.patterns.values())
    )
    for plan in plans:
        schedule = schedule_for(plan.token_specs(sizes), plan)
        q, k, v = (torch.randn(2, schedule.n_tokens, 2, 4, requires_grad=True) for _ in range(3))
        out = EXECUTORS[impl](AttentionInputs(q, k, v, schedule, {}, None, 0.0, None))
        names = _backward_node_names(out)
        slices = sum(name in ("SliceBackward0", "SelectBackward0") for name in names)
        assert slices <= most_slices, f"{plan.name}: {slices} slices in the backward graph: {sorted(names)}"
        out.backward(torch.ones_like(out))
        assert q.grad is not None and k.grad is not None and v.grad is not None


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("pattern", ["self_anchor", "cross_anchor", "joint"])
def test_one_tensor_as_queries_keys_and_values(impl: str, pattern: str) -> None:
    """Self-similarity (q is k is v, one object): key-side reads must not be
    confused with query-side ones, on stacked and on per-call launches."""
    plan = AB.patterns[pattern]
    for sizes in (dict.fromkeys(AB_GROUPS, 4), dict(zip(AB_GROUPS, (3, 5, 4, 2)))):
        schedule = schedule_for(plan.token_specs(sizes), plan)
        x = torch.randn(2, schedule.n_tokens, 2, 4, dtype=torch.float64)
        out = EXECUTORS[impl](AttentionInputs(x, x, x, schedule, {}, None, 0.0, None))
        ref = EXECUTORS["dense"](
            AttentionInputs(x.clone(), x.clone(), x.clone(), schedule, {}, None, 0.0, None)
        )
        assert relative_error(out, ref) < 1e-12


class _CountOps(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("n_docs", [4, 16])
def test_batched_dispatches_two_ops_per_document(n_docs: int) -> None:
    """On a GPU each dispatched op is host time; documents of distinct lengths
    are one launch each, and the executor adds one view per launch (the
    output's transpose) plus a constant: one split per tensor, one concatenation."""
    plan = patternc.compile("groups doc*\ndoc* -> self").patterns["default"]
    sizes = {f"doc{i}": 3 + 2 * i for i in range(n_docs)}
    schedule = schedule_for(plan.token_specs(sizes), plan)
    q, k, v = (torch.randn(1, schedule.n_tokens, 2, 4) for _ in range(3))
    inputs = AttentionInputs(q, k, v, schedule, {}, None, 0.0, None)
    EXECUTORS["batched"](inputs)  # the layout's caches fill on the first call
    with _CountOps() as counter:
        EXECUTORS["batched"](inputs)
    attention_calls = sum("scaled_dot_product" in op for op in counter.ops)
    assert attention_calls == n_docs
    assert len(counter.ops) <= 2 * n_docs + 10, counter.ops  # 2n + 7 on torch 2.13


def _assert_batched_matches_dense(schedule: Layout, batch: int) -> None:
    """``batched`` against the dense-mask executor in float64, forward and
    backward, on random Q/K/V (``[batch, N, 2, 4]``)."""
    gen = torch.Generator().manual_seed(batch)
    q, k, v = (
        torch.randn(batch, schedule.n_tokens, 2, 4, dtype=torch.float64, generator=gen, requires_grad=True)
        for _ in range(3)
    )
    out = EXECUTORS["batched"](AttentionInputs(q, k, v, schedule, {}, None, 0.0, None))
    copies = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    ref = EXECUTORS["dense"](AttentionInputs(*copies, schedule, {}, None, 0.0, None))
    assert relative_error(out, ref) < 1e-12
    # without gradients (other views of the inputs), also from one packed QKV tensor as a layer has it
    packed = torch.stack([t.detach() for t in (q, k, v)], dim=2)  # [B, N, 3, H, D]
    for inputs in ((q.detach(), k.detach(), v.detach()), packed.unbind(2)):
        with torch.no_grad():
            plain = EXECUTORS["batched"](AttentionInputs(*inputs, schedule, {}, None, 0.0, None))
        assert relative_error(plain, ref) < 1e-12
    grad = torch.randn(out.shape, dtype=torch.float64, generator=gen)
    out.backward(grad)
    ref.backward(grad)
    for mine, theirs in zip((q, k, v), copies):
        assert relative_error(mine.grad, theirs.grad) < 1e-12


def _batched_ops(
    schedule: Layout, requires_grad: bool = False
) -> tuple[list[str], torch.Tensor, torch.Tensor]:
    """The ATen ops of one warm ``batched`` call (batch 2), its output and Q."""
    q, k, v = (torch.randn(2, schedule.n_tokens, 2, 4, requires_grad=requires_grad) for _ in range(3))
    inputs = AttentionInputs(q, k, v, schedule, {}, None, 0.0, None)
    EXECUTORS["batched"](inputs)  # the layout's caches fill on the first call
    with _CountOps() as counter:
        out = EXECUTORS["batched"](inputs)
    return counter.ops, out, q


@pytest.mark.parametrize(
    ("source", "sizes", "periodic"),
    [
        (EXAMPLES / "ab_upt.patc", dict(zip(AB_GROUPS, (5, 11, 5, 11))), True),
        (
            "groups a b c\na -> self [causal]\nb -> self [causal]\nc -> self [causal]",
            dict.fromkeys("abc", 9),
            True,
        ),
        # keys that start inside each period (offset 3): each branch reads its second group
        ("groups p q r s\np -> q\nr -> s\nq -> self\ns -> self", {"p": 3, "q": 5, "r": 3, "s": 5}, True),
        ("groups a b\na -> self [window 3]\nb -> self [window 3]", dict.fromkeys("ab", 7), False),
        ("groups a b\na -> self\nb -> self", {"a": 7, "b": 8}, False),
    ],
)
@pytest.mark.parametrize("batch", [1, 3])
def test_periodic_launches_match_reference(
    source: object, sizes: dict[str, int], periodic: bool, batch: int
) -> None:
    """Launches whose calls repeat with a period read Q/K/V as views; the
    record is built by the layout only where that is exact (equal branches,
    no modifier but a plain [causal]), and the output matches the float64
    reference forward and backward."""
    program = patternc.compile(source)  # type: ignore[arg-type]
    plan = program.patterns.get("self_anchor") or program.patterns["default"]
    schedule = schedule_for(plan.token_specs(sizes), plan)
    assert (schedule.batched.periodic_launches[0] is not None) == periodic
    _assert_batched_matches_dense(schedule, batch)


@pytest.mark.parametrize("requires_grad", [False, True])
def test_periodic_launch_dispatches_one_attention_and_views(requires_grad: bool) -> None:
    """The multi-branch hot path (self-anchor): one SDPA, every other op a
    view (no copy of Q, K, V or the output); host time is these ops. Without
    a gradient each input is one ``as_strided``; with one, no ``as_strided``
    (its backward would write a zeroed copy of the whole input)."""
    schedule = schedule_for(ab_specs(8, 24), AB.patterns["self_anchor"])
    ops, out, q = _batched_ops(schedule, requires_grad)
    views = ("view", "transpose", "slice", "as_strided", "detach")  # detach: autograd saving its inputs
    compute = [op for op in ops if not any(view in op for view in views)]
    assert [op for op in compute if "scaled_dot_product" not in op] == [], ops
    assert sum("scaled_dot_product" in op for op in ops) == 1
    strided = sum("as_strided" in op for op in ops)
    if requires_grad:
        assert strided == 0 and len(ops) <= 12, ops  # 3 reads of 2-3 views, SDPA, a detach, 2 output views
    else:  # 3 reads of one view each, SDPA, one output view (CPU's flash kernel leaves it token-major)
        assert strided == 4 and len(ops) == 5, ops
    assert out.shape == q.shape


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("token_major", [True, False])
@pytest.mark.parametrize("requires_grad", [False, True])
def test_periodic_output_goes_back_to_token_order(batch: int, token_major: bool, requires_grad: bool) -> None:
    """The periodic launch's output returns to ``[B, N, H, D]`` as one
    ``as_strided`` only when it is token-major in memory and takes no
    gradient; laid out head-major (CPU's math kernel) or with a gradient it
    takes the transpose and reshape; the values are the same either way."""
    from patternc.nn.executors.batched import _back_to_tokens

    count, length, heads, dim = 2, 5, 3, 4
    tokens = torch.randn(batch * count, length, heads, dim)
    out = tokens.transpose(1, 2) if token_major else tokens.transpose(1, 2).contiguous()
    out.requires_grad_(requires_grad)
    shape = torch.Size((batch, count * length, heads, dim))
    with _CountOps() as counter:
        back = _back_to_tokens(out, batch, count * length)
    assert back.shape == shape and torch.equal(back, out.transpose(1, 2).reshape(shape))
    assert torch.equal(back, tokens.reshape(shape))
    strided = any("as_strided" in op for op in counter.ops)
    assert strided == (token_major and not requires_grad), counter.ops


@pytest.mark.parametrize(
    ("source", "pattern", "sizes", "ranges"),
    [
        (EXAMPLES / "ab_upt.patc", "joint", dict(zip(AB_GROUPS, (5, 11, 3, 9))), ((0, 5), (16, 19))),
        ("groups a b\n* -> *", "default", {"a": 6, "b": 7}, ((0, 13),)),
        ("groups a b\n* -> a", "default", {"a": 6, "b": 7}, ((0, 6),)),
        ("groups a b\n* -> b", "default", {"a": 6, "b": 7}, ((6, 13),)),
        ("groups a b c\n* -> a, b", "default", {"a": 6, "b": 7, "c": 2}, ((0, 13),)),
        ("groups a b c\n* -> c, a", "default", {"a": 6, "b": 7, "c": 2}, ((0, 6), (13, 15))),
        ("groups x\nx -> self [causal]", "default", {"x": 13}, ((0, 13),)),
        # not one call over the whole input in order, or keys that need a mask
        (EXAMPLES / "ab_upt.patc", "self_anchor", dict(zip(AB_GROUPS, (5, 11, 3, 9))), None),
        ("groups a b\n* -> a[causal], b", "default", {"a": 6, "b": 7}, None),
        ("groups a b\n* -> * [window 3]", "default", {"a": 6, "b": 7}, None),
    ],
)
@pytest.mark.parametrize("batch", [1, 3])
def test_whole_call_layouts_match_reference(
    source: object,
    pattern: str,
    sizes: dict[str, int],
    ranges: tuple[tuple[int, int], ...] | None,
    batch: int,
) -> None:
    """A layout that is one call over every query (joint anchors, dense, one
    causal sequence) records the token ranges of its keys in the call's order
    (adjacent ones merged); only there, and the hot path through them
    matches the float64 reference forward and backward."""
    program = patternc.compile(source)  # type: ignore[arg-type]
    schedule = schedule_for(program.patterns[pattern].token_specs(sizes), program.patterns[pattern])
    assert schedule.batched.whole_call_keys == ranges
    _assert_batched_matches_dense(schedule, batch)


def test_whole_call_gathers_keys_in_one_index_select() -> None:
    """Joint anchors: one ``index_select`` per key tensor, one SDPA, the rest
    transposes; keys in one range are a view (a narrow)."""
    ops, out, q = _batched_ops(schedule_for(ab_specs(8, 24), AB.patterns["joint"]))
    names = [op.rsplit(".", 1)[0] for op in ops]
    assert sum("scaled_dot_product" in name for name in names) == 1
    others = sorted(name for name in names if "scaled_dot_product" not in name and name != "aten.transpose")
    assert others == ["aten.index_select", "aten.index_select"], names
    assert out.shape == q.shape
    program = patternc.compile("groups a b\n* -> b")
    ops, out, q = _batched_ops(
        schedule_for(program.patterns["default"].token_specs({"a": 6, "b": 7}), program.patterns["default"])
    )
    names = [op.rsplit(".", 1)[0] for op in ops]
    others = sorted(name for name in names if "scaled_dot_product" not in name and name != "aten.transpose")
    assert others == ["aten.slice", "aten.slice"], names  # narrow dispatches as a slice


def test_traceable_tables_are_handed_to_a_trace_only_for_their_own_layout() -> None:
    """A traceable table an eager call built is what a trace gets, from the
    layout's own slot (another layout with the same key has none); a plain
    table is always rebuilt under tracing; ``clear`` empties the slot. The
    trace's view is what the compile boundary hands a trace (one per layout);
    it stores nothing."""
    from patternc.nn.tables import stored_table, table
    from patternc.nn.traced_layouts import for_trace

    first = schedule_for(ab_specs(4, 8), AB.patterns["joint"])
    second = schedule_for(ab_specs(5, 8), AB.patterns["joint"])
    builds: list[str] = []

    def build(name: str) -> object:
        builds.append(name)
        return name

    assert table(first, ("kind",), lambda: build("first"), traceable=True) == "first"
    assert table(first, ("kind",), lambda: build("again"), traceable=True) == "first"
    assert table(first, ("plain",), lambda: build("plain")) == "plain"
    assert not first.tables.missing_in_trace(("missing",))  # a layout's own slot is never traced
    # the layouts as the compile boundary hands them to a trace
    first, second = for_trace(first), for_trace(second)
    assert first.tables.traced and for_trace(schedule_for(ab_specs(4, 8), AB.patterns["joint"])) is first
    assert table(first, ("kind",), lambda: build("traced"), traceable=True) == "first"
    assert table(first, ("plain",), lambda: build("plain traced")) == "plain traced"
    assert stored_table(second, ("kind",)) is None
    assert second.tables.missing_in_trace(("kind",)) and not first.tables.missing_in_trace(("kind",))
    assert table(second, ("kind",), lambda: build("second traced"), traceable=True) == "second traced"
    assert stored_table(second, ("kind",)) is None  # a trace stores nothing
    assert builds == ["first", "plain", "plain traced", "second traced"]
    first.tables.clear()
    assert stored_table(first, ("kind",)) is None and len(first.tables) == 0


@pytest.mark.parametrize("executor", ["batched", "loop", "auto"])
@pytest.mark.parametrize("requires_grad", [False, True])
@pytest.mark.parametrize("pattern", ["self_anchor", "joint"])
@pytest.mark.parametrize("sizes", [(4, 12, 4, 12), (4, 12, 5, 11)])  # equal branches: periodic
def test_values_may_have_their_own_head_dim(
    executor: str, requires_grad: bool, pattern: str, sizes: tuple[int, ...]
) -> None:
    """SDPA lets V's head dim differ from Q's and K's; the hot paths shape
    their output from V's (the self-anchor path once reshaped it to Q's
    shape, which failed), and match the dense float64 executor."""
    plan = AB.patterns[pattern]
    layout = schedule_for(plan.token_specs(dict(zip(AB_GROUPS, sizes))), plan)
    if pattern == "self_anchor":
        assert (layout.batched.periodic_launches[0] is not None) == (sizes[:2] == sizes[2:])
    q, k = (
        torch.randn(2, layout.n_tokens, 2, 8, dtype=torch.float64, requires_grad=requires_grad) for _ in "qk"
    )
    v = torch.randn(2, layout.n_tokens, 2, 5, dtype=torch.float64, requires_grad=requires_grad)
    inputs = AttentionInputs(q, k, v, layout, {}, None, 0.0, None)
    out, ref = EXECUTORS[executor](inputs), EXECUTORS["dense"](inputs)
    assert out.shape == (2, layout.n_tokens, 2, 5)
    assert relative_error(out, ref) < 1e-12
