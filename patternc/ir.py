"""The compiler's intermediate records, shared by every later stage.

A pattern file becomes :class:`ResolvedRule` values (both sides resolved to
group names, each key group with its modifiers); a plan merges rules with the
same keys into :class:`AttentionCall` values, one per attention call. Laid
out at concrete sizes (:mod:`patternc.lower.layout`) each call becomes one
:class:`~patternc.lower.layout.Call` that every executor reads as it is.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from patternc.diagnostics import Span
from patternc.members import MemberRelation
from patternc.modifiers import NO_MODIFIERS, Modifiers

__all__ = ["AttentionCall", "KeyGroup", "ResolvedRule"]


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


@dataclass(frozen=True, slots=True)
class ResolvedRule:
    """One rule with both sides resolved to group names (declaration order).

    ``span``/``text`` point at the rule in a pattern file; ``where`` names it
    when it came from a hand-written ``AttentionPattern`` list instead.
    """

    queries: tuple[str, ...]
    keys: tuple[KeyGroup, ...]
    span: Span | None = None
    text: str = ""
    where: str | None = None
    to_self: bool = False
    """From ``... -> self``: one rule per query group, whose keys are the group
    itself (for a family: each member attends to itself, not to its siblings)."""

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
    keys: tuple[KeyGroup, ...]
    uniform_modifiers: Modifiers | None = field(init=False, compare=False, repr=False)
    """The modifiers every key group shares, or None when they differ (read
    on every forward: derived once, when the call is made)."""

    def __post_init__(self) -> None:
        # identity first: bound family keys share their modifier lists, and
        # a block-causal call has as many keys as members before it
        first = self.keys[0].modifiers if self.keys else NO_MODIFIERS
        same = all(k.modifiers is first or k.modifiers == first for k in self.keys)
        object.__setattr__(self, "uniform_modifiers", first if same else None)

    @property
    def key_names(self) -> tuple[str, ...]:
        return tuple(k.name for k in self.keys)

    @property
    def has_modifiers(self) -> bool:
        # keys whose modifiers differ cannot all be empty
        uniform = self.uniform_modifiers
        return uniform is None or bool(uniform)

    def text(self) -> str:
        """``q1, q2 -> k1, k2[causal]`` (``q -> nothing`` for queries that read no key)."""
        keys = ", ".join(k.text() for k in self.keys) or "nothing"
        return f"{', '.join(self.queries)} -> {keys}"
