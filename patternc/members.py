"""Members of families: which run-time groups belong to which family, their
order, and the member relations that rules may put on family keys.

A family (``frame*``) stands for any number of run-time groups (``frame0``,
``frame1``, ...); a family with parts (``groups doc*{prefix, text}``) stands
for groups named ``<member>.<part>`` (``doc0.prefix``, ``doc0.text``,
``doc1.text``, ...), where one member may have any of the parts, in input
order. A member's *ordinal* is its place among its family's members in the
input (the first member seen is 0), whatever the digits in its name say.

Member relations compare the ordinals of a query member and a key member,
each in its own family, so ``text* -> image*[same]`` reads image ``k`` from
text run ``k``:

- ``same``: the key member is the query's (``k' == k``);
- ``before`` / ``before N``: members earlier than the query's (``k' < k``;
  with ``N``: the ``N`` members just before it);
- ``upto`` / ``upto N``: ``before`` and the query's own member;
- ``self`` (written as the key ``self``): the query group itself.

A *grid* family has one ``*`` per coordinate, joined by ``_``
(``groups tile*_*``: ``tile0_0``, ``tile0_1``, ...): each ``*`` stands for a
whole number, the member's coordinate on that axis. Two more relations
compare coordinates:

- ``near N``: every coordinate within ``N`` of the query's (cut off at the
  edges of the grid);
- ``kernel K``: a ``K``-member window on every axis, centred on the query's
  member and shifted inwards at the edges so it always holds ``K`` members
  (when the grid is that wide), as NATTEN and sliding tile attention do.
  The grid's extent on each axis is the largest coordinate present, plus one.

Relations choose group pairs when a plan is bound; the token modifiers of a
pair (``causal``, windows) still apply within it. This module is torch-free
and below the plan: binding (:mod:`patternc.lower.bind`) uses it.
"""

from __future__ import annotations

import bisect
import functools
import itertools
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

from patternc.diagnostics import closest

__all__ = [
    "MEMBER_RELATION_DOCS",
    "MEMBER_RELATION_NAMES",
    "FamilyMembers",
    "MemberRelation",
    "abbreviate_members",
    "family_root",
    "grid_axes",
    "is_family",
    "member_hint",
    "member_of",
    "part_name",
    "type_stem",
]

MEMBER_RELATION_NAMES = ("same", "before", "upto", "near", "kernel")
"""The relation words of a modifier list (``self`` is written as a key)."""

MEMBER_RELATION_DOCS = {
    "same": "same: the query's own member of the key family",
    "before": "before [N]: members earlier than the query's (the N just before it)",
    "upto": "upto [N]: the query's member and those before it (the N just before it)",
    "near": "near N: grid members (or, on a shaped group, tokens) within N of the query's on every axis",
    "kernel": "kernel K: a K-wide window of grid members (or, on a shaped group, tokens) on every axis, "
    "kept inside the grid; `kernel 3 7 7`: one size per axis",
}
"""One line per relation word, for editors."""

RelationKind = Literal["self", "same", "before", "upto", "near", "kernel"]
GRID_RELATIONS = ("near", "kernel")
"""Relations that compare a grid family's coordinates."""

_GRID = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\*(?:_\*)+")
"""A grid family's name: ``tile*_*``, ``cell*_*_*``."""


def grid_axes(name: str) -> int:
    """How many coordinates a grid family's members have (0: not a grid)."""
    return name.count("*") if _GRID.fullmatch(name) else 0


def is_family(name: str) -> bool:
    """A declared ``prefix*`` (or a part of one, ``doc*.text``) stands for
    every run-time group of that shape, however many there are."""
    return "*" in name


def family_root(name: str) -> str:
    """The family a group belongs to: ``doc*`` for ``doc*.text``."""
    return name.split(".", 1)[0]


def part_name(name: str) -> str | None:
    """The part of a family part (``text`` for ``doc*.text``), else None."""
    return name.split(".", 1)[1] if "." in name else None


@dataclass(frozen=True, slots=True)
class MemberRelation:
    """Which members of a key family a query member reads (see the module)."""

    kind: RelationKind
    count: int | None = None
    """``before N`` / ``upto N``: how many members back (None: all of them)."""
    per_axis: tuple[int, ...] = ()
    """``near``/``kernel`` with one number per axis (``kernel 3 7 7``);
    empty: ``count`` on every axis."""

    def text(self) -> str:
        if self.per_axis:
            return f"{self.kind} {' '.join(map(str, self.per_axis))}"
        return self.kind if self.count is None else f"{self.kind} {self.count}"

    def sizes(self, axes: int) -> tuple[int, ...]:
        """``near``/``kernel``: the number of each of ``axes`` axes."""
        assert self.count is not None
        return self.per_axis or (self.count,) * axes

    def includes_own_member(self) -> bool:
        """Whether the query's own member is among the keys it selects."""
        return self.kind != "before"

    def box(self, query: tuple[int, ...], extent: tuple[int, ...]) -> list[tuple[int, int]]:
        """``near``/``kernel``: key coordinates ``[lo, hi)`` per axis for a
        query member at ``query`` in a grid of ``extent``."""
        out = []
        for at, size, count in zip(query, extent, self.sizes(len(query))):
            if self.kind == "near":
                out.append((max(0, at - count), min(size, at + count + 1)))
            elif size <= count:
                out.append((0, size))
            else:
                left = count // 2
                right = count - 1 - left
                centre = min(max(at, left), size - 1 - right)
                out.append((centre - left, centre + right + 1))
        return out

    def ordinals(self, query: int) -> tuple[int, int]:
        """Key ordinals ``[lo, hi)`` this relation admits for query ordinal ``query``."""
        if self.kind in ("self", "same"):
            return query, query + 1
        hi = query if self.kind == "before" else query + 1
        lo = 0 if self.count is None else max(0, query - self.count)
        return lo, hi


def type_stem(group: str) -> str:
    """What a group's default type is read from: a family's prefix
    (``doc`` for ``doc*``), a part's name (``text`` for ``doc*.text``,
    ``answer`` for ``qa*.answer*``), else the group's name."""
    return (part_name(group) or group).rstrip("*")


def member_of(name: str, families: Iterable[str]) -> str | None:
    """The family (of ``families``) that run-time group ``name`` belongs to, else None."""
    ordered = sorted(families, key=_specificity, reverse=True)
    return next((f for f in ordered if _matcher(f).fullmatch(name)), None)


def _specificity(family: str) -> tuple[int, int]:
    """Families a name may belong to are tried most specific first: most
    literal characters (``doc_title*`` before ``doc*``, ``tile*_*`` before
    ``tile*``), then fewest ``*`` (the part ``doc*.a`` before ``doc*.a*``)."""
    return len(family.replace("*", "")), -family.count("*")


@functools.lru_cache(maxsize=1024)
def _matcher(family: str) -> re.Pattern[str]:
    """Run-time names of a family: ``doc*`` matches any name that starts
    with ``doc``; in a part (``doc*.text``) each ``*`` matches no dot."""
    if grid_axes(family):
        return re.compile("([0-9]+)".join(re.escape(piece) for piece in family.split("*")))
    if "." not in family:
        return re.compile(re.escape(family[:-1]) + ".*", re.DOTALL)
    return re.compile("[^.]*".join(re.escape(piece) for piece in family.split("*")))


def member_hint(name: str, families: Iterable[str]) -> str | None:
    """For a run-time name that belongs to no family: how the family it
    looks like names its members (``doc0`` when ``doc*`` has parts,
    ``doc0.txt``, ``tile_a_b`` for the grid ``tile*_*``), else None."""
    member, dot, part = name.partition(".")
    parts: dict[str, list[str]] = {}
    for family in families:
        if "." in family:
            parts.setdefault(family_root(family), []).append(family.split(".", 1)[1])
    for root, listed in parts.items():
        if not _matcher(root).fullmatch(member):
            continue
        shown = ", ".join(listed)
        if not dot:
            named = ", ".join(f"`{member}.{p.replace('*', '0')}`" for p in listed)
            return f"members of `{root}` are named by their parts: {named}"
        meant = closest(part, [p.rstrip("*") for p in listed])
        said = f"`{root}` has the parts {shown}"
        return f"did you mean `{member}.{meant}`? ({said})" if meant else said
    for family in families:
        pieces = family.split("*")
        if grid_axes(family) and re.fullmatch("(.*)".join(map(re.escape, pieces)), name, re.DOTALL):
            example = "".join(p + (str(i) if i < len(pieces) - 1 else "") for i, p in enumerate(pieces))
            return f"`{family}` takes whole-number coordinates: `{example}`"
    return None


@dataclass(frozen=True)
class FamilyMembers:
    """The run-time groups of each family, in input order, with their ordinals.

    Built once per tuple of run-time names when a plan is bound.
    """

    members: dict[str, list[str]]
    """Family group -> its run-time groups, in input order."""
    family_of: dict[str, str]
    """Run-time group -> its family group."""
    ordinal: dict[str, int]
    """Run-time group -> its member's ordinal in its family."""
    unmatched: tuple[str, ...]
    """Names that are neither declared groups nor members of a family."""
    by_ordinal: dict[str, tuple[list[int], list[str]]]
    """Family group -> its members' ordinals (sorted) and the members in that order."""
    coordinates: dict[str, tuple[int, ...]]
    """Run-time group of a grid family -> its coordinates."""
    by_coordinates: dict[str, dict[tuple[int, ...], str]]
    """Grid family -> its members by coordinates."""
    extent: dict[str, tuple[int, ...]]
    """Grid family -> the largest coordinate on each axis, plus one."""
    same_place: tuple[tuple[str, str, str], ...] = ()
    """``(grid family, member, member)``: two members at the same coordinates
    (``t0_1`` and ``t00_1``); binding refuses them."""

    @classmethod
    def of(cls, families: Sequence[str], concrete: Iterable[str], names: Sequence[str]) -> FamilyMembers:
        declared = set(concrete)
        ordered = sorted(families, key=_specificity, reverse=True)
        matchers = [(f, _matcher(f)) for f in ordered]
        members: dict[str, list[str]] = {f: [] for f in families}
        family_of: dict[str, str] = {}
        ordinal: dict[str, int] = {}
        seen: dict[str, dict[str, int]] = {}
        unmatched = []
        for name in dict.fromkeys(names):
            if name in declared:
                continue
            family = next((f for f, m in matchers if m.fullmatch(name)), None)
            if family is None:
                unmatched.append(name)
                continue
            members[family].append(name)
            family_of[name] = family
            ids = seen.setdefault(family_root(family), {})
            member_id = name.split(".", 1)[0] if "." in family else name
            ordinal[name] = ids.setdefault(member_id, len(ids))
        by_ordinal = {}
        for family, names_of in members.items():
            pairs = sorted((ordinal[m], i) for i, m in enumerate(names_of))
            by_ordinal[family] = ([o for o, _ in pairs], [names_of[i] for _, i in pairs])
        coordinates: dict[str, tuple[int, ...]] = {}
        by_coordinates: dict[str, dict[tuple[int, ...], str]] = {}
        extent: dict[str, tuple[int, ...]] = {}
        same_place: list[tuple[str, str, str]] = []
        for family, names_of in members.items():
            axes = grid_axes(family)
            if not axes:
                continue
            matcher = _matcher(family)
            at = by_coordinates.setdefault(family, {})
            for name in names_of:
                match = matcher.fullmatch(name)
                assert match is not None
                coordinates[name] = at_of = tuple(int(v) for v in match.groups())
                if at_of in at:
                    same_place.append((family, at[at_of], name))
                    continue
                at[at_of] = name
            extent[family] = tuple(max((c[i] for c in at), default=-1) + 1 for i in range(axes))
        return cls(
            members,
            family_of,
            ordinal,
            tuple(unmatched),
            by_ordinal,
            coordinates,
            by_coordinates,
            extent,
            tuple(same_place),
        )

    def expand(self, groups: Iterable[str]) -> tuple[str, ...]:
        """Declared groups with each family replaced by its members (rules)."""
        return tuple(m for g in groups for m in (self.members[g] if g in self.members else (g,)))

    def token_order(self, groups: Sequence[str], names: Sequence[str]) -> tuple[str, ...]:
        """The run-time groups in token order: declared groups in their
        order, each family at its first group's place with the members of
        all its parts in input order (``doc0.prefix, doc0.text, doc1.prefix``)."""
        by_root: dict[str, list[str]] = {}
        for name in dict.fromkeys(names):
            family = self.family_of.get(name)
            if family is not None:
                by_root.setdefault(family_root(family), []).append(name)
        out: list[str] = []
        placed: set[str] = set()
        for group in groups:
            if group not in self.members:
                out.append(group)
                continue
            root = family_root(group)
            if root not in placed:
                placed.add(root)
                out.extend(by_root.get(root, ()))
        return tuple(out)

    def related(self, query: str, family: str, relation: MemberRelation) -> list[str]:
        """The members of ``family`` that run-time group ``query`` reads under ``relation``."""
        if relation.kind == "self":
            return [query]
        if relation.kind in GRID_RELATIONS:
            at = self.by_coordinates.get(family, {})
            box = relation.box(self.coordinates[query], self.extent.get(family, ()))
            return [at[c] for c in itertools.product(*(range(lo, hi) for lo, hi in box)) if c in at]
        lo, hi = self.span(query, family, relation)
        return self.by_ordinal.get(family, ([], []))[1][lo:hi]

    def span(self, query: str, family: str, relation: MemberRelation) -> tuple[int, int]:
        """For a relation on ordinals (``same``, ``before``, ``upto``): the
        members of ``family`` that ``query`` reads, as a range ``[lo, hi)``
        of the members in ordinal order (``by_ordinal[family][1]``), so
        binding slices lists made once per family instead of building one
        list per query."""
        ordinals = self.by_ordinal.get(family, ([], []))[0]
        lo, hi = relation.ordinals(self.ordinal[query])
        return bisect.bisect_left(ordinals, lo), bisect.bisect_left(ordinals, hi)


_NUMBERED = re.compile(r"([A-Za-z_]+)(\d+)(.*)", re.S)
_SHORTEST_RUN = 4


def abbreviate_members(texts: Sequence[str]) -> str:
    """``texts`` joined by commas, each run of four or more consecutively
    numbered members written ``first..last`` (``prompt, frame0..frame50``;
    ``doc0.text..doc9.text``): a block-causal call reads every earlier
    member, and listing them makes a report grow with the square of the
    members. Entries whose numbers do not follow on are listed as given."""
    out: list[str] = []
    run: list[str] = []
    last: tuple[str, int, str] | None = None

    def flush() -> None:
        if len(run) >= _SHORTEST_RUN:
            out.append(f"{run[0]}..{run[-1]}")
        else:
            out.extend(run)
        run.clear()

    for text in texts:
        match = _NUMBERED.fullmatch(text)
        key = (match[1], int(match[2]), match[3]) if match else None
        follows = (
            key is not None
            and last is not None
            and key[0] == last[0]
            and key[2] == last[2]
            and key[1] == last[1] + 1
        )
        if not follows:
            flush()
        run.append(text)
        last = key
    flush()
    return ", ".join(out)
