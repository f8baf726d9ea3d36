"""What the compiler costs, up to its limits, in three tables.

1. ``patternc.compile`` on a generated file with 500 groups and 500 rules
   (target: under 100 ms), split into parse / resolve+check / plan; and the
   wall time of the ``patternc check examples/ab_upt.patc`` command, a fresh
   interpreter each run (target: under 0.5 s), next to a bare ``python -c pass``.
2. Inputs at and past each documented limit, and 10,000 groups under
   ``* -> *``: time to compile (median of ``--slow-repeat``) and the outcome.
   Every row should be well under a second; past a limit, the error is found
   by a linear scan before parsing.
3. Layouts of packed documents (``doc* -> self [causal]``) at 1,000 and
   10,000 documents, new lengths each time: build time and peak memory grow
   linearly with the documents.

Run: ``python benchmarks/bench_compile.py [--repeat 20] [--slow-repeat 3]``
"""

from __future__ import annotations

import argparse
import random
import statistics
import subprocess
import sys
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path

import patternc
from patternc.compiler import MAX_NAMES, MAX_NESTING, MAX_RULES
from patternc.export import to_dot, to_json
from patternc.plan import LAYOUTS

ROOT = Path(__file__).resolve().parent.parent


def generated_source(n_groups: int = 500, n_rules: int = 500, seed: int = 0) -> str:
    """500 groups in families; 500 rules mixing names, globs, unions, exclusions."""
    rng = random.Random(seed)
    families = [f"fam{i}" for i in range(50)]
    groups = [f"{families[i % 50]}_g{i}" for i in range(n_groups)]
    lines = ["# generated", "groups " + " ".join(groups[:250]), "groups " + " ".join(groups[250:])]
    lines.append("pattern big {")
    # every group is a query in exactly one rule: rule i owns group i
    for i in range(n_rules):
        q = groups[i]
        kind = i % 4
        if kind == 0:
            kv = f"{groups[rng.randrange(n_groups)]}, {groups[rng.randrange(n_groups)]}"
        elif kind == 1:
            kv = f"{rng.choice(families)}_*"
        elif kind == 2:
            kv = f"{rng.choice(families)}_* - {groups[rng.randrange(n_groups)]}"
        else:
            j = rng.randrange(50)
            kv = f"({rng.choice(families)}_*, fam{j}_g*{j % 10}) - {groups[i]}"
        lines.append(f"    {q} -> {kv}")
    lines.append("}")
    return "\n".join(lines) + "\n"


def _median_ms(fn: object, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()  # type: ignore[operator]
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def names(n: int) -> str:
    return " ".join(f"g{i}" for i in range(n))


CASES: dict[str, Callable[[], str]] = {
    f"{MAX_RULES:,} rules (the limit)": lambda: (
        f"groups {names(MAX_RULES)}\n" + "\n".join(f"g{i} -> g{i}" for i in range(MAX_RULES))
    ),
    f"{MAX_RULES + 1:,} rules": lambda: "groups a\n" + "a -> a\n" * (MAX_RULES + 1),
    f"{MAX_NAMES:,} names (the limit)": lambda: f"groups {names(MAX_NAMES - 3)}\n* -> *  # noqa\n",
    f"{MAX_NAMES + 1:,} names": lambda: f"groups {names(MAX_NAMES + 1)}\n* -> *\n",
    f"{MAX_NESTING} parentheses (the limit)": lambda: (
        "groups a b\na, b -> " + "(" * MAX_NESTING + "a" + ")" * MAX_NESTING
    ),
    "20,000 parentheses": lambda: "groups a b\na, b -> " + "(" * 20000 + "a" + ")" * 20000,
    "4 MiB of rules": lambda: "groups a\n" + "a -> a\n" * 600_000,
    "10,000 groups, * -> *": lambda: f"groups {names(10_000)}\n* -> *  # noqa\n",
    "10,000 groups, * -> *, to_json": lambda: f"groups {names(10_000)}\n* -> *  # noqa\n",
    "10,000 groups, * -> *, to_dot": lambda: f"groups {names(10_000)}\n* -> *  # noqa\n",
    "2,000 syntax errors": lambda: f"groups {names(2000)}\n" + "\n".join(f"g{i} -> ," for i in range(2000)),
}


def outcome(label: str, text: str) -> str:
    try:
        program = patternc.compile(text)
    except patternc.PatternError as error:
        first = error.diagnostics[0]
        return f"{first.code} at {first.line}:{first.column}" + (
            f" (+{len(error.diagnostics) - 1})" if len(error.diagnostics) > 1 else ""
        )
    if label.endswith("to_json"):
        to_json(program)
    elif label.endswith("to_dot"):
        to_dot(program)
    return "ok"


def limits(repeat: int) -> None:
    """Inputs at and past each limit: median compile time and the outcome."""
    print(f"\n{'input':<36} {'bytes':>10} {'median s':>9}  outcome")
    for label, build in CASES.items():
        text = build()
        times, result = [], ""
        for _ in range(repeat):
            start = time.perf_counter()
            result = outcome(label, text)
            times.append(time.perf_counter() - start)
        print(f"{label:<36} {len(text):>10,} {statistics.median(times):>9.3f}  {result}")


def documents(repeat: int) -> None:
    """Layouts of many packed documents: median build time, and the peak
    memory of one build (traced separately: tracing slows allocation)."""
    plan = patternc.compile("groups doc*\ndoc* -> self [causal]").patterns["default"]
    print(f"\n{'packed documents':<36} {'median s':>9} {'peak MB':>9}")
    for count in (1_000, 10_000):
        times = []
        for r in range(repeat):
            sizes = {f"doc{i}": 1 + (i + r) % 7 for i in range(count)}
            LAYOUTS.clear()
            start = time.perf_counter()
            plan.layout(sizes)
            times.append(time.perf_counter() - start)
        LAYOUTS.clear()
        tracemalloc.start()
        plan.layout({f"doc{i}": 2 + i % 5 for i in range(count)})
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        LAYOUTS.clear()
        print(f"{f'{count:,} documents, layout':<36} {statistics.median(times):>9.3f} {peak / 1e6:>9.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeat", type=int, default=20, help="runs of each in-process timing in table 1")
    parser.add_argument("--slow-repeat", type=int, default=3, help="runs of each row of tables 2 and 3")
    args = parser.parse_args()

    from patternc.compiler import _lower
    from patternc.syntax import parse

    source = generated_source()
    patternc.compile(source)  # warm: builds the LALR parser once per process
    tree = parse(source)
    program = patternc.compile(source)
    plan = program.patterns["big"]

    rows = [
        (
            "compile 500 groups / 500 rules (total)",
            _median_ms(lambda: patternc.compile(source), args.repeat),
            100.0,
        ),
        ("  parse (Lark LALR + transformer)", _median_ms(lambda: parse(source), args.repeat), None),
        ("  resolve + check", _median_ms(lambda: _lower(tree, None, source), args.repeat), None),
        (
            "  merge patterns (Plan.patterns)",
            _median_ms(lambda: patternc.plan.Plan(plan.name, plan.groups, plan.rules).patterns, args.repeat),
            None,
        ),
    ]
    cli_repeat = max(3, args.repeat // 4)

    def run(cmd: list[str]) -> None:
        subprocess.run(cmd, check=True, capture_output=True, cwd=ROOT)

    check_ms = _median_ms(
        lambda: run([sys.executable, "-m", "patternc", "check", "examples/ab_upt.patc"]), cli_repeat
    )
    bare_ms = _median_ms(lambda: run([sys.executable, "-c", "pass"]), cli_repeat)
    import_ms = _median_ms(lambda: run([sys.executable, "-c", "import patternc"]), cli_repeat)
    rows += [
        ("`patternc check examples/ab_upt.patc` (wall)", check_ms, 500.0),
        ("  of which: python -c pass", bare_ms, None),
        ("  of which: import patternc", import_ms - bare_ms, None),
    ]

    print(f"{'measurement':<46} {'median ms':>10} {'target ms':>10} {'ok':>4}")
    for name, ms, target in rows:
        ok = "" if target is None else ("yes" if ms < target else "NO")
        print(f"{name:<46} {ms:>10.1f} {'' if target is None else f'{target:.0f}':>10} {ok:>4}")
    print(
        f"(median of {args.repeat} runs in-process, {cli_repeat} for commands; "
        f"{len(program.groups)} groups, {len(plan.rules)} rules -> {len(plan.patterns)} attention calls)"
    )
    limits(args.slow_repeat)
    documents(args.slow_repeat)


if __name__ == "__main__":
    main()
