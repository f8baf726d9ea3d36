"""The README's main job runs, and its numbers are right."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from conftest import EXAMPLES, ROOT


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


def _load_example(name: str) -> object:
    """The example as a module; its folder is first on ``sys.path`` while it
    loads, as when it runs as a script, so it finds the examples' shared module."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(EXAMPLES))
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(EXAMPLES))
    return module


def test_ab_upt_toy_trains_and_reports_both_models(capsys: object, monkeypatch: object) -> None:
    import pytest

    assert isinstance(monkeypatch, pytest.MonkeyPatch)
    monkeypatch.chdir(ROOT)
    toy = _load_example("ab_upt_toy")
    results = toy.main(["--steps", "30", "--anchors", "4", "--queries", "6", "--dim", "16", "--heads", "2"])  # type: ignore[attr-defined]
    assert set(results) == {"transformer_cp", "transformer_u", "mlp_cp", "mlp_u"}
    assert all(0 < v < 10 for v in results.values())
    out = capsys.readouterr().out  # type: ignore[attr-defined]
    assert "per-point MLP baseline" in out and "test error (relative L2)" in out


def test_ab_upt_toy_field_is_exact() -> None:
    """Anchors carry their measurements, queries none; Cp = 1 - 9/4 sin^2 lies in [-1.25, 1]."""
    import torch

    toy = _load_example("ab_upt_toy")
    inputs, targets, kinds = toy.sample_flow(3, 4, 5, torch.Generator().manual_seed(0))  # type: ignore[attr-defined]
    assert inputs.shape == (3, 18, toy.FEATURES) and targets.shape == (3, 18, 4)  # type: ignore[attr-defined]
    assert kinds.tolist() == [0] * 4 + [1] * 5 + [0] * 4 + [2] * 5
    # queries carry no measurement; anchors carry their target
    assert torch.equal(inputs[:, kinds == 1, 6:], torch.zeros_like(inputs[:, kinds == 1, 6:]))
    assert torch.equal(inputs[:, kinds == 0, 6:], targets[:, kinds == 0])
    assert float(targets[:, :9, 0].min()) >= -1.25 - 1e-6 and float(targets[:, :9, 0].max()) <= 1 + 1e-6


def test_packed_lm_packing_matches_separate_and_generates() -> None:
    import torch

    lm = _load_example("packed_lm")
    threads = torch.get_num_threads()
    results = lm.main(["--steps", "20", "--dim", "32", "--layers", "1", "--threads", "1"])  # type: ignore[attr-defined]
    assert torch.get_num_threads() == threads  # the example's thread count ends with it
    assert abs(results["packed"] - results["separate"]) < 1e-4
    assert 0.0 <= results["generation"] <= 1.0


def _fenced(path: str, language: str = "") -> list[str]:
    """The fenced blocks of a Markdown file that open with ```language."""
    text = (ROOT / path).read_text()
    return re.findall(rf"^```{language}\n(.*?)^```$", text, flags=re.M | re.S)


def test_the_pages_show_the_example_file_as_it_is() -> None:
    """The AB-UPT file on the README and the docs' home page is examples/ab_upt.patc,
    `# noqa` included: pasted into a file, it checks without a warning."""
    import patternc

    example = (ROOT / "examples" / "ab_upt.patc").read_text()
    for page in ("README.md", "docs/index.md"):
        (shown,) = [block for block in _fenced(page) if block.startswith("# examples/ab_upt.patc")]
        assert shown == example, page
        assert patternc.compile(shown).warnings == ()


def test_the_settings_shown_in_the_docs_are_valid(tmp_path: Path) -> None:
    from patternc.project import load_settings

    blocks = [(page, b) for page in ("README.md", "docs/quickstart.md") for b in _fenced(page, "toml")]
    assert len(blocks) == 2
    for page, block in blocks:
        path = tmp_path / "pyproject.toml"
        path.write_text(block)
        settings = load_settings(path)
        assert settings is not None and settings.sizes and settings.block_size == 64, page


def test_the_api_page_lists_every_public_class_and_function() -> None:
    """docs/api.md documents each class and function that patternc, patternc.nn
    and patternc.configs export (type aliases aside)."""
    import importlib
    import inspect

    documented = set()
    for target in re.findall(r"^::: (\S+)$", (ROOT / "docs" / "api.md").read_text(), flags=re.M):
        module, _, name = target.rpartition(".")
        parent = importlib.import_module(module)
        documented.add(
            id(getattr(parent, name) if hasattr(parent, name) else importlib.import_module(target))
        )
    missing = []
    for module_name in ("patternc", "patternc.nn", "patternc.configs"):
        module = importlib.import_module(module_name)
        for name in module.__all__:
            value = getattr(module, name)
            if (inspect.isclass(value) or inspect.isfunction(value)) and id(value) not in documented:
                missing.append(f"{module_name}.{name}")
    assert not missing


def test_per_row_batches_match_rows_alone(capsys: object) -> None:
    example = _load_example("per_row_batches")
    results = example.main([])  # type: ignore[attr-defined]
    assert set(results) == {"packed_lm", "vlm"}
    assert results["packed_lm"] < 1e-9 and results["vlm"] < 1e-12
    out = capsys.readouterr().out  # type: ignore[attr-defined]
    assert "documents per row [3, 1, 5]" in out and "max |batch - row alone|" in out
