"""Blocks merged by their log-sum-exp equal one softmax over all their keys."""

from __future__ import annotations

import pytest
import torch
from reference import relative_error
from torch import Tensor

from patternc.distributed.merge import LseMerge


def _block(q: Tensor, k: Tensor, v: Tensor, allowed: Tensor) -> tuple[Tensor, Tensor]:
    """One block's output ``[B, N, H, D]`` normalised over the block, and its
    log-sum-exp ``[B, H, N]`` (``-inf`` and zeros where a query sees none of it)."""
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k).masked_fill(~allowed, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    weights = torch.exp(scores - lse.masked_fill(torch.isinf(lse), 0.0)[..., None])
    return torch.einsum("bhqk,bkhd->bqhd", weights, v), lse


DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU")),
]


@pytest.mark.parametrize("sizes", [(7,), (5, 9), (1, 13, 4), (3, 0, 6, 2)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("device", DEVICES)
def test_merged_blocks_equal_one_softmax_over_their_keys(
    sizes: tuple[int, ...], dtype: torch.dtype, device: str
) -> None:
    """Random blocks (an empty one among them), a random mask under which
    some queries see no key of a block and one query sees none at all: the
    merge equals the float64 softmax over every key, in the dtype asked for,
    the unreachable query zero with a ``-inf`` log-sum-exp (on a GPU, the
    fused merge)."""
    gen = torch.Generator().manual_seed(len(sizes) * 7 + sum(sizes))
    b, n, h, d = 2, 11, 3, 8
    n_keys = sum(sizes)
    q, k, v = (torch.randn(b, m, h, d, generator=gen, dtype=torch.float64) for m in (n, n_keys, n_keys))
    allowed = torch.rand(n, n_keys, generator=gen) < 0.6
    allowed[3] = False  # a query that reads nothing
    want = _block(q, k, v, allowed)
    merge = LseMerge(q.to(device, dtype), d)
    start = 0
    for size in sizes:
        stop = start + size
        out, lse = _block(q, k[:, start:stop], v[:, start:stop], allowed[:, start:stop])
        merge.add(out.to(device, dtype), lse.to(device))
        start = stop
    out, lse = merge.result(dtype)
    out, lse = out.cpu(), lse.cpu()
    assert out.dtype == dtype and lse.dtype == torch.promote_types(dtype, torch.float32)
    tolerance = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 2e-2}[dtype]
    assert relative_error(out.double(), want[0]) < tolerance
    assert torch.all(out[:, 3] == 0) and torch.all(torch.isneginf(lse[:, :, 3]))
    seen = ~torch.isinf(want[1])
    assert torch.allclose(lse.double()[seen], want[1][seen], atol=tolerance * 10)


def test_no_block_gives_zeros_and_minus_infinity() -> None:
    q = torch.randn(1, 4, 2, 8)
    out, lse = LseMerge(q, 5).result(torch.float32)
    assert out.shape == (1, 4, 2, 5) and torch.all(out == 0)
    assert lse.shape == (1, 2, 4) and torch.all(torch.isneginf(lse))


@pytest.mark.parametrize("device", DEVICES)
def test_block_gradients_equal_autograd_through_the_merge(device: str) -> None:
    """Each block's share of the merged output's gradient equals autograd's
    through the merge written out in float64 (a query that sees no key of
    one block, and one that sees none of any, included)."""
    from patternc.distributed.merge import block_gradients

    gen = torch.Generator().manual_seed(3)
    b, n, h, d = 2, 9, 3, 5
    outs = [torch.randn(b, n, h, d, generator=gen, dtype=torch.float64, requires_grad=True) for _ in range(3)]
    lses = [torch.randn(b, h, n, generator=gen, dtype=torch.float64) for _ in range(3)]
    lses[1][:, :, 2] = float("-inf")  # query 2 sees nothing of block 1
    for lse in lses:
        lse[:, :, 6] = float("-inf")  # query 6 sees nothing at all
    lses = [lse.requires_grad_(True) for lse in lses]
    total = torch.logsumexp(torch.stack(lses), dim=0)
    safe = total.masked_fill(torch.isinf(total), 0.0)
    merged = sum(
        torch.exp(lse - safe).masked_fill(torch.isinf(lse), 0.0).transpose(1, 2)[..., None] * out
        for out, lse in zip(outs, lses)
    )
    grad = torch.randn(b, n, h, d, generator=gen, dtype=torch.float64)
    want = torch.autograd.grad(merged, [*outs, *lses], grad)
    delta = (grad * merged).sum(-1).transpose(1, 2)
    for at, (out, lse) in enumerate(zip(outs, lses)):
        inputs = (grad, out.detach(), lse.detach(), total.detach(), delta.detach())
        g_out, g_lse = (t.cpu() for t in block_gradients(*(t.to(device) for t in inputs)))
        assert torch.allclose(g_out, want[at], atol=1e-12)
        # autograd's logsumexp over nothing but -inf has a NaN gradient: that
        # query is compared apart (it gets nothing)
        seen = torch.arange(n) != 6
        assert torch.allclose(g_lse[:, :, seen], want[3 + at][:, :, seen], atol=1e-12)
        assert torch.all(g_lse[:, :, 6] == 0) and torch.all(g_out[:, 6] == 0)
    assert torch.all(want[3 + 1][:, :, 2] == 0)


@pytest.mark.slow
def test_the_compiled_merge_and_gradients_equal_the_plain_ones() -> None:
    """What a GPU runs (the merge and a block's gradient share, compiled by
    ``torch.compile``) traces whole and computes what the plain functions
    do, here compiled for the CPU: mixed dtypes in, the dtype asked for
    out, rows that saw no key included. Private names: the public merge
    picks the compiled form on a GPU only."""
    from patternc.distributed import merge

    gen = torch.Generator().manual_seed(11)
    b, n, h, d = 2, 9, 3, 5
    out_a = torch.randn(b, n, h, d, generator=gen).to(torch.bfloat16)
    out_b = torch.randn(b, h, n, d, generator=gen).transpose(1, 2).to(torch.bfloat16)  # a kernel's view
    lse_a, lse_b = torch.randn(b, h, n, generator=gen), torch.randn(b, h, n, generator=gen)
    lse_a[:, :, 2] = lse_b[:, :, 2] = float("-inf")
    for dtype in (torch.float32, torch.bfloat16):
        fused = merge._fused_merge()(out_a, lse_a, out_b, lse_b, dtype)
        plain = merge._merged(out_a, lse_a, out_b, lse_b, dtype)
        assert fused[0].dtype == plain[0].dtype == dtype
        assert torch.allclose(
            fused[0].float(), plain[0].float(), atol=1e-2 if dtype == torch.bfloat16 else 1e-6
        )
        assert torch.equal(fused[1], plain[1]) and torch.all(fused[0][:, 2] == 0)
    grad, delta = torch.randn(b, n, h, d, generator=gen), torch.randn(b, h, n, generator=gen)
    total = torch.logaddexp(lse_a, lse_b)
    fused = merge._fused_block_gradients()(grad, out_b, lse_b, total, delta)
    plain = merge._block_gradients(grad, out_b, lse_b, total, delta)
    assert fused[0].dtype == torch.bfloat16 and torch.allclose(fused[0].float(), plain[0].float(), atol=1e-2)
    assert torch.allclose(fused[1], plain[1], atol=1e-5)


@pytest.mark.slow
def test_the_compiled_merge_serves_many_shapes_without_raising() -> None:
    """Query counts from 1 to 14, batches of 1 and 2, log-sum-exps sliced
    from a longer one (as a kernel's padded output is) or not, two output
    dtypes: more variants than Dynamo compiles per function by default. Each
    merges as the plain function does, none raises."""
    from patternc.distributed import merge

    gen = torch.Generator().manual_seed(5)
    for n in range(1, 15):
        for batch in (1, 2):
            out_a, out_b = (torch.randn(batch, n, 2, 4, generator=gen) for _ in range(2))
            lse_a = torch.randn(batch, 2, n, generator=gen)
            lse_b = (
                torch.randn(batch, 2, n + 3, generator=gen)[:, :, :n] if n % 2 else torch.randn(batch, 2, n)
            )
            for dtype in (torch.float32, torch.bfloat16):
                fused = merge._fused_merge()(out_a, lse_a, out_b, lse_b, dtype)
                plain = merge._merged(out_a, lse_a, out_b, lse_b, dtype)
                assert fused[0].dtype == dtype
                assert torch.allclose(fused[0].float(), plain[0].float(), atol=1e-2)


def test_one_block_comes_back_fresh_and_contiguous() -> None:
    """A single block's output, given as a strided view of a larger buffer
    (as a kernel's padded output is), comes back as its own contiguous
    tensor: an autograd function's output may be changed in place."""
    buffer = torch.randn(2, 3, 16, 4)  # [B, H, padded N, D]
    out = buffer.transpose(1, 2)[:, :11]  # [B, N, H, D], a view
    merge = LseMerge(torch.zeros(2, 11, 3, 4), 4)
    merge.add(out, torch.randn(2, 3, 11))
    result, _ = merge.result(torch.float32)
    assert result._base is None and result.is_contiguous() and torch.equal(result, out)


@pytest.mark.parametrize(
    "pieces",
    [
        # (key block, query rows or None for all): a row piece first, between
        # whole blocks, last; pieces of one block's keys over different rows
        ((0, slice(2, 9)), (1, None), (2, slice(0, 4))),
        ((0, None), (1, slice(5, 11)), (1, slice(0, 5)), (2, None)),
        ((0, slice(0, 11)), (2, slice(3, 7))),
        ((0, None), (1, None), (2, slice(2, 6))),
        # row pieces only: one into rows nothing reached, one across reached and unreached rows
        ((0, slice(2, 9)), (2, slice(0, 4)), (1, slice(9, 11))),
        # rows a merge reached, though no piece had them alone, are not taken as unreached
        ((0, slice(0, 6)), (1, slice(0, 11)), (2, slice(8, 11))),
    ],
)
@pytest.mark.parametrize("strided", [False, True])
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
@pytest.mark.parametrize("device", DEVICES)
def test_row_pieces_merge_into_their_rows(
    pieces: tuple[tuple[int, slice | None], ...], strided: bool, dtype: torch.dtype, device: str
) -> None:
    """Blocks that cover some query rows only (a block split into
    rectangles) merged with whole blocks: equal to the float64 softmax over
    the keys each row was given, rows given nothing zero with ``-inf``; a
    kernel's output handed in (contiguous or strided) is never written to."""
    gen = torch.Generator().manual_seed(len(pieces))
    b, n, h, d = 2, 11, 3, 8
    blocks = [(0, 5), (5, 12), (12, 15)]
    q, k, v = (torch.randn(b, m, h, d, generator=gen, dtype=torch.float64) for m in (n, 15, 15))
    allowed = torch.zeros(n, 15, dtype=torch.bool)
    for block, rows in pieces:
        start, stop = blocks[block]
        allowed[rows if rows is not None else slice(None), start:stop] = True
    want = _block(q, k, v, allowed)
    merge = LseMerge(q.to(device, dtype), d)
    handed = []
    for block, rows in pieces:
        start, stop = blocks[block]
        rows_all = rows if rows is not None else slice(None)
        out, lse = _block(q[:, rows_all], k[:, start:stop], v[:, start:stop], allowed[rows_all, start:stop])
        out, lse = out.to(device, dtype), lse.to(device)
        if strided:  # a kernel's head-major output seen token-major, as flash kernels return it
            out, lse = (
                out.transpose(1, 2).contiguous().transpose(1, 2),
                lse.transpose(1, 2).contiguous().transpose(1, 2),
            )
        handed.append((out, out.clone()))
        merge.add(out, lse, rows)
    out, lse = merge.result(dtype)
    tolerance = {torch.float64: 1e-12, torch.bfloat16: 2e-2}[dtype]
    assert out.dtype == dtype and out.shape == (b, n, h, d)
    assert relative_error(out.cpu().double(), want[0]) < tolerance
    empty = ~allowed.any(dim=1)
    assert torch.all(out.cpu()[:, empty] == 0) and torch.all(torch.isneginf(lse.cpu()[:, :, empty]))
    seen = ~torch.isinf(want[1])
    assert torch.allclose(lse.cpu().double()[seen], want[1][seen], atol=tolerance * 10)
    for given, copy in handed:
        assert torch.equal(given, copy)


def test_row_pieces_in_random_orders_equal_one_softmax() -> None:
    """Whole blocks and row pieces of random blocks, shuffled (pieces into
    unreached rows, across reached ones, whole blocks between them): the
    merge equals the float64 softmax over the keys each row was given."""
    gen = torch.Generator().manual_seed(5)

    def pick(low: int, high: int) -> int:
        return int(torch.randint(low, high + 1, (), generator=gen))

    for _ in range(300):
        n, n_blocks = pick(1, 7), pick(1, 4)
        q, k, v = (
            torch.randn(1, m, 2, 4, generator=gen, dtype=torch.float64)
            for m in (n, 3 * n_blocks, 3 * n_blocks)
        )
        allowed = torch.zeros(n, 3 * n_blocks, dtype=torch.bool)
        pieces: list[tuple[slice, slice | None]] = []
        for i in range(n_blocks):
            keys = slice(3 * i, 3 * i + 3)
            if pick(0, 2) == 0:
                pieces.append((keys, None))
                allowed[:, keys] = True
            else:
                start = pick(0, n - 1)
                rows = slice(start, pick(start + 1, n))
                pieces.append((keys, rows))
                allowed[rows, keys] = True
        order = torch.randperm(len(pieces), generator=gen).tolist()
        merge = LseMerge(q, 4)
        for keys, rows in (pieces[i] for i in order):
            some = rows if rows is not None else slice(None)
            every = torch.ones(q[:, some].shape[1], 3, dtype=torch.bool)
            merge.add(*_block(q[:, some], k[:, keys], v[:, keys], every), rows)
        out, lse = merge.result(torch.float64)
        want, want_lse = _block(q, k, v, allowed)
        assert relative_error(out, want) < 1e-12, [pieces[i] for i in order]
        assert torch.equal(torch.isinf(lse), torch.isinf(want_lse))
