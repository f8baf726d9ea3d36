"""The allowed (query, key) pairs of a layout, as the other engines' formats need them.

Every format below is read from one list: the (query group, key group) pairs
of each call, at their offsets in the input, with the pair's modifiers. Within
a pair, query row ``i`` (position within its group) sees the keys
``[lo(i), hi(i))`` (:func:`row_keys`), and key column ``j`` is seen by the
queries ``[lo(j), hi(j))`` (:func:`column_queries`): always one interval, so
every format can be built exactly or refused with its reason.
"""

from __future__ import annotations

from dataclasses import dataclass

from patternc.lower.layout import Layout
from patternc.modifiers import Modifiers

__all__ = ["GroupPair", "NotExpressible", "column_queries", "group_pairs", "row_keys"]


class NotExpressible(ValueError):
    """A plan (at these sizes) that a format cannot say; the message says why."""


@dataclass(frozen=True, slots=True)
class GroupPair:
    """Queries ``[q_start, q_start + q_len)`` of the input attend to keys
    ``[k_start, k_start + k_len)`` under ``modifiers`` (positions within groups)."""

    call: int
    q_group: str
    k_group: str
    q_start: int
    q_len: int
    k_start: int
    k_len: int
    modifiers: Modifiers


def group_pairs(layout: Layout) -> list[GroupPair]:
    """Every non-empty (query group, key group) pair of the layout, call by call.
    Cached groups have no place in the input, so a layout with one is refused."""
    if layout.cached_groups:
        raise NotExpressible(
            f"groups {list(layout.cached_groups)} come from a KV cache (size None); export the plan "
            "at sizes with every group in the input"
        )
    slots = {s.name: s for s in layout.slots}
    out = []
    for call in layout.calls:
        for q in call.query_tokens:
            qs = slots[q]
            if not qs.size:
                continue
            for key in call.attention.keys:
                ks = slots[key.name]
                if ks.size:
                    out.append(
                        GroupPair(
                            call.index, q, key.name, qs.offset, qs.size, ks.offset, ks.size, key.modifiers
                        )
                    )
    return out


def row_keys(i: int, n_keys: int, mods: Modifiers) -> tuple[int, int]:
    """Keys ``[lo, hi)`` (within the key group) that query ``i`` sees; empty as ``lo >= hi``."""
    lo, hi = 0, n_keys
    if mods.causal:
        hi = min(hi, i + 1)
    if mods.window is not None:
        lo = max(lo, i - mods.window + 1)
        if not mods.causal:
            hi = min(hi, i + mods.window)
    return lo, hi


def column_queries(j: int, n_queries: int, mods: Modifiers) -> tuple[int, int]:
    """Queries ``[lo, hi)`` (within the query group) that see key ``j``."""
    lo, hi = 0, n_queries
    if mods.causal:
        lo = max(lo, j)
    if mods.window is not None:
        hi = min(hi, j + mods.window)
        if not mods.causal:
            lo = max(lo, j - mods.window + 1)
    return lo, hi
