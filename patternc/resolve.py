"""Resolve selectors (names, globs, unions, exclusions) to sets of groups.

Resolution turns each syntax-tree rule into a :class:`ResolvedRule` whose
query side is a tuple of declared group names and whose key side lists each
key group with its modifiers, both in declaration order. Unknown names and
globs that match nothing become diagnostics; the rest of the selector still
resolves so every problem is reported in one run.

A key group's modifiers come from the selector that names it
(``text[causal]``), else from the rule (``a -> b [causal]``). A group named
both plainly and with modifiers (``text -> *, text[causal]``) takes the
modifiers: the more specific selection wins. Two different modifier lists
for one group are an error (E023).
"""

from __future__ import annotations

import bisect
import fnmatch
import re
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field

from patternc.diagnostics import Code, Diagnostic, NameIndex, Span, count_tokens, rename_fix
from patternc.ir import KeyGroup, ResolvedRule
from patternc.members import GRID_RELATIONS, MemberRelation, grid_axes, is_family
from patternc.modifiers import NO_MODIFIERS, Modifiers, Neighbourhood
from patternc.syntax import (
    Difference,
    Modified,
    ModifierList,
    Rule,
    Selector,
    SelectorUnion,
    Word,
    selector_words,
)

__all__ = ["SELF", "GroupResolver", "ResolvedRule", "RuleResolution", "is_family"]

_GLOB_QUESTIONS = 20
"""Distinct globs matching nothing that get a "did you mean" in one file
(each question reads every declared name)."""

SELF = "self"
"""The key side ``self``: each query group attends to itself (``doc* -> self``)."""

NOTHING = "nothing"
"""The key side ``nothing``: the queries read no key (``inputs -> nothing``)."""


@dataclass
class _Selection:
    """What a selector picked: groups, and modifiers given to some of them."""

    groups: set[str] = field(default_factory=set)
    modifiers: dict[str, tuple[Modifiers, Span]] = field(default_factory=dict)
    relations: dict[str, tuple[MemberRelation, Span]] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class RuleResolution:
    """A rule resolved: its rules (several for ``-> self``), its problems, and
    the groups its failing query selectors were probably meant to name (their
    "never a query" errors would only repeat the selector's)."""

    rules: tuple[ResolvedRule, ...]
    diagnostics: tuple[Diagnostic, ...]
    intended_queries: frozenset[str]


class GroupResolver:
    """Resolves selectors against one file's declared groups (built once per file).

    ``maybe_declared``: names that lines left out after a syntax error may
    declare (``gruops a b``); a selector naming only those is not reported
    unknown, since the syntax error is the one problem.
    """

    def __init__(
        self,
        groups: Sequence[str],
        *,
        maybe_declared: Collection[str] = (),
        shapes: Mapping[str, tuple[int, ...]] | None = None,
        bad_shapes: Collection[str] = (),
    ) -> None:
        self.groups = tuple(groups)
        self.shapes = dict(shapes or {})
        """Groups declared with a shape (``image[16, 16]``) and their shapes."""
        self.bad_shapes = frozenset(bad_shapes)
        """Groups whose shape was reported (E208): their neighbourhoods are not reported again."""
        self.index = {name: i for i, name in enumerate(self.groups)}
        self.names = NameIndex(self.groups)
        self.maybe_declared = frozenset(maybe_declared)
        self._unreported = 0
        self._globs: dict[str, str | None] = {}
        """Globs asked "did you mean" of, and the answers (at most ``_GLOB_QUESTIONS``)."""
        self._piece_sets: dict[tuple[str, int], set[str]] = {}
        self._glob_matches: dict[str, set[str]] = {}
        self._sorted: list[str] | None = None
        """Selectors left unresolved without a diagnostic (``maybe_declared``)."""

    def rule(self, rule: Rule) -> RuleResolution:
        """Resolve both sides of a rule. A side that resolves to nothing although
        each of its names is known (e.g. ``* - *``) is reported as empty.
        A rule with ``self`` among its keys becomes one rule per query group."""
        problems: list[Diagnostic] = []
        intended: set[str] = set()
        queries = self._side(rule.queries, "the query side of this rule", problems, intended, keys=False)
        ordered = self._ordered(queries.groups)
        rule_list = rule.modifiers
        rule_mods = rule_list.modifiers if rule_list is not None else NO_MODIFIERS
        if self._reads_nothing(rule, problems):
            nothing = ResolvedRule(ordered, (), rule.span, rule.text)
            return RuleResolution((nothing,), tuple(problems), frozenset(intended))
        others, selves = _split_self(rule.keys_values)
        key_groups: list[KeyGroup] = []
        if others is not None:
            keys = self._side(others, "the key/value side of this rule", problems, set(), keys=True)
            for name in self._ordered(keys.groups):
                mods, span = keys.modifiers.get(name, (rule_mods, None))
                relation = keys.relations.get(name)
                members = relation[0] if relation is not None else None
                if span is not None and rule_list is not None and rule_list.text():
                    problems.append(_two_lists(name, ModifierList(mods, span, members), rule_list))
                if members is None and rule_list is not None:
                    members = rule_list.members
                key_groups.append(KeyGroup(name, mods, members))
            key_groups = self._neighbourhoods(rule, ordered, key_groups, keys, problems)
            self._check_relations(rule, ordered, key_groups, keys, problems)
        if not selves:
            resolved_rule = ResolvedRule(ordered, tuple(key_groups), rule.span, rule.text)
            return RuleResolution((resolved_rule,), tuple(problems), frozenset(intended))
        # a neighbourhood on `self` whose queries all have shapes: each reads itself by coordinates
        shaped = all(q in self.shapes for q in ordered)

        def on_grid(listed: ModifierList | None) -> bool:
            return (
                shaped
                and listed is not None
                and listed.members is not None
                and (listed.members.kind in GRID_RELATIONS)
            )

        # once per `self`, not per query group: a problem of the list, not of a group
        for _, listed in selves:
            relation_list = listed if listed is not None else rule_list
            if relation_list is not None and relation_list.members is not None:
                if not on_grid(relation_list):
                    problems.extend(self._relation_on_self(relation_list, ordered))
            elif listed is not None and rule_list is not None and rule_list.text():
                problems.append(_two_lists(SELF, listed, rule_list))
        resolved = []
        for query in ordered:
            own = []
            for _, listed in selves:
                mods = listed.modifiers if listed is not None else rule_mods
                grid_list = listed if listed is not None else rule_list
                if on_grid(grid_list):
                    assert grid_list is not None and grid_list.members is not None
                    near = _Selection(relations={query: (grid_list.members, grid_list.span)})
                    key = KeyGroup(query, mods, grid_list.members)
                    own.extend(self._neighbourhoods(rule, (query,), [key], near, problems))
                    continue
                own.append(KeyGroup(query, mods, MemberRelation("self") if is_family(query) else None))
            repeated = next((k for k in key_groups if k.name == query), None)
            if repeated is not None and (repeated.members is None or repeated.members.includes_own_member()):
                problems.append(self._self_repeats(selves[0][0], query, repeated))
            resolved.append(
                ResolvedRule((query,), (*key_groups, *own[:1]), rule.span, rule.text, to_self=True)
            )
            if len(own) > 1:
                problems.append(self._self_repeats(selves[1][0], query, own[0]))
        return RuleResolution(tuple(resolved), tuple(problems), frozenset(intended))

    def _reads_nothing(self, rule: Rule, problems: list[Diagnostic]) -> bool:
        """``QUERIES -> nothing``: the queries read no key, their output is zero
        (``nothing`` is a word here only while no group is named so)."""
        keys = rule.keys_values
        if NOTHING in self.index or not any(w.text == NOTHING for w in selector_words(keys)):
            return False
        if not (isinstance(keys, Word) and keys.text == NOTHING) or rule.modifiers is not None:
            word = next(w for w in selector_words(keys) if w.text == NOTHING)
            problems.append(
                Diagnostic(
                    Code.MISPLACED_NOTHING,
                    "`nothing` must be the whole key side of a rule, without modifiers",
                    word.span,
                    "write `inputs -> nothing`: the queries read no key and their output is zero",
                )
            )
        return True

    def _check_relations(
        self,
        rule: Rule,
        queries: Sequence[str],
        keys: Sequence[KeyGroup],
        selection: _Selection,
        problems: list[Diagnostic],
    ) -> None:
        """Member relations need a family key and family queries (E025)."""
        for key in keys:
            if key.members is None:
                continue
            fallback = rule.modifiers.span if rule.modifiers else rule.span
            span = selection.relations[key.name][1] if key.name in selection.relations else fallback
            plain = [q for q in queries if not is_family(q)]
            axes = grid_axes(key.name)
            off_grid = not axes or any(grid_axes(q) != axes for q in queries)
            if key.members.kind in GRID_RELATIONS and key.name in self.bad_shapes:
                continue
            if key.members.kind in GRID_RELATIONS and off_grid:
                problems.append(
                    Diagnostic(
                        Code.MISPLACED_MEMBER_RELATION,
                        f"`{key.members.text()}` compares grid coordinates: `{key.name}` and the queries "
                        f"{_listed_names(queries)} must be grid families of as many axes",
                        span,
                        "declare a grid family with one `*` per axis "
                        "(`groups tile*_*`: tile0_0, tile0_1, ...), or one group with a shape "
                        "(`groups image[16, 16]`) for neighbourhoods of tokens",
                    )
                )
            elif key.members.per_axis and len(key.members.per_axis) != axes:
                problems.append(
                    Diagnostic(
                        Code.BAD_MODIFIER_ARGUMENT,
                        f"`{key.members.text()}` on `{key.name}`: {len(key.members.per_axis)} sizes for "
                        f"{axes} axes",
                        span,
                        f"give one number for every axis or one per axis (`[{key.members.kind} "
                        f"{' '.join(['3'] * axes)}]`)",
                    )
                )
            elif not is_family(key.name):
                problems.append(
                    Diagnostic(
                        Code.MISPLACED_MEMBER_RELATION,
                        f"`{key.members.text()}` on `{key.name}`, which is not a family: "
                        "member relations compare members of families",
                        span,
                        "put it on a family key (`frame* -> frame*[upto]`), or drop it",
                    )
                )
            elif plain:
                problems.append(
                    Diagnostic(
                        Code.MISPLACED_MEMBER_RELATION,
                        f"`{key.members.text()}` on `{key.name}` with queries {_listed_names(plain)} "
                        "that are not families: they have no member to compare",
                        span,
                        "give the relation only in rules whose queries are families",
                    )
                )
            else:
                continue
            return

    def _neighbourhoods(
        self,
        rule: Rule,
        queries: Sequence[str],
        keys: list[KeyGroup],
        selection: _Selection,
        problems: list[Diagnostic],
    ) -> list[KeyGroup]:
        """``near``/``kernel`` on a shaped key compare token coordinates: each
        becomes the key's :class:`~patternc.modifiers.Neighbourhood` (E025,
        E021, E023 when it cannot)."""
        out = []
        for key in keys:
            shape = self.shapes.get(key.name)
            if key.members is None or key.members.kind not in GRID_RELATIONS or not shape:
                out.append(key)
                continue
            fallback = rule.modifiers.span if rule.modifiers else rule.span
            span = selection.relations[key.name][1] if key.name in selection.relations else fallback
            relation = key.members
            said = f"`{relation.text()}` on `{key.name}{list(shape)}`"
            others = [q for q in queries if self.shapes.get(q) != shape]
            problem = None
            if others:
                problem = Diagnostic(
                    Code.MISPLACED_MEMBER_RELATION,
                    f"{said} compares token coordinates: the queries {_listed_names(others)} "
                    f"do not have the shape {list(shape)}",
                    span,
                    f"give the neighbourhood in a rule whose queries are `{key.name}` "
                    f"(`{key.name} -> {key.name}[{relation.text()}]`) or share its shape",
                )
            elif relation.per_axis and len(relation.per_axis) != len(shape):
                problem = Diagnostic(
                    Code.BAD_MODIFIER_ARGUMENT,
                    f"{said}: {len(relation.per_axis)} sizes for {len(shape)} axes",
                    span,
                    f"give one number for every axis or one per axis (`[{relation.kind} "
                    f"{' '.join(['3'] * len(shape))}]`)",
                )
            elif relation.kind == "kernel" and any(k > n for k, n in zip(relation.sizes(len(shape)), shape)):
                axis, (k, n) = next((a, kn) for a, kn in enumerate(zip(relation.sizes(len(shape)), shape))
                                    if kn[0] > kn[1])  # fmt: skip
                problem = Diagnostic(
                    Code.BAD_MODIFIER_ARGUMENT,
                    f"{said}: a kernel of {k} is wider than axis {axis} ({count_tokens(n)})",
                    span,
                    f"a kernel spans at most its axis: `kernel {n}` on that axis reads all of it",
                )
            elif key.modifiers:
                problem = Diagnostic(
                    Code.CONFLICTING_MODIFIERS,
                    f"{said} beside `{', '.join(key.modifiers.parts())}`: a neighbourhood stands alone "
                    "in its list",
                    span,
                    f"write `{key.name}[{relation.text()}]` alone",
                )
            if problem is not None:
                problems.append(problem)
                out.append(KeyGroup(key.name, key.modifiers))
                continue
            grid = Neighbourhood(relation.kind, shape, relation.sizes(len(shape)))
            out.append(KeyGroup(key.name, Modifiers(grid=grid)))
        return out

    def _relation_on_self(self, listed: ModifierList, queries: Sequence[str]) -> list[Diagnostic]:
        """A member relation on ``self`` (E025), or a neighbourhood on
        ``self`` for groups that are not all shaped: none when one of them
        had its shape refused (E208 said it)."""
        relation = listed.members
        assert relation is not None
        if relation.kind in GRID_RELATIONS and any(q in self.bad_shapes for q in queries):
            return []
        if relation.kind not in GRID_RELATIONS or any(is_family(q) for q in queries):
            return [
                Diagnostic(
                    Code.MISPLACED_MEMBER_RELATION,
                    f"`{relation.text()}` on `self`: `self` is the query group itself",
                    listed.span,
                    "drop it, or name the family instead of `self` (`frame*[upto]`)",
                )
            ]
        unshaped = [q for q in queries if q not in self.shapes]
        shaped = next((q for q in queries if q in self.shapes), None)
        example = f"`{shaped} -> {shaped}[{relation.text()}]`" if shaped else "`groups image[16, 16]`"
        return [
            Diagnostic(
                Code.MISPLACED_MEMBER_RELATION,
                f"`{relation.text()}` on `self` compares token coordinates: the queries "
                f"{_listed_names(unshaped)} have no shape",
                listed.span,
                f"declare each query group with its shape (`groups {unshaped[0]}[...]`), or give the "
                f"neighbourhood in a rule whose queries all have one ({example})",
            )
        ]

    @staticmethod
    def _self_repeats(word: Word, query: str, key: KeyGroup) -> Diagnostic:
        return Diagnostic(
            Code.SELF_REPEATS_KEY,
            f"`self` repeats `{key.text()}`, which already selects `{query}` itself",
            word.span,
            "drop `self`, or select the other groups only "
            f"(`{query} -> {query}[before], self` reads earlier members and itself)"
            if is_family(query)
            else f"drop `self` or `{query}` from the keys",
        )

    def select(self, node: Selector, what: str) -> tuple[tuple[str, ...], list[Diagnostic]]:
        """Groups ``node`` selects, in declaration order (no modifiers allowed:
        ``types`` blocks); ``what`` names the selector when it selects nothing."""
        problems: list[Diagnostic] = []
        selection = self._side(node, what, problems, set(), keys=False)
        return self._ordered(selection.groups), problems

    def _side(
        self, node: Selector, what: str, problems: list[Diagnostic], intended: set[str], *, keys: bool
    ) -> _Selection:
        before, unreported = len(problems), self._unreported
        selection = self._selector(node, problems, intended, keys=keys, excluded=False)
        if not selection.groups and len(problems) == before and self._unreported == unreported:
            problems.append(
                Diagnostic(
                    Code.EMPTY_SELECTOR,
                    f"{what} selects no group",
                    node.span,
                    "an exclusion removed every group it started with",
                )
            )
        return selection

    def _selector(
        self, node: Selector, problems: list[Diagnostic], intended: set[str], *, keys: bool, excluded: bool
    ) -> _Selection:
        if isinstance(node, Word):
            return _Selection(self._word(node, problems, intended))
        if isinstance(node, SelectorUnion):
            out = _Selection()
            for item in node.items:
                part = self._selector(item, problems, intended, keys=keys, excluded=excluded)
                out.groups |= part.groups
                self._merge_modifiers(out, part, problems)
                for name, relation in part.relations.items():
                    self._merge_relation(out, name, relation, problems)
            return out
        if isinstance(node, Modified):
            inner = self._selector(node.inner, problems, intended, keys=keys, excluded=excluded)
            if not keys or excluded:
                where = "an exclusion" if excluded else "this side"
                problems.append(
                    Diagnostic(
                        Code.MISPLACED_MODIFIER,
                        f"modifiers {node.modifiers.text()} mean nothing in {where}",
                        node.modifiers.span,
                        "modifiers belong to key groups: `queries -> keys[causal]`, or after the rule",
                    )
                )
                return _Selection(inner.groups)
            mods = node.modifiers.modifiers
            listed = node.modifiers.members
            if listed is not None:
                for name in inner.groups:
                    self._merge_relation(inner, name, (listed, node.modifiers.span), problems)
            for name in inner.groups:
                own = inner.modifiers.get(name)
                if own is not None and own[0] != mods:
                    problems.append(self._conflict(name, own[0], mods, node.modifiers.span))
                inner.modifiers[name] = (mods if own is None else own[0], node.modifiers.span)
            return inner
        assert isinstance(node, Difference)
        left = self._selector(node.left, problems, intended, keys=keys, excluded=excluded)
        right = self._selector(node.right, problems, intended, keys=keys, excluded=True)
        kept = left.groups - right.groups
        return _Selection(
            kept,
            {g: m for g, m in left.modifiers.items() if g in kept},
            {g: r for g, r in left.relations.items() if g in kept},
        )

    def _merge_modifiers(self, out: _Selection, part: _Selection, problems: list[Diagnostic]) -> None:
        for name, (mods, span) in part.modifiers.items():
            first = out.modifiers.get(name)
            if first is not None and first[0] != mods:
                problems.append(self._conflict(name, first[0], mods, span))
                continue
            out.modifiers.setdefault(name, (mods, span))

    @staticmethod
    def _merge_relation(
        out: _Selection, name: str, relation: tuple[MemberRelation, Span], problems: list[Diagnostic]
    ) -> None:
        """The relation of ``name`` in ``out``: the one given, or E023 where
        another was given already (the first is kept)."""
        first = out.relations.setdefault(name, relation)
        if first[0] != relation[0]:
            problems.append(
                Diagnostic(
                    Code.CONFLICTING_MODIFIERS,
                    f"`{name}` is given two relations: [{first[0].text()}] and [{relation[0].text()}]",
                    relation[1],
                    "select each key group with one relation",
                )
            )

    @staticmethod
    def _conflict(name: str, first: Modifiers, second: Modifiers, span: Span) -> Diagnostic:
        return Diagnostic(
            Code.CONFLICTING_MODIFIERS,
            f"`{name}` is given modifiers twice: {first.text() or '(none)'} and {second.text()}",
            span,
            "select each key group with one modifier list",
        )

    def _word(self, node: Word, problems: list[Diagnostic], intended: set[str]) -> set[str]:
        if node.is_glob:
            matched = self.glob(node.text)
            match = re.compile(fnmatch.translate(node.text)).match
            if not matched and any(match(g) for g in self.maybe_declared):
                self._unreported += 1
            elif not matched:
                problems.append(self._glob_matches_nothing(node, intended))
            return matched
        if node.text == SELF:
            problems.append(
                Diagnostic(
                    Code.MISPLACED_SELF,
                    "`self` can only stand among the keys of a rule, not inside a group or exclusion",
                    node.span,
                    "write `a, b -> self` or `answer* -> question, self[causal]`",
                )
            )
            return set()
        if node.text not in self.index:
            if node.text in self.maybe_declared:
                self._unreported += 1
                return set()
            meant = self.names.closest(node.text)
            if meant is not None:
                intended.add(meant)
            problems.append(
                Diagnostic(
                    Code.UNKNOWN_GROUP,
                    f"unknown group `{node.text}`",
                    node.span,
                    f"did you mean `{meant}`?" if meant else "declare it with `groups ...`",
                    fix=rename_fix(node.span, node.text, meant) if meant else None,
                )
            )
            return set()
        return {node.text}

    def _glob_matches_nothing(self, node: Word, intended: set[str]) -> Diagnostic:
        """E202 with the glob it most likely meant (its literal start or end
        respelt after the declared names); on the query side the groups that
        glob selects are ``intended`` (their "never a query" would repeat this)."""
        meant = self._closest_glob(node.text)
        if meant is not None:
            intended.update(self.glob(meant))
            hint = f"did you mean `{meant}`?"
        elif self.groups:
            shown = ", ".join(f"`{g}`" for g in self.groups[:8])
            hint = f"declared groups: {shown}" + (" ..." if len(self.groups) > 8 else "")
        else:
            hint = "no group is declared: add a `groups ...` line"
        return Diagnostic(
            Code.GLOB_MATCHES_NOTHING,
            f"glob `{node.text}` matches no group",
            node.span,
            hint,
            fix=rename_fix(node.span, node.text, meant) if meant is not None else None,
        )

    def _closest_glob(self, glob: str) -> str | None:
        if glob not in self._globs and len(self._globs) < _GLOB_QUESTIONS:
            self._globs[glob] = self._respelt_glob(glob)
        return self._globs.get(glob)

    def _pieces(self, side: str, n: int) -> set[str]:
        """The declared names' first (``head``) or last ``n`` characters."""
        key = (side, n)
        if key not in self._piece_sets:
            ends = (g[:n] if side == "head" else g[-n:] for g in self.groups if len(g) >= n)
            self._piece_sets[key] = set(ends)
        return self._piece_sets[key]

    def _respelt_glob(self, glob: str) -> str | None:
        wild = [i for i, char in enumerate(glob) if char in "*?"]
        head, middle, tail = glob[: wild[0]], glob[wild[0] : wild[-1] + 1], glob[wild[-1] + 1 :]
        for side in ("head", "tail"):
            part = head if side == "head" else tail
            if not part:
                continue
            # the declared names' starts (ends) of about the part's length
            pieces: set[str] = set()
            for n in range(max(1, len(part) - 2), len(part) + 3):
                pieces |= self._pieces(side, n)
            meant = NameIndex(pieces, budget=1).closest(part)
            if meant is None or meant == part:
                continue
            head, tail = (meant, tail) if side == "head" else (head, meant)
            candidate = head + middle + tail
            if self.glob(candidate):
                return candidate
        return None

    def glob(self, pattern: str) -> set[str]:
        """The declared groups a glob matches. Only names that start with the
        glob's literal head are tried (a range of the sorted names), so a
        glob costs what it matches, not the number of groups."""
        if pattern not in self._glob_matches:
            match = re.compile(fnmatch.translate(pattern)).match
            head = re.split(r"[*?]", pattern, maxsplit=1)[0]
            if self._sorted is None:
                self._sorted = sorted(self.groups)
            names = self._sorted
            if head:
                names = names[
                    bisect.bisect_left(names, head) : bisect.bisect_left(names, head + "\U0010ffff")
                ]
            self._glob_matches[pattern] = {g for g in names if match(g)}
        return set(self._glob_matches[pattern])

    def _ordered(self, selected: set[str]) -> tuple[str, ...]:
        return tuple(sorted(selected, key=self.index.__getitem__))


def _is_self(node: Selector) -> bool:
    inner = node.inner if isinstance(node, Modified) else node
    return isinstance(inner, Word) and inner.text == SELF


def _split_self(keys: Selector) -> tuple[Selector | None, list[tuple[Word, ModifierList | None]]]:
    """The key selector without its top-level ``self`` items, and those items
    (each with its own modifier list, if any)."""
    items = keys.items if isinstance(keys, SelectorUnion) else (keys,)
    selves: list[tuple[Word, ModifierList | None]] = []
    others: list[Selector] = []
    for item in items:
        if not _is_self(item):
            others.append(item)
        elif isinstance(item, Modified):
            assert isinstance(item.inner, Word)
            selves.append((item.inner, item.modifiers))
        else:
            assert isinstance(item, Word)
            selves.append((item, None))
    if not selves:
        return keys, []
    if not others:
        return None, selves
    if len(others) == 1:
        return others[0], selves
    first, last = others[0].span, others[-1].span
    span = Span(first.line, first.column, last.end_line, last.end_column)
    return SelectorUnion(tuple(others), span), selves


def _two_lists(name: str, own: ModifierList, rule: ModifierList) -> Diagnostic:
    """E023: a key with its own list in a rule that has one too."""
    return Diagnostic(
        Code.CONFLICTING_MODIFIERS,
        f"`{name}` has modifiers {own.text()} here and {rule.text()} for the whole rule",
        own.span,
        "give the group's modifiers in one place: after the group or after the rule",
    )


def _listed_names(names: Sequence[str]) -> str:
    shown = ", ".join(f"`{n}`" for n in names[:3])
    return shown + (f" and {len(names) - 3} more" if len(names) > 3 else "")
