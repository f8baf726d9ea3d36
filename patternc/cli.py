"""The ``patternc`` command line: ``check``, ``compile``, ``fmt`` and ``bench`` pattern files.

Pattern files end in ``.patc`` (``.pc`` works too); ``check`` and ``fmt``
take files and folders, walked for pattern files. Settings come from
``[tool.patternc]`` in the nearest ``pyproject.toml`` (:mod:`patternc.project`).

Exit status: 0 ok (warnings alone do not fail unless
``--warnings-as-errors``), 1 the file has problems (diagnostics on stderr,
or as JSON with ``--output-format json``) or ``fmt --check``/``--diff`` would
change it, 2 bad usage (unknown option, pattern or group in ``--sizes``, a
``[tool.patternc]`` table that cannot be used). ``check``, ``compile`` and
``fmt`` never import torch; ``bench`` does.
"""

from __future__ import annotations

import argparse
import difflib
import json
import sys
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from patternc import __version__
from patternc.compiler import compile as compile_program
from patternc.compiler import read_source
from patternc.diagnostics import Diagnostic, PatternError, diagnostics_json, render, suggest
from patternc.members import family_root, is_family, member_hint, member_of
from patternc.plan import Program
from patternc.project import (
    PATTERN_SUFFIXES,
    Settings,
    SettingsError,
    find_settings,
    parse_codes,
    pattern_files,
)

__all__ = ["main"]

EXIT_OK, EXIT_DIAGNOSTICS, EXIT_USAGE = 0, 1, 2

_CHECK_EXAMPLES = """\
examples:
  patternc check .                                     # every .patc file under here
  patternc check model.patc --output-format json       # for editors and CI
  patternc check model.patc --warnings-as-errors --ignore W103

settings: [tool.patternc] in the nearest pyproject.toml (select, ignore,
block-size, exclude, sizes); --select and --ignore replace its lists.
"""

_FMT_EXAMPLES = """\
examples:
  patternc fmt .                        # rewrite every pattern file under here in place
  patternc fmt --check examples         # exit 1 if any file would change
  patternc fmt --diff model.patc        # show the changes, write nothing
  patternc fmt - < model.patc           # stdin to stdout
"""

_EXAMPLES = """\
examples:
  patternc check examples/ab_upt.patc
  patternc compile examples/ab_upt.patc --sizes surface_anchors=1024,surface_queries=4096,\\
volume_anchors=1024,volume_queries=4096
  patternc compile examples/ab_upt.patc --pattern joint --format json
  patternc compile examples/ab_upt.patc --format dot | dot -Tsvg > plan.svg   # dot: Graphviz
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
    families = [g for g in program.groups if is_family(g)]
    for name in sizes:
        if name not in program.groups and member_of(name, families) is None:
            hint = member_hint(name, families) or suggest(name, program.groups)
            problems.append(f"--sizes: unknown group `{name}`" + (f"; {hint}" if hint else ""))
    missing = [g for g in program.groups if not is_family(g) and g not in sizes]
    if missing:
        problems.append("--sizes: no size for " + ", ".join(f"`{g}`" for g in missing))
    if problems:
        raise _UsageError("\n".join(problems))


def _declared_order(program: Program, sizes: dict[str, int | None]) -> dict[str, int | None]:
    """``--sizes`` in the program's group order (a family's members where the
    family is declared, in the order given): a plan lays sizes out in its
    own order, and here no input tensor fixes another one."""
    rank: dict[str, int] = {}
    for i, group in enumerate(program.groups):
        rank.setdefault(family_root(group), i)
    families = [g for g in program.groups if is_family(g)]

    def place(name: str) -> int:
        if name in rank:
            return rank[name]
        family = member_of(name, families)
        return rank[family_root(family)] if family is not None else len(rank)

    return dict(sorted(sizes.items(), key=lambda item: place(item[0])))


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

    diagnostics = argparse.ArgumentParser(add_help=False)
    diagnostics.add_argument(
        "--output-format",
        choices=("text", "json"),
        default="text",
        help="diagnostics as text (stderr) or JSON (check: stdout; compile: stderr)",
    )
    diagnostics.add_argument(
        "--warnings-as-errors", action="store_true", help="exit 1 when there are warnings"
    )
    diagnostics.add_argument(
        "--select",
        metavar="CODES",
        help="report only these warnings (codes or prefixes, comma-separated: W101,W102 or W); "
        "errors are always reported",
    )
    diagnostics.add_argument(
        "--ignore", metavar="CODES", help="never report these warnings (codes or prefixes, comma-separated)"
    )

    check = sub.add_parser(
        "check",
        help="report every problem in pattern files",
        epilog=_CHECK_EXAMPLES,
        parents=[diagnostics],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    check.add_argument(
        "files", nargs="+", metavar="PATH", help="pattern files, or folders to search for .patc and .pc files"
    )

    fmt = sub.add_parser(
        "fmt",
        help="rewrite pattern files in the canonical layout",
        epilog=_FMT_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    fmt.add_argument(
        "files", nargs="+", metavar="PATH", help="pattern files or folders (searched), or - for stdin"
    )
    fmt.add_argument("--check", action="store_true", help="change nothing; exit 1 if a file would change")
    fmt.add_argument(
        "--diff",
        action="store_true",
        help="print the changes as a unified diff, write nothing; exit 1 if any",
    )

    comp = sub.add_parser(
        "compile",
        help="print the plan of a pattern file",
        epilog=_EXAMPLES,
        parents=[diagnostics],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    comp.add_argument("file", metavar="FILE", help="pattern file (.patc)")
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
        help="group sizes, e.g. surface_anchors=1024,...; `cache` for KV-cached groups "
        "(default: [tool.patternc.sizes] when it covers the file's groups)",
    )
    comp.add_argument(
        "--format",
        choices=("text", "json", "dot", *ENGINE_FORMATS),
        default="text",
        help="output format: the plan (text, json, dot: Graphviz source, e.g. | dot -Tsvg), or another "
        "engine's mask as JSON (magi, flashmask, varlen, xformers, flex; need --sizes)",
    )
    comp.add_argument("--dim", type=int, default=192, help="model width for FLOP counts (default 192)")
    comp.add_argument(
        "--world-size",
        type=int,
        metavar="R",
        help="also show how patternc.distributed shards each plan over R ranks (needs --sizes)",
    )
    comp.add_argument(
        "--mask", metavar="PATH", help="draw the block mask (needs --sizes): a .png file, or - for text"
    )
    comp.add_argument(
        "--block",
        "--block-size",
        dest="block",
        type=int,
        default=None,
        metavar="N",
        help="block size of --mask and the block-sparsity line (default: block-size of [tool.patternc], "
        "else 128; 1 draws every token pair)",
    )

    sub.add_parser(
        "lsp",
        help="run the language server on stdin/stdout (for editors; needs the [lsp] extra)",
        description="Language server for pattern files: diagnostics as you type, quick fixes, "
        "formatting, completion, hover, go to declaration. Editors start it; see editors/vscode/.",
    )

    bench = sub.add_parser(
        "bench",
        help="time a pattern file's plan on every backend (imports torch)",
        epilog="example:\n  patternc bench examples/ab_upt.patc --pattern self_anchor --sizes \\\n"
        "    surface_anchors=1024,surface_queries=4096,volume_anchors=1024,volume_queries=4096\n\n"
        "`--backend linear` adds linear attention, listed apart: it computes another function.\n",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    bench.add_argument("file", metavar="FILE", help="pattern file (.patc)")
    bench.add_argument(
        "--sizes",
        action="append",
        default=[],
        metavar="G=N,...",
        help="group sizes (default: [tool.patternc.sizes] when it covers the file's groups)",
    )
    bench.add_argument(
        "--pattern", action="append", default=[], metavar="NAME", help="only this pattern (repeatable)"
    )
    bench.add_argument(
        "--backend",
        action="append",
        default=[],
        choices=(*BACKENDS, *OTHER_FUNCTIONS),
        help="backends to run (default: every softmax backend; `linear` on request)",
    )
    bench.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ... (default cpu)")
    bench.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    bench.add_argument("--repeat", type=int, default=10, help="timed runs per backend (median)")
    bench.add_argument("--dim", type=int, default=192, help="model width (default 192)")
    bench.add_argument("--heads", type=int, default=3, help="attention heads (default 3)")
    bench.add_argument("--batch", type=int, default=1)
    bench.add_argument("--backward", action="store_true", help="time forward+backward")
    return parser


BACKENDS = ("dense", "loop", "batched", "flex", "varlen", "auto")
"""Backends that compute softmax attention: the same function, ranked against ``dense``."""
OTHER_FUNCTIONS = ("linear",)
"""Backends that compute another function: run only on request, listed apart and not ranked."""


class _Settings:
    """``[tool.patternc]`` of each file's folder (found once per folder), with
    ``--select``/``--ignore`` in place of the table's lists."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.select = self._option(args, "select")
        self.ignore = self._option(args, "ignore")
        self.found: dict[Path, Settings] = {}

    @staticmethod
    def _option(args: argparse.Namespace, name: str) -> tuple[str, ...] | None:
        value = getattr(args, name, None)
        if value is None:
            return None
        items = [c for c in (part.strip() for part in value.split(",")) if c]
        try:
            return parse_codes(f"--{name}", items, warnings_only=name == "ignore")
        except SettingsError as error:
            raise _UsageError(str(error)) from None

    def at(self, folder: Path) -> Settings:
        """The settings of files in ``folder`` (resolved)."""
        if folder not in self.found:
            try:
                settings = find_settings(folder)
            except SettingsError as error:
                raise _UsageError(str(error)) from None
            if settings.note:
                print(f"patternc: {settings.note}", file=sys.stderr)
            if self.select is not None:
                settings = replace(settings, select=self.select)
            if self.ignore is not None:
                settings = replace(settings, ignore=self.ignore)
            self.found[folder] = settings
        return self.found[folder]

    def of(self, file: str) -> Settings:
        """The settings of ``file`` (``-``: the working directory's)."""
        return self.at(Path.cwd().resolve() if file == "-" else Path(file).resolve().parent)

    def files(self, paths: Sequence[str]) -> list[str]:
        """``paths`` with every folder replaced by the pattern files under it."""
        out: list[str] = []
        for path in paths:
            if path == "-" or not Path(path).is_dir():
                out.append(path)
                continue
            found = pattern_files([path], self.at(Path(path).resolve()))
            if not found:
                suffixes = " or ".join(PATTERN_SUFFIXES)
                print(f"patternc: no pattern files ({suffixes}) in {path}", file=sys.stderr)
            out.extend(found)
        return list(dict.fromkeys(out))


class _Reporter:
    """Prints diagnostics as text (stderr, as they come) or collects them for
    one JSON list (``--output-format json``)."""

    def __init__(self, args: argparse.Namespace, json_stream: object = None) -> None:
        self.json = getattr(args, "output_format", "text") == "json"
        self.strict = getattr(args, "warnings_as_errors", False)
        self.stream = json_stream or sys.stderr
        self.collected: list[dict[str, object]] = []
        self.settings = _Settings(args)

    def load(self, file: str) -> tuple[Program | None, list[Diagnostic]]:
        """Compile a pattern file and report its diagnostics (those its
        settings select); the program (None when it has errors, or warnings
        under ``--warnings-as-errors``) and the warnings reported."""
        settings = self.settings.of(file)
        try:
            program = compile_program(Path(file))
        except PatternError as error:
            self.report(settings.filter(error.diagnostics), file, error.source)
            return None, []
        warnings = settings.filter(program.warnings)
        if warnings:
            self.report(warnings, file, _source_or_none(file))
            if self.strict:
                return None, warnings
        return program, warnings

    def report(self, diagnostics: Sequence[Diagnostic], file: str, source: str | None) -> None:
        if self.json:
            self.collected.extend(diagnostics_json(diagnostics, file))
        else:
            print(render(diagnostics, filename=file, source=source), file=sys.stderr)

    def flush(self) -> None:
        if self.json:
            stream = self.stream
            assert hasattr(stream, "write")
            stream.write(json.dumps(self.collected, indent=2) + "\n")


def _source_or_none(file: str) -> str | None:
    try:
        return read_source(file)
    except PatternError:
        return None


def _refuse_folder(file: str, settings: _Settings) -> None:
    """``compile``/``bench`` read one file: a folder gets the files to choose from."""
    if not Path(file).is_dir():
        return
    found = pattern_files([file], settings.at(Path(file).resolve()))
    listed = ", ".join(found[:8]) + (f" and {len(found) - 8} more" if len(found) > 8 else "")
    raise _UsageError(
        f"`{file}` is a folder; this command reads one pattern file"
        + (f": {listed}" if found else f" (it holds no {' or '.join(PATTERN_SUFFIXES)} file)")
    )


def _load_checked(
    args: argparse.Namespace, reporter: _Reporter
) -> tuple[Program, dict[str, int | None] | None] | None:
    """The program of ``args.file`` with ``--pattern`` and ``--sizes`` checked
    against it (sizes None when not given and no ``[tool.patternc.sizes]``
    covers the file); None when the file has problems."""
    _refuse_folder(args.file, reporter.settings)
    program, _ = reporter.load(args.file)
    if program is None:
        return None
    _check_patterns(program, args.pattern)
    sizes = _parse_sizes(args.sizes) if args.sizes else None
    if sizes is None:
        settings = reporter.settings.of(args.file)
        sizes = settings.sizes_for(program.groups)
        if sizes is not None:
            print(f"patternc: sizes from [tool.patternc.sizes] of {settings.path}", file=sys.stderr)
    if sizes is not None:
        _check_sizes(program, sizes)
        sizes = _declared_order(program, sizes)
    return program, sizes


def _ratio(value: float, baseline: float) -> str:
    return f"{value:.2f}" if baseline and baseline == baseline and value == value else "-"


def _run_bench(args: argparse.Namespace) -> int:
    reporter = _Reporter(args)
    loaded = _load_checked(args, reporter)
    if loaded is None:
        return EXIT_DIAGNOSTICS
    program, sizes = loaded
    if sizes is None:
        raise _UsageError("bench needs --sizes (or a [tool.patternc.sizes] table covering the file's groups)")
    if args.repeat < 1 or args.dim % args.heads:
        raise _UsageError("--repeat must be >= 1 and --dim divisible by --heads")
    from patternc.benchmark import Measurement, measure, measure_isolated

    chosen = list(dict.fromkeys(args.backend))
    softmax = list(dict.fromkeys(["dense", *(b for b in chosen if b in BACKENDS)]))
    if not chosen:
        softmax = list(BACKENDS)
    others = [b for b in chosen if b in OTHER_FUNCTIONS]
    source = Path(args.file).read_text(encoding="utf-8")
    options = {
        "device": args.device,
        "dtype": args.dtype,
        "dim": args.dim,
        "heads": args.heads,
        "batch": args.batch,
        "repeat": args.repeat,
        "backward": args.backward,
    }
    mode = "forward+backward" if args.backward else "forward"
    print(
        f"{args.file}: {mode}, {args.device}, {args.dtype}, dim {args.dim}, {args.heads} heads, "
        f"batch {args.batch}, median of {args.repeat}; ratios vs dense"
    )
    header = (
        f"{'pattern':<16} {'backend':<13} {'ms':>10} {'speed-up':>9} {'peak MB':>9} {'mem':>6} {'TFLOP/s':>8}"
    )
    print(header)
    print("-" * len(header))
    plans = program.select(args.pattern)
    total, done = len(plans) * (len(softmax) + len(others)), 0
    apart: list[tuple[str, Measurement]] = []
    for plan in plans:
        results = []
        for backend in [*softmax, *others]:
            done += 1
            print(f"\r[{done}/{total}] {plan.name} / {backend} ...", end="", file=sys.stderr, flush=True)
            run = measure if args.device.startswith("cuda") else measure_isolated
            results.append(run(source, plan.name, sizes, backend, **options))
        print("\r" + " " * 60 + "\r", end="", file=sys.stderr, flush=True)
        dense = results[0]
        for r in results[: len(softmax)]:
            if r.error:
                print(f"{plan.name:<16} {r.backend:<13} failed: {r.error}")
                continue
            speed, mem = _ratio(dense.ms / r.ms, dense.ms), _ratio(r.peak_mb / dense.peak_mb, dense.peak_mb)
            numbers = f"{r.ms:>10.3f} {speed:>9} {r.peak_mb:>9.1f} {mem:>6} {r.tflops:>8.3g}"
            note = f"  ({r.note})" if r.note else ""
            print(f"{plan.name:<16} {r.backend:<13} {numbers}{note}")
        apart.extend((plan.name, r) for r in results[len(softmax) :])
    if apart:
        print("\nanother function (linear attention: no softmax), so not ranked against the backends above:")
        for name, r in apart:
            if r.error:
                print(f"{name:<16} {r.backend:<13} failed: {r.error}")
                continue
            print(f"{name:<16} {r.backend:<13} {r.ms:>10.3f} {'-':>9} {r.peak_mb:>9.1f} {'-':>6} {'-':>8}")
    return EXIT_OK


def _run_check(args: argparse.Namespace) -> int:
    status = EXIT_OK
    reporter = _Reporter(args, sys.stdout)
    for name in reporter.settings.files(args.files):
        program, warnings = reporter.load(name)
        if program is None:
            status = EXIT_DIAGNOSTICS
            continue
        if not reporter.json:
            warned = f", {len(warnings)} warning(s)" if warnings else ""
            print(f"{name}: ok ({len(program.groups)} groups, {len(program.patterns)} pattern(s){warned})")
    reporter.flush()
    return status


def _run_fmt(args: argparse.Namespace) -> int:
    from patternc.fmt import format_source

    status = EXIT_OK
    for name in _Settings(args).files(args.files):
        try:
            text = sys.stdin.read() if name == "-" else read_source(name)
            formatted = format_source(text, None if name == "-" else name)
        except PatternError as error:
            print(error, file=sys.stderr)
            status = EXIT_DIAGNOSTICS
            continue
        if name == "-" and not (args.check or args.diff):
            sys.stdout.write(formatted)
        elif formatted != text:
            status = EXIT_DIAGNOSTICS if (args.check or args.diff) else status
            if args.diff:
                label = "<stdin>" if name == "-" else name
                sys.stdout.writelines(
                    difflib.unified_diff(
                        text.splitlines(keepends=True),
                        formatted.splitlines(keepends=True),
                        f"{label} (original)",
                        f"{label} (formatted)",
                    )
                )
            elif args.check:
                print(f"would reformat {name}", file=sys.stderr)
            else:
                Path(name).write_text(formatted, encoding="utf-8")
                print(f"reformatted {name}")
    return status


def _run_compile(args: argparse.Namespace) -> int:
    reporter = _Reporter(args)
    loaded = _load_checked(args, reporter)
    reporter.flush()
    if loaded is None:
        return EXIT_DIAGNOSTICS
    program, sizes = loaded
    block = args.block if args.block is not None else reporter.settings.of(args.file).block_size or 128
    if args.dim <= 0:
        raise _UsageError(f"--dim must be positive, got {args.dim}")
    if block <= 0:
        raise _UsageError(f"--block must be positive, got {block}")
    if args.mask is not None:
        if sizes is None:
            raise _UsageError("--mask needs --sizes")
        if args.format != "text":
            raise _UsageError(
                f"--mask draws the mask and --format {args.format} prints the plan: run them apart"
            )
        return _draw_mask(program, sizes, args.pattern, args.mask, block)
    if args.format in ENGINE_FORMATS:
        if sizes is None:
            raise _UsageError(f"--format {args.format} needs --sizes (masks are laid out at sizes)")
        return _print_engine_format(program, sizes, args.pattern, args.format)
    if args.format == "json":
        from patternc.export import to_json

        sys.stdout.write(to_json(program, sizes, dim=args.dim, patterns=args.pattern))
    elif args.format == "dot":
        from patternc.export import to_dot

        sys.stdout.write(to_dot(program, sizes, patterns=args.pattern))
    else:
        from patternc.report import format_program

        if args.world_size is not None and (sizes is None or args.world_size < 1):
            raise _UsageError("--world-size needs --sizes and a number of ranks >= 1")
        text = format_program(
            program,
            sizes=sizes,
            patterns=args.pattern,
            dim=args.dim,
            block=block,
            world_size=args.world_size,
        )
        sys.stdout.write(text)
    return EXIT_OK


ENGINE_FORMATS = ("magi", "flashmask", "varlen", "xformers", "flex")


def _print_engine_format(
    program: Program, sizes: dict[str, int | None], patterns: Sequence[str], name: str
) -> int:
    """One JSON object per pattern; exit 1 when one cannot be said in the format."""
    import json

    from patternc.export.engines import engine_dict

    out: dict[str, object] = {}
    failed = []
    for plan in program.select(patterns):
        entry = engine_dict(plan.layout(sizes), name)
        if not entry["expressible"]:
            failed.append(f"{plan.name}: {entry['reason']}")
        out[plan.name] = entry
    sys.stdout.write(json.dumps({"format": name, "patterns": out}, separators=(",", ":")) + "\n")
    for line in failed:
        print(f"patternc: {name} cannot express pattern {line}", file=sys.stderr)
    return EXIT_DIAGNOSTICS if failed else EXIT_OK


def _draw_mask(
    program: Program, sizes: dict[str, int | None], patterns: Sequence[str], target: str, block: int
) -> int:
    from patternc.lower.blocks import block_classes

    masks = [(plan.name, block_classes(plan.layout(sizes), block)) for plan in program.select(patterns)]
    if target == "-":
        for name, mask in masks:
            sys.stdout.write(f"pattern {name}\n{mask.text()}\n")
        return EXIT_OK
    from patternc.maskplot import save_mask_picture

    try:
        save_mask_picture(Path(target), masks)
    except (RuntimeError, OSError) as error:
        raise _UsageError(f"--mask: {error}") from None
    print(f"wrote {target}")
    return EXIT_OK


def _run_lsp() -> int:
    try:
        from patternc.lsp import main as serve
    except ImportError as error:
        raise _UsageError(f"the language server needs pygls ({error}); pip install 'patternc[lsp]'") from None
    return serve()


def main(argv: Sequence[str] | None = None) -> int:
    parser = _build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "check":
            return _run_check(args)
        if args.command == "fmt":
            return _run_fmt(args)
        if args.command == "bench":
            return _run_bench(args)
        if args.command == "lsp":
            return _run_lsp()
        return _run_compile(args)
    except _UsageError as error:
        print(f"patternc: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    except PatternError as error:  # e.g. --sizes that leave a family without keys
        file = getattr(args, "file", None)
        print(render(error.diagnostics, filename=file), file=sys.stderr)
        return EXIT_DIAGNOSTICS
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
