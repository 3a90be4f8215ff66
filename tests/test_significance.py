"""Statistics between heads on constructed predictions whose answers are known, checked
against scipy (and statsmodels where it is installed) or an independent calculation."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from mim_agg.report.significance import (
    ALPHA,
    bootstrap_interval,
    holm,
    mcnemar_exact,
    mean_interval,
)


def paired(both: int, only_first: int, only_second: int, neither: int):
    """Right/wrong per image of two heads with the given counts, shuffled the same way."""
    first = [True] * both + [True] * only_first + [False] * only_second + [False] * neither
    second = [True] * both + [False] * only_first + [True] * only_second + [False] * neither
    order = np.random.default_rng(0).permutation(len(first))
    return np.array(first)[order], np.array(second)[order]


def exact_mcnemar_by_hand(b: int, c: int) -> float:
    """Two-sided exact McNemar with integers: twice the smaller tail of Binomial(b + c, 1/2)."""
    n = b + c
    tail = sum(math.comb(n, i) for i in range(min(b, c) + 1))
    return min(1.0, 2 * tail / 2**n)


def test_identical_heads_are_not_significantly_different():
    correct = np.random.default_rng(1).random(1000) < 0.7
    result = mcnemar_exact(correct, correct.copy())
    assert (result.only_first, result.only_second, result.p_value) == (0, 0, 1.0)
    assert holm([result.p_value, result.p_value]) == [1.0, 1.0]


def test_a_head_right_on_60_more_of_1000_images_is_significantly_better():
    # 600 vs 540 right: 80 images only the first gets right, 20 only the second
    first, second = paired(both=520, only_first=80, only_second=20, neither=380)
    assert (first.sum(), second.sum()) == (600, 540)
    result = mcnemar_exact(first, second)
    assert (result.only_first, result.only_second) == (80, 20)
    assert result.p_value == pytest.approx(exact_mcnemar_by_hand(80, 20), rel=1e-9)
    assert result.p_value < 1e-8
    # still significant after Holm among five comparisons
    assert holm([result.p_value, 0.5, 0.9, 0.2, 0.04])[0] < ALPHA


def test_the_same_accuracies_with_balanced_disagreement_are_not_significant():
    first, second = paired(both=500, only_first=30, only_second=30, neither=440)
    result = mcnemar_exact(first, second)
    assert result.p_value == pytest.approx(1.0)
    # 60 more right, but on 60 of 60 discordant images: 2 / 2^60
    first, second = paired(both=500, only_first=60, only_second=0, neither=440)
    assert mcnemar_exact(first, second).p_value == pytest.approx(2 / 2**60, rel=1e-9)


@pytest.mark.parametrize("b,c", [(0, 1), (1, 1), (3, 9), (12, 4), (40, 61), (500, 430)])
def test_mcnemar_equals_the_exact_binomial_calculation(b, c):
    first, second = paired(both=50, only_first=b, only_second=c, neither=50)
    assert mcnemar_exact(first, second).p_value == pytest.approx(
        exact_mcnemar_by_hand(b, c), rel=1e-9
    )


def test_mcnemar_equals_statsmodels():
    contingency = pytest.importorskip("statsmodels.stats.contingency_tables")
    for b, c in [(3, 9), (40, 61), (500, 430)]:
        first, second = paired(both=50, only_first=b, only_second=c, neither=50)
        expected = contingency.mcnemar([[50, b], [c, 50]], exact=True).pvalue
        assert mcnemar_exact(first, second).p_value == pytest.approx(expected, rel=1e-9)


def test_holm_by_hand():
    # sorted 0.005, 0.01, 0.03, 0.04 x 4, 3, 2, 1 = 0.02, 0.03, 0.06, 0.04 -> running max
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert holm([0.6, 0.9]) == [1.0, 1.0]  # capped
    assert holm([0.02]) == [0.02] and holm([]) == []


def test_holm_equals_statsmodels():
    multitest = pytest.importorskip("statsmodels.stats.multitest")
    p_values = list(np.random.default_rng(2).random(12) ** 3)
    expected = multitest.multipletests(p_values, method="holm")[1]
    assert holm(p_values) == pytest.approx(list(expected), rel=1e-12)


def test_bootstrap_interval_is_scipys_percentile_bootstrap_without_its_noise():
    correct = np.random.default_rng(3).random(1000) < 0.62
    low, high = bootstrap_interval(correct)
    scipy_result = stats.bootstrap(
        (correct.astype(float),),
        np.mean,
        method="percentile",
        n_resamples=20_000,
        random_state=np.random.default_rng(4),
    )
    interval = scipy_result.confidence_interval
    assert low == pytest.approx(interval.low, abs=0.003)  # Monte Carlo error: ~0.001
    assert high == pytest.approx(interval.high, abs=0.003)
    # and the normal approximation of a binomial proportion, at n = 1000
    accuracy = correct.mean()
    half = 1.959964 * math.sqrt(accuracy * (1 - accuracy) / len(correct))
    assert (low, high) == pytest.approx((accuracy - half, accuracy + half), abs=0.002)


def test_bootstrap_interval_at_the_edges():
    assert bootstrap_interval(np.ones(50, bool)) == (1.0, 1.0)
    assert bootstrap_interval(np.zeros(50, bool)) == (0.0, 0.0)
    with pytest.raises(ValueError, match="No test images"):
        bootstrap_interval(np.zeros(0, bool))


def test_t_interval_of_the_mean_over_seeds():
    low, high = mean_interval([0.6, 0.7, 0.8])
    half = 4.302652729911275 * 0.1 / math.sqrt(3)  # t quantile 0.975 at 2 degrees of freedom
    assert (low, high) == pytest.approx((0.7 - half, 0.7 + half), rel=1e-9)
    assert mean_interval([0.7]) is None
    assert mean_interval([0.7, 0.7]) == (0.7, 0.7)
