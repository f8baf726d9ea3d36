"""Human-readable text rendering of a compiled program (``--format text``)."""

from __future__ import annotations

from collections.abc import Sequence

from patternc.lower.layout import Layout
from patternc.members import abbreviate_members
from patternc.plan import Plan, Program, Sizes, names_of

__all__ = ["format_program"]


def _si(value: float, unit: str) -> str:
    for factor, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= factor:
            return f"{value / factor:.2f} {prefix}{unit}"
    return f"{value:.0f} {unit}"


def _table(rows: Sequence[Sequence[str]], indent: str = "  ") -> list[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return [indent + "  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]


def _format_layout(layout: Layout) -> list[str]:
    rows = [["group", "offset", "size"]]
    for slot in layout.slots:
        rows.append(
            [
                slot.name,
                "cache" if slot.cached else str(slot.offset),
                "-" if slot.size is None else str(slot.size),
            ]
        )
    space = layout.key_space
    keys = (
        "every one read as a key"
        if space.identity
        else f"{space.size} read as keys (K/V projected for these only)"
    )
    return [f"layout: {layout.n_tokens} input tokens, {keys}", *_table(rows)]


def _format_plan(plan: Plan, layout: Layout | None, dim: int, block: int) -> list[str]:
    out = [f"pattern {plan.name}: {len(plan.rules)} rule(s) -> {len(plan.calls)} attention call(s)"]
    if layout is None:
        for i, attention in enumerate(plan.calls):
            out.append(f"  [{i}] {attention.text()}")
        return out
    rows = [["call", "queries", "keys/values", "Nq x Nkv", "allowed", "q", "kv"]]
    for call in layout.calls:
        keys = abbreviate_members([f"{k.name}{k.modifiers.text()}" for k in call.attention.keys]) or "nothing"
        rows.append(
            [
                str(call.index),
                ", ".join(call.query_tokens) or "(cached only)",
                keys,
                f"{call.n_queries} x {call.n_keys}",
                f"{call.allowed_entries / call.score_entries:.3f}" if call.score_entries else "-",
                call.query_access,
                call.key_access,
            ]
        )
    out.extend(_table(rows))
    stacked = sum(1 for launch in layout.launches if len(launch) > 1)
    out.append(
        f"  batched: {len(layout.launches)} attention launch(es)"
        + (f", {stacked} stacking calls of equal shape" if stacked else "")
    )
    from patternc.lower.blocks import block_classes

    blocks = block_classes(layout, block)
    empty, partial, full = blocks.counts
    out.append(
        f"  blocks {blocks.block}x{blocks.block}: {full} full, {partial} partial, {empty} empty; "
        f"block sparsity {blocks.sparsity:.3f}"
    )
    out.append(
        f"  attention: {_si(layout.flops(dim), 'FLOP')} vs "
        f"{_si(4 * layout.dense_entries * dim, 'FLOP')} dense "
        f"at dim {dim}; density {layout.density:.3f} ({layout.allowed_entries:,} allowed pairs)"
    )
    return out


def _groups_by_type(program: Program) -> dict[str, list[str]]:
    by_type: dict[str, list[str]] = {}
    for group in program.groups:
        by_type.setdefault(program.types[group], []).append(group)
    return by_type


def format_program(
    program: Program,
    *,
    sizes: Sizes | None = None,
    patterns: Sequence[str] | None = None,
    dim: int = 192,
    block: int = 128,
    world_size: int | None = None,
) -> str:
    plans = program.select(patterns)
    out = [
        f"{program.filename or '<input>'}: {len(program.groups)} groups, {len(program.patterns)} pattern(s)",
        "groups: " + " ".join(program.groups),
        "types: " + "; ".join(f"{t} ({', '.join(groups)})" for t, groups in _groups_by_type(program).items()),
    ]
    if sizes is not None and plans:
        out.extend(_format_layout(plans[0].layout(sizes)))
    for plan in plans:
        out.append("")
        if sizes is not None:  # families expanded over the given groups
            out.extend(_format_plan(plan.bind(names_of(sizes)), plan.layout(sizes), dim, block))
            if world_size is not None:
                from patternc.distributed.report import format_sharding

                out.extend(format_sharding(plan.layout(sizes), world_size, dim))
        else:
            out.extend(_format_plan(plan, None, dim, block))
    return "\n".join(out) + "\n"
