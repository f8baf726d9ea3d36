"""Exports of plans: JSON-ready data (``docs/plan-format.md``) and Graphviz.

Each export reads the plan's calls and layouts as the compiler built them."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from patternc.ir import KeyGroup
from patternc.lower.layout import Layout, Sizes
from patternc.plan import Plan, Program, names_of

__all__ = ["JSON_SCHEMA_VERSION", "dot", "layout_dict", "plan_dict", "program_dict", "to_dot", "to_json"]

JSON_SCHEMA_VERSION = 2
"""2: modifiers are per key group (``key_modifiers``); FLOPs count allowed pairs;
no ``edges`` list (quadratic in groups: read the pairs off ``attention_patterns``)."""


def _key_modifiers(keys: Sequence[KeyGroup]) -> list[dict[str, bool | int | list[int] | None]]:
    return [k.modifiers.to_dict() for k in keys]


def plan_dict(plan: Plan, sizes: Sizes | None = None, dim: int = 192) -> dict[str, Any]:
    """One plan as JSON-ready data (``docs/plan-format.md``), laid out at
    ``sizes`` when given (FLOPs at model width ``dim``)."""
    data: dict[str, Any] = {
        "name": plan.name,
        "rules": [
            {
                "text": r.text,
                "line": r.span.line if r.span else None,
                "column": r.span.column if r.span else None,
                "queries": list(r.queries),
                "keys_values": list(r.keys_values),
                "key_modifiers": _key_modifiers(r.keys),
            }
            for r in plan.rules
        ],
        "attention_patterns": [
            {
                "query_tokens": list(c.queries),
                "key_value_tokens": list(c.key_names),
                "key_modifiers": _key_modifiers(c.keys),
            }
            for c in plan.calls
        ],
        "types": plan.types,
        "layout": None,
    }
    if sizes is not None:
        data["layout"] = layout_dict(plan.layout(sizes), dim)
        if plan.families:
            data["bound_groups"] = list(plan.bind(names_of(sizes)).groups)
    return data


def layout_dict(layout: Layout, dim: int) -> dict[str, Any]:
    return {
        "tokens": layout.n_tokens,
        "key_tokens": layout.key_space.size,
        "key_ranges": [list(r) for r in layout.key_space.ranges],
        "groups": [
            {"name": s.name, "offset": s.offset if not s.cached else None, "size": s.size, "cached": s.cached}
            for s in layout.slots
        ],
        "calls": [
            {
                "query_tokens": list(c.query_tokens),
                "key_value_tokens": list(c.key_value_tokens),
                "key_modifiers": _key_modifiers(c.attention.keys),
                "n_queries": c.n_queries,
                "n_keys_values": c.n_keys,
                "allowed_entries": c.allowed_entries,
                "query_access": c.query_access,
                "key_value_access": c.key_access,
                "flops": 4 * c.allowed_entries * dim,
            }
            for c in layout.calls
        ],
        "launches": [list(group) for group in layout.launches],
        "dim": dim,
        "allowed_entries": layout.allowed_entries,
        "flops": layout.flops(dim),
        "dense_flops": 4 * layout.dense_entries * dim,
        "density": round(layout.density, 6),
    }


def program_dict(
    program: Program, sizes: Sizes | None = None, dim: int = 192, patterns: Sequence[str] | None = None
) -> dict[str, Any]:
    """A compiled file as JSON-ready data: every pattern (or those named in
    ``patterns``) as :func:`plan_dict` gives it."""
    return {
        "schema": "patternc.plan",
        "version": JSON_SCHEMA_VERSION,
        "file": program.filename,
        "groups": list(program.groups),
        "types": dict(program.types),
        "patterns": [plan_dict(plan, sizes, dim) for plan in program.select(patterns)],
    }


def _quote(text: str) -> str:
    escaped = text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return f'"{escaped}"'


def dot(plans: Sequence[Plan]) -> str:
    """Graphviz source: one cluster per plan; each attention call is a node
    between its query groups and its key groups (edges ``q -> call -> k``, the
    key edges labelled with their modifiers), so the output stays linear in
    groups and rules even for ``* -> *``."""
    lines = ["digraph patternc {", "  rankdir=LR;", '  node [shape=box, fontname="Helvetica"];']
    for i, plan in enumerate(plans):
        prefix = f"p{i}_"
        lines.append(f"  subgraph cluster_{i} {{")
        lines.append(f"    label={_quote('pattern ' + plan.name)};")
        types = plan.types
        for group in plan.groups:
            label = f"{group}\n({types[group]})"
            lines.append(f"    {prefix}{group} [label={_quote(label)}];")
        for index, call in enumerate(plan.calls):
            node = f"{prefix}call{index}"
            lines.append(f'    {node} [label="call {index}", shape=ellipse];')
            for q in call.queries:
                lines.append(f"    {prefix}{q} -> {node};")
            for k in call.keys:
                label = f" [label={_quote(k.modifiers.text())}]" if k.modifiers else ""
                lines.append(f"    {node} -> {prefix}{k.name}{label};")
        lines.append("  }")
    lines.append("}")
    return "\n".join(lines) + "\n"


def to_json(
    compiled: Program | Plan,
    sizes: Sizes | None = None,
    *,
    dim: int = 192,
    patterns: Sequence[str] | None = None,
) -> str:
    """A program (``patternc.compile(...)``) or one plan as JSON text, laid
    out at ``sizes`` when given.

    Args:
        compiled: a :class:`~patternc.Program` or a :class:`~patternc.Plan`.
        sizes: ``{group: size}`` or a ``TokenSpec`` list; None: no layout.
        dim: model width for the FLOP counts.
        patterns: a program's patterns to include (default: all).

    Returns:
        The JSON document (schema in ``docs/plan-format.md``), newline-terminated.
    """
    if isinstance(compiled, Plan):
        data = plan_dict(compiled, sizes, dim)
    else:
        data = program_dict(compiled, sizes, dim, patterns)
    return json.dumps(data, indent=2) + "\n"


def to_dot(
    compiled: Program | Plan, sizes: Sizes | None = None, *, patterns: Sequence[str] | None = None
) -> str:
    """Graphviz source of the token-group graph of a program's patterns (or
    of one plan); families are bound to the groups ``sizes`` names when given."""
    plans = [compiled] if isinstance(compiled, Plan) else compiled.select(patterns)
    return dot(plans if sizes is None else [p.bind(names_of(sizes)) for p in plans])
