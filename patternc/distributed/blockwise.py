"""Attention over key blocks, merged by their log-sum-exp.

Under a placement a rank's queries see keys in pieces: a ring step's
block, the gathered keys, a cached group. :func:`partial_attention` attends
to one piece and returns its output with the log-sum-exp of its scores;
:func:`merge_partials` combines pieces into the softmax over all of them.
Masks come from :func:`pair_mask`: each token's group and its *global*
position within the group, so ``[causal]`` and ``[window N]`` mean what they
mean on one device wherever the tokens sit.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["merge_partials", "pair_mask", "partial_attention"]


def pair_mask(
    q_pos: Tensor,
    q_group: Tensor,
    k_pos: Tensor,
    k_group: Tensor,
    band: tuple[Tensor, Tensor, Tensor, Tensor],
) -> Tensor:
    """``[Lq, Lk]`` bool: allowed pairs. ``band`` is the ``low``, ``high``,
    ``dilation`` and ``residue`` ``[qg, kg]`` tables of each (query group, key
    group) pair's :class:`~patternc.modifiers.Band` (positions within groups)."""
    low, high, dilation, residue = (table[q_group][:, k_group] for table in band)
    d = k_pos[None, :] - q_pos[:, None]
    return (d >= low) & (d <= high) & ((d - residue) % dilation == 0)


def partial_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    allowed: Tensor | None,
    bias: Tensor | None,
    scale: float,
    dropout_p: float,
) -> tuple[Tensor, Tensor]:
    """Softmax attention of ``q`` ``[B, Lq, H, D]`` to one key block
    ``k``/``v`` ``[B, Lk, H, D]``: the block-normalised output ``[B, Lq, H, D]``
    and the log-sum-exp ``[B, H, Lq]`` of the allowed scores (``-inf`` for a
    query that sees no key of the block). ``allowed``: ``[Lq, Lk]`` or
    ``[B, Lq, Lk]``; ``bias``: additive, broadcast to ``[B, H, Lq, Lk]``."""
    work = torch.promote_types(q.dtype, torch.float32)
    scores = torch.einsum("bqhd,bkhd->bhqk", q.to(work), k.to(work)) * scale
    if bias is not None:
        scores = scores + bias
    if allowed is not None:
        mask = allowed[:, None] if allowed.dim() == 3 else allowed
        scores = scores.masked_fill(~mask, float("-inf"))
    # rows with no allowed key: a logsumexp of all -inf has a NaN gradient,
    # so it runs on zeros there and the row is marked -inf afterwards
    seen = torch.isfinite(scores).any(dim=-1)
    lse = torch.logsumexp(scores.masked_fill(~seen[..., None], 0.0), dim=-1)
    probs = torch.exp(scores - lse[..., None])
    lse = lse.masked_fill(~seen, float("-inf"))
    if dropout_p > 0:
        probs = F.dropout(probs, dropout_p)
    out = torch.einsum("bhqk,bkhd->bqhd", probs, v.to(work))
    return out.to(q.dtype), lse


def merge_partials(parts: Sequence[tuple[Tensor, Tensor]]) -> Tensor:
    """One softmax over every block: each block's output weighted by
    ``exp(lse_block - lse_all)``; queries that see no key at all give zeros
    (as the single-device executors do)."""
    if len(parts) == 1:
        out, lse = parts[0]
        return torch.where(torch.isfinite(lse).transpose(1, 2)[..., None], out, torch.zeros_like(out))
    lses = torch.stack([lse for _, lse in parts])
    seen = torch.isfinite(lses).any(dim=0)
    safe = torch.logsumexp(lses.masked_fill(~seen, 0.0), dim=0).masked_fill(~seen, 0.0)
    merged = None
    for out, lse in parts:
        weight = torch.exp(lse - safe).transpose(1, 2)[..., None]  # [B, Lq, H, 1]; 0 where lse is -inf
        term = out.to(weight.dtype) * weight
        merged = term if merged is None else merged + term
    assert merged is not None
    return merged.to(parts[0][0].dtype)
