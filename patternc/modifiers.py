"""In-group modifiers of a rule: ``[causal]``, ``[window N]``, ``[causal, window N]``.

Positions are counted within each group: token ``i`` of the query group and
token ``j`` of the key group (both from 0). A rule's modifiers restrict which
of its (query, key) pairs are allowed:

- ``causal``: ``j <= i``;
- ``window N``: ``|i - j| < N`` (with ``causal``: ``0 <= i - j < N``, the usual
  causal sliding window).

For a group attending to itself this is ordinary causal / local attention;
between two groups it aligns their starts (query ``i`` sees the first ``i + 1``
keys of the other group under ``causal``).
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["MODIFIER_NAMES", "NO_MODIFIERS", "Modifiers"]

MODIFIER_NAMES = ("causal", "window")


@dataclass(frozen=True, slots=True)
class Modifiers:
    causal: bool = False
    window: int | None = None

    def __bool__(self) -> bool:
        return self.causal or self.window is not None

    def text(self) -> str:
        parts = (["causal"] if self.causal else []) + (
            [f"window {self.window}"] if self.window is not None else []
        )
        return f"[{', '.join(parts)}]" if parts else ""

    def to_dict(self) -> dict[str, bool | int | None]:
        return {"causal": self.causal, "window": self.window}


NO_MODIFIERS = Modifiers()
