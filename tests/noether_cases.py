"""The cases checked against the peer package ``noether`` (emmiai-noether 2026.4.0).

Each case builds one module from a namespace of classes: the peer's (when
``tests/golden/noether/make_golden.py`` writes the golden files) or
``patternc.compat.noether``'s (when ``tests/test_noether_compat.py`` reads
them), so both sides run the same construction and call code. A golden file
holds the peer module's state dict, the inputs, its outputs and the
gradients of a fixed function of the outputs with respect to the inputs and
every parameter (by state-dict name).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import torch
from torch import Tensor, nn

Inputs = dict[str, Any]

# per-domain token counts: unbalanced (the peer's loop path in UntiedLinear),
# balanced (its batched paths, x @ W for square banks)
UNBALANCED = {"surface_anchors": 4, "surface_queries": 3, "volume_anchors": 6, "volume_queries": 5}
BALANCED = {"surface_anchors": 5, "surface_queries": 3, "volume_anchors": 5, "volume_queries": 3}
SELF_ANCHOR = [
    (["surface_anchors", "surface_queries"], ["surface_anchors"]),
    (["volume_anchors", "volume_queries"], ["volume_anchors"]),
]


@dataclass
class Case:
    name: str
    build: Callable[[SimpleNamespace], nn.Module]
    inputs: Callable[[SimpleNamespace, torch.Generator], Inputs]
    run: Callable[[SimpleNamespace, nn.Module, Inputs], dict[str, Tensor]]
    square_banks: str | None = None  # the compat option this case's numbers need
    balanced: bool = False
    weights_of: str | None = None  # the case whose state dict this one loads (one copy on disk)


def specs(ns: SimpleNamespace, sizes: dict[str, int | None]) -> list[Any]:
    return [ns.TokenSpec(name=name, size=size) for name, size in sizes.items()]


def patterns(ns: SimpleNamespace, pairs: list[tuple[list[str], list[str]]]) -> list[Any]:
    return [ns.AttentionPattern(query_tokens=q, key_value_tokens=kv) for q, kv in pairs]


def randn(gen: torch.Generator, *shape: int) -> Tensor:
    return torch.randn(*shape, generator=gen)


def rope(ns: SimpleNamespace, head_dim: int, coords: Tensor) -> Tensor:
    config = ns.RopeFrequencyConfig(hidden_dim=head_dim, input_dim=coords.shape[-1], implementation="complex")
    freqs: Tensor = ns.RopeFrequency(config)(coords)
    return freqs


def grad_target(out: Tensor) -> Tensor:
    """A fixed function of an output whose gradient is not uniform."""
    weights = torch.linspace(-1.0, 1.0, out.numel(), dtype=out.dtype, device=out.device).view_as(out)
    return (out * weights).sum() + 0.1 * out.square().sum()


# ----------------------------------------------------------------- MixedAttention


def mixed_config(ns: SimpleNamespace) -> Any:
    # head_dim 8 over 3-D coordinates: the peer's RoPE pads 1 of its 4 rotation pairs
    return ns.MixedAttentionConfig(hidden_dim=16, num_heads=2, use_rope=True)


def mixed_inputs(ns: SimpleNamespace, gen: torch.Generator) -> Inputs:
    n = sum(UNBALANCED.values())
    mask = torch.ones(2, n, dtype=torch.bool)
    mask[1, 1:3] = False  # two surface anchors of the second sample are padding
    mask[0, 11] = False  # and one volume anchor of the first
    return {
        "x": randn(gen, 2, n, 16),
        "freqs": rope(ns, 8, 10 * torch.rand(2, n, 3, generator=gen)),
        "mask": mask,
        "sizes": dict(UNBALANCED),
        "patterns": [
            (["surface_anchors", "surface_queries"], ["surface_anchors", "volume_anchors"]),
            (["volume_anchors", "volume_queries"], ["volume_anchors"]),
        ],
        "query_x": randn(gen, 2, 4, 16),
        "query_freqs": rope(ns, 8, 10 * torch.rand(2, 4, 3, generator=gen)),
    }


def mixed_run(ns: SimpleNamespace, module: nn.Module, inp: Inputs) -> dict[str, Tensor]:
    pats = patterns(ns, inp["patterns"])
    out, cache = module(
        inp["x"], specs(ns, inp["sizes"]), pats, key_padding_mask=inp["mask"], freqs=inp["freqs"]
    )
    plain, cache = module(inp["x"], specs(ns, inp["sizes"]), pats, freqs=inp["freqs"])
    cached_sizes = {
        "surface_anchors": None,
        "surface_queries": 1,
        "volume_anchors": None,
        "volume_queries": 3,
    }
    cached, none = module(
        inp["query_x"], specs(ns, cached_sizes), pats, freqs=inp["query_freqs"], kv_cache=cache
    )
    assert none is None
    outs = {"masked": out, "plain": plain, "cached": cached}
    for name in sorted(cache):
        outs[f"cache.{name}.k"] = cache[name]["k"]
        outs[f"cache.{name}.v"] = cache[name]["v"]
    return outs


# ----------------------------------------------------------------- anchor attention


def anchor_builder(kind: str) -> Callable[[SimpleNamespace], nn.Module]:
    def build(ns: SimpleNamespace) -> nn.Module:
        fields: dict[str, Any] = {
            "hidden_dim": 8,
            "num_heads": 2,
            "use_rope": True,
            "branches": ["surface", "volume"],
        }
        if kind == "self":
            module: nn.Module = ns.SelfAnchorAttention(ns.AttentionConfig(**fields))
        elif kind == "cross":
            module = ns.CrossAnchorAttention(ns.CrossAnchorAttentionConfig(**fields))
        else:
            module = ns.JointAnchorAttention(ns.JointAnchorAttentionConfig(**fields))
        return module

    return build


def anchor_inputs(ns: SimpleNamespace, gen: torch.Generator) -> Inputs:
    n = sum(UNBALANCED.values())
    mask = torch.ones(2, n, dtype=torch.bool)
    mask[0, 2] = False
    return {
        "x": randn(gen, 2, n, 8),
        "freqs": rope(ns, 4, 10 * torch.rand(2, n, 2, generator=gen)),
        "mask": mask,
        "sizes": dict(UNBALANCED),
    }


def anchor_run(ns: SimpleNamespace, module: nn.Module, inp: Inputs) -> dict[str, Tensor]:
    out, cache = module(inp["x"], specs(ns, inp["sizes"]), key_padding_mask=inp["mask"], freqs=inp["freqs"])
    plain, cache = module(inp["x"], specs(ns, inp["sizes"]), freqs=inp["freqs"])
    return {"masked": out, "plain": plain, **{f"cache.{g}.k": kv["k"] for g, kv in sorted(cache.items())}}


# ----------------------------------------------------------------- untied layers


def untied_linear_builder(din: int, dout: int, types: int) -> Callable[[SimpleNamespace], nn.Module]:
    def build(ns: SimpleNamespace) -> nn.Module:
        geometry = ns.LinearProjectionConfig(input_dim=din, output_dim=dout, bias=True)
        module: nn.Module = ns.UntiedLinear(
            ns.UntiedLinearConfig(num_types=types, linear_projection=geometry)
        )
        return module

    return build


def untied_linear_inputs(
    din: int, sizes: dict[str, int]
) -> Callable[[SimpleNamespace, torch.Generator], Inputs]:
    def inputs(ns: SimpleNamespace, gen: torch.Generator) -> Inputs:
        return {"x": randn(gen, 2, sum(sizes.values()), din), "sizes": dict(sizes)}

    return inputs


def untied_linear_run(ns: SimpleNamespace, module: nn.Module, inp: Inputs) -> dict[str, Tensor]:
    return {"out": module(inp["x"], specs(ns, inp["sizes"]))}


THREE_DOMAINS = {"surface_anchors": 2, "surface_queries": 3, "volume_anchors": 6, "wake_queries": 1}
THREE_BALANCED = {"surface_anchors": 3, "volume_anchors": 3, "wake_queries": 3}


def untied_mlp_build(ns: SimpleNamespace) -> nn.Module:
    mlp = ns.MLPConfig(input_dim=6, output_dim=5, hidden_dim=10, num_layers=1, activation="GELU")
    module: nn.Module = ns.UntiedMLP(ns.UntiedMLPConfig(num_types=3, mlp=mlp))
    return module


def untied_attention_build(ns: SimpleNamespace) -> nn.Module:
    config = ns.UntiedMixedAttentionConfig(hidden_dim=8, num_heads=2, use_rope=True, num_types=2)
    module: nn.Module = ns.UntiedMixedAttention(config)
    return module


def untied_attention_inputs(sizes: dict[str, int]) -> Callable[[SimpleNamespace, torch.Generator], Inputs]:
    def inputs(ns: SimpleNamespace, gen: torch.Generator) -> Inputs:
        n = sum(sizes.values())
        mask = torch.ones(2, n, dtype=torch.bool)
        mask[1, 0] = False
        return {
            "x": randn(gen, 2, n, 8),
            "freqs": rope(ns, 4, 10 * torch.rand(2, n, 2, generator=gen)),
            "mask": mask,
            "sizes": dict(sizes),
            "patterns": [
                (["surface_anchors", "surface_queries"], ["surface_anchors", "volume_anchors"]),
                (["volume_anchors", "volume_queries"], ["volume_anchors"]),
            ],
        }

    return inputs


def untied_attention_run(ns: SimpleNamespace, module: nn.Module, inp: Inputs) -> dict[str, Tensor]:
    pats = patterns(ns, inp["patterns"])
    masked = module(inp["x"], specs(ns, inp["sizes"]), pats, key_padding_mask=inp["mask"], freqs=inp["freqs"])
    return {"masked": masked, "plain": module(inp["x"], specs(ns, inp["sizes"]), pats, freqs=inp["freqs"])}


# ----------------------------------------------------------------- blocks


def block_config(
    ns: SimpleNamespace, *, condition: bool, rope_on: bool = False, layerscale: float = 0.5
) -> Any:
    return ns.TransformerBlockConfig(
        hidden_dim=8,
        num_heads=2,
        mlp_hidden_dim=12,
        layerscale=layerscale,
        condition_dim=5 if condition else None,
        use_rope=rope_on,
    )


def untied_block_build(ns: SimpleNamespace) -> nn.Module:
    config = ns.UntiedTransformerBlockConfig(num_types=2, transformer_block=block_config(ns, condition=True))
    module: nn.Module = ns.UntiedTransformerBlock(config)
    return module


def untied_block_inputs(sizes: dict[str, int]) -> Callable[[SimpleNamespace, torch.Generator], Inputs]:
    def inputs(ns: SimpleNamespace, gen: torch.Generator) -> Inputs:
        return {
            "x": randn(gen, 2, sum(sizes.values()), 8),
            "condition": randn(gen, 2, 5),
            "sizes": dict(sizes),
            "patterns": [(list(sizes), [g for g in sizes if g.endswith("anchors")])],
        }

    return inputs


def untied_block_run(ns: SimpleNamespace, module: nn.Module, inp: Inputs) -> dict[str, Tensor]:
    kwargs = {"token_specs": specs(ns, inp["sizes"]), "attention_patterns": patterns(ns, inp["patterns"])}
    out, cache = module(inp["x"], condition=inp["condition"], attn_kwargs=kwargs)
    assert cache is None
    return {"out": out}


def tied_or_untied(ns: SimpleNamespace, name: str, config: Any, untied: bool, field: str) -> nn.Module:
    """The block ``name`` (``ns.PerceiverBlock(config)``) or its untied form over
    two domains (``ns.UntiedPerceiverBlock(ns.UntiedPerceiverBlockConfig(num_types=2,
    perceiver_block_config=config))``, ``field`` naming the config's block field)."""
    if not untied:
        block: nn.Module = getattr(ns, name)(config)
        return block
    untied_config = getattr(ns, f"Untied{name}Config")(num_types=2, **{field: config})
    untied_block: nn.Module = getattr(ns, f"Untied{name}")(untied_config)
    return untied_block


def anchor_block_build(kind: str, untied: bool) -> Callable[[SimpleNamespace], nn.Module]:
    """A physics block as the peer's AB-UPT builds it: a transformer-block
    config whose attention_constructor is set to an anchor class afterwards."""

    def build(ns: SimpleNamespace) -> nn.Module:
        config = copy.deepcopy(block_config(ns, condition=True, rope_on=True))
        config.attention_constructor = {
            "self": ns.SelfAnchorAttention,
            "cross": ns.CrossAnchorAttention,
            "joint": ns.JointAnchorAttention,
        }[kind]
        config.attention_arguments = {"branches": ("surface", "volume")}
        return tied_or_untied(ns, "TransformerBlock", config, untied, "transformer_block")

    return build


def anchor_block_inputs(sizes: dict[str, int]) -> Callable[[SimpleNamespace, torch.Generator], Inputs]:
    def inputs(ns: SimpleNamespace, gen: torch.Generator) -> Inputs:
        n = sum(sizes.values())
        return {
            "x": randn(gen, 2, n, 8),
            "condition": randn(gen, 2, 5),
            "freqs": rope(ns, 4, 10 * torch.rand(2, n, 2, generator=gen)),
            "sizes": dict(sizes),
        }

    return inputs


def anchor_block_run(ns: SimpleNamespace, module: nn.Module, inp: Inputs) -> dict[str, Tensor]:
    kwargs = {"token_specs": specs(ns, inp["sizes"]), "freqs": inp["freqs"], "kv_cache": None}
    out, cache = module(inp["x"], condition=inp["condition"], attn_kwargs=kwargs)
    outs = {"out": out}
    for name, kv in sorted((cache or {}).items()):
        outs[f"cache.{name}.k"] = kv["k"]
    return outs


def perceiver_block_build(untied: bool, condition: bool) -> Callable[[SimpleNamespace], nn.Module]:
    def build(ns: SimpleNamespace) -> nn.Module:
        config = ns.PerceiverBlockConfig(
            hidden_dim=8,
            num_heads=2,
            mlp_hidden_dim=12,
            kv_dim=6,
            layerscale=0.5,
            condition_dim=5 if condition else None,
            use_rope=True,
        )
        return tied_or_untied(ns, "PerceiverBlock", config, untied, "perceiver_block_config")

    return build


def perceiver_inputs(sizes: dict[str, int]) -> Callable[[SimpleNamespace, torch.Generator], Inputs]:
    def inputs(ns: SimpleNamespace, gen: torch.Generator) -> Inputs:
        n = sum(sizes.values())
        return {
            "q": randn(gen, 2, n, 8),
            "kv": randn(gen, 2, 9, 6),
            "condition": randn(gen, 2, 5),
            "q_freqs": rope(ns, 4, 10 * torch.rand(2, n, 2, generator=gen)),
            "k_freqs": rope(ns, 4, 10 * torch.rand(2, 9, 2, generator=gen)),
            "sizes": dict(sizes),
        }

    return inputs


def perceiver_run(
    untied: bool, condition: bool
) -> Callable[[SimpleNamespace, nn.Module, Inputs], dict[str, Tensor]]:
    def run(ns: SimpleNamespace, module: nn.Module, inp: Inputs) -> dict[str, Tensor]:
        kwargs: dict[str, Any] = {"q_freqs": inp["q_freqs"], "k_freqs": inp["k_freqs"]}
        if untied:
            kwargs["token_specs"] = specs(ns, inp["sizes"])
        cond = inp["condition"] if condition else None
        out, cache = module(inp["q"], kv=inp["kv"], condition=cond, attn_kwargs=kwargs)
        again, none = module(inp["q"], kv=None, condition=cond, attn_kwargs={**kwargs, "kv_cache": cache})
        assert none is None
        return {"out": out, "from_cache": again, "cache.k": cache["k"], "cache.v": cache["v"]}

    return run


# ----------------------------------------------------------------- a whole AB-UPT


class ABUPT(nn.Module):
    """An anchored branched UPT put together from the peer's blocks as its
    ``AnchoredBranchedUPT`` does: per-domain embeddings, RoPE over 3-D
    positions, physics blocks (an untied perceiver over a geometry encoding,
    untied self/cross/joint anchor blocks), per-domain decoder blocks (self
    anchor attention on one branch) and output projections."""

    def __init__(
        self,
        ns: SimpleNamespace,
        domains: tuple[str, ...] = ("surface", "volume"),
        plans: dict[str, Any] | None = None,
    ) -> None:
        """``plans``: the physics blocks' patterns as compiled plans (``self``,
        ``cross``, ``joint``), run by plain untied blocks instead of the anchor
        classes (patternc only: the same model with its patterns in a pattern file)."""
        super().__init__()
        self.plans = plans
        dim, heads = 8, 2
        self.domains = domains
        # 2-D positions keep the model small: RoPE needs head_dim // 2 divisible by the coordinates
        self.rope = ns.RopeFrequency(
            ns.RopeFrequencyConfig(hidden_dim=dim // heads, input_dim=2, implementation="complex")
        )
        self.embed = nn.ModuleDict({d: nn.Linear(2, dim) for d in domains})
        block = ns.TransformerBlockConfig(
            hidden_dim=dim, num_heads=heads, mlp_hidden_dim=12, use_rope=True, layerscale=0.5, condition_dim=5
        )
        perceiver = ns.PerceiverBlockConfig(
            hidden_dim=dim, num_heads=heads, mlp_hidden_dim=12, use_rope=True, layerscale=0.5, condition_dim=5
        )
        anchor_classes = {
            "self": ns.SelfAnchorAttention,
            "cross": ns.CrossAnchorAttention,
            "joint": ns.JointAnchorAttention,
        }
        self.physics_blocks = nn.ModuleList(
            [
                ns.UntiedPerceiverBlock(
                    ns.UntiedPerceiverBlockConfig(num_types=len(domains), perceiver_block_config=perceiver)
                )
            ]
        )
        self.kinds = ["perceiver", "self", "cross", "joint"]
        for kind in self.kinds[1:]:
            config = copy.deepcopy(block)
            if plans is None:
                config.attention_constructor = anchor_classes[kind]
                config.attention_arguments = {"branches": domains}
            self.physics_blocks.append(
                ns.UntiedTransformerBlock(
                    ns.UntiedTransformerBlockConfig(num_types=len(domains), transformer_block=config)
                )
            )
        self.decoder_blocks = nn.ModuleDict()
        for d in domains:
            config = copy.deepcopy(block)
            config.attention_constructor = ns.SelfAnchorAttention
            config.attention_arguments = {"branches": (d,)}
            self.decoder_blocks[d] = nn.ModuleList([ns.TransformerBlock(config)])
        self.heads = nn.ModuleDict(
            {d: ns.LinearProjection(ns.LinearProjectionConfig(input_dim=dim, output_dim=4)) for d in domains}
        )

    def forward(
        self,
        ns: SimpleNamespace,
        geometry: Tensor,
        geometry_pos: Tensor,
        anchors: dict[str, Tensor],
        queries: dict[str, Tensor],
        condition: Tensor,
    ) -> dict[str, Tensor]:
        per_domain = {
            d: [
                ns.TokenSpec(name=f"{d}_anchors", size=anchors[d].shape[1]),
                ns.TokenSpec(name=f"{d}_queries", size=queries[d].shape[1]),
            ]
            for d in self.domains
        }
        all_specs = [s for d in self.domains for s in per_domain[d]]
        pos = {d: torch.cat([anchors[d], queries[d]], dim=1) for d in self.domains}
        rope = {d: self.rope(pos[d]) for d in self.domains}
        x = torch.cat([self.embed[d](pos[d]) for d in self.domains], dim=1)
        freqs = torch.cat([rope[d] for d in self.domains], dim=1)
        geometry_freqs = self.rope(geometry_pos)
        for kind, block in zip(self.kinds, self.physics_blocks):
            if isinstance(block, ns.UntiedPerceiverBlock):
                kwargs = {"token_specs": all_specs, "q_freqs": freqs, "k_freqs": geometry_freqs}
                x, _ = block(q=x, kv=geometry, attn_kwargs=kwargs, condition=condition)
                continue
            kwargs = {"token_specs": all_specs, "freqs": freqs, "kv_cache": None}
            if self.plans is not None:
                kwargs["attention_patterns"] = self.plans[kind]
            x, _ = block(x, attn_kwargs=kwargs, condition=condition)
        out: dict[str, Tensor] = {}
        for d, part in zip(self.domains, x.split([pos[d].shape[1] for d in self.domains], dim=1)):
            for block in self.decoder_blocks[d]:
                part, _ = block(
                    part, attn_kwargs={"token_specs": per_domain[d], "freqs": rope[d]}, condition=condition
                )
            pred = self.heads[d](part)
            out[f"{d}_anchors"] = pred[:, : anchors[d].shape[1]]
            out[f"{d}_queries"] = pred[:, anchors[d].shape[1] :]
        return out


def abupt_inputs(sizes: dict[str, int]) -> Callable[[SimpleNamespace, torch.Generator], Inputs]:
    def inputs(ns: SimpleNamespace, gen: torch.Generator) -> Inputs:
        return {
            "geometry": randn(gen, 2, 7, 8),
            "geometry_pos": torch.rand(2, 7, 2, generator=gen),
            **{f"pos.{g}": torch.rand(2, n, 2, generator=gen) for g, n in sizes.items()},
            "condition": randn(gen, 2, 5),
        }

    return inputs


def abupt_run(ns: SimpleNamespace, module: nn.Module, inp: Inputs) -> dict[str, Tensor]:
    domains = ("surface", "volume")
    result: dict[str, Tensor] = module(
        ns,
        inp["geometry"],
        inp["geometry_pos"],
        {d: inp[f"pos.{d}_anchors"] for d in domains},
        {d: inp[f"pos.{d}_queries"] for d in domains},
        inp["condition"],
    )
    return result


def _abupt_build(ns: SimpleNamespace) -> nn.Module:
    return ABUPT(ns)


CASES: list[Case] = [
    Case("mixed_attention", lambda ns: ns.MixedAttention(mixed_config(ns)), mixed_inputs, mixed_run),
    *(
        Case(f"{kind}_anchor_attention", anchor_builder(kind), anchor_inputs, anchor_run)
        for kind in ("self", "cross", "joint")
    ),
    Case(
        "untied_linear_rect",
        untied_linear_builder(6, 10, 3),
        untied_linear_inputs(6, THREE_DOMAINS),
        untied_linear_run,
    ),
    Case(
        "untied_linear_square",
        untied_linear_builder(8, 8, 3),
        untied_linear_inputs(8, THREE_DOMAINS),
        untied_linear_run,
    ),
    Case(
        "untied_linear_square_balanced",
        untied_linear_builder(8, 8, 3),
        untied_linear_inputs(8, THREE_BALANCED),
        untied_linear_run,
        square_banks="bmm",
        balanced=True,
        weights_of="untied_linear_square",
    ),
    Case("untied_mlp", untied_mlp_build, untied_linear_inputs(6, THREE_DOMAINS), untied_linear_run),
    Case(
        "untied_mixed_attention",
        untied_attention_build,
        untied_attention_inputs(UNBALANCED),
        untied_attention_run,
    ),
    Case(
        "untied_mixed_attention_balanced",
        untied_attention_build,
        untied_attention_inputs(BALANCED),
        untied_attention_run,
        square_banks="bmm",
        balanced=True,
        weights_of="untied_mixed_attention",
    ),
    Case("untied_transformer_block", untied_block_build, untied_block_inputs(UNBALANCED), untied_block_run),
    Case(
        "transformer_block_self_anchor",
        anchor_block_build("self", untied=False),
        anchor_block_inputs(UNBALANCED),
        anchor_block_run,
    ),
    Case(
        "untied_block_cross_anchor",
        anchor_block_build("cross", untied=True),
        anchor_block_inputs(UNBALANCED),
        anchor_block_run,
    ),
    Case(
        "perceiver_block",
        perceiver_block_build(False, True),
        perceiver_inputs(UNBALANCED),
        perceiver_run(False, True),
    ),
    Case(
        "untied_perceiver_block",
        perceiver_block_build(True, True),
        perceiver_inputs(UNBALANCED),
        perceiver_run(True, True),
    ),
    Case("abupt", _abupt_build, abupt_inputs(UNBALANCED), abupt_run),
    Case(
        "abupt_balanced",
        _abupt_build,
        abupt_inputs(BALANCED),
        abupt_run,
        square_banks="bmm",
        balanced=True,
        weights_of="abupt",
    ),
]
