"""Random valid pattern files, shared by the program and fuzz suites."""

from __future__ import annotations

import random

MODIFIER_LISTS = ["", "[causal]", "[window 2]", "[window 5]", "[causal, window 3]"]
RELATED_KEYS = ["f*[upto]", "f*[before], self", "self[causal]", "f*[upto 1, causal]", "f*[before 2], self[window 2]"]
"""Keys of a rule whose queries are the family ``f*`` alone, relating its members."""


def random_program(seed: int) -> tuple[str, dict[str, int]]:
    """A valid pattern file: groups (sometimes a family ``f*``), one or two
    patterns partitioning the groups into rules, keys with per-key and
    rule-level modifiers and member relations; and sizes."""
    rng = random.Random(seed)
    groups = [f"g{i}" for i in range(rng.randint(1, 5))]
    family = rng.random() < 0.4  # a family `f*` whose rules may relate its members
    if family:
        groups.insert(rng.randint(0, len(groups)), "f*")
    lines = ["# random program", "groups " + " ".join(groups)]
    for p in range(rng.randint(1, 2)):
        lines.append(f"pattern p{p} {{  # block {p}")
        order = groups[:]
        rng.shuffle(order)
        while order:
            take = rng.randint(1, len(order))
            queries, order = order[:take], order[take:]
            keys = rng.sample(groups, rng.randint(1, len(groups)))
            if queries == ["f*"] and rng.random() < 0.7:
                plain = [k for k in keys if k != "f*"]
                related = rng.choice(RELATED_KEYS)
                lines.append(f"{queries[0]} -> {', '.join([*plain, related])}")
                continue
            if rng.random() < 0.3:
                mods = rng.choice(MODIFIER_LISTS[1:])
                rule = f"{', '.join(queries)} -> {', '.join(keys)} {mods}"
            else:
                rule = f"{','.join(queries)}->" + ",  ".join(k + rng.choice(MODIFIER_LISTS) for k in keys)
            lines.append(" " * rng.randint(0, 6) + rule + ("   # noqa" if rng.random() < 0.2 else ""))
            if rng.random() < 0.2:
                lines.append("")
        lines.append("}")
    sizes: dict[str, int] = {}
    for g in groups:  # in the plan's order, the family's members at its place
        if g == "f*":
            sizes |= {f"f{i}": rng.choice([1, 2, 3, 5]) for i in range(rng.randint(1, 4))}
        else:
            sizes[g] = rng.choice([0, 1, 2, 3, 5, 8, 13])
    return "\n".join(lines) + "\n", sizes
