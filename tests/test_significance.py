"""Statistics between heads on constructed predictions whose answers are known, checked
against scipy, statsmodels (a dev dependency) or an independent calculation."""

from __future__ import annotations

import csv
import math
import re

import numpy as np
import pytest
from scipy import stats

from mim_agg.errors import UserError
from mim_agg.report.significance import (
    ALPHA,
    bootstrap_interval,
    holm,
    mcnemar_exact,
    mean_interval,
)
from mim_agg.runs.runner import run_task
from mim_agg.utils.predictions import FILE, HeadPredictions, read_predictions, write_predictions
from tests.helpers import compose_config
from tests.test_report import fake_job, fake_sweep


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
    from statsmodels.stats import contingency_tables as contingency

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
    from statsmodels.stats import multitest

    p_values = list(np.random.default_rng(2).random(12) ** 3)
    expected = multitest.multipletests(p_values, method="holm")[1]
    assert holm(p_values) == pytest.approx(list(expected), rel=1e-12)


def scipys_percentile_interval(values: np.ndarray, resamples: int, seed: int):
    """scipy's percentile bootstrap of the mean of ``values`` (one per image), drawn."""
    return stats.bootstrap(
        (values.astype(float),),
        np.mean,
        method="percentile",
        n_resamples=resamples,
        random_state=np.random.default_rng(seed),
    ).confidence_interval


def test_bootstrap_interval_is_scipys_percentile_bootstrap_without_its_noise():
    correct = np.random.default_rng(3).random(1000) < 0.62
    low, high = bootstrap_interval(correct)
    interval = scipys_percentile_interval(correct, 20_000, seed=4)
    assert low == pytest.approx(interval.low, abs=0.003)  # Monte Carlo error: ~0.001
    assert high == pytest.approx(interval.high, abs=0.003)
    # and the normal approximation of a binomial proportion, at n = 1000
    accuracy = correct.mean()
    half = 1.959964 * math.sqrt(accuracy * (1 - accuracy) / len(correct))
    assert (low, high) == pytest.approx((accuracy - half, accuracy + half), abs=0.002)


def test_the_seed_means_bootstrap_is_scipys_over_the_shared_images():
    """Three seeds on the same 300 images: resampling images (each with its seeds' answers)
    and averaging over seeds is scipy's percentile bootstrap of the per-image seed mean; two
    seeds that agree get one seed's interval, never the zero width of their t-interval."""
    rng = np.random.default_rng(5)
    correct = rng.random((3, 300)) < np.array([[0.7], [0.75], [0.8]])
    low, high = bootstrap_interval(correct)
    interval = scipys_percentile_interval(correct.mean(0), 50_000, seed=6)
    assert low == pytest.approx(interval.low, abs=0.004)  # Monte Carlo error: ~0.001
    assert high == pytest.approx(interval.high, abs=0.004)
    assert low < correct.mean() < high
    agreeing = np.stack([correct[0], correct[0]])
    assert bootstrap_interval(agreeing) == bootstrap_interval(correct[0])
    assert mean_interval([correct[0].mean()] * 2) == (correct[0].mean(),) * 2


def test_bootstrap_interval_at_the_edges():
    """All right (or all wrong), in one seed or every seed: no resample differs, so the exact
    binomial interval on the images stands in, never a zero width (0.025^(1/n) at 100%)."""
    for correct in (np.ones(50, bool), np.ones((3, 50), bool)):
        assert bootstrap_interval(correct) == pytest.approx((0.025 ** (1 / 50), 1.0), rel=1e-9)
    low, high = bootstrap_interval(np.zeros(50, bool))
    assert low == 0.0 and high == pytest.approx(1 - 0.025 ** (1 / 50), rel=1e-9)
    with pytest.raises(ValueError, match="No test images"):
        bootstrap_interval(np.zeros(0, bool))


def test_t_interval_of_the_mean_over_seeds():
    low, high = mean_interval([0.6, 0.7, 0.8])
    half = 4.302652729911275 * 0.1 / math.sqrt(3)  # t quantile 0.975 at 2 degrees of freedom
    assert (low, high) == pytest.approx((0.7 - half, 0.7 + half), rel=1e-9)
    assert mean_interval([0.7]) is None
    assert mean_interval([0.7, 0.7]) == (0.7, 0.7)


# ---------------------------------------------------------------- the report's marks
def job_with_predictions(sweep_dir, number, overrides, heads: dict, targets, heldout: dict):
    """A finished probe job whose heads predicted ``heads[name]`` on images with ``targets``."""
    rows = [
        (name, 0.1, heldout[name], float(np.mean(predicted == targets)))
        for name, predicted in heads.items()
    ]
    run_dir = fake_job(sweep_dir, number, overrides, heads=rows)
    predictions = HeadPredictions.in_image_order(np.arange(len(targets)), targets, heads, 10)
    write_predictions(run_dir / FILE, predictions)
    return run_dir


def predicted_from(correct: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Right where ``correct``, the next class elsewhere."""
    return np.where(correct, targets, (targets + 1) % 10)


@pytest.fixture
def constructed_sweep(tmp_path):
    """One job, four heads on 1,000 images: ``best`` (chosen on held-out), ``worse`` right on
    60 fewer (80 vs 20 discordant), ``twin`` identical to ``best``, ``close`` 2 fewer."""
    sweep_dir = fake_sweep(tmp_path, ["seed=0"])
    targets = np.random.default_rng(5).integers(0, 10, 1000)
    best, worse = paired(both=520, only_first=80, only_second=20, neither=380)
    close = best.copy()
    close[np.flatnonzero(best)[:3]] = False
    close[np.flatnonzero(~best)[:1]] = True
    heads = {
        "best": predicted_from(best, targets),
        "worse": predicted_from(worse, targets),
        "twin": predicted_from(best, targets),
        "close": predicted_from(close, targets),
    }
    heldout = {"best": 0.9, "worse": 0.5, "twin": 0.8, "close": 0.7}
    job_with_predictions(sweep_dir, 0, ["seed=0"], heads, targets, heldout)
    return sweep_dir


def test_the_report_marks_heads_not_significantly_different_from_the_winner(constructed_sweep):
    run_task(compose_config(["task=report", f"report.sweep_dir={constructed_sweep}"]))
    text = (constructed_sweep / "results.md").read_text()

    def interval(accuracy):  # the binomial's 2.5% and 97.5% quantiles, in percent
        return ", ".join(f"{stats.binom.ppf(q, 1000, accuracy) / 10:.2f}" for q in (0.025, 0.975))

    assert f"| best | 60.00 [{interval(0.6)}] (1) ★ |" in text
    assert f"| worse | 54.00 [{interval(0.54)}] (1) |" in text  # significantly worse
    assert f"| twin | 60.00 [{interval(0.6)}] (1) ≈ |" in text
    assert f"| close | 59.80 [{interval(0.598)}] (1) ≈ |" in text
    assert "No per-image predictions" not in text
    with open(constructed_sweep / "significance.csv") as handle:
        tests = {row["head_label"]: row for row in csv.DictReader(handle)}
    raw = {
        "worse": exact_mcnemar_by_hand(80, 20),
        "twin": 1.0,
        "close": exact_mcnemar_by_hand(3, 1),
    }
    assert {h: float(t["p_value"]) for h, t in tests.items()} == pytest.approx(raw, rel=1e-9)
    # Holm by hand: 3 x the smallest, then 2 x the next (at least the previous), then 1 x
    assert float(tests["worse"]["p_holm"]) == pytest.approx(3 * raw["worse"], rel=1e-9)
    assert float(tests["close"]["p_holm"]) == pytest.approx(min(1, 2 * raw["close"]))
    assert (tests["worse"]["only_winner_right"], tests["worse"]["only_head_right"]) == ("80", "20")
    assert (constructed_sweep / "results.png").is_file()


def test_the_figure_hatches_heads_not_significantly_different_and_stars_the_winner(
    constructed_sweep,
):
    from mim_agg.report.comparisons import RunPredictions, compare
    from mim_agg.report.figure import results_figure
    from mim_agg.report.runs import read_sweeps
    from mim_agg.report.table import cells, head_rows

    jobs = read_sweeps([constructed_sweep])
    table = cells(head_rows(jobs, []), [])
    fig = results_figure(table, [], "title", compare(table, [], RunPredictions(jobs)))
    (ax,) = fig.axes
    heads = [tick.get_text() for tick in ax.get_xticklabels()]
    hatched = {
        heads[round(bar.get_x() + bar.get_width() / 2)] for bar in ax.patches if bar.get_hatch()
    }
    assert hatched == {"twin", "close"}
    (star,) = [line for line in ax.get_lines() if line.get_marker() == "*"]
    assert heads[round(star.get_xdata()[0])] == "best"
    (legend,) = fig.legends
    texts = " | ".join(t.get_text().replace("\n", " ") for t in legend.get_texts())
    assert "★ the winner of its column" in texts and "≈ not significantly different" in texts
    assert "error bars: 95% interval, over the test images for one seed" in texts


def test_predictions_of_other_test_images_in_one_column_are_refused(tmp_path):
    sweep_dir = fake_sweep(tmp_path, ["aggregator=cls,mean"])  # one column, two runs
    targets = np.arange(100) % 10
    shifted = (targets + 1) % 10  # other labels: another test split
    cls, mean = ["aggregator=cls"], ["aggregator=mean"]
    first = job_with_predictions(sweep_dir, 0, cls, {"cls": targets}, targets, {"cls": 0.9})
    second = job_with_predictions(sweep_dir, 1, mean, {"mean": shifted}, shifted, {"mean": 0.8})
    with pytest.raises(UserError, match=f"{first}/{FILE} and {second}/{FILE} hold different"):
        run_task(compose_config(["task=report", f"report.sweep_dir={sweep_dir}"]))


def test_a_predictions_file_that_disagrees_with_its_heads_csv_is_refused(constructed_sweep):
    (run_dir,) = [p.resolve() for p in constructed_sweep.iterdir() if p.is_symlink()]
    predictions = read_predictions(run_dir / FILE)
    predictions.predicted["worse"] = predictions.targets.copy()  # another run's, say
    write_predictions(run_dir / FILE, predictions)
    with pytest.raises(
        UserError, match="gives head 'worse' a test accuracy of 1.000000, its heads"
    ):
        run_task(compose_config(["task=report", f"report.sweep_dir={constructed_sweep}"]))


def test_a_predictions_file_of_other_heads_is_refused_by_name(constructed_sweep):
    """Another run's file (other head names): refused, not read as 'no predictions' (which
    silently dropped the cell's interval and its column's marks)."""
    (run_dir,) = [p.resolve() for p in constructed_sweep.iterdir() if p.is_symlink()]
    predictions = read_predictions(run_dir / FILE)
    predictions.predicted = {"cls": predictions.predicted.pop("best"), **predictions.predicted}
    write_predictions(run_dir / FILE, predictions)
    message = f"{run_dir / FILE} holds no predictions of head 'best', which the run's heads.csv"
    with pytest.raises(UserError, match=re.escape(message) + ".*resume=false.*remove it"):
        run_task(compose_config(["task=report", f"report.sweep_dir={constructed_sweep}"]))


def test_a_report_rerun_leaves_no_file_of_the_previous_one(constructed_sweep):
    """Rerun without predictions: the previous report's significance.csv (and any other file
    this one does not write) goes; files that are not the report's stay."""
    from mim_agg.tasks.report import OUTPUTS

    report = compose_config(["task=report", f"report.sweep_dir={constructed_sweep}"])
    run_task(report)
    first = {path.name for path in constructed_sweep.iterdir() if not path.is_symlink()}
    assert first - {"multirun.yaml"} <= set(OUTPUTS) and "significance.csv" in first
    for name in ("results_published.csv", "results_evaluate.csv", "results_row.md", "mine.csv"):
        (constructed_sweep / name).write_text("a previous report's\n")
    (run_dir,) = [p.resolve() for p in constructed_sweep.iterdir() if p.is_symlink()]
    (run_dir / FILE).unlink()
    run_task(report)
    second = {path.name for path in constructed_sweep.iterdir() if not path.is_symlink()}
    assert second == first - {"significance.csv"} | {"mine.csv"}
    assert "No per-image predictions" in (constructed_sweep / "results.md").read_text()


def test_over_seeds_a_head_differs_only_when_it_does_in_every_seed(tmp_path):
    """Two seeds: ``worse`` is 60 images behind in both, ``sometimes`` in seed 0 alone."""
    sweep_dir = fake_sweep(tmp_path, ["seed=0,1"])
    targets = np.random.default_rng(6).integers(0, 10, 1000)
    best, worse = paired(both=520, only_first=80, only_second=20, neither=380)
    heldout = {"best": 0.9, "worse": 0.5, "sometimes": 0.6}
    for seed in (0, 1):
        heads = {
            "best": predicted_from(best, targets),
            "worse": predicted_from(worse, targets),
            "sometimes": predicted_from(worse if seed == 0 else best, targets),
        }
        job_with_predictions(sweep_dir, seed, [f"seed={seed}"], heads, targets, heldout)
    run_task(compose_config(["task=report", f"report.sweep_dir={sweep_dir}"]))
    text = (sweep_dir / "results.md").read_text()

    def interval(accuracy):  # two seeds that agree: one seed's bootstrap, not a zero width
        return ", ".join(f"{stats.binom.ppf(q, 1000, accuracy) / 10:.2f}" for q in (0.025, 0.975))

    assert f"| best | 60.00 ± 0.00 [{interval(0.6)}] (2) ★ |" in text
    assert f"| worse | 54.00 ± 0.00 [{interval(0.54)}] (2) |" in text  # behind in both seeds
    half = 12.706204736174698 * (100 * np.std([0.54, 0.6], ddof=1)) / 2**0.5  # the wider
    assert f"| sometimes | 57.00 ± 4.24 [{57 - half:.2f}, {57 + half:.2f}] (2) ≈ |" in text
    assert "the hull of its t-interval over the seeds and its percentile bootstrap" in text
    with open(sweep_dir / "significance.csv") as handle:
        tests = list(csv.DictReader(handle))
    assert len(tests) == 4  # two heads, two seeds
