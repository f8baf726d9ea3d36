from __future__ import annotations

from pathlib import Path

import pytest

import patternc
from patternc.diagnostics import Diagnostic

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"


def diagnostics_of(source: str) -> list[Diagnostic]:
    """Compile text that must fail; return its diagnostics."""
    with pytest.raises(patternc.PatternError) as info:
        patternc.compile(source, filename="t.pc")
    return list(info.value.diagnostics)


def codes(diags: list[Diagnostic]) -> list[str]:
    return [d.code for d in diags]
