"""The ``patternc`` command line: ``check``, ``compile``, ``fmt`` and ``bench`` pattern files.

Exit status: 0 ok (warnings alone do not fail unless
``--warnings-as-errors``), 1 the file has problems (diagnostics on stderr,
or as JSON with ``--output-format json``) or ``fmt --check`` would change
it, 2 bad usage (unknown option, pattern or group in ``--sizes``). ``check``,
``compile`` and ``fmt`` never import torch; ``bench`` does.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from patternc import __version__
from patternc.compiler import compile as compile_program
from patternc.compiler import read_source
from patternc.diagnostics import Diagnostic, PatternError, diagnostics_json, render, suggest
from patternc.plan import Program
from patternc.resolve import is_family

__all__ = ["main"]

EXIT_OK, EXIT_DIAGNOSTICS, EXIT_USAGE = 0, 1, 2

_CHECK_EXAMPLES = """\
examples:
  patternc check examples/*.pc
  patternc check model.pc --output-format json      # for editors and CI
  patternc check model.pc --warnings-as-errors
"""

_FMT_EXAMPLES = """\
examples:
  patternc fmt examples/*.pc            # rewrite in place
  patternc fmt --check examples/*.pc    # exit 1 if any file would change
  patternc fmt - < model.pc             # stdin to stdout
"""

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
    prefixes = tuple(g[:-1] for g in program.groups if is_family(g))
    for name in sizes:
        if name not in program.groups and not name.startswith(prefixes):
            hint = suggest(name, program.groups)
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
    rank = {g[:-1] if is_family(g) else g: i for i, g in enumerate(program.groups)}
    prefixes = [g[:-1] for g in program.groups if is_family(g)]

    def place(name: str) -> int:
        if name in rank:
            return rank[name]
        return min((rank[p] for p in prefixes if name.startswith(p)), default=len(rank))

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

    check = sub.add_parser(
        "check",
        help="report every problem in pattern files",
        epilog=_CHECK_EXAMPLES,
        parents=[diagnostics],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    check.add_argument("files", nargs="+", metavar="FILE", help="pattern files (.pc)")

    fmt = sub.add_parser(
        "fmt",
        help="rewrite pattern files in the canonical layout",
        epilog=_FMT_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    fmt.add_argument("files", nargs="+", metavar="FILE", help="pattern files (.pc), or - for stdin")
    fmt.add_argument("--check", action="store_true", help="change nothing; exit 1 if a file would change")

    comp = sub.add_parser(
        "compile",
        help="print the plan of a pattern file",
        epilog=_EXAMPLES,
        parents=[diagnostics],
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
    comp.add_argument(
        "--format",
        choices=("text", "json", "dot", *ENGINE_FORMATS),
        default="text",
        help="output format: the plan (text, json, dot), or another engine's mask as JSON "
        "(magi, flashmask, varlen, xformers, flex; need --sizes)",
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
        default=128,
        metavar="N",
        help="block size of --mask and the block-sparsity line (default 128; 1 draws every token pair)",
    )

    sub.add_parser(
        "lsp",
        help="run the language server on stdin/stdout (for editors; needs the [lsp] extra)",
        description="Language server for pattern files: diagnostics as you type, completion, hover, "
        "go to declaration. Editors start it; see editors/vscode/.",
    )

    bench = sub.add_parser(
        "bench",
        help="time a pattern file's plan on every backend (imports torch)",
        epilog="example:\n  patternc bench examples/ab_upt.pc --pattern self_anchor --sizes \\\n"
        "    surface_anchors=1024,surface_queries=4096,volume_anchors=1024,volume_queries=4096\n",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    bench.add_argument("file", metavar="FILE", help="pattern file (.pc)")
    bench.add_argument(
        "--sizes", action="append", default=[], required=True, metavar="G=N,...", help="group sizes"
    )
    bench.add_argument(
        "--pattern", action="append", default=[], metavar="NAME", help="only this pattern (repeatable)"
    )
    bench.add_argument(
        "--backend", action="append", default=[], choices=BACKENDS, help="backends to run (default: all)"
    )
    bench.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ... (default cpu)")
    bench.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    bench.add_argument("--repeat", type=int, default=10, help="timed runs per backend (median)")
    bench.add_argument("--dim", type=int, default=192, help="model width (default 192)")
    bench.add_argument("--heads", type=int, default=3, help="attention heads (default 3)")
    bench.add_argument("--batch", type=int, default=1)
    bench.add_argument("--backward", action="store_true", help="time forward+backward")
    return parser


BACKENDS = ("dense", "loop", "batched", "flex", "varlen", "auto", "linear")


class _Reporter:
    """Prints diagnostics as text (stderr, as they come) or collects them for
    one JSON list (``--output-format json``)."""

    def __init__(self, args: argparse.Namespace, json_stream: object = None) -> None:
        self.json = getattr(args, "output_format", "text") == "json"
        self.strict = getattr(args, "warnings_as_errors", False)
        self.stream = json_stream or sys.stderr
        self.collected: list[dict[str, object]] = []

    def load(self, file: str) -> Program | None:
        """Compile a pattern file and report its diagnostics; None when it has
        errors (or warnings, under ``--warnings-as-errors``)."""
        try:
            program = compile_program(Path(file))
        except PatternError as error:
            self.report(error.diagnostics, file, error.source)
            return None
        if program.warnings:
            self.report(program.warnings, file, _source_or_none(file))
            if self.strict:
                return None
        return program

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


def _load_checked(
    args: argparse.Namespace, reporter: _Reporter
) -> tuple[Program, dict[str, int | None] | None] | None:
    """The program of ``args.file`` with ``--pattern`` and ``--sizes`` checked
    against it (sizes None when not given); None when the file has problems."""
    program = reporter.load(args.file)
    if program is None:
        return None
    _check_patterns(program, args.pattern)
    sizes = _parse_sizes(args.sizes) if args.sizes else None
    if sizes is not None:
        _check_sizes(program, sizes)
        sizes = _declared_order(program, sizes)
    return program, sizes


def _run_bench(args: argparse.Namespace) -> int:
    reporter = _Reporter(args)
    loaded = _load_checked(args, reporter)
    if loaded is None:
        return EXIT_DIAGNOSTICS
    program, sizes = loaded
    assert sizes is not None  # --sizes is required for bench
    if args.repeat < 1 or args.dim % args.heads:
        raise _UsageError("--repeat must be >= 1 and --dim divisible by --heads")
    from patternc.benchmark import measure, measure_isolated

    backends = list(dict.fromkeys(["dense", *args.backend])) if args.backend else list(BACKENDS)
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
    total, done = len(plans) * len(backends), 0
    for plan in plans:
        results = []
        for backend in backends:
            done += 1
            print(f"\r[{done}/{total}] {plan.name} / {backend} ...", end="", file=sys.stderr, flush=True)
            run = measure if args.device.startswith("cuda") else measure_isolated
            results.append(run(source, plan.name, sizes, backend, **options))
        print("\r" + " " * 60 + "\r", end="", file=sys.stderr, flush=True)
        dense = results[0]
        for r in results:
            if r.error:
                print(f"{plan.name:<16} {r.backend:<13} failed: {r.error}")
                continue
            speed = f"{dense.ms / r.ms:.2f}" if dense.ms == dense.ms else "-"
            mem = (
                f"{r.peak_mb / dense.peak_mb:.2f}"
                if dense.peak_mb and dense.peak_mb == dense.peak_mb
                else "-"
            )
            numbers = f"{r.ms:>10.3f} {speed:>9} {r.peak_mb:>9.1f} {mem:>6} {r.tflops:>8.3g}"
            note = f"  ({r.note})" if r.note else ""
            print(f"{plan.name:<16} {r.backend:<13} {numbers}{note}")
    return EXIT_OK


def _run_check(args: argparse.Namespace) -> int:
    status = EXIT_OK
    reporter = _Reporter(args, sys.stdout)
    for name in args.files:
        program = reporter.load(name)
        if program is None:
            status = EXIT_DIAGNOSTICS
            continue
        if not reporter.json:
            warned = f", {len(program.warnings)} warning(s)" if program.warnings else ""
            print(f"{name}: ok ({len(program.groups)} groups, {len(program.patterns)} pattern(s){warned})")
    reporter.flush()
    return status


def _run_fmt(args: argparse.Namespace) -> int:
    from patternc.fmt import format_source

    status = EXIT_OK
    for name in args.files:
        try:
            text = sys.stdin.read() if name == "-" else read_source(name)
            formatted = format_source(text, None if name == "-" else name)
        except PatternError as error:
            print(error, file=sys.stderr)
            status = EXIT_DIAGNOSTICS
            continue
        if name == "-":
            sys.stdout.write(formatted)
        elif formatted != text:
            if args.check:
                print(f"would reformat {name}", file=sys.stderr)
                status = EXIT_DIAGNOSTICS
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
    if args.dim <= 0:
        raise _UsageError(f"--dim must be positive, got {args.dim}")
    if args.block <= 0:
        raise _UsageError(f"--block must be positive, got {args.block}")
    if args.mask is not None:
        if sizes is None:
            raise _UsageError("--mask needs --sizes")
        if args.format != "text":
            raise _UsageError(
                f"--mask draws the mask and --format {args.format} prints the plan: run them apart"
            )
        return _draw_mask(program, sizes, args.pattern, args.mask, args.block)
    if args.format in ENGINE_FORMATS:
        if sizes is None:
            raise _UsageError(f"--format {args.format} needs --sizes (masks are laid out at sizes)")
        return _print_engine_format(program, sizes, args.pattern, args.format)
    if args.format == "json":
        sys.stdout.write(program.to_json(sizes, dim=args.dim, patterns=args.pattern))
    elif args.format == "dot":
        sys.stdout.write(program.to_dot(args.pattern, sizes))
    else:
        from patternc.report import format_program

        if args.world_size is not None and (sizes is None or args.world_size < 1):
            raise _UsageError("--world-size needs --sizes and a number of ranks >= 1")
        text = format_program(
            program,
            sizes=sizes,
            patterns=args.pattern,
            dim=args.dim,
            block=args.block,
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
    from patternc.blockmask import block_classes

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
