"""The softmax over several key blocks, merged by their log-sum-exp.

A rank attends its queries to key blocks one at a time (gathered keys, its
own, each ring or halo step's); each block's kernel returns its output
normalised over that block alone and the block's log-sum-exp. The outputs
of the whole softmax are the blocks' outputs weighted by
``exp(lse_block - lse_total)``.

The merge is memory-bound work on the full ``[B, N, H, D]`` output, as large
as the queries, once per block: written as a dozen tensor operations it
reads and writes the output about ten times, as long as the attention
kernel on a block of a few thousand keys. Here it is one fused pass per
block on a GPU (compiled once, for dynamic shapes), each block's output is
read once (a block is merged when the next one arrives, so the last merge
writes the result in the queries' dtype), and a single block needs no merge.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch import Tensor

__all__ = ["LseMerge", "block_gradients"]

Block = tuple[Tensor, Tensor]
"""A block's output ``[B, N, H, D]`` and log-sum-exp ``[B, H, N]`` (``-inf``
for a query that sees no key of the block)."""


def _merged(out_a: Tensor, lse_a: Tensor, out_b: Tensor, lse_b: Tensor, dtype: torch.dtype) -> Block:
    """Two blocks' softmax as one: the output in ``dtype``, the log-sum-exp
    in ``lse_a``'s. Rows no key reached stay zero with ``-inf``."""
    work = lse_a.dtype
    total = torch.logaddexp(lse_a, lse_b)
    safe = total.masked_fill(torch.isinf(total), 0.0)  # rows that saw no key: weights 0
    weight_a = torch.exp(lse_a - safe).transpose(1, 2)[..., None]
    weight_b = torch.exp(lse_b - safe).transpose(1, 2)[..., None]
    return (out_a.to(work) * weight_a + out_b.to(work) * weight_b).to(dtype), total


def _fuses(device: torch.device) -> bool:
    """Whether the compiled forms run: on a GPU, outside a user's
    ``torch.compile`` (inside it the plain forms are traced into the user's graph)."""
    return device.type == "cuda" and not torch.compiler.is_compiling()


@functools.cache
def _fused_merge() -> Callable[..., Block]:
    """:func:`_merged` compiled once per process: the GPU's merge, one kernel.
    Shapes are dynamic (a pointwise kernel runs as fast with them), so most
    calls share a few compiles (per dtypes, strides and sizes of 1). Not
    ``fullgraph``: past Dynamo's recompile limit the merge runs eagerly
    rather than raising."""
    return torch.compile(_merged, dynamic=True)


class LseMerge:
    """The softmax over the blocks :meth:`add` receives, :meth:`result` at
    the end. One block is held back until the next arrives, so the final
    merge writes the result in the queries' dtype and a single block needs
    no merge. A block may cover some query rows only (a rectangle of a key
    block): it is merged into those rows of a running result this merge
    owns, so a kernel's output is never written. The result is a fresh
    contiguous tensor, never a view of a kernel's output (an autograd
    function's output may be changed in place)."""

    def __init__(self, q: Tensor, dim: int) -> None:
        """Args:
        q: the queries ``[B, N, H, *]`` (their shape, dtype and device).
        dim: the value head size.
        """
        self._q_shape = (*q.shape[:3], dim)
        self._device = q.device
        self.work = torch.promote_types(q.dtype, torch.float32)
        """The dtype merges compute and log-sum-exps are held in."""
        self._merge = _fused_merge() if _fuses(q.device) else _merged
        self._done: Block | None = None
        self._owned = False
        """Whether ``_done`` is this merge's own (else a kernel's output)."""
        self._untouched: list[tuple[int, int]] = []
        """Query rows of ``_done`` no block has reached (still zeros and ``-inf``)."""
        self._held: Block | None = None

    def add(self, out: Tensor, lse: Tensor, rows: slice | None = None) -> None:
        """One more block: its output ``[B, N, H, D]`` and log-sum-exp
        ``[B, H, N]``; or, with ``rows``, a block of those query rows only
        (``[B, rows, H, D]`` and ``[B, H, rows]``), merged into them at once."""
        held = self._held
        if held is not None:
            if self._done is None:
                self._done, self._owned = held, False
            else:
                self._done, self._owned = self._merge(*self._done, *held, self.work), True
            self._held, self._untouched = None, []
        lse = lse.to(self.work).contiguous()  # one stride order: fewer compiles
        if rows is None:
            self._held = (out, lse)
            return
        done_out, done_lse = self._owned_done()
        if self._claim(rows.start, rows.stop):  # nothing there yet: the piece is the softmax so far
            done_out[:, rows] = out
            done_lse[:, :, rows] = lse
            return
        merged_out, merged_lse = self._merge(done_out[:, rows], done_lse[:, :, rows], out, lse, self.work)
        done_out[:, rows] = merged_out
        done_lse[:, :, rows] = merged_lse

    def _claim(self, start: int, stop: int) -> bool:
        """Mark rows ``start:stop`` reached; whether none of them had been.
        (Merging a piece into rows no block reached gives the piece itself:
        its weight is 1, theirs 0.)"""
        fresh = any(lo <= start and stop <= hi for lo, hi in self._untouched)
        self._untouched = [
            (a, b)
            for lo, hi in self._untouched
            for a, b in ((lo, min(hi, start)), (max(lo, stop), hi))
            if b > a
        ]
        return fresh

    def _owned_done(self) -> Block:
        """The merged blocks so far as this merge's own tensors, in its dtype
        (rows are written into them): zeros and ``-inf`` before any block, a
        copy of a kernel's output."""
        if self._done is None:
            self._done = self._nothing(self.work)
            self._untouched = [(0, self._q_shape[1])]
        elif not self._owned:
            out, lse = self._done
            self._done = (out.to(self.work, memory_format=torch.contiguous_format, copy=True), lse.clone())
        self._owned = True
        return self._done

    def _nothing(self, dtype: torch.dtype) -> Block:
        """The softmax over no key: zeros in ``dtype`` and ``-inf`` in the merge's."""
        b, n, h, d = self._q_shape
        out = torch.zeros((b, n, h, d), dtype=dtype, device=self._device)
        return out, torch.full((b, h, n), float("-inf"), dtype=self.work, device=self._device)

    def result(self, dtype: torch.dtype) -> Block:
        """The merged output in ``dtype`` and its log-sum-exp (``work``); with
        no block, zeros and ``-inf``."""
        if self._held is None and self._done is not None:  # the last block came as rows
            out, lse = self._done
            return out.to(dtype), lse
        if self._held is None:
            return self._nothing(dtype)
        if self._done is None:  # one block: its output as the result, fresh and contiguous
            out, lse = self._held
            out = out.to(dtype)
            if out._base is not None or not out.is_contiguous():  # the kernel's view of its buffer
                out = out.clone(memory_format=torch.contiguous_format)
            return out, lse
        return self._merge(*self._done, *self._held, dtype)


def _block_gradients(grad: Tensor, out: Tensor, lse: Tensor, total: Tensor, delta: Tensor) -> Block:
    """What one block's output and log-sum-exp receive of the merged
    output's gradient ``grad`` (``[B, N, H, D]``, the merge's dtype). The
    merged output is ``sum_b w_b O_b`` with ``w_b = exp(lse_b - lse)``, so
    the block's output gets ``w_b dO`` (in its own dtype) and its log-sum-exp
    ``w_b (<dO, O_b> - <dO, O>)``; ``delta`` is ``<dO, O>`` ``[B, H, N]``,
    ``total`` the merged log-sum-exp. Rows that saw none of the block (or no
    key at all) get nothing."""
    dead = torch.isinf(total) | torch.isinf(lse)
    weight = torch.exp(lse - total.masked_fill(torch.isinf(total), 0.0)).masked_fill(dead, 0.0)
    g_out = grad * weight.transpose(1, 2)[..., None]
    g_lse = weight * ((grad * out.to(grad.dtype)).sum(-1).transpose(1, 2) - delta)
    return g_out.to(out.dtype), g_lse


@functools.cache
def _fused_block_gradients() -> Callable[..., Block]:
    """:func:`_block_gradients` compiled (the GPU's: one pass over the
    gradient), as :func:`_fused_merge` is."""
    return torch.compile(_block_gradients, dynamic=True)


def block_gradients(grad: Tensor, out: Tensor, lse: Tensor, total: Tensor, delta: Tensor) -> Block:
    """One block's share of the merged gradient (see :func:`_block_gradients`),
    fused on a GPU.

    Args:
        grad: the merged output's gradient ``[B, N, H, D]``.
        out: the block's output ``[B, N, H, D]`` (recomputed).
        lse: the block's log-sum-exp ``[B, H, N]``.
        total: the merged log-sum-exp ``[B, H, N]``.
        delta: ``<grad, merged output>`` per query ``[B, H, N]``.

    Returns:
        The gradients of the block's output (its dtype) and log-sum-exp.
    """
    if _fuses(grad.device):
        return _fused_block_gradients()(grad, out, lse, total, delta)
    return _block_gradients(grad, out, lse, total, delta)
