"""``benchmarks/bench_users.py`` end to end at tiny sizes on the CPU: the
hand-written layers agree with patternc's on the same weights, and the
table comes out (its numbers mean something on a GPU only)."""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bench_users


def test_tiny_run_on_cpu_prints_the_table(capsys: pytest.CaptureFixture[str]) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bench_users.main(["--device", "cpu", "--tiny", "--repeat", "1", "--rows", "vlm", "docs16"])
    out = capsys.readouterr().out
    assert "failed" not in out
    assert "| VLM 1 registers + 64 image + 192 text | fwd |" in out
    assert "| 16 causal documents (1.2k) | fwd |" in out
    assert "Cold start (s)" in out
    error = float(out.rsplit("input gradients): ", 1)[1].split()[0])
    assert error < 1e-4  # float32 on CPU: the layers compute the same function


def test_hand_masks_match_patternc_tables() -> None:
    """Each row's hand-written ``mask_mod`` allows exactly what patternc's
    plan allows (on the padded length patternc uses)."""
    import torch

    import patternc
    from patternc.nn.flexmask import FlexTables

    for row in bench_users.rows(tiny=True).values():
        layout = patternc.compile(row.source).patterns["default"].layout(row.sizes)
        tables = FlexTables.build(layout, {}, "cpu")
        n = row.n_tokens
        q_idx, kv_idx = torch.arange(n)[:, None], torch.arange(n)[None, :]
        zero = torch.zeros((), dtype=torch.int64)
        hand = row.mask(torch.device("cpu"), tables.q_len)(zero, zero, q_idx, kv_idx)
        ours = tables.mask_mod()(zero, zero, q_idx, kv_idx)
        assert torch.equal(hand.expand_as(ours), ours), row.key
