"""Multinomial logistic regression fitted by full-batch L-BFGS, in torch (GPU or CPU).

The objective is scikit-learn's ``LogisticRegression(penalty="l2", solver="lbfgs")`` for the
same ``C``: ``C * sum_i CE_i + ||W||^2 / 2``, the bias unpenalised, minimised in the scaled
form scikit-learn's solver sees (divided by ``C * n``: ``mean CE + ||W||^2 / (2 C n)``), so its
tolerances mean what they mean there: stop when the largest gradient entry is at most ``tol``
(scipy's ``gtol``) or the objective changes by less than ``64 * eps`` (scipy's ``ftol``), with
ten correction pairs (scipy's ``maxcor``), from zero weights. DINOv3 evaluates with exactly
this estimator (``tol=1e-12``, 1,000 iterations, float64 features); DINOv2 with cuML's, which
minimises the same objective. Written here in torch so it runs where the features are, with
no cuML dependency.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

HISTORY = 10  # correction pairs kept, scipy's (and so scikit-learn's) maxcor


@dataclass
class LogisticRegression:
    """A fitted model: ``logits = x @ weight.T + bias``."""

    weight: torch.Tensor  # [classes, features]
    bias: torch.Tensor  # [classes]
    iterations: int  # L-BFGS iterations taken (at most max_iter)

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        return torch.addmm(self.bias, features.to(self.weight.dtype), self.weight.T)


def c_grid(c_min: float, c_max: float, steps: int) -> list[float]:
    """``steps`` values of ``C`` spaced evenly in log10 from ``c_min`` to ``c_max``
    (DINOv2/v3: ``10 ** linspace(-6, 5, 45)``)."""
    return np.logspace(np.log10(c_min), np.log10(c_max), steps).tolist()


def fit_logistic_regression(
    features: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    C: float,
    *,
    max_iter: int,
    tol: float,
    dtype: torch.dtype = torch.float64,
) -> LogisticRegression:
    """Minimise ``mean CE + ||W||^2 / (2 C n)`` over ``W, b`` by L-BFGS with a strong-Wolfe
    line search, all images in every evaluation, on ``features``' device."""
    x = features.to(dtype)
    n, dim = x.shape
    weight = torch.zeros(num_classes, dim, dtype=dtype, device=x.device, requires_grad=True)
    bias = torch.zeros(num_classes, dtype=dtype, device=x.device, requires_grad=True)
    penalty = 1.0 / (2.0 * C * n)
    optimizer = torch.optim.LBFGS(
        [weight, bias],
        lr=1,
        max_iter=max_iter,
        max_eval=max_iter * 5 // 4,
        tolerance_grad=tol,
        tolerance_change=64 * float(np.finfo(np.float64).eps),
        history_size=HISTORY,
        line_search_fn="strong_wolfe",
    )

    def objective() -> torch.Tensor:
        optimizer.zero_grad()
        logits = torch.addmm(bias, x, weight.T)
        loss = F.cross_entropy(logits, labels) + penalty * weight.square().sum()
        loss.backward()
        return loss

    optimizer.step(objective)
    iterations = optimizer.state[weight].get("n_iter", 0)
    return LogisticRegression(weight.detach(), bias.detach(), iterations)
