"""Random valid pattern files, shared by the program and fuzz suites."""

from __future__ import annotations

import random

MODIFIER_LISTS = ["", "[causal]", "[window 2]", "[window 5]", "[causal, window 3]"]


def random_program(seed: int) -> tuple[str, dict[str, int]]:
    """A valid pattern file: groups, one or two patterns partitioning the
    groups into rules, keys with per-key and rule-level modifiers; and sizes."""
    rng = random.Random(seed)
    groups = [f"g{i}" for i in range(rng.randint(1, 5))]
    lines = ["# random program", "groups " + " ".join(groups)]
    for p in range(rng.randint(1, 2)):
        lines.append(f"pattern p{p} {{  # block {p}")
        order = groups[:]
        rng.shuffle(order)
        while order:
            take = rng.randint(1, len(order))
            queries, order = order[:take], order[take:]
            keys = rng.sample(groups, rng.randint(1, len(groups)))
            if rng.random() < 0.3:
                mods = rng.choice(MODIFIER_LISTS[1:])
                rule = f"{', '.join(queries)} -> {', '.join(keys)} {mods}"
            else:
                rule = f"{','.join(queries)}->" + ",  ".join(k + rng.choice(MODIFIER_LISTS) for k in keys)
            lines.append(" " * rng.randint(0, 6) + rule + ("   # noqa" if rng.random() < 0.2 else ""))
            if rng.random() < 0.2:
                lines.append("")
        lines.append("}")
    sizes = {g: rng.choice([0, 1, 2, 3, 5, 8, 13]) for g in groups}
    return "\n".join(lines) + "\n", sizes
