"""Logistic regression: the L-BFGS fit minimises scikit-learn's objective for the same C (equal
test accuracy, close probabilities and coefficients), and the task's choice of C and its test
accuracy equal scikit-learn's on the cached features."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits
from sklearn.linear_model import LogisticRegression as SklearnLogisticRegression
from threadpoolctl import threadpool_limits

from mim_agg.cache import TokenCache
from mim_agg.errors import ConfigError
from mim_agg.logreg import c_grid, fit_logistic_regression
from mim_agg.runs.runner import run_task
from mim_agg.utils.predictions import FILE as PREDICTIONS
from mim_agg.utils.predictions import read_predictions
from tests.helpers import FAST, cached_features, compose_config

TOL = 1e-6  # both solvers stop when no gradient entry of the scaled objective exceeds it


def sklearn_fit(features, labels, C: float) -> SklearnLogisticRegression:
    """scikit-learn's multinomial L2 logistic regression (DINOv3's estimator), float64."""
    model = SklearnLogisticRegression(C=C, tol=TOL, max_iter=1000)
    with threadpool_limits(1):  # tiny matrices: threads only wait for each other
        return model.fit(features.astype(np.float64), labels)


@pytest.mark.parametrize(
    "C,dtype,close",
    [(0.01, torch.float64, 1e-4), (10.0, torch.float64, 2e-3), (0.1, torch.float32, 2e-3)],
)
def test_the_fit_equals_scikit_learns_for_the_same_c(C, dtype, close):
    """Real features (the 8x8 digits): the same predictions on held-back images, and the same
    minimiser: probabilities and weights agree to the solvers' tolerance."""
    x, y = load_digits(return_X_y=True)
    x = x / 16.0
    train, test = slice(0, 900), slice(900, None)
    reference = sklearn_fit(x[train], y[train], C)
    ours = fit_logistic_regression(
        torch.from_numpy(x[train]), torch.from_numpy(y[train]), 10, C, max_iter=1000, tol=TOL,
        dtype=dtype,
    )  # fmt: skip
    logits = ours.logits(torch.from_numpy(x[test])).double()
    np.testing.assert_array_equal(logits.argmax(1).numpy(), reference.predict(x[test]))
    probabilities = logits.softmax(1).numpy()
    assert np.abs(probabilities - reference.predict_proba(x[test])).max() < close
    weights = ours.weight.double().numpy()
    assert np.abs(weights - reference.coef_).max() < close * np.abs(reference.coef_).max()


def test_the_c_grid_is_dinos():
    """DINOv2/v3: ``10 ** torch.linspace(-6, 5, 45)``."""
    expected = (10 ** torch.linspace(-6, 5, 45, dtype=torch.float64)).tolist()
    assert c_grid(1e-6, 1e5, 45) == pytest.approx(expected, rel=1e-12)


def test_logreg_task_equals_scikit_learn_on_the_cached_features(tmp_path):
    """Held-out accuracy of every C, the chosen C (the first best), and the test accuracy of
    the model refitted on train + held-out, against scikit-learn on the same cached features."""
    grid = ["logreg.c_steps=3", "logreg.c_min=0.01", "logreg.c_max=1", f"logreg.tol={TOL}"]
    digits = ["dataset=digits", "dataset.train_size=300", "dataset.test_size=150"]
    overrides = [*FAST, "task=logreg", *digits, "aggregator=mean", "+aggregator@heads.cls=cls"]
    summary = run_task(compose_config([*overrides, *grid, "cache.dtype=float32"], tmp_path))
    (folder,) = (tmp_path / "cache").iterdir()
    cache = TokenCache(folder)
    stored = read_predictions(tmp_path / "run" / PREDICTIONS)
    for name, key in (("mean", "mean()"), ("cls", "cls()")):
        result = summary["heads"][name]
        train, heldout, test = (
            cached_features(cache, s, key) for s in ("train", "heldout", "test")
        )
        heldout_accuracy = {C: sklearn_fit(*train, C).score(*heldout) for C in c_grid(0.01, 1.0, 3)}
        assert list(result["heldout"].values()) == pytest.approx(list(heldout_accuracy.values()))
        best = max(heldout_accuracy, key=heldout_accuracy.get)
        assert result["C"] == pytest.approx(best) and result["val/acc1_best"] == pytest.approx(
            heldout_accuracy[best]
        )
        both = (np.concatenate([train[0], heldout[0]]), np.concatenate([train[1], heldout[1]]))
        predicted = sklearn_fit(*both, best).predict(test[0])
        assert result["test/acc1"] == pytest.approx((predicted == test[1]).mean())
        np.testing.assert_array_equal(stored.predicted[name], predicted)  # per test image
    np.testing.assert_array_equal(stored.targets, test[1])
    assert summary["winner"] == max(
        ("mean", "cls"), key=lambda n: summary["heads"][n]["val/acc1_best"]
    )
    csv = (tmp_path / "run" / "heads.csv").read_text()
    assert csv.startswith("head,aggregator,C,iterations,val/acc1_best,test/acc1")


def test_a_choice_of_c_needs_heldout_data(tmp_path, caplog):
    caplog.set_level("INFO", logger="mim_agg")
    overrides = [*FAST, "task=logreg", "dataset.heldout_fraction=0"]
    with pytest.raises(ConfigError, match=r"logreg.c_steps=45 values of C needs held-out data"):
        run_task(compose_config(overrides, tmp_path / "grid"))
    one = ["logreg.c_steps=1", "logreg.c_min=0.5", "logreg.max_iter=50"]
    summary = run_task(compose_config([*overrides, *one], tmp_path / "one"))
    assert summary["heads"]["cls"]["val/acc1_best"] is None and summary["heads"]["cls"]["C"] == 0.5
    assert "Result of cls: test acc1" in caplog.text and "chosen on held-out" not in caplog.text


def test_a_tolerance_that_ends_the_fit_before_its_first_step_is_refused(tmp_path):
    """At zero weights every image gets one class: a chance score, never a result."""
    overrides = [*FAST, "task=logreg", "logreg.c_steps=1", "logreg.tol=1e6"]
    with pytest.raises(ConfigError, match=r"logreg.tol=1e\+06 ended the fit of head 'cls'"):
        run_task(compose_config(overrides, tmp_path))


@pytest.mark.slow  # trains, extracts or runs for seconds (make test-fast skips it)
def test_a_trained_probes_pooling_is_fitted_beside_the_grid(probe_ckpt, tmp_path):
    overrides = [*FAST, "task=logreg", "aggregator=cls", f"logreg.probe_ckpt={probe_ckpt}"]
    overrides += ["logreg.c_steps=2", "logreg.max_iter=100"]
    summary = run_task(compose_config(overrides, tmp_path))
    assert set(summary["heads"]) == {"cls", "probe_abmilp"}
    assert 0 < summary["heads"]["probe_abmilp"]["test/acc1"] <= 1
    with pytest.raises(ConfigError, match="logreg.probe_ckpt=<that run>"):
        run_task(compose_config([*FAST, "task=logreg", "aggregator=abmilp"], tmp_path / "learned"))


def test_a_logreg_run_is_named_after_its_aggregator_as_a_knn_run_is():
    from mim_agg.runs.identity import run_name

    choices = {"backbone": "mae_vitb", "aggregator": "mean", "dataset": "digits"}
    name = run_name(compose_config(["task=logreg", "aggregator=mean", "dataset=digits"]), choices)
    assert name.startswith("logreg-mae_vitb-mean-digits-")
