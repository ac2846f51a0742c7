"""The statistics of the report: a Student t interval of each variant's mean over seeds, the
paired difference to the baseline on the same seeds (paired t-test and its interval), and
how many seeds a difference of the observed size would need, from the observed variance.

The paired comparison is the right one here: a seed fixes the initial weights, the batch
order and (optionally) the split for every variant alike, so the seed-to-seed noise that
the variants share cancels in the difference (Student 1908; any statistics text)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats

CONFIDENCE = 0.95
POWER = 0.8
MAX_SEEDS = 10_000
ROUNDING = 1e-6


@dataclass
class Interval:
    """Mean over n values, their standard deviation (n - 1 in the denominator) and the
    ``CONFIDENCE`` Student t interval of the mean (NaN below 2 values)."""

    n: int
    mean: float
    std: float
    low: float
    high: float


def _interval(result: object, values: np.ndarray) -> Interval:
    n = len(values)
    mean = float(values.mean()) if n else math.nan
    std = float(values.std(ddof=1)) if n > 1 else math.nan
    if n < 2:
        return Interval(n, mean, std, math.nan, math.nan)
    if std == 0.0:  # every seed gave the same value: scipy's interval is NaN, the truth a point
        return Interval(n, mean, std, mean, mean)
    ci = result.confidence_interval(CONFIDENCE)  # type: ignore[attr-defined]
    return Interval(n, mean, std, float(ci.low), float(ci.high))


def mean_interval(values: Sequence[float]) -> Interval:
    """The Student t interval of the mean of ``values`` (one per seed)."""
    x = np.asarray(values, dtype=float)
    result = stats.ttest_1samp(x, 0.0) if len(x) > 1 and x.std() > 0 else None
    return _interval(result, x)


@dataclass
class Paired:
    """The mean of variant - baseline over the common seeds, its interval, the two-sided
    p-value of the paired t-test, and the verdict."""

    diff: Interval
    pvalue: float
    verdict: str
    seeds_needed: int | None


def verdict(diff: Interval, higher_is_better: bool) -> str:
    """``better`` / ``worse`` when the interval of the difference excludes 0 (the paired
    t-test rejects "no difference" at 1 - CONFIDENCE), else no difference detected."""
    if diff.n < 2 or math.isnan(diff.low):
        return f"not enough paired seeds ({diff.n})"
    if diff.low > 0 or diff.high < 0:
        up = diff.low > 0
        return "better" if up == higher_is_better else "worse"
    return f"no difference detected at {diff.n} seeds"


def paired(variant: Sequence[float], baseline: Sequence[float], higher_is_better: bool) -> Paired:
    """Compare a variant with the baseline, value i of each from the same seed."""
    a, b = np.asarray(variant, dtype=float), np.asarray(baseline, dtype=float)
    d = a - b
    spread = len(d) > 1 and d.std() > 0
    result = stats.ttest_rel(a, b) if spread else None
    diff = _interval(result, d)
    # Logged metrics are float32: a mean difference within ~1e-6 of the values' size is their
    # rounding (0.975 - 0.9722 + 0.9722 - 0.975 != 0 in float32), not an effect.
    if len(d) and abs(diff.mean) <= ROUNDING * max(np.abs(a).max(), np.abs(b).max()):
        diff.mean = 0.0
    if result is not None:
        pvalue = float(result.pvalue)
    elif len(d) > 1:  # identical differences on every seed: zero is excluded unless all are 0
        pvalue = 1.0 if diff.mean == 0 else 0.0
    else:
        pvalue = math.nan
    return Paired(diff, pvalue, verdict(diff, higher_is_better), seeds_needed(diff))


def paired_power(effect: float, n: int, alpha: float = 1 - CONFIDENCE) -> float:
    """Power of the two-sided paired t-test with n pairs at standardized effect
    ``effect`` = mean / sd of the differences: P(|T| > t_crit) for T noncentral t with
    n - 1 degrees of freedom and noncentrality effect * sqrt(n) (Cohen 1988, ch. 2).

    statsmodels' TTestPower computes the same but is not a dependency; scipy's noncentral
    t makes it two lines."""
    df, nc = n - 1, effect * math.sqrt(n)
    critical = stats.t.ppf(1 - alpha / 2, df)
    return float(stats.nct.sf(critical, df, nc) + stats.nct.cdf(-critical, df, nc))


def seeds_for_power(effect: float, power: float = POWER) -> int | None:
    """The fewest seeds (pairs) at which the paired t-test detects a standardized effect
    with the given power; None if more than MAX_SEEDS (or no effect)."""
    if effect == 0 or not math.isfinite(effect):
        return None
    low, high = 2, 2
    while paired_power(abs(effect), high) < power:  # power grows with n: bracket, then bisect
        low, high = high, high * 2
        if high > MAX_SEEDS:
            return None
    while low < high:
        middle = (low + high) // 2
        if paired_power(abs(effect), middle) >= power:
            high = middle
        else:
            low = middle + 1
    return high


def seeds_needed(diff: Interval) -> int | None:
    """Seeds to detect a difference of the observed mean with POWER, taking the observed sd
    of the differences as the truth: an estimate, as uncertain as that sd."""
    if diff.n < 2 or not math.isfinite(diff.std) or diff.std == 0:
        return None
    return seeds_for_power(diff.mean / diff.std)
