"""The peer's untied configs (``noether.core.schemas.modules.untied``)."""

from __future__ import annotations

from pydantic import BaseModel, Field, computed_field

from patternc.compat.noether.core.schemas.modules.attention import MixedAttentionConfig
from patternc.compat.noether.core.schemas.modules.blocks import PerceiverBlockConfig, TransformerBlockConfig
from patternc.compat.noether.core.schemas.modules.layers import LinearProjectionConfig
from patternc.compat.noether.core.schemas.modules.mlp import MLPConfig

__all__ = [
    "UntiedLinearConfig",
    "UntiedMLPConfig",
    "UntiedMixedAttentionConfig",
    "UntiedPerceiverBlockConfig",
    "UntiedTransformerBlockConfig",
]


class UntiedLinearConfig(BaseModel):
    """One weight bank of ``linear_projection``'s geometry per token type."""

    num_types: int = Field(..., ge=1)
    linear_projection: LinearProjectionConfig


class UntiedMixedAttentionConfig(MixedAttentionConfig):
    """``MixedAttentionConfig`` with per-type Q, K, V and output projections."""

    num_types: int = Field(..., ge=1)

    @computed_field  # type: ignore[prop-decorator]
    @property
    def projection_config(self) -> UntiedLinearConfig:
        return UntiedLinearConfig(
            num_types=self.num_types,
            linear_projection=LinearProjectionConfig(
                input_dim=self.hidden_dim,
                output_dim=self.hidden_dim,
                bias=self.bias,
                init_weights=self.init_weights,
            ),
        )


class UntiedMLPConfig(BaseModel):
    """``MLPConfig``'s topology with one set of weights per token type (no biases' option: always biased)."""

    num_types: int = Field(..., ge=1)
    mlp: MLPConfig


def _block_mlp(num_types: int, hidden_dim: int, mlp_hidden_dim: int | None, init: str) -> UntiedMLPConfig:
    assert mlp_hidden_dim is not None  # set by the block config's validator
    return UntiedMLPConfig(
        num_types=num_types,
        mlp=MLPConfig(
            input_dim=hidden_dim,
            output_dim=hidden_dim,
            hidden_dim=mlp_hidden_dim,
            num_layers=0,
            activation="GELU",
            init_weights=init,  # type: ignore[arg-type]
        ),
    )


class UntiedTransformerBlockConfig(BaseModel):
    """A transformer block with per-type attention projections and MLP."""

    num_types: int = Field(..., ge=1)
    transformer_block: TransformerBlockConfig

    @computed_field  # type: ignore[prop-decorator]
    @property
    def attention_config(self) -> UntiedMixedAttentionConfig:
        block = self.transformer_block
        return UntiedMixedAttentionConfig(
            **block.model_dump(), **(block.attention_arguments or {}), num_types=self.num_types
        )

    @computed_field  # type: ignore[prop-decorator]
    @property
    def untied_mlp_config(self) -> UntiedMLPConfig:
        block = self.transformer_block
        return _block_mlp(self.num_types, block.hidden_dim, block.mlp_hidden_dim, block.init_weights)


class UntiedPerceiverBlockConfig(BaseModel):
    """A perceiver block with per-type Q/output projections and MLP; K/V shared."""

    num_types: int = Field(..., ge=1)
    perceiver_block_config: PerceiverBlockConfig

    @computed_field  # type: ignore[prop-decorator]
    @property
    def untied_mlp_config(self) -> UntiedMLPConfig:
        block = self.perceiver_block_config
        return _block_mlp(self.num_types, block.hidden_dim, block.mlp_hidden_dim, block.init_weights)
