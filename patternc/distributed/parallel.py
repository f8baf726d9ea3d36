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
data parallelism: reduce them (DDP and FSDP2 do) before the optimizer step,
with the loss normalised by :func:`~patternc.distributed.loss.global_mean_loss`.
"""

from __future__ import annotations

from collections.abc import Sequence
from types import TracebackType
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed.device_mesh import DeviceMesh

from patternc.distributed.alltoall import HeadRunner
from patternc.distributed.blockwise import Kernel
from patternc.distributed.calls import BlockwiseCall, ExecutorCalls, split_kv
from patternc.distributed.collectives import DistributedError, Group, agree, all_gather_tokens
from patternc.distributed.heads import Mode, ModeChoice, choose_mode
from patternc.distributed.hybrid import HybridRunner, within_groups
from patternc.distributed.placement import Placement, ShardedSchedule, Strategy, place, schedule
from patternc.distributed.rank import Comm, GatherPlan, RankTokens, cat
from patternc.lower.layout import Layout, ShardSizes, Sizes
from patternc.lower.tables import TracedTables
from patternc.nn.context import FullKV, swap_sharding
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


def _process_group(group: Group | DeviceMesh) -> Group:
    """The process group of a one-dimensional ``DeviceMesh`` (a process group or None as it is).

    Raises:
        ValueError: a mesh of more than two dimensions (say which ones to shard over).
    """
    if not isinstance(group, DeviceMesh):
        return group
    if group.ndim != 1:
        names = group.mesh_dim_names
        example = f'mesh["{names[-1]}"]' if names else "a mesh of one dimension"
        raise ValueError(
            f"ContextParallel shards over one mesh dimension, but this DeviceMesh has {group.ndim} "
            f"(dimensions {list(names) if names else 'without names'}); pass the context-parallel "
            f"one, e.g. {example} (or a mesh of two dimensions with mode='hybrid': the schedule "
            f"over the first, heads over the second)"
        )
    return group.get_group()


def _hybrid_mesh(mesh: DeviceMesh) -> int:
    """The ranks per group of a two-dimensional mesh run in the hybrid mode.

    Raises:
        ValueError: a mesh that is not every rank of the default group in
            rank order (rank ``i * h + j`` at ``mesh[i, j]``), which the
            placement's numbering of ranks assumes.
    """
    world = dist.get_world_size()
    if mesh.mesh.flatten().tolist() != list(range(world)):
        raise ValueError(
            f"the hybrid mode needs a two-dimensional mesh of all {world} ranks in rank order, "
            f"as init_device_mesh(device, (groups, ranks_per_group)) builds it; this mesh is "
            f"{mesh.mesh.tolist()}"
        )
    return int(mesh.size(1))


class ContextParallel:
    """Shard the tokens of every group over the ranks of ``group`` and run
    attention modules sharded inside ``with`` (see the module docs).

    ``group``: a ``torch.distributed`` process group (None: the default
    group) or a one-dimensional ``DeviceMesh``, such as the context-parallel
    dimension of a larger mesh (``mesh["cp"]`` of a ``("dp", "cp")`` mesh,
    with ``fully_shard(model, mesh=mesh["dp"])`` beside it).

    ``plans``: the plan(s) the model runs (their calls decide the placement);
    ``sizes``: the global group sizes. ``gather_limit``/``strategy``: see
    :func:`~patternc.distributed.placement.schedule`. ``query_chunk``: query
    rows per step of the blockwise kernel (bounds its score memory).
    ``full_kv_cache``: the ``new_kv_cache`` modules return holds every key
    group in full on every rank (an extra all-gather of the groups the
    schedule did not gather); by default it holds the groups this rank has
    in full anyway (gathered anchors, its own whole documents).
    ``whole_groups``, ``balance``: see :func:`~patternc.distributed.placement.place`.
    ``backend``: the single-device executor for the local work (``"auto"``,
    ``"flex"``, ...); None keeps each module's own (its ``implementation``).
    ``kernel``: what attends each key block of a ring step or blockwise call:
    ``"auto"`` (torch's flash kernels on blocks that need no mask; else
    FlexAttention on CUDA, the chunked reference on CPU),
    ``"flex"`` (FlexAttention's forward wherever torch runs it; gradients
    from torch's flash backward on blocks that need no mask, else from
    FlexAttention on CUDA and the reference on CPU) or ``"reference"``.
    ``mode``: per layout, ``"ring"`` runs the schedule above (each call by
    gather, ring or halo, whichever moves least), ``"heads"``
    the head-parallel mode (all-to-alls around the module's executor on every
    token for ``heads / ranks`` heads; see :mod:`~patternc.distributed.heads`),
    ``"auto"`` whichever moves fewer bytes (:meth:`mode_for` says which and
    why), the schedule wherever ``strategy`` is given.

    ``mode="hybrid"`` with a two-dimensional ``DeviceMesh`` (every rank, in
    rank order: ``(groups, ranks_per_group)``) runs the hybrid of the two
    modes: the schedule between the groups of ranks along its first
    dimension, head-parallel all-to-alls within each group along its second
    (see :mod:`~patternc.distributed.hybrid`). A mesh of two dimensions is
    never taken as the hybrid unasked: a ``("dp", "cp")`` mesh passed whole
    is refused, not run as one batch.
    """

    def __init__(
        self,
        plans: Plan | Program | Sequence[Plan],
        sizes: Sizes,
        group: Group | DeviceMesh = None,
        *,
        gather_limit: float = 1.0,
        strategy: Strategy | None = None,
        query_chunk: int = 256,
        full_kv_cache: bool = False,
        whole_groups: bool = True,
        balance: float = 1.1,
        backend: str | None = None,
        kernel: Kernel = "auto",
        mode: Mode = "auto",
    ) -> None:
        if not dist.is_available() or not dist.is_initialized():
            raise DistributedError(
                "torch.distributed is not initialized: call torch.distributed.init_process_group "
                "first (torchrun sets the environment it reads)"
            )
        self._outer: ContextParallel | None = None
        """The hybrid mode's schedule between groups of ranks (None: one dimension)."""
        self._within: Group = None
        """The hybrid mode's group of ranks (the mesh's second dimension)."""
        if mode == "hybrid":
            if not isinstance(group, DeviceMesh) or group.ndim != 2:
                shape = (
                    f"a DeviceMesh of {group.ndim} dimensions"
                    if isinstance(group, DeviceMesh)
                    else "a process group"
                )
                raise ValueError(
                    f"mode='hybrid' needs a two-dimensional DeviceMesh of every rank, (groups, "
                    f"ranks_per_group), but got {shape}; build one with init_device_mesh(device, "
                    f"(groups, ranks_per_group))"
                )
            per_group = _hybrid_mesh(group)
            self._within = group.get_group(1)
            self._outer = ContextParallel(
                plans,
                sizes,
                group.get_group(0),
                gather_limit=gather_limit,
                strategy=strategy,
                query_chunk=query_chunk,
                whole_groups=whole_groups,
                balance=balance,
                backend=backend,
                kernel=kernel,
                mode="ring",
            )
            group = None  # the whole mesh: unshard and the placement's check span every rank
        group = _process_group(group)
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
        self.group: Group = group
        """The process group the tokens are sharded over (a mesh's dimension's group)."""
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        self.gather_limit = gather_limit
        self.strategy = strategy
        self.query_chunk = query_chunk
        if kernel not in ("auto", "flex", "reference"):
            raise ValueError(f"kernel={kernel!r}: use 'auto', 'flex' or 'reference'")
        self.kernel: Kernel = kernel
        if mode not in ("auto", "ring", "heads", "hybrid"):
            raise ValueError(f"mode={mode!r}: use 'auto', 'ring', 'heads' or 'hybrid'")
        self.mode: Mode = mode
        self._plans = plan_list
        self.full_kv_cache = full_kv_cache
        self.executor: Executor | None = get_executor(backend) if backend is not None else None
        calls = [c.attention for layout in layouts for c in layout.calls]
        self.placement: Placement = (
            place(
                groups,
                calls,
                dict(layouts[0].sizes),
                self.world_size,
                whole_groups=whole_groups,
                balance=balance,
            )
            if self._outer is None
            else within_groups(self._outer.placement, per_group)
        )
        agree("placement", self.placement.digest, group)
        self._runners: dict[
            tuple[int, bool, bool, torch.device, int | None], _Runner | HeadRunner | HybridRunner
        ] = {}
        """Per (local layout's ``id``, padded, ALiBi, device, heads): the schedule and its
        index tensors or the head-parallel runner, built on first use (layouts
        are cached, and each runner holds its layout, so the ``id`` is not
        reused while its entry lives). Heads None: the schedule, for reports."""
        self._active = False
        self._previous: Any = None
        self.traffic: dict[str, int] = {} if self._outer is None else self._outer.traffic
        """Bytes this rank received in forward passes, per collective
        (``gather <groups>``, ``ring <call>``; ``heads q,k,v`` and ``heads out``
        in head-parallel and hybrid mode), padding included; the backward
        moves the same again. Clear it to start a count."""

    # ---------------------------------------------------------------- tokens

    @property
    def local_sizes(self) -> ShardSizes:
        """``{group: tokens on this rank}``: the sizes to call modules with
        (a dict; a shaped group's shard there holds part of its shape)."""
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
        tokens = RankTokens(self.placement, self.rank, local.device)
        plan = GatherPlan.build(tokens, list(tokens.rows), self.world_size)
        stacked = all_gather_tokens(local.movedim(dim, 0), plan.counts, self.group)
        order = cat([plan.index[g] for g in plan.names], local.device)
        return stacked.index_select(0, order).movedim(0, dim)

    # --------------------------------------------------------------- context

    def __enter__(self) -> ContextParallel:
        if self._active:
            raise RuntimeError("this ContextParallel is already active")
        self._active, self._previous = True, swap_sharding(self)
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        swap_sharding(self._previous)
        self._active = False

    # ------------------------------------------------------------- execution

    def schedule_for(self, layout: Layout, padded: bool = False, alibi: bool = False) -> ShardedSchedule:
        """The schedule a module's local ``layout`` runs under (for reports;
        in the hybrid mode, its group's schedule, whose ranks are the groups)."""
        if self._outer is not None:
            return self._outer.schedule_for(self._group_layout(layout), padded, alibi)
        runner = self._runner(layout, padded, alibi, torch.device("cpu"), None)
        assert isinstance(runner, _Runner)
        return runner.schedule

    def mode_for(self, layout: Layout, heads: int, padded: bool = False, alibi: bool = False) -> ModeChoice:
        """The mode a module's local ``layout`` runs in with ``heads`` attention heads, and why.

        Args:
            layout: the module's layout at ``cp.local_sizes``.
            heads: the module's query heads.
            padded: whether it runs with a ``key_padding_mask``.
            alibi: whether it runs with ALiBi.

        Returns:
            The choice (``mode``, ``reason``) and the token rows either mode
            receives per rank (see :class:`~patternc.distributed.heads.ModeChoice`).

        Raises:
            ValueError: ``mode="heads"`` where the layout cannot run head-parallel
                (heads not a multiple of the ranks, a plan not given here), or
                a two-dimensional mesh (it runs the hybrid, whatever the layout).
        """
        if self._outer is not None:
            raise ValueError(
                "a two-dimensional mesh runs every layout in the hybrid mode; schedule_for(layout) "
                "gives its groups' schedule"
            )
        plan_schedule = schedule(
            [c.attention for c in layout.calls],
            self.placement,
            padded=padded,
            positional_bias=alibi,
            gather_limit=self.gather_limit,
            strategy=self.strategy,
        )
        found = self._global_layout(layout)
        unavailable = found if isinstance(found, str) else None
        return choose_mode(plan_schedule, self.mode, heads, unavailable, self.strategy)

    def _global_layout(self, layout: Layout) -> Layout | str:
        """The plan of a local layout at the global sizes, or why it is not known."""
        sizes = {g: None if n is None else self.placement.group(g).size for g, n in layout.sizes}
        return self._layout_at(layout, sizes)

    def _group_layout(self, layout: Layout) -> Layout:
        """The hybrid mode: the plan of a rank's local layout at its group's sizes.

        Raises:
            ValueError: the module's plan is not among this ContextParallel's.
        """
        assert self._outer is not None
        found = self._layout_at(layout, dict(self._outer.local_sizes))
        if isinstance(found, str):
            raise ValueError(found)
        return found

    def _layout_at(self, layout: Layout, sizes: dict[str, int | None]) -> Layout | str:
        """The plan of ``layout`` at ``sizes``, or why it is not known."""
        for plan in self._plans:
            if plan.name != layout.plan_name:
                continue
            whole = plan.layout(sizes)
            if whole.all_groups == layout.all_groups and dict(whole.pairs) == dict(layout.pairs):
                return whole
        return (
            f"the module's plan `{layout.plan_name}` is not among the plans this ContextParallel was "
            "built from (head-parallel mode runs the plan at the global sizes)"
        )

    def _runner(
        self, layout: Layout, padded: bool, alibi: bool, device: torch.device, heads: int | None
    ) -> _Runner | HeadRunner | HybridRunner:
        # keyed by the identity of the layout eager calls hold: a trace reads a
        # copy of it whose tables name the original (Dynamo cannot hash a
        # layout, and a key of plain values keeps the lookup in the graph's
        # Python, so a warm trace finds the runner an eager call built; the
        # runner holds its layout, so no other layout takes that identity
        # while the key is here)
        tables = layout.tables
        owner = tables.layout_id if isinstance(tables, TracedTables) else id(layout)
        key = (owner, padded, alibi, device, None if self.mode == "ring" else heads)
        runner = self._runners.get(key)
        if runner is None:
            runner = self._build_runner(layout, padded, alibi, device, key[-1])
            self._runners[key] = runner
        return runner

    def _build_runner(
        self, layout: Layout, padded: bool, alibi: bool, device: torch.device, heads: int | None
    ) -> _Runner | HeadRunner | HybridRunner:
        if self._outer is not None:
            return self._hybrid_runner(layout, padded, alibi, device, heads)
        if heads is None:
            return _Runner(self, layout, padded, alibi, device)
        choice = self.mode_for(layout, heads, padded, alibi)
        if choice.mode == "ring":
            return _Runner(self, layout, padded, alibi, device)
        # the all-to-all's sizes follow the heads and the padding channel: the
        # ranks compare both, as the schedule's runner compares its inputs (a
        # rank on the schedule meets this check with its own and fails too)
        agree(
            "attention inputs",
            ", ".join([*_input_names(padded, alibi), f"head-parallel over {heads} heads"]),
            self.group,
            fix=_SAME_INPUTS,
        )
        whole = self._global_layout(layout)
        assert not isinstance(whole, str)  # choose_mode picks heads only for a known plan
        comm = Comm(self.group, self.world_size, self.traffic)
        return HeadRunner(self.placement, self.rank, comm, layout, whole, heads, choice, device)

    def _hybrid_runner(
        self, layout: Layout, padded: bool, alibi: bool, device: torch.device, heads: int | None
    ) -> HybridRunner:
        """The hybrid mode's runner of a rank's local layout (see :mod:`~patternc.distributed.hybrid`)."""
        assert self._outer is not None
        expected = self.placement.local_sizes(self.rank)
        if dict(layout.sizes) != expected:
            raise ValueError(
                f"this module ran with sizes {dict(layout.sizes)} but the ContextParallel places "
                f"{expected} on rank {self.rank}; call modules with cp.local_sizes (and x = cp.shard(x_full))"
            )
        per_group = dist.get_world_size(self._within)
        if heads is not None and heads % per_group:
            raise ValueError(
                f"{heads} heads do not divide over the {per_group} ranks of a group of the mesh (the "
                f"hybrid mode gives each of them heads / ranks_per_group); use a mesh whose second "
                f"dimension divides the heads"
            )
        agree("attention inputs", ", ".join(_input_names(padded, alibi)), self._within, fix=_SAME_INPUTS)
        group_layout = self._group_layout(layout)
        outer = self._outer._runner(group_layout, padded, alibi, device, None)
        assert isinstance(outer, _Runner)
        first = self.rank - self.rank % per_group
        counts = tuple(self.placement.tokens(first + j) for j in range(per_group))
        comm = Comm(self._within, per_group, self.traffic)
        return HybridRunner(outer, group_layout, comm, self.rank % per_group, counts)

    def attend(self, inputs: AttentionInputs, executor: Executor, full_cache: bool) -> tuple[Tensor, FullKV]:
        inputs = inputs.in_token_space()  # the runner reads K/V at input positions
        padded = inputs.key_padding_mask is not None
        alibi = inputs.alibi_slopes is not None
        runner = self._runner(inputs.layout, padded, alibi, inputs.q.device, inputs.q.shape[2])
        return runner.run(inputs, self.executor or executor, full_cache or self.full_kv_cache)


# ------------------------------------------------------------------ runner

_SAME_INPUTS = (
    "pass a key_padding_mask on every rank or on none (all True on a rank without "
    "padding), on every call, and run the same model on every rank"
)


def _input_names(padded: bool, alibi: bool) -> list[str]:
    """What the ranks compare before a layout's first collective."""
    return ["a key_padding_mask" if padded else "no key_padding_mask", *(["ALiBi"] if alibi else [])]


class _Runner:
    """One local layout under the placement: its schedule (checked across
    ranks), the executor's part and the blockwise calls, and how their
    outputs go back into local order. Built once per layout."""

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
        self.layout, self.device = layout, device
        # A key padding mask adds a channel to every key/value collective and
        # ALiBi moves calls to the blockwise kernel; where these differ between
        # ranks, their collectives differ in size (gloo aborts the process) or
        # in kind, so the ranks compare them before any collective of this layout.
        agree("attention inputs", ", ".join(_input_names(padded, alibi)), cp.group, fix=_SAME_INPUTS)
        self.schedule = schedule(
            [c.attention for c in layout.calls],
            placement,
            padded=padded,
            positional_bias=alibi,
            gather_limit=cp.gather_limit,
            strategy=cp.strategy,
        )
        agree("schedule", self.schedule.digest, cp.group)
        self.comm = Comm(cp.group, cp.world_size, cp.traffic)
        self.tokens = RankTokens(placement, rank, device)
        self.gather = GatherPlan.build(self.tokens, self.schedule.gathered, cp.world_size)
        on_executor = [c for c in self.schedule.calls if not c.blockwise]
        self.executor_calls = (
            ExecutorCalls(on_executor, self.tokens, layout.plan_name) if on_executor else None
        )
        self.blockwise = tuple(
            BlockwiseCall(c, self.tokens, self.comm, cp.query_chunk, cp.kernel)
            for c in self.schedule.calls
            if c.blockwise
        )
        order = [self.executor_calls.order] if self.executor_calls is not None else []
        order += [b.queries.rows for b in self.blockwise]
        flat = cat(order, device)
        n = self.tokens.n_local
        self.identity_order = flat.shape[0] == n and bool((flat == torch.arange(n, device=device)).all())
        self.inverse = torch.argsort(flat) if flat.numel() else flat

    def run(self, inputs: AttentionInputs, executor: Executor, full_cache: bool) -> tuple[Tensor, FullKV]:
        dim = inputs.v.shape[-1]
        parts = [inputs.k, inputs.v]
        if inputs.key_padding_mask is not None:  # the mask travels with the keys, as a channel
            mask = inputs.key_padding_mask.to(inputs.k.dtype)[:, :, None, None]
            parts.append(mask.expand(-1, -1, inputs.k.shape[2], 1))
        packed = torch.cat(parts, dim=-1)
        links: list[Tensor] = []
        # the gather is posted first; the parts that read none of its groups
        # compute while it is in flight (every rank runs them in the same
        # order, so their ring exchanges match), the others after the wait.
        # In the backward the reduce-scatter of its gradients overlaps the
        # backward of the early parts (see post_all_gather).
        # a trace (its layout's tables are a trace's view) gathers synchronously
        overlap = not inputs.layout.tables.traced
        pending = self.gather.post(packed, self.comm, overlap)
        pieces: dict[int, Tensor] = {}  # the executor's part at -1, blockwise call i at i

        def compute(late: bool, gathered: dict[str, Tensor]) -> None:
            calls = self.executor_calls
            if calls is not None and calls.reads_gathered == late:
                pieces[-1] = calls.run(inputs, executor, gathered, packed)
            for i, b in enumerate(self.blockwise):
                if bool(b.gathered) == late:
                    pieces[i] = b.run(inputs, packed, gathered, links)

        compute(False, {})
        gathered = self.gather.finish(pending, self.comm, links)
        compute(True, gathered)
        done = [pieces[i] for i in sorted(pieces)]
        if not done:
            out = inputs.q.new_zeros(inputs.q.shape[:3] + inputs.v.shape[3:])
        elif len(done) == 1 and self.identity_order:
            out = done[0]
        else:
            out = torch.cat(done, dim=1).index_select(1, self.inverse)
        full = self._full_kv(packed, gathered, dim, full_cache, links, overlap)
        if links:
            # every rank's output depends on every collective, so every rank
            # runs each one's backward, in the same (reverse creation) order,
            # even where its queries never read what came in
            out = out + sum(t.view(-1)[:1].sum() for t in links) * 0
        return out, full

    def _full_kv(
        self,
        packed: Tensor,
        gathered: dict[str, Tensor],
        dim: int,
        complete: bool,
        links: list[Tensor],
        overlap: bool = True,
    ) -> FullKV:
        """The key groups this rank holds in full (all of them when ``complete``)."""
        placement, rank = self.tokens.placement, self.tokens.rank
        out: FullKV = {}
        missing = []
        world = self.comm.world_size
        for name in self.layout.key_value_groups:
            g = placement.group(name)
            if name in gathered:
                out[name] = split_kv(gathered[name], dim)
            elif complete and any(g.local_size(r) != g.size for r in range(world)):
                # every rank joins the same all-gathers: a group some rank lacks
                # is gathered on all of them, its owner's included
                missing.append(name)
            elif g.local_size(rank) == g.size:
                out[name] = split_kv(packed.index_select(1, self.tokens.rows[name]), dim)
        if complete and missing:
            extra = GatherPlan.build(self.tokens, missing, self.comm.world_size)
            out.update(
                (n, split_kv(kv, dim)) for n, kv in extra.run(packed, self.comm, links, overlap).items()
            )
        return out
