"""Compiled = eager in float64, forward and input gradients, for equal-size
documents (the periodic launches: views in and out of one SDPA call).

The sinusoidal positions of a float64 ``Transformer`` were computed in
float32 and cast: eager and Inductor rounded the float32 sines differently
(1e-8 apart in the output). Gradients are compared through a random probe:
``out.sum()`` of a stack ending in a LayerNorm has a zero input gradient in
exact arithmetic, so its relative error compares rounding noise."""

from __future__ import annotations

import math

import pytest
import torch
from reference import relative_error

import patternc
from patternc import MixedAttentionConfig, TransformerConfig
from patternc.nn import PatternAttention, Transformer

DOCUMENTS = "groups doc*\ndoc* -> self [causal]\n"
SIZES = {"doc0": 6, "doc1": 6, "doc2": 6}


def _stack(pos_emb_type: str = "sinusoidal") -> Transformer:
    torch.manual_seed(0)
    config = TransformerConfig(
        vocab_size=None,
        d_model=8,
        num_heads=2,
        num_layers=1,
        d_ff=16,
        dropout_rate=0.0,
        pos_emb_type=pos_emb_type,
    )  # type: ignore[arg-type]
    return Transformer(config, DOCUMENTS).double()


def test_sinusoidal_positions_of_a_float64_model_are_float64() -> None:
    model = _stack()
    positions = torch.cat([torch.arange(n) for n in SIZES.values()])
    h = model.embed_inputs(torch.zeros(1, len(positions), 8, dtype=torch.float64), positions)[0]
    expected = torch.tensor(
        [
            [f(p / 10000 ** (2 * (i // 2) / 8)) for i, f in zip(range(8), [math.sin, math.cos] * 4)]
            for p in positions.tolist()
        ],
        dtype=torch.float64,
    )
    assert relative_error(h, expected) < 1e-15


def _value_and_input_gradient(
    model: torch.nn.Module, x: torch.Tensor, probe: torch.Tensor
) -> tuple[torch.Tensor, ...]:
    x = x.clone().requires_grad_()
    out = model(x, SIZES)
    out = out[0] if isinstance(out, tuple) else out
    (out * probe).sum().backward()
    assert x.grad is not None
    return out.detach(), x.grad


@pytest.mark.slow
@pytest.mark.skipif(
    tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2]) < (2, 10),
    reason="torch 2.9's Inductor hands the CPU flash-attention backward a float32 "
    "log-sum-exp in a float64 graph ('expected scalar type Double but found Float')",
)
@pytest.mark.parametrize("kind", ["attention", "transformer"])
def test_inductor_gradients_of_equal_size_documents_equal_eager(kind: str) -> None:
    if kind == "attention":
        torch.manual_seed(0)
        plan = patternc.compile(DOCUMENTS).patterns["default"]
        model: torch.nn.Module = PatternAttention(
            MixedAttentionConfig(hidden_dim=8, num_heads=2), plan
        ).double()
    else:
        model = _stack()
    x = torch.randn(2, 18, 8, dtype=torch.float64)
    probe = torch.randn(2, 18, 8, dtype=torch.float64)
    eager = _value_and_input_gradient(model, x, probe)
    torch._dynamo.reset()
    compiled = _value_and_input_gradient(torch.compile(model, fullgraph=True), x, probe)
    for mine, theirs in zip(compiled, eager):
        assert relative_error(mine, theirs) < 1e-12
