"""``auto``: pick the executor per layout from a small cost model.

The model predicts each candidate's time from what the layout knows
(tokens, calls, launches, allowed score entries, tokens that must be copied)
and the device and dtype, with per-backend launch costs and attention
throughputs measured with ``benchmarks/bench_gpu.py`` (see
``docs/performance.md``), forward alone or forward and backward: a call
that will be differentiated is priced with each backend's backward too,
since the ranking can flip (float32 ``flex`` leads forward and trails
forward+backward). Only executors that run the layout natively are
candidates: ``varlen`` needs CUDA, half precision and no padding, dropout or
ALiBi; ``flex`` needs CUDA. On CPU the answer is ``batched``. The choice is
cached per (layout, device, dtype, conditions) and reported by
:func:`choose`.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from patternc.lower.cache import BoundedCache
from patternc.lower.layout import Layout
from patternc.nn.executors.batched import run_batched
from patternc.nn.executors.common import AttentionInputs, Executor
from patternc.nn.executors.dense import run_dense
from patternc.nn.executors.flex import run_flex
from patternc.nn.executors.flexkernels import float32_products
from patternc.nn.executors.varlen import kept_launches, run_varlen, varlen_available, varlen_kernel
from patternc.nn.flexmask import BLOCK_SIZE
from patternc.nn.tables import TABLES
from patternc.plan import LAYOUTS
from patternc.tracing import compiling

__all__ = ["Estimate", "choose", "estimates", "run_auto"]

_grad_enabled = torch.is_grad_enabled  # bound once: the per-call pick reads it without two lookups


@dataclass(frozen=True)
class _Rates:
    launch_s: float  # per kernel launch and its Python
    flops_per_s: float  # attention FLOP/s on the entries it computes (forward)
    backward: float  # forward+backward time over forward time, launches aside


# bf16, head_dim 64: forward rates and backward ratios fitted to
# ``benchmarks/bench_gpu.py`` at 2x(8k+24k) AB-UPT tokens and 64 documents
# (figures in docs/performance.md).
_HALF = {
    "batched": _Rates(25e-6, 380e12, 3.5),
    "varlen": _Rates(40e-6, 290e12, 4.0),
    "flex": _Rates(60e-6, 250e12, 3.6),
    "dense": _Rates(25e-6, 420e12, 3.5),
}
# varlen on FlashAttention 4 (see varlen_kernel), 64 documents: about 1.3x
# FlashAttention 2's forward rate, forward+backward about 3x its forward. Its
# launcher is Python (CuTe DSL), so a single call pays host time per launch
# beyond its kernel; the launch cost is fitted where that host time shows
# (10k-token AB-UPT and document layouts), not at 64 documents, where the
# host hides behind the kernel: a smaller value makes auto pick varlen for
# small training layouts that batched runs faster.
_HALF_VARLEN_FLASH4 = _Rates(150e-6, 370e12, 3.0)
# float32, head_dim 64 (AB-UPT 2x(1k+4k), 16 and 64 documents): SDPA's
# efficient kernel; flex with three-TF32 products (faster forward, backward
# ratio 4.5-5.3 against batched's 3.8-4.3) or, where torch is set to IEEE
# products, on CUDA cores.
_FLOAT = {
    "batched": _Rates(25e-6, 32e12, 4.0),
    "flex": _Rates(60e-6, 43e12, 4.6),
    "dense": _Rates(25e-6, 32e12, 4.0),
}
_FLOAT_FLEX_IEEE = _Rates(60e-6, 20e12, 7.1)
_COPY_BYTES_PER_S = 1.5e12


@dataclass(frozen=True)
class Estimate:
    backend: str
    seconds: float


def _entries(layout: Layout, compact: bool = False) -> tuple[int, int, int, int]:
    """(allowed score entries, entries SDPA computes under batched, dense
    entries, tokens the batched executor copies); ``compact``: K/V come in
    the key space, where a call's key segments may lie end to end."""
    allowed = 0
    masked = 0
    copied = 0
    space = layout.key_space
    for call in layout.calls:
        input_keys = [s for s in call.keys if s.cached is None and s.length]
        n_kv = sum(s.length for s in input_keys)
        allowed += call.allowed_entries
        # a mask costs the whole rectangle; SDPA's is_causal skips the masked half
        masked += call.allowed_entries if call.is_causal else call.n_queries * n_kv
        if len(call.queries) > 1:
            copied += call.n_queries
        end_to_end = compact and all(
            space.position(a.stop) == space.position(b.start) for a, b in itertools.pairwise(input_keys)
        )
        if len(call.keys) > 1 and not end_to_end:
            copied += 2 * n_kv
    return allowed, masked, layout.n_tokens**2, copied


def _estimates(
    layout: Layout,
    batch: int,
    heads: int,
    dim: int,
    device: torch.device,
    half: bool,
    native_varlen: bool,
    training: bool = False,
    flex_products: str = "'tf32x3'",
    varlen_on: str = "flash2",
    compact: bool = False,
) -> tuple[Estimate, ...]:
    """Predicted times, fastest first: forward alone, or forward and backward
    when ``training`` (compute by each backend's backward ratio; launches
    and copies twice: the backward re-reads what the forward gathered).
    ``flex_products`` is the precision of flex's float32 products,
    ``varlen_on`` the kernel varlen launches (:func:`varlen_kernel`),
    ``compact``: K/V come in the layout's key space (``dense`` pays a copy
    back to token space; ``flex`` indexes the key space)."""
    allowed, masked, dense, copied = _entries(layout, compact)
    expand = 2 * layout.n_tokens if compact and not layout.key_space.identity else 0
    flop = 4 * batch * heads * dim
    elem = 2 if half else 4
    rates = dict(_HALF if half else _FLOAT)
    if not half and flex_products == "'ieee'":
        rates["flex"] = _FLOAT_FLEX_IEEE
    if half and varlen_on == "flash4":
        rates["varlen"] = _HALF_VARLEN_FLASH4
    out = []
    for name, rate in rates.items():
        if name == "varlen" and not native_varlen:
            continue
        launches, copy = 1, 0.0  # launches, and seconds of copies into and out of the kernel's layout
        if name == "batched":
            launches = len(layout.launches)
            copy = copied * batch * heads * dim * elem / _COPY_BYTES_PER_S
            entries = masked
        elif name == "varlen":
            plan = kept_launches(layout, batch, device, compact)
            assert not isinstance(plan, str)
            gathered = sum(0 if p.kv_index is None else 2 * int(p.kv_index.numel()) for p in plan)
            launches, copy = len(plan), gathered * heads * dim * elem / _COPY_BYTES_PER_S
            entries = allowed
        elif name == "flex":
            # computed entries: whole blocks around the allowed ones, at most 2x on small groups
            entries = min(dense, allowed + 2 * BLOCK_SIZE * layout.n_tokens)
        else:  # dense: every entry, and an [n, n] mask
            entries = dense
            copy = (dense + expand * heads * dim * elem) * batch / _COPY_BYTES_PER_S
        compute = entries * flop / rate.flops_per_s
        overhead = launches * rate.launch_s + copy
        seconds = 2 * overhead + rate.backward * compute if training else overhead + compute
        out.append(Estimate(name, seconds))
    return tuple(sorted(out, key=lambda e: e.seconds))


Conditions = tuple[tuple[int, ...], torch.dtype, torch.device, bool, bool, bool]
"""What a pick depends on besides the layout: ``(shape, dtype, device, plain,
training, compact)``; ``plain``: no padding, dropout or ALiBi; ``training``:
the call will be differentiated; ``compact``: K/V come in the key space.
Eager calls and a user's ``torch.compile`` share their picks: every
candidate runs the same kernels in both (``varlen`` reaches FlashAttention 4
through custom ops, see :mod:`patternc.nn.executors.flash4`)."""

PickKey = tuple[int, tuple[int, ...], torch.dtype, torch.device, bool, bool, bool]
"""``(id(layout), *conditions)``: one flat tuple, so that the hot path builds
and hashes one tuple, not a tuple inside a tuple."""


def _key(inputs: AttentionInputs) -> PickKey:
    """The pick's key for an eager call, built in one frame from C calls (the
    hot path of every ``auto`` call): the shape stays a ``torch.Size`` (a
    tuple that hashes alike, no copy), and ``training`` is
    :attr:`AttentionInputs.differentiated` written out, not a property call."""
    q = inputs.q
    return (
        id(inputs.layout),
        q.shape,
        q.dtype,
        q.device,
        inputs.key_padding_mask is None and inputs.dropout_p == 0 and inputs.alibi_slopes is None,
        (q.requires_grad or inputs.k.requires_grad or inputs.v.requires_grad) and _grad_enabled(),
        inputs.keys_compact,
    )


def _conditions(inputs: AttentionInputs, traced: bool = False) -> Conditions:
    """``traced``: the shape as a plain tuple, for Dynamo to hand to
    :func:`_choice_by_id`."""
    _, shape, *rest = _key(inputs)
    return (tuple(shape) if traced else shape, *rest)  # type: ignore[return-value]


def estimates(inputs: AttentionInputs) -> tuple[Estimate, ...]:
    """Predicted times of the candidate executors for these inputs, fastest first."""
    return _candidates(inputs.layout, _conditions(inputs))


def _candidates(layout: Layout, conditions: Conditions) -> tuple[Estimate, ...]:
    shape, dtype, device, plain, training, compact = conditions
    if device.type != "cuda":
        return (Estimate("batched", 0.0),)
    batch, _, heads, dim = shape
    half = dtype in (torch.float16, torch.bfloat16)
    native_varlen = (
        half
        and plain
        and varlen_available(device)
        and dim % 8 == 0
        and not isinstance(kept_launches(layout, batch, device, compact), str)
    )
    products = "'ieee'" if half else float32_products(device)
    kernel = varlen_kernel(device, dim)
    args = (layout, batch, heads, dim, device, half, native_varlen, training, products, kernel, compact)
    candidates = TABLES.get(("auto estimates", *args), lambda: _estimates(*args))
    if not plain:  # flex falls back for dropout; varlen cannot run these; keep the measured default
        return tuple(e for e in candidates if e.backend == "batched")
    return candidates


def choose(inputs: AttentionInputs) -> str:
    """The executor ``auto`` runs for these inputs (memoised per layout and
    :data:`Conditions`, so a training step pays a lookup). The pick is made
    on a layout's first call under those conditions: a later change of
    torch's float32 matmul precision does not revisit it.

    Under ``torch.compile`` the pick is a constant to Dynamo: it calls
    :func:`_choice_by_id` at trace time instead of tracing the cost model (host
    work with nothing for the graph, and records Dynamo 2.11 can neither build
    nor pass on) and specialises the graph on the answer. The layout travels
    by ``id``: Dynamo can hand a constant function ints, not our records."""
    if compiling():
        return _constant_choice(id(inputs.layout), _conditions(inputs, traced=True))
    key = _key(inputs)
    found = _lookup_pick(key)  # the hot path: one flat key, one dict lookup
    return found[1] if found is not None else _choice(inputs.layout, key[1:])


PICKS: BoundedCache[PickKey, tuple[Layout, str]] = BoundedCache("auto picks", 2048)
"""Key :data:`PickKey` -> ``(layout, pick)``; holding the layout keeps its
``id`` its own while the entry lives."""
_lookup_pick = PICKS.untraced_lookup()  # choose() returns before this under a trace


def _choice(layout: Layout, conditions: Conditions) -> str:
    key: PickKey = (id(layout), *conditions)
    found = PICKS.lookup(key)
    if found is not None:
        return found[1]
    pick = _candidates(layout, conditions)[0].backend
    return PICKS.get_or_build(key, lambda: (layout, pick))[1]


def _choice_by_id(layout_id: int, conditions: Conditions) -> str:
    """The pick for the layout with this ``id``: one seen by an eager call or
    one of :data:`patternc.plan.LAYOUTS`; ``batched`` (the default) for a
    layout built inside the trace and never run eagerly."""
    found = PICKS.lookup((layout_id, *conditions))
    if found is not None:
        return found[1]
    layout = next((known for known in LAYOUTS.values() if id(known) == layout_id), None)
    return "batched" if layout is None else _choice(layout, conditions)


_constant_choice: Callable[[int, Conditions], str] = torch.compiler.assume_constant_result(_choice_by_id)  # type: ignore[no-untyped-call,unused-ignore]


_RUN: dict[str, Executor] = {
    "batched": run_batched,
    "flex": run_flex,
    "dense": run_dense,
    "varlen": run_varlen,
}


def run_auto(inputs: AttentionInputs) -> Tensor:
    return _RUN[choose(inputs)](inputs)
