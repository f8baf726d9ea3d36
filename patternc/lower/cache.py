"""A bounded, thread-safe cache: the one kind of memo the runtime keeps.

A model calls the runtime with the same plan and sizes on every forward
pass, so what is built from them is built once and looked up afterwards.
Each cache is an explicit object with a documented key, bounded by a number
of entries and, where entries differ much in size (layouts of many
documents), by a total weight. Eviction drops the oldest entry first. An
entry that grows after it is stored reports the growth (:meth:`~BoundedCache.charge`):
the layout cache weighs each layout with the tables executors keep in it
(:mod:`patternc.lower.tables`).

Threads: lookups, insertions and evictions hold one lock per cache, so
threads sharing a model never see an entry vanish between a check and a
read. Builds run outside the lock (two threads may build the same entry at
once; the first stored wins and both get an equal value).

A ``torch.compile`` trace must not write a cache (Dynamo cannot trace the
lock, and a record built in a graph is a constant of that graph anyway).
Records a trace needs are built outside it by the compile boundary
(:mod:`patternc.nn.traced_layouts`); a layer that reads a cache while it is
traced says so (``get_or_build(..., store=False)``), as its entry point
learnt from the boundary.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

__all__ = ["BoundedCache"]

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class BoundedCache(Generic[K, V]):
    """A dict of at most ``size`` entries (and at most ``max_weight`` total
    weight when ``weigh`` is given); :meth:`get_or_build` builds on a miss."""

    def __init__(
        self,
        name: str,
        size: int,
        *,
        weigh: Callable[[V], int] | None = None,
        max_weight: int = 0,
        on_store: Callable[[K, V], None] | None = None,
    ) -> None:
        """Args:
        name: shown in reprs and errors.
        size: the most entries kept.
        weigh: an entry's weight (e.g. its approximate bytes); with
            ``max_weight`` it bounds the total, the oldest entries leaving
            first (a single entry over the bound is still kept, alone).
        max_weight: the total weight bound (ignored without ``weigh``).
        on_store: called with each entry this cache stores, before any
            other thread can read it (under the cache's lock: it must not
            use the cache), e.g. to have an entry report its later growth
            through :meth:`charge`.
        """
        self.name, self.size = name, size
        self._weigh = weigh
        self.max_weight = max_weight
        self._on_store = on_store
        self._weights: dict[K, int] = {}
        self._total = 0
        self._entries: dict[K, V] = {}
        self._lock = threading.Lock()

    def get_or_build(self, key: K, build: Callable[[], V], *, store: bool = True) -> V:
        """The entry under ``key``; on a miss ``build()`` is stored and
        returned (returned only with ``store=False``: a traced caller's)."""
        found = self._entries.get(key)  # one dict read is atomic: no lock on a hit
        if found is None:
            found = self.put(key, build()) if store else build()
        return found

    def put(self, key: K, value: V) -> V:
        """Store ``value`` under ``key`` unless another thread stored one
        first (that one is returned), the oldest entries making room."""
        weight = self._weigh(value) if self._weigh is not None else 0
        with self._lock:
            found = self._entries.get(key)
            if found is not None:
                return found
            if self._on_store is not None:  # before another thread can find the entry
                self._on_store(key, value)
            self._entries[key] = value
            if self._weigh is not None:
                self._weights[key] = weight
                self._total += weight
            self._evict()
        return value

    def replace(self, key: K, value: V) -> None:
        """Store ``value`` under ``key``, replacing any entry there."""
        with self._lock:
            self._drop(key)
        self.put(key, value)

    def charge(self, key: K, value: V, change: int) -> None:
        """Add ``change`` to the weight of ``value``, the entry under ``key``
        (an entry that grew after it was stored: a layout whose tables were
        filled), the oldest entries leaving while over the bound; nothing
        when ``value`` has left, even if another entry holds ``key`` now."""
        with self._lock:
            if self._entries.get(key) is value and key in self._weights:
                self._weights[key] += change
                self._total += change
                self._evict()

    def _evict(self) -> None:
        """Drop oldest entries while over a bound (the lock is held)."""
        entries = self._entries
        while len(entries) > 1 and (
            len(entries) > self.size or (self._weigh is not None and self._total > self.max_weight)
        ):
            self._drop(next(iter(entries)))

    def _drop(self, key: K) -> None:
        if self._entries.pop(key, None) is not None:
            self._total -= self._weights.pop(key, 0)

    def lookup(self, key: K) -> V | None:
        """The entry or None: a plain read, no lock."""
        return self._entries.get(key)

    @property
    def weight(self) -> int:
        """The total weight of the entries (0 without ``weigh``)."""
        return self._total

    def values(self) -> list[V]:
        with self._lock:
            return list(self._entries.values())

    def items(self) -> list[tuple[K, V]]:
        with self._lock:
            return list(self._entries.items())

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._weights.clear()
            self._total = 0

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"BoundedCache({self.name!r}, {len(self)}/{self.size} entries)"
