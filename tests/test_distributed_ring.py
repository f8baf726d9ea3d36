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
}


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


@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
def test_merged_blocks_give_autograd_gradients(dropout_p: float) -> None:
    """Two key blocks merged by their log-sum-exp in the call's autograd
    function (its private ``_Attend``: the merge's backward has no public
    entry of its own) against autograd through the same kernels and a plain
    merge; with dropout, the backward replays the forward's masks."""
    from patternc.distributed.calls import _Attend, _Run

    queries = [Segment(0, 100, 150)]
    blocks = [[Segment(0, 0, 130)], [Segment(0, 130, 200)]]
    band = (((-90, 0, 1, 0),),)
    args = StepArgs(16, 0.25, dropout_p, None, False, "reference")
    kernels = [BlockKernel(queries, keys, band, True, torch.device("cpu"), 64) for keys in blocks]
    torch.manual_seed(0)
    q = torch.randn(2, 150, 2, 16, dtype=torch.float64, requires_grad=True)
    kvs = [torch.randn(2, 130, 2, 32, dtype=torch.float64, requires_grad=True)]
    kvs.append(torch.randn(2, 200, 2, 32, dtype=torch.float64, requires_grad=True))
    probe = torch.randn(2, 150, 2, 16, dtype=torch.float64)

    torch.manual_seed(7)
    out = _Attend.apply(_Run(tuple(kernels), None, args), q, q.new_zeros(2, 0, 2, 32), *kvs)
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


@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
def test_halo_merge_gives_autograd_gradients(dropout_p: float) -> None:
    """A halo call's autograd function (private, as ``_Attend``) on one
    process: a fixed block and the rank's own keys merged by their
    log-sum-exp, against autograd through the same kernels in the same
    order; with dropout, the backward replays the forward's masks."""
    from patternc.distributed.calls import _Halo, _HaloAttend, _HaloRun
    from patternc.distributed.rank import Comm

    queries = [Segment(0, 100, 150)]
    blocks = [[Segment(0, 0, 130)], [Segment(0, 130, 200)]]
    band = (((-90, 0, 1, 0),),)
    args = StepArgs(16, 0.25, dropout_p, None, False, "reference")
    kernels = [BlockKernel(queries, keys, band, True, torch.device("cpu"), 64) for keys in blocks]
    torch.manual_seed(0)
    q = torch.randn(2, 150, 2, 16, dtype=torch.float64, requires_grad=True)
    fixed = torch.randn(2, 130, 2, 32, dtype=torch.float64, requires_grad=True)
    own = torch.randn(2, 200, 2, 32, dtype=torch.float64, requires_grad=True)
    probe = torch.randn(2, 150, 2, 16, dtype=torch.float64)

    torch.manual_seed(7)
    halo = _Halo(kernels[1], (), Comm(None, 1, {}), "halo")
    out = _HaloAttend.apply(_HaloRun((kernels[0],), halo, args), q, own, fixed)
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
