"""How much a test accuracy, and a difference between heads, can be trusted.

Per head, a 95% percentile-bootstrap interval of its test accuracy over the test images (of the
mean over seeds, for several, on the same images); between two heads tested on the same images,
McNemar's exact test; across the heads compared with one winner, Holm's step-down correction;
across seeds, the t-interval of the mean.

Choices, and why:
- **Bootstrap**: the percentile bootstrap of a mean of 0/1 values (right or wrong per image)
  resamples ``n`` images with replacement, so a resample's count of right answers is
  Binomial(n, accuracy) exactly. Its interval as the number of resamples grows is therefore
  the 2.5% and 97.5% quantiles of that binomial divided by ``n``, which ``bootstrap_interval``
  computes directly: no random draws, no seed, microseconds where 10,000 resamples of
  ImageNet's 50,000 images would draw 5 x 10^8 indices per head (tested against
  ``scipy.stats.bootstrap(method="percentile")``). BCa, scipy's default, corrects a skew that
  a binomial proportion away from 0 and 1 hardly has, at the cost of a jackknife over images.
  Over ``S`` seeds scored on the same images, a resample draws images, each with its count of
  seeds right (0..S), so the resampled total is the ``n``-fold convolution of those counts'
  distribution, computed exactly by one FFT (``S = 1``: the binomial). It holds what the
  t-interval over seeds cannot: two seeds that agree give a t-interval of width 0, while the
  test set they share is as finite as one seed's.
- **Edges**: where every image is right (or every one wrong) in every seed, every resample is
  the same and the percentile interval has width 0, as if 80 images proved 100%. There the
  exact binomial interval on the ``n`` images (Clopper-Pearson, ``scipy.stats.binomtest``)
  takes its place: ``[0.025^(1/n), 1]`` at 100%.
- **McNemar, exact always**: only the images on which the two heads disagree in being right
  count; under "equally accurate", each is the first head's with probability 1/2, so the
  two-sided binomial test of ``b`` of ``b + c`` at 1/2 is exact for every count
  (``scipy.stats.binomtest``: microseconds even at 50,000 discordant images). The chi-square
  form with continuity correction only approximates it, so it is never used.
- **Holm**: the comparisons of one winner with ``m`` other heads are ``m`` tests; Holm's
  step-down keeps the chance of any false "different" at 0.05 without assuming independence,
  and is uniformly more powerful than Bonferroni. scipy has no Holm (its
  ``false_discovery_control`` controls the false-discovery rate, a weaker claim), so it is
  written here.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats

ALPHA = 0.05  # a difference with Holm-adjusted p below this is called significant
CONFIDENCE = 0.95
# What a report cell's interval is (``comparisons.interval``), as its legend says it.
INTERVAL_KINDS = {
    "bootstrap": "over the test images for one seed (percentile bootstrap)",
    "t": "of the mean over seeds, over the seeds alone (t-interval: runs without predictions)",
    "t+bootstrap": "of the mean over seeds, the hull of its t-interval over the seeds and its "
    "percentile bootstrap over their shared test images",
}


def bootstrap_interval(correct: np.ndarray, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """The percentile-bootstrap interval of the accuracy of ``correct`` (one bool per image;
    ``[S, n]``: per seed, the same ``n`` images, for the mean over seeds), in the limit of
    infinitely many resamples of the images: binomial quantiles for one seed, the quantiles of
    the convolved per-image counts for several; Clopper-Pearson's where all are right or all
    wrong (see the module's note)."""
    seeds = np.atleast_2d(correct)
    n = seeds.shape[1]
    if n == 0:
        raise ValueError("No test images: an accuracy needs at least one.")
    if seeds.all() or not seeds.any():  # nothing to resample: the exact interval (module note)
        exact = stats.binomtest(n if seeds.all() else 0, n).proportion_ci(confidence, "exact")
        return float(exact.low), float(exact.high)
    tail = (1 - confidence) / 2
    if len(seeds) == 1:
        low, high = stats.binom.ppf([tail, 1 - tail], n, np.count_nonzero(seeds) / n)
        return float(low) / n, float(high) / n
    total = len(seeds) * n  # right answers of every seed, at most
    counts = np.bincount(np.count_nonzero(seeds, axis=0), minlength=len(seeds) + 1) / n
    size = 1 << total.bit_length()  # > total: the circular convolution never wraps
    resampled = np.fft.irfft(np.fft.rfft(counts, size) ** n, size)[: total + 1].clip(min=0)
    cdf = np.cumsum(resampled) / resampled.sum()
    low, high = np.searchsorted(cdf, [tail, 1 - tail])
    return float(low) / total, float(high) / total


@dataclass(frozen=True)
class McNemar:
    only_first: int  # images the first head gets right and the second wrong
    only_second: int  # the reverse
    p_value: float  # two-sided, exact

    @property
    def discordant(self) -> int:
        return self.only_first + self.only_second


def mcnemar_exact(first_correct: np.ndarray, second_correct: np.ndarray) -> McNemar:
    """McNemar's exact test of two heads' accuracies on the same images (in the same order)."""
    if first_correct.shape != second_correct.shape:
        raise ValueError(
            f"Paired tests need the same images: {first_correct.shape} vs {second_correct.shape}."
        )
    only_first = int(np.count_nonzero(first_correct & ~second_correct))
    only_second = int(np.count_nonzero(second_correct & ~first_correct))
    discordant = only_first + only_second
    if discordant == 0:  # identical right/wrong patterns: nothing speaks for a difference
        return McNemar(0, 0, 1.0)
    p_value = stats.binomtest(only_first, discordant, 0.5, alternative="two-sided").pvalue
    return McNemar(only_first, only_second, float(p_value))


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values, in the order given: the i-th smallest of ``m`` is
    multiplied by ``m - i`` (i from 0), made non-decreasing along that order, capped at 1."""
    order = sorted(range(len(p_values)), key=lambda i: p_values[i])
    adjusted = [0.0] * len(p_values)
    running = 0.0
    for rank, index in enumerate(order):
        running = max(running, min(1.0, (len(p_values) - rank) * p_values[index]))
        adjusted[index] = running
    return adjusted


def mean_interval(values: Sequence[float], confidence: float = CONFIDENCE):
    """``(low, high)``: the t-interval of the mean of ``values`` (e.g. one accuracy per seed),
    or None for fewer than two values (no spread to estimate)."""
    if len(values) < 2:
        return None
    mean = float(np.mean(values))
    sem = float(np.std(values, ddof=1)) / math.sqrt(len(values))
    if sem == 0:
        return mean, mean
    low, high = stats.t.interval(confidence, len(values) - 1, loc=mean, scale=sem)
    return float(low), float(high)
