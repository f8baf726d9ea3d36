"""How a rank computes its calls: on the single-device executor, or blockwise.

- :class:`ExecutorCalls`: the calls whose tokens' positions do not cross
  ranks, as one plan over this rank's tokens (gathered or borrowed key
  groups become cached groups of that plan), run by the module's executor.
- :class:`BlockwiseCall`: one call attended key block by key block (the
  gathered keys, this rank's own, each ring step's), masks and ALiBi from
  global positions, blocks merged by their log-sum-exp
  (:class:`~patternc.distributed.blockwise.BlockKernel` per block). Its
  autograd function keeps the queries, this rank's keys/values, the merged
  output and its log-sum-exp for the backward; the backward passes the
  blocks around the ring again, their gradients following them. The ring
  is double-buffered: the exchange a step needs is posted before the step
  before it computes, and waited for when the step starts. A ring runs
  over the ranks holding the call's tokens only
  (:attr:`~patternc.distributed.placement.ShardedCall.ranks`).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from patternc.distributed import passing
from patternc.distributed.blockwise import Band, BlockKernel, Kernel, Segment, StepArgs, split_kv
from patternc.distributed.collectives import BLOCKS, GRADIENTS, PendingExchange, post_exchange
from patternc.distributed.merge import LseMerge, block_gradients
from patternc.distributed.passing import Attend, Gradients
from patternc.distributed.placement import Placement, ShardedCall, halo_offsets, halo_slices
from patternc.distributed.rank import Comm, RankTokens, Tokens, cat
from patternc.ir import KeyGroup, ResolvedRule
from patternc.lower.layout import Layout
from patternc.modifiers import UNBOUNDED, pair_band
from patternc.nn.executors.common import AttentionInputs, Executor
from patternc.plan import Plan

__all__ = ["BlockwiseCall", "ExecutorCalls", "split_kv"]


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
        self.reads_gathered = any(source == "gathered" for _, source in self.shadows.values())
        """Whether any call reads an all-gathered group (it runs after the gather arrives)."""

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


def _band(call: ShardedCall, placement: Placement) -> Band:
    """Each (query group, key group) pair's band (``low``, ``high``,
    ``dilation``, ``residue``; open sides :data:`UNBOUNDED` away). Under
    ``across`` the groups' offsets in the whole input shift the band, so
    ranks holding any part of a group agree on it.

    Raises:
        ValueError: ``across`` on keys read from a KV cache (no place in the input).
    """
    offsets, at = {}, 0
    for group in placement.groups:
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
        rows.append(tuple(row))
    return tuple(rows)


def _segments(placement: Placement, names: Sequence[str], rank: int) -> list[Segment]:
    """Rank ``rank``'s tokens of the input groups ``names``, in the order of
    :meth:`RankTokens.tokens` and :meth:`RankTokens.of_rank`."""
    out: list[Segment] = []
    for i, name in enumerate(names):
        g = placement.group(name)
        if g.size is None:
            continue
        out.extend(Segment(i, a, b - a) for a, b in g.ranges[rank] if b > a)
    return out


@dataclass(frozen=True)
class _Ring:
    """The ring part of a call on one rank of the call's ring (the ranks
    holding its tokens, :attr:`ShardedCall.ranks`): per step the kernel of
    the block it holds then (None: nothing of it is read here) and the
    block's token count; ``steps`` is how far blocks travel, the last step
    any rank reads plus one (a window reads its neighbours only). Blocks go
    to ``next`` and come from ``previous``, ranks of the process group;
    ``home`` is where the gradient of the block held at step ``s`` goes
    (``home[s]``) and whose comes back (``away[s]``)."""

    kernels: tuple[BlockKernel | None, ...]
    sizes: tuple[int, ...]
    steps: int
    comm: Comm
    next: int
    previous: int
    home: tuple[int, ...]
    away: tuple[int, ...]
    label: str


@dataclass(frozen=True)
class _Run:
    """A call's fixed blocks and its ring, and the arguments of its steps:
    what its autograd function needs besides its tensors."""

    fixed: tuple[BlockKernel | None, ...]
    ring: _Ring | None
    args: StepArgs

    def forward(self, q: Tensor, ring_kv: Tensor, kvs: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
        """The queries against the fixed blocks (``kvs``) and, with a ring,
        every ring step's block starting from this rank's ``ring_kv``: the
        merged output and its log-sum-exp."""
        args, ring = self.args, self.ring
        merge = LseMerge(q, args.dim)
        # step 1's block is on its way while the fixed blocks and step 0 compute
        pending = _post_block(ring, ring_kv, 1) if ring is not None else None
        for kernel, kv in zip(self.fixed, kvs):
            if kernel is not None:
                kernel.attend(q, kv, args, merge)
        if ring is not None:
            kv = ring_kv
            for step in range(ring.steps):
                if step:
                    assert pending is not None  # posted by the step before
                    kv = pending.wait().transpose(0, 1)
                    ring.comm.count(ring.label, pending.received)
                    # pass the block on before computing it: the next step's
                    # transfer overlaps this step's kernel
                    pending = _post_block(ring, kv, step + 1)
                kernel = ring.kernels[step]
                if kernel is not None:
                    kernel.attend(q, kv, args, merge)
        return merge.result(q.dtype)

    def backward(
        self, grad: Tensor, q: Tensor, ring_kv: Tensor, out: Tensor, lse: Tensor, kvs: Sequence[Tensor]
    ) -> Gradients:
        """The gradients, from the merged output ``out``, its gradient
        ``grad`` and log-sum-exp ``lse``: each block recomputed (or on the
        flash backward), the ring's blocks passed round again with their
        gradients behind them."""
        args, ring, work = self.args, self.ring, lse.dtype
        upstream = _MergedGradient(grad, out, lse)
        dq = torch.zeros(q.shape, dtype=work, device=q.device)
        dkvs = [torch.zeros_like(kv, dtype=work) for kv in kvs]
        blocks = _post_block(ring, ring_kv, 1) if ring is not None else None
        for kernel, kv, dkv in zip(self.fixed, kvs, dkvs):
            if kernel is not None:
                _block_backward(kernel, q, kv, upstream, args, dq, dkv)
        d_ring = None
        if ring is not None:
            d_ring = _ring_backward(ring, ring_kv, blocks, q, upstream, args, dq).to(ring_kv.dtype)
        return dq.to(q.dtype), d_ring, [d.to(kv.dtype) for d, kv in zip(dkvs, kvs)]


def _post_block(ring: _Ring, kv: Tensor, step: int) -> PendingExchange | None:
    """Pass ``kv`` (``[batch, tokens, ...]``) on to the next rank and start
    receiving the block this rank holds at ``step`` (None past the last step).

    No side stream: on NCCL the isend/irecv run on NCCL's own stream, after
    the work already queued on the current stream (the block is ready) and
    beside the kernels queued after them; the wait joins the streams on the
    device. Only this rank's own block is packed (a copy into ``[tokens,
    batch, ...]``, queued before the post); a received block is sent on as
    it arrived. Were packing heavier, it would go on a side stream here."""
    if step >= ring.steps:
        return None
    send = kv.transpose(0, 1)
    shape = (ring.sizes[step], *send.shape[1:])
    return post_exchange(send, ring.next, shape, ring.previous, ring.comm.group, BLOCKS)


def _ring_backward(
    ring: _Ring,
    ring_kv: Tensor,
    blocks: PendingExchange | None,
    q: Tensor,
    upstream: _MergedGradient,
    args: StepArgs,
    dq: Tensor,
) -> Tensor:
    """The ring's part of the backward; returns the gradient of ``ring_kv``.

    The blocks go round again with their gradients behind them, as two
    streams: a block is passed on as soon as it arrives (``blocks``, posted
    before this step computes), and this step's gradient of the block is
    computed from zero while the gradient the earlier ranks summed for it is
    still on its way; the two are added and sent after, so both transfers
    overlap the step's kernel. The gradient of the block held last goes home.
    """
    work = upstream.lse.dtype
    kv = ring_kv
    behind: PendingExchange | None = None  # the gradient of this step's block so far
    d_block = ring_kv.new_empty((0,), dtype=work)  # set by step 0: every ring has one
    for step in range(ring.steps):
        if step:
            assert blocks is not None and behind is not None  # posted by the step before
            kv = blocks.wait().transpose(0, 1)
            blocks = _post_block(ring, kv, step + 1)
        kernel = ring.kernels[step]
        d_step: Tensor | None = None
        if kernel is not None:
            d_step = torch.zeros_like(kv, dtype=work)
            _block_backward(kernel, q, kv, upstream, args, dq, d_step)
        if behind is not None:
            earlier = behind.wait().transpose(0, 1)
            d_step = earlier if d_step is None else d_step + earlier
        d_block = d_step if d_step is not None else torch.zeros_like(kv, dtype=work)
        if step + 1 < ring.steps:
            send = d_block.transpose(0, 1)
            shape = (ring.sizes[step + 1], *send.shape[1:])
            behind = post_exchange(send, ring.next, shape, ring.previous, ring.comm.group, GRADIENTS)
    if ring.steps > 1:
        back = ring.steps - 1
        send = d_block.transpose(0, 1)
        shape = (ring_kv.shape[1], *send.shape[1:])
        home = post_exchange(send, ring.home[back], shape, ring.away[back], ring.comm.group, GRADIENTS)
        d_block = home.wait().transpose(0, 1)
    return d_block


class _MergedGradient:
    """What a block's backward reads of the merged softmax: its output
    ``out``, the output's gradient ``grad_out`` (the queries' dtype) and
    log-sum-exp ``lse``. Blocks on torch's flash kernels read just these;
    the others also read the gradient in the log-sum-exp's dtype and
    ``<dO, O>`` per query, computed on first use (two passes over the
    output that a backward made only of flash-kernel blocks never pays)."""

    def __init__(self, grad_out: Tensor, out: Tensor, lse: Tensor) -> None:
        self.out, self.grad_out, self.lse = out, grad_out.to(out.dtype), lse

    @functools.cached_property
    def grad(self) -> Tensor:
        """``grad_out`` in the log-sum-exp's dtype."""
        return self.grad_out.to(self.lse.dtype)

    @functools.cached_property
    def delta(self) -> Tensor:
        """``<dO, O>`` per query ``[B, H, N]``: the softmax's backward term every block shares."""
        return (self.grad * self.out.to(self.lse.dtype)).sum(-1).transpose(1, 2)


def _block_backward(
    kernel: BlockKernel,
    q: Tensor,
    kv: Tensor,
    upstream: _MergedGradient,
    args: StepArgs,
    dq: Tensor,
    dkv: Tensor,
) -> None:
    """Add one block's gradients to ``dq`` and ``dkv``. A block on torch's
    flash kernels takes the merged output and log-sum-exp directly
    (:func:`~patternc.distributed.dense.backward`); any other block gets its
    share of the merged output's gradient
    (:func:`~patternc.distributed.merge.block_gradients`) and runs the
    kernel's own backward, recomputed piece by piece."""
    if kernel.dense_backward(q, args):
        kernel.add_dense_gradients(q, kv, upstream.grad_out, upstream.out, upstream.lse, args, dq, dkv)
        return
    grad, delta, lse = upstream.grad, upstream.delta, upstream.lse
    for start, stop, keys, attend in kernel.pieces(q, args):
        if keys is None:
            kv_read = kv
        elif isinstance(keys, slice):
            kv_read = kv[:, keys]
        else:
            kv_read = kv.index_select(1, keys)
        with torch.enable_grad():
            qc = q[:, start:stop].detach().requires_grad_(True)
            kvc = kv_read.detach().requires_grad_(True)
            out_b, lse_b = attend(qc, kvc)
            rows = (grad[:, start:stop], out_b.detach(), lse_b.detach())
            g_out, g_lse = block_gradients(*rows, lse[:, :, start:stop], delta[:, :, start:stop])
            d_q, d_kv = torch.autograd.grad((out_b, lse_b), (qc, kvc), (g_out, g_lse))
        dq[:, start:stop] += d_q
        if keys is None:
            dkv += d_kv
        elif isinstance(keys, slice):
            dkv[:, keys] += d_kv
        else:
            dkv.index_add_(1, keys, d_kv.to(dkv.dtype))


@dataclass(frozen=True)
class _HaloStep:
    """One offset of a halo on this rank: the keys it sends to ``to`` (rows
    of its own keys of the call) and the ``size`` keys it receives from
    ``source`` (None: nothing received is read here)."""

    to: int
    send_rows: Tensor
    source: int
    size: int
    kernel: BlockKernel | None


@dataclass(frozen=True)
class _Halo:
    """A ``halo`` call on one rank: its own keys' kernel, then a step per
    offset of :func:`~patternc.distributed.placement.halo_offsets` (the same
    on every rank of the call, some empty on this one)."""

    own: BlockKernel | None
    steps: tuple[_HaloStep, ...]
    comm: Comm
    label: str


@dataclass(frozen=True)
class _HaloRun:
    """A halo call's fixed blocks, its halo and the arguments of its steps:
    what its autograd function needs besides its tensors."""

    fixed: tuple[BlockKernel | None, ...]
    halo: _Halo
    args: StepArgs

    def forward(self, q: Tensor, own_kv: Tensor, kvs: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
        """The queries against the fixed blocks, this rank's own keys
        (``own_kv``) and the keys each halo step receives, each step's
        exchange posted before the step before it computes: the merged
        output and its log-sum-exp."""
        args, halo = self.args, self.halo
        merge = LseMerge(q, args.dim)
        pending = _post_halo(halo, own_kv, 0)
        for kernel, kv in zip(self.fixed, kvs):
            if kernel is not None:
                kernel.attend(q, kv, args, merge)
        if halo.own is not None:
            halo.own.attend(q, own_kv, args, merge)
        for at, step in enumerate(halo.steps):
            assert pending is not None  # posted by the step before
            kv = pending.wait().transpose(0, 1)
            halo.comm.count(halo.label, pending.received)
            pending = _post_halo(halo, own_kv, at + 1)
            if step.kernel is not None:
                step.kernel.attend(q, kv, args, merge)
        return merge.result(q.dtype)

    def backward(
        self, grad: Tensor, q: Tensor, own_kv: Tensor, out: Tensor, lse: Tensor, kvs: Sequence[Tensor]
    ) -> Gradients:
        """The gradients: each step's keys received again, their gradient
        computed and sent back to the rank that holds them, while the
        gradients of the keys this rank sent come back and are added to its
        own."""
        args, halo, work = self.args, self.halo, lse.dtype
        upstream = _MergedGradient(grad, out, lse)
        dq = torch.zeros(q.shape, dtype=work, device=q.device)
        dkvs = [torch.zeros_like(kv, dtype=work) for kv in kvs]
        d_own = torch.zeros_like(own_kv, dtype=work)
        blocks = _post_halo(halo, own_kv, 0)
        back: list[PendingExchange] = []
        for kernel, kv, dkv in zip(self.fixed, kvs, dkvs):
            if kernel is not None:
                _block_backward(kernel, q, kv, upstream, args, dq, dkv)
        if halo.own is not None:
            _block_backward(halo.own, q, own_kv, upstream, args, dq, d_own)
        for at, step in enumerate(halo.steps):
            assert blocks is not None  # posted by the step before
            kv = blocks.wait().transpose(0, 1)
            blocks = _post_halo(halo, own_kv, at + 1)
            d_kv = torch.zeros_like(kv, dtype=work)
            if step.kernel is not None:
                _block_backward(step.kernel, q, kv, upstream, args, dq, d_kv)
            send = d_kv.transpose(0, 1)
            shape = (step.send_rows.shape[0], *send.shape[1:])
            back.append(post_exchange(send, step.source, shape, step.to, halo.comm.group, GRADIENTS))
        for step, pending in zip(halo.steps, back):
            d_own.index_add_(1, step.send_rows, pending.wait().transpose(0, 1))
        return dq.to(q.dtype), d_own.to(own_kv.dtype), [d.to(kv.dtype) for d, kv in zip(dkvs, kvs)]


def _post_halo(halo: _Halo, own_kv: Tensor, at: int) -> PendingExchange | None:
    """Start sending step ``at``'s keys (rows of ``own_kv``, ``[batch, tokens,
    ...]``) and receiving its keys from its source (None past the last step)."""
    if at >= len(halo.steps):
        return None
    step = halo.steps[at]
    send = own_kv.index_select(1, step.send_rows).transpose(0, 1)
    shape = (step.size, *send.shape[1:])
    return post_exchange(send, step.to, shape, step.source, halo.comm.group, BLOCKS)


_LOCAL = -1
"""A call's block code (:meth:`BlockwiseCall.run_of`): this rank's own keys."""
_GATHERED = -2
"""``_GATHERED - i``: the gathered key group ``i``."""


class BlockwiseCall:
    """One call on the blockwise kernels: its queries, and per key block
    (cached groups, this rank's own or the gathered keys, each ring step's)
    a :class:`~patternc.distributed.blockwise.BlockKernel`, built once.

    Args:
        call: the call and its strategy.
        tokens: this rank's tokens.
        comm: the process group and the traffic counter.
        query_chunk: query rows per step of the reference kernel.
        kernel: which kernel attends each block (see
            :data:`~patternc.distributed.blockwise.Kernel`).
    """

    def __init__(
        self, call: ShardedCall, tokens: RankTokens, comm: Comm, query_chunk: int, kernel: Kernel = "auto"
    ) -> None:
        d, placement, rank = tokens.device, tokens.placement, tokens.rank
        attention = call.attention
        self.call, self.comm, self.query_chunk, self.device, self.kernel = call, comm, query_chunk, d, kernel
        self.key_groups = attention.key_names
        self.band = _band(call, placement)
        self.grids = tuple(tuple(key.modifiers.grid for key in attention.keys) for _ in attention.queries)
        self.queries = tokens.tokens(attention.queries)
        self.local_keys: Tokens = tokens.tokens(self.key_groups)
        """This rank's input tokens of the call's key groups (what it sends around the ring)."""
        q_segments = _segments(placement, attention.queries, rank)
        self._q_segments = q_segments
        self._cached: dict[tuple[int, int], BlockKernel] = {}
        self.local: BlockKernel | None = None
        if call.strategy == "local":
            self.local = self._kernel(_segments(placement, self.key_groups, rank))
        self.gathered: dict[str, BlockKernel] = {}
        if call.strategy == "gather":
            for i, name in enumerate(self.key_groups):
                size = placement.group(name).size
                if size is not None:
                    self.gathered[name] = self._kernel([Segment(i, 0, size)])
        self.ring: _Ring | None = None
        if call.strategy == "ring":
            self.ring = self._ring(tokens, comm)
        self.halo: _Halo | None = None
        if call.strategy == "halo":
            self.halo = self._halo(tokens, comm)
        self.passes_keys = self.ring is not None or (self.halo is not None and len(self.halo.steps) > 0)
        """Whether keys and their gradients pass between ranks (the custom operator under compile)."""
        definition = (
            placement.digest,
            call.index,
            attention.text(),
            call.strategy,
            rank,
            str(d),
            kernel,
            query_chunk,
            id(comm.group),
        )
        self.handle = passing.register(self, definition)
        """How a compiled graph's operator finds this call (:mod:`patternc.distributed.passing`)."""

    def _kernel(self, keys: Sequence[Segment]) -> BlockKernel:
        return BlockKernel(
            self._q_segments,
            keys,
            self.band,
            self.call.attention.has_modifiers,
            self.device,
            self.query_chunk,
            self.grids,
        )

    def _ring(self, tokens: RankTokens, comm: Comm) -> _Ring | None:
        """The ring over the call's ranks (None on a rank outside them: it
        neither sends, receives nor computes for the call). Every rank knows
        the placement, so all of the call's ranks stop the ring at the same
        step (:attr:`ShardedCall.steps`)."""
        placement, rank, ranks = tokens.placement, tokens.rank, self.call.ranks
        if rank not in ranks:
            return None
        at, size, steps = ranks.index(rank), len(ranks), self.call.steps

        def back(step: int) -> int:
            """The rank whose block this rank holds at ``step``."""
            return ranks[(at - step) % size]

        keys = {r: _segments(placement, self.key_groups, r) for r in ranks}
        kernels = []
        for step in range(steps):
            kernel = self._kernel(keys[back(step)])
            kernels.append(None if kernel.empty else kernel)
        sizes = tuple(sum(s.length for s in keys[back(step)]) for step in range(steps))
        label = f"ring {self.call.attention.text()}"
        return _Ring(
            tuple(kernels),
            sizes,
            steps,
            comm,
            next=ranks[(at + 1) % size],
            previous=back(1),
            home=tuple(back(step) for step in range(steps)),
            away=tuple(ranks[(at + step) % size] for step in range(steps)),
            label=label,
        )

    def _halo(self, tokens: RankTokens, comm: Comm) -> _Halo | None:
        """The halo's steps on this rank (None outside the call's ranks): at
        each offset ``s`` of :func:`~patternc.distributed.placement.halo_offsets`
        it sends the rank ``s`` after it in the call's ranks the keys that
        rank reads, and receives from the rank ``s`` before it the keys it
        reads itself. Every rank walks the same offsets, posting nothing
        where it neither sends nor receives: NCCL matches the messages
        between two ranks by the order they are posted in (gloo by tag), and
        in the backward a pair's keys and gradients must be posted in the
        same order on both."""
        placement, rank, ranks = tokens.placement, tokens.rank, self.call.ranks
        if rank not in ranks:
            return None
        attention, names = self.call.attention, self.key_groups
        bases, offset = {}, 0  # each key's first row in this rank's keys of the call
        for i, name in enumerate(names):
            if placement.group(name).size is not None:
                bases[i] = offset
                offset += placement.group(name).local_size(rank)

        def rows(pieces: Sequence[tuple[int, tuple[int, int]]]) -> Tensor:
            out = []
            for i, (a, b) in pieces:
                row = bases[i]
                for c, d in placement.group(names[i]).ranges[rank]:
                    if max(a, c) < min(b, d):
                        out.append(torch.arange(row + max(a, c) - c, row + min(b, d) - c))
                    row += d - c
            return cat(out, self.device)

        at, size = ranks.index(rank), len(ranks)
        mine = halo_slices(attention, placement, rank, ranks)
        steps = []
        for s in halo_offsets(attention, placement, ranks):
            to, source = ranks[(at + s) % size], ranks[(at - s) % size]
            sent = halo_slices(attention, placement, to, ranks).get(rank, ())
            got = mine.get(source, ())
            kernel = self._kernel([Segment(i, a, b - a) for i, (a, b) in got]) if got else None
            if kernel is not None and kernel.empty:
                kernel = None
            steps.append(_HaloStep(to, rows(sent), source, sum(b - a for _, (a, b) in got), kernel))
        own = self._kernel(_segments(placement, names, rank))
        return _Halo(None if own.empty else own, tuple(steps), comm, f"halo {attention.text()}")

    def _cached_kernel(self, index: int, length: int) -> BlockKernel:
        key = (index, length)
        if key not in self._cached:
            self._cached[key] = self._kernel([Segment(index, 0, length)])
        return self._cached[key]

    def run(
        self, inputs: AttentionInputs, packed: Tensor, gathered: dict[str, Tensor], links: list[Tensor]
    ) -> Tensor:
        q = inputs.q.index_select(1, self.queries.rows)
        dim = inputs.v.shape[-1]
        slopes = inputs.alibi_slopes
        args = StepArgs(
            dim=dim,
            scale=inputs.scale if inputs.scale is not None else dim**-0.5,
            dropout_p=inputs.dropout_p,
            slopes=slopes.detach() if slopes is not None else None,
            padded=inputs.key_padding_mask is not None,
            kernel=self.kernel,
        )
        blocks: list[int] = []  # which fixed blocks, as codes of :meth:`run_of`
        kvs: list[Tensor] = []
        for i, name in enumerate(self.key_groups):
            if name in inputs.cache:
                k, v = inputs.cache[name]
                kv = torch.cat([k, v], dim=-1)
                if args.padded:  # cached keys are real
                    kv = torch.cat([kv, kv.new_ones((*kv.shape[:-1], 1))], dim=-1)
                blocks.append(i)
                kvs.append(kv)
        if self.local is not None:
            blocks.append(_LOCAL)
            kvs.append(packed.index_select(1, self.local_keys.rows))
        for i, name in enumerate(self.key_groups):
            if name in self.gathered and name in gathered:
                blocks.append(_GATHERED - i)
                kvs.append(gathered[name])
        run = self.run_of(blocks, kvs, args)
        own_keys_travel = self.halo is not None or self.ring is not None  # a halo's own block, a ring's first
        main_kv = packed.index_select(1, self.local_keys.rows) if own_keys_travel else packed[:, :0]
        if not self.passes_keys:
            out: Tensor = Attend.apply(run, q, main_kv, *kvs)  # type: ignore[no-untyped-call]
            return out
        out = passing.attend(run, self.handle, blocks, q, main_kv, kvs)
        # every rank of the call's ring or halo runs its backward (blocks and
        # their gradients pass through it), even one whose queries read
        # nothing that arrived; the ranks outside a ring take no part
        links.append(out)
        return out

    def run_of(self, blocks: Sequence[int], kvs: Sequence[Tensor], args: StepArgs) -> _Run | _HaloRun:
        """The call's run over its fixed blocks ``blocks`` (``kvs`` theirs):
        ``i >= 0`` the cached key group ``i`` (its length from its block),
        ``_LOCAL`` this rank's own keys, ``_GATHERED - i`` the gathered key
        group ``i``. Built on every call, and by the custom operator from its
        plain arguments (:mod:`patternc.distributed.passing`)."""
        fixed: list[BlockKernel | None] = []
        for code, kv in zip(blocks, kvs, strict=True):
            if code >= 0:
                kernel: BlockKernel | None = self._cached_kernel(code, kv.shape[1])
            elif code == _LOCAL:
                kernel = self.local
            else:
                kernel = self.gathered[self.key_groups[_GATHERED - code]]
            fixed.append(None if kernel is None or kernel.empty else kernel)
        if self.halo is not None:
            return _HaloRun(tuple(fixed), self.halo, args)
        return _Run(tuple(fixed), self.ring, args)
