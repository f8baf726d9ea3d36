"""The peer's layer configs (``noether.core.schemas.modules.layers``)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field, model_validator

from patternc.compat.noether.core.types import InitWeightsMode

__all__ = ["LayerScaleConfig", "LinearProjectionConfig", "RopeFrequencyConfig", "UnquantizedDropPathConfig"]


class LinearProjectionConfig(BaseModel):
    """A linear layer ``input_dim -> output_dim`` (``ndim`` 1-3: a 1x1 convolution)."""

    input_dim: int
    output_dim: int
    ndim: int | None = None
    bias: bool = True
    optional: bool = False
    init_weights: InitWeightsMode = "torch"

    @model_validator(mode="after")
    def validate_ndim(self) -> LinearProjectionConfig:
        if self.ndim is not None and self.ndim not in (1, 2, 3):
            raise ValueError("ndim must be either None, 1, 2, or 3.")
        return self


class LayerScaleConfig(BaseModel):
    """Per-channel branch scale starting at ``init_values`` (None: off)."""

    hidden_dim: int
    init_values: float | None = 1e-5


class UnquantizedDropPathConfig(BaseModel):
    """Stochastic depth: drop a sample's branch with probability ``drop_prob``."""

    drop_prob: float = Field(0.0, ge=0.0, le=1.0)
    scale_by_keep: bool = True


class RopeFrequencyConfig(BaseModel):
    """RoPE frequencies of ``input_dim``-D coordinates for heads of ``hidden_dim``."""

    hidden_dim: int
    input_dim: int
    max_wavelength: int = 10000
    implementation: Literal["real", "complex"] = "real"
