"""Run the peer's own unit tests against ``patternc.compat.noether``.

    PYTHONPATH=. python tests/golden/noether/run_peer_tests.py PEER_TESTS_DIR [pytest args]

``PEER_TESTS_DIR`` holds test files of the peer repository (not part of
patternc). The peer itself must not be importable: ``peer_shim`` puts
patternc's compat package under the name ``noether``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

SHIM = Path(__file__).resolve().parent / "peer_shim"

if __name__ == "__main__":
    sys.path.insert(0, str(SHIM))
    import noether  # the shim

    assert Path(noether.__file__).parent.parent == SHIM, f"the real peer is importable: {noether.__file__}"
    sys.exit(pytest.main(["-p", "no:cacheprovider", *sys.argv[1:]]))
