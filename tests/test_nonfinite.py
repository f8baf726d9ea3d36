"""Non-finite values, as docs/runtime.md states them: a NaN stays in the
groups that attend to its group on every backend; ``dense`` also keeps it
from the queries that ``[causal]`` / ``[window N]`` hide it from, and the
docs name every backend that does not."""

from __future__ import annotations

import re
import warnings

import pytest
import torch
from conftest import ROOT

import patternc
from patternc.nn import PatternAttention

BACKENDS = ["dense", "batched", "loop", "auto", "varlen", "flex"]

# (source, sizes, the NaN token, tokens in groups that do not read its group,
#  tokens of groups that read it but that the modifiers hide it from)
CASES = [
    ("groups a\na -> a [causal]", {"a": 9}, 5, [], [0, 1, 2, 3, 4]),
    ("groups a\na -> a [window 2]", {"a": 9}, 4, [], [0, 1, 2, 6, 7, 8]),
    ("groups doc*\ndoc* -> self [causal]", {"doc0": 6, "doc1": 7}, 3, list(range(6, 13)), [0, 1, 2]),
    (
        "groups a b c\na -> a\nb -> a, b[causal]\nc -> a",
        {"a": 3, "b": 6, "c": 4},
        6,
        [0, 1, 2, 9, 10, 11, 12],
        [3, 4, 5],
    ),
]


def _output(backend: str, source: str, sizes: dict[str, int], nan_at: int) -> torch.Tensor:
    torch.manual_seed(0)
    plan = patternc.compile(source).patterns["default"]
    attn = PatternAttention(
        patternc.MixedAttentionConfig(hidden_dim=8, num_heads=2, implementation=backend), plan
    )
    x = torch.randn(2, sum(sizes.values()), 8)
    x[:, nan_at] = float("nan")
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a backend that runs as batched on the CPU says so
        return attn(x, sizes)[0]


def _finite(out: torch.Tensor, tokens: list[int]) -> bool:
    return bool(torch.isfinite(out[:, tokens]).all())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", range(len(CASES)))
def test_a_nan_stays_in_the_groups_that_read_its_group(backend: str, case: int) -> None:
    source, sizes, nan_at, other_groups, hidden = CASES[case]
    out = _output(backend, source, sizes, nan_at)
    assert _finite(out, other_groups)
    assert not _finite(out, [nan_at])
    if backend == "dense":
        assert _finite(out, hidden)


def test_the_docs_name_every_backend_that_carries_a_hidden_nan() -> None:
    """docs/runtime.md's edge case, checked against what each backend does
    here: token-level containment is claimed for `dense` only, and every
    backend that lets a hidden NaN through is named."""
    text = (ROOT / "docs" / "runtime.md").read_text()
    paragraph = text[text.index("**Non-finite values") :].split("\n- **", 1)[0]
    claimed = re.search(r"containment per token is\s+`(\w+)`'s alone", paragraph)
    assert claimed is not None and claimed.group(1) == "dense"
    leaking = [
        backend
        for backend in BACKENDS
        if any(not _finite(_output(backend, s, z, j), hidden) for s, z, j, _, hidden in CASES)
    ]
    assert "dense" not in leaking
    carried = paragraph[claimed.end() :]
    for backend in leaking:
        assert f"`{backend}`" in carried, backend
