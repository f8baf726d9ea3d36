"""How a rank computes its calls: on the single-device executor, or blockwise.

- :class:`ExecutorCalls`: the calls whose tokens' positions do not cross
  ranks, as one plan over this rank's tokens (gathered or borrowed key
  groups become cached groups of that plan), run by the module's executor.
- :class:`BlockwiseCall`: one call attended key block by key block (the
  gathered keys, this rank's own, each ring step's), masks and ALiBi from
  global positions, blocks merged by their log-sum-exp.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from patternc.distributed.blockwise import merge_partials, pair_mask, partial_attention
from patternc.distributed.collectives import shift_tokens
from patternc.distributed.placement import ShardedCall
from patternc.distributed.rank import Comm, RankTokens, Tokens, cat
from patternc.ir import KeyGroup, ResolvedRule
from patternc.lower.layout import Layout
from patternc.modifiers import UNBOUNDED, pair_band
from patternc.nn.executors.common import AttentionInputs, Executor
from patternc.plan import Plan

__all__ = ["BlockwiseCall", "ExecutorCalls", "split_kv"]


def split_kv(kv: Tensor, dim: int) -> tuple[Tensor, Tensor]:
    """Keys and values of a packed ``[..., 2 * dim (+ 1 padding channel)]`` tensor."""
    return kv[..., :dim], kv[..., dim : 2 * dim]


class ExecutorCalls:
    """The calls the single-device executor runs, as a plan over this rank's
    tokens: a key group whose tokens come from elsewhere (gathered, or local
    but outside the executor's input) becomes a cached group of that plan."""

    def __init__(self, calls: Sequence[ShardedCall], tokens: RankTokens, plan_name: str) -> None:
        placement, rank = tokens.placement, tokens.rank
        inputs = [
            g.name
            for g in placement.groups
            if g.size is not None and any(g.name in c.attention.queries for c in calls)
        ]
        self.tokens = tokens
        self.shadows: dict[str, tuple[str, str]] = {}  # executor group -> (group, "gathered" | "local")
        rules = []
        for c in calls:
            keys = []
            for key in c.attention.keys:
                name = key.name
                if placement.group(name).size is not None and not (c.strategy == "local" and name in inputs):
                    source = "gathered" if c.strategy == "gather" else "local"
                    self.shadows[f"{name}@{source}"] = (name, source)
                    name = f"{name}@{source}"
                keys.append(KeyGroup(name, key.modifiers))
            rules.append(ResolvedRule(c.attention.queries, tuple(keys)))
        cached = [g.name for g in placement.groups if g.size is None]
        groups = (*inputs, *self.shadows, *cached)
        plan = Plan(f"{plan_name}@rank{rank}", groups, tuple(rules))
        sizes = {g: (placement.group(g).local_size(rank) if g in inputs else None) for g in groups}
        self.layout: Layout = plan.layout(sizes)
        self.order = cat([tokens.rows[g] for g in inputs], tokens.device)
        """Local rows of the executor's output, in its order."""
        self.rows = None if self.order.shape[0] == tokens.n_local else self.order

    def run(
        self, inputs: AttentionInputs, executor: Executor, gathered: dict[str, Tensor], packed: Tensor
    ) -> Tensor:
        q, k, v = inputs.q, inputs.k, inputs.v
        if self.rows is not None:
            q, k, v = (t.index_select(1, self.rows) for t in (q, k, v))
        cache = dict(inputs.cache)
        dim = inputs.v.shape[-1]
        for shadow, (name, source) in self.shadows.items():
            kv = gathered[name] if source == "gathered" else packed.index_select(1, self.tokens.rows[name])
            cache[shadow] = split_kv(kv, dim)
        # ALiBi reaches here only for local calls and position-free gathers:
        # positions within the rank's whole groups are the global ones
        local = AttentionInputs(
            q, k, v, self.layout, cache, None, inputs.dropout_p, inputs.scale, inputs.alibi_slopes
        )
        return executor(local)


@dataclass(frozen=True)
class _Block:
    """Packed keys/values ``[B, n, H, F]``, each key's position within its group and group index."""

    kv: Tensor
    positions: Tensor
    groups: Tensor


def _band_tables(
    call: ShardedCall, tokens: RankTokens, device: torch.device
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``[query groups, key groups]`` tables of each pair's band (``low``,
    ``high``, ``dilation``, ``residue``; open sides :data:`UNBOUNDED` away).
    Under ``across`` the groups' offsets in the whole input shift the band,
    so ranks holding any part of a group agree on it.

    Raises:
        ValueError: ``across`` on keys read from a KV cache (no place in the input).
    """
    offsets, at = {}, 0
    for group in tokens.placement.groups:
        offsets[group.name] = at if group.size is not None else None
        at += group.size or 0
    rows = []
    for q in call.attention.queries:
        row = []
        for key in call.attention.keys:
            shift = 0
            if key.modifiers.across:
                q_at, k_at = offsets.get(q), offsets.get(key.name)
                if q_at is None or k_at is None:
                    raise ValueError(
                        f"`{key.name}{key.modifiers.text()}`: `across` counts positions in the input, and a "
                        "group read from a KV cache has none; give it a size or drop `across`"
                    )
                shift = k_at - q_at
            band = pair_band(key.modifiers, shift)
            low = -UNBOUNDED if band.low is None else band.low
            high = UNBOUNDED if band.high is None else band.high
            row.append((low, high, band.dilation, band.residue))
        rows.append(row)
    table = torch.tensor(rows, dtype=torch.int64, device=device).reshape(len(rows), -1, 4)
    columns = [table[:, :, i].contiguous() for i in range(4)]
    return columns[0], columns[1], columns[2], columns[3]


class BlockwiseCall:
    """One call on the blockwise kernel: its queries, key blocks and modifier tables (built once)."""

    def __init__(self, call: ShardedCall, tokens: RankTokens, comm: Comm, query_chunk: int) -> None:
        d = tokens.device
        attention = call.attention
        self.call, self.comm, self.query_chunk, self.device = call, comm, max(1, query_chunk), d
        self.key_groups = attention.key_names
        self.band = _band_tables(call, tokens, d)
        self.queries = tokens.tokens(attention.queries)
        self.local_keys: Tokens = tokens.tokens(self.key_groups)
        """This rank's input tokens of the call's key groups (what it sends around the ring)."""
        self.ring_blocks: tuple[tuple[Tensor, Tensor], ...] = ()
        """Per ring step: positions and group indices of the block this rank holds."""
        if call.strategy == "ring":
            world, rank = comm.world_size, tokens.rank
            self.ring_blocks = tuple(
                tokens.of_rank(self.key_groups, (rank - s) % world) for s in range(world)
            )

    def _fixed_blocks(
        self, inputs: AttentionInputs, packed: Tensor, gathered: dict[str, Tensor]
    ) -> list[_Block]:
        """Cached groups, then this rank's own keys (local) or the gathered ones."""
        d = self.device
        blocks = []
        named = [(i, inputs.cache[n]) for i, n in enumerate(self.key_groups) if n in inputs.cache]
        for i, (k, v) in named:
            kv = torch.cat([k, v], dim=-1)
            if inputs.key_padding_mask is not None:  # cached keys are real
                kv = torch.cat([kv, kv.new_ones((*kv.shape[:-1], 1))], dim=-1)
            n = kv.shape[1]
            blocks.append(
                _Block(kv, torch.arange(n, device=d), torch.full((n,), i, dtype=torch.long, device=d))
            )
        if self.call.strategy == "local":
            keys = self.local_keys
            blocks.append(_Block(packed.index_select(1, keys.rows), keys.positions, keys.groups))
        elif self.call.strategy == "gather":
            for i, name in enumerate(self.key_groups):
                if name in gathered:
                    n = gathered[name].shape[1]
                    positions = torch.arange(n, device=d)
                    blocks.append(
                        _Block(gathered[name], positions, torch.full((n,), i, dtype=torch.long, device=d))
                    )
        return blocks

    def run(
        self, inputs: AttentionInputs, packed: Tensor, gathered: dict[str, Tensor], links: list[Tensor]
    ) -> Tensor:
        q = inputs.q.index_select(1, self.queries.rows)
        parts = [self._attend(q, block, inputs) for block in self._fixed_blocks(inputs, packed, gathered)]
        if self.call.strategy == "ring":
            kv = packed.index_select(1, self.local_keys.rows)
            for step, (positions, groups) in enumerate(self.ring_blocks):
                if step:
                    shape = (int(positions.shape[0]), kv.shape[0], *kv.shape[2:])
                    received = shift_tokens(kv.transpose(0, 1), shape, self.comm.group)
                    links.append(received)
                    self.comm.count(f"ring {self.call.attention.text()}", received)
                    kv = received.transpose(0, 1)
                if kv.shape[1]:
                    parts.append(self._attend(q, _Block(kv, positions, groups), inputs))
        if not parts:
            return q.new_zeros(q.shape)
        return merge_partials(parts)

    def _attend(self, q: Tensor, block: _Block, inputs: AttentionInputs) -> tuple[Tensor, Tensor]:
        """Output and log-sum-exp of this rank's queries against one block, ``query_chunk`` rows at a time."""
        dim = inputs.v.shape[-1]
        k, v = split_kv(block.kv, dim)
        key_mask = block.kv[:, :, 0, 2 * dim] > 0.5 if block.kv.shape[-1] > 2 * dim else None
        scale = inputs.scale if inputs.scale is not None else dim**-0.5
        slopes = inputs.alibi_slopes
        modified = self.call.attention.has_modifiers
        outs, lses = [], []
        for start in range(0, max(q.shape[1], 1), self.query_chunk):
            stop = min(start + self.query_chunk, q.shape[1])
            q_pos, q_grp = self.queries.positions[start:stop], self.queries.groups[start:stop]
            allowed = None
            if modified:
                allowed = pair_mask(q_pos, q_grp, block.positions, block.groups, self.band)
            if key_mask is not None:
                allowed = key_mask[:, None, :] if allowed is None else allowed[None] & key_mask[:, None, :]
            bias = None
            if slopes is not None:
                bias = -slopes[:, None, None] * (q_pos[:, None] - block.positions[None, :]).abs().to(
                    slopes.dtype
                )
            args = (q[:, start:stop], k, v, allowed, bias, scale, inputs.dropout_p)
            if torch.is_grad_enabled() and (q.requires_grad or block.kv.requires_grad):
                # recompute the scores in the backward instead of keeping every
                # chunk's [Lq, Lk] scores alive until then (ring steps: R blocks)
                out, lse = checkpoint(partial_attention, *args, use_reentrant=False)
            else:
                out, lse = partial_attention(*args)
            outs.append(out)
            lses.append(lse)
        if len(outs) == 1:
            return outs[0], lses[0]
        return torch.cat(outs, dim=1), torch.cat(lses, dim=2)
