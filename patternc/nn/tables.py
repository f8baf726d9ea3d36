"""Device tables of a layout: the runtime's one cache.

A :class:`~patternc.layout.Layout` is plain integers; executors also need
device tensors made from it (positions within groups, FlexAttention's group
tables, varlen's packed indices). Building them costs host time and
host-to-device copies, so each is built once and kept in :data:`TABLES`.

Key: ``(kind, *inputs)``, where ``kind`` names the table (``"positions"``,
``"flex groups"``, ``"varlen launches"``, ``"auto estimates"``) and the inputs
are what it is built from (a layout, which hashes by identity, or its sizes;
the device; a batch size). Under ``torch.compile`` the tables are built in
the traced graph instead (they are a few cheap kernels), so Dynamo never
traces through a cache.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import TypeVar

import torch

__all__ = ["TABLES", "LayoutTables"]

T = TypeVar("T")


class LayoutTables:
    """A bounded ``{(kind, *inputs): table}`` dict (oldest entry evicted first)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._entries: dict[tuple[Hashable, ...], object] = {}

    def get(self, key: tuple[Hashable, ...], build: Callable[[], T]) -> T:
        if torch.compiler.is_compiling():
            return build()
        found = self._entries.get(key)
        if found is None:
            found = build()
            if len(self._entries) >= self.size:
                del self._entries[next(iter(self._entries))]
            self._entries[key] = found
        return found  # type: ignore[return-value]

    def clear(self) -> None:
        self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)


TABLES = LayoutTables(2048)
