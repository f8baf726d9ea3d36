"""FlashMask: for every key column, the query rows it is hidden from.

FlashMask describes a mask column by column with at most two masked row
intervals: one at or below the diagonal (``LTS <= i < LTE``, rows ``i >= j``)
and one above it (``UTS <= i < UTE``, rows ``i < j``). In a plan, the rows that
see key ``j`` are one interval per (query group, key group) pair, so a
column's masked rows are the complement of a few intervals: exported where
each half is one interval, refused (naming the column) where it is not.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from patternc.lower.layout import Layout
from patternc.lower.pairs import NotExpressible, column_queries, group_pairs
from patternc.ranges import merge_ranges

__all__ = ["FlashMaskBounds", "flashmask_bounds"]


@dataclass(frozen=True)
class FlashMaskBounds:
    """Per key column ``j``: rows ``[lts[j], lte[j])`` and ``[uts[j], ute[j])`` are masked.

    ``causal``: every row above the diagonal is masked (``uts = 0``, ``ute = j``),
    so FlashMask's causal mode with ``lts``/``lte`` alone says the same."""

    n_tokens: int
    lts: tuple[int, ...]
    lte: tuple[int, ...]
    uts: tuple[int, ...]
    ute: tuple[int, ...]
    causal: bool

    def to_dict(self) -> dict[str, Any]:
        return {
            "n_tokens": self.n_tokens,
            "causal": self.causal,
            "LTS": list(self.lts),
            "LTE": list(self.lte),
            "UTS": list(self.uts),
            "UTE": list(self.ute),
        }


def _one_masked_interval(allowed: list[tuple[int, int]], lo: int, hi: int) -> tuple[int, int] | None:
    """The rows of ``[lo, hi)`` outside ``allowed`` (sorted, merged) as one
    interval (``(lo, lo)`` for none), or None when they are several."""
    gaps = []
    at = lo
    for a, b in allowed:
        a, b = max(a, lo), min(b, hi)
        if a >= b:
            continue
        if a > at:
            gaps.append((at, a))
        at = max(at, b)
    if at < hi:
        gaps.append((at, hi))
    if len(gaps) > 1:
        return None
    return gaps[0] if gaps else (lo, lo)


def flashmask_bounds(layout: Layout) -> FlashMaskBounds:
    """The layout's mask as FlashMask's column bounds, or :class:`NotExpressible`."""
    n = layout.n_tokens
    rows: list[list[tuple[int, int]]] = [[] for _ in range(n)]
    for pair in group_pairs(layout):
        for j in range(pair.k_len):
            lo, hi = column_queries(j, pair.q_len, pair.modifiers, pair.shift)
            if lo < hi:
                rows[pair.k_start + j].append((pair.q_start + lo, pair.q_start + hi))
    lts, lte, uts, ute = [], [], [], []
    for j in range(n):
        allowed = merge_ranges(rows[j])
        lower = _one_masked_interval(allowed, j, n)
        upper = _one_masked_interval(allowed, 0, j)
        if lower is None or upper is None:
            half = "below" if lower is None else "above"
            raise NotExpressible(
                f"key {j} is hidden from more than one run of queries {half} the diagonal (it is seen by "
                f"rows {allowed}); FlashMask allows one run on each side"
            )
        lts.append(lower[0])
        lte.append(lower[1])
        uts.append(upper[0])
        ute.append(upper[1])
    causal = all(u == 0 and e == j for j, (u, e) in enumerate(zip(uts, ute)))
    return FlashMaskBounds(n, tuple(lts), tuple(lte), tuple(uts), tuple(ute), causal)
