"""Paired comparisons across seeds: the mean difference, its 95% bootstrap interval, and the verdict
that the interval allows. The Findings study (scripts/findings.py) states every difference this way."""

from __future__ import annotations

import math
from typing import NamedTuple, Sequence

import numpy as np
from scipy import stats

SUPPORTED, NOT_SUPPORTED, NO_DIFFERENCE = "supported", "not supported", "no difference detected at this scale"


class Difference(NamedTuple):
    """``mean`` of ``b - a`` over the pairs, and its interval ``[low, high]``."""

    mean: float
    low: float
    high: float
    pairs: int


def paired_bootstrap(a: Sequence[float], b: Sequence[float], confidence: float = 0.95,
                     resamples: int = 20_000, seed: int = 0) -> Difference:
    """The percentile bootstrap of ``mean(b - a)``, resampling the pairs (seeds) with replacement.

    Pairing keeps what a seed shares across arms (start, data order) out of the interval. The
    percentile method, not BCa: with three pairs BCa's jackknife acceleration is degenerate, and
    the percentile interval of three differences spans roughly their range, so it excludes zero
    only when every seed agrees on the sign."""
    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if x.shape != y.shape or x.ndim != 1 or len(x) == 0:
        raise ValueError(f"paired_bootstrap needs two equally long, non-empty lists; got {len(x)} and {len(y)}")
    d = y - x
    if len(d) == 1 or np.ptp(d) == 0.0:  # nothing to resample: every resample has the same mean
        return Difference(float(d.mean()), float(d.mean()), float(d.mean()), len(d))
    res = stats.bootstrap((x, y), lambda u, v, axis=-1: np.mean(v - u, axis=axis), paired=True, vectorized=True,
                          confidence_level=confidence, n_resamples=resamples, method="percentile",
                          random_state=np.random.default_rng(seed))
    return Difference(float(d.mean()), float(res.confidence_interval.low), float(res.confidence_interval.high),
                      len(d))


def binomial_se(accuracy: float, images: int) -> float:
    """The standard error of an accuracy measured on ``images`` images: sqrt(p (1 - p) / n)."""
    return math.sqrt(max(accuracy * (1.0 - accuracy), 0.0) / images) if images > 0 else math.inf


def verdict(diff: Difference, predicts: int, floor: float = 0.0) -> str:
    """``predicts``: the sign of ``b - a`` the claim expects (+1 or -1), or 0 for "they differ".

    Only an interval that clears the band ``[-floor, floor]`` decides; one that reaches into it is no
    difference. The interval is over seeds, and every arm is scored on the same images, so it does
    not see the sampling error of those images: ``floor`` is that error (``binomial_se`` for an
    accuracy), below which a difference says nothing about images not scored."""
    if math.isnan(diff.low) or (diff.low <= floor and diff.high >= -floor):
        return NO_DIFFERENCE
    sign = 1 if diff.low > 0 else -1
    return SUPPORTED if predicts in (0, sign) else NOT_SUPPORTED
