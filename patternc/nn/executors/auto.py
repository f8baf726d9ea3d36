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
kept in the layout's tables per (device, dtype, conditions) and reported by
:func:`choose`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from patternc.lower.costs import Estimate, VarlenWork, Workload, price
from patternc.lower.layout import Layout
from patternc.lower.tables import TracedTables, traced_owner
from patternc.nn.executors.batched import run_batched
from patternc.nn.executors.common import AttentionInputs, Executor
from patternc.nn.executors.dense import run_dense
from patternc.nn.executors.flex import run_flex
from patternc.nn.executors.flexkernels import float32_products
from patternc.nn.executors.varlen import kept_launches, run_varlen, varlen_available, varlen_kernel
from patternc.nn.tables import stored_table, table
from patternc.plan import LAYOUTS

__all__ = ["Estimate", "choose", "estimates", "picks", "run_auto"]

_grad_enabled = torch.is_grad_enabled  # bound once: the per-call pick reads it without two lookups


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
    """:func:`patternc.lower.costs.price` of a layout on a device: ``varlen``
    is priced by the launches it would run there (``native_varlen``: it can
    run the layout at all); ``flex_products`` is the precision of flex's
    float32 products, ``varlen_on`` the kernel varlen launches
    (:func:`varlen_kernel`)."""
    varlen = None
    if native_varlen:
        plan = kept_launches(layout, batch, device, compact)
        assert not isinstance(plan, str)
        gathered = sum(0 if p.kv_index is None else 2 * int(p.kv_index.numel()) for p in plan)
        varlen = VarlenWork(len(plan), gathered)
    return price(
        layout,
        Workload(batch, heads, dim, half, training, compact),
        varlen=varlen,
        flex_ieee=flex_products == "'ieee'",
        varlen_flash4=varlen_on == "flash4",
    )


Conditions = tuple[tuple[int, ...], torch.dtype, torch.device, bool, bool, bool]
"""What a pick depends on besides the layout: ``(shape, dtype, device, plain,
training, compact)``; ``plain``: no padding, dropout or ALiBi; ``training``:
the call will be differentiated; ``compact``: K/V come in the key space.
Eager calls and a user's ``torch.compile`` share their picks: every
candidate runs the same kernels in both (``varlen`` reaches FlashAttention 4
through custom ops, see :mod:`patternc.nn.executors.flash4`)."""

PickKey = tuple[str, tuple[int, ...], torch.dtype, torch.device, bool, bool, bool]
"""``("auto pick", *conditions)``, the pick's key in the layout's tables: one
flat tuple, so that the hot path builds and hashes one tuple, not a tuple
inside a tuple."""


def _key(inputs: AttentionInputs) -> PickKey:
    """The pick's key for an eager call, built in one frame from C calls (the
    hot path of every ``auto`` call): the shape stays a ``torch.Size`` (a
    tuple that hashes alike, no copy), and ``training`` is
    :attr:`AttentionInputs.differentiated` written out, not a property call."""
    q = inputs.q
    return (
        "auto pick",
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
    args = (batch, heads, dim, device, half, native_varlen, training, products, kernel, compact)
    candidates = table(layout, ("auto estimates", *args), lambda: _estimates(layout, *args))
    if not plain:  # flex falls back for dropout; varlen cannot run these; keep the measured default
        return tuple(e for e in candidates if e.backend == "batched")
    return candidates


def choose(inputs: AttentionInputs) -> str:
    """The executor ``auto`` runs for these inputs (memoised per layout and
    :data:`Conditions`, so a training step pays a lookup). The pick is made
    on a layout's first call under those conditions: a later change of
    torch's float32 matmul precision does not revisit it.

    Handed a trace's view of the layout (``layout.tables``, see
    :mod:`patternc.nn.traced_layouts`) the pick is a constant to Dynamo: it calls
    :func:`_choice_by_id` at trace time instead of tracing the cost model (host
    work with nothing for the graph, and records Dynamo 2.11 can neither build
    nor pass on) and specialises the graph on the answer. The layout travels
    by ``id``: Dynamo can hand a constant function ints, not our records."""
    tables = inputs.layout.tables
    if isinstance(tables, TracedTables):  # a trace's view: the boundary handed a traced call
        return _constant_choice(tables.layout_id, _conditions(inputs, traced=True))
    key = _key(inputs)
    found = inputs.layout.tables.entries.get(key)  # the hot path: one flat key, one dict lookup
    return found if isinstance(found, str) else _choice(inputs.layout, key[1:])


def _choice(layout: Layout, conditions: Conditions) -> str:
    """The pick, kept in the layout's tables under ``("auto pick", *conditions)``."""
    key: PickKey = ("auto pick", *conditions)
    found = stored_table(layout, key)
    if isinstance(found, str):
        return found
    return table(layout, key, lambda: _candidates(layout, conditions)[0].backend)


def _choice_by_id(layout_id: int, conditions: Conditions) -> str:
    """The pick for the layout whose trace view carries this ``id`` (the one
    a trace was handed, see :mod:`patternc.nn.traced_layouts`); ``batched``
    (the default) where no view names it."""
    layout = traced_owner(layout_id)
    return _choice(layout, conditions) if isinstance(layout, Layout) else "batched"


def picks() -> list[tuple[Conditions, str]]:
    """``(conditions, pick)`` of every pick kept by a layout of
    :data:`patternc.plan.LAYOUTS` (for reports)."""
    return [
        (key[1:], pick)  # type: ignore[misc]
        for layout in LAYOUTS.values()
        for key, pick in list(layout.tables.entries.items())
        if key[0] == "auto pick" and isinstance(pick, str)
    ]


_constant_choice: Callable[[int, Conditions], str] = torch.compiler.assume_constant_result(_choice_by_id)  # type: ignore[no-untyped-call,unused-ignore]


_RUN: dict[str, Executor] = {
    "batched": run_batched,
    "flex": run_flex,
    "dense": run_dense,
    "varlen": run_varlen,
}


def run_auto(inputs: AttentionInputs) -> Tensor:
    return _RUN[choose(inputs)](inputs)
