"""Linear probes for the SAEBench-style evals (sparse probing, feature absorption); plain PyTorch.

* :func:`fit_logistic`: binary logistic regression with scikit-learn's ``LogisticRegression`` objective
  (L2 penalty, ``C``, optional ``class_weight="balanced"``), solved in float64 by Newton's method (L-BFGS
  above NEWTON_MAX_DIM columns). SAEBench fits
  its probes with scikit-learn; saecore does not depend on it, and tests hold this fit to it.
* :func:`top_k_mean_diff`: SAEBench's latent selection for k-sparse probing: the k dimensions with the
  largest |mean(positive) − mean(negative)| on the training set.
* :func:`train_multi_probe`: SAEBench's absorption probe trainer (one logistic output per class, BCE with
  ``pos_weight = negatives / positives``, Adam, learning rate decayed exponentially to ``end_lr``, an
  optional L1 penalty on the weights).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class LinearProbe:
    """``score = x @ weight + bias`` (one column per output); positive score = class present."""

    weight: torch.Tensor  # (d, n_out) float64
    bias: torch.Tensor  # (n_out,) float64

    def score(self, x: torch.Tensor | np.ndarray) -> torch.Tensor:
        x = torch.as_tensor(x, dtype=torch.float64, device=self.weight.device)
        return x @ self.weight + self.bias


NEWTON_MAX_DIM = 1024
"""Up to this many columns the fit takes Newton steps (a few exact solves); above, L-BFGS."""


def _objective(params: torch.Tensor, x: torch.Tensor, sign: torch.Tensor, weights: torch.Tensor, c: float) -> torch.Tensor:
    margin = sign * (x @ params[:-1] + params[-1])
    return 0.5 * params[:-1].pow(2).sum() + c * (weights * torch.nn.functional.softplus(-margin)).sum()


def _newton(x: torch.Tensor, sign: torch.Tensor, weights: torch.Tensor, c: float, max_iter: int) -> torch.Tensor:
    """Damped Newton steps on the (strictly convex) objective, halving the step until it decreases."""
    xb = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], 1)  # (n, d+1): the bias column
    ridge = torch.ones(xb.shape[1], dtype=x.dtype)
    ridge[-1] = 1e-12  # the bias is not penalised; a whisker keeps the Hessian invertible
    params = torch.zeros(xb.shape[1], dtype=x.dtype)
    loss = _objective(params, x, sign, weights, c)
    for _ in range(max_iter):
        margin = sign * (xb @ params)
        p_wrong = torch.sigmoid(-margin)
        grad = ridge * params - c * xb.T @ (weights * p_wrong * sign)
        if float(grad.abs().max()) < 1e-9 * max(1.0, float(loss)):
            break
        hess = torch.diag(ridge) + c * (xb.T * (weights * p_wrong * (1 - p_wrong))) @ xb
        step = torch.linalg.solve(hess, grad)
        t = 1.0
        while t > 1e-10:
            trial = params - t * step
            trial_loss = _objective(trial, x, sign, weights, c)
            if trial_loss <= loss:
                break
            t /= 2
        if float(loss - trial_loss) <= 1e-15 * max(1.0, float(loss)):
            params = trial
            break
        params, loss = trial, trial_loss
    return params


def _lbfgs(x: torch.Tensor, sign: torch.Tensor, weights: torch.Tensor, c: float, max_iter: int) -> torch.Tensor:
    params = torch.zeros(x.shape[1] + 1, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([params], lr=1, max_iter=max_iter, tolerance_grad=1e-10, tolerance_change=1e-14,
                            history_size=20, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = _objective(params, x, sign, weights, c)
        loss.backward()
        return loss

    opt.step(closure)
    return params.detach()


def fit_logistic(
    x: torch.Tensor | np.ndarray, y: torch.Tensor | np.ndarray, c: float = 1.0, balanced: bool = False,
    max_iter: int = 1000,
) -> LinearProbe:
    """Minimise ½‖w‖² + C·Σᵢ sᵢ·log(1 + exp(−ỹᵢ(xᵢ·w + b))), ỹ = ±1 (scikit-learn's objective; the bias is
    not penalised). ``balanced``: sᵢ = n / (2·n_class(yᵢ)), else 1. Returns a one-output probe."""
    x = torch.as_tensor(x, dtype=torch.float64)
    y = torch.as_tensor(y).to(torch.float64)
    if x.ndim != 2 or y.shape != (x.shape[0],):
        raise ValueError(f"fit_logistic: x must be [n, d] and y [n], got {tuple(x.shape)} and {tuple(y.shape)}")
    n_pos = float(y.sum())
    if n_pos in (0.0, float(len(y))):
        raise ValueError("fit_logistic: the labels hold a single class; a probe needs both")
    sign = 2 * y - 1
    weights = torch.ones_like(y)
    if balanced:
        weights = torch.where(y > 0, len(y) / (2 * n_pos), len(y) / (2 * (len(y) - n_pos)))
    solve = _newton if x.shape[1] <= NEWTON_MAX_DIM else _lbfgs
    w = solve(x, sign, weights, c, max_iter)
    return LinearProbe(w[:-1, None].clone(), w[-1:].clone())


def accuracy(probe: LinearProbe, x: torch.Tensor | np.ndarray, y: torch.Tensor | np.ndarray) -> float:
    """Fraction of rows whose predicted class (score > 0) equals ``y`` (0/1)."""
    pred = (probe.score(x)[:, 0] > 0).cpu()
    return float((pred == torch.as_tensor(y).bool()).double().mean())


def f1_score(y: np.ndarray, predicted: np.ndarray) -> float:
    """Binary F1 of boolean predictions (0 when there is no true or no predicted positive)."""
    y, predicted = np.asarray(y, bool), np.asarray(predicted, bool)
    tp = int((y & predicted).sum())
    denom = int(y.sum()) + int(predicted.sum())
    return 2 * tp / denom if denom else 0.0


def top_k_mean_diff(x: torch.Tensor | np.ndarray, y: torch.Tensor | np.ndarray, k: int) -> np.ndarray:
    """Indices of the k columns with the largest |mean over positives − mean over negatives|, largest first."""
    x = torch.as_tensor(x, dtype=torch.float64)
    y = torch.as_tensor(y).bool()
    diff = (x[y].mean(0) - x[~y].mean(0)).abs()
    return torch.argsort(diff, descending=True, stable=True)[:k].numpy()


def k_sparse_accuracy(
    x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, y_test: np.ndarray, k: int | None
) -> float:
    """Test accuracy of a logistic probe on the top-k mean-difference columns (all columns when k is None)."""
    cols = np.arange(x_train.shape[1]) if k is None else top_k_mean_diff(x_train, y_train, k)
    probe = fit_logistic(x_train[:, cols], y_train)
    return accuracy(probe, x_test[:, cols], y_test)


def train_multi_probe(
    x: torch.Tensor, labels: torch.Tensor, n_classes: int, *, epochs: int = 50, lr: float = 1e-2,
    end_lr: float = 1e-5, weight_decay: float = 1e-4, l1: float = 0.0, batch_size: int = 4096, seed: int = 0,
) -> LinearProbe:
    """One-vs-rest logistic outputs for ``labels`` (class ids), trained jointly as SAEBench's absorption
    probes are: BCE with ``pos_weight``, Adam, exponential decay from ``lr`` to ``end_lr`` over the epochs,
    plus ``l1``·mean over outputs of Σ|w| (its k-sparse selection probe)."""
    gen = torch.Generator().manual_seed(seed)
    x = x.float()
    target = torch.nn.functional.one_hot(labels.long(), n_classes).float()
    positives = target.sum(0)
    pos_weight = (len(target) - positives) / positives.clamp(min=1)
    with torch.random.fork_rng(devices=[]):  # the layer's initialisation, seeded without touching global state
        torch.manual_seed(seed)
        layer = torch.nn.Linear(x.shape[1], n_classes)
    opt = torch.optim.Adam(layer.parameters(), lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=math.exp(math.log(end_lr / lr) / epochs))
    loss_fn = torch.nn.BCEWithLogitsLoss(pos_weight=pos_weight)
    with torch.enable_grad():
        for _ in range(epochs):
            for idx in torch.randperm(len(x), generator=gen).split(batch_size):
                opt.zero_grad()
                loss = loss_fn(layer(x[idx]), target[idx])
                if l1:
                    loss = loss + l1 * layer.weight.abs().sum(-1).mean()
                loss.backward()
                opt.step()
            sched.step()
    return LinearProbe(layer.weight.detach().double().T.contiguous(), layer.bias.detach().double())
