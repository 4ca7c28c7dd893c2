"""A toy model of superposition with known ground truth (Elhage et al. 2022; Sharkey et al. 2022).

Each row is a sparse non-negative combination of ``n_features`` known unit directions in ``d`` < n
dimensions, plus isotropic Gaussian noise. An SAE that works recovers the directions: for each true
direction take the largest cosine to any decoder row; the mean of those (:func:`mean_max_cosine`) is
near 1 when every direction has a latent of its own.

    >>> toy = ToyConfig(n_features=64, d=32, mean_active=3)     # doctest: +SKIP
    >>> store = write_toy_store("toy.zarr", toy, rows=65536)     # doctest: +SKIP
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from .activations import ActivationStore, ActivationStoreWriter


@dataclass
class ToyConfig:
    """Parameters of the toy data."""

    n_features: int = 64
    """Number of true directions."""

    d: int = 32
    """Dimension they live in (n_features > d means superposition)."""

    mean_active: float = 3.0
    """Expected number of active directions per row (each is on with probability mean_active/n)."""

    noise: float = 0.01
    """Standard deviation of the added Gaussian noise, per dimension."""

    seed: int = 0
    """Seeds the directions and the samples."""

    magnitudes: str = "uniform"
    """Magnitude of an active direction: ``uniform`` U(0.5, 1.5), or ``exponential`` (mean 1: many
    small activations, which make thresholds and L1 shrinkage matter)."""

    correlated_pairs: int = 0
    """Pairs (2i, 2i+1), i < this, whose second member copies the first's on/off state half of the time
    (its own rate unchanged; correlation ≈ 0.5 between the two)."""

    def __post_init__(self) -> None:
        if self.n_features < 1 or self.d < 1:
            raise ValueError("ToyConfig.n_features and d must be positive")
        if not (0 < self.mean_active <= self.n_features):
            raise ValueError(f"ToyConfig.mean_active must be in (0, n_features], got {self.mean_active}")
        if self.noise < 0:
            raise ValueError("ToyConfig.noise must be >= 0")
        if self.magnitudes not in ("uniform", "exponential"):
            raise ValueError(f"ToyConfig.magnitudes must be 'uniform' or 'exponential', got {self.magnitudes!r}")
        if not (0 <= 2 * self.correlated_pairs <= self.n_features):
            raise ValueError(f"ToyConfig.correlated_pairs must be in 0..n_features/2, got {self.correlated_pairs}")


def true_directions(cfg: ToyConfig) -> np.ndarray:
    """The ``[n_features, d]`` unit directions (random, seeded)."""
    rng = np.random.default_rng([cfg.seed, 0])
    w = rng.standard_normal((cfg.n_features, cfg.d))
    return (w / np.linalg.norm(w, axis=1, keepdims=True)).astype(np.float32)


def sample(cfg: ToyConfig, rows: int, block: int = 0) -> np.ndarray:
    """``[rows, d]`` float32 toy activations; ``block`` picks an independent seeded stream."""
    rng = np.random.default_rng([cfg.seed, 1, block])
    active = rng.random((rows, cfg.n_features)) < cfg.mean_active / cfg.n_features
    if cfg.magnitudes == "uniform":
        magnitude = rng.uniform(0.5, 1.5, size=(rows, cfg.n_features))  # bounded away from 0: a feature is clearly on
    else:
        magnitude = rng.exponential(1.0, size=(rows, cfg.n_features))
    if cfg.correlated_pairs:
        first = np.arange(0, 2 * cfg.correlated_pairs, 2)
        copy = rng.random((rows, cfg.correlated_pairs)) < 0.5
        active[:, first + 1] = np.where(copy, active[:, first], active[:, first + 1])
    coeffs = (active * magnitude).astype(np.float32)  # (rows, n_features)
    x = coeffs @ true_directions(cfg)  # (rows, d)
    x += cfg.noise * rng.standard_normal(x.shape).astype(np.float32)
    return x.astype(np.float32)


def write_toy_store(path: str | os.PathLike[str], cfg: ToyConfig, rows: int, chunk_rows: int = 4096) -> ActivationStore:
    """Write ``rows`` toy activations as an activation store with one hook, ``toy``."""
    spec = {"model": "toy", "hooks": ["toy"], "dtype": "float32", "toy": asdict(cfg), "rows": rows}
    writer = ActivationStoreWriter.open(Path(path), spec, {"toy": cfg.d}, capacity_rows=rows, chunk_rows=chunk_rows)
    for b, start in enumerate(range(0, rows, chunk_rows)):
        n = min(chunk_rows, rows - start)
        ids = np.arange(start, start + n)
        writer.append({"toy": sample(cfg, n, block=b)}, ids.astype(np.int32), ids // 128, (ids % 128).astype(np.int32))
    return writer.finish({"context_length": 128})


def mean_max_cosine(W_dec: torch.Tensor | np.ndarray, directions: np.ndarray) -> float:
    """Mean over true directions of the largest cosine to any decoder row (``W_dec [d_sae, d]``)."""
    w = torch.as_tensor(np.asarray(W_dec.detach().cpu() if isinstance(W_dec, torch.Tensor) else W_dec), dtype=torch.float64)
    t = torch.as_tensor(directions, dtype=torch.float64)
    w = w / w.norm(dim=1, keepdim=True).clamp_min(1e-12)
    t = t / t.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return float((t @ w.t()).max(dim=1).values.mean())
