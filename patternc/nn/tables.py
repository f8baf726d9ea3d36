"""Device tables of a layout: the runtime's one cache.

A :class:`~patternc.layout.Layout` is plain integers; executors also need
device tensors made from it (positions within groups, FlexAttention's group
tables, varlen's packed indices). Building them costs host time and
host-to-device copies, so each is built once and kept in :data:`TABLES`.

Key: ``(kind, *inputs)``, where ``kind`` names the table (``"positions"``,
``"flex groups"``, ``"varlen launches"``, ``"auto estimates"``) and the inputs
are what it is built from (a layout, which hashes by identity, or its sizes;
the device; a batch size). Under ``torch.compile`` the tables are built in
the traced graph instead (they are a few cheap kernels) and nothing is
stored, so Dynamo never traces a cache's state.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import TypeVar, cast

from patternc.cache import BoundedCache

__all__ = ["TABLES", "LayoutTables"]

T = TypeVar("T")


class LayoutTables(BoundedCache[tuple[Hashable, ...], object]):
    """A bounded ``{(kind, *inputs): table}`` cache whose lookups keep the
    table's type (each kind builds one type of table)."""

    def get(self, key: tuple[Hashable, ...], build: Callable[[], T]) -> T:
        return cast(T, self.get_or_build(key, build))


TABLES = LayoutTables("runtime tables", 2048, lookup_while_tracing=False)
