"""RoPE in the peer's head-major layout (``noether.modeling.functional.rope``)."""

from __future__ import annotations

import torch
from torch import Tensor

from patternc.nn.rope import apply_rope

__all__ = ["rope"]


def _rotate_half(x: Tensor) -> Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat([-second, first], dim=-1)


def rope(x: Tensor, freqs: Tensor | tuple[Tensor, ...]) -> Tensor:
    """Rotate ``x`` (``[batch, heads, tokens, head_dim]``) by ``freqs``: complex
    ``[batch, tokens, head_dim // 2]`` (patternc's :func:`~patternc.nn.apply_rope`),
    or the peer's legacy tuple of real angles (``RopeFrequency`` with
    ``implementation="real"``), one ``[batch, tokens, 2k]`` tensor per
    coordinate: each rotates a ``2k``-channel chunk by halves, the channels
    after the last chunk pass unrotated."""
    if not isinstance(freqs, tuple):
        return apply_rope(x.transpose(1, 2), freqs).transpose(1, 2)
    width = freqs[0].shape[-1]
    if width * len(freqs) > x.shape[-1]:
        raise ValueError(
            f"RoPE frequencies cover {width * len(freqs)} channels but the heads have {x.shape[-1]}: "
            "build the frequencies with the head dimension"
        )
    chunks = torch.split(x, width, dim=-1)
    rotated = [
        chunk * angle.unsqueeze(1).cos() + _rotate_half(chunk) * angle.unsqueeze(1).sin()
        for chunk, angle in zip(chunks, freqs)
    ]
    return torch.cat([*rotated, *chunks[len(freqs) :]], dim=-1)
