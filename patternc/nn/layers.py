"""Tied layers: ``LinearProjection`` and ``MLP``; and the small pieces blocks
share (``LayerScale``, ``DropPath``)."""

from __future__ import annotations

import itertools

import torch
from torch import Tensor, nn

from patternc.configs import Activation, LinearProjectionConfig, MLPConfig
from patternc.nn.attention import init_linear

__all__ = ["MLP", "DropPath", "LayerScale", "LinearProjection", "activation_fn"]

_ACTIVATIONS: dict[str, type[nn.Module]] = {
    "gelu": nn.GELU,
    "relu": nn.ReLU,
    "silu": nn.SiLU,
    "tanh": nn.Tanh,
}


def activation_fn(name: Activation) -> nn.Module:
    return _ACTIVATIONS[name]()


class LinearProjection(nn.Linear):
    """``nn.Linear`` built from a :class:`~patternc.configs.LinearProjectionConfig`."""

    def __init__(self, config: LinearProjectionConfig) -> None:
        super().__init__(config.input_dim, config.output_dim, bias=config.bias)
        self.config = config
        init_linear(self, config.init_weights)


class MLP(nn.Module):
    """``input -> [hidden] * (num_layers + 1) -> output`` with activations between.
    ``init_weights="zero"`` starts the last layer at zero."""

    def __init__(self, config: MLPConfig) -> None:
        super().__init__()
        self.config = config
        dims = [config.input_dim] + [config.hidden_dim] * (config.num_layers + 1) + [config.output_dim]
        self.layers = nn.ModuleList(
            LinearProjection(
                LinearProjectionConfig(
                    input_dim=a, output_dim=b, bias=config.bias, init_weights=config.init_weights
                )
            )
            for a, b in itertools.pairwise(dims)
        )
        if config.init_weights == "zero":
            # the last layer starts at zero: a residual MLP branch starts closed
            last = self.layers[-1]
            assert isinstance(last, nn.Linear)
            init_linear(last, "zero", zero=True)
        self.activation = activation_fn(config.activation)

    def forward(self, x: Tensor) -> Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = self.activation(x)
        return x


class LayerScale(nn.Module):
    """Per-channel learnable scale of a residual branch (CaiT)."""

    def __init__(self, dim: int, init: float) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), init))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gamma


class DropPath(nn.Module):
    """Stochastic depth: drop a residual branch per sample while training."""

    def __init__(self, rate: float) -> None:
        super().__init__()
        self.rate = rate

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.rate == 0.0:
            return x
        keep = 1.0 - self.rate
        mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
        return x * mask / keep

    def extra_repr(self) -> str:
        return f"rate={self.rate}"
