"""Head-parallel execution of one layout: two all-to-alls around the single-device executor.

See :mod:`~patternc.distributed.heads` for what moves and when this mode is
chosen. :class:`HeadRunner` is what :class:`~patternc.distributed.ContextParallel`
runs a layout with in head-parallel mode; :func:`all_to_all_tokens` is its
differentiable collective.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from patternc.distributed.calls import split_kv
from patternc.distributed.collectives import Group, guarded
from patternc.distributed.heads import ModeChoice
from patternc.distributed.placement import Placement
from patternc.distributed.rank import Comm, GatherPlan, RankTokens
from patternc.lower.layout import Layout
from patternc.nn.context import FullKV
from patternc.nn.executors.common import AttentionInputs, Executor

__all__ = ["HeadRunner", "all_to_all_tokens", "return_heads", "share_heads"]


def _all_to_all(
    send: Tensor, send_counts: Sequence[int], receive_counts: Sequence[int], group: Group
) -> Tensor:
    received = send.new_empty(sum(receive_counts))
    guarded(
        "exchanging heads and tokens (all-to-all)",
        group,
        lambda: dist.all_to_all_single(received, send, list(receive_counts), list(send_counts), group=group),
    )
    return received


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any, send: Tensor, send_counts: tuple[int, ...], receive_counts: tuple[int, ...], group: Group
    ) -> Tensor:
        ctx.send_counts, ctx.receive_counts, ctx.group = send_counts, receive_counts, group
        return _all_to_all(send.contiguous(), send_counts, receive_counts, group)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None, None]:
        # the gradient of each received piece goes back to the rank that sent it
        back = _all_to_all(grad.contiguous(), ctx.receive_counts, ctx.send_counts, ctx.group)
        return back, None, None, None


def all_to_all_tokens(
    send: Tensor, send_counts: Sequence[int], receive_counts: Sequence[int], group: Group
) -> Tensor:
    """Differentiable all-to-all of a flat tensor.

    Args:
        send: one dimension; its first ``send_counts[0]`` elements go to rank
            0 of ``group``, the next ``send_counts[1]`` to rank 1, and so on.
        send_counts: elements for each rank (this rank's own included).
        receive_counts: elements from each rank.
        group: the process group (None: the default one).

    Returns:
        ``[sum(receive_counts)]``: rank 0's elements first. Its backward sends
        each piece's gradient back to the rank it came from.
    """
    out: Tensor = _AllToAll.apply(send, tuple(send_counts), tuple(receive_counts), group)  # type: ignore[no-untyped-call]
    return out


def share_heads(
    inputs: AttentionInputs,
    counts: Sequence[int],
    rank: int,
    comm: Comm,
    layout: Layout,
    order: Tensor | None,
) -> AttentionInputs:
    """The first all-to-all: every rank of ``comm`` sends each rank its
    tokens for that rank's share of the heads, so this rank gets every
    rank's tokens for its heads (rank after rank, each in its local order;
    ``order`` reorders them, None keeps them). The key padding mask travels
    with the keys as one more channel; KV-cached groups and ALiBi slopes are
    sliced to this rank's heads.

    Args:
        inputs: this rank's tokens, every head.
        counts: tokens of each rank of ``comm``.
        rank: this rank's place in ``comm``.
        comm: the ranks that share their heads.
        layout: the layout of the tokens received (in ``order``).
        order: indices into the received tokens, or None.

    Returns:
        The inputs of this rank's heads on every token of ``comm``'s ranks.
    """
    q, k, v = inputs.q, inputs.k, inputs.v
    batch, n, heads = q.shape[0], q.shape[1], q.shape[2]
    world = comm.world_size
    here = heads // world
    widths = [q.shape[-1], k.shape[-1], v.shape[-1]]
    parts = [q, k, v]
    if inputs.key_padding_mask is not None:  # the mask travels with the keys, as a channel
        parts.append(inputs.key_padding_mask.to(q.dtype)[:, :, None, None].expand(-1, -1, heads, 1))
    packed = torch.cat(parts, dim=-1)
    width = packed.shape[-1]
    # [B, n, H, F] -> rank-major [R, B, n, H/R, F]: rank s gets heads s*H/R ... (s+1)*H/R - 1
    send = packed.reshape(batch, n, world, here, width).permute(2, 0, 1, 3, 4).reshape(-1)
    per_token = batch * here * width
    received = all_to_all_tokens(send, [n * per_token] * world, [c * per_token for c in counts], comm.group)
    _count(comm, "heads q,k,v", received, n * per_token)
    pieces = received.split_with_sizes([c * per_token for c in counts])
    every = torch.cat([p.view(batch, c, here, width) for p, c in zip(pieces, counts)], dim=1)
    if order is not None:
        every = every.index_select(1, order)
    q_all, k_all, v_all, *rest = every.split_with_sizes([*widths, width - sum(widths)], dim=-1)
    mine = slice(rank * here, (rank + 1) * here)
    cache = {g: (kc[:, :, mine], vc[:, :, mine]) for g, (kc, vc) in inputs.cache.items()}
    slopes = inputs.alibi_slopes[mine] if inputs.alibi_slopes is not None else None
    mask = rest[0][:, :, 0, 0] > 0.5 if inputs.key_padding_mask is not None else None
    return AttentionInputs(q_all, k_all, v_all, layout, cache, mask, inputs.dropout_p, inputs.scale, slopes)


def return_heads(out: Tensor, counts: Sequence[int], n: int, comm: Comm, order: Tensor | None) -> Tensor:
    """The second all-to-all, the first's inverse: the output of this rank's
    heads on every token (``order`` undone: None where none was applied)
    goes back to the ranks holding the tokens; this rank's ``n`` tokens come
    back for every head, ``[B, n, H, D]``."""
    batch, here, width = out.shape[0], out.shape[2], out.shape[-1]
    world = comm.world_size
    if order is not None:
        out = out.index_select(1, order)
    back = torch.cat([piece.reshape(-1) for piece in out.split_with_sizes(list(counts), dim=1)])
    per_token = batch * here * width
    returned = all_to_all_tokens(back, [c * per_token for c in counts], [n * per_token] * world, comm.group)
    _count(comm, "heads out", returned, n * per_token)
    local = returned.view(world, batch, n, here, width).permute(1, 2, 0, 3, 4)
    return local.reshape(batch, n, world * here, width)


def _count(comm: Comm, label: str, received: Tensor, own: int) -> None:
    """Bytes that arrived from other ranks (this rank's own piece never leaves it)."""
    total = (received.numel() - own) * received.element_size()
    comm.traffic[label] = comm.traffic.get(label, 0) + total


class HeadRunner:
    """One local layout in head-parallel mode, built once per (layout, heads).

    ``global_layout``: the plan at the global sizes, which the executor runs
    on every token for this rank's heads. Tokens arrive from every rank in
    that rank's local order; ``to_global`` puts them in input order and
    ``from_global`` takes them back out."""

    def __init__(
        self,
        placement: Placement,
        rank: int,
        comm: Comm,
        layout: Layout,
        global_layout: Layout,
        heads: int,
        choice: ModeChoice,
        device: torch.device,
    ) -> None:
        world = comm.world_size
        self.layout, self.global_layout, self.choice = layout, global_layout, choice
        self.rank, self.comm, self.heads = rank, comm, heads
        self.heads_here = heads // world
        self.counts = tuple(placement.tokens(s) for s in range(world))
        self.tokens = RankTokens(placement, rank, device)
        # every rank's tokens, rank after rank, each in its local order, as input positions
        stacked = [torch.arange(a, b) for s in range(world) for a, b in placement.local_ranges(s)]
        from_global = torch.cat(stacked) if stacked else torch.zeros(0, dtype=torch.long)
        self.from_global = from_global.to(device)
        self.to_global = torch.argsort(from_global).to(device)
        groups = [placement.group(name) for name in layout.key_value_groups]
        self.whole = tuple(g.name for g in groups if g.local_size(rank) == g.size)
        """Key groups this rank holds whole: in its ``new_kv_cache`` without a collective."""
        self.missing = tuple(g.name for g in groups if any(g.local_size(r) != g.size for r in range(world)))
        """Key groups some rank lacks: all-gathered on every rank for ``full_kv_cache``."""
        self._gather: GatherPlan | None = None
        """The all-gather of ``missing``, built when a cache first asks for it."""
        if from_global.numel() != global_layout.n_tokens:
            raise ValueError(
                f"the placement holds {from_global.numel()} tokens but the plan's layout at the global "
                f"sizes has {global_layout.n_tokens}; build ContextParallel from the plans the model runs"
            )

    def run(self, inputs: AttentionInputs, executor: Executor, full_cache: bool) -> tuple[Tensor, FullKV]:
        every = share_heads(inputs, self.counts, self.rank, self.comm, self.global_layout, self.to_global)
        local = return_heads(executor(every), self.counts, inputs.q.shape[1], self.comm, self.from_global)
        links: list[Tensor] = []
        full = self._full_kv(inputs, full_cache, links)
        if links:
            # every rank joins the gathers' backward, in the same order (see the ring's runner)
            local = local + sum(t.view(-1)[:1].sum() for t in links) * 0
        return local, full

    def _full_kv(self, inputs: AttentionInputs, complete: bool, links: list[Tensor]) -> FullKV:
        """The key groups this rank holds in full, all heads: its own whole
        groups, and with ``complete`` every group (one all-gather of those
        some rank lacks, which every rank joins)."""
        missing = self.missing if complete else ()
        own = [name for name in self.whole if name not in missing]
        if not own and not missing:
            return {}
        dim = inputs.k.shape[-1]
        packed = torch.cat([inputs.k, inputs.v], dim=-1)
        out: FullKV = {name: split_kv(packed.index_select(1, self.tokens.rows[name]), dim) for name in own}
        if missing:
            if self._gather is None:
                self._gather = GatherPlan.build(self.tokens, missing, self.comm.world_size)
            gather = self._gather
            out.update((name, split_kv(kv, dim)) for name, kv in gather.run(packed, self.comm, links).items())
        return out
