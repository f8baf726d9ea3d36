"""Random valid pattern files, shared by the program and fuzz suites."""

from __future__ import annotations

import math
import random

MODIFIER_LISTS = ["", "[causal]", "[window 2]", "[window 5]", "[causal, window 3]"]
RELATED_KEYS = ["f*[upto]", "f*[before], self", "self[causal]", "f*[upto 1, causal]", "f*[before 2], self[window 2]"]
"""Keys of a rule whose queries are the family ``f*`` alone, relating its members."""
SHAPED = ("s", "u")
"""Groups declared with a shape when a program has one (``u`` has ``s``'s shape)."""


def random_shape(rng: random.Random) -> tuple[int, ...]:
    """1 to 3 axes of 1 to 4 tokens (1-length axes included), at most 24 tokens."""
    while True:
        shape = tuple(rng.randint(1, 4) for _ in range(rng.choice([1, 1, 2, 2, 2, 3])))
        if math.prod(shape) <= 24:
            return shape


def neighbourhood(rng: random.Random, shape: tuple[int, ...]) -> str:
    """``[kernel K]`` or ``[near N]``, one number for all axes or one per axis,
    each a kernel no wider than its axis (``near`` may reach past it)."""
    if rng.random() < 0.5:
        if rng.random() < 0.5:
            return f"[kernel {rng.randint(1, min(shape))}]"
        return f"[near {rng.randint(0, max(shape))}]"
    if rng.random() < 0.5:
        return f"[kernel {' '.join(str(rng.randint(1, n)) for n in shape)}]"
    return f"[near {' '.join(str(rng.randint(0, n)) for n in shape)}]"


def random_program(seed: int) -> tuple[str, dict[str, int]]:
    """A valid pattern file: groups (sometimes a family ``f*``, sometimes
    groups declared with a shape and read through a neighbourhood), one or
    two patterns partitioning the groups into rules, keys with per-key and
    rule-level modifiers and member relations; and sizes."""
    rng = random.Random(seed)
    groups = [f"g{i}" for i in range(rng.randint(1, 5))]
    family = rng.random() < 0.4  # a family `f*` whose rules may relate its members
    if family:
        groups.insert(rng.randint(0, len(groups)), "f*")
    shape = random_shape(rng) if rng.random() < 0.35 else None
    shaped = SHAPED[: rng.choice([1, 1, 2])] if shape is not None else ()
    for name in shaped:
        groups.insert(rng.randint(0, len(groups)), name)
    declared = [f"{g}[{', '.join(map(str, shape))}]" if g in shaped and shape else g for g in groups]
    lines = ["# random program", "groups " + " ".join(declared)]
    for p in range(rng.randint(1, 2)):
        lines.append(f"pattern p{p} {{  # block {p}")
        order = groups[:]
        rng.shuffle(order)
        alone = shape is not None and rng.random() < 0.6  # the shaped groups' rule first, by themselves
        if alone:
            order = [g for g in order if g in shaped] + [g for g in order if g not in shaped]
        while order:
            take = len([g for g in order if g in shaped]) if alone else rng.randint(1, len(order))
            alone = False
            queries, order = order[:take], order[take:]
            keys = rng.sample(groups, rng.randint(1, len(groups)))
            if queries == ["f*"] and rng.random() < 0.7:
                plain = [k for k in keys if k != "f*"]
                related = rng.choice(RELATED_KEYS)
                lines.append(f"{queries[0]} -> {', '.join([*plain, related])}")
                continue
            if shape is not None and set(queries) <= set(shaped) and rng.random() < 0.7:
                # a neighbourhood stands alone in its list: the other keys get their own
                read = rng.choice(["self", *shaped])  # `self`: each query group's own neighbourhood
                skip = queries if read == "self" else [read]  # `self` repeats no key of its queries
                plain = [k + rng.choice(MODIFIER_LISTS) for k in keys if k not in skip]
                written = ", ".join(queries)
                lines.append(f"{written} -> {', '.join([*plain, read + neighbourhood(rng, shape)])}")
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
        elif g in shaped and shape is not None:
            sizes[g] = math.prod(shape) if rng.random() < 0.9 else 0  # the shape's tokens, or none
        else:
            sizes[g] = rng.choice([0, 1, 2, 3, 5, 8, 13])
    return "\n".join(lines) + "\n", sizes
