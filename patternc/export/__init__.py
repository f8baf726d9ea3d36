"""A plan in other formats: patternc's JSON and Graphviz, and the mask formats of other engines.

Each export reads one :class:`~patternc.lower.layout.Layout` (a plan at sizes)
and is exact: a format that cannot say a plan raises
:class:`NotExpressible` with the reason instead of approximating it.

- :func:`magi_slices`: MagiAttention ``(q_range, k_range, mask type)`` slices;
- :func:`flashmask_bounds`: FlashMask column-wise masked row bounds;
- :func:`varlen_launches`: ``cu_seqlens``, token permutation and window per
  launch for FlashAttention varlen / ``torch.nn.attention.varlen``;
- :func:`xformers_mask`: the xformers block-diagonal ``attn_bias`` that says it;
- :func:`flex_mask_mod`, :func:`flex_block_mask`, :func:`flex_alibi_score_mod`:
  FlexAttention's objects (these import torch);
- :func:`to_json`, :func:`to_dot` (and :func:`plan_dict`, :func:`dot`): the
  plan's JSON (docs/plan-format.md) and Graphviz.

``patternc compile FILE --sizes ... --format magi|flashmask|varlen|xformers|flex``
prints the first four (and flex's tables) as JSON, without importing torch.
"""

from __future__ import annotations

from typing import Any

from patternc.export.flashmask import FlashMaskBounds, flashmask_bounds
from patternc.export.magi import MagiSlice, magi_slices
from patternc.export.plan import (
    JSON_SCHEMA_VERSION,
    dot,
    layout_dict,
    plan_dict,
    program_dict,
    to_dot,
    to_json,
)
from patternc.export.xformers import XformersMask, xformers_mask
from patternc.lower.pairs import GroupPair, NotExpressible, group_pairs
from patternc.lower.varlen import VarlenLaunch, varlen_launches, varlen_window

__all__ = [
    "JSON_SCHEMA_VERSION",
    "FlashMaskBounds",
    "GroupPair",
    "MagiSlice",
    "NotExpressible",
    "VarlenLaunch",
    "XformersMask",
    "dot",
    "flashmask_bounds",
    "flex_alibi_score_mod",
    "flex_block_mask",
    "flex_mask_mod",
    "group_pairs",
    "layout_dict",
    "magi_slices",
    "plan_dict",
    "program_dict",
    "to_dot",
    "to_json",
    "varlen_launches",
    "varlen_window",
    "xformers_mask",
]


def __getattr__(name: str) -> Any:
    # FlexAttention's objects need torch: imported only when asked for
    if name in ("flex_mask_mod", "flex_block_mask", "flex_alibi_score_mod", "padded_length"):
        from patternc.export import flex

        return getattr(flex, name)
    raise AttributeError(name)
