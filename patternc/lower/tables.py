"""The slot a layout owns for what the runtime derives from it.

Executors turn a :class:`~patternc.lower.layout.Layout` (plain integers) into
device tensors (positions within groups, FlexAttention's group tables and
block masks, varlen's packed indices) and ``auto`` prices it and picks an
executor. Each of these is built once and kept in the layout's own
:class:`Tables`, ``layout.tables``, so per-(plan, sizes) state has one owner:
the layout, held by the one layout cache (:data:`patternc.plan.LAYOUTS`).
Evicting a layout from that cache drops its tables with it; there is no
module-level table cache and no key made of ``id(layout)``.

The slot is on the layout because the layout is what every executor is
handed (``AttentionInputs.layout``), layouts built with
:func:`~patternc.lower.layout.build_layout` outside the cache included: the
tables are reachable from what executors already read, with no second
record per call and no map from layouts to records, and under
``torch.compile`` they travel with the layout into the trace (see
:mod:`patternc.nn.traced_layouts`).

Key: ``(kind, *inputs)``: ``kind`` names the table (``"positions"``,
``"flex tables"``, ``"varlen launches"``, ``"auto pick"``, ...), the inputs
are what else it is built from (a device, a batch size, cache lengths). The
layout is never part of a key: the slot is the layout's.

Bounds: at most ``max_entries`` tables (the oldest leave first; a layout
run with a KV cache gets a table per cache length) and at most ``max_bytes``
of them. The bytes are counted by the caller (:mod:`patternc.nn.tables`
weighs tensors; this module never imports torch) and reported to the cache
that holds the layout, so that cache bounds layouts and tables together.

Threads: a lookup is one dict read (atomic, no lock). Writes to every
slot take one process-wide lock: a write happens once per table, and a lock
per slot would be an object Dynamo cannot build when a trace lays out a plan.
Builds run outside the lock; when two threads build the same table the
first stored wins.

``torch.compile``: a trace never holds a layout's own slot. The compile
boundary (:mod:`patternc.nn.traced_layouts`) hands a trace a copy of the
layout whose slot is a :class:`TracedTables`, a read-only view of the
eager slot: a *traceable* table an eager call stored is handed to the trace
as it is, so its tensors enter the user's graph as inputs; any other table
is rebuilt in the graph and nothing is stored (a traced table is a graph
value, not a tensor to keep). Code that must run another way in a graph
reads :attr:`Tables.traced` of the slot it was handed; nothing here asks
torch whether it is tracing.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable, Hashable
from typing import TypeVar, cast

__all__ = ["TableKey", "Tables", "TracedTables", "traced_owner"]

T = TypeVar("T")

TableKey = tuple[Hashable, ...]
"""``(kind, *inputs)``, see the module docstring."""

_WRITES = threading.Lock()
"""Serialises writes to all slots (see the module docstring)."""


class Tables:
    """A layout's tables: a small bounded ``{(kind, *inputs): table}`` dict.

    >>> tables = Tables(max_entries=2)
    >>> tables.get(("answer",), lambda: 42, weigh=lambda _: 8)
    42
    >>> tables.get(("answer",), lambda: 0, weigh=lambda _: 8), tables.nbytes
    (42, 8)
    """

    traced = False
    """Whether this slot is a trace's view (:class:`TracedTables`): code
    handed it runs in a ``torch.compile`` graph."""

    def __init__(self, max_entries: int = 256, max_bytes: int = 1 << 30) -> None:
        """Args:
        max_entries: the most tables kept; the oldest leave first.
        max_bytes: the most bytes kept (one table over it is kept alone).
        """
        self.entries: dict[TableKey, object] = {}
        """The tables by key: read it (``entries.get``) on a hot path; write
        through :meth:`get`, :meth:`keep` or :meth:`put`."""
        self._weights: dict[TableKey, int] = {}
        self.nbytes = 0
        """The bytes of the tables held, as their builders weighed them."""
        self.max_entries, self.max_bytes = max_entries, max_bytes
        self._charge: Callable[[int], None] | None = None
        self._view: object | None = None

    def view(self, make: Callable[[], T]) -> T:
        """The one trace's view of the layout (see
        :func:`patternc.nn.traced_layouts.for_trace`), made on first use.
        Held apart from the tables: no bound evicts it and :meth:`clear`
        keeps it, so every graph guards on the same object."""
        found = self._view
        if found is None:
            made = make()
            with _WRITES:
                if self._view is None:
                    self._view = made
                found = self._view
        return cast(T, found)

    def attach(self, charge: Callable[[int], None]) -> None:
        """Report every change of :attr:`nbytes` (the difference) to
        ``charge``: the cache holding the layout weighs it with its tables."""
        self._charge = charge

    def get(
        self, key: TableKey, build: Callable[[], T], weigh: Callable[[T], int], *, traceable: bool = False
    ) -> T:
        """The table under ``key``, built and stored on a miss.

        Args:
            key: ``(kind, *inputs)``.
            build: makes the table.
            weigh: a table's bytes.
            traceable: in a trace's view, hand the trace the table an
                eager call stored (else the trace builds its own).

        Returns:
            The stored table, or a new one.
        """
        found = self.entries.get(key)
        if found is None:
            value = build()
            return cast(T, self.put(key, value, weigh(value)))
        return cast(T, found)

    def keep(self, key: TableKey, build: Callable[[], T], weigh: Callable[[T], int]) -> T:
        """:meth:`get`, storing the table even in a trace's view: for host
        code that runs as plain Python during a trace (``auto`` prices a
        layout in a constant function), so the graph being traced finds what
        it stored."""
        return Tables.get(self, key, build, weigh)

    def stored(self, key: TableKey) -> object | None:
        """The table under ``key``, or None (a plain read, also in a trace)."""
        return self.entries.get(key)

    def missing_in_trace(self, key: TableKey) -> bool:
        """In a trace's view, whether no eager call stored ``key``: an
        executor whose tables cannot be built in a graph then runs another
        way. Always False for a layout's own slot."""
        return self.traced and key not in self.entries

    def put(self, key: TableKey, value: object, weight: int) -> object:
        """Store ``value`` (``weight`` bytes) under ``key`` unless another
        thread stored one first (that one is returned), the oldest tables
        making room."""
        with _WRITES:
            found = self.entries.get(key)
            if found is not None:
                return found
            before = self.nbytes
            self.entries[key] = value
            self._weights[key] = weight
            self.nbytes += weight
            while len(self.entries) > 1 and (
                len(self.entries) > self.max_entries or self.nbytes > self.max_bytes
            ):
                oldest = next(iter(self.entries))
                del self.entries[oldest]
                self.nbytes -= self._weights.pop(oldest)
            change = self.nbytes - before
        if change and self._charge is not None:
            self._charge(change)
        return value

    def clear(self) -> None:
        """Drop every table."""
        with _WRITES:
            change = -self.nbytes
            self.entries.clear()
            self._weights.clear()
            self.nbytes = 0
        if change and self._charge is not None:
            self._charge(change)

    def __len__(self) -> int:
        return len(self.entries)

    def __repr__(self) -> str:
        return f"Tables({len(self)} tables, {self.nbytes} bytes)"


class TracedTables(Tables):
    """A trace's read-only view of a layout's :class:`Tables` (see the module
    docstring): reads see what eager calls stored, :meth:`get` builds what is
    missing without storing it, :meth:`keep` stores into the viewed slot.

    >>> eager = Tables()
    >>> eager.get(("answer",), lambda: 42, weigh=lambda _: 8)
    42
    >>> owner = object()
    >>> view = TracedTables(eager, owner)
    >>> view.get(("answer",), lambda: 0, weigh=lambda _: 8, traceable=True), view.traced
    (42, True)
    >>> view.get(("other",), lambda: 1, weigh=lambda _: 8), len(eager)
    (1, 1)
    """

    traced = True

    def __init__(self, viewed: Tables, owner: object) -> None:
        """Args:
        viewed: the layout's own slot.
        owner: the layout that owns ``viewed``. A trace names it to
            plain-Python helpers by :attr:`layout_id` (they take constants
            only), and :func:`traced_owner` finds it again while this view lives.
        """
        super().__init__(viewed.max_entries, viewed.max_bytes)
        self.entries = viewed.entries
        self.viewed = viewed
        self.owner = owner
        self.layout_id = id(owner)
        _VIEWS[self.layout_id] = self

    def get(
        self, key: TableKey, build: Callable[[], T], weigh: Callable[[T], int], *, traceable: bool = False
    ) -> T:
        found = self.entries.get(key) if traceable else None
        return build() if found is None else cast(T, found)

    def keep(self, key: TableKey, build: Callable[[], T], weigh: Callable[[T], int]) -> T:
        return self.viewed.keep(key, build, weigh)

    def put(self, key: TableKey, value: object, weight: int) -> object:
        return value

    def clear(self) -> None:
        self.viewed.clear()


_VIEWS: weakref.WeakValueDictionary[int, TracedTables] = weakref.WeakValueDictionary()
"""``id(owner)`` -> the live trace view of that layout. A view holds its
layout, so an id here names that layout and no other while the entry lasts
(graphs that guard on a view keep it alive)."""


def traced_owner(layout_id: int) -> object | None:
    """The layout whose trace view carries ``layout_id``, or None."""
    view = _VIEWS.get(layout_id)
    return None if view is None else view.owner
