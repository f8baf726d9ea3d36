"""Random programs on every backend against the float64 reference written
from the language's definition: forward and backward, sizes including 0, 1
and odd ones, key padding, and KV-cached groups."""

from __future__ import annotations

import random
import warnings

import pytest
import torch
from fuzzmode import examples
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from programs import random_program
from reference import reference_pattern_attention, relative_error

import patternc
from patternc.nn import PatternAttention

BACKENDS = ["batched", "loop", "dense", "flex", "auto"]
RUNTIME = settings(
    max_examples=examples(40, 20_000),
    deadline=None,
    suppress_health_check=list(HealthCheck),
    derandomize=True,
)


def make(plan: patternc.Plan, backend: str) -> PatternAttention:
    torch.manual_seed(0)
    module = PatternAttention(
        patternc.MixedAttentionConfig(hidden_dim=8, num_heads=2, implementation=backend), plan
    )
    for p in module.parameters():
        torch.nn.init.normal_(p, std=0.4)
    return module


def run(module: PatternAttention, x: torch.Tensor, sizes: dict[str, int | None], **kw: object) -> tuple:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return module(x, sizes, **kw)  # type: ignore[arg-type]


@RUNTIME
@given(seed=st.integers(0, 10**9))
def test_random_programs_match_the_reference(seed: int) -> None:
    source, sizes = random_program(seed)
    rng = random.Random(seed)
    for plan in patternc.compile(source).patterns.values():
        n = sum(sizes.values())
        batch = rng.choice([1, 2])
        x = torch.randn(batch, n, 8, requires_grad=True)
        padding = torch.rand(batch, n) > 0.25 if rng.random() < 0.5 else None
        x64 = x.detach().double().requires_grad_(True)
        ref = reference_pattern_attention(make(plan, "dense"), x64, plan, sizes, padding)
        grad = torch.randn_like(ref)
        ref.backward(grad)
        assert x64.grad is not None
        for backend in BACKENDS:
            module = make(plan, backend)
            x.grad = None
            out, _ = run(module, x, sizes, key_padding_mask=padding)
            assert relative_error(out, ref) < 1e-5, (backend, source, sizes)
            out.backward(grad.float())
            assert x.grad is not None
            assert relative_error(x.grad, x64.grad) < 1e-4, (backend, source, sizes)


@RUNTIME
@given(seed=st.integers(0, 10**9))
def test_kv_cached_groups_give_the_full_run_outputs(seed: int) -> None:
    """Groups read from the cache of a full run give the other groups the same
    outputs; a cached key that present queries read through a neighbourhood
    is refused (E409)."""
    source, sizes = random_program(seed)
    rng = random.Random(seed)
    for plan in patternc.compile(source).patterns.values():
        cached = rng.choice(list(sizes))
        on_shape = {  # keys a neighbourhood relates to queries that have tokens without the cached group
            key.name
            for call in plan.calls
            for key in call.keys
            if key.modifiers.grid is not None and any(sizes[q] and q != cached for q in call.queries)
        }
        n = sum(sizes.values())
        x = torch.randn(1, n, 8)
        for backend in BACKENDS:
            module = make(plan, backend)
            full, cache = run(module, x, sizes)
            assert cache is not None
            starts = {}
            offset = 0
            for group, size in sizes.items():
                starts[group] = (offset, offset + size)
                offset += size
            if cached not in cache:  # nobody attends to it: nothing to cache
                continue
            keep = [g for g in sizes if g != cached]
            x_rest = torch.cat([x[:, :0], *(x[:, slice(*starts[g])] for g in keep)], dim=1)
            partial_sizes = {g: (None if g == cached else sizes[g]) for g in sizes}
            if cached in on_shape:  # a cached key has no coordinates on its shape
                with pytest.raises(patternc.PatternError) as error:
                    run(module, x_rest, partial_sizes, kv_cache=cache)
                (diag,) = error.value.diagnostics
                assert diag.code == "E409" and f"`{cached}` is read from a KV cache" in diag.message
                continue
            partial, _ = run(module, x_rest, partial_sizes, kv_cache=cache)
            expected = torch.cat([full[:, :0], *(full[:, slice(*starts[g])] for g in keep)], dim=1)
            assert torch.allclose(partial, expected, atol=1e-5), (backend, source, cached)
