"""Modifiers: which (query, key) pairs of a group pair are allowed.

A modifier belongs to one (query group, key group) pair. It is written
after a key selector (``text -> image, text[causal]``: only the text keys are
causal) or after the whole rule (``a -> a [causal]``: every key group of the
rule). Positions are counted *within each group*: token ``i`` of the query
group and token ``j`` of the key group, both from 0.

- ``causal``: ``j <= i``;
- ``window N``: ``|i - j| < N`` (with ``causal``: ``0 <= i - j < N``, the usual
  causal sliding window).

For a group attending to itself this is ordinary causal / local attention;
between two different groups it aligns their starts (query ``i`` sees the
first ``i + 1`` keys of the other group under ``causal``), which is why a
rule-level modifier over several key groups is warned about (W102).
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["MODIFIER_NAMES", "NO_MODIFIERS", "Modifiers", "allowed_pairs"]

MODIFIER_NAMES = ("causal", "window")


@dataclass(frozen=True, slots=True)
class Modifiers:
    causal: bool = False
    window: int | None = None

    def __bool__(self) -> bool:
        return self.causal or self.window is not None

    def parts(self) -> list[str]:
        return (["causal"] if self.causal else []) + (
            [f"window {self.window}"] if self.window is not None else []
        )

    def text(self) -> str:
        """``[causal, window 4]`` (empty for no modifiers)."""
        return f"[{', '.join(self.parts())}]" if self else ""

    def to_dict(self) -> dict[str, bool | int | None]:
        return {"causal": self.causal, "window": self.window}

    def tighten(self, other: Modifiers) -> Modifiers:
        """Both restrictions: causal if either is, the smaller window."""
        windows = [w for w in (self.window, other.window) if w is not None]
        return Modifiers(self.causal or other.causal, min(windows) if windows else None)


NO_MODIFIERS = Modifiers()


def _sum_clamped(first: int, count: int, high: int) -> int:
    """``sum(clamp(first + t, 0, high) for t in range(count))`` in O(1)."""
    if count <= 0 or high <= 0:
        return 0
    last = first + count - 1
    total = 0
    # terms in [1, high - 1] rise by one: an arithmetic series
    lo, hi = max(first, 1), min(last, high - 1)
    if lo <= hi:
        total += (lo + hi) * (hi - lo + 1) // 2
    # terms at or above high count high each
    at_top = last - max(first, high) + 1
    if at_top > 0:
        total += at_top * high
    return total


def _pairs_below(n_queries: int, n_keys: int, offset: int) -> int:
    """``#{(i, j) : 0 <= i < n_queries, 0 <= j < n_keys, j <= i + offset}``."""
    return _sum_clamped(offset + 1, n_queries, n_keys)


def allowed_pairs(n_queries: int, n_keys: int, modifiers: Modifiers) -> int:
    """How many (query, key) pairs of an ``n_queries x n_keys`` group pair
    ``modifiers`` allow: exact, in O(1), so FLOPs and density are exact too."""
    if n_queries <= 0 or n_keys <= 0:
        return 0
    # allowed: i + low <= j <= i + high
    far = n_queries + n_keys
    low, high = -far, far
    if modifiers.causal:
        high = 0
    if modifiers.window is not None:
        low = max(low, -(modifiers.window - 1))
        if not modifiers.causal:
            high = min(high, modifiers.window - 1)
    if low > high:
        return 0
    return _pairs_below(n_queries, n_keys, high) - _pairs_below(n_queries, n_keys, low - 1)
