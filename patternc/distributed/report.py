"""The placement and schedule as text (``patternc compile --world-size N``), torch-free."""

from __future__ import annotations

from patternc.distributed.heads import choose_mode
from patternc.distributed.placement import place, rank_loads, schedule
from patternc.lower.layout import Layout
from patternc.members import abbreviate_members

__all__ = ["format_sharding"]


def format_sharding(layout: Layout, world_size: int, dim: int = 192) -> list[str]:
    """Where each group's tokens go on ``world_size`` ranks, what each call
    moves, and the mode ``ContextParallel(mode="auto")`` picks (bytes at model width ``dim``)."""
    calls = [c.attention for c in layout.calls]
    placement = place(layout.all_groups, calls, dict(layout.sizes), world_size)
    plan_schedule = schedule(calls, placement)
    ranks = range(world_size)
    out = [f"  sharded over {world_size} ranks (patternc.distributed; tokens per rank):"]
    for g in placement.groups:
        per_rank = "cached" if g.size is None else " ".join(str(g.local_size(r)) for r in ranks)
        held = [r for r in ranks if g.ranges[r]]
        over = f" (ranks {held[0]}-{held[-1]})" if g.kind != "whole" and 1 < len(held) < world_size else ""
        out.append(f"    {g.name}: {g.kind}{over}, {per_rank}")
    loads = rank_loads(calls, placement)
    out.append(
        f"    per rank, max / mean: attention FLOPs {loads.flops_ratio:.2f}, tokens {loads.tokens_ratio:.2f}"
    )
    for call in plan_schedule.calls:
        received = " ".join(str(plan_schedule.call_received(call, r)) for r in ranks)
        minimum = " ".join(str(plan_schedule.call_minimum(call, r)) for r in ranks)
        kernel = ", blockwise kernel" if call.blockwise else ""
        over = ""
        if call.strategy in ("ring", "halo"):  # among the ranks holding the call's tokens
            over = f" over ranks {', '.join(map(str, call.ranks))}, {call.steps} steps"
        keys = abbreviate_members([k.text() for k in call.attention.keys]) or "nothing"
        text = f"{', '.join(call.attention.queries)} -> {keys}"
        out.append(f"    call {call.index} {call.strategy}{over}{kernel}: `{text}`")
        if call.strategy != "local":
            out.append(f"      key/value tokens received per rank: {received} (minimum {minimum})")
        if call.moved:  # chosen by the key/value tokens moved
            choices = ", ".join(
                f"{kind} {n}" + (" (chosen)" if i == 0 else "") for i, (kind, n) in enumerate(call.moved)
            )
            out.append(f"      key/value tokens each strategy would move, all ranks: {choices}")
    totals = " ".join(str(n) for n in plan_schedule.received)
    minimum_totals = " ".join(str(n) for n in plan_schedule.minimum)
    out.append(f"    per forward, tokens received per rank: {totals} (minimum {minimum_totals})")
    choice = choose_mode(plan_schedule)
    needs = f"; needs heads a multiple of {world_size}, else 'ring'" if choice.mode == "heads" else ""
    out.append(f"    mode='auto' picks '{choice.mode}' ({choice.reason}{needs})")

    def in_bytes(rows: tuple[float, ...]) -> str:  # 2-byte elements (bf16, fp16)
        return " ".join(str(round(r * dim * 2)) for r in rows)

    out.append(
        f"      bytes received per rank per forward at width {dim}, 2-byte elements: schedule "
        f"{in_bytes(choice.schedule_rows)}; head-parallel (all-to-all) {in_bytes(choice.head_rows)}"
    )
    return out
