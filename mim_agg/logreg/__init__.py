"""Multinomial logistic regression on frozen features (DINOv2's and DINOv3's protocol)."""

from mim_agg.logreg.fit import LogisticRegression, c_grid, fit_logistic_regression

__all__ = ["LogisticRegression", "c_grid", "fit_logistic_regression"]
