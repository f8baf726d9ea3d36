"""Rotary position embeddings (RoPE) for token-major tensors ``[B, N, H, D]``.

Frequencies are complex, ``[N, D/2]`` or ``[B, N, D/2]`` (``torch.polar``
of a unit magnitude and the angle), as :func:`rope_frequencies` builds them.
Positions may be 1-D (sequences) or several coordinates per token (points in
space): the ``D/2`` rotation pairs are split evenly across the coordinates.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["apply_rope", "rope_frequencies"]


def rope_frequencies(positions: Tensor, head_dim: int, base: float = 10000.0) -> Tensor:
    """Complex RoPE frequencies for ``positions``.

    ``positions``: ``[N]`` or ``[B, N]`` (one coordinate), or ``[N, C]`` /
    ``[B, N, C]`` with ``C`` coordinates (``float`` ok). Returns
    ``[..., N, head_dim // 2]`` complex.

    >>> rope_frequencies(torch.arange(5), head_dim=8).shape
    torch.Size([5, 4])
    """
    if head_dim % 2:
        raise ValueError(f"RoPE needs an even head_dim, got {head_dim}")
    pairs = head_dim // 2
    # [N] -> one coordinate; [B, N] of integer positions -> one coordinate too.
    one_axis = positions.dim() == 1 or (positions.dim() == 2 and not positions.is_floating_point())
    coords = positions[..., None] if one_axis else positions
    n_coords = coords.shape[-1]
    if pairs % n_coords:
        raise ValueError(
            f"head_dim // 2 = {pairs} rotation pairs cannot be split evenly over {n_coords} coordinates; "
            f"use a head_dim that is a multiple of {2 * n_coords}"
        )
    per_coord = pairs // n_coords
    dtype = torch.float64 if coords.dtype == torch.float64 else torch.float32
    inv = base ** (-torch.arange(per_coord, dtype=dtype, device=coords.device) / per_coord)
    angles = (coords.to(dtype)[..., :, None] * inv).flatten(-2)  # [..., N, pairs]
    return torch.polar(torch.ones_like(angles), angles)


def apply_rope(x: Tensor, freqs: Tensor) -> Tensor:
    """Rotate ``x`` (``[B, N, H, D]``) by ``freqs`` (``[N, D/2]`` or ``[B, N, D/2]``, complex)."""
    if not freqs.is_complex():
        raise TypeError("RoPE frequencies must be complex (see patternc.nn.rope_frequencies)")
    n, d = x.shape[1], x.shape[-1]
    if freqs.shape[-2:] != (n, d // 2):
        raise ValueError(
            f"RoPE frequencies have shape {tuple(freqs.shape)}; expected [..., {n}, {d // 2}] "
            f"for {n} input tokens and head_dim {d} (frequencies cover input tokens only)"
        )
    real = freqs.real.to(x.dtype)
    imag = freqs.imag.to(x.dtype)
    if freqs.dim() == 2:
        real, imag = real[None], imag[None]
    real, imag = real[:, :, None, :], imag[:, :, None, :]  # [B, N, 1, D/2]
    even, odd = x[..., 0::2], x[..., 1::2]
    return torch.stack((even * real - odd * imag, even * imag + odd * real), dim=-1).flatten(-2)
