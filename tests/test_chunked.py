"""Chunked inference (``patternc.nn.chunked``): on random programs it equals a
float64 dense reference or refuses, naming the reason; its arguments."""

from __future__ import annotations

import random
from typing import Any

import pytest
import torch
from reference import reference_pattern_attention, relative_error

import patternc
from patternc.nn import PatternAttention, chunked


def _random_program(seed: int) -> tuple[patternc.Plan, dict[str, int], list[str]]:
    """Rules without modifiers over 2-5 groups (each group a query once), odd
    sizes, and groups to chunk: mostly groups that the keys avoid (sinks),
    at times any groups."""
    rng = random.Random(seed)
    groups = [f"g{i}" for i in range(rng.randint(2, 5))]
    sinks = rng.sample(groups, rng.randint(1, len(groups) - 1))
    context = [g for g in groups if g not in sinks]
    order = groups[:]
    rng.shuffle(order)
    lines = ["groups " + " ".join(groups)]
    while order:
        take = rng.randint(1, len(order))
        queries, order = order[:take], order[take:]
        pool = context if rng.random() < 0.8 else groups
        keys = rng.sample(pool, rng.randint(1, len(pool)))
        lines.append(f"{', '.join(queries)} -> {', '.join(keys)}")
    plan = patternc.compile("\n".join(lines) + "\n").patterns["default"]
    sizes = {g: rng.choice([1, 2, 3, 5, 7, 11]) for g in groups}
    chunk = sinks if rng.random() < 0.7 else rng.sample(groups, rng.randint(1, len(groups) - 1))
    return plan, sizes, chunk


def _layers(plan: patternc.Plan) -> list[PatternAttention]:
    config = patternc.MixedAttentionConfig(hidden_dim=8, num_heads=2)
    return [PatternAttention(config, plan).double() for _ in range(2)]


@pytest.mark.parametrize("seed", range(40))
def test_chunked_equals_the_reference_or_refuses_with_the_reason(seed: int) -> None:
    """Two residual attention layers: chunking is exact when no rule reads a
    chunked group as keys/values, and refused (with the group and the fix)
    when one does: a chunk would see only its own keys of that group."""
    plan, sizes, queries = _random_program(seed)
    torch.manual_seed(seed)
    layers = _layers(plan)

    def model(x: torch.Tensor, s: dict[str, Any]) -> torch.Tensor:
        for layer in layers:
            x = x + layer(x, s)[0]
        return x

    x = torch.randn(2, sum(sizes.values()), 8, dtype=torch.float64)
    readers = [r for r in plan.rules if set(r.keys_values) & set(queries)]
    if readers:
        with pytest.raises(ValueError, match=r"attends to .*chunk only groups that no"):
            chunked(model, x, sizes, queries, chunk_size=2)
        return
    ref = x
    for layer in layers:
        ref = ref + reference_pattern_attention(layer, ref, plan, sizes)
    out = chunked(model, x, sizes, queries, chunk_size=2)
    assert relative_error(out, ref) < 1e-12


def test_a_chunked_group_that_reads_itself_is_refused_with_the_fix() -> None:
    plan = patternc.compile(
        "groups anchors queries\nanchors -> anchors\nqueries -> anchors, queries"
    ).patterns["default"]
    (layer, _) = _layers(plan)
    x = torch.randn(1, 9, 8, dtype=torch.float64)
    with pytest.raises(
        ValueError,
        match=r"`queries` attends to its own group \(`queries -> anchors, queries`\).*"
        r"a chunk of `queries` would see only that chunk's keys.*leave `queries` out of the queries argument",
    ):
        chunked(layer, x, {"anchors": 3, "queries": 6}, ["queries"], chunk_size=2)


def test_a_chunked_group_that_reads_another_chunked_group_is_refused() -> None:
    plan = patternc.compile("groups a p q\na -> a\np -> a\nq -> a, p").patterns["default"]
    (layer, _) = _layers(plan)
    x = torch.randn(1, 10, 8, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"`q` attends to `p` \(`q -> a, p`\), and `p` is chunked"):
        chunked(layer, x, {"a": 2, "p": 3, "q": 5}, ["p", "q"], chunk_size=2)
    # the fix the message names: `p` runs with the context, `q` in chunks
    out = chunked(layer, x, {"a": 2, "p": 3, "q": 5}, ["q"], chunk_size=2)
    ref = reference_pattern_attention(layer, x, plan, {"a": 2, "p": 3, "q": 5})
    assert relative_error(out, ref) < 1e-12


def _anchors() -> tuple[PatternAttention, patternc.Plan, dict[str, int], torch.Tensor]:
    plan = patternc.compile("groups anchors queries\nanchors -> anchors\nqueries -> anchors").patterns[
        "default"
    ]
    torch.manual_seed(0)
    (layer, _) = _layers(plan)
    sizes = {"anchors": 5, "queries": 13}
    return layer, plan, sizes, torch.randn(2, 18, 8, dtype=torch.float64)


def test_forward_may_return_output_and_cache() -> None:
    """A PatternAttention returns ``(out, cache)``: chunked takes it as it is,
    and the README's ``lambda x, s: attn(x, s)``."""
    layer, plan, sizes, x = _anchors()
    ref = reference_pattern_attention(layer, x, plan, sizes)
    assert relative_error(chunked(layer, x, sizes, ["queries"], chunk_size=4), ref) < 1e-12
    out = chunked(lambda x, s: layer(x, s), x, sizes, ["queries"], chunk_size=4)
    assert relative_error(out, ref) < 1e-12
    with pytest.raises(TypeError, match=r"forward returned dict; chunked needs a tensor, or a tuple"):
        chunked(lambda x, s: {"out": layer(x, s)[0]}, x, sizes, ["queries"], chunk_size=4)


def test_sizes_as_zero_dim_tensors() -> None:
    layer, plan, sizes, x = _anchors()
    ref = reference_pattern_attention(layer, x, plan, sizes)
    tensors = {g: torch.tensor(n) for g, n in sizes.items()}
    assert relative_error(chunked(layer, x, tensors, ["queries"], chunk_size=4), ref) < 1e-12


def test_sizes_in_another_order_than_the_plan_are_refused() -> None:
    """x holds the groups in the plan's order; a dict in another order would
    put the chunks on the wrong tokens (E404, as at every entry point)."""
    layer, _, _, x = _anchors()
    with pytest.raises(patternc.PatternError, match=r"E404.*sizes name \['queries', 'anchors'\]"):
        chunked(layer, x, {"queries": 13, "anchors": 5}, ["queries"], chunk_size=4)


def test_input_errors_name_the_expected_shape() -> None:
    layer, _, sizes, x = _anchors()
    with pytest.raises(ValueError, match=r"x has shape \(18, 8\), which has no batch dimension.*x\[None\]"):
        chunked(layer, x[0], sizes, ["queries"], chunk_size=4)
    with pytest.raises(ValueError, match=r"x has shape \(2, 17, 8\) but sizes add up to 18 tokens"):
        chunked(layer, x[:, :17], sizes, ["queries"], chunk_size=4)
    with pytest.raises(TypeError, match=r"sizes must be a \{group: size\} dict in the order of x, got list"):
        chunked(layer, x, [5, 13], ["queries"], chunk_size=4)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"sizes must be integers >= 0 .*'queries': 13.5"):
        chunked(layer, x, {"anchors": 5, "queries": 13.5}, ["queries"], chunk_size=4)  # type: ignore[dict-item]
