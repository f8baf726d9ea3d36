"""The README's main job runs, and its numbers are right."""

from __future__ import annotations

import re
import subprocess
import sys

from conftest import ROOT


def test_run_ab_upt_example() -> None:
    result = subprocess.run(
        [sys.executable, "examples/run_ab_upt.py", "--anchors", "9", "--queries", "31", "--dim", "24"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "pattern joint: 1 rule(s) -> 1 attention call(s)" in out
    errors = [float(m) for m in re.findall(r"^\S+\s+(?:dense|loop|batched)\s+(\S+)", out, flags=re.M)]
    assert len(errors) == 9
    assert max(errors) < 1e-5
    diff = re.search(r"max \|difference\| = (\S+)", out)
    assert diff is not None and float(diff.group(1)) < 1e-5
