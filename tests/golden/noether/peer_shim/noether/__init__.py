"""A stand-in ``noether`` package that is ``patternc.compat.noether`` (a test tool).

Put ``tests/golden/noether/peer_shim`` first on ``sys.path`` (in an
environment *without* the real peer) and code written against the peer,
its own unit tests included, imports patternc's compat modules under the
peer's names: ``noether.A.B`` is ``patternc.compat.noether.A.B``, or, for a
peer file this package keeps in its parent module (``layers.layer_scale``),
that parent. Not part of the installed package.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import types
from collections.abc import Sequence

_PREFIX = "patternc.compat."


class _Alias(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: types.ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if not fullname.startswith("noether."):
            return None
        return importlib.machinery.ModuleSpec(fullname, self, is_package=True)

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType:
        name = _PREFIX + spec.name
        while True:
            try:
                return importlib.import_module(name)
            except ModuleNotFoundError as error:
                if error.name != name or name.count(".") <= _PREFIX.count(".") + 1:
                    raise
                name = name.rsplit(".", 1)[0]

    def exec_module(self, module: types.ModuleType) -> None:
        return None


sys.meta_path.insert(0, _Alias())
from patternc.compat.noether import *  # noqa: E402, F403
