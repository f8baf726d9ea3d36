"""The ``patternc`` command line: ``check`` and ``compile`` pattern files.

Exit status: 0 ok, 1 the file has problems (diagnostics on stderr), 2 bad
usage (unknown option, pattern or group in ``--sizes``). Never imports torch.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from patternc import __version__
from patternc.compiler import compile as compile_program
from patternc.diagnostics import PatternError, suggest
from patternc.plan import Program

__all__ = ["main"]

EXIT_OK, EXIT_DIAGNOSTICS, EXIT_USAGE = 0, 1, 2

_EXAMPLES = """\
examples:
  patternc check examples/ab_upt.pc
  patternc compile examples/ab_upt.pc --sizes surface_anchors=1024,surface_queries=4096,\\
volume_anchors=1024,volume_queries=4096
  patternc compile examples/ab_upt.pc --pattern joint --format json
  patternc compile examples/ab_upt.pc --format dot | dot -Tsvg > plan.svg
"""


class _UsageError(Exception):
    pass


def _parse_sizes(specs: Sequence[str]) -> dict[str, int | None]:
    """``a=1024,b=4096,c=cache`` (``cache``/``none``: keys/values from a KV cache)."""
    sizes: dict[str, int | None] = {}
    for spec in specs:
        for item in filter(None, (part.strip() for part in spec.split(","))):
            name, sep, value = item.partition("=")
            if not sep or not name.strip():
                raise _UsageError(f"--sizes: expected NAME=SIZE, got `{item}`")
            value = value.strip().lower()
            if value in ("cache", "none"):
                sizes[name.strip()] = None
                continue
            try:
                size = int(value.replace("_", ""))
            except ValueError:
                raise _UsageError(
                    f"--sizes: size of `{name}` must be an integer or `cache`, got `{value}`"
                ) from None
            if size < 0:
                raise _UsageError(f"--sizes: size of `{name}` must be >= 0, got {size}")
            sizes[name.strip()] = size
    return sizes


def _check_sizes(program: Program, sizes: dict[str, int | None]) -> None:
    problems = []
    for name in sizes:
        if name not in program.groups:
            hint = suggest(name, program.groups)
            problems.append(f"--sizes: unknown group `{name}`" + (f"; {hint}" if hint else ""))
    missing = [g for g in program.groups if g not in sizes]
    if missing:
        problems.append("--sizes: no size for " + ", ".join(f"`{g}`" for g in missing))
    if problems:
        raise _UsageError("\n".join(problems))


def _check_patterns(program: Program, names: Sequence[str]) -> None:
    for name in names:
        if name not in program.patterns:
            hint = suggest(name, program.patterns) or "patterns: " + ", ".join(program.patterns)
            raise _UsageError(f"--pattern: no pattern `{name}` in {program.filename}; {hint}")


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="patternc",
        description="Check and compile attention-pattern files.",
        epilog=_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"patternc {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    check = sub.add_parser(
        "check",
        help="report every problem in pattern files",
        epilog=_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    check.add_argument("files", nargs="+", metavar="FILE", help="pattern files (.pc)")

    comp = sub.add_parser(
        "compile",
        help="print the plan of a pattern file",
        epilog=_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    comp.add_argument("file", metavar="FILE", help="pattern file (.pc)")
    comp.add_argument(
        "--pattern",
        action="append",
        default=[],
        metavar="NAME",
        help="only this pattern (repeatable; default: all)",
    )
    comp.add_argument(
        "--sizes",
        action="append",
        default=[],
        metavar="G=N,...",
        help="group sizes, e.g. surface_anchors=1024,...; `cache` for KV-cached groups",
    )
    comp.add_argument("--format", choices=("text", "json", "dot"), default="text", help="output format")
    comp.add_argument("--dim", type=int, default=192, help="model width for FLOP counts (default 192)")
    return parser


def _run_check(files: Sequence[str]) -> int:
    status = EXIT_OK
    for name in files:
        try:
            program = compile_program(Path(name))
        except PatternError as error:
            print(error, file=sys.stderr)
            status = EXIT_DIAGNOSTICS
            continue
        print(f"{name}: ok ({len(program.groups)} groups, {len(program.patterns)} pattern(s))")
    return status


def _run_compile(args: argparse.Namespace) -> int:
    try:
        program = compile_program(Path(args.file))
    except PatternError as error:
        print(error, file=sys.stderr)
        return EXIT_DIAGNOSTICS
    _check_patterns(program, args.pattern)
    sizes = _parse_sizes(args.sizes) if args.sizes else None
    if sizes is not None:
        _check_sizes(program, sizes)
    if args.dim <= 0:
        raise _UsageError(f"--dim must be positive, got {args.dim}")
    if args.format == "json":
        sys.stdout.write(program.to_json(sizes, dim=args.dim, patterns=args.pattern))
    elif args.format == "dot":
        sys.stdout.write(program.to_dot(args.pattern))
    else:
        from patternc.report import format_program

        sys.stdout.write(format_program(program, sizes=sizes, patterns=args.pattern, dim=args.dim))
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    parser = _build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "check":
            return _run_check(args.files)
        return _run_compile(args)
    except _UsageError as error:
        print(f"patternc: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    except BrokenPipeError:  # `patternc compile ... | head`
        sys.stderr.close()
        return EXIT_OK
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())


def main_entry() -> None:
    """Console-script entry point."""
    sys.exit(main())
