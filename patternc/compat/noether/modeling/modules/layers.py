"""The peer's small layers (``noether.modeling.modules.layers``): ``LayerScale``
(parameter ``gamma``), ``LinearProjection`` (submodule ``project``) and
``UnquantizedDropPath``."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from patternc.compat.noether.core.schemas.modules.layers import (
    LayerScaleConfig,
    LinearProjectionConfig,
    RopeFrequencyConfig,
    UnquantizedDropPathConfig,
)
from patternc.compat.noether.modeling.functional.init import init_trunc_normal_zero_bias
from patternc.compat.noether.refusals import PeerRefusal

__all__ = ["LayerScale", "LinearProjection", "RopeFrequency", "UnquantizedDropPath"]


class LayerScale(nn.Module):
    """``x * gamma`` with ``gamma`` ``[hidden_dim]`` starting at ``init_values``;
    the identity when that is None."""

    def __init__(self, config: LayerScaleConfig) -> None:
        super().__init__()
        self.gamma: nn.Parameter | None = None
        if config.init_values is not None:
            self.gamma = nn.Parameter(torch.full((config.hidden_dim,), config.init_values))

    def forward(self, x: Tensor) -> Tensor:
        return x if self.gamma is None else x * self.gamma


class LinearProjection(nn.Module):
    """A linear layer (``ndim=None``) or a 1x1 convolution (``ndim`` 1-3) in ``project``;
    the identity when ``optional`` and the dimensions agree."""

    def __init__(self, config: LinearProjectionConfig) -> None:
        super().__init__()
        self.init_weights = config.init_weights
        self.project: nn.Module
        if config.optional and config.input_dim == config.output_dim:
            self.project = nn.Identity()
        elif config.ndim is None:
            self.project = nn.Linear(config.input_dim, config.output_dim, bias=config.bias)
        else:
            conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[config.ndim]
            self.project = conv(config.input_dim, config.output_dim, kernel_size=1, bias=config.bias)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """``torch``: PyTorch's defaults; ``truncnormal``/``truncnormal002``: std 0.02, zero bias;
        ``zeros``: zeros. Other modes raise
        :class:`~patternc.compat.noether.refusals.PeerRefusal` (a
        ``NotImplementedError``, as in the peer)."""
        if self.init_weights == "torch":
            return
        if self.init_weights in ("truncnormal", "truncnormal002"):
            init_trunc_normal_zero_bias(self.project)
        elif self.init_weights == "zeros":
            for p in self.project.parameters():
                nn.init.zeros_(p)
        else:
            raise PeerRefusal(
                f"Initialization method {self.init_weights!r} not implemented for LinearProjection."
            )

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = self.project(x)
        return out


class UnquantizedDropPath(nn.Module):
    """Stochastic depth per sample: in training, each sample's branch is zeroed
    with probability ``drop_prob`` (and the kept ones scaled by ``1 / keep``)."""

    def __init__(self, config: UnquantizedDropPathConfig) -> None:
        super().__init__()
        self.drop_prob = config.drop_prob
        self.scale_by_keep = config.scale_by_keep

    @property
    def keep_prob(self) -> float:
        return 1 - self.drop_prob

    def forward(self, x: Tensor) -> Tensor:
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(self.keep_prob)
        if self.keep_prob > 0.0 and self.scale_by_keep:
            keep.div_(self.keep_prob)
        return x * keep

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob:0.2f}"


class RopeFrequency(nn.Module):
    """RoPE frequencies of ``input_dim``-D coordinates for heads of
    ``hidden_dim`` channels, laid out as the peer lays them out: each
    coordinate gets the same ``(hidden_dim - padding) // input_dim // 2``
    frequencies (``1 / max_wavelength ** (2i / d)``), coordinate after
    coordinate, then zero angles (no rotation) for channels that do not divide
    evenly. ``forward(coords [..., input_dim])`` returns, with
    ``implementation="complex"``, ``[..., hidden_dim // 2]`` complex (what the
    attention modules of this package and patternc's take); with ``"real"``,
    the peer's legacy tuple of one ``[..., N, 2k]`` angle tensor per
    coordinate, which only :func:`~patternc.compat.noether.modeling.functional.rope.rope`
    (and so ``DotProductAttention`` and ``PerceiverAttention``) reads."""

    omega: Tensor

    def __init__(self, config: RopeFrequencyConfig) -> None:
        super().__init__()
        self.hidden_dim = config.hidden_dim
        self.input_dim = config.input_dim
        self.implementation = config.implementation
        self.max_wavelength = config.max_wavelength
        self.ndim_padding = config.hidden_dim % config.input_dim
        per_axis = (config.hidden_dim - self.ndim_padding) // config.input_dim
        self.sincos_padding = per_axis % 2
        self.padding = self.ndim_padding + self.sincos_padding * config.input_dim
        wave = (config.hidden_dim - self.padding) // config.input_dim
        if wave <= 0:
            raise ValueError(f"Effective hidden dimension per wave must be > 0. Got {wave}.")
        exponents = torch.arange(0, wave, 2, dtype=torch.float) / wave
        self.register_buffer("omega", 1.0 / config.max_wavelength**exponents)

    def forward(self, coords: Tensor) -> Tensor | tuple[Tensor, ...]:
        if coords.shape[-1] != self.input_dim:
            raise ValueError(
                f"coords have {coords.shape[-1]} coordinates; this RopeFrequency takes {self.input_dim}"
            )
        with torch.autocast(device_type=coords.device.type, enabled=False):
            angles = coords.float().unsqueeze(-1) @ self.omega.unsqueeze(0)  # [..., input_dim, k]
        if self.implementation == "real":
            if coords.ndim not in (2, 3):
                raise PeerRefusal("real RoPE frequencies take coords [N, C] or [B, N, C]")
            return torch.cat([angles, angles], dim=-1).unbind(-2)
        angles = angles.flatten(-2)
        if self.padding:
            angles = torch.cat([angles, angles.new_zeros(*angles.shape[:-1], self.padding // 2)], dim=-1)
        return torch.polar(torch.ones_like(angles), angles)
