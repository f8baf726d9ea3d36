"""The peer's initialisations (``noether.modeling.functional.init``)."""

from __future__ import annotations

import torch
from torch import nn

from patternc.compat.noether.refusals import PeerRefusal

__all__ = ["apply_init_method", "init_bias_to_zero", "init_trunc_normal_zero_bias"]

_LAYERS = (
    nn.Linear,
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.ConvTranspose1d,
    nn.ConvTranspose2d,
    nn.ConvTranspose3d,
)


def init_bias_to_zero(layer_module: nn.Module) -> None:
    """Zero the bias of a linear or convolution layer (others are left alone)."""
    if isinstance(layer_module, _LAYERS) and layer_module.bias is not None:
        nn.init.zeros_(layer_module.bias)


def init_trunc_normal_zero_bias(layer_module: nn.Module, std: float = 0.02) -> None:
    """Normal weights of std ``std`` cut at ±2 (``trunc_normal_``'s default, so
    practically uncut at std 0.02) and a zero bias, for linear and convolution layers."""
    if isinstance(layer_module, _LAYERS):
        nn.init.trunc_normal_(layer_module.weight, std=std)
        init_bias_to_zero(layer_module)


def apply_init_method(module: nn.Module, proj_weight: torch.Tensor, init_method: str) -> None:
    """Initialise every linear layer of ``module`` by ``init_method``;
    ``"truncnormal002-identity"`` also zeros ``proj_weight`` (the output
    projection), so the attention branch starts at zero.

    Raises:
        PeerRefusal: a mode attention does not know (``"zeros"``,
            ``"torchs"``); a ``NotImplementedError``, as the peer raises.
    """
    if init_method == "torch":
        return
    if init_method in ("truncnormal", "truncnormal002", "truncnormal002-identity"):
        module.apply(init_trunc_normal_zero_bias)
        if init_method == "truncnormal002-identity":
            nn.init.zeros_(proj_weight)
        return
    raise PeerRefusal(f"Weight initialization method {init_method} not implemented for DotProductAttention")
