"""Random sparse activations and NumPy references for the feature-store and mining tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from saecore import _native
from saecore.features import dense_to_csr, open_writer
from saecore.index import IndexConfig


def random_dense(seed: int, rows: int, d_sae: int, density: float, ties: bool) -> np.ndarray:
    """``[rows, d_sae]`` float32 with about ``density`` nonzeros: some all-zero rows, some dead
    features, Zipf-ish feature frequencies, and (``ties``) many repeated values."""
    rng = np.random.default_rng(seed)
    weight = 1.0 / np.arange(1, d_sae + 1) ** 0.7
    p = np.clip(density * d_sae * weight / weight.sum(), 0, 1)
    mask = rng.random((rows, d_sae)) < p[rng.permutation(d_sae)]
    if rows:
        mask[rng.random(rows) < 0.15] = False  # all-zero rows
    values = rng.choice(np.float32([0.5, 1.0, 2.0, 3.0]), size=mask.shape) if ties else rng.exponential(2.0, mask.shape)
    return np.where(mask, values, 0).astype(np.float32)


def mine(path: Path | str, **options) -> dict:
    """``_native.mine`` (which takes every option explicitly) with IndexConfig's defaults for the rest."""
    full = {**IndexConfig().mining_params(), "second_pass": True, "progress": None, **options}
    return _native.mine(str(path), **full)


def stored(dense: np.ndarray, value_dtype: str) -> np.ndarray:
    """What the store keeps: values rounded to the stored dtype (zeros are not stored)."""
    return dense.astype(value_dtype).astype(np.float32)


def write_store(
    path: Path, dense: np.ndarray, *, shard_rows: int, batch_rows: int | None = None, value_dtype: str = "float16",
    spec: dict | None = None, threads: int = 2,
) -> Path:
    """Write ``dense`` into a complete feature store in batches of ``batch_rows``."""
    w = open_writer(path, dense.shape[1], spec or {"test": True}, value_dtype=value_dtype, shard_rows=shard_rows, threads=threads)
    step = batch_rows or max(len(dense), 1)
    for start in range(0, len(dense), step):
        w.append(*dense_to_csr(dense[start : start + step]))
    w.finish()
    return path


def mix64(z: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser on a uint64 array (arrays wrap silently; scalars would warn)."""
    z = np.asarray(z, dtype=np.uint64) + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def bin_of(edges: np.ndarray, x: np.ndarray) -> np.ndarray:
    """The edge rule: the last bin ``j < n`` with ``edges[j] <= x``."""
    return np.searchsorted(edges[:-1], x, side="right") - 1
