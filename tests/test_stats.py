"""capsexp.report.stats against the exact bootstrap distribution, enumerated in float64."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from capsexp.report.stats import (NO_DIFFERENCE, NOT_SUPPORTED, SUPPORTED, Difference, binomial_se, paired_bootstrap,
                                  verdict)


def exact_interval(d: np.ndarray, confidence: float = 0.95) -> tuple[float, float]:
    """Every resample of the pairs, each equally likely: the percentile interval of its means."""
    n = len(d)
    means = np.sort([d[list(idx)].mean() for idx in itertools.product(range(n), repeat=n)])
    alpha = (1 - confidence) / 2
    return (float(np.quantile(means, alpha, method="inverted_cdf")),
            float(np.quantile(means, 1 - alpha, method="inverted_cdf")))


def unpaired(a: np.ndarray, b: np.ndarray, resamples: int = 20_000) -> tuple[float, float]:
    """The mistake the pairing avoids: resampling each arm on its own."""
    rng = np.random.default_rng(0)
    n = len(a)
    means = [b[rng.integers(0, n, n)].mean() - a[rng.integers(0, n, n)].mean() for _ in range(resamples)]
    return float(np.quantile(means, 0.025)), float(np.quantile(means, 0.975))


def test_three_pairs_span_the_smallest_to_the_largest_difference() -> None:
    # with three pairs each extreme resample has probability 1/27 > 2.5%, so the exact interval is [min d, max d]
    a = np.array([0.50, 0.61, 0.55])
    b = np.array([0.58, 0.64, 0.71])
    got = paired_bootstrap(a, b)
    d = b - a
    assert got.mean == pytest.approx(d.mean(), abs=1e-12)
    assert (got.low, got.high) == pytest.approx((d.min(), d.max()), abs=1e-12)
    assert (got.low, got.high) == pytest.approx(exact_interval(d), abs=1e-12)
    assert got.pairs == 3


def test_five_pairs_match_the_enumerated_distribution() -> None:
    rng = np.random.default_rng(3)
    a = rng.normal(0.6, 0.05, 5)
    b = a + rng.normal(0.02, 0.03, 5)  # correlated with a, as paired arms are
    got = paired_bootstrap(a, b, resamples=50_000)
    low, high = exact_interval(b - a)
    assert got.low == pytest.approx(low, abs=0.004)
    assert got.high == pytest.approx(high, abs=0.004)
    # the planted error: resampling the arms independently ignores the pairing and widens the interval
    wrong_low, wrong_high = unpaired(a, b)
    assert abs(wrong_low - low) > 0.01 or abs(wrong_high - high) > 0.01


def test_identical_differences_give_a_point_interval() -> None:
    got = paired_bootstrap([0.1, 0.2, 0.3], [0.2, 0.3, 0.4])
    assert (got.mean, got.low, got.high) == pytest.approx((0.1, 0.1, 0.1))


def test_unequal_lengths_are_refused() -> None:
    with pytest.raises(ValueError, match="equally long"):
        paired_bootstrap([0.1, 0.2], [0.1])


@pytest.mark.parametrize(("low", "high", "predicts", "expected"), [
    (0.01, 0.05, +1, SUPPORTED), (0.01, 0.05, -1, NOT_SUPPORTED), (0.01, 0.05, 0, SUPPORTED),
    (-0.05, -0.01, -1, SUPPORTED), (-0.05, -0.01, +1, NOT_SUPPORTED), (-0.05, 0.01, -1, NO_DIFFERENCE),
    (-0.05, 0.0, -1, NO_DIFFERENCE), (0.0, 0.0, 0, NO_DIFFERENCE)])
def test_a_verdict_needs_an_interval_that_excludes_zero(low: float, high: float, predicts: int, expected: str) -> None:
    assert verdict(Difference((low + high) / 2, low, high, 3), predicts) == expected


def test_an_interval_inside_the_scoring_noise_is_no_difference() -> None:
    floor = binomial_se(0.89, 1000)
    assert floor == pytest.approx((0.89 * 0.11 / 1000) ** 0.5, rel=1e-12)
    tight = Difference(-0.002, -0.003, -0.002, 3)  # every seed agrees, but by a fraction of one SE
    assert verdict(tight, -1) == SUPPORTED  # over seeds alone it would decide
    assert verdict(tight, -1, floor) == NO_DIFFERENCE
    assert verdict(Difference(-0.05, -0.07, -0.03, 3), -1, floor) == SUPPORTED
    assert verdict(Difference(0.02, floor + 1e-6, 0.03, 3), +1, floor) == SUPPORTED
    assert verdict(Difference(0.02, floor - 1e-6, 0.03, 3), +1, floor) == NO_DIFFERENCE
