"""The peer's literal types (``noether.core.types``)."""

from __future__ import annotations

from typing import Literal

__all__ = ["ActivationTypes", "InitWeightsMode"]

InitWeightsMode = Literal[
    "truncnormal002", "torch", "truncnormal", "truncnormal002-identity", "torchs", "zeros"
]
"""The peer's initialisation modes, with its meanings:

- ``"torch"``: PyTorch's defaults for ``nn.Linear``;
- ``"truncnormal"`` / ``"truncnormal002"``: normal weights, std 0.02 (cut at
  ±2, i.e. practically uncut), biases zero;
- ``"truncnormal002-identity"``: as ``"truncnormal002"``, and the output
  projection of attention and the second linear of an ``UpActDownMlp`` start
  at zero, so a residual block starts as the identity;
- ``"zeros"``: zero weights and biases (``LinearProjection``, ``UntiedLinear``);
- ``"torchs"``: accepted by the schema, refused by every module (as in the peer).
"""

ActivationTypes = Literal["GELU", "TANH", "SIGMOID", "RELU", "LEAKY_RELU", "SOFTPLUS", "ELU", "SILU"]
