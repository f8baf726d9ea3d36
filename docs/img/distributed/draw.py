"""Draw docs/img/distributed/placement.png: where each group's tokens sit on
4 ranks and what each call moves, for three layouts (run from the repo root)."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.patches import FancyArrowPatch, Rectangle

import patternc
from patternc.distributed import place, schedule

WORLD = 4
LAYOUTS = [
    (
        "AB-UPT joint: anchors all-gathered",
        "groups surface_anchors surface_queries volume_anchors volume_queries\n"
        "* -> surface_anchors, volume_anchors",
        {"surface_anchors": 8, "surface_queries": 40, "volume_anchors": 8, "volume_queries": 40},
    ),
    (
        "causal documents: whole, or over neighbouring ranks",
        "groups doc*\ndoc* -> self [causal]",
        {f"doc{i}": n for i, n in enumerate([14, 9, 12, 6, 11, 8, 5, 7, 10, 4])},
    ),
    (
        "one long causal document: zigzag, ring",
        "groups doc\ndoc -> doc [causal]",
        {"doc": 64},
    ),
]
COLORS = plt.get_cmap("tab20").colors


def main() -> None:
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for ax, (title, source, sizes) in zip(axes, LAYOUTS):
        plan = patternc.compile(source).patterns["default"].bind(list(sizes))
        placement = place(plan.groups, plan.calls, sizes, WORLD)
        plan_schedule = schedule(plan.calls, placement)
        total = sum(sizes.values())
        for rank in range(WORLD):
            x = 0
            for gi, g in enumerate(placement.groups):
                for a, b in g.ranges[rank]:
                    ax.add_patch(Rectangle((x, rank), b - a, 0.8, color=COLORS[gi % 20], ec="white", lw=0.5))
                    if b - a >= total / 40:
                        ax.text(x + (b - a) / 2, rank + 0.4, f"{g.name}\n[{a},{b})", ha="center", va="center",
                                fontsize=6)
                    x += b - a
            ax.text(-1, rank + 0.4, f"rank {rank}", ha="right", va="center", fontsize=8)
        strategies = sorted({c.strategy for c in plan_schedule.calls})
        width = max(placement.tokens(r) for r in range(WORLD))
        if "gather" in strategies or "ring" in strategies:
            for rank in range(WORLD):
                nxt = (rank + 1) % WORLD
                style = "->" if "ring" in strategies else "<->"
                ax.add_patch(FancyArrowPatch((width + 1, rank + 0.4), (width + 1, nxt + 0.4),
                                             connectionstyle="arc3,rad=0.4", arrowstyle=style,
                                             mutation_scale=8, color="0.3"))
        received = ", ".join(str(r) for r in plan_schedule.received)
        ax.set_title(f"{title}\ncalls: {', '.join(strategies)}; tokens received per rank: {received}", fontsize=9)
        ax.set_xlim(-6, width + 4)
        ax.set_ylim(-0.3, WORLD)
        ax.invert_yaxis()
        ax.axis("off")
    fig.tight_layout()
    fig.savefig("docs/img/distributed/placement.png", dpi=130)


if __name__ == "__main__":
    main()
