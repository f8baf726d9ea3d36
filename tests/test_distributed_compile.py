"""``torch.compile`` of sharded modules: gloo groups of 2 processes spawned
here (cases in tests/compile_cases.py), each mode compiled with the
``eager`` backend and checked against one process in float64, forward and
backward, with Dynamo's graph breaks counted: none for head-parallel mode,
the gather and a two-layer Transformer stack (compiled with
``fullgraph=True``), and for a ring or halo only the one call that passes
keys between ranks."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
from conftest import free_port

sys.path.insert(0, str(Path(__file__).parent))
import compile_cases

TOLERANCE = 1e-10
FULLGRAPH = ["heads", "gather", "stack"]
PASSING_KEYS = ["ring", "halo"]
DISABLED = "torch.compiler.disable"


@pytest.fixture(scope="module")
def results(tmp_path_factory: Any) -> dict[str, list[dict[str, Any]]]:
    runs = [(m, "eager", True) for m in FULLGRAPH] + [(m, "eager", False) for m in PASSING_KEYS]
    per_rank = compile_cases.spawn(2, runs, str(tmp_path_factory.mktemp("compile")), free_port())
    by_mode: dict[str, list[dict[str, Any]]] = {}
    for rank_results in per_rank:
        for r in rank_results:
            by_mode.setdefault(r["mode"], []).append(r)
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


@pytest.mark.parametrize("mode", FULLGRAPH)
def test_fullgraph_compile_equals_one_process(results: dict[str, list[dict[str, Any]]], mode: str) -> None:
    for r in _numbers(results, mode):
        assert r["fullgraph"] is True
        assert r["breaks"] == 0 and r["graphs"] == 1, r["reasons"]
        assert not r["counted"], r["counted"]


@pytest.mark.parametrize("mode", PASSING_KEYS)
def test_ring_and_halo_break_only_where_keys_pass(
    results: dict[str, list[dict[str, Any]]], mode: str
) -> None:
    for r in _numbers(results, mode):
        # the disabled call breaks once in each of the four frames from the
        # layer's forward down to it, leaving five graphs
        assert r["breaks"] == 4 and r["graphs"] == 5, (r["breaks"], r["graphs"], r["reasons"])
        assert r["reasons"], "Dynamo gave no reason for the breaks"
        for reason in r["reasons"]:
            assert DISABLED in reason["reason"] and reason["where"].startswith(
                "patternc/distributed/calls.py"
            )
        assert all(DISABLED in reason for reason in r["counted"]), r["counted"]
