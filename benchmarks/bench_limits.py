"""Compiler limits and the cost of reaching them: compile time stays linear in the input.

Prints, for inputs at and past each documented limit and for 10,000 groups
under `* -> *`, the time to compile (median of repeats) and the outcome.
Every row should be well under a second; past a limit, the error is found
by a linear scan before parsing. A second table lays out packed documents
(``doc* -> self [causal]``) at 1,000 and 10,000 documents, new lengths each
time: build time and peak memory grow linearly with the documents.

    python benchmarks/bench_limits.py [--repeat 3]
"""

from __future__ import annotations

import argparse
import statistics
import time
import tracemalloc
from collections.abc import Callable

import patternc
from patternc.compiler import MAX_NAMES, MAX_NESTING, MAX_RULES
from patternc.export import to_dot, to_json
from patternc.plan import LAYOUTS


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    print(f"{'input':<36} {'bytes':>10} {'median s':>9}  outcome")
    for label, build in CASES.items():
        text = build()
        times, result = [], ""
        for _ in range(args.repeat):
            start = time.perf_counter()
            result = outcome(label, text)
            times.append(time.perf_counter() - start)
        print(f"{label:<36} {len(text):>10,} {statistics.median(times):>9.3f}  {result}")
    documents(args.repeat)


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


if __name__ == "__main__":
    main()
