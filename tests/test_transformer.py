"""The transformer stack: config validation, attention against a float64
reference (GQA, RoPE, ALiBi, windows), linear attention, KV-cache decoding,
packed documents, layer schedules with untied weights, the vision model."""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import pytest
import torch
from conftest import warnings_as_errors
from pydantic import ValidationError
from reference import relative_error
from torch import Tensor

import patternc
from patternc import TransformerConfig, VisionTransformerConfig
from patternc.modifiers import Modifiers
from patternc.nn import Transformer, VisionTransformer
from patternc.nn.executors.common import AttentionInputs
from patternc.nn.executors.linear import run_linear
from patternc.nn.rope import rope_frequencies
from patternc.nn.schedule import schedule_for
from patternc.nn.transformer import alibi_slopes

ROOT = Path(__file__).resolve().parents[1]


def config(**kw: object) -> TransformerConfig:
    base: dict[str, object] = dict(
        vocab_size=37, d_model=32, num_heads=4, num_layers=2, d_ff=48, dropout_rate=0.0, max_len=64
    )
    base.update(kw)
    return TransformerConfig(**base)  # type: ignore[arg-type]


# ------------------------------------------------------------------ configs


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"num_heads": 5}, "d_model=32 is not divisible by num_heads=5"),
        ({"num_kv_heads": 3}, "num_heads=4 is not a multiple of num_kv_heads=3"),
        ({"pad_token_id": 40}, "pad_token_id=40 is outside the vocabulary [0, 37)"),
        ({"attention_block_size": 100}, "attention_block_size must be a multiple of 16"),
        ({"d_model": 36, "num_heads": 4, "pos_emb_type": "rope"}, "needs an even head_dim, got 9"),
        ({"attention_type": "pallas"}, "attention_type"),
    ],
)
def test_config_errors_explain(fields: dict[str, object], message: str) -> None:
    with pytest.raises(ValidationError, match=message.replace("[", r"\[").replace(")", r"\)")):
        config(**fields)


def test_vision_config_errors() -> None:
    stack = config(vocab_size=None)
    with pytest.raises(ValidationError, match="image_size=30 is not a multiple of patch_size=4"):
        VisionTransformerConfig(transformer=stack, image_size=30, patch_size=4, num_classes=3)
    with pytest.raises(ValidationError, match="set transformer.vocab_size=None"):
        VisionTransformerConfig(transformer=config(), image_size=8, patch_size=4, num_classes=3)
    with pytest.raises(ValidationError, match="exceed transformer.max_len=64"):
        VisionTransformerConfig(transformer=stack, image_size=32, patch_size=2, num_classes=3)


def test_seed_attention_types_map_to_executors() -> None:
    assert config(attention_type="standard").implementation == "batched"
    assert config(attention_type="dense").implementation == "dense"
    assert config(attention_type="memory_efficient").implementation == "batched"
    assert config(attention_type="flash").implementation == "flex"


def test_window_lowers_to_rule_modifiers() -> None:
    model = Transformer(config(attention_window=4))
    (rule,) = model.plans["default"].rules
    assert [k.modifiers for k in rule.keys] == [Modifiers(causal=True, window=4)]


# ------------------------------------------------------- attention vs float64


def reference_attention(model: Transformer, layer_index: int, x: Tensor, window: int | None) -> Tensor:
    """One layer's attention branch from the definition: causal (and windowed)
    softmax over one group, GQA by sharing K/V heads, RoPE rotations, ALiBi bias."""
    c = model.config
    layer = model.layers[layer_index]
    n = x.shape[1]
    fused = layer.attention.qkv  # rows: Q, K, V
    rows = [c.num_heads * c.head_dim, c.kv_heads * c.head_dim, c.kv_heads * c.head_dim]
    (wq, wk, wv), (bq, bk, bv) = fused.weight.double().split(rows), fused.bias.double().split(rows)
    q = (x @ wq.T + bq).view(1, n, c.num_heads, c.head_dim)
    k = (x @ wk.T + bk).view(1, n, c.kv_heads, c.head_dim)
    v = (x @ wv.T + bv).view(1, n, c.kv_heads, c.head_dim)
    positions = torch.arange(n)
    if c.pos_emb_type == "rope":
        from reference import rotate

        freqs = rope_frequencies(positions.double(), c.head_dim, c.rope_base)
        q, k = rotate(q, freqs), rotate(k, freqs)
    group = c.num_heads // c.kv_heads
    k = k.repeat_interleave(group, dim=2)
    v = v.repeat_interleave(group, dim=2)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(c.head_dim)
    distance = positions[:, None] - positions[None, :]
    if c.pos_emb_type == "alibi":
        scores = scores - alibi_slopes(c.num_heads).double()[:, None, None] * distance.abs()
    allowed = distance >= 0
    if window is not None:
        allowed &= distance < window
    weights = torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1)
    out = torch.einsum("bhqk,bkhd->bqhd", weights, v).reshape(1, n, -1)
    wo = layer.attention.proj
    return out @ wo.weight.double().T + wo.bias.double()


@pytest.mark.parametrize("attention_type", ["dense", "batched", "loop"])
@pytest.mark.parametrize("pos_emb_type", ["rope", "alibi", "none"])
@pytest.mark.parametrize(("kv_heads", "window", "n"), [(4, None, 9), (2, 3, 17), (1, 5, 32)])
def test_layer_attention_matches_reference(
    attention_type: str, pos_emb_type: str, kv_heads: int, window: int | None, n: int
) -> None:
    torch.manual_seed(0)
    c = config(
        vocab_size=None, attention_type=attention_type, pos_emb_type=pos_emb_type,
        num_kv_heads=kv_heads, causal=True, attention_window=window,
    )  # fmt: skip
    model = Transformer(c).double()
    x = torch.randn(1, n, c.d_model, dtype=torch.float64)
    positions = model._positions({"tokens": n}, x.device)
    step = model._step({"tokens": n}, positions, None)
    out, _ = model.layers[0].attend(x, step)
    # RoPE angles are float32 in the module (float64 here): ~1e-8 apart
    assert relative_error(out, reference_attention(model, 0, x, window)) < 1e-6


# -------------------------------------------------------- linear attention


def linear_reference(q: Tensor, k: Tensor, v: Tensor, allowed: Tensor) -> Tensor:
    fq, fk = torch.nn.functional.elu(q) + 1, torch.nn.functional.elu(k) + 1
    weights = torch.einsum("bqhd,bkhd->bhqk", fq, fk) * allowed
    return torch.einsum("bhqk,bkhd->bqhd", weights, v) / (weights.sum(-1).transpose(1, 2)[..., None] + 1e-6)


@pytest.mark.parametrize("chunk_size", [1, 3, 64])
@pytest.mark.parametrize("sizes", [(5, 7), (33, 2), (1, 40)])
def test_linear_attention_matches_reference(chunk_size: int, sizes: tuple[int, int]) -> None:
    plan = patternc.compile("groups a b\na -> a, b\nb -> b [causal]").patterns["default"]
    specs = plan.token_specs({"a": sizes[0], "b": sizes[1]})
    schedule = schedule_for(specs, plan)
    n = sum(sizes)
    q, k, v = (torch.randn(2, n, 2, 8, dtype=torch.float64) for _ in range(3))
    padding = torch.rand(2, n) > 0.2
    padding[:, sizes[0]] = True  # b's first key is real: every b query has one
    out = run_linear(AttentionInputs(q, k, v, schedule, {}, padding, 0.0, None), chunk_size=chunk_size)
    names = ["a"] * sizes[0] + ["b"] * sizes[1]
    pos = list(range(sizes[0])) + list(range(sizes[1]))
    allowed = torch.zeros(n, n, dtype=torch.bool)
    for i in range(n):
        for j in range(n):
            allowed[i, j] = names[i] == "a" or (names[j] == "b" and pos[j] <= pos[i])
    mask = (allowed[None] & padding[:, None, :])[:, None]
    assert relative_error(out, linear_reference(q, k, v, mask)) < 1e-10


def test_linear_attention_refuses_what_it_cannot_express() -> None:
    plan = patternc.compile("groups a\na -> a [causal, window 4]").patterns["default"]
    schedule = schedule_for(plan.token_specs({"a": 6}), plan)
    q = torch.randn(1, 6, 2, 8)
    with pytest.raises(ValueError, match=r"cannot express \[window 4\]; run this pattern with 'flex'"):
        run_linear(AttentionInputs(q, q, q, schedule, {}, None, 0.0, None))
    with pytest.raises(ValueError, match="cannot add an ALiBi bias"):
        run_linear(AttentionInputs(q, q, q, schedule, {}, None, 0.0, None, torch.ones(2)))


def test_linear_stack_trains() -> None:
    torch.manual_seed(0)
    model = Transformer(config(attention_type="linear", causal=True, linear_attention_chunk_size=4))
    ids = torch.randint(1, 37, (2, 11))
    loss = torch.nn.functional.cross_entropy(model(ids).flatten(0, 1), ids.flatten())
    loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


# ------------------------------------------------------------- decoding


@pytest.mark.parametrize(
    "fields",
    [
        {"pos_emb_type": "rope"},
        {"pos_emb_type": "alibi", "num_kv_heads": 1},
        {"pos_emb_type": "sinusoidal", "attention_window": 3},
        {"pos_emb_type": "rope", "use_pre_norm": False, "norm_type": "rms", "ff_activation": "swiglu"},
    ],
)
def test_kv_cache_decoding_matches_full_forward(fields: dict[str, object]) -> None:
    torch.manual_seed(1)
    model = Transformer(config(causal=True, kv_cache_max_len=20, **fields)).double().eval()
    prompt = torch.randint(1, 37, (2, 5))
    generated = model.generate(prompt, max_new_tokens=6)
    assert generated.shape == (2, 11)
    full = model(generated)  # one pass over the whole sequence
    # greedy decoding picked each token from the cached steps; the full pass agrees
    assert torch.equal(full[:, 4:-1].argmax(-1), generated[:, 5:])
    # and the cached logits are the full pass's logits
    _, kvs = model._run(generated[:, :5], None, None)
    c = model.config
    caches = []
    for kv in kvs:  # each layer's KVCache: {group: {"k", "v": [B, H_kv, n, D]}}
        assert kv is not None and list(kv) == ["tokens"]
        entry = {}
        for name, t in kv["tokens"].items():
            assert t.shape == (2, c.kv_heads, 5, c.head_dim)
            entry[name] = torch.zeros(2, c.kv_heads, c.cache_len, c.head_dim, dtype=torch.float64)
            entry[name][:, :, :5] = t
        caches.append({"tokens": entry})
    for position in range(5, 10):
        logits = model._decode_step(generated[:, position], position, caches)
        assert relative_error(logits, full[:, position]) < 1e-10


def test_generate_errors() -> None:
    with pytest.raises(ValueError, match="generate needs a causal stack over one group"):
        Transformer(config()).generate(torch.ones(1, 3, dtype=torch.long), 2)
    model = Transformer(config(causal=True, kv_cache_max_len=6))
    with pytest.raises(ValueError, match="8 tokens do not fit the KV cache of kv_cache_max_len=6"):
        model.generate(torch.ones(1, 3, dtype=torch.long), 5)


# ------------------------------------------------------- packed documents


def test_packed_documents_give_the_loss_of_separate_runs() -> None:
    torch.manual_seed(2)
    model = Transformer(config(pos_emb_type="rope"), "groups doc*\ndoc* -> self [causal]").double()
    docs = [torch.randint(1, 37, (1, n)) for n in (7, 3, 12)]
    separate = [model(d, {"doc0": d.shape[1]}) for d in docs]
    packed = model(torch.cat(docs, 1), {f"doc{i}": d.shape[1] for i, d in enumerate(docs)})
    assert relative_error(packed, torch.cat(separate, 1)) < 1e-10


def test_padding_ids_are_masked_as_keys() -> None:
    torch.manual_seed(3)
    model = Transformer(config(causal=False, pos_emb_type="none")).double()
    ids = torch.randint(1, 37, (1, 6))
    padded = torch.cat([ids, torch.zeros(1, 3, dtype=torch.long)], 1)
    assert relative_error(model(padded)[:, :6], model(ids)) < 1e-10


# ---------------------------------------------------------- layer schedules


def test_layer_schedule_over_ab_upt_patterns_untied() -> None:
    torch.manual_seed(4)
    program = patternc.compile(ROOT / "examples" / "ab_upt.patc")
    schedule = ["self_anchor", "cross_anchor"] * 2 + ["joint"]
    c = config(vocab_size=None, num_layers=5, untied=True, pos_emb_type="none")
    model = Transformer(c, program, schedule)
    assert [layer.pattern for layer in model.layers] == schedule
    assert len(model.layers[0].attention.qkv.weight) == len(program.type_names)
    sizes = {"surface_anchors": 4, "surface_queries": 6, "volume_anchors": 5, "volume_queries": 3}
    x = torch.randn(2, 18, 32, requires_grad=True)
    out = model(x, sizes)
    out.sum().backward()
    assert out.shape == (2, 18, 32) and x.grad is not None
    # every type's bank got a gradient: tokens used their own weights
    assert all(bank.grad is not None for bank in model.layers[0].attention.qkv.weight)
    with pytest.raises(ValueError, match="layer_patterns must name one of"):
        Transformer(c, program, ["self_anchor"] * 4 + ["nope"])


def test_vision_transformer_pools() -> None:
    stack = config(vocab_size=None, num_layers=1)
    for pool in ("cls", "mean"):
        vit = VisionTransformer(
            VisionTransformerConfig(transformer=stack, image_size=12, patch_size=4, num_classes=5, pool=pool)
        )
        logits = vit(torch.randn(3, 3, 12, 12))
        assert logits.shape == (3, 5) and torch.isfinite(logits).all()


def test_stack_modifiers_merge_with_the_rules_own() -> None:
    """The stack's window joins a rule's modifiers; a rule's own tighter window stays."""
    source = "groups a b\na -> a [window 3]\nb -> b"
    model = Transformer(config(vocab_size=None, attention_window=5), source)
    rules = {r.queries: r.keys[0].modifiers for r in model.plans["default"].rules}
    assert rules[("a",)] == Modifiers(causal=True, window=3)
    assert rules[("b",)] == Modifiers(causal=True, window=5)


@pytest.mark.parametrize("pos_emb_type", ["alibi", "rope"])
@pytest.mark.parametrize(("window", "n"), [(None, 9), (3, 17)])
def test_flex_layer_attention_matches_reference(pos_emb_type: str, window: int | None, n: int) -> None:
    """flex (eager here; forward only on CPU) with ALiBi as a score_mod, GQA and windows."""
    from patternc.nn.executors import flex

    torch.manual_seed(5)
    c = config(
        vocab_size=None, attention_type="flex", pos_emb_type=pos_emb_type,
        num_kv_heads=2, causal=True, attention_window=window,
    )  # fmt: skip
    model = Transformer(c).double()
    x = torch.randn(1, n, c.d_model, dtype=torch.float64)
    positions = model._positions({"tokens": n}, x.device)
    step = model._step({"tokens": n}, positions, None)
    with torch.no_grad(), flex.compiled(False), warnings_as_errors(UserWarning):  # no fallback to batched
        warnings.filterwarnings("ignore", message=".*flex_attention.*")  # eager flex says it is slow
        out, _ = model.layers[0].attend(x, step)
    assert relative_error(out, reference_attention(model, 0, x, window)) < 1e-6
