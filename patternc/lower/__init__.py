"""Lowering: a plan at concrete sizes, as the records every executor reads.

Torch-free, and below the plan floor: these modules read a bound plan's
groups and calls (:class:`~patternc.lower.layout.BoundPlan`) and never import
:mod:`patternc.plan`, the runtime (:mod:`patternc.nn`) or the exports.

- :mod:`~patternc.lower.bind`: families (``doc*``) expanded over run-time groups;
- :mod:`~patternc.lower.layout`: the :class:`~patternc.lower.layout.Layout`
  (slots, calls, launches, key space, allowed group pairs);
- :mod:`~patternc.lower.rows`: a plan stacked once per row of a batch (rows of different sizes);
- :mod:`~patternc.lower.blocks`: block classes of the mask (empty, partial, full);
- :mod:`~patternc.lower.pairs`: allowed (query group, key group) pairs at offsets;
- :mod:`~patternc.lower.varlen`: variable-length launches;
- :mod:`~patternc.lower.costs`: the cost model ``auto`` picks an executor by;
- :mod:`~patternc.lower.tables`: the slot a layout owns for what the runtime
  derives from it (device tables, ``auto``'s pick);
- :mod:`~patternc.lower.cache`: the bounded, thread-safe cache layouts are kept in.
"""
