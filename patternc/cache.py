"""The compiler's caches: explicit objects with documented keys.

A model calls the runtime with the same plan and sizes on every forward
pass, so binding a plan to its run-time groups and laying it out at given
sizes happen once per distinct input and are then looked up. Each cache is a
bounded dict (oldest entry evicted first) owned by this module, never a
hidden attribute of a frozen record.

- :data:`BINDINGS`: key ``(plan, group names)`` -> the plan with its
  families expanded over those names (:func:`patternc.bind.bind`).
- :data:`CHECKED_PATTERNS`: see below.
- :data:`LAYOUTS`: key ``(plan, ((group, size), ...))`` -> the
  :class:`~patternc.layout.Layout` (sizes as given: a dict's items or a
  ``TokenSpec`` list's ``(name, size)`` pairs, in order).
- :data:`PLANS_BY_ID`: key ``id(plan)`` -> every live plan made outside a
  ``torch.compile`` trace (weak: it keeps no plan alive).
"""

from __future__ import annotations

import sys
import weakref
from collections.abc import Callable, Hashable
from typing import TYPE_CHECKING, Generic, TypeVar

if TYPE_CHECKING:
    from patternc.layout import Layout
    from patternc.plan import Plan
    from patternc.schemas import TokenSpec

__all__ = ["BINDINGS", "CHECKED_PATTERNS", "LAYOUTS", "PLANS_BY_ID", "TOKEN_SPECS", "BoundedCache"]

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


def _compiling() -> bool:
    """Inside a ``torch.compile`` trace (never imports torch: the compiler runs without it)."""
    torch = sys.modules.get("torch")
    return torch is not None and bool(torch.compiler.is_compiling())


class BoundedCache(Generic[K, V]):
    """A dict of at most ``size`` entries; :meth:`get_or_build` builds on a miss."""

    def __init__(self, name: str, size: int, *, lookup_while_tracing: bool = True) -> None:
        """``lookup_while_tracing`` False: under ``torch.compile`` always build
        (the keys hold objects Dynamo cannot hash, such as layouts)."""
        self.name, self.size = name, size
        self.lookup_while_tracing = lookup_while_tracing
        self._entries: dict[K, V] = {}

    def get_or_build(self, key: K, build: Callable[[], V]) -> V:
        if _compiling():  # traced by torch.compile: build what is missing, store nothing
            found = self._entries.get(key) if self.lookup_while_tracing else None
            return build() if found is None else found
        found = self._entries.get(key)
        if found is None:
            found = build()
            self.put(key, found)
        return found

    def put(self, key: K, value: V) -> None:
        """Store ``value`` under ``key``, the oldest entry making room."""
        if key not in self._entries and len(self._entries) >= self.size:
            del self._entries[next(iter(self._entries))]
        self._entries[key] = value

    def lookup(self, key: K) -> V | None:
        """The entry or None, with no trace check (Dynamo inlines it)."""
        return self._entries.get(key)

    def untraced_lookup(self) -> Callable[[K], V | None]:
        """The dict's own ``get``, for a hot path Dynamo never traces: a
        lookup with no Python frame (about half the cost of a method call).
        Dynamo cannot trace a bound builtin ``dict.get``; traced
        callers use :meth:`lookup`."""
        return self._entries.get

    def values(self) -> list[V]:
        return list(self._entries.values())

    def items(self) -> list[tuple[K, V]]:
        return list(self._entries.items())

    def clear(self) -> None:
        self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)


BINDINGS: BoundedCache[tuple[Plan, tuple[str, ...]], Plan] = BoundedCache("bindings", 1024)
LAYOUTS: BoundedCache[tuple[Plan, tuple[tuple[str, int | None], ...]], Layout] = BoundedCache("layouts", 4096)
CHECKED_PATTERNS: BoundedCache[tuple[Hashable, ...], Plan] = BoundedCache("checked patterns", 512)
"""Key ``(((group, cached), ...), patterns)`` -> the checked plan of a hand-written list."""
TOKEN_SPECS: BoundedCache[tuple[Plan, tuple[tuple[str, int | None], ...]], tuple[TokenSpec, ...]] = (
    BoundedCache("token specs", 4096)
)
"""Key as :data:`LAYOUTS` -> ``plan.token_specs(sizes)``."""

PLANS_BY_ID: weakref.WeakValueDictionary[int, Plan] = weakref.WeakValueDictionary()
"""``id(plan)`` -> the plan, for every live plan made outside a trace (each
plan enters itself when made or unpickled). A ``torch.compile`` trace hands
plain-Python helpers constants only, and a plan is not one on torch 2.11, so
a trace names a plan by ``id`` and such a helper finds it here (see
:mod:`patternc.nn.traced_layouts`). Weak values: an entry ends with its plan,
so an ``id`` found here is always that plan's."""
