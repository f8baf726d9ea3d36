"""Pictures of block masks (``patternc compile --mask out.png``); needs matplotlib."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from patternc.lower.blocks import BlockClasses

__all__ = ["save_mask_picture"]


def save_mask_picture(path: Path, masks: Sequence[tuple[str, BlockClasses]]) -> None:
    """One panel per pattern: blocks coloured empty / partial / full, groups
    labelled on both axes."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.colors import ListedColormap
    except ImportError:
        raise RuntimeError("drawing the mask needs matplotlib: pip install 'patternc[plot]'") from None
    fig, axes = plt.subplots(1, len(masks), figsize=(5.5 * len(masks), 5.5), squeeze=False)
    cmap = ListedColormap(["#ffffff", "#f4a261", "#264653"])
    for ax, (name, mask) in zip(axes[0], masks):
        ax.imshow(mask.classes, cmap=cmap, vmin=0, vmax=2, interpolation="nearest")
        # groups sharing a block (smaller than it) share one label, not overwrite each other
        by_block: dict[int, list[str]] = {}
        for group, first in mask.row_groups:
            by_block.setdefault(first, []).append(group)
        ticks = list(by_block)
        labels = [", ".join(groups) for groups in by_block.values()]
        ax.set_yticks([t - 0.5 for t in ticks], labels, fontsize=7)
        ax.set_xticks([t - 0.5 for t in ticks], labels, rotation=90, fontsize=7)
        for t in ticks[1:]:
            ax.axhline(t - 0.5, color="#999999", lw=0.4)
            ax.axvline(t - 0.5, color="#999999", lw=0.4)
        empty, partial, full = mask.counts
        if mask.block == 1:  # every cell one (query, key) pair
            title = f"{name}: {full} of {full + empty} pairs allowed (dark)\ndensity {1 - mask.sparsity:.3f}"
        else:
            title = (
                f"{name}: {full} full, {partial} partial, {empty} empty\nsparsity {mask.sparsity:.3f}, "
                f"{mask.block}x{mask.block} blocks (dark full, orange partial)"
            )
        ax.set_title(title, fontsize=8)
        ax.set_xlabel("keys / values")
        ax.set_ylabel("queries")
    fig.tight_layout()
    fig.savefig(path, dpi=150)
    plt.close(fig)
