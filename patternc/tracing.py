"""Whether code runs inside a ``torch.compile`` trace: the one place that asks.

Host code that caches or probes must behave differently while Dynamo traces
it (a trace may read a cache but must not fill one, and a probe of the
installation must become a constant of the graph). Every module asks here,
so the question has one answer and one workaround site. Torch is never
imported by this module: the compiler runs without it, and a trace can only
be running once some other module has imported torch.
"""

from __future__ import annotations

import sys

__all__ = ["compiling"]


def compiling() -> bool:
    """True inside a ``torch.compile`` trace (False when torch is not imported)."""
    torch = sys.modules.get("torch")
    return torch is not None and bool(torch.compiler.is_compiling())
