"""The peer's block configs (``noether.core.schemas.modules.blocks``)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field, computed_field, model_validator

from patternc.compat.noether.core.schemas.modules.attention import PerceiverAttentionConfig
from patternc.compat.noether.core.schemas.modules.layers import (
    LayerScaleConfig,
    LinearProjectionConfig,
    UnquantizedDropPathConfig,
)
from patternc.compat.noether.core.schemas.modules.mlp import UpActDownMLPConfig
from patternc.compat.noether.core.types import InitWeightsMode

__all__ = ["PerceiverBlockConfig", "TransformerBlockConfig"]


class TransformerBlockConfig(BaseModel):
    """A pre-norm transformer block. ``attention_constructor`` names the
    attention (``"dot_product"``, ``"perceiver"``) or, set after construction
    as the peer's AB-UPT does, is an anchor-attention class whose extra
    arguments (``branches``) come from ``attention_arguments``."""

    hidden_dim: int = Field(..., ge=1)
    num_heads: int = Field(..., ge=1)
    mlp_hidden_dim: int | None = None
    mlp_expansion_factor: int | None = Field(None, ge=1)
    drop_path: float = Field(0.0, ge=0.0, le=1.0)
    attention_constructor: Literal["dot_product", "perceiver", "transolver", "transolver_plusplus"] = (
        "dot_product"
    )
    layerscale: float | None = Field(None, ge=0.0)
    condition_dim: int | None = None
    bias: bool = True
    eps: float = Field(1e-6, gt=0.0)
    init_weights: InitWeightsMode = "truncnormal002"
    use_rope: bool = False
    max_wavelength: int | None = 10_000
    attention_arguments: dict[str, Any] = {}

    @model_validator(mode="after")
    def set_mlp_hidden_dim(self) -> TransformerBlockConfig:
        if self.hidden_dim % self.num_heads != 0:
            raise ValueError(
                f"hidden_dim ({self.hidden_dim}) must be divisible by num_heads ({self.num_heads})."
            )
        if self.mlp_hidden_dim is None:
            if self.mlp_expansion_factor is None:
                raise ValueError("Either 'mlp_hidden_dim' or 'mlp_expansion_factor' must be provided.")
            self.mlp_hidden_dim = self.hidden_dim * self.mlp_expansion_factor
        return self

    @model_validator(mode="after")
    def set_wavelength_for_rope(self) -> TransformerBlockConfig:
        if self.use_rope and self.max_wavelength is None:
            raise ValueError("max_wavelength must be provided when use_rope is True.")
        return self

    @computed_field  # type: ignore[prop-decorator]
    @property
    def linear_projection_config(self) -> LinearProjectionConfig:
        return LinearProjectionConfig(
            input_dim=self.hidden_dim,
            output_dim=self.hidden_dim,
            bias=self.bias,
            init_weights=self.init_weights,
        )

    @computed_field  # type: ignore[prop-decorator]
    @property
    def layerscale_config(self) -> LayerScaleConfig:
        return LayerScaleConfig(hidden_dim=self.hidden_dim, init_values=self.layerscale)

    @computed_field  # type: ignore[prop-decorator]
    @property
    def drop_path_config(self) -> UnquantizedDropPathConfig:
        return UnquantizedDropPathConfig(drop_prob=self.drop_path)

    def _modulation_dim(self) -> int:
        """Scale, shift and gate of each of the two branches."""
        return self.hidden_dim * 6

    @computed_field  # type: ignore[prop-decorator]
    @property
    def modulation_linear_projection_config(self) -> LinearProjectionConfig | None:
        """``condition -> 6 * hidden_dim`` (scale, shift, gate of each branch;
        a perceiver block adds ``2 * kv_dim``, as its K/V input is modulated
        too), zero-initialised."""
        if self.condition_dim is None:
            return None
        return LinearProjectionConfig(
            input_dim=self.condition_dim, output_dim=self._modulation_dim(), init_weights="zeros"
        )

    @computed_field  # type: ignore[prop-decorator]
    @property
    def up_act_down_mlp_config(self) -> UpActDownMLPConfig:
        assert self.mlp_hidden_dim is not None  # set by the validator
        return UpActDownMLPConfig(
            input_dim=self.hidden_dim,
            hidden_dim=self.mlp_hidden_dim,
            bias=self.bias,
            init_weights=self.init_weights,
        )


class PerceiverBlockConfig(TransformerBlockConfig):
    """A perceiver block: queries from ``q``, keys/values from ``kv`` of width ``kv_dim``."""

    kv_dim: int | None = None

    @model_validator(mode="after")
    def set_kv_dim(self) -> PerceiverBlockConfig:
        if self.kv_dim is None:
            self.kv_dim = self.hidden_dim
        return self

    @computed_field  # type: ignore[prop-decorator]
    @property
    def perceiver_attention_config(self) -> PerceiverAttentionConfig:
        return PerceiverAttentionConfig(
            hidden_dim=self.hidden_dim,
            num_heads=self.num_heads,
            kv_dim=self.kv_dim,
            bias=self.bias,
            init_weights=self.init_weights,
            use_rope=self.use_rope,
            dropout=0.0,
        )

    def _modulation_dim(self) -> int:
        """The transformer block's six vectors, and scale and shift of the K/V input."""
        return self.hidden_dim * 6 + (self.kv_dim or self.hidden_dim) * 2
