"""The peer's MLP configs (``noether.core.schemas.modules.mlp``)."""

from __future__ import annotations

from pydantic import BaseModel, Field, model_validator

from patternc.compat.noether.core.types import ActivationTypes, InitWeightsMode

__all__ = ["MLPConfig", "UpActDownMLPConfig"]


class MLPConfig(BaseModel):
    """``input -> hidden -> [hidden] * num_layers -> output`` with ``activation`` between."""

    input_dim: int = Field(..., ge=1)
    output_dim: int = Field(..., ge=1)
    hidden_dim: int = Field(..., ge=1)
    num_layers: int = Field(0, ge=0)
    activation: ActivationTypes = "GELU"
    init_weights: InitWeightsMode = "truncnormal002"


class UpActDownMLPConfig(BaseModel):
    """``fc1`` up to ``hidden_dim``, GELU, ``fc2`` back to ``input_dim``."""

    input_dim: int = Field(..., ge=1)
    hidden_dim: int = Field(..., ge=2)
    bias: bool = True
    init_weights: InitWeightsMode = "truncnormal002"

    @model_validator(mode="after")
    def check_dims(self) -> UpActDownMLPConfig:
        if not self.hidden_dim > self.input_dim:
            raise ValueError(
                "hidden_dim should be greater than input_dim, otherwise it is not an up-projection"
            )
        return self
