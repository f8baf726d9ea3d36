"""FlexAttention: the plan's ``mask_mod``, ALiBi ``score_mod`` and ready ``BlockMask``.

These are the objects the ``flex`` executor runs with, built by the analytic
block-mask builder (no ``create_block_mask`` pass over every block). Indices
run over the input's tokens padded up to a multiple of ``block_size``
(:func:`padded_length`): pad ``q``/``k``/``v`` to it; padding tokens are
allowed nowhere.

>>> import patternc, torch
>>> plan = patternc.compile("groups doc*\\ndoc* -> self [causal]").patterns["default"]
>>> layout = plan.layout({"doc0": 3, "doc1": 2})
>>> mask_mod = flex_mask_mod(layout)
>>> i = torch.arange(5)
>>> mask_mod(0, 0, i[:, None], i[None, :]).int().tolist()[4]
[0, 0, 0, 1, 1]
"""

from __future__ import annotations

from typing import Any

from patternc.lower.layout import Layout

__all__ = ["flex_alibi_score_mod", "flex_block_mask", "flex_mask_mod", "padded_length"]


def _tables(layout: Layout, device: Any, block_size: int, positions: bool = False) -> Any:
    from patternc.nn.flexmask import FlexTables

    return FlexTables.build(layout, {}, device, block_size, positions)


def padded_length(layout: Layout, block_size: int = 128) -> int:
    """The sequence length the mask and block mask cover."""
    from patternc.nn.flexmask import bucket_length

    return bucket_length(layout.n_tokens, block_size)


def flex_mask_mod(layout: Layout, device: Any = "cpu", block_size: int = 128) -> Any:
    """``mask_mod(b, h, q_idx, kv_idx) -> bool``: group table lookup, then the
    modifiers on positions within groups (tensors on ``device``)."""
    return _tables(layout, device, block_size).mask_mod()


def flex_alibi_score_mod(layout: Layout, slopes: Any, device: Any = "cpu", block_size: int = 128) -> Any:
    """``score_mod`` adding ALiBi's ``-slopes[h] * |i - j|`` (positions within groups)."""
    return _tables(layout, device, block_size, positions=True).alibi_score_mod(slopes)


def flex_block_mask(layout: Layout, device: Any = "cpu", block_size: int = 128) -> Any:
    """The ``BlockMask`` (full blocks skip the ``mask_mod``) for ``flex_attention``."""
    return _tables(layout, device, block_size).block_mask()
