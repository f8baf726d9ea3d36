"""The peer's activation enum (``noether.modeling.modules.activations``)."""

from __future__ import annotations

from enum import Enum

from torch import nn

__all__ = ["Activation"]


class Activation(Enum):
    """Activation modules by the peer's names: ``Activation["GELU"].build()``."""

    GELU = nn.GELU
    TANH = nn.Tanh
    SIGMOID = nn.Sigmoid
    RELU = nn.ReLU
    LEAKY_RELU = nn.LeakyReLU
    SOFTPLUS = nn.Softplus
    ELU = nn.ELU
    SILU = nn.SiLU

    def build(self) -> nn.Module:
        """A new instance of the activation."""
        module: nn.Module = self.value()
        return module
