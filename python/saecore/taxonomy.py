"""Feature taxonomy from model-free scores: what a feature reads (token, token pair, context) and
what its decoder direction writes (prediction, suppression, partition), no language model needed.

**Input side** (from :mod:`saecore.token_scores`): ``token_corr`` and ``pair_corr`` are the held-out
Pearson correlations of a token-identity simulator and a (previous token, token) simulator with the
feature's activation.

* ``token``: ``token_corr >= TOKEN_CORR`` (0.5: the current token alone explains at least a quarter of
  the activation variance on unseen documents);
* ``pair``: not ``token``, ``pair_corr >= TOKEN_CORR`` and ``pair_corr >= token_corr + PAIR_GAIN`` (0.1:
  the previous token adds clearly more than noise — pair keys are sparser, so a pure token feature's
  pair score is usually a little *below* its token score);
* ``context``: it fires on held-out rows but neither simulator reaches the bar;
* ``dead``: no held-out activation (both scores undefined).

**Output side** (Bloom & Lin, "Understanding SAE Features with the Logit Lens", 2024): the shape of a
feature's logit-weight distribution over the vocabulary, ``W_dec[f] · W_U`` (computed as in
:mod:`saecore.logit_lens`). Moments are population moments; kurtosis is *not* excess (a Gaussian has
3), as in SAELens' ``get_W_U_W_dec_stats_df``, which Bloom & Lin used.

* ``prediction``: ``kurtosis >= HIGH_KURTOSIS`` (10: a few tokens stand far out of a Gaussian-like
  bulk) and ``skew >= SKEW`` (0.5: the outliers are promoted);
* ``suppression``: high kurtosis and ``skew <= -SKEW`` (the outliers are suppressed);
* ``partition``: ``kurtosis <= LOW_KURTOSIS`` (2.5: flatter than a Gaussian, i.e. the vocabulary splits
  into a promoted and a suppressed group — a two-group split with shares p, 1−p has kurtosis
  ``(1 − 3p + 3p²) / (p(1 − p))``, 1 at p = ½ and below 2.5 for 0.16 < p < 0.84);
* ``other``: anything else; ``unknown`` when no logit-lens statistics were computed.

``taxonomy = "{input}/{output}"``, e.g. ``token/prediction``. The thresholds are heuristics, stated so
a reader can re-cut the table from its numeric columns.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

TOKEN_CORR = 0.5
PAIR_GAIN = 0.1
HIGH_KURTOSIS = 10.0
LOW_KURTOSIS = 2.5
SKEW = 0.5

THRESHOLDS = {
    "token_corr": TOKEN_CORR, "pair_gain": PAIR_GAIN, "high_kurtosis": HIGH_KURTOSIS,
    "low_kurtosis": LOW_KURTOSIS, "skew": SKEW,
}


class LogitShape(NamedTuple):
    """Per-feature shape of the logit-weight distribution over the vocabulary."""

    skew: np.ndarray  # [d_sae] float64, population skewness
    kurtosis: np.ndarray  # [d_sae] float64, population kurtosis (Gaussian = 3)


def shape_stats(scores: np.ndarray) -> LogitShape:
    """Skewness and (non-excess) kurtosis of each row of ``scores`` [n, vocab]; NaN for a constant row.

    Equal to ``scipy.stats.skew(bias=True)`` and ``scipy.stats.kurtosis(fisher=False, bias=True)``.
    """
    x = np.asarray(scores, dtype=np.float64)  # [n, vocab]
    centred = x - x.mean(axis=1, keepdims=True)
    m2 = (centred**2).mean(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        skew = (centred**3).mean(axis=1) / m2**1.5
        kurt = (centred**4).mean(axis=1) / m2**2
    # Rounding leaves a constant row with a tiny m2 instead of 0; call it constant.
    constant = m2 <= 1e-24 * np.maximum((x**2).mean(axis=1), 1e-300)
    return LogitShape(np.where(constant, np.nan, skew), np.where(constant, np.nan, kurt))


def logit_shape(sae: Any, model: Any, batch_features: int = 256, apply_norm_weight: bool = True) -> LogitShape:
    """:func:`shape_stats` of every feature's logit-lens scores ``W_dec · W_U`` (batched over features)."""
    import torch

    from .logit_lens import lens_scores

    W_dec = sae.W_dec.detach()  # [d_sae, d_in]
    skews, kurts = [], []
    with torch.no_grad():
        for start in range(0, W_dec.shape[0], batch_features):
            scores = lens_scores(W_dec[start : start + batch_features], model, apply_norm_weight)  # [b, vocab]
            s = shape_stats(scores.double().cpu().numpy())
            skews.append(s.skew)
            kurts.append(s.kurtosis)
    empty = np.zeros(0, np.float64)
    return LogitShape(np.concatenate(skews) if skews else empty, np.concatenate(kurts) if kurts else empty)


def input_class(token_corr: np.ndarray, pair_corr: np.ndarray) -> np.ndarray:
    """``token`` | ``pair`` | ``context`` | ``dead`` per feature (rules in the module docstring)."""
    t, p = np.asarray(token_corr, np.float64), np.asarray(pair_corr, np.float64)
    out = np.full(t.shape, "context", dtype=object)
    with np.errstate(invalid="ignore"):
        out[(p >= TOKEN_CORR) & (p >= np.nan_to_num(t, nan=-1.0) + PAIR_GAIN)] = "pair"
        out[t >= TOKEN_CORR] = "token"
    out[np.isnan(t) & np.isnan(p)] = "dead"
    return out


def output_class(skew: np.ndarray | None, kurtosis: np.ndarray | None, n: int) -> np.ndarray:
    """``prediction`` | ``suppression`` | ``partition`` | ``other`` (``unknown`` without statistics)."""
    if skew is None or kurtosis is None:
        return np.full(n, "unknown", dtype=object)
    s, k = np.asarray(skew, np.float64), np.asarray(kurtosis, np.float64)
    out = np.full(s.shape, "other", dtype=object)
    with np.errstate(invalid="ignore"):
        out[k <= LOW_KURTOSIS] = "partition"
        out[(k >= HIGH_KURTOSIS) & (s >= SKEW)] = "prediction"
        out[(k >= HIGH_KURTOSIS) & (s <= -SKEW)] = "suppression"
    out[np.isnan(s) | np.isnan(k)] = "unknown"
    return out


def taxonomy(inputs: np.ndarray, outputs: np.ndarray) -> np.ndarray:
    """``"{input}/{output}"`` per feature."""
    return np.array([f"{i}/{o}" for i, o in zip(inputs, outputs)], dtype=object)
