"""A project's pattern files and its ``[tool.patternc]`` settings (no torch).

Pattern files end in ``.patc``; ``.pc`` is read too, except in a directory
walk, where a ``.pc`` file that reads like a pkg-config file (``Name:``,
``Libs:``, ``prefix=...`` lines) is passed over. Settings come from the
``[tool.patternc]`` table of the nearest ``pyproject.toml`` above a file::

    [tool.patternc]
    select = ["W"]          # codes or prefixes of warnings to report (default: all)
    ignore = ["W1"]         # codes or prefixes of warnings never reported
    block-size = 64         # default of `compile --block`
    exclude = ["generated"] # paths (globs) a directory walk passes over

    [tool.patternc.sizes]   # default of `compile`/`bench --sizes`
    surface_anchors = 1024
    surface_queries = 4096

Errors are always reported (a file with an error has no plan), so only
warnings can be ignored. Python 3.11+ reads TOML with ``tomllib``; 3.10 needs
the ``tomli`` package (a dependency of patternc there) and otherwise reads no
settings, saying so.
"""

from __future__ import annotations

import fnmatch
import importlib
import json
import os
import re
import sys
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

from patternc.diagnostics import MEANINGS, Code, Diagnostic, suggest
from patternc.members import is_family, member_of

__all__ = [
    "PATTERN_SUFFIX",
    "PATTERN_SUFFIXES",
    "Settings",
    "SettingsError",
    "find_settings",
    "load_settings",
    "parse_codes",
    "pattern_files",
    "read_toml",
]

PATTERN_SUFFIX = ".patc"
"""The extension of pattern files."""
PATTERN_SUFFIXES = (PATTERN_SUFFIX, ".pc")
"""Extensions read as pattern files (``.pc`` also names pkg-config files: see :func:`pattern_files`)."""

SKIPPED_DIRECTORIES = frozenset(
    {"__pycache__", "node_modules", "site-packages", "venv", "build", "dist", "_build", "buck-out"}
)
"""Directories a walk never enters (besides hidden ones, such as ``.git`` and ``.venv``)."""

_KEYS = ("select", "ignore", "block-size", "exclude", "sizes")
_PKG_CONFIG_LINE = re.compile(
    r"^\s*(?:(?:Name|Description|Version|URL|Libs|Cflags|Requires|Conflicts|Provides)(?:\.private)?\s*:"
    r"|[A-Za-z_][A-Za-z0-9_.]*\s*=)",
    re.M,
)


class SettingsError(ValueError):
    """A ``[tool.patternc]`` table that cannot be used; the message names the file and the key."""


@dataclass(frozen=True)
class Settings:
    """What ``[tool.patternc]`` says (defaults where it says nothing)."""

    select: tuple[str, ...] = ()
    """Codes or code prefixes to report (empty: every code)."""
    ignore: tuple[str, ...] = ()
    """Warning codes or prefixes never reported."""
    block_size: int | None = None
    """Default block size of ``compile --block`` and ``--mask`` (None: 128)."""
    exclude: tuple[str, ...] = ()
    """Globs of paths (relative to the settings' folder) or names that a directory walk passes over."""
    sizes: Mapping[str, int | None] = field(default_factory=dict)
    """Default group sizes (None: a KV-cached group)."""
    path: Path | None = None
    """The ``pyproject.toml`` these came from (None: built-in defaults)."""
    note: str | None = None
    """Why settings that exist were not read (Python 3.10 without ``tomli``)."""

    def reports(self, code: str) -> bool:
        """Whether a diagnostic with ``code`` is shown. Errors always are; for a
        warning the longest matching prefix of ``select`` and ``ignore`` decides
        (``ignore`` on a tie), so ``select = ["W"]`` with ``ignore = ["W1"]``
        and ``select = [W101]`` with ``ignore = [W]`` both do what they say."""
        if not code.startswith("W"):
            return True
        chosen = max((len(p) for p in self.select if code.startswith(p)), default=-1 if self.select else 0)
        dropped = max((len(p) for p in self.ignore if code.startswith(p)), default=-1)
        return chosen >= 0 and chosen > dropped

    def filter(self, diagnostics: Iterable[Diagnostic]) -> list[Diagnostic]:
        """The diagnostics that :meth:`reports` keeps."""
        return [d for d in diagnostics if self.reports(d.code)]

    def sizes_for(self, groups: Sequence[str]) -> dict[str, int | None] | None:
        """The default sizes that fit a program with these declared ``groups``
        (families have a ``*``): the entries naming its groups or members of its
        families, when every plain group has one; else None."""
        families = [g for g in groups if is_family(g)]
        plain = [g for g in groups if not is_family(g)]
        if not self.sizes or any(g not in self.sizes for g in plain):
            return None
        return {
            name: size
            for name, size in self.sizes.items()
            if name in plain or (families and member_of(name, families) is not None)
        }


def _toml_module() -> ModuleType | None:
    if sys.version_info >= (3, 11):
        import tomllib

        return tomllib
    try:  # a dependency on 3.10, unless installed without dependencies
        return importlib.import_module("tomli")
    except ImportError:
        return None


def read_toml(path: Path) -> dict[str, Any] | None:
    """The TOML document at ``path``; None when no TOML reader is installed.

    Raises:
        SettingsError: the file is not valid TOML or cannot be read.
    """
    module = _toml_module()
    if module is None:
        return None
    try:
        with path.open("rb") as stream:
            document: dict[str, Any] = module.load(stream)
    except OSError as error:
        raise SettingsError(f"{path}: cannot read it: {error.strerror or error}") from None
    except ValueError as error:  # tomllib.TOMLDecodeError
        raise SettingsError(f"{path}: not valid TOML: {error}") from None
    return document


def parse_codes(where: str, value: object, *, warnings_only: bool) -> tuple[str, ...]:
    """Diagnostic codes or prefixes (a code such as W101, or W1, or W), upper-cased.

    Raises:
        SettingsError: ``value`` is not a list of strings, an entry is no code
            or prefix of one (with "did you mean"), or ``warnings_only`` and an
            entry names errors; the message starts with ``where``.
    """
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        example = json.dumps([Code.NEVER_A_KEY])
        raise SettingsError(f"{where} must be a list of codes, e.g. {example}, got {value!r}")
    out = []
    for raw in value:
        code = raw.strip().upper()
        if not code or not any(c.startswith(code) for c in MEANINGS):
            hint = suggest(code, MEANINGS)
            raise SettingsError(
                f"{where}: `{raw}` is no diagnostic code or prefix of one"
                + (f"; {hint}" if hint else f" (codes: {min(MEANINGS)}-{max(MEANINGS)})")
            )
        if warnings_only and not any(c.startswith(code) and c.startswith("W") for c in MEANINGS):
            raise SettingsError(
                f"{where}: `{raw}` names errors, which cannot be ignored (a file with an error has no "
                "plan); ignore warnings (W codes) only"
            )
        out.append(code)
    return tuple(out)


def _sizes(path: Path, value: object) -> dict[str, int | None]:
    where = f"{path}: [tool.patternc.sizes]"
    if not isinstance(value, dict):
        raise SettingsError(f"{where} must be a table of group = size, got {value!r}")
    out: dict[str, int | None] = {}
    for name, size in value.items():
        if isinstance(size, str) and size.strip().lower() in ("cache", "none"):
            out[name] = None
        elif isinstance(size, int) and not isinstance(size, bool) and size >= 0:
            out[name] = size
        else:
            raise SettingsError(
                f'{where}: the size of `{name}` must be an integer >= 0 or "cache", got {size!r}'
            )
    return out


def load_settings(path: Path) -> Settings | None:
    """The ``[tool.patternc]`` settings of the ``pyproject.toml`` at ``path``;
    None when it has no such table.

    Raises:
        SettingsError: a key that is not a setting (with "did you mean"), a
            value of the wrong type, or a code that names no diagnostic.
    """
    document = read_toml(path)
    if document is None:
        if "[tool.patternc" not in path.read_text(encoding="utf-8", errors="replace"):
            return None
        return Settings(
            path=path,
            note=f"{path}: [tool.patternc] not read: Python {sys.version_info[0]}.{sys.version_info[1]} "
            "reads TOML with the tomli package (pip install tomli)",
        )
    table = document.get("tool", {}).get("patternc")
    if table is None:
        return None
    if not isinstance(table, dict):
        raise SettingsError(f"{path}: [tool.patternc] must be a table")
    for key in table:
        if key not in _KEYS:
            hint = suggest(key.replace("_", "-"), _KEYS)
            raise SettingsError(
                f"{path}: [tool.patternc] has no setting `{key}`; "
                + (hint or "settings: " + ", ".join(_KEYS))
            )
    block = table.get("block-size")
    if block is not None and (not isinstance(block, int) or isinstance(block, bool) or block <= 0):
        raise SettingsError(f"{path}: [tool.patternc] block-size must be a positive integer, got {block!r}")
    exclude = table.get("exclude", [])
    if not isinstance(exclude, list) or not all(isinstance(e, str) for e in exclude):
        raise SettingsError(f"{path}: [tool.patternc] exclude must be a list of paths or globs")
    return Settings(
        select=parse_codes(f"{path}: [tool.patternc] select", table.get("select", []), warnings_only=False),
        ignore=parse_codes(f"{path}: [tool.patternc] ignore", table.get("ignore", []), warnings_only=True),
        block_size=block,
        exclude=tuple(exclude),
        sizes=_sizes(path, table.get("sizes", {})),
        path=path,
    )


def find_settings(start: Path | str | None = None) -> Settings:
    """The settings of the nearest ``pyproject.toml`` with a ``[tool.patternc]``
    table in ``start`` (a file's folder, or the folder itself) or a folder above
    it; the defaults when there is none. ``start`` None: the working directory.

    Raises:
        SettingsError: the table that was found cannot be used.
    """
    here = Path(start if start is not None else os.getcwd()).resolve()
    if not here.is_dir():
        here = here.parent
    for folder in (here, *here.parents):
        candidate = folder / "pyproject.toml"
        if candidate.is_file():
            found = load_settings(candidate)
            if found is not None:
                return found
    return Settings()


def _is_pkg_config(path: Path) -> bool:
    try:
        head = path.read_text(encoding="utf-8", errors="replace")[:8192]
    except OSError:
        return False
    return _PKG_CONFIG_LINE.search(head) is not None


def _excluded(path: Path, settings: Settings) -> bool:
    if not settings.exclude:
        return False
    base = settings.path.parent if settings.path is not None else Path.cwd()
    try:
        relative = path.resolve().relative_to(base.resolve()).as_posix()
    except ValueError:
        relative = path.as_posix()
    return any(
        fnmatch.fnmatchcase(relative, glob.rstrip("/"))
        or fnmatch.fnmatchcase(path.name, glob)
        or relative.startswith(glob.rstrip("/") + "/")
        for glob in settings.exclude
    )


def _walk(folder: Path, settings: Settings) -> Iterator[Path]:
    entries = sorted(folder.iterdir(), key=lambda p: p.name)
    for entry in entries:
        if _excluded(entry, settings):
            continue
        if entry.is_dir():
            if not entry.name.startswith(".") and entry.name not in SKIPPED_DIRECTORIES:
                yield from _walk(entry, settings)
        elif entry.suffix == PATTERN_SUFFIX or (entry.suffix == ".pc" and not _is_pkg_config(entry)):
            yield entry


def pattern_files(paths: Iterable[str], settings: Settings | None = None) -> list[str]:
    """The files to read for ``paths``: a file as given (whatever its
    extension), a directory as the pattern files under it, in name order.

    A walk passes over hidden directories, :data:`SKIPPED_DIRECTORIES`, the
    ``exclude`` globs of ``settings``, and ``.pc`` files that read like
    pkg-config files. ``-`` (standard input) stays as it is; a path that does
    not exist stays too, so that reading it reports why.
    """
    settings = settings or Settings()
    out: list[str] = []
    for name in paths:
        path = Path(name)
        if name != "-" and path.is_dir():
            out.extend(str(p) for p in _walk(path, settings))
        else:
            out.append(name)
    return list(dict.fromkeys(out))
