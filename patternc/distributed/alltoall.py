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

__all__ = ["HeadRunner", "all_to_all_tokens"]


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
        q, k, v = inputs.q, inputs.k, inputs.v
        batch, n, heads = q.shape[0], q.shape[1], q.shape[2]
        world, h = self.comm.world_size, self.heads_here
        widths = [q.shape[-1], k.shape[-1], v.shape[-1]]
        parts = [q, k, v]
        if inputs.key_padding_mask is not None:  # the mask travels with the keys, as a channel
            parts.append(inputs.key_padding_mask.to(q.dtype)[:, :, None, None].expand(-1, -1, heads, 1))
        packed = torch.cat(parts, dim=-1)
        width = packed.shape[-1]
        # [B, n, H, F] -> rank-major [R, B, n, H/R, F]: rank s gets heads s*H/R ... (s+1)*H/R - 1
        send = packed.reshape(batch, n, world, h, width).permute(2, 0, 1, 3, 4).reshape(-1)
        per_token = batch * h * width
        received = all_to_all_tokens(
            send, [n * per_token] * world, [c * per_token for c in self.counts], self.comm.group
        )
        self._count("heads q,k,v", received, n * per_token)
        pieces = received.split_with_sizes([c * per_token for c in self.counts])
        every = torch.cat([p.view(batch, c, h, width) for p, c in zip(pieces, self.counts)], dim=1)
        every = every.index_select(1, self.to_global)
        q_all, k_all, v_all, *rest = every.split_with_sizes([*widths, width - sum(widths)], dim=-1)
        mine = slice(self.rank * h, (self.rank + 1) * h)
        cache = {g: (kc[:, :, mine], vc[:, :, mine]) for g, (kc, vc) in inputs.cache.items()}
        slopes = inputs.alibi_slopes[mine] if inputs.alibi_slopes is not None else None
        mask = rest[0][:, :, 0, 0] > 0.5 if inputs.key_padding_mask is not None else None
        out = executor(
            AttentionInputs(
                q_all, k_all, v_all, self.global_layout, cache, mask, inputs.dropout_p, inputs.scale, slopes
            )
        )
        out_width = out.shape[-1]
        # back: each rank's tokens (its local order) of this rank's heads
        stacked = out.index_select(1, self.from_global).split_with_sizes(self.counts, dim=1)
        back = torch.cat([piece.reshape(-1) for piece in stacked])
        per_token = batch * h * out_width
        returned = all_to_all_tokens(
            back, [c * per_token for c in self.counts], [n * per_token] * world, self.comm.group
        )
        self._count("heads out", returned, n * per_token)
        local = returned.view(world, batch, n, h, out_width).permute(1, 2, 0, 3, 4)
        local = local.reshape(batch, n, heads, out_width)
        links: list[Tensor] = []
        full = self._full_kv(inputs, full_cache, links)
        if links:
            # every rank joins the gathers' backward, in the same order (see the ring's runner)
            local = local + sum(t.view(-1)[:1].sum() for t in links) * 0
        return local, full

    def _count(self, label: str, received: Tensor, own: int) -> None:
        """Bytes that arrived from other ranks (this rank's own piece never leaves it)."""
        total = (received.numel() - own) * received.element_size()
        self.comm.traffic[label] = self.comm.traffic.get(label, 0) + total

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
