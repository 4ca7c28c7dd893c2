"""PCA and FastICA fits of ``saecore classical`` and the meta-SAE fit of ``saecore composite``, beside
scikit-learn's PCA and FastICA on the same data, in one run and on the same thread count.

Data sets:

  planted   n samples of c independent Laplace sources mixed into d dimensions by a known matrix
  store     the first n rows of an activation store (``--store``, e.g. the quick start's run)

For each: seconds of saecore's PyTorch fit and of scikit-learn's (PCA: ``svd_solver="covariance_eigh"``
and "full"; FastICA: ``algorithm="parallel"``, ``fun="logcosh"``, ``whiten="unit-variance"``, the same
``w_init``, ``max_iter`` and ``tol``), and their agreement: the PCA explained-variance fractions and the
largest principal angle between the subspaces; for FastICA the Amari distance between saecore's
unmixing and scikit-learn's mixing (0 = the same sources up to order and scale), each one's Amari
distance to the planted mixing, and the iterations each needed. The PCA answers are checked to agree
before the clock is believed.

The meta-SAE: seconds to fit a BatchTopK meta-SAE (d_sae / 8 latents, k = 4) on the decoder rows of
an SAE (``--sae``, else random unit directions), with its mean reconstruction cosine and meta-latents
per feature. scikit-learn has no meta-SAE; the figure stands alone.

  python bench/classical.py                                   # planted only (quick)
  python bench/classical.py --store /work/qs/run/activations.zarr --sae /work/qs/run/saes/topk-4k
"""

from __future__ import annotations

import argparse
import os
import time
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--store", help="activation store whose first --rows rows form the second data set")
    p.add_argument("--sae", help="SAE folder whose decoder the meta-SAE is fitted on")
    p.add_argument("--rows", type=int, default=16384, help="samples / store rows")
    p.add_argument("--components", type=int, default=128, help="PCA / ICA components (the store's width if larger)")
    p.add_argument("--planted-d", type=int, default=256, help="width of the planted mixture")
    p.add_argument("--max-iter", type=int, default=200)
    p.add_argument("--tol", type=float, default=1e-4)
    p.add_argument("--meta-steps", type=int, default=1000)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="threads for every method")
    return p.parse_args()


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def planted(n: int, c: int, d: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    mixing = rng.standard_normal((d, c))
    return (rng.laplace(size=(n, c)) @ mixing.T + rng.standard_normal(d)).astype(np.float32), mixing


def max_principal_angle_degrees(a: np.ndarray, b: np.ndarray) -> float:
    """Largest principal angle between the row spaces of a and b (orthonormal rows)."""
    s = np.linalg.svd(a @ b.T, compute_uv=False)
    return float(np.degrees(np.arccos(np.clip(s.min(), -1, 1))))


def bench_pca(x: np.ndarray, c: int) -> list[str]:
    import torch
    from saecore.classical import pca
    from sklearn.decomposition import PCA

    total = float(x.astype(np.float64).var(0).sum())
    t_ours, ours = timed(lambda: pca(torch.from_numpy(x), c))
    lines = []
    ours_frac = float(ours.variances.double().sum()) / total
    for solver in ("covariance_eigh", "full"):
        t_sk, sk = timed(lambda s=solver: PCA(n_components=c, svd_solver=s).fit(x))
        angle = max_principal_angle_degrees(ours.components.double().numpy(), sk.components_.astype(np.float64))
        sk_frac = float(sk.explained_variance_ratio_.sum())
        assert abs(sk_frac - ours_frac) < 1e-3, (sk_frac, ours_frac)  # the same answer before the clock counts
        lines.append(f"  PCA     saecore {t_ours:7.2f} s | sklearn {solver:<15} {t_sk:7.2f} s | speed-up "
                     f"{t_sk / t_ours:5.1f}x | variance explained {ours_frac:.4f} vs {sk_frac:.4f}, "
                     f"max principal angle {angle:.2f} deg")
    return lines


def bench_ica(x: np.ndarray, c: int, args: argparse.Namespace, mixing: np.ndarray | None) -> list[str]:
    import torch
    from saecore.classical import amari_distance, fastica
    from sklearn.decomposition import FastICA
    from sklearn.exceptions import ConvergenceWarning

    w_init = np.random.default_rng(1).standard_normal((c, c))
    t_ours, ours = timed(lambda: fastica(torch.from_numpy(x), c, max_iter=args.max_iter, tol=args.tol,
                                         w_init=torch.from_numpy(w_init)))
    sk = FastICA(n_components=c, algorithm="parallel", fun="logcosh", whiten="unit-variance",
                 max_iter=args.max_iter, tol=args.tol, w_init=w_init, whiten_solver="eigh")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        t_sk, _ = timed(lambda: sk.fit(x))
    agree = amari_distance(ours.unmixing.double().numpy(), sk.mixing_)
    line = (f"  FastICA saecore {t_ours:7.2f} s ({ours.iterations} it{'' if ours.converged else ', not converged'}) | "
            f"sklearn {t_sk:7.2f} s ({sk.n_iter_} it) | speed-up {t_sk / t_ours:5.1f}x | Amari(saecore, sklearn) {agree:.4f}")
    if mixing is not None:
        line += (f" | Amari to the planted mixing: saecore {amari_distance(ours.unmixing.double().numpy(), mixing):.4f}, "
                 f"sklearn {amari_distance(sk.components_, mixing):.4f}")
    return [line]


def bench_meta(args: argparse.Namespace) -> list[str]:
    import torch
    from saecore.composite import FitOptions, decompose, fit_meta_sae

    if args.sae:
        from saecore.geometry import load_directions

        decoder = torch.from_numpy(load_directions(args.sae).decoder)
    else:
        decoder = torch.randn(4096, 576, generator=torch.Generator().manual_seed(0))
    n_meta = max(2, decoder.shape[0] // 8)
    t, meta = timed(lambda: fit_meta_sae(decoder, n_meta, 4, FitOptions(args.meta_steps, 1024, 1e-3, seed=0, device="cpu")))
    acts, cos = decompose(meta, decoder)
    line = (f"  meta-SAE {decoder.shape[0]} x {decoder.shape[1]} -> {n_meta} meta-latents (k = 4), {args.meta_steps} steps: "
            f"{t:.2f} s ({t / args.meta_steps * 1e3:.1f} ms/step) | reconstruction cosine {float(cos.mean()):.3f} | "
            f"meta-latents per feature {float((acts > 0).sum(1).float().mean()):.2f}")
    return [line]


def main() -> None:
    args = parse_args()
    import torch
    from threadpoolctl import threadpool_limits

    torch.set_num_threads(args.threads)
    threadpool_limits(args.threads)
    print(f"threads: {args.threads}; torch {torch.__version__}")
    x, mixing = planted(args.rows, args.components, args.planted_d)
    print(f"planted: {args.rows} x {args.planted_d}, {args.components} Laplace sources")
    for line in [*bench_pca(x, args.components), *bench_ica(x, args.components, args, mixing)]:
        print(line, flush=True)
    if args.store:
        from saecore.activations import ActivationStore

        store = ActivationStore(args.store)
        x = store.read(store.hooks[0], 0, min(args.rows, store.num_rows))
        c = min(args.components, x.shape[1])
        print(f"store: {x.shape[0]} x {x.shape[1]} rows of {args.store}, {c} components")
        for line in [*bench_pca(x, c), *bench_ica(x, c, args, None)]:
            print(line, flush=True)
    for line in bench_meta(args):
        print(line, flush=True)


if __name__ == "__main__":
    main()
