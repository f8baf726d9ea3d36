"""Warnings: patterns that are valid but probably not what was meant.

They never stop a compile (``patternc check`` exits 0 unless
``--warnings-as-errors``); a ``# noqa: W1xx`` comment on the line a warning
points at silences it (``# noqa`` alone silences every warning there). A
file with errors gets its warnings too, except those an error makes
doubtful: W101 and W103 when a selector failed to resolve or lines were
left out after a syntax error, W101 for a group in no rule at all, W102 and
W103 for a rule or pattern holding an error.

- W101: a group that no rule of any pattern lets anyone attend to;
- W102: a rule-level modifier over several key groups (``text -> image,
  text [causal]`` aligns the image's positions with the text's: probably
  ``text -> image, text[causal]`` was meant);
- W103: a pattern that is plain full attention, which any attention layer
  already does without a pattern.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from patternc.diagnostics import Code, Diagnostic, Edit, Fix, Span
from patternc.plan import Plan
from patternc.syntax import Selector, SelectorUnion, SourceFile, Word, pattern_blocks

__all__ = ["warn"]


def warn(
    syntax: SourceFile, plans: Mapping[str, Plan], errors: Sequence[Diagnostic] = ()
) -> list[Diagnostic]:
    """Every warning of a file; ``errors`` are the file's errors (warnings
    they make doubtful are left out)."""
    spans = [d.span for d in errors if d.span is not None]
    unresolved = bool(syntax.skipped_lines) or any(d.code.startswith("E2") for d in errors)
    out: list[Diagnostic] = []
    if not unresolved:
        out.extend(_never_a_key(syntax, plans, only_queries=bool(errors)))
    out.extend(_rule_modifier_across_groups(syntax, plans, spans))
    if not unresolved:
        out.extend(_full_attention(syntax, plans, spans))
    return out


def _holds_error(span: Span, errors: Sequence[Span]) -> bool:
    start, end = (span.line, span.column), (span.end_line, span.end_column)
    return any(start <= (e.line, e.column) < end for e in errors)


def _never_a_key(syntax: SourceFile, plans: Mapping[str, Plan], *, only_queries: bool) -> list[Diagnostic]:
    """W101; ``only_queries``: only for groups some rule names as queries (in
    a file with errors, a group in no rule at all is a rule still to write,
    which an error already says)."""
    keys = {k.name for plan in plans.values() for call in plan.calls for k in call.keys}
    queries = {q for plan in plans.values() for call in plan.calls for q in call.queries}
    out = []
    for decl in dict((g.name, g) for g in reversed(syntax.groups)).values():
        if decl.name not in keys and (decl.name in queries or not only_queries):
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


def _rule_modifier_across_groups(
    syntax: SourceFile, plans: Mapping[str, Plan], errors: Sequence[Span]
) -> list[Diagnostic]:
    out = []
    for block in pattern_blocks(syntax):
        plan = plans.get(block.name)
        if plan is None:
            continue
        by_span = {r.span: r for r in plan.rules if not r.to_self}
        for rule in block.rules:
            resolved = by_span.get(rule.span)
            if rule.modifiers is None or resolved is None or len(resolved.keys) < 2:
                continue
            if rule.modifiers.modifiers.across:  # positions count in the input: nothing restarts per group
                continue
            if not rule.modifiers.modifiers:  # a member relation alone counts no positions
                continue
            if _holds_error(rule.span, errors):
                continue
            # the whole list as written: a fix that moved only the token
            # modifiers would drop the relation (`[upto, causal]`)
            mods = rule.modifiers.text()
            word = _last_word(rule.keys_values)
            last = word.text if word is not None else resolved.keys_values[-1]
            out.append(
                Diagnostic(
                    Code.RULE_MODIFIER_ACROSS_GROUPS,
                    f"{mods} applies to each of {len(resolved.keys)} key groups "
                    f"({_listed(resolved.keys_values)}), with positions counted within each group",
                    rule.modifiers.span,
                    f"to restrict only some keys, put the modifier on them: `... {last}{mods}`; "
                    "to mean every key group, silence this with `# noqa: W102`",
                    fix=_per_key_fix(word, rule.modifiers.span, mods) if word is not None else None,
                )
            )
    return out


def _listed(names: Sequence[str], most: int = 8) -> str:
    shown = ", ".join(names[:most])
    return shown + (f", and {len(names) - most} more" if len(names) > most else "")


def _last_word(keys: Selector) -> Word | None:
    """The last item of a key side when it is a plain name or glob."""
    last = keys.items[-1] if isinstance(keys, SelectorUnion) else keys
    return last if isinstance(last, Word) else None


def _per_key_fix(last: Word, modifiers: Span, mods: str) -> Fix:
    """``a -> b, c [causal]`` -> ``a -> b, c[causal]``: the rule's modifiers
    moved onto its last key selector."""
    end = last.span
    moved = Span(end.end_line, end.end_column, modifiers.end_line, modifiers.end_column)
    return Fix(f"put {mods} on `{last.text}` only", (Edit(moved, mods),))


def _full_attention(
    syntax: SourceFile, plans: Mapping[str, Plan], errors: Sequence[Span]
) -> list[Diagnostic]:
    out = []
    for block in pattern_blocks(syntax):
        plan = plans.get(block.name)
        if plan is None or len(plan.calls) != 1 or _holds_error(block.span, errors):
            continue
        (call,) = plan.calls
        if (
            call.has_modifiers
            or any(k.members is not None for k in call.keys)  # members read some members only
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
