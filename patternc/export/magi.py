"""MagiAttention: the plan as ``(q_range, k_range, mask type)`` slices.

Slice semantics (MagiAttention's, with local indices ``i``, ``j`` from the
slice's range starts and lengths ``Lq``, ``Lk``): ``FULL`` every pair;
``CAUSAL`` ``j <= i + (Lk - Lq)`` (aligned to the bottom right); ``INVCAUSAL``
``j >= i`` (aligned to the top left); ``BICAUSAL`` both. A query's softmax
runs over every slice that covers it, which is one call's keys.

Within a group pair the first and last allowed key of each query row move
by 0 or 1 per row, so the rows split into runs where each bound is either
fixed or rising one per row: a fixed bound is the edge of the slice's key
range, a rising one is a triangle edge. That makes every pattern-language
mask an exact list of slices.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from patternc.lower.layout import Layout
from patternc.lower.pairs import GroupPair, group_pairs, row_keys
from patternc.ranges import merge_ranges

__all__ = ["MagiSlice", "magi_slices"]

MaskType = Literal["FULL", "CAUSAL", "INVCAUSAL", "BICAUSAL"]


@dataclass(frozen=True, slots=True)
class MagiSlice:
    q_range: tuple[int, int]
    k_range: tuple[int, int]
    mask_type: MaskType

    def to_dict(self) -> dict[str, Any]:
        return {"q_range": list(self.q_range), "k_range": list(self.k_range), "mask_type": self.mask_type}


_KINDS: dict[tuple[bool, bool], MaskType] = {
    (False, False): "FULL",
    (False, True): "CAUSAL",
    (True, False): "INVCAUSAL",
    (True, True): "BICAUSAL",
}


def _runs(pair: GroupPair) -> list[tuple[int, int, int, int, bool, bool]]:
    """``(first row, stop row, lo at first, hi-1 at last, lo rises, hi rises)``."""
    runs: list[tuple[int, int, int, int, bool, bool]] = []
    bounds = [row_keys(i, pair.k_len, pair.modifiers, pair.shift) for i in range(pair.q_len)]
    i = 0
    while i < pair.q_len:
        lo, hi = bounds[i]
        if lo >= hi:
            i += 1
            continue
        stop = i + 1
        slopes: tuple[int, int] | None = None  # how lo and hi move per row in this run
        while stop < pair.q_len:
            nlo, nhi = bounds[stop]
            plo, phi = bounds[stop - 1]
            if nlo >= nhi:
                break
            step = (nlo - plo, nhi - phi)
            if slopes is None:
                slopes = step
            if step != slopes:
                break
            stop += 1
        lo_rise, hi_rise = slopes == (1, 0) or slopes == (1, 1), slopes == (0, 1) or slopes == (1, 1)
        runs.append((i, stop, lo, bounds[stop - 1][1] - 1, lo_rise, hi_rise))
        i = stop
    return runs


def _merge_full(slices: list[MagiSlice]) -> list[MagiSlice]:
    """FULL slices coalesced: each query run's touching key ranges joined, then
    neighbouring query runs with the same key ranges joined (a call's query
    groups, or every group of a joint call, become one run per key range)."""
    keys_of: dict[tuple[int, int], list[tuple[int, int]]] = {}
    others = []
    for s in slices:
        if s.mask_type == "FULL":
            keys_of.setdefault(s.q_range, []).append(s.k_range)
        else:
            others.append(s)
    runs: list[tuple[tuple[int, int], tuple[tuple[int, int], ...]]] = []
    for q_range in sorted(keys_of):
        keys = tuple(merge_ranges(keys_of[q_range]))
        if runs and runs[-1][1] == keys and runs[-1][0][1] == q_range[0]:
            runs[-1] = ((runs[-1][0][0], q_range[1]), keys)
        else:
            runs.append((q_range, keys))
    full = [MagiSlice(q, k, "FULL") for q, ks in runs for k in ks]
    return full + others


def magi_slices(layout: Layout) -> list[MagiSlice]:
    """The layout's allowed pairs as MagiAttention slices (exact, in call order)."""
    out: list[MagiSlice] = []
    for pair in group_pairs(layout):
        if not pair.modifiers:
            q_range, k_range = (
                (pair.q_start, pair.q_start + pair.q_len),
                (pair.k_start, pair.k_start + pair.k_len),
            )
            out.append(MagiSlice(q_range, k_range, "FULL"))
            continue
        for first, stop, lo, last_hi, lo_rise, hi_rise in _runs(pair):
            kind = _KINDS[(lo_rise, hi_rise)]
            q_range = (pair.q_start + first, pair.q_start + stop)
            k_range = (pair.k_start + lo, pair.k_start + last_hi + 1)
            out.append(MagiSlice(q_range, k_range, kind))
    return _merge_full(out)
