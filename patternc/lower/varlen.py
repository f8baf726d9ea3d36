"""Variable-length attention (FlashAttention varlen, ``torch.nn.attention.varlen``).

One launch takes packed queries and keys with cumulative segment lengths:
each call of a plan is one segment (its query tokens, then its key tokens),
and calls with different modifiers are separate launches, because the kernel
takes one ``(left, right)`` window for all segments. The executor
``varlen`` runs exactly these launches; other stacks can read them as JSON.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any

from patternc.lower.layout import Call, Layout
from patternc.lower.pairs import NotExpressible
from patternc.modifiers import NO_MODIFIERS, Modifiers

__all__ = ["VarlenLaunch", "varlen_launches", "varlen_window"]


def varlen_window(call: Call) -> tuple[int, int] | None:
    """The kernel's ``(left, right)`` window for a call's modifiers (-1:
    unbounded), or None when one window cannot say them on this call."""
    mods = call.modifiers
    if mods is None:  # key groups with different modifiers
        return None
    if not mods:
        return (-1, -1)
    # the kernel counts positions within the segment: they are positions
    # within the group only for one group attending to one as long
    if not (call.single_groups and call.n_queries == sum(s.length for s in call.keys)):
        return None
    left = -1 if mods.window is None else mods.window - 1
    return (left, 0 if mods.causal else left)


@dataclass(frozen=True)
class VarlenLaunch:
    """One launch for one batch element: packed query ``t`` is input token
    ``q_rows[t]`` (likewise ``kv_rows``); segment ``s`` is ``[cu_seqlens_q[s],
    cu_seqlens_q[s + 1])`` of the packed queries against the same of the keys."""

    calls: tuple[int, ...]
    window: tuple[int, int]
    q_rows: tuple[int, ...]
    kv_rows: tuple[int, ...]
    cu_seqlens_q: tuple[int, ...]
    cu_seqlens_k: tuple[int, ...]

    @property
    def max_seqlen_q(self) -> int:
        return max((b - a for a, b in itertools.pairwise(self.cu_seqlens_q)), default=0)

    @property
    def max_seqlen_k(self) -> int:
        return max((b - a for a, b in itertools.pairwise(self.cu_seqlens_k)), default=0)

    def to_dict(self) -> dict[str, Any]:
        return {
            "calls": list(self.calls),
            "window_size": list(self.window),
            "cu_seqlens_q": list(self.cu_seqlens_q),
            "cu_seqlens_k": list(self.cu_seqlens_k),
            "max_seqlen_q": self.max_seqlen_q,
            "max_seqlen_k": self.max_seqlen_k,
            "q_rows": list(self.q_rows),
            "kv_rows": list(self.kv_rows),
        }


def varlen_launches(layout: Layout) -> tuple[VarlenLaunch, ...]:
    """The launches that compute the layout, or :class:`NotExpressible` with
    the reason (KV-cached groups, a call without keys, modifiers the window
    cannot say)."""
    if layout.cached_groups:
        raise NotExpressible("KV-cached groups")
    by_modifiers: dict[Modifiers, list[Call]] = {}
    for call in layout.calls:
        if not call.n_queries:
            continue
        if not call.keys:
            raise NotExpressible("a call with no keys")
        if varlen_window(call) is None:
            if call.modifiers is None:
                raise NotExpressible(
                    f"per-key modifiers that differ within one call (`{call.attention.text()}`)"
                )
            raise NotExpressible(f"{call.modifiers.text()} across groups of different positions")
        by_modifiers.setdefault(call.modifiers or NO_MODIFIERS, []).append(call)
    launches = []
    for calls in by_modifiers.values():
        q_rows: list[int] = []
        kv_rows: list[int] = []
        cu_q, cu_k = [0], [0]
        for call in calls:
            for seg in call.queries:
                q_rows.extend(range(seg.start, seg.stop))
            for seg in call.keys:
                kv_rows.extend(range(seg.start, seg.stop))
            cu_q.append(len(q_rows))
            cu_k.append(len(kv_rows))
        window = varlen_window(calls[0]) or (-1, -1)
        launches.append(
            VarlenLaunch(
                tuple(c.index for c in calls), window, tuple(q_rows), tuple(kv_rows), tuple(cu_q), tuple(cu_k)
            )
        )
    return tuple(launches)
