"""PCA and FastICA dictionaries: planted independent sources are recovered, the PyTorch FastICA equals a
plain NumPy FastICA from the same start, PCA equals NumPy's SVD, the sign-split SAE reconstructs what
the dictionary does, and ``saecore classical`` fits, saves, encodes, indexes and compares on a run."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from saecore import classical


def numpy_fastica(x: np.ndarray, c: int, w_init: np.ndarray, max_iter: int, tol: float) -> tuple[np.ndarray, np.ndarray]:
    """Reference: whitening by the SVD of the centred data, then parallel FastICA with logcosh, written
    out plainly in NumPy. Returns (unmixing [c, d], W [c, c])."""
    xc = x - x.mean(0)
    n = len(xc)
    _, s, vt = np.linalg.svd(xc, full_matrices=False)
    vt = vt * np.sign(vt[np.arange(len(vt)), np.abs(vt).argmax(1)])[:, None]  # the same sign rule as saecore's
    k = vt[:c] / (s[:c, None] / np.sqrt(n))  # (c, d): z = k (x - mean) has unit variance
    z = xc @ k.T

    def sym(w):
        lam, u = np.linalg.eigh(w @ w.T)
        return u @ np.diag(1 / np.sqrt(lam)) @ u.T @ w

    w = sym(w_init)
    for _ in range(max_iter):
        g = np.tanh(z @ w.T)
        w1 = sym(g.T @ z / n - (1 - g**2).mean(0)[:, None] * w)
        lim = np.max(np.abs(np.abs(np.sum(w1 * w, axis=1)) - 1))
        w = w1
        if lim < tol:
            break
    return w @ k, w


def planted(n: int = 4000, c: int = 6, d: int = 10, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``(x [n, d], mixing [d, c])``: c independent non-Gaussian sources (Laplace, uniform, a sparse
    spike train) mixed into d dimensions, plus a constant offset."""
    rng = np.random.default_rng(seed)
    sources = np.stack([rng.laplace(size=n), rng.uniform(-1, 1, n), rng.exponential(size=n) - 1,
                        rng.laplace(size=n) ** 3, (rng.random(n) < 0.1) * rng.standard_normal(n) * 3,
                        np.sign(rng.standard_normal(n)) * rng.random(n) ** 0.2][:c], axis=1)
    mixing = rng.standard_normal((d, c))
    return sources @ mixing.T + rng.standard_normal(d), mixing


def test_fastica_recovers_planted_sources():
    x, mixing = planted()
    ica = classical.fastica(torch.from_numpy(x), 6, max_iter=500, tol=1e-8, seed=1)
    assert ica.converged
    assert classical.amari_distance(ica.unmixing, mixing) < 0.05  # a random unmixing scores ~0.4
    # Each recovered source correlates with one true source at |r| >= 0.95.
    s_true = np.linalg.lstsq(mixing, (x - x.mean(0)).T, rcond=None)[0].T
    s_hat = (x - x.mean(0)) @ ica.unmixing.numpy().T
    corr = np.abs(np.corrcoef(s_true.T, s_hat.T)[:6, 6:])
    assert corr.max(1).min() >= 0.95, corr.max(1)


def test_amari_distance_is_zero_for_a_scaled_permutation_and_large_for_a_mix():
    a = np.random.default_rng(0).standard_normal((5, 5))
    perm = np.eye(5)[[2, 0, 4, 1, 3]] * np.array([3.0, -1, 0.5, 2, -7])[:, None]
    assert classical.amari_distance(perm @ np.linalg.inv(a), a) < 1e-12
    assert classical.amari_distance(np.ones((5, 5)) + np.eye(5), np.eye(5)) == pytest.approx(0.5)


def test_torch_fastica_equals_the_numpy_reference_from_the_same_start():
    x, _ = planted(n=3000, seed=2)
    w_init = np.random.default_rng(5).standard_normal((6, 6))
    want_unmixing, want_w = numpy_fastica(x, 6, w_init, max_iter=30, tol=0.0)
    got = classical.fastica(torch.from_numpy(x), 6, max_iter=30, tol=0.0, w_init=torch.from_numpy(w_init))
    assert got.iterations == 30 and not got.converged
    np.testing.assert_allclose(got.unmixing.numpy(), want_unmixing, rtol=1e-6, atol=1e-8)
    assert want_w.shape == (6, 6)


def test_fastica_mixing_is_the_inverse_of_the_unmixing():
    x, _ = planted(n=2000, seed=3)
    ica = classical.fastica(torch.from_numpy(x), 6, max_iter=50, seed=0)
    np.testing.assert_allclose((ica.unmixing @ ica.mixing).numpy(), np.eye(6), atol=1e-9)


@pytest.mark.parametrize("c", [1, 3, 7])
def test_pca_equals_numpy_svd(c):
    x = np.random.default_rng(c).standard_normal((500, 7)) @ np.random.default_rng(9).standard_normal((7, 7))
    pc = classical.pca(torch.from_numpy(x), c)
    xc = x - x.mean(0)
    _, s, vt = np.linalg.svd(xc, full_matrices=False)
    np.testing.assert_allclose(pc.variances.numpy(), s[:c] ** 2 / len(x), rtol=1e-10)
    signs = np.sign(vt[np.arange(c), np.abs(vt[:c]).argmax(1)])
    np.testing.assert_allclose(pc.components.numpy(), vt[:c] * signs[:, None], atol=1e-10)
    np.testing.assert_allclose(pc.mean.numpy(), x.mean(0), atol=1e-12)


def test_sign_split_sae_reconstructs_with_the_top_k_coefficients():
    x, _ = planted(n=600, seed=4)
    xt = torch.from_numpy(x).float()
    pc = classical.pca(xt, 6)
    sae = classical.dictionary_sae(pc.mean, pc.components, pc.components, k=3)
    f = sae.encode(xt)
    assert (f >= 0).all() and int((f > 0).sum(1).max()) <= 3
    # Reference: coefficients z, the 3 largest |z| kept, x̂ = mean + Σ z v.
    z = (xt - pc.mean) @ pc.components.T  # (n, 6)
    keep = torch.zeros_like(z).scatter_(1, z.abs().topk(3, dim=1).indices, 1.0)
    want = pc.mean + (z * keep) @ pc.components
    torch.testing.assert_close(sae.decode(f), want, rtol=1e-4, atol=1e-4)
    # The centred data lie in the 6-d span of the mixing: with every component kept, x̂ = x.
    full = classical.with_k(sae, 6)
    torch.testing.assert_close(full.decode(full.encode(xt)), xt, rtol=1e-3, atol=1e-3)


def test_ica_dictionary_latents_are_the_sources_along_unit_directions():
    x, _ = planted(n=2000, seed=6)
    xt = torch.from_numpy(x)
    ica = classical.fastica(xt, 6, max_iter=300, seed=0)
    sae = classical.dictionary_sae(ica.mean, ica.unmixing, ica.mixing.T, k=6)
    assert torch.allclose(sae.W_dec.norm(dim=1), torch.ones(12), atol=1e-5)
    s = (xt - ica.mean) @ ica.unmixing.T * ica.mixing.norm(dim=0)  # (n, 6) source · ‖mixing column‖
    f = sae.encode(xt.float()).double()
    torch.testing.assert_close(f[:, :6] - f[:, 6:], s, rtol=1e-3, atol=1e-3)


def test_verb_fits_saves_indexes_and_compares(tiny_store, tmp_path):
    """A tiny run: the tiny model's store and a TopK SAE trained on it; both dictionaries are fitted,
    saved as SAE folders that encode and index, and the report compares them."""
    import shutil

    from saecore.cli import main
    from saecore.run import Run
    from saecore.training import train

    run = Run(tmp_path / "run")
    shutil.copytree(tiny_store.path, run.activations)
    train(run.activations, run.sae("topk"), architecture="topk", d_sae=128, k=8, batch_size=256, progress=False,
          device="cpu")
    argv = ["classical", "--run", str(run.root), "--sweep-k", "4", "--sweep-k", "16", "--components", "32",
            "--fit-tokens", "1024", "--max-iter", "50", "--device", "cpu"]
    assert main(argv) == 0
    for name in ("pca-32", "ica-32"):
        cfg = json.loads((run.sae(name) / "cfg.json").read_text())
        assert cfg["architecture"] == "topk" and cfg["d_sae"] == 64
        assert (run.index(name) / "meta.json").exists()
    recon = pq.read_table(run.experiment("classical") / "classical.parquet").to_pylist()
    assert {r["dictionary"] for r in recon} == {"topk", "pca-32", "ica-32"}
    for r in recon:
        assert 0 <= r["l0"] <= r["k"] + 1e-6 and r["explained_variance"] <= 1
    pca_ev = {r["k"]: r["explained_variance"] for r in recon if r["dictionary"] == "pca-32"}
    assert pca_ev[4] < pca_ev[16]  # more components, more variance
    geometry = pq.read_table(run.experiment("classical") / "classical_geometry.parquet").to_pylist()
    pca_decoder = [g for g in geometry if g["dictionary"] == "pca-32" and g["kind"] == "decoder"]
    assert pca_decoder and abs(pca_decoder[0]["median"]) < 1e-4  # orthonormal directions
    # The saved dictionary is an SAE to the rest of the pipeline: the pages read its index.
    assert main(["pages", str(run.root), "--sae", "ica-32", "--no-tokenizer"]) == 0
    assert any(run.pages.rglob("*.html"))
    # A rerun with the same settings reuses the fitted folders (and the same feature stores).
    assert main(argv) == 0
    # Other settings with the folders in place: refused in one line.
    assert main([*argv[:-2], "--seed", "3"]) == 2
