"""The allowed (query, key) pairs of a layout, as the other engines' formats need them.

Every format below is read from one list: the (query group, key group) pairs
of each call, at their offsets in the input, with the pair's modifiers. Within
a pair, query row ``i`` (position within its group) sees the keys
``[lo(i), hi(i))`` (:func:`row_keys`), and key column ``j`` is seen by the
queries ``[lo(j), hi(j))`` (:func:`column_queries`): one interval for every
band without ``dilate`` (a dilated band is refused here with its reason), so
every format can be built exactly or refused with its reason.
"""

from __future__ import annotations

from dataclasses import dataclass

from patternc.lower.layout import Layout
from patternc.modifiers import Band, Modifiers, pair_band

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

    @property
    def shift(self) -> int:
        """The key group's offset minus the query group's: what ``across`` shifts the band by."""
        return self.k_start - self.q_start


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


def _interval_band(mods: Modifiers, shift: int) -> Band:
    if mods.grid is not None:
        raise NotExpressible(
            f"{mods.text()} reads a box of coordinates on the shape {list(mods.grid.shape)}: the keys a "
            "query sees are no single interval"
        )
    band = pair_band(mods, shift)
    if band.dilation > 1:
        raise NotExpressible(
            f"{mods.text()} keeps every {band.dilation}th key: the keys a query sees are no single interval"
        )
    return band


def row_keys(i: int, n_keys: int, mods: Modifiers, shift: int = 0) -> tuple[int, int]:
    """Keys ``[lo, hi)`` (within the key group) that query ``i`` sees; empty as ``lo >= hi``.
    ``shift``: the key group's offset minus the query group's (it counts under ``across``).

    Raises:
        NotExpressible: ``dilate`` or a neighbourhood: the keys are no interval.
    """
    band = _interval_band(mods, shift)
    lo = 0 if band.low is None else max(0, i + band.low)
    hi = n_keys if band.high is None else min(n_keys, i + band.high + 1)
    return lo, hi


def column_queries(j: int, n_queries: int, mods: Modifiers, shift: int = 0) -> tuple[int, int]:
    """Queries ``[lo, hi)`` (within the query group) that see key ``j``
    (``shift`` as in :func:`row_keys`).

    Raises:
        NotExpressible: ``dilate`` or a neighbourhood: the queries are no interval.
    """
    band = _interval_band(mods, shift)
    lo = 0 if band.high is None else max(0, j - band.high)
    hi = n_queries if band.low is None else min(n_queries, j - band.low + 1)
    return lo, hi
