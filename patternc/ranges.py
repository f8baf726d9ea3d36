"""Half-open integer ranges ``[start, stop)``: the one merge every exporter and the sharding use."""

from __future__ import annotations

from collections.abc import Iterable

__all__ = ["Range", "merge_ranges"]

Range = tuple[int, int]


def merge_ranges(ranges: Iterable[Range]) -> list[Range]:
    """The union of ``ranges`` as sorted, disjoint, non-empty ranges (touching ones joined)."""
    merged: list[Range] = []
    for a, b in sorted(r for r in ranges if r[1] > r[0]):
        if merged and a <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], b))
        else:
            merged.append((a, b))
    return merged
