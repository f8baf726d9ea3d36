"""Keys in their own token space: a layout's key space (the tokens some call
reads as keys), executors reading K/V given for those tokens only, and the
layers that project K/V for key tokens only, all against float64 references."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import ROOT, ab_sizes
from hypothesis import given, settings
from hypothesis import strategies as st
from programs import random_program
from reference import language_mask, reference_attention, relative_error

import patternc
from patternc.configs import UntiedMixedAttentionConfig
from patternc.lower.layout import KeySpace, Layout
from patternc.nn.executors import EXECUTORS
from patternc.nn.executors.common import AttentionInputs, compact_keys, expand_keys
from patternc.nn.untied import TypeRuns

SELF_ANCHOR = """
groups surface_anchors surface_queries volume_anchors volume_queries
surface_anchors, surface_queries -> surface_anchors
volume_anchors, volume_queries -> volume_anchors
"""
JOINT = """
groups surface_anchors surface_queries volume_anchors volume_queries
* -> surface_anchors, volume_anchors
"""
MIXED = """
groups a q b r
a -> a[causal], b
q -> a[window 3]
b, r -> b
"""


def key_tokens(layout: Layout) -> list[int]:
    """Input tokens some call with queries or not reads as keys, straight from the calls."""
    tokens = {t for c in layout.calls for s in c.keys if s.cached is None for t in range(s.start, s.stop)}
    return sorted(tokens)


def reference(plan: patternc.Plan, sizes: dict[str, int], q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
              padding: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
    """float64 attention under the language's mask, K/V in token space."""
    mask = language_mask(plan, sizes)[None, None]
    if padding is not None:
        mask = mask & padding[:, None, None, :]
    scores = torch.einsum("bqhd,bkhd->bhqk", q.double(), k.double()) / q.shape[-1] ** 0.5
    weights = torch.softmax(scores.masked_fill(~mask, float("-inf")), -1).nan_to_num(0.0)
    return torch.einsum("bhqk,bkhd->bqhd", weights, v.double())


@settings(max_examples=150, deadline=None)
@given(seed=st.integers(0, 10**9))
def test_key_space_is_the_tokens_read_as_keys(seed: int) -> None:
    source, sizes = random_program(seed)
    for plan in patternc.compile(source).patterns.values():
        layout = plan.layout(sizes)
        space = layout.key_space
        tokens = key_tokens(layout)
        assert [t for a, b in space.ranges for t in range(a, b)] == tokens
        assert space.size == len(tokens) and sum(space.split_sizes) == layout.n_tokens
        assert space.identity == (len(tokens) == layout.n_tokens)
        assert [space.position(t) for t in tokens] == list(range(len(tokens)))
        # piece sizes: token-space pieces, non-keys emptied
        assert sum(space.piece_sizes) == space.size
        assert len(space.piece_sizes) == len(layout.key_pieces[0])


@pytest.mark.parametrize("anchors, queries", [(3, 5), (8, 1), (17, 30)])
def test_periodic_and_whole_call_records_in_key_space(anchors: int, queries: int) -> None:
    sizes = ab_sizes(anchors, queries)
    self_anchor = patternc.compile(SELF_ANCHOR).patterns["default"].layout(sizes)
    assert self_anchor.key_space.ranges == ((0, anchors), (anchors + queries, 2 * anchors + queries))
    assert self_anchor.batched.periodic_launches[0] is not None
    assert self_anchor.key_space.periodic == ((anchors, 0),)
    joint = patternc.compile(JOINT).patterns["default"].layout(sizes)
    assert joint.batched.whole_call_keys == self_anchor.key_space.ranges
    assert joint.key_space.whole_call_keys == ((0, 2 * anchors),)


def test_position_of_a_query_token_is_an_error() -> None:
    layout = patternc.compile(JOINT).patterns["default"].layout(ab_sizes(2, 3))
    with pytest.raises(ValueError, match="token 3 is not a key of this layout"):
        layout.key_space.position(3)


@pytest.mark.parametrize("n", [1, 7, 64])
def test_compact_and_expand_are_inverse_on_keys(n: int) -> None:
    layout = patternc.compile(JOINT).patterns["default"].layout(ab_sizes(n, n + 3))
    t = torch.randn(2, layout.n_tokens, 3, 4, requires_grad=True)
    compact = compact_keys(t, layout.key_space)
    index = torch.tensor(key_tokens(layout))
    assert torch.equal(compact, t.index_select(1, index))
    back = expand_keys(compact, layout.key_space)
    assert torch.equal(back.index_select(1, index), compact)
    others = torch.ones(layout.n_tokens, dtype=torch.bool)
    others[index] = False
    assert not back[:, others].any()
    compact.sum().backward()  # one split: the gradient is 1 on keys, 0 elsewhere
    assert t.grad is not None and torch.equal(t.grad[:, index], torch.ones_like(compact))


def _inputs(layout: Layout, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, compact: bool,
            padding: torch.Tensor | None = None) -> AttentionInputs:  # fmt: skip
    if compact:
        k, v = compact_keys(k, layout.key_space), compact_keys(v, layout.key_space)
    return AttentionInputs(q, k, v, layout, {}, padding, 0.0, None, keys_compact=compact)


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 10**9))
@pytest.mark.parametrize("executor", ["batched", "loop", "dense", "auto"])
def test_executors_on_compact_keys_match_the_reference(executor: str, seed: int) -> None:
    source, sizes = random_program(seed)
    torch.manual_seed(seed % 2**31)
    for plan in patternc.compile(source).patterns.values():
        layout = plan.layout(sizes)
        n = layout.n_tokens
        q, k, v = (torch.randn(2, n, 2, 4, dtype=torch.float64) for _ in range(3))
        out = EXECUTORS[executor](_inputs(layout, q, k, v, compact=True))
        ref = reference(plan, sizes, q, k, v)
        assert relative_error(out, ref) < 1e-10


@pytest.mark.parametrize("source", [SELF_ANCHOR, JOINT, MIXED], ids=["self-anchor", "joint", "mixed"])
@pytest.mark.parametrize("anchors, queries", [(1, 2), (5, 11), (32, 64), (33, 70)])
@pytest.mark.parametrize("padded", [False, True])
def test_batched_on_compact_keys_forward_and_backward(
    source: str, anchors: int, queries: int, padded: bool
) -> None:
    plan = patternc.compile(source).patterns["default"]
    sizes = (
        {"a": anchors, "q": queries, "b": anchors + 1, "r": queries - 1}
        if "groups a" in source
        else ab_sizes(anchors, queries)
    )
    layout = plan.layout(sizes)
    assert not layout.key_space.identity
    torch.manual_seed(anchors * 1000 + queries)
    n = layout.n_tokens
    q, k, v = (torch.randn(2, n, 3, 8, dtype=torch.float64, requires_grad=True) for _ in range(3))
    padding = torch.rand(2, n) > 0.2 if padded else None
    out = EXECUTORS["batched"](_inputs(layout, q, k, v, compact=True, padding=padding))
    ref = reference(plan, sizes, q, k, v, padding)
    assert relative_error(out, ref) < 1e-10
    weights = torch.randn_like(ref)
    grads = torch.autograd.grad((out * weights).sum(), (q, k, v))
    ref_grads = torch.autograd.grad((ref * weights).sum(), (q, k, v))
    for got, want in zip(grads, ref_grads):
        assert relative_error(got, want) < 1e-10


def test_compact_keys_reach_the_tokens_of_a_kv_cache_group() -> None:
    """A layout reading one group from the cache: compact input keys and the cache together."""
    plan = patternc.compile("groups a q\na, q -> a").patterns["default"]
    cached = plan.layout({"a": None, "q": 5})
    assert cached.key_space.size == 0 and cached.key_space.identity is False
    q = torch.randn(1, 5, 2, 4, dtype=torch.float64)
    ka, va = torch.randn(1, 7, 2, 4, dtype=torch.float64), torch.randn(1, 7, 2, 4, dtype=torch.float64)
    empty = q[:, :0]
    inputs = AttentionInputs(q, empty, empty, cached, {"a": (ka, va)}, None, 0.0, None, keys_compact=True)
    out = EXECUTORS["batched"](inputs)
    weights = torch.softmax(torch.einsum("bqhd,bkhd->bhqk", q, ka) / 2.0, -1)
    assert relative_error(out, torch.einsum("bhqk,bkhd->bqhd", weights, va)) < 1e-12


# ------------------------------------------------------------- flex in key space


def _dense_blocks(num: torch.Tensor, indices: torch.Tensor, n_cols: int) -> torch.Tensor:
    out = torch.zeros(num.shape[-1], n_cols, dtype=torch.bool)
    for row in range(num.shape[-1]):
        out[row, indices[0, 0, row, : num[0, 0, row]].long()] = True
    return out


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10**9))
def test_flex_tables_in_key_space_classify_blocks_as_their_mask_does(seed: int) -> None:
    """Tables whose keys index the key space: the key axis is the key space's
    length, the mask reads each key token's group where it sits there, and
    the analytic block classes equal those ``create_block_mask`` finds (hold
    them, for neighbourhoods)."""
    from torch.nn.attention.flex_attention import create_block_mask

    from patternc.nn.flexmask import FlexTables, bucket_length

    source, sizes = random_program(seed)
    for plan in patternc.compile(source).patterns.values():
        layout = plan.layout(sizes)
        tables = FlexTables.build(layout, {}, "cpu", block=16, compact=True)
        assert tables.kv_len == bucket_length(layout.key_space.size, 16)
        token_tables = FlexTables.build(layout, {}, "cpu", block=16)
        tokens = torch.tensor(key_tokens(layout), dtype=torch.int64)
        assert torch.equal(tables.kv_group[: len(tokens)], token_tables.kv_group[tokens])
        ref = create_block_mask(
            tables.mask_mod(), None, None, tables.q_len, tables.kv_len, device="cpu", BLOCK_SIZE=16
        )
        n_cols = tables.kv_len // 16
        partial = _dense_blocks(ref.kv_num_blocks, ref.kv_indices, n_cols)
        full = _dense_blocks(ref.full_kv_num_blocks, ref.full_kv_indices, n_cols)
        if any(k.modifiers.grid is not None for call in layout.calls for k in call.attention.keys):
            # neighbourhoods on shaped groups are classified soundly, not
            # exactly: no block that holds a pair is skipped, and a block is
            # full only where every pair in it is read
            assert not ((partial | full) & ~(tables.partial | tables.full)).any()
            assert not (tables.full & ~full).any()
            continue
        assert torch.equal(partial, tables.partial)
        assert torch.equal(full, tables.full)


def _no_copy_back(inputs: AttentionInputs) -> AttentionInputs:
    raise AssertionError("flex copied compact K/V back to token space")


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 10**9), compact=st.booleans(), block=st.sampled_from([4, 16]))
def test_mask_mod_within_blocks_is_exact_inside_the_listed_blocks(seed: int, compact: bool, block: int) -> None:
    """The ``mask_mod`` a compiled GPU kernel runs skips the group-pair test
    where every block holds one query group and one key group: inside every
    listed block it must say what the exact one says, and the exact one
    allows nothing outside them (the blocks alone tell the pairs apart).
    Padded queries' rows are dropped after the kernel: they may differ."""
    from patternc.nn.flexmask import FlexTables

    source, sizes = random_program(seed)
    for plan in patternc.compile(source).patterns.values():
        tables = FlexTables.build(plan.layout(sizes), {}, "cpu", block=block, compact=compact)
        q_idx = torch.arange(tables.q_len)[:, None]
        kv_idx = torch.arange(tables.kv_len)[None, :]
        zero = torch.zeros((), dtype=torch.int64)
        exact = tables.mask_mod()(zero, zero, q_idx, kv_idx).expand(tables.q_len, tables.kv_len)
        within = tables.mask_mod(within_blocks=True)(zero, zero, q_idx, kv_idx).expand_as(exact)

        def cells(blocks: torch.Tensor) -> torch.Tensor:
            return blocks.repeat_interleave(block, 0).repeat_interleave(block, 1)

        listed, full = cells(tables.partial | tables.full), cells(tables.full)
        assert not (exact & ~listed).any()
        assert exact[full].all()
        real = torch.arange(tables.q_len)[:, None] < tables.n_queries  # padded queries are dropped
        inside = listed & real
        assert torch.equal(exact[inside], within[inside])


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10**9), padded=st.booleans())
def test_flex_on_compact_keys_matches_the_reference_without_a_copy_back(seed: int, padded: bool) -> None:
    from unittest import mock

    from patternc.nn.executors import flex

    source, sizes = random_program(seed)
    torch.manual_seed(seed % 2**31)
    for plan in patternc.compile(source).patterns.values():
        layout = plan.layout(sizes)
        n = layout.n_tokens
        q, k, v = (torch.randn(2, n, 2, 16, dtype=torch.float64) for _ in range(3))
        padding = torch.rand(2, n) > 0.3 if padded else None
        with (
            torch.no_grad(),
            flex.compiled(False),
            mock.patch.object(AttentionInputs, "in_token_space", _no_copy_back),
        ):
            out = EXECUTORS["flex"](_inputs(layout, q, k, v, compact=True, padding=padding))
        ref = reference(plan, sizes, q, k, v, padding)
        assert relative_error(out, ref) < 1e-10


@pytest.mark.parametrize(
    "source, sizes",
    [
        (SELF_ANCHOR, ab_sizes(5, 9)),
        (JOINT, ab_sizes(3, 7)),
        (MIXED, {"a": 6, "q": 5, "b": 4, "r": 3}),
    ],
    ids=["self-anchor", "joint", "mixed"],
)
def test_flex_on_compact_keys_with_alibi_matches_dense(source: str, sizes: dict[str, int]) -> None:
    """ALiBi's ``score_mod`` reads positions within groups at the key tokens'
    places in key space: flex on compact K/V against ``dense`` on token-space
    K/V. (A few fixed layouts: torch's eager FlexAttention recompiles per
    ``score_mod`` closure, and across many random shapes its guard logging fails.)"""
    from patternc.nn.executors import flex

    torch.manual_seed(11)
    layout = patternc.compile(source).patterns["default"].layout(sizes)
    n = layout.n_tokens
    q, k, v = (torch.randn(2, n, 2, 16, dtype=torch.float64) for _ in range(3))
    slopes = torch.rand(2, dtype=torch.float64)
    ck, cv = (compact_keys(t, layout.key_space) for t in (k, v))
    compact = AttentionInputs(q, ck, cv, layout, {}, None, 0.0, None, alibi_slopes=slopes, keys_compact=True)
    with torch.no_grad(), flex.compiled(False):
        out = EXECUTORS["flex"](compact)
    ref = EXECUTORS["dense"](AttentionInputs(q, k, v, layout, {}, None, 0.0, None, alibi_slopes=slopes))
    assert relative_error(out, ref) < 1e-10


def test_flex_on_compact_keys_reads_a_cached_group_after_them() -> None:
    """Input keys in key space, then a cached group's keys: one key axis."""
    from patternc.nn.executors import flex

    torch.manual_seed(3)
    plan = patternc.compile("groups a b q\nb, q -> a, b\na -> a").patterns["default"]
    layout = plan.layout({"a": None, "b": 3, "q": 130})
    assert layout.key_space.ranges == ((0, 3),)
    q, k, v = (torch.randn(1, 133, 2, 16, dtype=torch.float64) for _ in range(3))
    ka, va = torch.randn(1, 7, 2, 16, dtype=torch.float64), torch.randn(1, 7, 2, 16, dtype=torch.float64)
    inputs = AttentionInputs(
        q, k[:, :3], v[:, :3], layout, {"a": (ka, va)}, None, 0.0, None, keys_compact=True
    )
    with torch.no_grad(), flex.compiled(False):
        out = EXECUTORS["flex"](inputs)
    keys, values = torch.cat([ka, k[:, :3]], 1), torch.cat([va, v[:, :3]], 1)
    weights = torch.softmax(torch.einsum("bqhd,bkhd->bhqk", q, keys) / 4.0, -1)
    assert relative_error(out, torch.einsum("bhqk,bkhd->bqhd", weights, values)) < 1e-12


# ------------------------------------------------------------------ layers


def _token_space_everywhere(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every layout's key space reads as the identity: layers project K/V for
    every token and executors read them at input positions (the path before
    key spaces)."""
    monkeypatch.setattr(KeySpace, "identity", property(lambda self: True))


@pytest.mark.parametrize("source", [SELF_ANCHOR, JOINT], ids=["self-anchor", "joint"])
@pytest.mark.parametrize("anchors, queries", [(2, 3), (9, 14)])
@pytest.mark.parametrize("options", [{}, {"use_rope": True, "qk_norm": True}, {"bias": False}])
def test_mixed_attention_projects_keys_apart_and_matches_the_reference(
    source: str, anchors: int, queries: int, options: dict[str, bool]
) -> None:
    torch.manual_seed(anchors + queries)
    plan = patternc.compile(source).patterns["default"]
    sizes = ab_sizes(anchors, queries)
    config = patternc.MixedAttentionConfig(hidden_dim=16, num_heads=2, **options)
    attn = patternc.nn.MixedAttention(config).double()
    specs = plan.token_specs(sizes)
    n = sum(sizes.values())
    x = torch.randn(2, n, 16, dtype=torch.float64, requires_grad=True)
    padding = torch.rand(2, n) > 0.25
    freqs = patternc.nn.rope_frequencies(torch.arange(n), 8) if options.get("use_rope") else None
    calls = []
    original = attn.executor
    attn.executor = lambda inputs: calls.append(inputs) or original(inputs)  # type: ignore[assignment,func-returns-value]
    out, cache = attn(x, specs, plan, key_padding_mask=padding, freqs=freqs)
    (inputs,) = calls
    assert inputs.keys_compact and inputs.k.shape[1] == 2 * anchors  # K/V of the anchors only
    patterns = [patternc.AttentionPattern(list(c.queries), list(c.key_names)) for c in plan.calls]
    ref = reference_attention(attn, x, specs, patterns, key_padding_mask=padding, freqs=freqs)
    assert relative_error(out, ref) < 1e-10
    assert cache is not None and sorted(cache) == ["surface_anchors", "volume_anchors"]
    assert all(entry["k"].shape == (2, 2, anchors, 8) for entry in cache.values())
    weights = torch.randn_like(ref)
    params = (x, attn.qkv.weight, attn.proj.weight)
    grads = torch.autograd.grad((out * weights).sum(), params)
    ref_grads = torch.autograd.grad((ref * weights).sum(), params)
    for got, want in zip(grads, ref_grads):
        assert relative_error(got, want) < 1e-10


def test_mixed_attention_cache_from_compact_keys_equals_the_token_space_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    torch.manual_seed(3)
    plan = patternc.compile(JOINT).patterns["default"]
    specs = plan.token_specs(ab_sizes(4, 7))
    # a later call reads the anchors from the cache: queries only in x, an empty key space
    later = plan.token_specs({**ab_sizes(None, 7)})  # type: ignore[arg-type]
    attn = patternc.nn.MixedAttention(patternc.MixedAttentionConfig(hidden_dim=16, num_heads=2)).double()
    x = torch.randn(1, 22, 16, dtype=torch.float64)
    y = torch.randn(1, 14, 16, dtype=torch.float64)
    out, cache = attn(x, specs, plan)
    assert cache is not None
    again, _ = attn(y, later, plan, kv_cache=cache)
    _token_space_everywhere(monkeypatch)
    out_tokens, cache_tokens = attn(x, specs, plan)
    assert cache_tokens is not None
    again_tokens, _ = attn(y, later, plan, kv_cache=cache_tokens)
    assert relative_error(out, out_tokens) < 1e-12 and relative_error(again, again_tokens) < 1e-12
    assert sorted(cache) == sorted(cache_tokens) == ["surface_anchors", "volume_anchors"]
    for name in cache:
        for part in "kv":
            assert torch.allclose(cache[name][part], cache_tokens[name][part], atol=1e-12)
    # the cached call against the float64 reference, anchors from the cache
    patterns = [patternc.AttentionPattern(list(c.queries), list(c.key_names)) for c in plan.calls]
    ref = reference_attention(attn, y, later, patterns, kv_cache=cache)
    assert relative_error(again, ref) < 1e-10


@pytest.mark.parametrize("untied", [False, True])
@pytest.mark.parametrize("pos_emb_type", ["none", "rope", "alibi"])
def test_stack_on_compact_keys_equals_token_space(
    monkeypatch: pytest.MonkeyPatch, untied: bool, pos_emb_type: str
) -> None:
    torch.manual_seed(5)
    program = patternc.compile(ROOT / "examples" / "ab_upt.patc")
    schedule = ["self_anchor", "cross_anchor", "joint"]
    config = patternc.TransformerConfig(
        vocab_size=None, d_model=32, num_heads=4, num_layers=3, d_ff=48, dropout_rate=0.0, max_len=64,
        untied=untied, pos_emb_type=pos_emb_type, num_kv_heads=2,
    )  # fmt: skip
    model = patternc.nn.Transformer(config, program, schedule).double()
    sizes = {"surface_anchors": 5, "surface_queries": 7, "volume_anchors": 3, "volume_queries": 8}
    x = torch.randn(2, 23, 32, dtype=torch.float64, requires_grad=True)
    padding = torch.rand(2, 23) > 0.2

    seen: list[bool] = []
    for layer in model.layers:
        executor = layer.attention.executor
        layer.attention.executor = lambda inputs, run=executor: (
            seen.append(inputs.keys_compact) or run(inputs)
        )

    def run() -> tuple[torch.Tensor, ...]:
        out = model(x, sizes, key_padding_mask=padding)
        return (out, *torch.autograd.grad(out.pow(2).sum(), (x, *model.parameters()), allow_unused=True))

    compact = run()
    assert seen == [True] * 3  # every pattern of ab_upt.patc has queries that are never keys
    _token_space_everywhere(monkeypatch)
    tokens = run()
    assert seen[3:] == [False] * 3
    for got, want in zip(compact, tokens):
        assert (got is None) == (want is None)
        if got is not None:
            assert relative_error(got, want) < 1e-10


def _assert_compact_gradients(
    layout: Layout, got: tuple[torch.Tensor, ...], want: tuple[torch.Tensor, ...]
) -> None:
    """Gradients of Q and of compact K/V (``got``) against the float64
    token-space ones (``want``), K/V read at the key tokens."""
    index = torch.tensor(key_tokens(layout))
    (q, ck, cv), (qd, kd, vd) = got, want
    assert q.grad is not None and ck.grad is not None and cv.grad is not None
    assert qd.grad is not None and kd.grad is not None and vd.grad is not None
    assert relative_error(q.grad.cpu(), qd.grad) < 2e-2
    assert relative_error(ck.grad.cpu(), kd.grad[:, index]) < 2e-2
    assert relative_error(cv.grad.cpu(), vd.grad[:, index]) < 2e-2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("source", [SELF_ANCHOR, JOINT], ids=["self-anchor", "joint"])
@pytest.mark.parametrize(
    "executor, anchors, queries",
    [
        *((e, a, q) for e in ("batched", "auto", "varlen") for a, q in ((256, 1024), (333, 1001))),
        ("flex", 333, 1001),  # one shape: each shape compiles its own kernels (about a minute)
    ],
)
def test_gpu_executors_on_compact_keys(source: str, executor: str, anchors: int, queries: int) -> None:
    torch.manual_seed(7)
    plan = patternc.compile(source).patterns["default"]
    sizes = ab_sizes(anchors, queries)
    layout = plan.layout(sizes)
    n = layout.n_tokens
    q, k, v = (
        torch.randn(1, n, 4, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3)
    )
    with torch.no_grad():
        ck, cv = (compact_keys(t, layout.key_space) for t in (k, v))
    ck.requires_grad_(True)
    cv.requires_grad_(True)
    inputs = AttentionInputs(q, ck, cv, layout, {}, None, 0.0, None, keys_compact=True)
    out = EXECUTORS[executor](inputs)
    ref = reference(plan, sizes, q.cpu(), k.cpu(), v.cpu())
    assert relative_error(out.cpu(), ref) < 2e-2
    weights = torch.randn_like(ref)
    out.backward(weights.to(out))
    qd, kd, vd = (t.detach().cpu().double().requires_grad_(True) for t in (q, k, v))
    (reference(plan, sizes, qd, kd, vd) * weights).sum().backward()
    _assert_compact_gradients(layout, (q, ck, cv), (qd, kd, vd))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_flex_on_compact_keys_with_key_padding() -> None:
    """The padding mask is taken into key space with K/V: bf16 forward and
    backward against float64, compact gradients at the key tokens."""
    torch.manual_seed(9)
    plan = patternc.compile(SELF_ANCHOR).patterns["default"]
    sizes = ab_sizes(333, 1001)
    layout = plan.layout(sizes)
    n = layout.n_tokens
    q, k, v = (torch.randn(2, n, 4, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    padding = torch.rand(2, n, device="cuda") > 0.2
    ck, cv = (compact_keys(t, layout.key_space).contiguous().requires_grad_(True) for t in (k, v))
    q.requires_grad_(True)
    out = EXECUTORS["flex"](AttentionInputs(q, ck, cv, layout, {}, padding, 0.0, None, keys_compact=True))
    qd, kd, vd = (t.detach().cpu().double().requires_grad_(True) for t in (q, k, v))
    ref = reference(plan, sizes, qd, kd, vd, padding.cpu())
    assert relative_error(out.detach().cpu(), ref.detach()) < 2e-2
    weights = torch.randn_like(ref)
    out.backward(weights.to(out))
    (ref * weights).sum().backward()
    _assert_compact_gradients(layout, (q, ck, cv), (qd, kd, vd))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("source", [SELF_ANCHOR, JOINT], ids=["self-anchor", "joint"])
def test_gpu_layer_on_compact_keys_captures_in_a_cuda_graph(source: str) -> None:
    torch.manual_seed(8)
    plan = patternc.compile(source).patterns["default"]
    specs = plan.token_specs(ab_sizes(128, 509))
    attn = patternc.nn.MixedAttention(patternc.MixedAttentionConfig(hidden_dim=128, num_heads=2)).cuda()
    x = torch.randn(1, 1274, 128, device="cuda")
    with torch.no_grad():
        eager, _ = attn(x, specs, plan)
        static = x.clone()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                attn(static, specs, plan)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            replayed, _ = attn(static, specs, plan)
        fresh = torch.randn_like(x)
        static.copy_(fresh)
        graph.replay()
        expected, _ = attn(fresh, specs, plan)
    patterns = [patternc.AttentionPattern(list(c.queries), list(c.key_names)) for c in plan.calls]
    ref = reference_attention(copy.deepcopy(attn).cpu(), fresh.cpu(), specs, patterns)  # float64 on the host
    assert relative_error(expected.cpu(), ref) < 1e-3
    assert relative_error(replayed, expected) < 1e-5 and relative_error(eager, expected) > 1e-2


def test_type_runs_in_key_space() -> None:
    layout = patternc.compile(JOINT).patterns["default"].layout(ab_sizes(3, 4))
    runs = TypeRuns(((0, 0, 7), (1, 7, 14)), 14)  # surface tokens bank 0, volume bank 1
    assert runs.in_key_space(layout.key_space) == TypeRuns(((0, 0, 3), (1, 3, 6)), 6)
    split = TypeRuns(((0, 0, 2), (1, 2, 9), (0, 9, 14)), 14)  # runs that cut key ranges
    assert split.in_key_space(layout.key_space).runs == ((0, 0, 2), (1, 2, 3), (1, 3, 5), (0, 5, 6))


@pytest.mark.parametrize("path", ["auto", "segments", "per_type", "bmm"])
@pytest.mark.parametrize("source", [SELF_ANCHOR, JOINT], ids=["self-anchor", "joint"])
def test_untied_attention_projects_keys_apart(
    monkeypatch: pytest.MonkeyPatch, path: str, source: str
) -> None:
    torch.manual_seed(11)
    plan = patternc.compile(source).patterns["default"]
    specs = plan.token_specs(ab_sizes(5, 6))
    config = UntiedMixedAttentionConfig(hidden_dim=16, num_heads=2, num_types=2, use_rope=True)
    attn = patternc.nn.UntiedMixedAttention(config, ["surface", "volume"], path=path).double()  # type: ignore[arg-type]
    with torch.no_grad():
        for p in attn.parameters():
            p.normal_()
    x = torch.randn(2, 22, 16, dtype=torch.float64, requires_grad=True)
    freqs = patternc.nn.rope_frequencies(torch.arange(22), 8)
    seen: list[AttentionInputs] = []
    executor = attn.executor
    attn.executor = lambda inputs: seen.append(inputs) or executor(inputs)  # type: ignore[assignment,func-returns-value]

    def run() -> tuple[torch.Tensor, ...]:
        out, _ = attn(x, specs, plan, freqs=freqs)
        return (out, *torch.autograd.grad(out.pow(2).sum(), (x, *attn.parameters())))

    compact = run()
    assert seen[0].keys_compact and seen[0].k.shape[1] == 10
    _token_space_everywhere(monkeypatch)
    tokens = run()
    assert not seen[1].keys_compact
    for got, want in zip(compact, tokens):
        assert relative_error(got, want) < 1e-10


def test_whole_call_causal_is_the_call_with_queries() -> None:
    """A layout whose first call has no queries (an empty group) and whose
    one call with queries is causal: ``batched`` read ``[causal]`` off the
    first call and attended to every key (a case the random programs above draw)."""
    plan = patternc.compile("groups a b\na -> b[window 2]\nb -> b[causal]").patterns["default"]
    sizes = {"a": 0, "b": 5}
    layout = plan.layout(sizes)
    assert layout.batched.whole_call_keys == ((0, 5),) and layout.batched.whole_call_is_causal
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 5, 2, 4, dtype=torch.float64) for _ in range(3))
    out = EXECUTORS["batched"](_inputs(layout, q, k, v, compact=False))
    assert relative_error(out, reference(plan, sizes, q, k, v)) < 1e-12


@pytest.mark.parametrize("stack", [False, True], ids=["PatternAttention", "Transformer"])
def test_chunks_of_queries_project_no_keys(stack: bool) -> None:
    """Chunked inference: the recording pass (anchors alone) is token space,
    and every chunk of queries, reading the anchors from the cache, hands the
    executor K/V of zero tokens. The output equals one shot."""
    torch.manual_seed(2)
    source = (
        "groups anchors queries\ntypes { a: anchors\n q: queries }\nanchors -> anchors\nqueries -> anchors"
    )
    program = patternc.compile(source)
    sizes = {"anchors": 6, "queries": 29}
    x = torch.randn(2, 35, 16, dtype=torch.float64)
    seen: list[tuple[bool, int]] = []

    def spy(executor):  # type: ignore[no-untyped-def]
        return lambda inputs: seen.append((inputs.keys_compact, inputs.k.shape[1])) or executor(inputs)

    if stack:
        config = patternc.TransformerConfig(
            vocab_size=None, d_model=16, num_heads=2, num_layers=2, d_ff=32, dropout_rate=0.0,
            pos_emb_type="rope", untied=True,
        )  # fmt: skip
        model = patternc.nn.Transformer(config, program).double().eval()
        for layer in model.layers:
            layer.attention.executor = spy(layer.attention.executor)

        def forward(x: torch.Tensor, s: dict[str, int | None]) -> torch.Tensor:
            return model(x, s)  # type: ignore[no-any-return]
    else:
        plan = program.patterns["default"]
        attn = patternc.nn.PatternAttention(patternc.MixedAttentionConfig(hidden_dim=16, num_heads=2), plan)
        attn = attn.double()
        attn.executor = spy(attn.executor)

        def forward(x: torch.Tensor, s: dict[str, int | None]) -> torch.Tensor:
            return attn(x, s)[0]

    with torch.no_grad():
        ref = forward(x, sizes)
        seen.clear()
        out = patternc.nn.chunked(forward, x, sizes, ["queries"], chunk_size=8)
    assert relative_error(out, ref) < 1e-10
    layers = 2 if stack else 1
    assert seen[:layers] == [(False, 6)] * layers  # the anchors, recorded in token space
    assert seen[layers:] and set(seen[layers:]) == {(True, 0)}  # 4 chunks: no K/V projected


@pytest.mark.parametrize("source", [SELF_ANCHOR, JOINT], ids=["self-anchor", "joint"])
def test_auto_prices_the_copy_back_to_token_space_only_where_it_is_made(source: str) -> None:
    """Given compact K/V, ``dense`` copies them back to token space and is
    priced so; ``flex`` reads them where they are and costs the same either way."""
    from patternc.nn.executors.auto import _estimates

    layout = patternc.compile(source).patterns["default"].layout(ab_sizes(1024, 4096))

    def seconds(compact: bool) -> dict[str, float]:
        found = _estimates(layout, 1, 12, 64, torch.device("cuda"), True, False, compact=compact)
        return {e.backend: e.seconds for e in found}

    token, compact = seconds(False), seconds(True)
    assert compact["flex"] == token["flex"]
    assert compact["dense"] > token["dense"]
