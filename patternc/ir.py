"""The compiler's intermediate records, shared by every later stage.

A pattern file becomes :class:`ResolvedRule` values (both sides resolved to
group names, each key group with its modifiers); a plan merges rules with the
same keys into :class:`AttentionCall` values, one per attention call. Laid
out at concrete sizes (:mod:`patternc.lower.layout`) each call becomes one
:class:`~patternc.lower.layout.Call` that every executor reads as it is.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import overload

from patternc.diagnostics import Span
from patternc.members import MemberRelation
from patternc.modifiers import NO_MODIFIERS, Modifiers

__all__ = ["AttentionCall", "KeyGroup", "KeyRun", "Keys", "ResolvedRule"]


@dataclass(frozen=True, slots=True)
class KeyGroup:
    """A key/value group of a call and the modifiers of its pairs with the call's queries."""

    name: str
    modifiers: Modifiers = NO_MODIFIERS
    members: MemberRelation | None = None
    """For a family key of a family rule: which of its members each query
    member reads (``frame*[upto]``, ``self``); None: all of them. Binding
    resolves it, so a bound plan's keys never carry one."""
    _hash: int = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        # computed once: bound plans hash tuples of keys that grow with the
        # members (a block-causal family's calls read every earlier member)
        object.__setattr__(self, "_hash", hash((self.name, self.modifiers, self.members)))

    def __hash__(self) -> int:
        return self._hash

    def __reduce__(self) -> tuple[type[KeyGroup], tuple[object, ...]]:
        """Unpickled through ``__init__``: a string's hash differs between processes."""
        return (KeyGroup, (self.name, self.modifiers, self.members))

    def text(self) -> str:
        """``frame*[upto, causal]``, or ``self[causal]`` for the query itself."""
        if self.members is not None and self.members.kind == "self":
            return f"self{self.modifiers.text()}"
        parts = ([self.members.text()] if self.members is not None else []) + self.modifiers.parts()
        return f"{self.name}[{', '.join(parts)}]" if parts else self.name


_PRIME = (1 << 61) - 1
_BASE = 1_000_003


class KeyRun:
    """Key groups that many rules read slices of: a family's members in
    ordinal order, each with one shared modifier list. A block-causal family
    of ``M`` members binds ``M`` rules whose keys are slices of one run, so
    what is derived per run (its hash prefixes here, its placement in a
    layout) is computed once and each slice costs O(1) after it."""

    __slots__ = ("__weakref__", "_powers", "_prefix", "groups", "modifiers")

    def __init__(self, groups: tuple[KeyGroup, ...]) -> None:
        self.groups = groups
        first = groups[0].modifiers if groups else NO_MODIFIERS
        same = all(k.modifiers is first or k.modifiers == first for k in groups)
        self.modifiers: Modifiers | None = first if same else None
        """The modifiers every group of the run shares, or None when they differ."""
        self._prefix: list[int] | None = None
        self._powers: list[int] | None = None

    def __len__(self) -> int:
        return len(self.groups)

    def slice_modifiers(self, lo: int, hi: int) -> Modifiers | None:
        """The modifiers every group of ``groups[lo:hi]`` shares, or None when they differ."""
        if self.modifiers is not None or (lo == 0 and hi == len(self.groups)):
            return self.modifiers
        first = self.groups[lo].modifiers
        same = all(k.modifiers is first or k.modifiers == first for k in self.groups[lo:hi])
        return first if same else None

    def _hash_tables(self) -> tuple[list[int], list[int]]:
        """The hash's prefixes over the groups and the powers of its base,
        built on first use (a block-causal family hashes a slice per member)."""
        if self._prefix is None or self._powers is None:
            prefix, powers = [0], [1]
            for key in self.groups:
                prefix.append((prefix[-1] * _BASE + hash(key)) % _PRIME)
                powers.append(powers[-1] * _BASE % _PRIME)
            self._prefix, self._powers = prefix, powers
        return self._prefix, self._powers

    def slice_hash(self, lo: int, hi: int) -> int:
        """The polynomial hash of ``groups[lo:hi]`` (see :meth:`Keys.__hash__`)."""
        prefix, powers = self._hash_tables()
        return (prefix[hi] - prefix[lo] * powers[hi - lo]) % _PRIME

    def power(self, n: int) -> int:
        """``_BASE ** n`` modulo the hash's prime, for ``n`` up to the run's length."""
        return self._hash_tables()[1][n]


class Keys(Sequence[KeyGroup]):
    """A rule's or call's key groups: an immutable sequence made of slices
    of :class:`KeyRun` values, equal to any ``tuple`` of the same groups.

    Binding gives each query member of a relation family the slice of the
    run it reads instead of a tuple of its own, so ``M`` members cost ``M``
    records, not the ``M(M+1)/2`` (query, key) pairs a block-causal family
    has; hashing and comparing two slices of one run is O(1) too. Iterating
    (or :attr:`AttentionCall.key_names`) still visits every group: the
    layout reads :attr:`parts` instead."""

    __slots__ = ("_hash", "_length", "parts")

    def __init__(self, parts: Sequence[tuple[KeyRun, int, int]] = ()) -> None:
        self.parts: tuple[tuple[KeyRun, int, int], ...] = tuple(p for p in parts if p[2] > p[1])
        """``(run, lo, hi)``: the groups ``run.groups[lo:hi]``, in order."""
        self._length = sum(hi - lo for _, lo, hi in self.parts)
        self._hash: int | None = None

    @classmethod
    def of(cls, keys: Sequence[KeyGroup]) -> Keys:
        """``keys`` as one run of their own (``keys`` itself when it is a :class:`Keys`)."""
        if isinstance(keys, Keys):
            return keys
        groups = tuple(keys)
        return cls([(KeyRun(groups), 0, len(groups))])

    def mapped(self, change: Callable[[KeyGroup], KeyGroup], done: dict[int, KeyRun]) -> Keys:
        """These keys with ``change`` applied to each group, cut as they are:
        each run is changed once, and kept in ``done`` (by the id of the
        run) for the other rules that read slices of it."""
        parts = []
        for run, lo, hi in self.parts:
            changed = done.get(id(run))
            if changed is None:
                changed = done[id(run)] = KeyRun(tuple(map(change, run.groups)))
            parts.append((changed, lo, hi))
        return Keys(parts)

    def __len__(self) -> int:
        return self._length

    def __iter__(self) -> Iterator[KeyGroup]:
        for run, lo, hi in self.parts:
            yield from itertools.islice(run.groups, lo, hi)

    @overload
    def __getitem__(self, index: int) -> KeyGroup: ...

    @overload
    def __getitem__(self, index: slice) -> tuple[KeyGroup, ...]: ...

    def __getitem__(self, index: int | slice) -> KeyGroup | tuple[KeyGroup, ...]:
        if isinstance(index, slice):
            return tuple(self)[index]
        if index < 0:
            index += self._length
        if not 0 <= index < self._length:
            raise IndexError("key index out of range")
        for run, lo, hi in self.parts:
            if index < hi - lo:
                return run.groups[lo + index]
            index -= hi - lo
        raise IndexError("key index out of range")  # pragma: no cover - lengths agree

    def __hash__(self) -> int:
        # a polynomial hash over the groups, so equal sequences hash equal
        # however they are cut into runs, and a slice hashes in O(1) from
        # its run's prefixes
        if self._hash is None:
            total = 0
            for run, lo, hi in self.parts:
                total = (total * run.power(hi - lo) + run.slice_hash(lo, hi)) % _PRIME
            self._hash = hash((Keys, self._length, total))
        return self._hash

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Keys):
            if self.parts == other.parts:  # runs compare by identity
                return True
            if self._length != other._length or hash(self) != hash(other):
                return False
            return all(a == b for a, b in zip(self, other))
        if isinstance(other, tuple):
            return len(other) == self._length and all(a == b for a, b in zip(self, other))
        return NotImplemented

    def __ne__(self, other: object) -> bool:
        equal = self.__eq__(other)
        return equal if equal is NotImplemented else not equal

    def __bool__(self) -> bool:
        return self._length > 0

    def __add__(self, other: object) -> tuple[KeyGroup, ...]:
        # a tuple's concatenation: `call.keys + (key,)` was tuple + tuple before keys were runs
        if isinstance(other, (tuple, Keys)):
            return (*self, *other)
        return NotImplemented

    def __radd__(self, other: object) -> tuple[KeyGroup, ...]:
        if isinstance(other, tuple):
            return (*other, *self)
        return NotImplemented

    def __repr__(self) -> str:
        return repr(tuple(self))

    def __reduce__(self) -> tuple[object, tuple[object, ...]]:
        return (Keys.of, (tuple(self),))


@dataclass(frozen=True, slots=True)
class ResolvedRule:
    """One rule with both sides resolved to group names (declaration order).

    ``span``/``text`` point at the rule in a pattern file; ``where`` names it
    when it came from a hand-written ``AttentionPattern`` list instead.
    """

    queries: tuple[str, ...]
    keys: Sequence[KeyGroup]
    """Held as :class:`Keys` (a tuple given is wrapped), equal to the tuple of the same groups."""
    span: Span | None = None
    text: str = ""
    where: str | None = None
    to_self: bool = False
    """From ``... -> self``: one rule per query group, whose keys are the group
    itself (for a family: each member attends to itself, not to its siblings)."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "keys", Keys.of(self.keys))

    @property
    def keys_values(self) -> tuple[str, ...]:
        return tuple(k.name for k in self.keys)

    @property
    def has_modifiers(self) -> bool:
        return any(k.modifiers for k in self.keys)

    def location(self) -> str:
        if self.span is not None:
            return f"line {self.span.line}"
        return self.where or "?"


@dataclass(frozen=True, slots=True)
class AttentionCall:
    """One attention call of a plan: the query groups of every rule with these
    exact keys (names and modifiers), in group order. One softmax per query
    over all of ``keys``."""

    queries: tuple[str, ...]
    keys: Sequence[KeyGroup]
    """Held as :class:`Keys` (a tuple given is wrapped)."""
    uniform_modifiers: Modifiers | None = field(init=False, compare=False, repr=False)
    """The modifiers every key group shares, or None when they differ (read
    on every forward: derived once, when the call is made)."""
    has_modifiers: bool = field(init=False, compare=False, repr=False)
    """Whether any key has a modifier: keys whose modifiers differ cannot all
    be empty. Derived once, so a traced forward reads a constant."""

    def __post_init__(self) -> None:
        keys = Keys.of(self.keys)
        object.__setattr__(self, "keys", keys)
        # per run, not per key: a block-causal call reads a slice of one run
        # of as many keys as members before it
        first = keys.parts[0][0].groups[keys.parts[0][1]].modifiers if keys else NO_MODIFIERS
        shared = (run.slice_modifiers(lo, hi) for run, lo, hi in keys.parts)
        same = all(m is not None and (m is first or m == first) for m in shared)
        uniform = first if same else None
        object.__setattr__(self, "uniform_modifiers", uniform)
        object.__setattr__(self, "has_modifiers", uniform is None or uniform.restricts)

    @property
    def key_names(self) -> tuple[str, ...]:
        return tuple(k.name for k in self.keys)

    def text(self) -> str:
        """``q1, q2 -> k1, k2[causal]`` (``q -> nothing`` for queries that read no key)."""
        keys = ", ".join(k.text() for k in self.keys) or "nothing"
        return f"{', '.join(self.queries)} -> {keys}"
