"""Pictures of block masks (``patternc compile --mask out.png``); needs matplotlib."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from patternc.lower.blocks import BlockClasses, block_classes
from patternc.lower.layout import Sizes
from patternc.plan import Plan, Program

__all__ = ["mask_figure", "save_mask_picture", "show"]

_PANEL_INCHES = 5.0


def _pyplot() -> Any:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise RuntimeError("drawing the mask needs matplotlib: pip install 'patternc[plot]'") from None
    return plt


def _group_ticks(mask: BlockClasses) -> tuple[list[float], list[str], list[int]]:
    """Label positions (the middle of each group's blocks; groups sharing a
    block share one label), their labels, and the blocks where groups start."""
    by_block: dict[int, list[str]] = {}
    for group, first in mask.row_groups:
        by_block.setdefault(first, []).append(group)
    starts = list(by_block)
    ends = [*starts[1:], len(mask.classes)]
    middles = [(start + max(end, start + 1)) / 2 - 0.5 for start, end in zip(starts, ends)]
    return middles, [", ".join(groups) for groups in by_block.values()], starts


def _title(name: str, mask: BlockClasses) -> str:
    empty, partial, full = mask.counts
    if mask.block == 1:  # every cell one (query, key) pair
        return f"{name}\n{full} of {full + empty} pairs allowed (dark), density {1 - mask.sparsity:.3f}"
    return (
        f"{name}\n{full} full, {partial} partial, {empty} empty blocks\n"
        f"sparsity {mask.sparsity:.3f}; {mask.block}x{mask.block} blocks (dark full, orange partial)"
    )


def mask_figure(masks: Sequence[tuple[str, BlockClasses]]) -> Any:
    """A matplotlib figure with one panel per ``(pattern name, block classes)``:
    blocks coloured empty / partial / full, groups labelled on both axes.

    Raises:
        RuntimeError: matplotlib is not installed.
    """
    plt = _pyplot()
    from matplotlib.colors import ListedColormap

    fig, axes = plt.subplots(
        1,
        len(masks),
        figsize=(_PANEL_INCHES * len(masks), _PANEL_INCHES + 1),
        squeeze=False,
        layout="constrained",
    )
    cmap = ListedColormap(["#ffffff", "#f4a261", "#264653"])
    for ax, (name, mask) in zip(axes[0], masks):
        ax.imshow(mask.classes, cmap=cmap, vmin=0, vmax=2, interpolation="nearest")
        middles, labels, starts = _group_ticks(mask)
        ax.set_yticks(middles, labels, fontsize=7)
        ax.set_xticks(middles, labels, rotation=90, fontsize=7)
        ax.tick_params(length=0)
        for start in starts[1:]:
            ax.axhline(start - 0.5, color="#999999", lw=0.5)
            ax.axvline(start - 0.5, color="#999999", lw=0.5)
        ax.set_title(_title(name, mask), fontsize=8)
        ax.set_xlabel("keys / values")
        ax.set_ylabel("queries")
    return fig


def save_mask_picture(path: Path, masks: Sequence[tuple[str, BlockClasses]]) -> None:
    """Write :func:`mask_figure` of ``masks`` to ``path`` (the format from its
    extension, e.g. ``.png`` or ``.svg``), titles and labels inside the picture.

    Raises:
        RuntimeError: matplotlib is not installed.
        OSError: ``path`` cannot be written.
    """
    plt = _pyplot()
    fig = mask_figure(masks)
    try:
        fig.savefig(path, dpi=150, bbox_inches="tight", pad_inches=0.15)
    finally:
        plt.close(fig)


def show(compiled: Plan | Program, sizes: Sizes, *, block: int | None = None) -> Any:
    """The mask of a plan (or of every pattern of a program) at ``sizes``, as
    a matplotlib figure: the picture ``patternc compile --mask`` draws, for a
    notebook (it displays the returned figure).

    Args:
        compiled: a :class:`~patternc.Plan` or a :class:`~patternc.Program`.
        sizes: ``{group: size}`` or a ``TokenSpec`` list.
        block: cell size in tokens; default one cell per token up to 256
            tokens, else 128-token blocks (FlexAttention's).

    Returns:
        The ``matplotlib.figure.Figure``.

    Raises:
        RuntimeError: matplotlib is not installed.
        PatternError: sizes that do not fit the plan.

    >>> import patternc
    >>> plan = patternc.compile("groups a b\\na -> a [causal]\\nb -> a, b").patterns["default"]
    >>> figure = patternc.show(plan, {"a": 3, "b": 2})  # doctest: +SKIP
    """
    plans = [compiled] if isinstance(compiled, Plan) else list(compiled.patterns.values())
    layouts = [plan.layout(sizes) for plan in plans]
    if block is None:
        block = 1 if max(layout.n_tokens for layout in layouts) <= 256 else 128
    return mask_figure([(plan.name, block_classes(layout, block)) for plan, layout in zip(plans, layouts)])
