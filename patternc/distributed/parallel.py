"""Context-parallel execution of compiled plans over a ``torch.distributed`` group.

>>> # on every rank (torchrun --nproc-per-node 4 train.py):
>>> # cp = ContextParallel(plan, {"anchors": 16384, "queries": 1_000_000})
>>> # x = cp.shard(x_full)                 # or load only cp.local_ranges
>>> # with cp:
>>> # 	out = model(x, cp.local_sizes)      # this rank's tokens of the output

Inside ``with cp:`` every patternc attention module (``MixedAttention`` and
its subclasses, the blocks, the ``Transformer`` stack) runs its calls under
the plan's :class:`~patternc.distributed.placement.ShardedSchedule`: the
local work on the module's own single-device executor, keys/values moved
only as each call needs them. Parameter gradients are per rank, as under
data parallelism: all-reduce them (DDP/FSDP do) before the optimizer step.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from patternc.distributed.blockwise import merge_partials, pair_mask, partial_attention
from patternc.distributed.collectives import DistributedError, Group, agree, all_gather_tokens, shift_tokens
from patternc.distributed.placement import Placement, ShardedCall, ShardedSchedule, Strategy, place, schedule
from patternc.ir import KeyGroup, ResolvedRule
from patternc.layout import Layout, Sizes
from patternc.nn.context import ACTIVE, FullKV
from patternc.nn.executors import get_executor
from patternc.nn.executors.common import AttentionInputs, Executor
from patternc.plan import Plan, Program

__all__ = ["ContextParallel"]


def _plans(plans: Plan | Program | Sequence[Plan]) -> list[Plan]:
    if isinstance(plans, Plan):
        return [plans]
    if isinstance(plans, Program):
        return list(plans.patterns.values())
    return list(plans)


class ContextParallel:
    """Shard the tokens of every group over the ranks of ``group`` and run
    attention modules sharded inside ``with`` (see the module docs).

    ``plans``: the plan(s) the model runs (their calls decide the placement);
    ``sizes``: the global group sizes. ``gather_limit``/``strategy``: see
    :func:`~patternc.distributed.placement.schedule`. ``query_chunk``: query
    rows per step of the blockwise kernel (bounds its score memory).
    ``full_kv_cache``: the ``new_kv_cache`` modules return holds every key
    group in full on every rank (an extra all-gather of the groups the
    schedule did not gather); by default it holds the groups this rank has
    in full anyway (gathered anchors, its own whole documents).
    ``whole_groups``: see :func:`~patternc.distributed.placement.place`.
    ``backend``: the single-device executor for the local work (``"auto"``,
    ``"flex"``, ...); None keeps each module's own (its ``implementation``).
    """

    def __init__(
        self,
        plans: Plan | Program | Sequence[Plan],
        sizes: Sizes,
        group: Group = None,
        *,
        gather_limit: float = 1.0,
        strategy: Strategy | None = None,
        query_chunk: int = 256,
        full_kv_cache: bool = False,
        whole_groups: bool = True,
        backend: str | None = None,
    ) -> None:
        if not dist.is_available() or not dist.is_initialized():
            raise DistributedError(
                "torch.distributed is not initialized: call torch.distributed.init_process_group "
                "first (torchrun sets the environment it reads)"
            )
        plan_list = _plans(plans)
        if not plan_list:
            raise ValueError("ContextParallel needs at least one plan")
        layouts = [p.layout(sizes) for p in plan_list]
        groups = layouts[0].all_groups
        for plan, layout in zip(plan_list, layouts):
            if layout.all_groups != groups:
                raise ValueError(
                    f"plan `{plan.name}` has groups {list(layout.all_groups)} but `{plan_list[0].name}` "
                    f"has {list(groups)}; the plans of one model must share their groups"
                )
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        self.gather_limit = gather_limit
        self.strategy = strategy
        self.query_chunk = query_chunk
        self.full_kv_cache = full_kv_cache
        self.executor: Executor | None = get_executor(backend) if backend is not None else None
        calls = [c.attention for layout in layouts for c in layout.calls]
        self.placement: Placement = place(
            groups, calls, dict(layouts[0].sizes), self.world_size, whole_groups=whole_groups
        )
        agree("placement", self.placement.digest, group)
        self._runners: dict[tuple[Layout, bool, bool, torch.device], _Runner] = {}
        """Per (local layout, padded, ALiBi, device): the schedule and its index
        tensors, built on first use (layouts are cached, so identity is stable)."""
        self._active = False
        self._previous: Any = None
        self.traffic: dict[str, int] = {}
        """Bytes this rank received in forward passes, per collective
        (``gather <groups>``, ``ring <call>``), padding included; the
        backward moves the same again. Clear it to start a count."""

    # ---------------------------------------------------------------- tokens

    @property
    def local_sizes(self) -> dict[str, int | None]:
        """``{group: tokens on this rank}``: the sizes to call modules with."""
        return self.placement.local_sizes(self.rank)

    @property
    def local_ranges(self) -> tuple[tuple[int, int], ...]:
        """This rank's tokens as ``[start, stop)`` ranges of the full input, in local order."""
        return self.placement.local_ranges(self.rank)

    def local_index(self, device: torch.device | str | None = None) -> Tensor:
        """Indices into the full input of this rank's tokens, in local order."""
        parts = [torch.arange(a, b, device=device) for a, b in self.local_ranges]
        return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long, device=device)

    def local_positions(self, device: torch.device | str | None = None) -> Tensor:
        """Position within its group of each local token (for RoPE and embeddings)."""
        return torch.tensor(self.placement.local_positions(self.rank), dtype=torch.long, device=device)

    def shard(self, full: Tensor, dim: int = 1) -> Tensor:
        """This rank's tokens of a full tensor (tokens along ``dim``)."""
        return full.index_select(dim, self.local_index(full.device))

    def unshard(self, local: Tensor, dim: int = 1) -> Tensor:
        """The full tensor from every rank's tokens (an all-gather; differentiable)."""
        counts = [self.placement.tokens(r) for r in range(self.world_size)]
        moved = local.movedim(dim, 0)
        stacked = all_gather_tokens(moved, counts, self.group)
        longest = max(counts)
        index = []
        for r in range(self.world_size):
            offset = 0
            for a, b in self.placement.local_ranges(r):
                index.append((a, r * longest + offset, b - a))
                offset += b - a
        order = torch.cat(
            [torch.arange(s, s + n, device=local.device) for _, s, n in sorted(index)]
            or [torch.zeros(0, dtype=torch.long, device=local.device)]
        )
        return stacked.index_select(0, order).movedim(0, dim)

    # --------------------------------------------------------------- context

    def __enter__(self) -> ContextParallel:
        if self._active:
            raise RuntimeError("this ContextParallel is already active")
        self._active, self._previous = True, ACTIVE.sharding
        ACTIVE.sharding = self
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        ACTIVE.sharding = self._previous
        self._active = False

    # ------------------------------------------------------------- execution

    def schedule_for(self, layout: Layout, padded: bool = False, alibi: bool = False) -> ShardedSchedule:
        """The schedule a module's local ``layout`` runs under (for reports)."""
        return self._runner(layout, padded, alibi, torch.device("cpu")).schedule

    def _runner(self, layout: Layout, padded: bool, alibi: bool, device: torch.device) -> _Runner:
        key = (layout, padded, alibi, device)
        runner = self._runners.get(key)
        if runner is None:
            runner = _Runner(self, layout, padded, alibi, device)
            self._runners[key] = runner
        return runner

    def attend(self, inputs: AttentionInputs, executor: Executor, full_cache: bool) -> tuple[Tensor, FullKV]:
        padded = inputs.key_padding_mask is not None
        alibi = inputs.alibi_slopes is not None
        runner = self._runner(inputs.layout, padded, alibi, inputs.q.device)
        return runner.run(inputs, self.executor or executor, full_cache or self.full_kv_cache)


# ------------------------------------------------------------------ runner


@dataclass(frozen=True)
class _Tokens:
    """Some of a rank's tokens: rows of its local input, each token's
    position within its group, and its group's index in the call."""

    rows: Tensor
    positions: Tensor
    groups: Tensor

    @property
    def count(self) -> int:
        return int(self.rows.shape[0])


def _cat(parts: Sequence[Tensor], device: torch.device) -> Tensor:
    return torch.cat(list(parts)) if parts else torch.zeros(0, dtype=torch.long, device=device)


@dataclass(frozen=True)
class _Blockwise:
    call: ShardedCall
    queries: _Tokens
    key_groups: tuple[str, ...]
    """Every key group of the call (cached ones included), in call order."""
    local_keys: _Tokens
    """This rank's input tokens of the call's key groups (what it sends around the ring)."""
    ring_blocks: tuple[tuple[Tensor, Tensor, int], ...]
    """Per ring step: (positions, group indices, token count) of the block this rank holds."""
    causal: Tensor
    window: Tensor


class _Runner:
    """One local layout under the placement: the schedule, the plan the
    single-device executor runs, and the index tensors (built once)."""

    def __init__(
        self, cp: ContextParallel, layout: Layout, padded: bool, alibi: bool, device: torch.device
    ) -> None:
        placement, rank = cp.placement, cp.rank
        expected = placement.local_sizes(rank)
        given = dict(layout.sizes)
        if given != expected:
            raise ValueError(
                f"this module ran with sizes {given} but the ContextParallel places {expected} on rank "
                f"{rank}; call modules with cp.local_sizes (and x = cp.shard(x_full))"
            )
        self.cp, self.layout, self.device = cp, layout, device
        self.schedule = schedule(
            [c.attention for c in layout.calls],
            placement,
            padded=padded,
            positional_bias=alibi,
            gather_limit=cp.gather_limit,
            strategy=cp.strategy,
        )
        agree("schedule", self.schedule.digest, cp.group)
        # this rank's input rows of each group
        self.rows: dict[str, Tensor] = {}
        self.positions: dict[str, Tensor] = {}
        offset = 0
        for g in placement.groups:
            if g.size is None:
                continue
            n = g.local_size(rank)
            self.rows[g.name] = torch.arange(offset, offset + n, device=device)
            self.positions[g.name] = _cat(
                [torch.arange(a, b, device=device) for a, b in g.ranges[rank]], device
            )
            offset += n
        self.n_local = offset
        self._build_gather()
        self._build_executor_plan()
        self.blockwise = tuple(self._blockwise(c) for c in self.schedule.calls if c.blockwise)
        order = [self.exec_order] if self.exec_layout is not None else []
        order += [b.queries.rows for b in self.blockwise]
        flat = _cat(order, device)
        self.identity_order = flat.shape[0] == self.n_local and bool(
            (flat == torch.arange(self.n_local, device=device)).all()
        )
        self.inverse = torch.argsort(flat) if flat.numel() else flat

    # ----------------------------------------------------------- gathering

    def _build_gather(self) -> None:
        self.gather = _GatherPlan.build(self, self.schedule.gathered)

    def _gather(self, packed: Tensor, links: list[Tensor]) -> dict[str, Tensor]:
        """All-gather the packed ``[B, n_local, H, F]`` keys/values of the gathered groups."""
        gathered = self.gather.run(packed, self.cp.group, links)
        if links:
            self._count(f"gather {','.join(self.schedule.gathered)}", links[-1], own=1)
        return gathered

    def _count(self, label: str, received: Tensor, own: int = 0) -> None:
        """Add what arrived in ``received`` (less this rank's own slot of an all-gather)."""
        total = received.numel() * received.element_size()
        if own:
            total -= total // self.cp.world_size
        self.cp.traffic[label] = self.cp.traffic.get(label, 0) + total

    # ------------------------------------------------------------ executor

    def _build_executor_plan(self) -> None:
        """The calls the single-device executor runs, as a plan over this
        rank's tokens: a key group whose tokens come from elsewhere (gathered,
        or local but outside the executor's input) becomes a cached group."""
        placement = self.cp.placement
        calls = [c for c in self.schedule.calls if not c.blockwise]
        inputs = [
            g.name
            for g in placement.groups
            if g.size is not None and any(g.name in c.attention.queries for c in calls)
        ]
        self.shadows: dict[str, tuple[str, str]] = {}  # executor group -> (group, "gathered" | "local")
        rules = []
        for c in calls:
            keys = []
            for key in c.attention.keys:
                name = key.name
                if placement.group(name).size is not None and not (c.strategy == "local" and name in inputs):
                    source = "gathered" if c.strategy == "gather" else "local"
                    shadow = f"{name}@{source}"
                    self.shadows[shadow] = (name, source)
                    name = shadow
                keys.append(KeyGroup(name, key.modifiers))
            rules.append(ResolvedRule(c.attention.queries, tuple(keys)))
        self.exec_inputs = tuple(inputs)
        if not calls:
            self.exec_layout: Layout | None = None
            self.exec_rows: Tensor | None = None
            return
        cached = [g.name for g in placement.groups if g.size is None]
        groups = (*inputs, *self.shadows, *cached)
        plan = Plan(f"{self.layout.plan_name}@rank{self.cp.rank}", groups, tuple(rules))
        sizes = {g: (placement.group(g).local_size(self.cp.rank) if g in inputs else None) for g in groups}
        self.exec_layout = plan.layout(sizes)
        rows = _cat([self.rows[g] for g in inputs], self.device)
        self.exec_order = rows
        self.exec_rows = None if rows.shape[0] == self.n_local else rows

    def _run_executor(
        self, inputs: AttentionInputs, executor: Executor, gathered: dict[str, Tensor], packed: Tensor
    ) -> Tensor | None:
        if self.exec_layout is None:
            return None
        q, k, v = inputs.q, inputs.k, inputs.v
        rows = self.exec_rows
        if rows is not None:
            q, k, v = q.index_select(1, rows), k.index_select(1, rows), v.index_select(1, rows)
        cache = dict(inputs.cache)
        dim = inputs.v.shape[-1]
        for shadow, (name, source) in self.shadows.items():
            kv = gathered[name] if source == "gathered" else packed.index_select(1, self.rows[name])
            cache[shadow] = (kv[..., :dim], kv[..., dim : 2 * dim])
        # ALiBi reaches here only for local calls and position-free gathers:
        # positions within the rank's whole groups are the global ones
        local = AttentionInputs(
            q, k, v, self.exec_layout, cache, None, inputs.dropout_p, inputs.scale, inputs.alibi_slopes
        )
        return executor(local)

    # ----------------------------------------------------------- blockwise

    def _tokens(self, names: Sequence[str]) -> _Tokens:
        parts_rows, parts_pos, parts_group = [], [], []
        for i, name in enumerate(names):
            if name not in self.rows:
                continue
            parts_rows.append(self.rows[name])
            parts_pos.append(self.positions[name])
            parts_group.append(torch.full_like(self.rows[name], i))
        d = self.device
        return _Tokens(_cat(parts_rows, d), _cat(parts_pos, d), _cat(parts_group, d))

    def _blockwise(self, call: ShardedCall) -> _Blockwise:
        placement, d = self.cp.placement, self.device
        attention = call.attention
        key_groups = attention.key_names
        causal = torch.tensor(
            [[k.modifiers.causal for k in attention.keys]] * len(attention.queries), device=d
        )
        window = torch.tensor(
            [[k.modifiers.window or 0 for k in attention.keys]] * len(attention.queries), device=d
        )
        blocks = []
        if call.strategy == "ring":
            world = self.cp.world_size
            for step in range(world):
                source = (self.cp.rank - step) % world
                pos, grp = [], []
                for i, name in enumerate(key_groups):
                    g = placement.group(name)
                    if g.size is None:
                        continue
                    for a, b in g.ranges[source]:
                        pos.append(torch.arange(a, b, device=d))
                        grp.append(torch.full((b - a,), i, dtype=torch.long, device=d))
                positions, groups = _cat(pos, d), _cat(grp, d)
                blocks.append((positions, groups, int(positions.shape[0])))
        input_keys = [k if placement.group(k).size is not None else "" for k in key_groups]
        return _Blockwise(
            call,
            self._tokens(attention.queries),
            key_groups,
            self._tokens(input_keys),
            tuple(blocks),
            causal,
            window,
        )

    def _run_blockwise(
        self,
        spec: _Blockwise,
        inputs: AttentionInputs,
        packed: Tensor,
        gathered: dict[str, Tensor],
        links: list[Tensor],
    ) -> Tensor:
        dim = inputs.v.shape[-1]
        queries = spec.queries
        q = inputs.q.index_select(1, queries.rows)
        scale = inputs.scale if inputs.scale is not None else dim**-0.5
        slopes = inputs.alibi_slopes
        padded = inputs.key_padding_mask is not None
        # key blocks: (packed keys/values [B, n, H, F], positions, group indices)
        blocks: list[tuple[Tensor, Tensor, Tensor]] = []
        d = self.device
        for i, name in enumerate(spec.key_groups):
            if name in inputs.cache:
                k, v = inputs.cache[name]
                kv = torch.cat([k, v], dim=-1)
                if padded:
                    kv = torch.cat([kv, kv.new_ones((*kv.shape[:-1], 1))], dim=-1)
                n = kv.shape[1]
                blocks.append(
                    (kv, torch.arange(n, device=d), torch.full((n,), i, dtype=torch.long, device=d))
                )
        strategy = spec.call.strategy
        if strategy in ("local", "gather"):
            if strategy == "local":
                keys = spec.local_keys
                kv = packed.index_select(1, keys.rows)
                blocks.append((kv, keys.positions, keys.groups))
            else:
                for i, name in enumerate(spec.key_groups):
                    if name in gathered:
                        kv = gathered[name]
                        n = kv.shape[1]
                        blocks.append(
                            (kv, torch.arange(n, device=d), torch.full((n,), i, dtype=torch.long, device=d))
                        )
            parts = [
                self._attend_block(q, queries, kv, pos, grp, spec, scale, slopes, inputs, dim)
                for kv, pos, grp in blocks
            ]
        else:
            parts = [
                self._attend_block(q, queries, kv, pos, grp, spec, scale, slopes, inputs, dim)
                for kv, pos, grp in blocks
            ]
            block = packed.index_select(1, spec.local_keys.rows)
            for step, (pos, grp, _) in enumerate(spec.ring_blocks):
                if step:
                    incoming = spec.ring_blocks[step][2]
                    shape = (incoming, block.shape[0], *block.shape[2:])
                    received = shift_tokens(block.transpose(0, 1), shape, self.cp.group)
                    links.append(received)
                    self._count(f"ring {spec.call.attention.text()}", received)
                    block = received.transpose(0, 1)
                if block.shape[1]:
                    parts.append(
                        self._attend_block(q, queries, block, pos, grp, spec, scale, slopes, inputs, dim)
                    )
        if not parts:
            return q.new_zeros(q.shape)
        return merge_partials(parts)

    def _attend_block(
        self,
        q: Tensor,
        queries: _Tokens,
        kv: Tensor,
        k_pos: Tensor,
        k_group: Tensor,
        spec: _Blockwise,
        scale: float,
        slopes: Tensor | None,
        inputs: AttentionInputs,
        dim: int,
    ) -> tuple[Tensor, Tensor]:
        k, v = kv[..., :dim], kv[..., dim : 2 * dim]
        key_mask = kv[:, :, 0, 2 * dim] > 0.5 if kv.shape[-1] > 2 * dim else None
        chunk = max(1, self.cp.query_chunk)
        outs, lses = [], []
        modified = spec.call.attention.has_modifiers
        for start in range(0, max(q.shape[1], 1), chunk):
            stop = min(start + chunk, q.shape[1])
            q_pos, q_grp = queries.positions[start:stop], queries.groups[start:stop]
            allowed = pair_mask(q_pos, q_grp, k_pos, k_group, spec.causal, spec.window) if modified else None
            if key_mask is not None:
                allowed = key_mask[:, None, :] if allowed is None else allowed[None] & key_mask[:, None, :]
            bias = None
            if slopes is not None:
                distance = (q_pos[:, None] - k_pos[None, :]).abs().to(slopes.dtype)
                bias = -slopes[:, None, None] * distance
            args = (q[:, start:stop], k, v, allowed, bias, scale, inputs.dropout_p)
            if torch.is_grad_enabled() and (q.requires_grad or kv.requires_grad):
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

    # ----------------------------------------------------------------- run

    def run(self, inputs: AttentionInputs, executor: Executor, full_cache: bool) -> tuple[Tensor, FullKV]:
        dim = inputs.v.shape[-1]
        parts = [inputs.k, inputs.v]
        if inputs.key_padding_mask is not None:
            mask = inputs.key_padding_mask.to(inputs.k.dtype)[:, :, None, None]
            parts.append(mask.expand(-1, -1, inputs.k.shape[2], 1))
        packed = torch.cat(parts, dim=-1)
        links: list[Tensor] = []
        gathered = self._gather(packed, links)
        pieces = []
        out_exec = self._run_executor(inputs, executor, gathered, packed)
        if out_exec is not None:
            pieces.append(out_exec)
        pieces.extend(self._run_blockwise(b, inputs, packed, gathered, links) for b in self.blockwise)
        if not pieces:
            out = inputs.q.new_zeros(inputs.q.shape[:3] + inputs.v.shape[3:])
        elif len(pieces) == 1 and self.identity_order:
            out = pieces[0]
        else:
            out = torch.cat(pieces, dim=1).index_select(1, self.inverse)
        full = self._full_kv(packed, gathered, dim, full_cache, links)
        if links:
            # every rank's output depends on every collective, so every rank
            # runs each one's backward, in the same (reverse creation) order,
            # even where its queries never read what came in
            out = out + sum(t.view(-1)[:1].sum() for t in links) * 0
        return out, full

    def _full_kv(
        self, packed: Tensor, gathered: dict[str, Tensor], dim: int, complete: bool, links: list[Tensor]
    ) -> FullKV:
        placement, rank = self.cp.placement, self.cp.rank
        out: FullKV = {}
        missing = []
        for name in self.layout.key_value_groups:
            g = placement.group(name)
            if name in gathered:
                kv = gathered[name]
            elif g.local_size(rank) == g.size:
                kv = packed.index_select(1, self.rows[name])
            else:
                missing.append(name)
                continue
            out[name] = (kv[..., :dim], kv[..., dim : 2 * dim])
        if complete and missing:
            extra = _GatherPlan.build(self, missing).run(packed, self.cp.group, links)
            out.update((n, (kv[..., :dim], kv[..., dim : 2 * dim])) for n, kv in extra.items())
        return out


@dataclass(frozen=True)
class _GatherPlan:
    """One all-gather of some groups' packed keys/values: the rows this rank
    sends, every rank's count, and where each group's tokens land (global order)."""

    rows: Tensor
    counts: tuple[int, ...]
    index: dict[str, Tensor]

    @staticmethod
    def build(runner: _Runner, names: Sequence[str]) -> _GatherPlan:
        placement, world = runner.cp.placement, runner.cp.world_size
        counts = tuple(sum(placement.group(g).local_size(s) for g in names) for s in range(world))
        longest = max(counts, default=0)
        index = {}
        for position, name in enumerate(names):
            g = placement.group(name)
            at = torch.empty(g.size or 0, dtype=torch.long)
            for s in range(world):
                start = s * longest + sum(placement.group(h).local_size(s) for h in names[:position])
                for a, b in g.ranges[s]:
                    at[a:b] = torch.arange(start, start + b - a)
                    start += b - a
            index[name] = at.to(runner.device)
        return _GatherPlan(_cat([runner.rows[g] for g in names], runner.device), counts, index)

    def run(self, packed: Tensor, group: Group, links: list[Tensor]) -> dict[str, Tensor]:
        if not self.index:
            return {}
        stacked = all_gather_tokens(packed.index_select(1, self.rows).transpose(0, 1), self.counts, group)
        links.append(stacked)
        return {g: stacked.index_select(0, i).transpose(0, 1) for g, i in self.index.items()}
