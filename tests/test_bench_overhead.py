"""``benchmarks/bench_overhead.py``'s second table runs on the executor's
current internals (it fell behind a change of ``_periods``' signature once,
unnoticed, since nothing ran it)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bench_overhead


def test_periodic_views_table_runs(capsys: pytest.CaptureFixture[str]) -> None:
    bench_overhead.periodic_views(repeat=3)
    rows = {
        line.rsplit(maxsplit=2)[0]: line.split()[-2:] for line in capsys.readouterr().out.splitlines()[3:]
    }
    assert set(rows) == {
        "views, no grad (as_strided)",
        "views, grad (chain)",
        "out back, reshape(Size)",
        "out back, reshape(*ints)",
        "out back, as_strided",
        "batched, no grad",
        "batched, grad (forward)",
    }
    assert all(float(median) > 0 and float(low) > 0 for median, low in rows.values())
