"""The reference executor: one attention call over all tokens with a dense
``[N, N_keys]`` boolean mask built from the group table."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from patternc.lower.layout import Layout
from patternc.modifiers import Neighbourhood
from patternc.nn.executors.common import (
    AttentionInputs,
    alibi_bias,
    within_group_positions,
)
from patternc.nn.tables import table

__all__ = ["dense_mask", "run_dense"]


def _mask_tables(
    layout: Layout, cache_lengths: tuple[tuple[str, int], ...], device: torch.device
) -> tuple[Any, ...]:
    """Device tables the dense mask is built from: group x group ``allowed``
    and each pair's band (``low``, ``high``, ``dilation``, ``residue``, see
    :meth:`~patternc.lower.layout.Layout.pair_band`), per-token group ids and
    positions within groups, and each neighbourhood with its group x group
    table of the pairs under it. Built once per (layout, cache lengths, device),
    so a call copies nothing from the host (CUDA-graph capturable after one
    warm-up call)."""
    lengths = dict(cache_lengths)
    n_groups = len(layout.all_groups)
    q_ids, k_ids, *columns = (torch.tensor(column, dtype=torch.int64) for column in layout.pair_columns())
    allowed = torch.zeros(n_groups, n_groups, dtype=torch.bool)
    allowed[q_ids, k_ids] = True
    bands = []
    for column, fill in zip(columns, (0, 0, 1, 0)):
        table = torch.full((n_groups, n_groups), fill, dtype=torch.int64)
        table[q_ids, k_ids] = column
        bands.append(table.to(device))
    allowed = allowed.to(device)
    sizes = torch.tensor(layout.input_sizes, dtype=torch.int64, device=device)
    ids = torch.tensor(layout.group_ids, dtype=torch.int64, device=device)
    query_ids = torch.repeat_interleave(ids, sizes)
    cached = [
        torch.full((lengths[g],), layout.all_groups.index(g), dtype=torch.int64, device=device)
        for g in layout.cached_groups
    ]
    key_ids = torch.cat([query_ids, *cached]) if cached else query_ids
    q_pos = within_group_positions(layout, device)
    k_pos = torch.cat([q_pos, *(torch.arange(lengths[g], device=device) for g in layout.cached_groups)])
    # a neighbourhood's band is open: per distinct one, the group pairs it holds
    grids: dict[Neighbourhood, Tensor] = {}
    for (q, k), mods in layout.pairs.items():
        if mods.grid is not None:
            grids.setdefault(mods.grid, torch.zeros(n_groups, n_groups, dtype=torch.bool))[q, k] = True
    on_device = tuple((g, t.to(device)) for g, t in grids.items())
    return allowed, *bands, query_ids, key_ids, q_pos, k_pos, on_device


def dense_mask(layout: Layout, cache_lengths: Mapping[str, int], device: torch.device) -> Tensor:
    """``[N, N + cached]`` bool: query token i may attend to key token j (the
    group table, then each group pair's band on positions within groups)."""
    lengths = tuple((g, cache_lengths[g]) for g in layout.cached_groups)
    allowed, low, high, dilation, residue, query_ids, key_ids, q_pos, k_pos, grids = table(
        layout, ("dense mask", lengths, device), lambda: _mask_tables(layout, lengths, device)
    )
    mask: Tensor = allowed[query_ids][:, key_ids]
    if layout.has_modifiers:
        d = k_pos[None, :] - q_pos[:, None]
        pair = (query_ids[:, None], key_ids[None, :])
        mask &= (d >= low[pair]) & (d <= high[pair]) & ((d - residue[pair]) % dilation[pair] == 0)
        for grid, holds in grids:
            mask &= ~holds[pair] | grid.allows(q_pos[:, None], k_pos[None, :])
    return mask


def run_dense(inputs: AttentionInputs) -> Tensor:
    inputs = inputs.in_token_space()  # K/V at input positions
    q, k, v, layout, cache = inputs.q, inputs.k, inputs.v, inputs.layout, inputs.cache
    key_padding_mask, dropout_p, scale = inputs.key_padding_mask, inputs.dropout_p, inputs.scale
    keys = torch.cat([k, *(cache[g][0] for g in layout.cached_groups)], dim=1)
    values = torch.cat([v, *(cache[g][1] for g in layout.cached_groups)], dim=1)
    # one softmax over every key: a non-finite K or V would reach every query
    # through its zero weights (0 * NaN), so such keys are zeroed here and the
    # queries that do attend to one are set to NaN after (as separate calls give)
    bad = ~(torch.isfinite(keys).all(-1) & torch.isfinite(values).all(-1))  # [B, Nk, H]
    keys, values = keys.masked_fill(bad[..., None], 0.0), values.masked_fill(bad[..., None], 0.0)
    lengths = {g: cache[g][0].shape[1] for g in layout.cached_groups}
    mask = dense_mask(layout, lengths, q.device)[None, None]  # [1, 1, N, Nk]
    if key_padding_mask is not None:
        mask = mask & key_padding_mask[:, None, None, :]
    keep = mask.any(dim=-1, keepdim=True)  # rows with no key at all give zeros
    attn_mask: Tensor = mask | ~keep
    if inputs.alibi_slopes is not None:
        q_pos = within_group_positions(layout, q.device)
        k_pos = torch.cat([q_pos, *(torch.arange(lengths[g], device=q.device) for g in layout.cached_groups)])
        bias = alibi_bias(inputs.alibi_slopes, q_pos, k_pos)[None].to(q.dtype)
        attn_mask = bias.masked_fill(~attn_mask, float("-inf"))
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2),
        keys.transpose(1, 2),
        values.transpose(1, 2),
        attn_mask=attn_mask,
        dropout_p=dropout_p,
        scale=scale,
    )
    # bad keys each query reads, counted by one product over the keys (a
    # boolean [B, H, N, Nk] tensor would be heads times the mask's size)
    reads_bad = torch.matmul(mask[:, 0].to(torch.float32), bad.to(torch.float32))  # [B, N, H]
    poisoned = (reads_bad > 0).transpose(1, 2)[..., None]  # [B, H, N, 1]
    out = out.masked_fill(poisoned, float("nan"))
    return (out * keep.to(out.dtype)).transpose(1, 2)
