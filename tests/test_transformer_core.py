"""The stack's layers run patternc's one attention core: ``MixedAttention``
(``UntiedMixedAttention`` with a bank per type) with GQA heads, one
``KVCache`` shape for every layer, and checkpoints of the earlier per-bank
layout (``q_proj.layers.BANK``, ...) loading into it, each checked against a
float64 reference written from the definitions."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from reference import allowed_mask, language_mask, relative_error
from torch import Tensor

import patternc
from patternc import AttentionPattern, MixedAttentionConfig, TokenSpec, TransformerConfig
from patternc.nn import MixedAttention, Transformer, UntiedMixedAttention

ROOT = Path(__file__).resolve().parents[1]
AB_UPT = patternc.compile(ROOT / "examples" / "ab_upt.patc")
SCHEDULE = ["self_anchor", "cross_anchor", "joint"]


def _config(**fields: object) -> TransformerConfig:
    base: dict[str, object] = dict(
        vocab_size=None, d_model=32, num_heads=4, num_layers=3, d_ff=40, dropout_rate=0.0, max_len=64,
        pos_emb_type="none",
    )  # fmt: skip
    base.update(fields)
    return TransformerConfig(**base)  # type: ignore[arg-type]


def _old_checkpoint(c: TransformerConfig, n_types: int, generator: torch.Generator) -> dict[str, Tensor]:
    """A state_dict in the earlier layout: one ``nn.Linear`` per bank under
    ``q_proj``, ``kv_proj``, ``out_proj``, ``ff.up``, ``ff.down``; random
    float64 values (scaled so that no softmax saturates)."""
    inner, kv_inner = c.num_heads * c.head_dim, c.kv_heads * c.head_dim
    width = 2 * c.d_ff if c.ff_activation in ("swiglu", "geglu") else c.d_ff
    shapes = {
        "q_proj": (inner, c.d_model),
        "kv_proj": (2 * kv_inner, c.d_model),
        "out_proj": (c.d_model, inner),
        "ff.up": (width, c.d_model),
        "ff.down": (c.d_model, c.d_ff),
    }
    state: dict[str, Tensor] = {}
    for layer in range(c.num_layers):
        for name, (rows, cols) in shapes.items():
            for bank in range(n_types):
                key = f"layers.{layer}.{name}.layers.{bank}"
                state[f"{key}.weight"] = torch.randn(rows, cols, generator=generator, dtype=torch.float64)
                state[f"{key}.weight"] /= math.sqrt(cols)
                state[f"{key}.bias"] = 0.1 * torch.randn(rows, generator=generator, dtype=torch.float64)
        for norm in ("norm1", "norm2"):
            state[f"layers.{layer}.{norm}.weight"] = 1 + 0.1 * torch.randn(
                c.d_model, generator=generator, dtype=torch.float64
            )
            state[f"layers.{layer}.{norm}.bias"] = 0.1 * torch.randn(
                c.d_model, generator=generator, dtype=torch.float64
            )
    state["final_norm.weight"] = torch.ones(c.d_model, dtype=torch.float64)
    state["final_norm.bias"] = torch.zeros(c.d_model, dtype=torch.float64)
    return state


def _reference_stack(
    state: dict[str, Tensor], c: TransformerConfig, x: Tensor, banks: list[int], masks: list[Tensor]
) -> Tensor:
    """A pre-norm LayerNorm stack with GELU, from the per-bank checkpoint
    ``state``: token ``j`` uses bank ``banks[j]``; layer ``i`` attends under
    ``masks[i]`` (``[N, N]`` bool), K/V heads shared by groups of query heads."""
    b, n, d = x.shape
    heads, kv_heads, dim = c.num_heads, c.kv_heads, c.head_dim

    def linear(prefix: str, t: Tensor) -> Tensor:
        tokens = [
            F.linear(
                t[:, j],
                state[f"{prefix}.layers.{banks[j]}.weight"],
                state[f"{prefix}.layers.{banks[j]}.bias"],
            )
            for j in range(n)
        ]
        return torch.stack(tokens, dim=1)

    def norm(prefix: str, t: Tensor) -> Tensor:
        return F.layer_norm(t, (d,), state[f"{prefix}.weight"], state[f"{prefix}.bias"])

    h = x
    for i, allowed in enumerate(masks):
        p = f"layers.{i}"
        a = norm(f"{p}.norm1", h)
        q = linear(f"{p}.q_proj", a).view(b, n, heads, dim)
        k, v = linear(f"{p}.kv_proj", a).view(b, n, 2, kv_heads, dim).unbind(2)
        k = k.repeat_interleave(heads // kv_heads, dim=2)
        v = v.repeat_interleave(heads // kv_heads, dim=2)
        scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(dim)
        weights = torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1)
        out = torch.einsum("bhqk,bkhd->bqhd", weights, v).reshape(b, n, heads * dim)
        h = h + linear(f"{p}.out_proj", out)
        a = norm(f"{p}.norm2", h)
        gate, up = linear(f"{p}.ff.up", a).chunk(2, dim=-1)
        h = h + linear(f"{p}.ff.down", F.gelu(gate) * up)
    return norm("final_norm", h)


@pytest.mark.parametrize(
    ("untied", "kv_heads", "sizes"),
    [(False, 4, (3, 5, 2, 7)), (True, 2, (4, 1, 5, 6)), (True, 1, (1, 9, 3, 2))],
    ids=["tied", "untied-gqa", "untied-mqa"],
)
def test_a_checkpoint_of_per_bank_linears_loads_and_runs_as_defined(
    untied: bool, kv_heads: int, sizes: tuple[int, ...]
) -> None:
    """A state_dict in the layout of one ``nn.Linear`` per bank (separate Q
    and K/V projections) loads strictly into the fused, shared layers, and
    the stack computes what that checkpoint defines (float64 reference)."""
    c = _config(untied=untied, num_kv_heads=kv_heads, ff_activation="geglu")
    groups = ("surface_anchors", "surface_queries", "volume_anchors", "volume_queries")
    group_sizes = dict(zip(groups, sizes))
    n_types = len(AB_UPT.type_names) if untied else 1
    state = _old_checkpoint(c, n_types, torch.Generator().manual_seed(7))
    model = Transformer(c, AB_UPT, SCHEDULE).double()
    model.load_state_dict(state)  # strict: every key used, none missing

    x = torch.randn(2, sum(sizes), c.d_model, dtype=torch.float64)
    types = AB_UPT.patterns["joint"].types
    banks = [
        model.type_names.index(types[g]) if untied else 0 for g, n in group_sizes.items() for _ in range(n)
    ]
    masks = [language_mask(AB_UPT.patterns[p], group_sizes) for p in SCHEDULE]
    expected = _reference_stack(state, c, x, banks, masks)
    assert relative_error(model(x, group_sizes), expected) < 1e-12


def test_the_layers_are_the_shared_attention_modules() -> None:
    tied = Transformer(_config(num_kv_heads=2), AB_UPT, SCHEDULE)
    untied = Transformer(_config(untied=True), AB_UPT, SCHEDULE)
    assert all(type(layer.attention) is MixedAttention for layer in tied.layers)
    assert all(type(layer.attention) is UntiedMixedAttention for layer in untied.layers)
    assert tied.layers[0].attention.num_kv_heads == 2
    assert all(layer.executor is layer.attention.executor for layer in tied.layers)
    assert untied.layers[0].attention.qkv.types.names == list(AB_UPT.type_names)
    # one fused projection: rows Q (4 heads), then K and V (2 heads each), of width 8
    assert tied.layers[0].attention.qkv.weight.shape == ((4 + 2 * 2) * 8, 32)


# -------------------------------------------------------------- GQA core


def _gqa_reference(attn: MixedAttention, x: Tensor, allowed: Tensor) -> Tensor:
    """float64 output of ``attn`` with shared K/V heads under ``allowed`` ``[N, Nk]``."""
    b, n, _ = x.shape
    heads, kv_heads, dim = attn.num_heads, attn.num_kv_heads, attn.head_dim
    rows = [heads * dim, kv_heads * dim, kv_heads * dim]
    (wq, wk, wv), (bq, bk, bv) = attn.qkv.weight.double().split(rows), attn.qkv.bias.double().split(rows)
    q = (x @ wq.T + bq).view(b, n, heads, dim)
    k = (x @ wk.T + bk).view(b, n, kv_heads, dim).repeat_interleave(heads // kv_heads, dim=2)
    v = (x @ wv.T + bv).view(b, n, kv_heads, dim).repeat_interleave(heads // kv_heads, dim=2)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(dim)
    weights = torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1).nan_to_num(0.0)
    out = torch.einsum("bhqk,bkhd->bqhd", weights, v).reshape(b, n, heads * dim)
    return out @ attn.proj.weight.double().T + attn.proj.bias.double()


@pytest.mark.parametrize("implementation", ["batched", "loop", "dense"])
@pytest.mark.parametrize(("kv_heads", "sizes"), [(1, (5, 3)), (2, (1, 8)), (4, (7, 7))])
def test_mixed_attention_shares_kv_heads_and_caches_them(
    implementation: str, kv_heads: int, sizes: tuple[int, int]
) -> None:
    """``num_kv_heads`` against a float64 reference, and its cache: each
    entry ``[batch, num_kv_heads, n, head_dim]``, read back by the queries alone."""
    torch.manual_seed(3)
    config = MixedAttentionConfig(hidden_dim=32, num_heads=4, implementation=implementation)  # type: ignore[arg-type]
    attn = MixedAttention(config, num_kv_heads=kv_heads).double()
    specs = [TokenSpec("anchors", sizes[0]), TokenSpec("queries", sizes[1])]
    patterns = [AttentionPattern(["anchors", "queries"], ["anchors"])]
    x = torch.randn(2, sum(sizes), 32, dtype=torch.float64)
    out, cache = attn(x, specs, patterns)
    expected = _gqa_reference(attn, x, allowed_mask(specs, patterns, {}))
    assert relative_error(out, expected) < 1e-12
    assert cache is not None and cache["anchors"]["k"].shape == (2, kv_heads, sizes[0], 8)
    cached_specs = [TokenSpec("anchors", None), TokenSpec("queries", sizes[1])]
    queries, none = attn(x[:, sizes[0] :], cached_specs, patterns, kv_cache=cache)
    assert none is None and relative_error(queries, out[:, sizes[0] :]) < 1e-12


def test_kv_heads_that_do_not_divide_the_heads_are_refused() -> None:
    with pytest.raises(ValueError, match="num_heads=4 is not a multiple of num_kv_heads=3"):
        MixedAttention(MixedAttentionConfig(hidden_dim=32, num_heads=4), num_kv_heads=3)


def test_a_cache_with_the_query_heads_names_the_kv_heads() -> None:
    attn = MixedAttention(MixedAttentionConfig(hidden_dim=32, num_heads=4), num_kv_heads=2)
    cache = {"anchors": {"k": torch.zeros(1, 4, 3, 8), "v": torch.zeros(1, 4, 3, 8)}}
    specs = [TokenSpec("anchors", None), TokenSpec("queries", 2)]
    patterns = [AttentionPattern(["queries"], ["anchors"])]
    with pytest.raises(ValueError, match=r"expected \[batch=1, heads=2, tokens, head_dim=8\]"):
        attn(torch.zeros(1, 2, 32), specs, patterns, kv_cache=cache)


@pytest.mark.parametrize("untied", [False, True])
def test_chunked_stack_with_shared_kv_heads_equals_one_shot(untied: bool) -> None:
    """Chunked inference records each layer's ``KVCache`` (``num_kv_heads``
    heads) with the context and reads it in every chunk of queries."""
    torch.manual_seed(4)
    source = (
        "groups anchors queries\ntypes { a: anchors\n q: queries }\nanchors -> anchors\nqueries -> anchors"
    )
    model = Transformer(_config(untied=untied, num_kv_heads=2, pos_emb_type="rope"), source).double().eval()
    sizes = {"anchors": 6, "queries": 13}
    x = torch.randn(2, 19, 32, dtype=torch.float64)
    with torch.no_grad():
        one_shot = model(x, sizes)
        chunked = patternc.nn.chunked(model, x, sizes, ["queries"], chunk_size=4)
    assert relative_error(chunked, one_shot) < 1e-12


def test_generate_keeps_a_kv_cache_per_layer() -> None:
    """``generate``'s cache is each layer's ``KVCache``: with GQA, the K/V
    heads alone; greedy tokens are those of full passes over the prefix."""
    torch.manual_seed(6)
    model = Transformer(_config(vocab_size=29, causal=True, pos_emb_type="rope", num_kv_heads=1)).double()
    prompt = torch.randint(1, 29, (3, 4))
    generated = model.generate(prompt, max_new_tokens=5)
    _, caches = model._run(prompt, None, None)  # private: the per-layer caches generate starts from
    assert [tuple(c["tokens"]["k"].shape) for c in caches if c is not None] == [(3, 1, 4, 8)] * 3
    for t in range(4, 9):
        assert torch.equal(model(generated[:, :t])[:, -1].argmax(-1), generated[:, t])
