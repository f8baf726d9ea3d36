"""adaLN modulation as the peer writes it (``noether.modeling.functional.modulation``)."""

from __future__ import annotations

from torch import Tensor

__all__ = ["modulate_gate", "modulate_scale_shift"]


def modulate_scale_shift(x: Tensor, scale: Tensor, shift: Tensor) -> Tensor:
    """``x * (1 + scale) + shift``; ``scale`` and ``shift`` ``[B, D]`` broadcast
    over the tokens of a 3-D ``x``."""
    if x.ndim == 3:
        scale, shift = scale.unsqueeze(1), shift.unsqueeze(1)
    return x * (1 + scale) + shift


def modulate_gate(x: Tensor, gate: Tensor) -> Tensor:
    """``gate * x``: a zero gate closes the branch (adaLN-Zero); ``gate``
    ``[B, D]`` broadcasts over the tokens."""
    if x.ndim == 3:
        gate = gate.unsqueeze(1)
    return gate * x
