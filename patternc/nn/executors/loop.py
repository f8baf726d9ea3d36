"""The readable executor: one attention call per pattern."""

from __future__ import annotations

from collections.abc import Mapping

from torch import Tensor

from patternc.nn.executors.common import (
    assemble,
    attend,
    gather,
    gather_mask,
    modifier_args,
    within_group_positions,
)
from patternc.nn.schedule import Schedule

__all__ = ["run_loop"]


def run_loop(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    schedule: Schedule,
    cache: Mapping[str, tuple[Tensor, Tensor]],
    key_padding_mask: Tensor | None,
    dropout_p: float,
    scale: float | None,
) -> Tensor:
    cached_k = {name: kv[0] for name, kv in cache.items()}
    cached_v = {name: kv[1] for name, kv in cache.items()}
    positions = within_group_positions(schedule, q.device) if schedule.has_modifiers else None
    outputs: list[Tensor | None] = []
    for call in schedule.calls:
        if not call.n_queries:
            outputs.append(None)
            continue
        queries = gather(q, call.queries, {})
        keys = gather(k, call.keys_values, cached_k)
        values = gather(v, call.keys_values, cached_v)
        mask = gather_mask(key_padding_mask, call.keys_values)
        pair_mask, is_causal = modifier_args(call, positions, cache, key_padding_mask is not None)
        outputs.append(attend(queries, keys, values, mask, dropout_p, scale, pair_mask, is_causal))
    return assemble(outputs, schedule, q)
