"""Variable-length attention (FlashAttention varlen, ``torch.nn.attention.varlen``).

One launch takes packed queries and keys with cumulative segment lengths:
each call of a plan is one segment (its query tokens, then its key tokens),
and calls with different windows are separate launches, because the kernel
takes one ``(left, right)`` window for all segments. The executor
``varlen`` runs exactly these launches; other stacks can read them as JSON.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any

from patternc.lower.layout import Call, Layout
from patternc.lower.pairs import NotExpressible
from patternc.modifiers import pair_band

__all__ = ["VarlenLaunch", "varlen_launches", "varlen_refusal", "varlen_window"]


def varlen_window(call: Call) -> tuple[int, int] | None:
    """The kernel's ``(left, right)`` window for a call's modifiers (-1:
    unbounded; query ``i`` reads keys ``i - left .. i + right``), or None
    when one window cannot say them on this call (:func:`varlen_refusal`
    says why)."""
    mods = call.modifiers
    if mods is None:  # key groups with different modifiers
        return None
    if not mods:
        return (-1, -1)
    if mods.grid is not None:
        return None
    # the kernel counts positions within the segment: they are positions
    # within the group only for one group attending to one as long
    if not (call.single_groups and call.n_queries == sum(s.length for s in call.keys)):
        return None
    (query,), (key,) = call.queries, call.keys
    band = pair_band(mods, key.start - query.start)  # the shift counts under `across` only
    off_diagonal = (band.low is not None and band.low > 0) or (band.high is not None and band.high < 0)
    if band.dilation > 1 or off_diagonal:
        return None
    return (-1 if band.low is None else -band.low, -1 if band.high is None else band.high)


def varlen_refusal(call: Call) -> str | None:
    """Why :func:`varlen_window` has no window for ``call`` (None: it has one)."""
    if varlen_window(call) is not None:
        return None
    mods = call.modifiers
    if mods is None:
        return f"per-key modifiers that differ within one call (`{call.attention.text()}`)"
    if mods.grid is not None:
        return (
            f"{mods.text()} reads a box of coordinates on the shape {list(mods.grid.shape)}, "
            "not one window of positions; the kernel has only the window"
        )
    if mods.dilation > 1:
        skip = "the kernel's (left, right) window cannot skip keys"
        return f"{mods.text()} keeps every {mods.dilation}th key; {skip}"
    if mods.across and call.single_groups and call.n_queries == sum(s.length for s in call.keys):
        return f"{mods.text()} between groups at different places: the band leaves the kernel's diagonal"
    return f"{mods.text()} across groups of different positions"


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
    by_window: dict[tuple[int, int], list[Call]] = {}
    for call in layout.calls:
        if not call.n_queries:
            continue
        if not call.keys:
            raise NotExpressible("a call with no keys")
        refusal = varlen_refusal(call)
        if refusal is not None:
            raise NotExpressible(refusal)
        window = varlen_window(call)
        assert window is not None
        by_window.setdefault(window, []).append(call)
    launches = []
    for window, calls in by_window.items():
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
        launches.append(
            VarlenLaunch(
                tuple(c.index for c in calls), window, tuple(q_rows), tuple(kv_rows), tuple(cu_q), tuple(cu_k)
            )
        )
    return tuple(launches)
