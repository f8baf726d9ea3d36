"""Untied (per-token-type) layers and blocks against per-type references."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from reference import reference_attention, relative_error
from torch import Tensor, nn

import patternc
from patternc import AttentionPattern as P
from patternc import TokenSpec
from patternc.configs import (
    LinearProjectionConfig,
    MLPConfig,
    PerceiverBlockConfig,
    TransformerBlockConfig,
    UntiedLinearConfig,
    UntiedMixedAttentionConfig,
    UntiedMLPConfig,
    UntiedPerceiverBlockConfig,
    UntiedTransformerBlockConfig,
)
from patternc.nn import (
    MLP,
    LinearProjection,
    MixedAttention,
    PerceiverBlock,
    TransformerBlock,
    UntiedLinear,
    UntiedMixedAttention,
    UntiedMLP,
    UntiedPerceiverBlock,
    UntiedTransformerBlock,
)
from patternc.nn.layers import DropPath

PATHS = ["auto", "segments", "per_type", "bmm"]
TYPES = ["surface", "volume", "wake"]

# layouts: groups in x order; types interleave (groups of one type are not adjacent)
EQUAL = {"surface_anchors": 5, "volume_anchors": 5, "surface_queries": 7, "volume_queries": 7}
UNEVEN = {"surface_anchors": 3, "volume_anchors": 11, "wake_queries": 1, "surface_queries": 6}


def randomize(module: nn.Module, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    for p in module.parameters():
        nn.init.normal_(p, std=0.3)
    return module


def per_type_reference(
    x: Tensor, sizes: dict[str, int], types: list[str], fn: Callable[[int, Tensor], Tensor]
) -> Tensor:
    """Apply ``fn(bank, tokens)`` to each group's tokens separately (plain per-type layers)."""
    out, start = [], 0
    for name, size in sizes.items():
        bank = types.index(name.rsplit("_", 1)[0])
        out.append(fn(bank, x[:, start : start + size]))
        start += size
    return torch.cat(out, dim=1)


def untied_linear(
    din: int, dout: int, types: list[str], path: str = "auto", bias: bool = True
) -> UntiedLinear:
    config = UntiedLinearConfig(
        linear_projection=LinearProjectionConfig(input_dim=din, output_dim=dout, bias=bias),
        num_types=len(types),
    )
    return randomize(UntiedLinear(config, types, path))  # type: ignore[return-value]


# ---------------------------------------------------------------- UntiedLinear


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("sizes", [EQUAL, UNEVEN], ids=["equal", "uneven"])
@pytest.mark.parametrize(("din", "dout"), [(12, 12), (12, 20)], ids=["square", "non-square"])
def test_untied_linear_equals_per_type_linear(path: str, sizes: dict[str, int], din: int, dout: int) -> None:
    layer = untied_linear(din, dout, TYPES, path).double()
    x = torch.randn(3, sum(sizes.values()), din, dtype=torch.float64)
    out = layer(x, sizes)
    ref = per_type_reference(x, sizes, TYPES, lambda b, t: F.linear(t, layer.weights[b], layer.biases[b]))  # type: ignore[index]
    assert out.shape == (3, x.shape[1], dout)
    assert relative_error(out, ref) < 1e-14


@pytest.mark.parametrize("path", PATHS)
def test_untied_linear_bf16(path: str) -> None:
    layer = untied_linear(16, 24, TYPES, path).to(torch.bfloat16)
    x = torch.randn(2, sum(UNEVEN.values()), 16, dtype=torch.bfloat16)
    out = layer(x, UNEVEN)
    assert out.dtype == torch.bfloat16
    ref = per_type_reference(x, UNEVEN, TYPES, lambda b, t: F.linear(t, layer.weights[b], layer.biases[b]))  # type: ignore[index]
    assert relative_error(out, ref) < 1e-2


@pytest.mark.parametrize("path", PATHS)
def test_one_type_equals_tied_linear(path: str) -> None:
    tied = randomize(LinearProjection(LinearProjectionConfig(input_dim=8, output_dim=6)))
    layer = untied_linear(8, 6, ["surface"], path)
    with torch.no_grad():
        layer.weights[0].copy_(tied.weight)
        layer.biases[0].copy_(tied.bias)  # type: ignore[index]
    x = torch.randn(2, 9, 8)
    assert torch.allclose(layer(x, {"surface_anchors": 4, "surface_queries": 5}), tied(x), atol=1e-6)


@pytest.mark.parametrize("path", PATHS)
def test_absent_type_does_not_shift_banks(path: str) -> None:
    """Banks are chosen by type name: dropping `volume` leaves `wake` on its own weights."""
    layer = untied_linear(8, 8, TYPES, path)
    full_sizes = {"surface_anchors": 3, "volume_anchors": 4, "wake_queries": 5}
    x = torch.randn(2, 12, 8)
    full = layer(x, full_sizes)
    without_volume = layer(torch.cat([x[:, :3], x[:, 7:]], dim=1), {"surface_anchors": 3, "wake_queries": 5})
    assert torch.equal(without_volume[:, :3], full[:, :3])
    assert torch.allclose(without_volume[:, 3:], full[:, 7:], atol=1e-6)


def test_weights_are_separate_2d_parameters() -> None:
    layer = untied_linear(8, 6, TYPES, bias=False)
    shapes = [tuple(p.shape) for p in layer.parameters()]
    assert shapes == [(6, 8)] * 3
    assert layer.biases is None
    x = torch.randn(1, 5, 8)
    assert torch.allclose(layer(x, {"surface_a": 5}), x @ layer.weights[0].T)


def test_group_types_override_and_explicit_types_from_plan() -> None:
    program = patternc.compile("groups a b c\ntypes { left: a, c\n right: b }\n* -> *\n")
    layer = untied_linear(4, 4, list(program.type_names))
    x = torch.randn(1, 6, 4)
    sizes = {"a": 1, "b": 2, "c": 3}
    out = layer(x, sizes, program.types)
    expected = torch.cat(
        [
            F.linear(x[:, :1], layer.weights[0], layer.biases[0]),  # type: ignore[index]
            F.linear(x[:, 1:3], layer.weights[1], layer.biases[1]),  # type: ignore[index]
            F.linear(x[:, 3:], layer.weights[0], layer.biases[0]),  # type: ignore[index]
        ],
        dim=1,
    )
    assert torch.allclose(out, expected, atol=1e-6)


def test_type_errors() -> None:
    geometry = LinearProjectionConfig(input_dim=4, output_dim=4)
    with pytest.raises(ValueError, match=r"num_types is 2 but 3 type names were given \(\['a', 'b', 'c'\]\)"):
        UntiedLinear(UntiedLinearConfig(linear_projection=geometry, num_types=2), ["a", "b", "c"])
    with pytest.raises(ValueError, match="type names must be unique"):
        UntiedLinear(UntiedLinearConfig(linear_projection=geometry, num_types=2), ["a", "a"])
    layer = untied_linear(4, 4, ["surface", "volume"])
    with pytest.raises(
        ValueError,
        match=r"group `wake_queries` has type `wake`, which is not one of this layer's types \['surface', 'volume'\]",
    ):
        layer(torch.randn(1, 3, 4), {"wake_queries": 3})
    unnamed = UntiedLinear(UntiedLinearConfig(linear_projection=geometry, num_types=1))
    unnamed(torch.randn(1, 3, 4), {"wake_queries": 3})  # binds `wake` to bank 0
    with pytest.raises(ValueError, match=r"weight bank\(s\) are bound to \['wake'\]"):
        unnamed(torch.randn(1, 3, 4), {"surface_queries": 3})
    with pytest.raises(ValueError, match="x has 4 tokens but the groups add up to 3"):
        layer(torch.randn(1, 4, 4), {"surface_queries": 3})
    with pytest.raises(ValueError, match="num_types"):
        UntiedLinearConfig(linear_projection=geometry, num_types=0)


# ---------------------------------------------------------------- UntiedMLP


def mlp_config(num_layers: int = 1) -> MLPConfig:
    return MLPConfig(input_dim=8, hidden_dim=16, output_dim=6, num_layers=num_layers, activation="gelu")


@pytest.mark.parametrize("path", ["auto", "segments", "per_type"])
@pytest.mark.parametrize("sizes", [EQUAL, UNEVEN], ids=["equal", "uneven"])
def test_untied_mlp_equals_per_type_mlp(path: str, sizes: dict[str, int]) -> None:
    mlp = randomize(UntiedMLP(UntiedMLPConfig(mlp=mlp_config(), num_types=3), TYPES, path)).double()  # type: ignore[arg-type]
    assert len(mlp.layers) == 3  # input -> hidden -> hidden -> output (num_layers=1)
    x = torch.randn(2, sum(sizes.values()), 8, dtype=torch.float64)

    def one_type(bank: int, t: Tensor) -> Tensor:
        for i, layer in enumerate(mlp.layers):
            t = F.linear(t, layer.weights[bank], layer.biases[bank])  # type: ignore[index]
            t = F.gelu(t) if i < 2 else t
        return t

    assert relative_error(mlp(x, sizes), per_type_reference(x, sizes, TYPES, one_type)) < 1e-14


def test_one_type_mlp_equals_tied_mlp() -> None:
    tied = randomize(MLP(mlp_config(0)))
    untied = UntiedMLP(UntiedMLPConfig(mlp=mlp_config(0), num_types=1), ["surface"])
    for t_layer, u_layer in zip(tied.layers, untied.layers):  # type: ignore[arg-type]
        with torch.no_grad():
            u_layer.weights[0].copy_(t_layer.weight)
            u_layer.biases[0].copy_(t_layer.bias)
    x = torch.randn(2, 7, 8)
    assert torch.allclose(untied(x, {"surface_points": 7}), tied(x), atol=1e-6)


# ---------------------------------------------------------------- UntiedMixedAttention

AB = patternc.compile("""
groups surface_anchors surface_queries volume_anchors volume_queries
pattern self_anchor { surface_* -> surface_anchors; volume_* -> volume_anchors }
pattern joint { * -> *_anchors }
""")


def untied_attention(types: list[str], impl: str = "batched", path: str = "auto") -> UntiedMixedAttention:
    config = UntiedMixedAttentionConfig(hidden_dim=16, num_heads=2, num_types=len(types), implementation=impl)  # type: ignore[arg-type]
    return randomize(UntiedMixedAttention(config, types, path=path))  # type: ignore[arg-type, return-value]


@pytest.mark.parametrize("impl", ["batched", "loop", "dense"])
@pytest.mark.parametrize("path", ["segments", "per_type", "bmm"])
@pytest.mark.parametrize("pattern", ["self_anchor", "joint"])
def test_untied_attention_matches_reference(impl: str, path: str, pattern: str) -> None:
    attn = untied_attention(["surface", "volume"], impl, path)
    plan = AB.patterns[pattern]
    sizes = {"surface_anchors": 4, "surface_queries": 7, "volume_anchors": 3, "volume_queries": 9}
    specs = plan.token_specs(sizes)
    x = torch.randn(2, 23, 16)
    out, cache = attn(x, specs, plan)
    types = ["surface", "volume"]

    def per_type(layer: UntiedLinear) -> Callable[[Tensor], Tensor]:
        return lambda t: per_type_reference(
            t,
            sizes,
            types,
            lambda b, part: F.linear(part, layer.weights[b].double(), layer.biases[b].double()),  # type: ignore[index]
        )

    ref = reference_attention(
        attn, x, specs, plan.attention_patterns, qkv_fn=per_type(attn.qkv), out_fn=per_type(attn.proj)
    )  # type: ignore[arg-type]
    assert relative_error(out, ref) < 1e-5
    assert cache is not None and sorted(cache) == ["surface_anchors", "volume_anchors"]


def test_one_type_attention_equals_mixed_attention() -> None:
    attn = untied_attention(["all"])
    tied = MixedAttention(patternc.MixedAttentionConfig(hidden_dim=16, num_heads=2))
    with torch.no_grad():
        tied.qkv.weight.copy_(attn.qkv.weights[0])  # type: ignore[union-attr, index]
        tied.qkv.bias.copy_(attn.qkv.biases[0])  # type: ignore[union-attr, index]
        tied.proj.weight.copy_(attn.proj.weights[0])  # type: ignore[union-attr, index]
        tied.proj.bias.copy_(attn.proj.biases[0])  # type: ignore[union-attr, index]
    specs = [TokenSpec("all_anchors", 5), TokenSpec("all_queries", 6)]
    patterns = [P(["all_anchors", "all_queries"], ["all_anchors"])]
    x = torch.randn(2, 11, 16)
    assert torch.allclose(attn(x, specs, patterns)[0], tied(x, specs, patterns)[0], atol=1e-6)


def test_untied_attention_zero_init_and_projection_config() -> None:
    config = UntiedMixedAttentionConfig(hidden_dim=16, num_heads=2, num_types=2, init_weights="zero")
    qkv, out = config.projection_config()
    assert (qkv.linear_projection.input_dim, qkv.linear_projection.output_dim, qkv.num_types) == (16, 48, 2)
    assert (out.linear_projection.input_dim, out.linear_projection.output_dim) == (16, 16)
    attn = UntiedMixedAttention(config, ["a", "b"])
    assert all(torch.count_nonzero(w) == 0 for w in attn.proj.weights)  # type: ignore[union-attr]
    assert all(torch.count_nonzero(w) > 0 for w in attn.qkv.weights)  # type: ignore[union-attr]


# ---------------------------------------------------------------- blocks


def block_config(**kw: object) -> TransformerBlockConfig:
    return TransformerBlockConfig(hidden_dim=16, num_heads=2, mlp_expansion_factor=2, **kw)  # type: ignore[arg-type]


def test_transformer_block_residual_structure() -> None:
    block = randomize(TransformerBlock(block_config())).eval()
    plan = AB.patterns["joint"]
    sizes = {"surface_anchors": 3, "surface_queries": 4, "volume_anchors": 2, "volume_queries": 5}
    specs = plan.token_specs(sizes)
    x = torch.randn(2, 14, 16)
    h = x + block.attention(block.norm1(x), specs, plan)[0]  # type: ignore[attr-defined]
    expected = h + block.mlp(block.norm2(h))  # type: ignore[attr-defined]
    assert torch.allclose(block(x, specs, plan), expected, atol=1e-6)


def test_layer_scale_and_drop_path() -> None:
    block = TransformerBlock(block_config(layer_scale=1e-5, drop_path=0.5)).eval()
    specs = [TokenSpec("a", 6)]
    patterns = [P(["a"], ["a"])]
    x = torch.randn(4, 6, 16)
    out = block(x, specs, patterns)
    assert torch.allclose(out, x, atol=1e-3) and not torch.equal(out, x)  # tiny scaled branches
    assert torch.equal(block(x, specs, patterns), out)  # drop path is the identity in eval
    drop = DropPath(0.5).train()
    torch.manual_seed(0)
    y = drop(torch.ones(64, 3, 2))
    per_sample = y[:, 0, 0]
    assert set(per_sample.tolist()) == {0.0, 2.0}  # dropped, or kept and rescaled by 1 / keep
    assert torch.equal(y, per_sample[:, None, None].expand_as(y))
    with pytest.raises(ValueError, match="not both"):
        TransformerBlockConfig(hidden_dim=16, num_heads=2, mlp_hidden_dim=32, mlp_expansion_factor=2)
    assert (
        block_config().mlp_width == 32 and TransformerBlockConfig(hidden_dim=8, num_heads=2).mlp_width == 32
    )


def test_block_with_rope() -> None:
    from patternc.nn import rope_frequencies

    block = randomize(TransformerBlock(block_config(use_rope=True))).eval()
    specs = [TokenSpec("a", 6)]
    patterns = [P(["a"], ["a"])]
    x = torch.randn(1, 6, 16)
    a = block(x, specs, patterns, freqs=rope_frequencies(torch.arange(6), head_dim=8))
    b = block(x, specs, patterns, freqs=rope_frequencies(torch.arange(6) * 3, head_dim=8))
    assert not torch.allclose(a, b)


def copy_tied_into_untied(tied: nn.Module, untied: nn.Module) -> None:
    """Load a tied block's weights into a one-type untied block."""
    state = {}
    untied_names = {"qkv", "proj", "q_proj", "out_proj"}
    for name, value in tied.state_dict().items():
        module, param = name.rsplit(".", 1)
        leaf = module.rsplit(".", 1)[-1]
        if (leaf in untied_names or ".layers." in name) and param in ("weight", "bias"):
            state[f"{module}.{'weights' if param == 'weight' else 'biases'}.0"] = value
        else:
            state[name] = value
    untied.load_state_dict(state)


def test_one_type_untied_block_equals_tied_block() -> None:
    tied = randomize(TransformerBlock(block_config(layer_scale=0.5))).eval()
    untied = UntiedTransformerBlock(
        UntiedTransformerBlockConfig(transformer_block=block_config(layer_scale=0.5), num_types=1),
        ["surface"],
    ).eval()
    copy_tied_into_untied(tied, untied)
    plan = AB.patterns["self_anchor"]
    specs = plan.token_specs(
        {"surface_anchors": 3, "surface_queries": 4, "volume_anchors": 2, "volume_queries": 5}
    )
    x = torch.randn(2, 14, 16)
    untied.group_types = dict.fromkeys(plan.groups, "surface")
    untied.attention.group_types = untied.group_types  # type: ignore[union-attr]
    patterns = plan.attention_patterns  # a pattern list: group types come from group_types
    assert torch.allclose(untied(x, specs, patterns), tied(x, specs, patterns), atol=1e-5)


def test_untied_block_gradients_reach_only_present_types() -> None:
    config = UntiedTransformerBlockConfig(transformer_block=block_config(), num_types=3)
    block = UntiedTransformerBlock(config, TYPES)
    specs = [TokenSpec("surface_anchors", 3), TokenSpec("wake_queries", 4)]
    patterns = [P(["surface_anchors", "wake_queries"], ["surface_anchors"])]
    block(torch.randn(2, 7, 16), specs, patterns).sum().backward()
    for name, p in block.named_parameters():
        if ".weights." in name or ".biases." in name:
            bank = int(name.rsplit(".", 1)[1])
            if TYPES[bank] == "volume":
                assert p.grad is None or torch.count_nonzero(p.grad) == 0, name
            else:
                assert p.grad is not None and torch.count_nonzero(p.grad) > 0, name
    assert (
        UntiedTransformerBlockConfig(transformer_block=block_config(), num_types=3)
        .untied_mlp_config()
        .mlp.hidden_dim
        == 32
    )


def test_untied_block_uses_plan_types() -> None:
    program = patternc.compile("groups s_a s_q v_a v_q\ntypes { geo: s_*, v_a\n fluid: v_q }\n* -> *_a\n")
    plan = program.patterns["default"]
    config = UntiedTransformerBlockConfig(transformer_block=block_config(), num_types=2)
    block = randomize(UntiedTransformerBlock(config, list(program.type_names))).eval()
    specs = plan.token_specs({"s_a": 2, "s_q": 3, "v_a": 2, "v_q": 4})
    out = block(torch.randn(1, 11, 16), specs, plan)
    assert out.shape == (1, 11, 16)
    with pytest.raises(ValueError, match="not one of this layer's types"):
        block(torch.randn(1, 11, 16), specs, plan.attention_patterns)  # domains s, v are not banks


def perceiver_config() -> PerceiverBlockConfig:
    return PerceiverBlockConfig(hidden_dim=16, num_heads=2, kv_dim=10, mlp_hidden_dim=24)


def test_perceiver_block_matches_manual_cross_attention() -> None:
    block = randomize(PerceiverBlock(perceiver_config())).eval().double()
    x = torch.randn(2, 5, 16, dtype=torch.float64)
    kv = torch.randn(2, 7, 10, dtype=torch.float64)
    mask = torch.rand(2, 7) > 0.3
    mask[:, 0] = True
    attn = block.attention
    q = attn.q_proj(block.norm1(x)).view(2, 5, 2, 8).transpose(1, 2)
    k, v = attn.kv_proj(block.norm_kv(kv)).view(2, 7, 2, 2, 8).unbind(2)
    scores = (q @ k.transpose(1, 2).transpose(-1, -2)) / 8**0.5
    weights = scores.masked_fill(~mask[:, None, None, :], float("-inf")).softmax(-1)
    h = x + attn.out_proj((weights @ v.transpose(1, 2)).transpose(1, 2).reshape(2, 5, 16))
    expected = h + block.mlp(block.norm2(h))
    assert relative_error(block(x, kv, key_padding_mask=mask), expected) < 1e-12


def test_one_type_untied_perceiver_equals_tied() -> None:
    tied = randomize(PerceiverBlock(perceiver_config())).eval()
    untied = UntiedPerceiverBlock(
        UntiedPerceiverBlockConfig(perceiver_block_config=perceiver_config(), num_types=1), ["surface"]
    ).eval()
    copy_tied_into_untied(tied, untied)
    x, kv = torch.randn(2, 5, 16), torch.randn(2, 7, 10)
    assert torch.allclose(untied(x, kv, {"surface_queries": 5}), tied(x, kv), atol=1e-5)
    with pytest.raises(ValueError, match="needs token_specs"):
        untied(x, kv)


def test_untied_perceiver_two_types_per_type_q_projection() -> None:
    config = UntiedPerceiverBlockConfig(perceiver_block_config=perceiver_config(), num_types=2)
    block = randomize(UntiedPerceiverBlock(config, ["surface", "volume"])).eval()
    x, kv = torch.randn(1, 6, 16), torch.randn(1, 4, 10)
    sizes = {"surface_queries": 2, "volume_queries": 4}
    out = block(x, kv, sizes)
    # swapping the two banks' weights must change the output: they are really used per type
    with torch.no_grad():
        for layer in (block.attention.q_proj, block.attention.out_proj):
            w0 = layer.weights[0].clone()  # type: ignore[index, union-attr]
            layer.weights[0].copy_(layer.weights[1])  # type: ignore[index, union-attr]
            layer.weights[1].copy_(w0)  # type: ignore[index, union-attr]
    assert not torch.allclose(block(x, kv, sizes), out)
    kv_params = [n for n, _ in block.named_parameters() if "kv_proj" in n]
    assert kv_params == ["attention.kv_proj.weight", "attention.kv_proj.bias"]  # shared


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("bias", [True, False])
def test_untied_linear_gradients(path: str, bias: bool) -> None:
    layer = untied_linear(6, 5, TYPES, path, bias=bias).double()
    sizes = {"surface_a": 2, "volume_a": 3, "surface_b": 1, "volume_b": 2}  # wake absent
    x = torch.randn(3, 8, 6, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(3, 8, 5, dtype=torch.float64)
    (layer(x, sizes) * weight).sum().backward()
    got = [x.grad, *(p.grad for p in layer.parameters())]
    x_ref = x.detach().clone().requires_grad_()
    layer.zero_grad()
    biases = layer.biases if bias else [None] * 3
    ref = per_type_reference(x_ref, sizes, TYPES, lambda b, t: F.linear(t, layer.weights[b], biases[b]))  # type: ignore[index]
    (ref * weight).sum().backward()
    want = [x_ref.grad, *(p.grad for p in layer.parameters())]
    for g, w in zip(got, want):
        if w is None:  # the absent type: no gradient at all
            assert g is None or torch.count_nonzero(g) == 0
        else:
            assert g is not None and relative_error(g, w) < 1e-13
    assert torch.autograd.gradcheck(lambda t: layer(t, sizes), (x.detach().requires_grad_(),))


@pytest.mark.parametrize("path", ["auto", "segments", "per_type"])
def test_untied_mlp_gradients_and_many_runs(path: str) -> None:
    mlp = randomize(UntiedMLP(UntiedMLPConfig(mlp=mlp_config(0), num_types=3), TYPES, path)).double()  # type: ignore[arg-type]
    sizes = {f"{TYPES[i % 3]}_{i}": 1 + i % 4 for i in range(12)}  # 12 interleaved runs
    x = torch.randn(2, sum(sizes.values()), 8, dtype=torch.float64, requires_grad=True)

    def one_type(bank: int, t: Tensor) -> Tensor:
        h = F.gelu(F.linear(t, mlp.layers[0].weights[bank], mlp.layers[0].biases[bank]))  # type: ignore[index]
        return F.linear(h, mlp.layers[1].weights[bank], mlp.layers[1].biases[bank])  # type: ignore[index]

    out = mlp(x, sizes)
    ref = per_type_reference(x, sizes, TYPES, one_type)
    assert relative_error(out, ref) < 1e-14
    (gx,) = torch.autograd.grad(out.sum(), x)
    (gx_ref,) = torch.autograd.grad(ref.sum(), x)
    assert relative_error(gx, gx_ref) < 1e-13


# ---------------------------------------------------------------- banks bound by type name


def test_banks_bind_by_first_appearance_and_never_shift() -> None:
    """The seed builds untied layers from num_types alone: the first forward
    binds types in order of appearance, a call missing a type shifts nothing."""
    geometry = LinearProjectionConfig(input_dim=4, output_dim=3)
    torch.manual_seed(0)
    layer = UntiedLinear(UntiedLinearConfig(linear_projection=geometry, num_types=3))
    x = torch.randn(1, 5, 4)
    out = layer(x, {"surface_anchors": 2, "volume_anchors": 3})
    assert layer.types.names == ["surface", "volume"]
    volume_only = layer(x[:, 2:], {"volume_anchors": 3})  # no surface: volume keeps bank 1
    assert torch.allclose(volume_only, out[:, 2:])
    assert torch.allclose(volume_only, x[:, 2:] @ layer.weights[1].T + layer.biases[1])  # type: ignore[index]
    layer(torch.randn(1, 2, 4), {"wake_queries": 2})  # a new type takes the next free bank
    assert layer.types.names == ["surface", "volume", "wake"]


def test_the_binding_is_saved_and_restored_with_the_weights() -> None:
    geometry = LinearProjectionConfig(input_dim=4, output_dim=3)
    config = UntiedLinearConfig(linear_projection=geometry, num_types=2)
    trained = UntiedLinear(config)
    x = torch.randn(1, 5, 4)
    sizes = {"volume_anchors": 3, "surface_anchors": 2}  # volume first: bank 0
    expected = trained(x, sizes)
    fresh = UntiedLinear(config)
    fresh.load_state_dict(trained.state_dict())
    assert fresh.types.names == ["volume", "surface"]
    assert torch.allclose(fresh(x, sizes), expected)
    # a fresh layer called on the other order first would have bound other banks: the
    # loaded binding wins, so the same tokens meet the same weights
    assert torch.allclose(fresh(x[:, 3:], {"surface_anchors": 2}), expected[:, 3:])


def test_a_block_shares_one_binding() -> None:
    from patternc.configs import TransformerBlockConfig, UntiedTransformerBlockConfig
    from patternc.nn import UntiedTransformerBlock

    block = UntiedTransformerBlock(
        UntiedTransformerBlockConfig(
            transformer_block=TransformerBlockConfig(hidden_dim=8, num_heads=2), num_types=2
        )
    )
    specs = [patternc.TokenSpec("surface_anchors", 2), patternc.TokenSpec("volume_anchors", 3)]
    patterns = [patternc.AttentionPattern(["surface_anchors", "volume_anchors"], ["surface_anchors"])]
    block(torch.randn(1, 5, 8), specs, patterns)
    layers = [m for m in block.modules() if isinstance(m, UntiedLinear)]
    assert layers and all(layer.types is block.types for layer in layers)
    assert block.types.names == ["surface", "volume"]


def test_old_checkpoints_without_a_binding_still_load() -> None:
    geometry = LinearProjectionConfig(input_dim=4, output_dim=3)
    layer = UntiedLinear(UntiedLinearConfig(linear_projection=geometry, num_types=2), ["a", "b"])
    state = {k: v for k, v in layer.state_dict().items() if not k.endswith("_extra_state")}
    UntiedLinear(UntiedLinearConfig(linear_projection=geometry, num_types=2), ["a", "b"]).load_state_dict(
        state
    )


# ---------------------------------------------------------------- perceiver: RoPE, KV cache, conditioning


def test_perceiver_block_with_rope_matches_manual_cross_attention() -> None:
    from patternc.nn import rope_frequencies

    block = randomize(PerceiverBlock(perceiver_config())).eval().double()
    x = torch.randn(2, 5, 16, dtype=torch.float64)
    kv = torch.randn(2, 7, 10, dtype=torch.float64)
    q_freqs = rope_frequencies(torch.rand(2, 5, 2, dtype=torch.float64) * 10, head_dim=8)
    kv_freqs = rope_frequencies(torch.rand(2, 7, 2, dtype=torch.float64) * 10, head_dim=8)

    def rotate(t: Tensor, freqs: Tensor) -> Tensor:  # [B, N, H, D] by complex pairs, the RoPE definition
        pairs = torch.view_as_complex(t.reshape(*t.shape[:-1], -1, 2).contiguous())
        return torch.view_as_real(pairs * freqs[:, :, None, :]).flatten(-2)

    attn = block.attention
    q = rotate(attn.q_proj(block.norm1(x)).view(2, 5, 2, 8), q_freqs).transpose(1, 2)
    k, v = attn.kv_proj(block.norm_kv(kv)).view(2, 7, 2, 2, 8).unbind(2)
    k = rotate(k, kv_freqs).transpose(1, 2)
    weights = ((q @ k.transpose(-1, -2)) / 8**0.5).softmax(-1)
    h = x + attn.out_proj((weights @ v.transpose(1, 2)).transpose(1, 2).reshape(2, 5, 16))
    expected = h + block.mlp(block.norm2(h))
    got = block(x, kv, q_freqs=q_freqs, kv_freqs=kv_freqs)
    assert relative_error(got, expected) < 1e-12
    assert relative_error(block(x, kv), expected) > 1e-3  # the rotation matters


@pytest.mark.parametrize("untied", [False, True])
@pytest.mark.parametrize("conditioned", [False, True])
def test_perceiver_kv_cache_gives_the_same_output(untied: bool, conditioned: bool) -> None:
    from patternc.nn import rope_frequencies

    config = perceiver_config().model_copy(update={"condition_dim": 3 if conditioned else None})
    block: PerceiverBlock = (
        UntiedPerceiverBlock(
            UntiedPerceiverBlockConfig(perceiver_block_config=config, num_types=2), ["surface", "volume"]
        )
        if untied
        else PerceiverBlock(config)
    )
    randomize(block).eval()
    sizes = {"surface_queries": 2, "volume_queries": 3} if untied else None
    kv, kv_freqs = torch.randn(2, 7, 10), rope_frequencies(torch.rand(2, 7, 2) * 5, head_dim=8)
    condition = torch.randn(2, 3) if conditioned else None
    cache = block.key_values(kv, kv_freqs, condition=condition)
    assert cache["k"].shape == (2, 2, 7, 8) and cache["v"].shape == (2, 2, 7, 8)
    for n in (5, 5, 1):  # several query batches against one cache
        x, q_freqs = torch.randn(2, n, 16), rope_frequencies(torch.rand(2, n, 2) * 5, head_dim=8)
        groups = {"surface_queries": min(n, 2), "volume_queries": n - min(n, 2)} if sizes else None
        direct = block(x, kv, groups, q_freqs=q_freqs, kv_freqs=kv_freqs, condition=condition)
        cached = block(x, token_specs=groups, q_freqs=q_freqs, kv_cache=cache, condition=condition)
        assert torch.allclose(cached, direct, atol=1e-6)


def test_perceiver_conditioning_starts_as_the_unconditioned_block_and_learns() -> None:
    plain = randomize(PerceiverBlock(perceiver_config())).eval()
    conditioned = PerceiverBlock(perceiver_config().model_copy(update={"condition_dim": 3})).eval()
    conditioned.load_state_dict({**conditioned.state_dict(), **plain.state_dict()})
    x, kv, condition = torch.randn(2, 5, 16), torch.randn(2, 7, 10), torch.randn(2, 3)
    assert torch.allclose(conditioned(x, kv, condition=condition), plain(x, kv), atol=1e-6)
    assert conditioned.modulation is not None
    assert conditioned.modulation.out_features == 6 * 16 + 2 * 10  # the kv input is modulated too
    conditioned(x, kv, condition=condition).square().sum().backward()
    assert (
        conditioned.modulation.weight.grad is not None and conditioned.modulation.weight.grad.abs().sum() > 0
    )
    with torch.no_grad():
        conditioned.modulation.weight.normal_(std=0.3)
    assert not torch.allclose(conditioned(x, kv, condition=condition), plain(x, kv), atol=1e-3)


def test_perceiver_errors_say_what_to_give() -> None:
    plain = PerceiverBlock(perceiver_config())
    conditioned = PerceiverBlock(perceiver_config().model_copy(update={"condition_dim": 3}))
    x, kv = torch.randn(2, 5, 16), torch.randn(2, 7, 10)
    with pytest.raises(ValueError, match="no conditioning: set condition_dim"):
        plain(x, kv, condition=torch.randn(2, 3))
    with pytest.raises(ValueError, match=r"pass condition=\[batch, 3\]"):
        conditioned(x, kv)
    with pytest.raises(ValueError, match=r"one vector per sample, \[batch, 3\]"):
        conditioned(x, kv, condition=torch.randn(2, 5, 3))
    with pytest.raises(ValueError, match="needs kv, or kv_cache from block.key_values"):
        plain(x)
    with pytest.raises(ValueError, match="give kv .* or kv_cache, not both"):
        plain(x, kv, kv_cache=plain.key_values(kv))
    with pytest.raises(ValueError, match="kv has width 9 but this perceiver reads kv_dim=10"):
        plain(x, torch.randn(2, 7, 9))
    with pytest.raises(ValueError, match=r"expected \[batch=2, heads=2"):
        plain(x, kv_cache={"k": torch.randn(1, 2, 7, 8), "v": torch.randn(1, 2, 7, 8)})


def test_identity_init_starts_every_block_as_the_identity() -> None:
    """`truncnormal002-identity` (patternc's "zero"): attention's output projection
    and the MLP's last layer start at zero, so each branch starts closed."""
    x, kv = torch.randn(2, 9, 16), torch.randn(2, 7, 10)
    sizes = {"surface_anchors": 4, "volume_queries": 5}
    specs = [TokenSpec(n, s) for n, s in sizes.items()]
    patterns = [P(["surface_anchors", "volume_queries"], ["surface_anchors"])]
    block_config = TransformerBlockConfig(hidden_dim=16, num_heads=2, init_weights="truncnormal002-identity")
    assert block_config.init_weights == "zero"
    tied = TransformerBlock(block_config)
    untied_block = UntiedTransformerBlock(
        UntiedTransformerBlockConfig(transformer_block=block_config, num_types=2)
    )
    perceiver = PerceiverBlock(perceiver_config().model_copy(update={"init_weights": "zero"}))
    untied_perceiver = UntiedPerceiverBlock(
        UntiedPerceiverBlockConfig(perceiver_block_config=perceiver.config, num_types=2)
    )
    assert torch.equal(tied(x, specs, patterns), x)
    assert torch.equal(untied_block(x, specs, patterns), x)
    assert torch.equal(perceiver(x, kv), x)
    assert torch.equal(untied_perceiver(x, kv, sizes), x)
    # the other weights are drawn as usual: the blocks learn from the first step
    assert tied.attention.qkv.weight.abs().sum() > 0 and tied.mlp.layers[0].weight.abs().sum() > 0
