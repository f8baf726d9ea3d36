"""Pydantic configs of the layers and blocks in ``patternc.nn`` (torch-free).

Tied layers (``LinearProjectionConfig``, ``MLPConfig``, ``TransformerBlockConfig``,
``PerceiverBlockConfig``), their untied (per-token-type) counterparts that add
``num_types``, and the anchor-attention configs. Validators say what is wrong
and how to fix it.
"""

from __future__ import annotations

from typing import ClassVar, Literal, NamedTuple

from pydantic import Field, model_validator

from patternc.schemas import Implementation, InitWeights, MixedAttentionConfig
from patternc.strict import StrictConfig

__all__ = [
    "Activation",
    "AnchorAttentionConfig",
    "AttentionProjections",
    "CrossAnchorAttentionConfig",
    "JointAnchorAttentionConfig",
    "LinearProjectionConfig",
    "MLPConfig",
    "PerceiverBlockConfig",
    "SelfAnchorAttentionConfig",
    "TransformerBlockConfig",
    "UntiedLinearConfig",
    "UntiedMLPConfig",
    "UntiedMixedAttentionConfig",
    "UntiedPerceiverBlockConfig",
    "UntiedTransformerBlockConfig",
]

Activation = Literal["gelu", "relu", "silu", "tanh"]

_NUM_TYPES = Field(ge=1, description="Number of token types, each with its own weights.")


class LinearProjectionConfig(StrictConfig):
    """A linear layer ``input_dim -> output_dim``."""

    input_dim: int = Field(gt=0)
    output_dim: int = Field(gt=0)
    bias: bool = True
    init_weights: InitWeights = "truncnormal002"


class MLPConfig(StrictConfig):
    """An MLP ``input -> [hidden] * (num_layers + 1) -> output`` with
    ``activation`` between layers (``num_layers=0``: the usual two linears)."""

    _LOWERCASE: ClassVar[tuple[str, ...]] = ("activation",)

    input_dim: int = Field(gt=0)
    hidden_dim: int = Field(gt=0)
    output_dim: int = Field(gt=0)
    num_layers: int = Field(default=0, ge=0, description="Hidden-to-hidden layers.")
    activation: Activation = "gelu"
    bias: bool = True
    init_weights: InitWeights = "truncnormal002"


class TransformerBlockConfig(StrictConfig):
    """Pre-norm transformer block: ``x + attn(norm(x))``, ``x + mlp(norm(x))``,
    each branch optionally scaled (``layer_scale``) and dropped (``drop_path``)."""

    _ALIASES: ClassVar[dict[str, str]] = {"layerscale": "layer_scale"}
    _LOWERCASE: ClassVar[tuple[str, ...]] = ("activation",)

    hidden_dim: int = Field(gt=0)
    num_heads: int = Field(gt=0)
    mlp_hidden_dim: int | None = Field(
        default=None, gt=0, description="MLP width; or use mlp_expansion_factor."
    )
    mlp_expansion_factor: float | None = Field(
        default=None, gt=0, description="MLP width / hidden_dim (default 4)."
    )
    drop_path: float = Field(default=0.0, ge=0.0, lt=1.0, description="Stochastic-depth rate of each branch.")
    layer_scale: float | None = Field(
        default=None, gt=0, description="Initial per-channel branch scale; None: off."
    )
    bias: bool = True
    eps: float = Field(default=1e-6, gt=0, description="LayerNorm epsilon.")
    init_weights: InitWeights = "truncnormal002"
    use_rope: bool = False
    qk_norm: bool = False
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0)
    activation: Activation = "gelu"
    implementation: Implementation = "batched"
    condition_dim: int | None = Field(
        default=None,
        gt=0,
        description="Width of a conditioning vector (e.g. inflow parameters): it sets a scale, shift and "
        "gate of each branch (adaptive norm, as in DiT), from a zero-initialised linear.",
    )

    @model_validator(mode="after")
    def _one_mlp_width(self) -> TransformerBlockConfig:
        if self.mlp_hidden_dim is not None and self.mlp_expansion_factor is not None:
            raise ValueError(
                f"give mlp_hidden_dim ({self.mlp_hidden_dim}) or mlp_expansion_factor "
                f"({self.mlp_expansion_factor}), not both"
            )
        if self.hidden_dim % self.num_heads:
            raise ValueError(
                f"hidden_dim ({self.hidden_dim}) must be divisible by num_heads ({self.num_heads})"
            )
        return self

    @property
    def mlp_width(self) -> int:
        if self.mlp_hidden_dim is not None:
            return self.mlp_hidden_dim
        return int(self.hidden_dim * (self.mlp_expansion_factor or 4.0))

    def attention(self) -> MixedAttentionConfig:
        return MixedAttentionConfig(
            hidden_dim=self.hidden_dim,
            num_heads=self.num_heads,
            use_rope=self.use_rope,
            dropout=self.dropout,
            init_weights=self.init_weights,
            bias=self.bias,
            qk_norm=self.qk_norm,
            implementation=self.implementation,
        )

    def mlp(self) -> MLPConfig:
        return MLPConfig(
            input_dim=self.hidden_dim,
            hidden_dim=self.mlp_width,
            output_dim=self.hidden_dim,
            activation=self.activation,
            bias=self.bias,
            init_weights=self.init_weights,
        )


class PerceiverBlockConfig(TransformerBlockConfig):
    """Transformer block whose attention reads keys/values from a second input
    of width ``kv_dim`` (default ``hidden_dim``)."""

    kv_dim: int | None = Field(default=None, gt=0)

    @property
    def kv_width(self) -> int:
        return self.kv_dim or self.hidden_dim


class UntiedLinearConfig(StrictConfig):
    """A linear layer with one weight bank per token type."""

    linear_projection: LinearProjectionConfig
    num_types: int = _NUM_TYPES


class AttentionProjections(NamedTuple):
    """The per-type projections of an untied attention layer."""

    qkv: UntiedLinearConfig
    out: UntiedLinearConfig


class UntiedMixedAttentionConfig(MixedAttentionConfig):
    """``MixedAttentionConfig`` with per-type QKV and output projections;
    attention itself still runs across all tokens through the plan."""

    num_types: int = _NUM_TYPES

    def projection_config(self, num_kv_heads: int | None = None) -> AttentionProjections:
        """The per-type QKV and output projections; ``num_kv_heads`` (default
        ``num_heads``) sets the width of K and V in the fused QKV (GQA)."""
        inner = self.inner_dim
        kv_inner = inner // self.num_heads * (num_kv_heads or self.num_heads)

        def untied(input_dim: int, output_dim: int) -> UntiedLinearConfig:
            geometry = LinearProjectionConfig(
                input_dim=input_dim, output_dim=output_dim, bias=self.bias, init_weights=self.init_weights
            )
            return UntiedLinearConfig(linear_projection=geometry, num_types=self.num_types)

        return AttentionProjections(
            qkv=untied(self.hidden_dim, inner + 2 * kv_inner), out=untied(inner, self.hidden_dim)
        )


class UntiedMLPConfig(StrictConfig):
    """An MLP with one set of weights per token type."""

    mlp: MLPConfig
    num_types: int = _NUM_TYPES


class UntiedTransformerBlockConfig(StrictConfig):
    """A transformer block with per-type attention projections and MLP."""

    transformer_block: TransformerBlockConfig
    num_types: int = _NUM_TYPES

    def attention_config(self) -> UntiedMixedAttentionConfig:
        return UntiedMixedAttentionConfig(
            **self.transformer_block.attention().model_dump(), num_types=self.num_types
        )

    def untied_mlp_config(self) -> UntiedMLPConfig:
        return UntiedMLPConfig(mlp=self.transformer_block.mlp(), num_types=self.num_types)


class UntiedPerceiverBlockConfig(StrictConfig):
    """A perceiver block with per-type Q/output projections and MLP; the K/V
    projection is shared (it reads one geometry encoding)."""

    perceiver_block_config: PerceiverBlockConfig
    num_types: int = _NUM_TYPES

    def untied_mlp_config(self) -> UntiedMLPConfig:
        return UntiedMLPConfig(mlp=self.perceiver_block_config.mlp(), num_types=self.num_types)


class AnchorAttentionConfig(MixedAttentionConfig):
    """Anchor attention over ``branches`` (e.g. ``["surface", "volume"]``); a
    branch's groups are the token groups whose ``TokenSpec.domain`` is the
    branch, and its anchors are the group ``branch + anchor_suffix``."""

    branches: list[str] = Field(min_length=1)
    anchor_suffix: str = "_anchors"

    @model_validator(mode="after")
    def _unique_branches(self) -> AnchorAttentionConfig:
        if len(set(self.branches)) != len(self.branches):
            raise ValueError(f"branches must be unique, got {self.branches}")
        return self


class SelfAnchorAttentionConfig(AnchorAttentionConfig):
    """Each branch attends to its own anchors."""


class CrossAnchorAttentionConfig(AnchorAttentionConfig):
    """Each branch attends to the anchors of all other branches."""

    @model_validator(mode="after")
    def _two_branches(self) -> CrossAnchorAttentionConfig:
        if len(self.branches) < 2:
            raise ValueError(f"cross-anchor attention needs at least two branches, got {self.branches}")
        return self


class JointAnchorAttentionConfig(AnchorAttentionConfig):
    """All tokens attend to the anchors of every branch."""
