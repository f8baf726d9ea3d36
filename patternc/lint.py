"""Warnings: patterns that are valid but probably not what was meant.

They never stop a compile (``patternc check`` exits 0 unless
``--warnings-as-errors``); a ``# noqa: W1xx`` comment on the line a warning
points at silences it (``# noqa`` alone silences every warning there).

- W101: a group that no rule of any pattern lets anyone attend to;
- W102: a rule-level modifier over several key groups (``text -> image,
  text [causal]`` aligns the image's positions with the text's: probably
  ``text -> image, text[causal]`` was meant);
- W103: a pattern that is plain full attention, which any attention layer
  already does without a pattern.
"""

from __future__ import annotations

from collections.abc import Mapping

from patternc.diagnostics import Code, Diagnostic
from patternc.plan import Plan
from patternc.syntax import PatternBlock, SourceFile

__all__ = ["warn"]


def warn(syntax: SourceFile, plans: Mapping[str, Plan]) -> list[Diagnostic]:
    """Every warning of a file that compiled without errors."""
    out: list[Diagnostic] = []
    out.extend(_never_a_key(syntax, plans))
    out.extend(_rule_modifier_across_groups(syntax, plans))
    out.extend(_full_attention(syntax, plans))
    return out


def _never_a_key(syntax: SourceFile, plans: Mapping[str, Plan]) -> list[Diagnostic]:
    keys = {k.name for plan in plans.values() for call in plan.calls for k in call.keys}
    out = []
    for decl in dict((g.name, g) for g in reversed(syntax.groups)).values():
        if decl.name not in keys:
            out.append(
                Diagnostic(
                    Code.NEVER_A_KEY,
                    f"no rule lets anyone attend to `{decl.name}`: its tokens never reach other tokens",
                    decl.span,
                    f"if `{decl.name}` only reads (e.g. query points), silence this with `# noqa: "
                    f"{Code.NEVER_A_KEY}` on this line; else add it to a rule's keys",
                )
            )
    return out


def _blocks(syntax: SourceFile) -> list[PatternBlock]:
    if syntax.patterns:
        return list(syntax.patterns)
    from patternc.compiler import DEFAULT_PATTERN

    if not syntax.top_level_rules:
        return []
    first = syntax.top_level_rules[0].span
    return [PatternBlock(DEFAULT_PATTERN, None, syntax.top_level_rules, first)]


def _rule_modifier_across_groups(syntax: SourceFile, plans: Mapping[str, Plan]) -> list[Diagnostic]:
    out = []
    for block in _blocks(syntax):
        plan = plans.get(block.name)
        if plan is None:
            continue
        by_span = {r.span: r for r in plan.rules if not r.to_self}
        for rule in block.rules:
            resolved = by_span.get(rule.span)
            if rule.modifiers is None or resolved is None or len(resolved.keys) < 2:
                continue
            mods = rule.modifiers.modifiers.text()
            last = resolved.keys_values[-1]
            out.append(
                Diagnostic(
                    Code.RULE_MODIFIER_ACROSS_GROUPS,
                    f"{mods} applies to each of {len(resolved.keys)} key groups "
                    f"({', '.join(resolved.keys_values)}), with positions counted within each group",
                    rule.modifiers.span,
                    f"to restrict only some keys, put the modifier on them: `... {last}{mods}`; "
                    "to mean every key group, silence this with `# noqa: W102`",
                )
            )
    return out


def _full_attention(syntax: SourceFile, plans: Mapping[str, Plan]) -> list[Diagnostic]:
    out = []
    for block in _blocks(syntax):
        plan = plans.get(block.name)
        if plan is None or len(plan.calls) != 1:
            continue
        (call,) = plan.calls
        if (
            call.has_modifiers
            or set(call.queries) != set(plan.groups)
            or set(call.key_names) != set(plan.groups)
        ):
            continue
        out.append(
            Diagnostic(
                Code.FULL_ATTENTION,
                f"pattern `{block.name}` is full attention: every group attends to every group",
                block.name_span or block.rules[0].span,
                "that is what plain attention does without a pattern (DotProductAttention); "
                "silence this with `# noqa: W103` if it is meant",
            )
        )
    return out
