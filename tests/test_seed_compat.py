"""What a user porting from the seed API meets: seed defaults exactly, configs
that refuse unknown fields with a "did you mean", the peer's spellings where
they mean the same, and inconsistent inputs that raise."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

import patternc
from patternc.configs import MLPConfig, TransformerBlockConfig, UntiedLinearConfig
from patternc.nn import MixedAttention

# Seed 004 (TransformerConfig), every documented default, in one table.
SEED_TRANSFORMER_DEFAULTS = {
    "d_model": 512,
    "num_heads": 8,
    "num_layers": 6,
    "d_ff": 2048,
    "dropout_rate": 0.1,
    "max_len": 512,
    "use_pre_norm": True,
    "pos_emb_type": "sinusoidal",
    "ff_activation": "gelu",
    "norm_type": "layer",
    "pad_token_id": 0,
    "attention_type": "standard",
    "attention_block_size": 512,
    "linear_attention_chunk_size": 64,
    "rope_base": 10000.0,
    "rope_max_positions": None,
    "num_kv_heads": None,
    "attention_window": None,
    "kv_cache_max_len": None,
}


# Seeds 000-003 document no other defaults: their `= None` on required fields
# (hidden_dim, num_heads, ...) is the doc generator's, and the real ones are these.
SEED_DEFAULTS = {
    "TransformerConfig": (lambda: patternc.TransformerConfig(vocab_size=100), SEED_TRANSFORMER_DEFAULTS),
    "AttentionConfig": (lambda: patternc.AttentionConfig(hidden_dim=8, num_heads=2), {"head_dim": None}),
    "TokenSpec": (lambda: patternc.TokenSpec(name="surface_anchors"), {"size": None}),
}


@pytest.mark.parametrize("name", sorted(SEED_DEFAULTS))
def test_configs_have_the_seed_defaults(name: str) -> None:
    build, defaults = SEED_DEFAULTS[name]
    config = build()
    assert {field: getattr(config, field) for field in defaults} == defaults


def test_vocab_size_is_required_as_in_the_seed() -> None:
    with pytest.raises(ValidationError, match="vocab_size is required"):
        patternc.TransformerConfig()
    assert patternc.TransformerConfig(vocab_size=None).vocab_size is None  # features in, our extension


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (
            lambda: TransformerBlockConfig(hidden_dim=64, num_heads=4, layer_scal=0.1),
            "did you mean `layer_scale`",
        ),
        (
            lambda: TransformerBlockConfig(hidden_dim=64, num_heads=4, conditon_dim=8),
            "did you mean `condition_dim`",
        ),
        (
            lambda: MLPConfig(input_dim=4, hidden_dim=8, output_dim=4, actvation="relu"),
            "did you mean `activation`",
        ),
        (lambda: UntiedLinearConfig(num_type=2), "did you mean `num_types`"),
        (lambda: patternc.TransformerConfig(vocab_size=10, d_modle=64), "did you mean `d_model`"),
        (
            lambda: patternc.MixedAttentionConfig(hidden_dim=8, num_heads=2, use_rop=True),
            "did you mean `use_rope`",
        ),
    ],
)
def test_configs_refuse_unknown_fields_naming_the_closest(make: object, message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        make()  # type: ignore[operator]


def test_peer_spellings_with_the_same_meaning_are_accepted() -> None:
    block = TransformerBlockConfig(hidden_dim=64, num_heads=4, layerscale=0.1, activation="GELU")
    assert block.layer_scale == 0.1 and block.activation == "gelu"
    assert patternc.TransformerConfig(vocab_size=10, ff_activation="SwiGLU").ff_activation == "swiglu"
    with pytest.raises(ValidationError, match="same field"):
        TransformerBlockConfig(hidden_dim=64, num_heads=4, layerscale=0.1, layer_scale=0.2)


def test_attention_config_keeps_unrelated_extra_fields() -> None:
    """The seed's AttentionConfig takes extra fields for other backends."""
    config = patternc.AttentionConfig(hidden_dim=8, num_heads=2, flash_block_size=64)
    assert config.model_extra == {"flash_block_size": 64}


def test_freqs_without_rope_raise() -> None:
    attn = MixedAttention(patternc.MixedAttentionConfig(hidden_dim=8, num_heads=2))
    specs = [patternc.TokenSpec("a", 3)]
    patterns = [patternc.AttentionPattern(["a"], ["a"])]
    with pytest.raises(ValueError, match="use_rope=False, so they would be ignored"):
        attn(torch.randn(1, 3, 8), specs, patterns, freqs=torch.randn(3, 2))


def test_a_kv_cache_nothing_reads_raises() -> None:
    attn = MixedAttention(patternc.MixedAttentionConfig(hidden_dim=8, num_heads=2))
    specs = [patternc.TokenSpec("a", 3)]
    patterns = [patternc.AttentionPattern(["a"], ["a"])]
    _, cache = attn(torch.randn(1, 3, 8), specs, patterns)
    with pytest.raises(ValueError, match="no group has size None"):
        attn(torch.randn(1, 3, 8), specs, patterns, kv_cache=cache)


def test_untied_layers_run_from_their_config_alone() -> None:
    """The seed builds untied layers from num_types and reads types from TokenSpec.domain."""
    from patternc.configs import LinearProjectionConfig, UntiedMixedAttentionConfig, UntiedMLPConfig
    from patternc.nn import UntiedMixedAttention, UntiedMLP

    specs = [patternc.TokenSpec("surface_anchors", 2), patternc.TokenSpec("volume_anchors", 3)]
    patterns = [patternc.AttentionPattern(["surface_anchors", "volume_anchors"], ["volume_anchors"])]
    attn = UntiedMixedAttention(config=UntiedMixedAttentionConfig(hidden_dim=8, num_heads=2, num_types=2))
    out, _ = attn(torch.randn(1, 5, 8), specs, patterns)
    assert out.shape == (1, 5, 8) and attn.types.names == ["surface", "volume"]
    mlp = UntiedMLP(UntiedMLPConfig(mlp=MLPConfig(input_dim=8, hidden_dim=16, output_dim=8), num_types=2))
    assert mlp(torch.randn(1, 5, 8), specs).shape == (1, 5, 8)
    assert LinearProjectionConfig(input_dim=2, output_dim=3).output_dim == 3


def test_conditioning_starts_as_the_unconditioned_block_and_learns() -> None:
    from patternc.nn import TransformerBlock

    specs = [patternc.TokenSpec("a", 3), patternc.TokenSpec("q", 4)]
    patterns = [patternc.AttentionPattern(["a", "q"], ["a"])]
    torch.manual_seed(0)
    plain = TransformerBlock(TransformerBlockConfig(hidden_dim=8, num_heads=2))
    conditioned = TransformerBlock(TransformerBlockConfig(hidden_dim=8, num_heads=2, condition_dim=5))
    missing = conditioned.load_state_dict(plain.state_dict(), strict=False).missing_keys
    assert sorted(missing) == ["modulation.bias", "modulation.weight"]
    x, c = torch.randn(2, 7, 8), torch.randn(2, 5)
    expected = plain(x, specs, patterns)
    out = conditioned(x, attn_kwargs={"token_specs": specs, "attention_patterns": patterns}, condition=c)
    assert torch.allclose(out, expected, atol=1e-6)
    out.square().sum().backward()
    assert conditioned.modulation is not None and conditioned.modulation.weight.grad is not None
    assert conditioned.modulation.weight.grad.abs().sum() > 0
    per_token = conditioned(x, specs, patterns, condition=torch.randn(2, 7, 5))
    assert per_token.shape == x.shape


def test_conditioning_errors_say_what_to_change() -> None:
    from patternc.nn import TransformerBlock

    specs = [patternc.TokenSpec("a", 3)]
    patterns = [patternc.AttentionPattern(["a"], ["a"])]
    plain = TransformerBlock(TransformerBlockConfig(hidden_dim=8, num_heads=2))
    with pytest.raises(ValueError, match="no conditioning: set condition_dim"):
        plain(torch.randn(1, 3, 8), specs, patterns, condition=torch.randn(1, 4))
    conditioned = TransformerBlock(TransformerBlockConfig(hidden_dim=8, num_heads=2, condition_dim=4))
    with pytest.raises(ValueError, match=r"pass condition=\[batch, 4\]"):
        conditioned(torch.randn(1, 3, 8), specs, patterns)
    with pytest.raises(ValueError, match="give them one way"):
        plain(torch.randn(1, 3, 8), specs, attn_kwargs={"token_specs": specs, "attention_patterns": patterns})


def peer_layout(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A state dict in the seed's layout, written from its documented semantics:
    untied banks stacked as one ``weight [num_types, out, in]`` / ``bias``, and
    attention projecting ``q``, ``k``, ``v`` separately."""
    import re

    out: dict[str, torch.Tensor] = {}
    banks: dict[str, dict[int, torch.Tensor]] = {}
    for key, value in state.items():
        match = re.fullmatch(r"(.*)(weight|bias)\.(\d+)", key)
        if match:
            banks.setdefault(match.group(1) + match.group(2), {})[int(match.group(3))] = value
        elif not key.endswith("_extra_state"):
            out[key] = value
    out.update({k: torch.stack([v[i] for i in sorted(v)]) for k, v in banks.items()})
    for key in [k for k in out if k.endswith("qkv.weight") or k.endswith("qkv.bias")]:
        prefix, name = key.rsplit("qkv.", 1)
        q, k, v = out.pop(key).chunk(3, dim=-2 if name == "weight" else -1)
        out.update({f"{prefix}q.{name}": q, f"{prefix}k.{name}": k, f"{prefix}v.{name}": v})
    return out


def test_checkpoints_in_the_seed_layout_load() -> None:
    from patternc.configs import UntiedMixedAttentionConfig, UntiedTransformerBlockConfig
    from patternc.nn import UntiedMixedAttention, UntiedTransformerBlock

    specs = [patternc.TokenSpec("surface_anchors", 2), patternc.TokenSpec("volume_anchors", 3)]
    patterns = [patternc.AttentionPattern(["surface_anchors", "volume_anchors"], ["volume_anchors"])]
    x = torch.randn(1, 5, 8)
    types = ["surface", "volume"]
    builders = {
        "MixedAttention": lambda: MixedAttention(patternc.MixedAttentionConfig(hidden_dim=8, num_heads=2)),
        "UntiedMixedAttention": lambda: UntiedMixedAttention(
            UntiedMixedAttentionConfig(hidden_dim=8, num_heads=2, num_types=2), types
        ),
        "UntiedTransformerBlock": lambda: UntiedTransformerBlock(
            UntiedTransformerBlockConfig(
                transformer_block=TransformerBlockConfig(hidden_dim=8, num_heads=2), num_types=2
            ),
            types,
        ),
    }
    for name, build in builders.items():
        torch.manual_seed(0)
        source = build()
        for p in source.parameters():
            torch.nn.init.normal_(p, std=0.3)
        expected = source(x, specs, patterns)
        expected = expected[0] if isinstance(expected, tuple) else expected
        peer = peer_layout(source.state_dict())
        assert not any(k[-1].isdigit() or "qkv" in k for k in peer), name
        torch.manual_seed(1)
        target = build()
        target.load_state_dict(peer)
        got = target(x, specs, patterns)
        got = got[0] if isinstance(got, tuple) else got
        assert torch.allclose(got, expected, atol=1e-6), name


def test_untied_linear_exposes_the_seed_attributes() -> None:
    from patternc.configs import LinearProjectionConfig
    from patternc.nn import UntiedLinear

    layer = UntiedLinear(
        UntiedLinearConfig(linear_projection=LinearProjectionConfig(input_dim=4, output_dim=3), num_types=2)
    )
    assert (layer.num_types, layer.input_dim, layer.output_dim) == (2, 4, 3)
    assert layer.bias is not None
    assert [tuple(w.shape) for w in layer.weight] == [(3, 4), (3, 4)]
    assert [tuple(b.shape) for b in layer.bias] == [(3,), (3,)]
    # the banks themselves, not copies: writes, nn.init and gradients reach the layer
    with torch.no_grad():
        layer.weight[1].copy_(torch.eye(3, 4))
    torch.nn.init.zeros_(layer.bias[1])
    layer.types.names[:] = ["a", "b"]  # bind the banks (the first forward would bind them by appearance)
    x = torch.randn(1, 2, 4)
    assert torch.allclose(layer(x, {"b_x": 2}), x[..., :3])
    layer(x, {"b_x": 2}).sum().backward()
    assert layer.weight[1].grad is not None and layer.weight[0].grad is None
    assert all(isinstance(p, torch.nn.Parameter) for p in [*layer.weight, *layer.bias])
    assert layer.weights is layer.weight and layer.biases is layer.bias  # the older names


def test_anchor_attention_loads_the_seed_layout() -> None:
    from patternc.configs import JointAnchorAttentionConfig
    from patternc.nn import JointAnchorAttention

    config = JointAnchorAttentionConfig(hidden_dim=8, num_heads=2, branches=["surface", "volume"])
    specs = [
        patternc.TokenSpec("surface_anchors", 2),
        patternc.TokenSpec("surface_queries", 3),
        patternc.TokenSpec("volume_anchors", 2),
        patternc.TokenSpec("volume_queries", 1),
    ]
    torch.manual_seed(0)
    source = JointAnchorAttention(config)
    x = torch.randn(1, 8, 8)
    expected = source(x, specs)
    target = JointAnchorAttention(config)
    target.load_state_dict(peer_layout(source.state_dict()))
    assert torch.allclose(target(x, specs), expected, atol=1e-6)


def test_peer_init_modes_keep_their_meaning() -> None:
    from patternc.configs import UntiedMixedAttentionConfig
    from patternc.nn import UntiedMixedAttention

    assert patternc.MixedAttentionConfig(
        hidden_dim=8, num_heads=2, init_weights="truncnormal"
    ).init_weights == ("truncnormal002")
    identity = patternc.MixedAttentionConfig(
        hidden_dim=8, num_heads=2, init_weights="TruncNormal002-Identity"
    )
    assert identity.init_weights == "zero"
    attn = MixedAttention(identity)
    assert (
        attn.proj.weight.abs().sum() == 0 and attn.qkv.weight.abs().sum() > 0
    )  # the branch starts as identity
    zeros = MixedAttention(patternc.MixedAttentionConfig(hidden_dim=8, num_heads=2, init_weights="zeros"))
    assert all(p.abs().sum() == 0 for p in zeros.parameters())
    untied = UntiedMixedAttention(
        UntiedMixedAttentionConfig(hidden_dim=8, num_heads=2, num_types=2, init_weights="zeros")
    )
    assert all(p.abs().sum() == 0 for p in untied.parameters())
    with pytest.raises(ValidationError, match="truncnormal002"):
        patternc.MixedAttentionConfig(hidden_dim=8, num_heads=2, init_weights="normal")


def test_more_seed_layouts_load() -> None:
    """UntiedLinear, UntiedMLP, UntiedPerceiverBlock and the self/cross anchor
    modules from a state dict in the seed's layout (stacked banks, q/k/v)."""
    from patternc.configs import (
        CrossAnchorAttentionConfig,
        LinearProjectionConfig,
        PerceiverBlockConfig,
        SelfAnchorAttentionConfig,
        UntiedMLPConfig,
        UntiedPerceiverBlockConfig,
    )
    from patternc.nn import (
        CrossAnchorAttention,
        SelfAnchorAttention,
        UntiedLinear,
        UntiedMLP,
        UntiedPerceiverBlock,
    )

    specs = [
        patternc.TokenSpec("surface_anchors", 2),
        patternc.TokenSpec("surface_queries", 3),
        patternc.TokenSpec("volume_anchors", 2),
        patternc.TokenSpec("volume_queries", 1),
    ]
    x = torch.randn(1, 8, 8)
    kv = torch.randn(1, 5, 8)
    types = ["surface", "volume"]
    anchors = {"hidden_dim": 8, "num_heads": 2, "branches": types}
    builders = {
        "UntiedLinear": (
            lambda: UntiedLinear(
                UntiedLinearConfig(
                    linear_projection=LinearProjectionConfig(input_dim=8, output_dim=6), num_types=2
                ),
                types,
            ),
            lambda m: m(x, specs),
        ),
        "UntiedMLP": (
            lambda: UntiedMLP(
                UntiedMLPConfig(mlp=MLPConfig(input_dim=8, hidden_dim=16, output_dim=8), num_types=2), types
            ),
            lambda m: m(x, specs),
        ),
        "UntiedPerceiverBlock": (
            lambda: UntiedPerceiverBlock(
                UntiedPerceiverBlockConfig(
                    perceiver_block_config=PerceiverBlockConfig(hidden_dim=8, num_heads=2), num_types=2
                ),
                types,
            ),
            lambda m: m(x, kv, specs),
        ),
        "SelfAnchorAttention": (
            lambda: SelfAnchorAttention(SelfAnchorAttentionConfig(**anchors)),
            lambda m: m(x, specs),
        ),
        "CrossAnchorAttention": (
            lambda: CrossAnchorAttention(CrossAnchorAttentionConfig(**anchors)),
            lambda m: m(x, specs),
        ),
    }
    for name, (build, run) in builders.items():
        torch.manual_seed(0)
        source = build()
        for p in source.parameters():
            torch.nn.init.normal_(p, std=0.3)
        expected = run(source)
        peer = peer_layout(source.state_dict())
        assert not any(k[-1].isdigit() or "qkv" in k for k in peer), name
        torch.manual_seed(1)
        target = build()
        target.load_state_dict(peer)
        assert torch.allclose(run(target), expected, atol=1e-6), name
