"""The floors of the package hold: no import cycles, lowering below the plan,
the compiler torch-free. Imports are read from the source with ``ast`` (every
``import``, at module level or inside a function), so a lazy import counts."""

from __future__ import annotations

import ast
from pathlib import Path

import networkx

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "patternc"


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, modules: set[str]) -> set[str]:
    """The patternc modules a file imports: ``from a.b import c`` counts
    ``a.b.c`` when that is a module (a package handing on a submodule is not
    an edge of its own), else ``a.b``."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            submodules = {f"{node.module}.{alias.name}" for alias in node.names} & modules
            found.update(submodules or {node.module})
    return {name for name in found if name.startswith("patternc.")}


def _graph(top: str) -> networkx.DiGraph[str]:
    """Import graph of patternc's modules, each folder below ``patternc``
    one node when ``top`` is "folders" (as the floors are drawn), else files."""
    files = {_module_name(p): p for p in PACKAGE.rglob("*.py")}

    def node(module: str) -> str:
        parts = module.split(".")
        if top == "folders" and len(parts) > 2 and (PACKAGE / parts[1]).is_dir():
            return ".".join(parts[:2])
        return module

    graph: networkx.DiGraph[str] = networkx.DiGraph()
    for module, path in files.items():
        graph.add_node(node(module))
        for target in _imports(path, set(files)):
            while target not in files and "." in target:
                target = target.rsplit(".", 1)[0]
            if target in files and node(target) != node(module):
                graph.add_edge(node(module), node(target))
    return graph


def test_no_import_cycles_between_modules_or_folders() -> None:
    for level in ("files", "folders"):
        cycles = list(networkx.simple_cycles(_graph(level)))
        assert not cycles, f"import cycles ({level}): {cycles[:3]}"


def test_lowering_sits_below_the_plan_and_the_runtime() -> None:
    graph = _graph("folders")
    below = networkx.descendants(graph, "patternc.lower")
    assert not below & {"patternc.plan", "patternc.nn", "patternc.export", "patternc.distributed"}, below


def test_the_runtime_never_imports_the_exports() -> None:
    graph = _graph("folders")
    for runtime in ("patternc.nn", "patternc.distributed"):
        assert "patternc.export" not in networkx.descendants(graph, runtime), runtime


def test_the_compiler_floors_do_not_import_torch() -> None:
    """The modules ``patternc check`` and ``compile`` load, and ``lower/``,
    import torch nowhere at module level (``Layout.dense_mask`` imports it
    when called)."""
    torch_free = [
        *(PACKAGE / name for name in ("syntax.py", "resolve.py", "checks.py", "compiler.py", "plan.py")),
        *(PACKAGE / "lower").glob("*.py"),
    ]
    for path in torch_free:
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in tree.body:
            names = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else [node.module or ""]
                if isinstance(node, ast.ImportFrom)
                else []
            )
            assert not any(n == "torch" or n.startswith("torch.") for n in names), path
