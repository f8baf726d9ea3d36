"""A layer's layout when ``torch.compile`` traces its first call.

Eager calls look their layout up in :data:`patternc.cache.LAYOUTS`, and a
trace after one eager call finds it there too. A *cold* trace (a model
compiled before it ever ran) must build it, and Dynamo before torch 2.13
cannot trace the compiler (it fails on its frozen records, e.g. "can't
wrap ``Modifiers``"). So :func:`layout_of` builds the layout outside the
trace, as plain Python in a function Dynamo runs once and holds as a
constant, and the graph reads the result from :data:`TRACED_LAYOUTS`.

Two things shape this:
- Dynamo hands such a function constants only: neither a plan nor a module
  converts on torch 2.11, so the plan travels by ``id``, and layers name
  their plans up front (:func:`layer_plan`, at construction, which is eager).
- The built layout reaches the graph as an attribute of one object, one
  attribute per layout. A dict entry added by the function would be missed
  by a trace that read the dict earlier (Dynamo reads a dict once per
  trace), as a second layer with another plan does; and a layout returned
  as the constant itself reaches the graph as an opaque attribute whose
  fields Dynamo 2.11 cannot read.

>>> import patternc, torch
>>> from patternc.nn import PatternAttention
>>> plan = patternc.compile("groups a q\\na -> a\\nq -> a").patterns["default"]
>>> layer = PatternAttention(patternc.MixedAttentionConfig(hidden_dim=8, num_heads=2), plan)
>>> compiled = torch.compile(layer, fullgraph=True, backend="eager")  # before any eager call
>>> out, _ = compiled(torch.randn(1, 5, 8), {"a": 2, "q": 3})
>>> out.shape
torch.Size([1, 5, 8])
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch

from patternc.cache import LAYOUTS, BoundedCache, _compiling
from patternc.layout import Layout
from patternc.plan import Plan, Sizes, layout_key, sizes_key
from patternc.schemas import TokenSpec

__all__ = ["TRACED_LAYOUTS", "layer_plan", "layout_of"]

SizesKey = tuple[tuple[str, int | None], ...]

LAYER_PLANS: BoundedCache[int, Plan] = BoundedCache("layer plans", 1024)
"""``id(plan)`` -> the plan, for every plan a layer was built with. Holding
the plan keeps its ``id`` its own while the entry lives."""


class TracedLayouts:
    """Layouts built for traces, each an attribute of this object that a
    graph reads (and Dynamo guards). Key: ``(id(plan), sizes key, sizes
    given as a mapping)`` -> the attribute's name; the plan is kept beside
    the name, so an ``id`` reused by another plan is never mistaken for it.
    Not bounded: an entry is made per cold trace of a (plan, sizes), which
    costs far more than the entry."""

    def __init__(self) -> None:
        self._names: dict[tuple[int, SizesKey, bool], tuple[Plan, str]] = {}

    def slot(self, plan: Plan, key: SizesKey, mapping: bool, layout: Layout) -> str:
        """The attribute for this plan and sizes, made on the first ask, now
        holding ``layout``: the layout of :data:`~patternc.cache.LAYOUTS`,
        whose tables and picks eager calls stored (a graph traced against a
        layout since replaced fails its guard and is traced again)."""
        found = self._names.get((id(plan), key, mapping))
        if found is not None and found[0] is plan:
            name = found[1]
        else:
            name = f"layout_{len(self._names)}"
            self._names[(id(plan), key, mapping)] = (plan, name)
        setattr(self, name, layout)
        return name


TRACED_LAYOUTS = TracedLayouts()


def layer_plan(plan: Plan) -> Plan:
    """Name ``plan`` as one a layer runs, so that a cold trace can build its
    layouts outside the trace (see the module docstring); returns it."""
    LAYER_PLANS.put(id(plan), plan)
    return plan


def _build_for_trace(plan_id: int, key: SizesKey, mapping: bool) -> str | None:
    """Plain Python inside a trace: the slot of the layer plan's layout at
    these sizes, or None when the plan is not a layer's (the trace then
    builds the layout itself, as before). A layout that fails to build
    raises here, and Dynamo's error carries the compiler's diagnostics."""
    plan = LAYER_PLANS.lookup(plan_id)
    if plan is None:
        return None
    sizes: Sizes = dict(key) if mapping else [TokenSpec(name=name, size=size) for name, size in key]
    layout = plan.layout(sizes)
    # torch 2.13 reports a compile here, so plan.layout stored nothing: keep
    # it, so that eager calls find this record and the tables made for it
    LAYOUTS.put(layout_key(plan, sizes), layout)
    return TRACED_LAYOUTS.slot(plan, key, mapping, layout)


_built_for_trace: Callable[[int, SizesKey, bool], str | None] = torch.compiler.assume_constant_result(  # type: ignore[no-untyped-call,unused-ignore]
    _build_for_trace
)


def layout_of(plan: Plan, sizes: Sizes) -> Layout:
    """``plan.layout(sizes)``, also as the first call of a ``torch.compile``
    trace (see the module docstring)."""
    if _compiling():
        name = _built_for_trace(id(plan), sizes_key(sizes), isinstance(sizes, Mapping))
        if name is not None:
            layout: Layout = getattr(TRACED_LAYOUTS, name)
            return layout
    return plan.layout(sizes)
