"""``benchmarks/bench_paired.py``'s statistics (the GPU side of the
benchmark needs CUDA; the verdict's arithmetic does not)."""

from __future__ import annotations

import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bench_paired


def test_median_interval_covers_the_true_median_about_95_percent_of_the_time() -> None:
    """Paired ratios drawn around a known median (a skewed, heavy-tailed
    spread, as host jitter is): the interval holds it in about 95% of runs,
    at odd and even sample counts, and narrows as the rounds grow."""
    rng = random.Random(0)
    mean_width = {}
    for n in (101, 400):
        held, widths = 0, []
        for _ in range(400):
            ratios = [1.0 + rng.lognormvariate(-4.0, 0.8) - 0.0183156 for _ in range(n)]  # median exactly 1.0
            median, low, high = bench_paired.median_interval(ratios)
            assert low <= median <= high
            held += low <= 1.0 <= high
            widths.append(high - low)
        assert 0.90 <= held / 400 <= 0.99, held
        mean_width[n] = sum(widths) / 400
    assert mean_width[400] < 0.6 * mean_width[101]  # about half: the width goes as 1/sqrt(n)


def test_the_verdict_resolves_a_real_gap_and_clears_a_small_one() -> None:
    """Under 3% jitter, 400 rounds show a 1% gap within 3% and do not show a
    5% gap within it; 8 rounds of the 1% gap show nothing either way (the
    interval is too wide to clear 1.03)."""
    rng = random.Random(1)

    def ratios(gap: float, rounds: int) -> list[float]:
        return [1.0 + gap + rng.gauss(0.0, 0.03) for _ in range(rounds)]

    assert bench_paired.shown_within(ratios(0.01, 400))
    assert not bench_paired.shown_within(ratios(0.05, 400))
    assert not bench_paired.shown_within(ratios(0.01, 8))


def test_percentile_reads_the_low_end() -> None:
    values = list(range(100, 0, -1))
    assert bench_paired.percentile(values, 0.1) == 11
    assert bench_paired.percentile(values, 0.0) == 1
    assert bench_paired.percentile([5.0], 0.1) == 5.0
