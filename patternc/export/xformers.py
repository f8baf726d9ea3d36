"""xformers: an ``attn_bias`` where one of its block-diagonal masks says the plan.

- ``BlockDiagonalMask``: each call is one query run and one key run, the
  query runs tile the input in order and so do the key runs (documents);
- ``BlockDiagonalGappyKeysMask``: the same, but key runs start anywhere
  (each branch's queries and anchors attending to its anchors);
- ``BlockDiagonalCausalMask`` / ``BlockDiagonalCausalLocalAttentionMask``:
  one group attending to itself per call, ``[causal]`` (and ``[window N]``).

Anything else is :class:`~patternc.lower.pairs.NotExpressible` with the
reason. The record names the class and the arguments of its
``from_seqlens`` (``kv_seqstarts``: where each block's keys start), so code
with xformers installed builds it in one line; patternc does not import it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from patternc.lower.layout import Layout
from patternc.lower.pairs import NotExpressible

__all__ = ["XformersMask", "xformers_mask"]


@dataclass(frozen=True)
class XformersMask:
    kind: str
    q_seqlen: tuple[int, ...]
    kv_seqlen: tuple[int, ...]
    kv_seqstarts: tuple[int, ...] | None = None
    window_size: int | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "type": self.kind,
            "q_seqlen": list(self.q_seqlen),
            "kv_seqlen": list(self.kv_seqlen),
        }
        if self.kv_seqstarts is not None:
            out["kv_seqstarts"] = list(self.kv_seqstarts)
        if self.window_size is not None:
            out["window_size"] = self.window_size
        return out


def xformers_mask(layout: Layout) -> XformersMask:
    """The block-diagonal mask that says the layout, or :class:`NotExpressible`."""
    if layout.cached_groups:
        raise NotExpressible("KV-cached groups")
    calls = sorted((c for c in layout.calls if c.n_queries), key=lambda c: c.queries[0].start)
    for call in calls:
        if not call.attention.keys:
            raise NotExpressible(
                f"`{call.attention.text()}` reads no key; "
                "xformers' block-diagonal masks give every query a block"
            )
        if len(call.queries) != 1 or len(call.keys) != 1 or call.keys[0].cached is not None:
            raise NotExpressible(
                f"`{call.attention.text()}` reads its queries or keys from several runs of the input; "
                "xformers' block-diagonal masks take one run of each per block"
            )
    q_runs = [(c.queries[0].start, c.queries[0].stop) for c in calls]
    k_runs = [(c.keys[0].start, c.keys[0].stop) for c in calls]
    if [a for a, _ in q_runs] != [0, *[b for _, b in q_runs[:-1]]] or (
        q_runs and q_runs[-1][1] != layout.n_tokens
    ):
        raise NotExpressible("the calls' queries do not tile the input in order")
    q_seqlen = tuple(b - a for a, b in q_runs)
    kv_seqlen = tuple(b - a for a, b in k_runs)
    modifiers = {c.modifiers for c in calls}
    if not any(c.has_modifiers for c in calls):
        tiles = [a for a, _ in k_runs] == [0, *[b for _, b in k_runs[:-1]]]
        if tiles and k_runs and k_runs[-1][1] == layout.n_tokens:
            return XformersMask("BlockDiagonalMask", q_seqlen, kv_seqlen)
        return XformersMask("BlockDiagonalGappyKeysMask", q_seqlen, kv_seqlen, tuple(a for a, _ in k_runs))
    if len(modifiers) != 1 or not all(
        c.single_groups and q_runs[i] == k_runs[i] for i, c in enumerate(calls)
    ):
        raise NotExpressible(
            "modifiers on calls other than one group attending to itself, or modifiers that differ"
        )
    (mods,) = modifiers
    if mods is None:
        raise NotExpressible("key groups with different modifiers in one call")
    if mods.grid is not None:
        raise NotExpressible(
            f"{mods.text()} reads a box of coordinates on the shape {list(mods.grid.shape)}; xformers' "
            "local masks are a causal window of positions"
        )
    # each call is one group attending to itself: `across` shifts nothing
    low, high, dilation = mods.band()
    if high != 0:
        raise NotExpressible(f"{mods.text()} without [causal] (xformers' local masks are causal)")
    if dilation > 1:
        keep = "xformers' local masks keep them all"
        raise NotExpressible(f"{mods.text()} keeps every {dilation}th key; {keep}")
    if low is None:
        return XformersMask("BlockDiagonalCausalMask", q_seqlen, kv_seqlen)
    return XformersMask("BlockDiagonalCausalLocalAttentionMask", q_seqlen, kv_seqlen, window_size=1 - low)
