"""``torch.compile`` of sharded modules: gloo groups of 2 processes spawned
here (cases in tests/compile_cases.py), each mode compiled with
``fullgraph=True`` and checked against one process in float64, forward and
backward, with Dynamo's graph breaks counted: none for head-parallel mode,
the gather, a two-layer Transformer stack, a ring, a halo and the stack on
a ring, with RoPE and with ALiBi (whose calls that pass keys between ranks are a custom operator; compiled with the
``eager`` backend and, for the ring and the halo, with ``aot_eager``, which
traces the operator's fake shapes and its backward, and the ring with
``inductor``, which checks the real outputs' strides against the fake's)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
from conftest import free_port

sys.path.insert(0, str(Path(__file__).parent))
import compile_cases

TOLERANCE = 1e-10
FULLGRAPH = ["heads", "gather", "stack", "ring", "halo", "stack_ring", "stack_ring_alibi"]
PASSING_KEYS = ["ring", "halo"]


@pytest.fixture(scope="module")
def results(tmp_path_factory: Any) -> dict[str, list[dict[str, Any]]]:
    runs = [(m, "eager", True) for m in FULLGRAPH] + [(m, "aot_eager", True) for m in PASSING_KEYS]
    runs.append(("ring", "inductor", True))
    per_rank = compile_cases.spawn(2, runs, str(tmp_path_factory.mktemp("compile")), free_port())
    by_mode: dict[str, list[dict[str, Any]]] = {}
    for rank_results in per_rank:
        for r in rank_results:
            by_mode.setdefault(f"{r['mode']}/{r['backend']}", []).append(r)
    return by_mode


def _numbers(results: dict[str, list[dict[str, Any]]], mode: str) -> list[dict[str, Any]]:
    found = results.get(mode, [])
    assert len(found) == 2, f"{mode}: results from {len(found)} of 2 ranks"
    for r in found:
        assert "exception" not in r, r.get("exception")
        assert "error" not in r, r["error"]
        for metric in ("out", "grad_x", "grad_params"):
            assert r[metric] <= TOLERANCE, (mode, metric, r[metric])
    return found


@pytest.mark.parametrize(
    "run", [f"{m}/eager" for m in FULLGRAPH] + [f"{m}/aot_eager" for m in PASSING_KEYS] + ["ring/inductor"]
)
def test_fullgraph_compile_equals_one_process(results: dict[str, list[dict[str, Any]]], run: str) -> None:
    for r in _numbers(results, run):
        assert r["fullgraph"] is True
        assert r["breaks"] == 0 and r["graphs"] == 1, r["reasons"]
        assert not r["counted"], r["counted"]
