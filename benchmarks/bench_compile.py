"""Compile-time benchmark.

1. ``patternc.compile`` on a generated file with 500 groups and 500 rules
   (target: under 100 ms), split into parse / resolve+check / plan.
2. Wall time of the ``patternc check examples/ab_upt.patc`` command, a fresh
   interpreter each run (target: under 0.5 s), next to a bare ``python -c pass``.

Run: ``python benchmarks/bench_compile.py [--repeat N]``
"""

from __future__ import annotations

import argparse
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

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


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeat", type=int, default=20)
    args = parser.parse_args()

    import patternc
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
        ("  resolve + check", _median_ms(lambda: _lower(tree, None), args.repeat), None),
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


if __name__ == "__main__":
    main()
