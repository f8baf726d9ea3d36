"""Device tables of a layout: the runtime's one cache.

A :class:`~patternc.lower.layout.Layout` is plain integers; executors also need
device tensors made from it (positions within groups, FlexAttention's group
tables, varlen's packed indices). Building them costs host time and
host-to-device copies, so each is built once and kept in :data:`TABLES`.

Key: ``(kind, *inputs)``, where ``kind`` names the table (``"positions"``,
``"flex groups"``, ``"varlen launches"``, ``"auto estimates"``) and the inputs
are what it is built from (a layout, which hashes by identity, or its sizes;
the device; a batch size). Under ``torch.compile`` the tables are built in
the traced graph instead (they are a few cheap kernels) and nothing is
stored, so Dynamo never traces a cache's state.

The exception is a *traceable* table (FlexAttention's group tables and block
mask): there a table an eager call built is handed to the trace as it is, so
Dynamo passes its tensors into the user's graph as inputs. Inductor needs
that: it cannot lower ``flex_attention`` when the tensors its ``mask_mod``
reads are computed in the same graph. Those entries are also kept under a
key Dynamo can hash, each layout replaced by its ``id`` (the entry holds the
layout, so the ``id`` stays its own, and is checked on the way out).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Hashable
from typing import TypeVar, cast

import torch

from patternc.lower.cache import BoundedCache
from patternc.lower.layout import Layout
from patternc.tracing import compiling as _compiling

__all__ = ["TABLES", "LayoutTables"]

T = TypeVar("T")

TableKey = tuple[Hashable, ...]
"""``(kind, *inputs)``, see the module docstring."""


class LayoutTables(BoundedCache[TableKey, object]):
    """A bounded ``{(kind, *inputs): table}`` cache whose lookups keep the
    table's type (each kind builds one type of table)."""

    def __init__(self, name: str, size: int, max_bytes: int = 1 << 30) -> None:
        """At most ``size`` tables and about ``max_bytes`` of tensors (device
        and host together: a flex table of many documents is large)."""
        super().__init__(name, size, weigh=table_bytes, max_weight=max_bytes, lookup_while_tracing=False)
        self._traceable: BoundedCache[TableKey, tuple[tuple[Layout, ...], object]] = BoundedCache(
            f"{name}, by layout id", size, weigh=table_bytes, max_weight=max_bytes
        )

    def get(self, key: TableKey, build: Callable[[], T], *, traceable: bool = False) -> T:
        """The table under ``key``, built on a miss. ``traceable``: under
        ``torch.compile`` return the table an eager call stored (see the
        module docstring) rather than build it in the graph."""
        if not traceable:
            return cast(T, self.get_or_build(key, build))
        if _compiling():
            found = self.stored(key)
            return build() if found is None else cast(T, found)
        found = self.lookup(key)  # the eager hot path: one dict lookup
        if found is not None:
            return cast(T, found)
        table = cast(T, self.get_or_build(key, build))
        self._traceable.get_or_build(_plain(key), lambda: (_layouts(key), table))
        return table

    def keep(self, key: TableKey, build: Callable[[], T]) -> T:
        """The table under ``key``, built on a miss and stored as traceable
        even while ``torch.compile`` traces: for host code that runs as plain
        Python during a trace (``auto``'s constant function prices a layout
        there), so the graph being traced finds what it stored."""
        found = self.lookup(key)
        if found is None:
            found = build()
            self.put(key, found)
            self._traceable.put(_plain(key), (_layouts(key), found))
        return cast(T, found)

    def stored(self, key: TableKey) -> object | None:
        """The table under ``key`` if one is stored, else None; under
        ``torch.compile``, the one an eager call stored as traceable."""
        if _compiling():
            found = self._traceable.lookup(_plain(key))
            return found[1] if found is not None and _same(found[0], key) else None
        return self.lookup(key)

    def clear(self) -> None:
        super().clear()
        self._traceable.clear()


def table_bytes(table: object) -> int:
    """The bytes of the tensors a table holds (in tuples, lists, dicts and
    dataclasses, as tables are built), plus a small charge per object."""
    if isinstance(table, torch.Tensor):
        return table.untyped_storage().nbytes() if table.numel() else 64
    if isinstance(table, (tuple, list)):
        return 64 + sum(table_bytes(item) for item in table)
    if isinstance(table, dict):
        return 64 + sum(table_bytes(item) for item in table.values())
    if dataclasses.is_dataclass(table) and not isinstance(table, type):
        return 64 + sum(table_bytes(getattr(table, f.name)) for f in dataclasses.fields(table))
    return 64


def _plain(key: TableKey) -> TableKey:
    """``key`` with each layout replaced by its ``id``: a key of constants."""
    return tuple(id(k) if isinstance(k, Layout) else k for k in key)


def _layouts(key: TableKey) -> tuple[Layout, ...]:
    return tuple(k for k in key if isinstance(k, Layout))


def _same(layouts: tuple[Layout, ...], key: TableKey) -> bool:
    """The stored layouts are the key's own (an ``id`` is not reused while an entry holds its layout)."""
    return all(a is b for a, b in zip(layouts, _layouts(key)))


TABLES = LayoutTables("runtime tables", 2048)
