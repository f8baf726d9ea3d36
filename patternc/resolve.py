"""Resolve selectors (names, globs, unions, exclusions) to sets of groups.

Resolution turns each syntax-tree rule into a :class:`ResolvedRule` whose
query and key/value sides are tuples of declared group names, in declaration
order. Unknown names and globs that match nothing become diagnostics; the
rest of the selector still resolves so every problem is reported in one run.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Sequence
from dataclasses import dataclass

from patternc.diagnostics import Code, Diagnostic, Span, suggest
from patternc.modifiers import NO_MODIFIERS, Modifiers
from patternc.syntax import Rule, Selector, SelectorUnion, Word

__all__ = ["SELF", "GroupResolver", "ResolvedRule", "is_family"]

SELF = "self"
"""The key side ``self``: each query group attends to itself (``doc* -> self``)."""


def is_family(name: str) -> bool:
    """A declared ``prefix*`` stands for every group whose name starts with
    ``prefix``, however many there are at run time (see :meth:`Plan.bind`)."""
    return name.endswith("*")


@dataclass(frozen=True, slots=True)
class ResolvedRule:
    """One rule with both sides resolved to group names (declaration order).

    ``span``/``text`` point at the rule in a pattern file; ``where`` names it
    when it came from a hand-written ``AttentionPattern`` list instead.
    """

    queries: tuple[str, ...]
    keys_values: tuple[str, ...]
    span: Span | None = None
    text: str = ""
    where: str | None = None
    modifiers: Modifiers = NO_MODIFIERS
    to_self: bool = False
    """From ``... -> self``: one rule per query group, whose keys are the group
    itself (for a family: each member attends to itself, not to its siblings)."""

    def location(self) -> str:
        if self.span is not None:
            return f"line {self.span.line}"
        return self.where or "?"


class GroupResolver:
    """Resolves selectors against one file's declared groups (built once per file)."""

    def __init__(self, groups: Sequence[str]) -> None:
        self.groups = tuple(groups)
        self.index = {name: i for i, name in enumerate(self.groups)}

    def rule(self, rule: Rule) -> tuple[tuple[ResolvedRule, ...], list[Diagnostic]]:
        """Resolve both sides of a rule. A side that resolves to nothing although
        each of its names is known (e.g. ``* - *``) is reported as empty.
        ``QUERIES -> self`` becomes one rule per query group."""
        queries, diagnostics = self.select(rule.queries, "the query side of this rule")
        if isinstance(rule.keys_values, Word) and rule.keys_values.text == SELF:
            return tuple(
                ResolvedRule((q,), (q,), rule.span, rule.text, modifiers=rule.modifiers, to_self=True)
                for q in queries
            ), diagnostics
        keys_values, problems = self.select(rule.keys_values, "the key/value side of this rule")
        resolved = ResolvedRule(queries, keys_values, rule.span, rule.text, modifiers=rule.modifiers)
        return (resolved,), diagnostics + problems

    def select(self, node: Selector, what: str) -> tuple[tuple[str, ...], list[Diagnostic]]:
        """Groups ``node`` selects, in declaration order; ``what`` names the
        selector in the message when it ends up selecting nothing."""
        problems: list[Diagnostic] = []
        resolved = self._ordered(self._selector(node, problems))
        if not resolved and not problems:
            problems.append(
                Diagnostic(
                    Code.EMPTY_SELECTOR,
                    f"{what} selects no group",
                    node.span,
                    "an exclusion removed every group it started with",
                )
            )
        return resolved, problems

    def _selector(self, node: Selector, problems: list[Diagnostic]) -> set[str]:
        if isinstance(node, Word):
            return self._word(node, problems)
        if isinstance(node, SelectorUnion):
            selected: set[str] = set()
            for item in node.items:
                selected |= self._selector(item, problems)
            return selected
        return self._selector(node.left, problems) - self._selector(node.right, problems)

    def _word(self, node: Word, problems: list[Diagnostic]) -> set[str]:
        if node.is_glob:
            match = re.compile(fnmatch.translate(node.text)).match
            matched = {g for g in self.groups if match(g)}
            if not matched:
                shown = ", ".join(f"`{g}`" for g in self.groups[:8])
                problems.append(
                    Diagnostic(
                        Code.GLOB_MATCHES_NOTHING,
                        f"glob `{node.text}` matches no group",
                        node.span,
                        f"declared groups: {shown}" + (" ..." if len(self.groups) > 8 else ""),
                    )
                )
            return matched
        if node.text == SELF:
            problems.append(
                Diagnostic(
                    Code.UNKNOWN_GROUP,
                    "`self` can only be the whole key side of a rule",
                    node.span,
                    "write `a, b -> self` (each query group attends to itself)",
                )
            )
            return set()
        if node.text not in self.index:
            problems.append(
                Diagnostic(
                    Code.UNKNOWN_GROUP,
                    f"unknown group `{node.text}`",
                    node.span,
                    suggest(node.text, self.groups) or "declare it with `groups ...`",
                )
            )
            return set()
        return {node.text}

    def _ordered(self, selected: set[str]) -> tuple[str, ...]:
        return tuple(sorted(selected, key=self.index.__getitem__))
