"""Pieces every executor shares: gathering segments, one attention call, and
putting call outputs back in input order.

Tensors are token-major, ``[B, N, H, D]``: a group's tokens are a slice along
dim 1 whatever the head layout, and the fused QKV projection yields this
layout without a copy.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

from patternc.nn.schedule import Schedule, Segment

__all__ = ["Executor", "assemble", "attend", "gather", "gather_mask"]


class Executor(Protocol):
    """Runs a schedule: ``q``/``k``/``v`` are ``[B, N, H, D]`` for the input
    tokens, ``cache`` maps cached groups to ``[B, n, H, D]`` keys and values,
    ``key_padding_mask`` is ``[B, N]`` (True = real token) or None. Returns
    ``[B, N, H, D]``."""

    def __call__(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        schedule: Schedule,
        cache: Mapping[str, tuple[Tensor, Tensor]],
        key_padding_mask: Tensor | None,
        dropout_p: float,
        scale: float | None,
    ) -> Tensor: ...


def gather(t: Tensor, segments: Sequence[Segment], cache: Mapping[str, Tensor]) -> Tensor:
    """The tokens of ``segments`` along dim 1: a view for one input segment,
    else one concatenation."""
    parts = [t[:, s.start : s.stop] if s.cached is None else cache[s.cached] for s in segments]
    if len(parts) == 1:
        return parts[0]
    if not parts:
        return t[:, :0]
    return torch.cat(parts, dim=1)


def gather_mask(mask: Tensor | None, segments: Sequence[Segment]) -> Tensor | None:
    """Key padding for ``segments`` (cached keys are never padding)."""
    if mask is None:
        return None
    return gather(mask, [s for s in segments if s.cached is None], {})


def attend(
    q: Tensor, k: Tensor, v: Tensor, kv_mask: Tensor | None, dropout_p: float, scale: float | None
) -> Tensor:
    """Scaled dot-product attention on ``[b, L, H, D]`` tensors.

    ``kv_mask`` is ``[b, Lkv]`` (True = attend). A query whose keys are all
    padding, or a call with no keys at all, yields zeros rather than NaN.
    """
    if k.shape[1] == 0:
        return torch.zeros_like(q)
    attn_mask = None
    keep = None
    if kv_mask is not None:
        keep = kv_mask.any(dim=-1)  # [b]; no host sync
        attn_mask = (kv_mask | ~keep[:, None])[:, None, None, :]
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2),
        k.transpose(1, 2),
        v.transpose(1, 2),
        attn_mask=attn_mask,
        dropout_p=dropout_p,
        scale=scale,
    ).transpose(1, 2)
    if keep is not None:
        out = out * keep[:, None, None, None].to(out.dtype)
    return out


def assemble(outputs: Sequence[Tensor | None], schedule: Schedule, like: Tensor) -> Tensor:
    """Call outputs -> ``[B, N, H, D]`` in input order (one concatenation)."""
    pieces = []
    for call, start, stop in schedule.output_order:
        out = outputs[call]
        assert out is not None
        pieces.append(out[:, start:stop])
    if not pieces:
        return like[:, :0]
    if len(pieces) == 1:
        return pieces[0]
    return torch.cat(pieces, dim=1)
