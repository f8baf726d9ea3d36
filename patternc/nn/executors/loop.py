"""The readable executor: one attention call per pattern."""

from __future__ import annotations

from torch import Tensor

from patternc.nn.executors.common import (
    AttentionInputs,
    TokenSplit,
    assemble,
    attend,
    call_bias,
    gather_mask,
    modifier_args,
    within_group_positions,
)

__all__ = ["run_loop"]


def run_loop(inputs: AttentionInputs) -> Tensor:
    inputs = inputs.in_token_space()  # K/V at input positions
    q, k, v, layout, cache = inputs.q, inputs.k, inputs.v, inputs.layout, inputs.cache
    key_padding_mask, dropout_p, scale = inputs.key_padding_mask, inputs.dropout_p, inputs.scale
    cached_k, cached_v = inputs.cached_keys, inputs.cached_values
    slopes = inputs.alibi_slopes
    needs_positions = layout.has_modifiers or slopes is not None
    positions = within_group_positions(layout, q.device) if needs_positions else None
    outputs: list[Tensor | None] = []
    qs = TokenSplit(q, layout)  # pieces of one split: see TokenSplit
    ks, vs = TokenSplit(k, layout, keys=True), TokenSplit(v, layout, keys=True)
    for call in layout.calls:
        if not call.n_queries or not call.attention.keys:
            outputs.append(None)
            continue
        queries = qs.take(call.queries, {})
        keys = ks.take(call.keys, cached_k)
        values = vs.take(call.keys, cached_v)
        mask = gather_mask(key_padding_mask, call.keys)
        pair_mask, is_causal = modifier_args(call, positions, cache, key_padding_mask is not None)
        bias = call_bias(call, positions, cache, slopes)
        outputs.append(attend(queries, keys, values, mask, dropout_p, scale, pair_mask, is_causal, bias))
    return assemble(outputs, layout, q)
