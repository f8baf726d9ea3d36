"""The fast executor: calls of equal shape run as one stacked attention launch.

Stacking reads each call's tokens through a strided view when the calls'
segments sit at evenly spaced offsets (two equal branches, say): no copy of
Q, K or V is made then. Otherwise the calls are stacked with one copy.
"""

from __future__ import annotations

import functools
import itertools
import warnings
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from patternc.modifiers import Modifiers
from patternc.nn.executors.common import (
    AttentionInputs,
    assemble,
    attend,
    call_bias,
    gather,
    gather_mask,
    modifier_args,
    within_group_positions,
)
from patternc.nn.schedule import Schedule, Segment

__all__ = ["run_as_batched", "run_batched", "stack_segments"]


def stack_segments(
    t: Tensor, segment_lists: Sequence[Sequence[Segment]], cache: Mapping[str, Tensor]
) -> Tensor:
    """``[B, N, ...]`` -> ``[B * n, L, ...]`` holding each call's tokens (call
    ``i`` of batch ``b`` at ``b * n + i``). All calls have ``L`` tokens."""
    n = len(segment_lists)
    if all(len(segs) == 1 and segs[0].cached is None for segs in segment_lists):
        starts = [segs[0].start for segs in segment_lists]
        length = segment_lists[0][0].length
        step = starts[1] - starts[0]
        if step > 0 and all(b - a == step for a, b in itertools.pairwise(starts)):
            window = t.narrow(1, starts[0], step * (n - 1) + length)
            view = window.unfold(1, length, step).movedim(-1, 2)  # [B, n, L, ...]
            return view.flatten(0, 1)
    return torch.stack([gather(t, segs, cache) for segs in segment_lists], dim=1).flatten(0, 1)


@functools.lru_cache(maxsize=512)
def _direct_slices(schedule: Schedule) -> tuple[tuple[int, int, int, int, bool] | None, ...]:
    """Per launch: ``(q_start, q_stop, kv_start, kv_stop, is_causal)`` when it is
    one call reading one input slice of queries and one of keys with no
    modifier but a plain ``[causal]`` (the common case: documents, anchors),
    else None. Such launches skip the general path's per-call Python."""
    out: list[tuple[int, int, int, int, bool] | None] = []
    for launch in schedule.launches:
        call = schedule.calls[launch[0]]
        simple = (
            len(launch) == 1
            and len(call.queries) == 1
            and len(call.keys_values) == 1
            and call.keys_values[0].cached is None
            and (not call.modifiers or (call.single_groups and call.modifiers == Modifiers(causal=True)))
        )
        if simple:
            (qs,), (ks,) = call.queries, call.keys_values
            out.append((qs.start, qs.stop, ks.start, ks.stop, bool(call.modifiers.causal)))
        else:
            out.append(None)
    return tuple(out)


def run_batched(inputs: AttentionInputs) -> Tensor:
    q, k, v, schedule, cache = inputs.q, inputs.k, inputs.v, inputs.schedule, inputs.cache
    key_padding_mask, dropout_p, scale = inputs.key_padding_mask, inputs.dropout_p, inputs.scale
    cached_k, cached_v = inputs.cached_keys, inputs.cached_values
    outputs: list[Tensor | None] = [None] * len(schedule.calls)
    batch = q.shape[0]
    slopes = inputs.alibi_slopes
    needs_positions = schedule.has_modifiers or slopes is not None
    positions = within_group_positions(schedule, q.device) if needs_positions else None
    padded = key_padding_mask is not None
    direct = _direct_slices(schedule) if not padded and slopes is None else (None,) * len(schedule.launches)
    # head-major views, sliced per call below: no per-call transposes
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    for launch, slices in zip(schedule.launches, direct):
        if slices is not None:
            q0, q1, k0, k1, causal = slices
            out = F.scaled_dot_product_attention(
                qt.narrow(2, q0, q1 - q0), kt.narrow(2, k0, k1 - k0), vt.narrow(2, k0, k1 - k0),
                dropout_p=dropout_p, scale=scale, is_causal=causal,
            )  # fmt: skip
            outputs[launch[0]] = out.transpose(1, 2)
            continue
        calls = [schedule.calls[i] for i in launch]
        modifiers = [modifier_args(c, positions, cache, padded) for c in calls]
        if len(calls) == 1:
            (call,) = calls
            outputs[launch[0]] = attend(
                gather(q, call.queries, {}),
                gather(k, call.keys_values, cached_k),
                gather(v, call.keys_values, cached_v),
                gather_mask(key_padding_mask, call.keys_values),
                dropout_p,
                scale,
                *modifiers[0],
                call_bias(call, positions, cache, slopes),
            )
            continue
        queries = stack_segments(q, [c.queries for c in calls], {})
        keys = stack_segments(k, [c.keys_values for c in calls], cached_k)
        values = stack_segments(v, [c.keys_values for c in calls], cached_v)
        mask = None
        if key_padding_mask is not None:
            mask = stack_segments(
                key_padding_mask, [[s for s in c.keys_values if s.cached is None] for c in calls], {}
            )
        pair_mask, is_causal = None, modifiers[0][1]  # calls of a launch share their modifiers
        if modifiers[0][0] is not None:
            stacked = torch.stack([m[0] for m in modifiers if m[0] is not None])  # [n, Lq, Lk]
            pair_mask = stacked.expand(batch, *stacked.shape).flatten(0, 1)
        bias = None
        if slopes is not None:
            biases = torch.stack([call_bias(c, positions, cache, slopes) for c in calls])  # type: ignore[misc]
            bias = biases.expand(batch, *biases.shape).flatten(0, 1)  # [B * n, H, Lq, Lk]
        out = attend(queries, keys, values, mask, dropout_p, scale, pair_mask, is_causal, bias)
        out = out.reshape(batch, len(calls), *out.shape[1:])
        for position, index in enumerate(launch):
            outputs[index] = out[:, position]
    return assemble(outputs, schedule, q)


def run_as_batched(inputs: AttentionInputs, implementation: str, reason: str, warned: set[str]) -> Tensor:
    """Run ``inputs`` with this executor on behalf of ``implementation``, which
    cannot take them for ``reason``; warn once per reason (``warned`` is the
    caller's record of reasons already reported)."""
    if reason not in warned:
        warned.add(reason)
        warnings.warn(
            f"implementation={implementation!r} runs as 'batched' for {reason}; use "
            "implementation='batched' (or 'auto') to silence this",
            stacklevel=4,
        )
    return run_batched(inputs)
