"""The blockwise kernels of context-parallel attention on one process: tile
classes from segment intervals, FlexAttention's CPU forward and the chunked
reference against a dense float64 reference, gradients through the
log-sum-exp merge, and what the ring keeps for the backward."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import patternc
from patternc.distributed.blockwise import (
    EMPTY,
    FULL,
    PARTIAL,
    BlockKernel,
    Segment,
    StepArgs,
    classify,
)
from patternc.modifiers import UNBOUNDED

OPEN = (-UNBOUNDED, UNBOUNDED, 1, 0)


def _dense(
    q: torch.Tensor,
    kv: torch.Tensor,
    queries: list[Segment],
    keys: list[Segment],
    band: tuple[tuple[tuple[int, int, int, int], ...], ...],
    args: StepArgs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Every score, the mask token by token: the reference the kernels must match."""

    def tokens(segments: list[Segment]) -> list[tuple[int, int]]:
        return [(s.group, s.position + i) for s in segments for i in range(s.length)]

    dim = args.dim
    allowed = torch.tensor(
        [
            [
                (lambda b, d: b[0] <= d <= b[1] and (d - b[3]) % b[2] == 0)(band[qg][kg], kp - qp)
                for kg, kp in tokens(keys)
            ]
            for qg, qp in tokens(queries)
        ]
    )
    scores = torch.einsum("bqhd,bkhd->bhqk", q, kv[..., :dim]) * args.scale
    if args.slopes is not None:
        qp = torch.tensor([p for _, p in tokens(queries)])
        kp = torch.tensor([p for _, p in tokens(keys)])
        scores = scores - args.slopes[:, None, None] * (qp[:, None] - kp[None, :]).abs()
    mask = allowed[None, None]
    if args.padded:
        mask = mask & (kv[:, :, 0, 2 * dim] > 0.5)[:, None, None, :]
    scores = scores.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    probs = torch.nan_to_num(torch.exp(scores - lse[..., None]))
    return torch.einsum("bhqk,bkhd->bqhd", probs, kv[..., dim : 2 * dim]), lse


def _inputs(n_q: int, n_k: int, padded: bool, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(n_q * 31 + n_k)
    q = torch.randn(2, n_q, 2, 16, dtype=dtype)
    kv = torch.randn(2, n_k, 2, 32 + padded, dtype=dtype)
    if padded:
        kv[..., 32] = (torch.rand(2, n_k, 1) > 0.3).to(dtype)
    return q, kv


CASES = {
    # zigzag queries of a causal window against another rank's block
    "window": (
        [Segment(0, 0, 70), Segment(0, 330, 70)],
        [Segment(0, 70, 130), Segment(0, 270, 60)],
        (((-40, 0, 1, 0),),),
    ),
    # two groups, one pair dilated, one open
    "dilated": (
        [Segment(0, 5, 150), Segment(1, 0, 90)],
        [Segment(0, 0, 260), Segment(1, 10, 33)],
        (((-60, 60, 3, 1), OPEN), (OPEN, (-UNBOUNDED, 0, 1, 0))),
    ),
    # no key of the block is read: nothing is computed
    "disjoint": ([Segment(0, 500, 40)], [Segment(0, 0, 200)], (((-10, 0, 1, 0),),)),
    # a causal document's block: one band, one segment a side
    "causal, one segment a side": (
        [Segment(0, 300, 150)],
        [Segment(0, 200, 250)],
        (((-UNBOUNDED, 0, 1, 0),),),
    ),
    # an asymmetric dilated window, one band
    "dilated, one segment a side": ([Segment(0, 37, 90)], [Segment(0, 0, 140)], (((-50, 3, 2, 1),),)),
    # one query segment, keys in two places of the group, one band
    "window, keys in two places": (
        [Segment(0, 100, 60)],
        [Segment(0, 0, 50), Segment(0, 120, 40)],
        (((-70, 0, 1, 0),),),
    ),
    # two groups under different bands, none dilated: the per-pair tables
    "two bands": (
        [Segment(0, 0, 100), Segment(1, 0, 80)],
        [Segment(0, 0, 120), Segment(1, 0, 60)],
        (((-UNBOUNDED, 0, 1, 0), OPEN), ((-30, 30, 1, 0), (-UNBOUNDED, 0, 1, 0))),
    ),
}

ONE_BAND = {
    "window": True,
    "dilated": False,
    "disjoint": True,
    "causal, one segment a side": True,
    "dilated, one segment a side": True,
    "window, keys in two places": True,
    "two bands": False,
}
"""Whether each case's block takes the ``mask_mod`` of one band (no per-pair tables)."""


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("alibi", [False, True])
def test_reference_and_flex_forward_match_dense(case: str, padded: bool, alibi: bool) -> None:
    queries, keys, band = CASES[case]
    n_q, n_k = sum(s.length for s in queries), sum(s.length for s in keys)
    q, kv = _inputs(n_q, n_k, padded, torch.float64)
    slopes = torch.tensor([0.25, 0.0625], dtype=torch.float64) if alibi else None
    args = StepArgs(16, 0.25, 0.0, slopes, padded, "reference")
    kernel = BlockKernel(queries, keys, band, True, torch.device("cpu"), query_chunk=64)
    # a private attribute: which mask_mod runs is not visible through the public API
    assert (kernel._one_band is not None) == ONE_BAND[case]
    ref_out, ref_lse = _dense(q, kv, queries, keys, band, args)
    assert kernel.empty == bool(torch.isinf(ref_lse).all())
    if kernel.empty:
        return
    out, lse = kernel.forward(q, kv, args)
    seen = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), seen)
    assert (out - ref_out).norm() / ref_out.norm() < 1e-13
    assert (lse[seen] - ref_lse[seen]).abs().max() < 1e-12
    # FlexAttention's CPU forward (eager; no gradients), float32 against float64
    flex = StepArgs(16, 0.25, 0.0, slopes.float() if slopes is not None else None, padded, "flex")
    with torch.no_grad():
        out32, lse32 = kernel.forward(q.float(), kv.float(), flex)
    assert (out32.double() - ref_out).norm() / ref_out.norm() < 1e-5
    assert (lse32.double()[seen] - ref_lse[seen]).abs().max() < 1e-4


def test_tile_classes_follow_the_intervals() -> None:
    """A causal band over 256 x 256 tokens in tiles of 128: below the diagonal full, on it partial, above empty."""
    band = (((-UNBOUNDED, 0, 1, 0),),)
    classes = classify([Segment(0, 0, 256)], [Segment(0, 0, 256)], band, 128, 128)
    assert classes.tolist() == [[PARTIAL, EMPTY], [FULL, PARTIAL]]
    dilated = (((-UNBOUNDED, 0, 2, 0),),)
    assert classify([Segment(0, 0, 256)], [Segment(0, 0, 256)], dilated, 128, 128)[1, 0] == PARTIAL


class _Allocations(TorchDispatchMode):
    """The largest boolean tensor any operator returns (masks)."""

    def __init__(self) -> None:
        super().__init__()
        self.largest_bool = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor) and t.dtype == torch.bool:
                self.largest_bool = max(self.largest_bool, t.numel())
        return out


@pytest.mark.parametrize("strategy", ["ring", "halo"])
def test_ring_keeps_no_mask_and_builds_none_of_the_whole_block(world_of_one: None, strategy: str) -> None:
    """A causal window over 1000 tokens on the ring (or a halo): no boolean tensor is
    saved for the backward, no mask as large as [queries, keys] is built (a
    chunk's mask covers its non-empty key tiles only), what is saved stays a
    few times the tokens' keys/values, and the gradients match one process."""
    from patternc.distributed import ContextParallel

    n = 1000
    plan = patternc.compile("groups a\na -> a [causal, window 100]").patterns["default"]
    attn = patternc.nn.PatternAttention(
        patternc.MixedAttentionConfig(hidden_dim=16, num_heads=2), plan
    ).double()
    torch.manual_seed(0)
    x = torch.randn(1, n, 16, dtype=torch.float64)
    ref_x = x.clone().requires_grad_(True)
    ref = attn(ref_x, {"a": n})[0]
    ref.square().sum().backward()
    cp = ContextParallel(plan, {"a": n}, strategy=strategy, whole_groups=False, query_chunk=64)  # type: ignore[arg-type]
    saved: list[torch.Tensor] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t)
        return t

    x_local = cp.shard(x).requires_grad_(True)
    spy = _Allocations()
    with cp, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), spy:
        out = attn(x_local, cp.local_sizes)[0]
    out.square().sum().backward()
    assert (out - ref).norm() / ref.norm() < 1e-13
    assert x_local.grad is not None and ref_x.grad is not None
    assert (x_local.grad - ref_x.grad).norm() / ref_x.grad.norm() < 1e-13
    assert not any(t.dtype == torch.bool for t in saved)
    assert spy.largest_bool < n * n // 4
    assert sum(t.numel() for t in saved) < 40 * n * 16


def _two_key_blocks(
    dropout_p: float,
) -> tuple[StepArgs, list[BlockKernel], torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """150 queries (positions 100-249) reading keys up to 90 before them,
    against two key blocks (130 keys from position 0, 200 from position
    130): the step's arguments, a reference kernel per block, Q, the
    blocks' packed K/V and a probe for the backward, float64 and random."""
    queries = [Segment(0, 100, 150)]
    blocks = [[Segment(0, 0, 130)], [Segment(0, 130, 200)]]
    band = (((-90, 0, 1, 0),),)
    args = StepArgs(16, 0.25, dropout_p, None, False, "reference")
    kernels = [BlockKernel(queries, keys, band, True, torch.device("cpu"), 64) for keys in blocks]
    torch.manual_seed(0)
    q = torch.randn(2, 150, 2, 16, dtype=torch.float64, requires_grad=True)
    first = torch.randn(2, 130, 2, 32, dtype=torch.float64, requires_grad=True)
    second = torch.randn(2, 200, 2, 32, dtype=torch.float64, requires_grad=True)
    probe = torch.randn(2, 150, 2, 16, dtype=torch.float64)
    return args, kernels, q, first, second, probe


@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
def test_merged_blocks_give_autograd_gradients(dropout_p: float) -> None:
    """Two key blocks merged by their log-sum-exp in the call's autograd
    function (``passing.Attend``: the merge's backward has no public
    entry of its own) against autograd through the same kernels and a plain
    merge; with dropout, the backward replays the forward's masks."""
    from patternc.distributed.calls import _Run
    from patternc.distributed.passing import Attend

    args, kernels, q, first, second, probe = _two_key_blocks(dropout_p)
    kvs = [first, second]

    torch.manual_seed(7)
    out = Attend.apply(_Run(tuple(kernels), None, args), q, q.new_zeros(2, 0, 2, 32), *kvs)
    grads = torch.autograd.grad((out * probe).sum(), (q, *kvs))

    torch.manual_seed(7)
    parts = [kernel.forward(q, kv, args) for kernel, kv in zip(kernels, kvs)]
    total = torch.logsumexp(torch.stack([lse for _, lse in parts]), dim=0)
    ref = sum(o * torch.exp(lse - total).transpose(1, 2)[..., None] for o, lse in parts)
    assert isinstance(ref, torch.Tensor)
    ref_grads = torch.autograd.grad((ref * probe).sum(), (q, *kvs))
    assert (out - ref).norm() / ref.norm() < 1e-13
    for g, r in zip(grads, ref_grads):
        assert (g - r).norm() / r.norm() < 1e-12


MERGED = {
    # zigzag queries of a causal document against two ranks' blocks: full,
    # partial and empty tiles, a last tile holding padding
    "causal": (
        [Segment(0, 0, 300), Segment(0, 900, 300)],
        [[Segment(0, 0, 300), Segment(0, 900, 300)], [Segment(0, 300, 600)]],
        (((-UNBOUNDED, 0, 1, 0),),),
    ),
    # two groups, a dilated window and an open pair, blocks of odd lengths
    "dilated": (
        [Segment(0, 5, 150), Segment(1, 0, 90)],
        [[Segment(0, 0, 201)], [Segment(0, 201, 59), Segment(1, 10, 133)]],
        (((-60, 60, 3, 1), OPEN), (OPEN, (-UNBOUNDED, 0, 1, 0))),
    ),
    # two query groups against a third group they read whole (an anchors'
    # block: no mask), against themselves (causal on the diagonal, whole
    # across) and against keys of group 0 at other positions (a mask),
    # odd lengths
    "whole, causal and shifted": (
        [Segment(0, 0, 151), Segment(1, 0, 77)],
        [[Segment(2, 0, 133)], [Segment(0, 0, 151), Segment(1, 0, 77)], [Segment(0, 100, 51)]],
        (
            ((-UNBOUNDED, 0, 1, 0), OPEN, OPEN),
            (OPEN, (-UNBOUNDED, 0, 1, 0), OPEN),
        ),
    ),
}


def _merged_against_dense(
    device: torch.device,
    dtype: torch.dtype,
    kernel: str,
    case: str,
    padded: bool,
    alibi: bool,
    batch: int = 1,
) -> tuple[list[float], float]:
    """Relative errors of the output and of the gradients of the queries and
    each block, ``kernel`` on ``device`` through the ring's autograd function
    (blocks merged by log-sum-exp), against autograd through the dense
    float64 softmax over the blocks' keys together; and the largest
    log-sum-exp error over one block's forward."""
    from patternc.distributed.calls import _Run
    from patternc.distributed.passing import Attend

    queries, blocks, band = MERGED[case]
    heads, dim = 2, 32
    n_q = sum(s.length for s in queries)
    sizes = [sum(s.length for s in keys) for keys in blocks]
    torch.manual_seed(n_q + 7 * sum(sizes))
    q = torch.randn(batch, n_q, heads, dim, dtype=torch.float64)
    kvs = [torch.randn(batch, n, heads, 2 * dim + padded, dtype=torch.float64) for n in sizes]
    if padded:
        for kv in kvs:
            kv[..., 2 * dim] = (torch.rand(batch, kv.shape[1], 1) > 0.2).double()
    probe = torch.randn(batch, n_q, heads, dim, dtype=torch.float64)
    slopes = torch.tensor([0.05, 0.0125], dtype=torch.float64) if alibi else None

    ref_q = q.clone().requires_grad_(True)
    ref_kvs = [kv.clone().requires_grad_(True) for kv in kvs]
    dense_args = StepArgs(dim, dim**-0.5, 0.0, slopes, padded, "reference")
    every_key = [s for keys in blocks for s in keys]
    ref, _ = _dense(ref_q, torch.cat(ref_kvs, dim=1), queries, every_key, band, dense_args)
    ref_grads = torch.autograd.grad((ref * probe).sum(), (ref_q, *ref_kvs))

    run_slopes = slopes.to(device, torch.promote_types(dtype, torch.float32)) if slopes is not None else None
    args = StepArgs(dim, dim**-0.5, 0.0, run_slopes, padded, kernel)  # type: ignore[arg-type]
    kernels = [BlockKernel(queries, keys, band, True, device, query_chunk=64) for keys in blocks]
    x = q.to(device, dtype).requires_grad_(True)
    xs = [kv.to(device, dtype).requires_grad_(True) for kv in kvs]
    out = Attend.apply(_Run(tuple(kernels), None, args), x, x.new_zeros(batch, 0, heads, 2 * dim), *xs)
    grads = torch.autograd.grad((out * probe.to(device, dtype)).sum(), (x, *xs))

    def rel(a: torch.Tensor, b: torch.Tensor) -> float:
        return float((a.detach().double().cpu() - b.detach()).norm() / b.detach().norm())

    errors = [rel(out, ref)] + [rel(g, r) for g, r in zip(grads, ref_grads)]
    with torch.no_grad():
        _, lse = kernels[0].forward(x, xs[0], args)
        _, block_lse = _dense(q, kvs[0], queries, blocks[0], band, dense_args)
    seen = torch.isfinite(block_lse)
    assert torch.equal(torch.isfinite(lse).cpu(), seen)
    lse_error = float((lse.double().cpu()[seen] - block_lse[seen]).abs().max())
    return errors, lse_error


@pytest.mark.parametrize("case", list(MERGED))
@pytest.mark.parametrize(("padded", "alibi"), [(False, False), (True, False), (False, True)])
def test_reference_merged_forward_and_backward_match_dense(case: str, padded: bool, alibi: bool) -> None:
    """The reference kernel in float64: output and gradients to float64 precision."""
    errors, lse_error = _merged_against_dense(
        torch.device("cpu"), torch.float64, "reference", case, padded, alibi
    )
    assert max(errors) < 1e-12, errors
    assert lse_error < 1e-12


CAUSAL = (-UNBOUNDED, 0, 1, 0)


def test_blocks_split_into_rectangles_read_whole_or_causally() -> None:
    """A block as rectangles that need no mask: a causal document in zigzag
    halves over two ranks (chunks of 100 tokens), anchors read whole, and
    the blocks that need a mask (a window, a dilated band, a neighbourhood,
    a causal pair off the diagonal)."""
    from patternc.distributed.blockwise import Rectangle, rectangles

    band = ((CAUSAL,),)
    rank0 = [Segment(0, 0, 100), Segment(0, 300, 100)]
    rank1 = [Segment(0, 100, 100), Segment(0, 200, 100)]
    # rank 0's queries against its own keys: two causal squares and the
    # second half reading the first whole, joined into one causal square
    assert rectangles(rank0, rank0, band) == (Rectangle(slice(0, 200), slice(0, 200), True),)
    # three chunks on one rank: one square; a gap in positions changes nothing
    three = [Segment(0, 0, 10), Segment(0, 30, 20), Segment(0, 90, 5)]
    assert rectangles(three, three, band) == (Rectangle(slice(0, 35), slice(0, 35), True),)
    # two documents side by side stay two squares
    two = [Segment(0, 0, 10), Segment(1, 0, 20)]
    none = (UNBOUNDED, -UNBOUNDED, 1, 0)
    assert rectangles(two, two, ((CAUSAL, none), (none, CAUSAL))) == (
        Rectangle(slice(0, 10), slice(0, 10), True),
        Rectangle(slice(10, 30), slice(10, 30), True),
    )
    # against rank 1's: its first half reads nothing, its second all of it
    assert rectangles(rank0, rank1, band) == (Rectangle(slice(100, 200), slice(0, 200), False),)
    # rank 1 against rank 0's: the first half of keys, by both halves
    assert rectangles(rank1, rank0, band) == (Rectangle(slice(0, 200), slice(0, 100), False),)
    # anchors: every pair allowed, three query groups: one rectangle
    queries = [Segment(0, 0, 70), Segment(1, 0, 33), Segment(2, 5, 9)]
    assert rectangles(queries, [Segment(3, 0, 41)], None) == (Rectangle(slice(0, 112), slice(0, 41), False),)
    assert rectangles(rank0, rank0, (((-40, 0, 1, 0),),)) is None  # a window
    assert rectangles(rank0, rank1, (((-UNBOUNDED, UNBOUNDED, 2, 0),),)) is None  # dilated
    assert rectangles([Segment(0, 50, 100)], [Segment(0, 0, 100)], band) is None  # causal, shifted
    assert rectangles([Segment(0, 0, 10)], [Segment(0, 0, 10)], None, ((object(),),)) is None  # type: ignore[arg-type]


def _random_segments(gen: torch.Generator, groups: int) -> list[Segment]:
    def pick(n: int) -> int:
        return int(torch.randint(n, (), generator=gen))

    return [Segment(pick(groups), pick(4) * 5, pick(5) * 7) for _ in range(1 + pick(4))]


def test_rectangles_cover_every_allowed_pair_once_on_random_blocks() -> None:
    """Random blocks (zero-length segments, causal, open, closed and
    windowed bands, segments at equal and shifted positions): where
    :func:`rectangles` answers, its rectangles cover each allowed (query,
    key) pair exactly once and nothing else; where it refuses, some
    segment pair is read in part and is not a causal square."""
    from patternc.distributed.blockwise import rectangles

    gen = torch.Generator().manual_seed(0)
    kinds = [CAUSAL, OPEN, (UNBOUNDED, -UNBOUNDED, 1, 0), (-9, 0, 1, 0), (-40, 40, 1, 0), (-3, 12, 1, 0)]
    answered = refused = joins = 0
    for _ in range(2000):
        groups = 1 + int(torch.randint(3, (), generator=gen))
        choice = torch.randint(len(kinds), (groups, groups), generator=gen).tolist()
        band = tuple(tuple(kinds[c] for c in row) for row in choice)
        queries, keys = _random_segments(gen, groups), _random_segments(gen, groups)
        if int(torch.randint(3, (), generator=gen)) == 0:  # a rank's own block: chunks of the groups' sequences
            chunks = 2 + int(torch.randint(4, (), generator=gen))
            lengths = torch.randint(1, 9, (chunks,), generator=gen).tolist()
            owners = torch.randint(groups, (chunks,), generator=gen).tolist()
            gaps = (torch.randint(2, (chunks,), generator=gen) * 3).tolist()  # some chunks follow on at once
            at = [0] * groups
            queries = []
            for n, g, gap in zip(lengths, owners, gaps):
                queries.append(Segment(g, at[g] + gap, n))
                at[g] += gap + n
            keys = queries
        q_pos = [(s.group, s.position + i) for s in queries for i in range(s.length)]
        k_pos = [(s.group, s.position + i) for s in keys for i in range(s.length)]
        allowed = torch.tensor(
            [[band[qg][kg][0] <= kp - qp <= band[qg][kg][1] for kg, kp in k_pos] for qg, qp in q_pos],
            dtype=torch.int64,
        ).reshape(len(q_pos), len(k_pos))
        found = rectangles(queries, keys, band)
        if found is None:
            refused += 1
            continue
        answered += 1
        covered = torch.zeros_like(allowed)
        joins += sum(r.causal and r.rows.stop - r.rows.start > max(s.length for s in queries) for r in found)
        for r in found:
            block = torch.ones(r.rows.stop - r.rows.start, r.keys.stop - r.keys.start, dtype=torch.int64)
            covered[r.rows, r.keys] += block.tril() if r.causal else block
        assert torch.equal(covered, allowed), (queries, keys, band, found)
    assert answered > 100 and refused > 50 and joins > 5  # both answers, and joined squares, are exercised


def test_flash_kernels_are_asked_only_where_they_take_the_block(monkeypatch: pytest.MonkeyPatch) -> None:
    """``dense.fits`` on a GPU (its checks stubbed on this CPU): half
    precision, head sizes that are multiples of 8 up to 256, compute
    capability 8.0 or later, heads wider than 192 on 8.0 and 9.0 only (the
    backward refuses them elsewhere), flash SDPA enabled, and never on ROCm."""
    from types import SimpleNamespace

    from patternc.distributed import dense

    capability = [(9, 0)]
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability[0])
    monkeypatch.setattr(torch.backends.cuda, "flash_sdp_enabled", lambda: True)
    monkeypatch.setattr(torch.version, "hip", None)

    def q(dtype: torch.dtype) -> torch.Tensor:
        return SimpleNamespace(device=SimpleNamespace(type="cuda"), dtype=dtype)  # type: ignore[return-value]

    assert dense.fits(q(torch.bfloat16), 64) and dense.fits(q(torch.float16), 256)
    assert not dense.fits(q(torch.float32), 64)
    assert not dense.fits(q(torch.bfloat16), 60) and not dense.fits(q(torch.bfloat16), 264)
    capability[0] = (8, 9)
    assert dense.fits(q(torch.bfloat16), 192) and not dense.fits(q(torch.bfloat16), 224)
    capability[0] = (7, 5)
    assert not dense.fits(q(torch.bfloat16), 64)
    capability[0] = (8, 0)
    monkeypatch.setattr(torch.backends.cuda, "flash_sdp_enabled", lambda: False)
    assert not dense.fits(q(torch.bfloat16), 64)
    monkeypatch.setattr(torch.backends.cuda, "flash_sdp_enabled", lambda: True)
    monkeypatch.setattr(torch.version, "hip", "6.2")
    assert not dense.fits(q(torch.bfloat16), 64)


def test_unmasked_blocks_run_on_flash_kernels_only_where_they_apply() -> None:
    """Under ``auto``, a block of rectangles (no modifiers, a band wider than
    the block, causal squares) takes torch's flash kernels; under ``flex``
    their backward only; a block with a mask, key padding, ALiBi, dropout or
    the reference asked for neither."""
    cpu = torch.device("cpu")
    queries, blocks, band = MERGED["whole, causal and shifted"]
    whole, causal, shifted = (BlockKernel(queries, keys, band, True, cpu, 64) for keys in blocks)
    unmodified = BlockKernel(queries, blocks[2], band, False, cpu, 64)
    wide = BlockKernel([Segment(0, 200, 50)], [Segment(0, 0, 90)], (((-300, 0, 1, 0),),), True, cpu, 64)
    q = torch.zeros(1, 228, 2, 32)
    auto = StepArgs(32, 0.2, 0.0, None, False, "auto")
    assert [k.uses_dense(q, auto) for k in (whole, causal, shifted, unmodified, wide)] == [
        True,
        True,
        False,
        True,
        True,
    ]
    assert causal.dense_backward(q, auto) and not shifted.dense_backward(q, auto)
    for args in (
        StepArgs(32, 0.2, 0.0, None, True, "auto"),
        StepArgs(32, 0.2, 0.0, torch.ones(2), False, "auto"),
        StepArgs(32, 0.2, 0.1, None, False, "auto"),
        StepArgs(32, 0.2, 0.0, None, False, "reference"),
    ):
        assert not whole.uses_dense(q, args) and not whole.dense_backward(q, args), args
    flex = StepArgs(32, 0.2, 0.0, None, False, "flex")  # FlexAttention's forward, the flash backward
    assert not whole.uses_dense(q, flex) and whole.dense_backward(q, flex)
    assert not whole.uses_dense(q.to(torch.int32), auto) and not whole.dense_backward(q.to(torch.int32), auto)


def _count_flash_calls(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """Spies on :mod:`patternc.distributed.dense`: how many forward and
    backward launches the flash kernels get (the dict fills as they run)."""
    from patternc.distributed import dense

    calls = {"forward": 0, "backward": 0}
    for name in calls:

        def counted(*args: object, _real: object = getattr(dense, name), _name: str = name) -> object:
            calls[_name] += 1
            return _real(*args)  # type: ignore[operator]

        monkeypatch.setattr(dense, name, counted)
    return calls


@pytest.mark.parametrize(("dtype", "batch"), [(torch.float64, 1), (torch.float64, 3), (torch.float32, 2)])
def test_flash_kernels_merged_forward_and_backward_match_dense(
    dtype: torch.dtype, batch: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An unmasked block on torch's flash kernels merged with a masked one
    (the reference): output and gradients against the float64 dense
    reference, the flash backward given the merged output and log-sum-exp
    once and nothing recomputed for it."""
    calls = _count_flash_calls(monkeypatch)
    case = "whole, causal and shifted"
    errors, _ = _merged_against_dense(torch.device("cpu"), dtype, "auto", case, False, False, batch)
    assert max(errors) < (1e-12 if dtype == torch.float64 else 1e-5), errors
    # one rectangle, then two (the groups' causal squares and the second
    # reading the first whole joined into one causal square, and the first
    # reading the second whole); the test's own forward of the first block is
    # the fourth; the shifted block on the reference
    assert calls == {"forward": 4, "backward": 3}


def test_flex_forward_takes_the_flash_backward_where_no_mask_is_needed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``kernel="flex"``: every block's forward on FlexAttention (on CPU, its
    unfused form), the gradients of the blocks that need no mask from the
    flash backward with the merged output and log-sum-exp (nothing
    recomputed), of the shifted block from the reference: against the
    float64 dense reference."""
    calls = _count_flash_calls(monkeypatch)
    case = "whole, causal and shifted"
    errors, _ = _merged_against_dense(torch.device("cpu"), torch.float32, "flex", case, False, False, 2)
    assert max(errors) < 1e-5, errors
    assert calls == {"forward": 0, "backward": 3}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_flash_kernels_on_cuda_match_dense(dtype: torch.dtype) -> None:
    """Blocks of rectangles on CUDA's flash kernels (the masked one on
    FlexAttention), forward and backward through the merge, against the
    float64 dense reference."""
    queries, blocks, band = MERGED["whole, causal and shifted"]
    kernel = BlockKernel(queries, blocks[1], band, True, torch.device("cuda"), 64)
    probe = torch.zeros(1, 1, 1, 32, device="cuda", dtype=dtype)
    assert kernel.uses_dense(probe, StepArgs(32, 1.0, 0.0, None, False, "auto"))
    case = "whole, causal and shifted"
    errors, lse_error = _merged_against_dense(torch.device("cuda"), dtype, "auto", case, False, False, 2)
    assert max(errors) < 3e-2, errors
    assert lse_error < 3e-2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("case", list(MERGED))
@pytest.mark.parametrize(
    ("padded", "alibi", "dtype"),
    [
        (False, False, torch.float32),
        (True, False, torch.float32),
        (False, True, torch.float32),
        (False, False, torch.bfloat16),
    ],
)
def test_flex_on_cuda_forward_and_backward_match_dense(
    case: str, padded: bool, alibi: bool, dtype: torch.dtype
) -> None:
    """The ring's kernel on CUDA (compiled FlexAttention with the block mask
    from the tile classes, its log-sum-exp, and its backward through the
    merge) against the float64 dense reference."""
    device = torch.device("cuda")
    queries, blocks, band = MERGED[case]
    kernel = BlockKernel(queries, blocks[0], band, True, device, 64)
    probe = torch.zeros(1, 1, 1, 32, device=device, dtype=dtype)
    assert kernel.uses_flex(probe, StepArgs(32, 1.0, 0.0, None, padded, "flex"))
    tolerance = 2e-3 if dtype == torch.float32 else 3e-2
    errors, lse_error = _merged_against_dense(device, dtype, "flex", case, padded, alibi)
    assert max(errors) < tolerance, errors
    assert lse_error < 10 * tolerance


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_flex_on_cuda_compiles_more_block_shapes_than_the_default_limit() -> None:
    """Ten blocks of distinct lengths (ten compiled shapes) in one process:
    each compiles and matches the dense reference, none raises at torch's
    default limit of eight."""
    device = torch.device("cuda")
    band = (((-UNBOUNDED, 0, 1, 0),),)
    args = StepArgs(32, 32**-0.5, 0.0, None, False, "flex")
    for i in range(10):
        n = 128 * (i + 1) + 17
        queries, keys = [Segment(0, 0, n)], [Segment(0, 0, n)]
        torch.manual_seed(i)
        q = torch.randn(1, n, 2, 32, dtype=torch.float64)
        kv = torch.randn(1, n, 2, 64, dtype=torch.float64)
        kernel = BlockKernel(queries, keys, band, True, device, 64)
        with torch.no_grad():
            out, _ = kernel.forward(q.to(device, torch.float32), kv.to(device, torch.float32), args)
        scores = torch.einsum("bqhd,bkhd->bhqk", q, kv[..., :32]) * 32**-0.5
        causal = torch.ones(n, n, dtype=torch.bool).tril()
        probs = torch.softmax(scores.masked_fill(~causal, float("-inf")), dim=-1)
        ref = torch.einsum("bhqk,bkhd->bqhd", probs, kv[..., 32:])
        assert (out.double().cpu() - ref).norm() / ref.norm() < 2e-3, n


@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
def test_halo_merge_gives_autograd_gradients(dropout_p: float) -> None:
    """A halo call's autograd function (``passing.Attend`` with a halo run) on one
    process: a fixed block and the rank's own keys merged by their
    log-sum-exp, against autograd through the same kernels in the same
    order; with dropout, the backward replays the forward's masks."""
    from patternc.distributed.calls import _Halo, _HaloRun
    from patternc.distributed.passing import Attend
    from patternc.distributed.rank import Comm

    args, kernels, q, fixed, own, probe = _two_key_blocks(dropout_p)

    torch.manual_seed(7)
    halo = _Halo(kernels[1], (), Comm(None, 1, {}), "halo")
    out = Attend.apply(_HaloRun((kernels[0],), halo, args), q, own, fixed)
    grads = torch.autograd.grad((out * probe).sum(), (q, fixed, own))

    torch.manual_seed(7)
    parts = [kernel.forward(q, kv, args) for kernel, kv in zip(kernels, (fixed, own))]
    total = torch.logsumexp(torch.stack([lse for _, lse in parts]), dim=0)
    ref = sum(o * torch.exp(lse - total).transpose(1, 2)[..., None] for o, lse in parts)
    assert isinstance(ref, torch.Tensor)
    ref_grads = torch.autograd.grad((ref * probe).sum(), (q, fixed, own))
    assert (out - ref).norm() / ref.norm() < 1e-13
    for g, r in zip(grads, ref_grads):
        assert (g - r).norm() / r.norm() < 1e-12


def test_unknown_kernel_is_refused(world_of_one: None) -> None:
    from patternc.distributed import ContextParallel

    plan = patternc.compile("groups a\na -> a").patterns["default"]
    with pytest.raises(ValueError, match="kernel='flash': use 'auto', 'flex' or 'reference'"):
        ContextParallel(plan, {"a": 8}, kernel="flash")  # type: ignore[arg-type]
