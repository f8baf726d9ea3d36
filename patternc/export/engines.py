"""The engine formats as JSON-ready data (what ``patternc compile --format`` prints)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from patternc.export.flashmask import flashmask_bounds
from patternc.export.magi import magi_slices
from patternc.export.xformers import xformers_mask
from patternc.lower.layout import Layout
from patternc.lower.pairs import NotExpressible
from patternc.lower.varlen import varlen_launches
from patternc.modifiers import Modifiers

__all__ = ["engine_dict", "flex_tables_dict"]


def flex_tables_dict(layout: Layout) -> dict[str, Any]:
    """What a FlexAttention ``mask_mod`` reads, torch-free: each token's group
    (as runs of the input) and, per (query group, key group), whether it is
    allowed and its modifiers. Positions count within groups.

    ``causal`` and ``window`` are the lists' own; ``low``, ``high``,
    ``dilation`` and ``residue`` are each pair's whole band (``across``
    already turned into positions within groups; an open side is null):
    query ``i`` reads key ``j`` iff ``low <= j - i <= high`` and
    ``(j - i - residue) % dilation == 0``. ``neighbourhoods``: per pair, null
    or ``{"kind", "shape", "sizes"}`` of a neighbourhood on a shaped group
    (its band is open): positions are row-major coordinates on ``shape``, and
    query ``i`` reads key ``j`` iff on every axis the key's coordinate lies in
    the query's box (``near s``: within ``s``; ``kernel s``: ``s`` coordinates
    from ``clamp(q - s // 2, 0, n - s)``)."""
    index = {g: i for i, g in enumerate(layout.all_groups)}
    n = len(layout.all_groups)
    bands: dict[str, list[list[int | None]]] = {
        name: [[fill] * n for _ in range(n)]
        for name, fill in (("low", None), ("high", None), ("dilation", 1), ("residue", 0))
    }
    grids: list[list[dict[str, Any] | None]] = [[None] * n for _ in range(n)]
    for q, k in layout.pairs:
        band = layout.pair_band(q, k)
        grid = band.grid
        if grid is not None:
            grids[q][k] = {"kind": grid.kind, "shape": list(grid.shape), "sizes": list(grid.sizes)}
        bands["low"][q][k], bands["high"][q][k] = band.low, band.high
        bands["dilation"][q][k], bands["residue"][q][k] = band.dilation, band.residue
    return {
        "n_tokens": layout.n_tokens,
        "groups": list(layout.all_groups),
        "runs": [
            {"group": index[s.name], "start": s.offset, "stop": s.offset + (s.size or 0)}
            for s in layout.slots
            if s.size
        ],
        "allowed": _group_table(layout, lambda mods: 1),
        "causal": _group_table(layout, lambda mods: int(mods.causal)),
        "window": _group_table(layout, lambda mods: mods.window or 0),
        **bands,
        "neighbourhoods": grids,
    }


def _group_table(layout: Layout, value: Callable[[Modifiers], int]) -> list[list[int]]:
    """``[G, G]``: ``value(modifiers)`` of each allowed group pair, 0 elsewhere."""
    n = len(layout.all_groups)
    rows = [[0] * n for _ in range(n)]
    for (q, k), mods in layout.pairs.items():
        rows[q][k] = value(mods)
    return rows


def engine_dict(layout: Layout, name: str) -> dict[str, Any]:
    """``{"expressible": True, ...the format...}`` or ``{"expressible": False, "reason": ...}``."""
    try:
        if name == "magi":
            body: dict[str, Any] = {"slices": [s.to_dict() for s in magi_slices(layout)]}
        elif name == "flashmask":
            body = flashmask_bounds(layout).to_dict()
        elif name == "varlen":
            body = {"launches": [launch.to_dict() for launch in varlen_launches(layout)]}
        elif name == "xformers":
            body = xformers_mask(layout).to_dict()
        elif name == "flex":
            if layout.cached_groups:
                raise NotExpressible("KV-cached groups")
            body = flex_tables_dict(layout)
        else:
            raise ValueError(f"unknown format {name!r}")
    except NotExpressible as reason:
        return {"expressible": False, "reason": str(reason)}
    return {"expressible": True, **body}
