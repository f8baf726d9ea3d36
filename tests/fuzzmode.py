"""Fuzzing profiles. CI runs a fast seeded pass (a few thousand inputs);
``PATTERNC_FUZZ=long`` runs the long mode (about a million inputs in all):

    PATTERNC_FUZZ=long python -m pytest tests/fuzz -q
"""

from __future__ import annotations

import os

LONG = os.environ.get("PATTERNC_FUZZ") == "long"


def examples(ci: int, long: int) -> int:
    """How many inputs a fuzz test draws in this mode."""
    return long if LONG else ci
