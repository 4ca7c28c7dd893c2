"""Top-k cosine neighbours of decoder directions: saecore vs faiss-cpu and a PyTorch blocked product.

Each case draws n random decoder directions of width d and finds every row's k nearest other rows by
cosine. In one run, on the same thread count:

  saecore self   saecore.geometry.neighbours(a, k=k)            (A-vs-A: symmetric tiles, half the flops)
  saecore a-vs-b saecore.geometry.neighbours(a, b, k=k)         (a full product; b another n x d matrix)
  faiss          IndexFlatIP on the normalised rows, search(k+1), drop self
  torch          blocks of rows: (blk @ Aᵀ), self masked, topk(k)

For each: seconds, effective GFLOP/s = 2·n²·d / seconds (the dense product a user would otherwise run),
the fraction of the machine's best fp32 GEMM rate measured in this run (NumPy/OpenBLAS and torch
matmul of 4096 x d x 4096), and the speed-up over the fastest baseline. Also the agreement of the
neighbour lists with faiss's (ties and rounding make a few differ).

  python bench/neighbours.py            # quick: n = 4096, 8192
  python bench/neighbours.py --full     # the issue's sizes: n = 16384, 65536; d = 576, 768; k = 10
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable

import numpy as np


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--full", action="store_true", help="n = 16384 and 65536 (the issue's sizes)")
    p.add_argument("--n", type=int, nargs="*", default=None, help="override the row counts")
    p.add_argument("--d", type=int, nargs="*", default=[576, 768])
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="threads for every method")
    p.add_argument("--repeats", type=int, default=None, help="best of R runs (default 2 quick, 1 full)")
    p.add_argument("--skip", nargs="*", default=[], choices=["a-vs-b", "faiss", "torch"])
    return p.parse_args()


def best_time(fn: Callable[[], object], repeats: int) -> tuple[float, object]:
    best, out = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def machine_gemm_peak(d: int, repeats: int = 3) -> dict[str, float]:
    """Best fp32 GFLOP/s of a 4096 x d x 4096 product in NumPy (OpenBLAS) and in torch."""
    import torch

    rng = np.random.default_rng(0)
    a = rng.standard_normal((4096, d), dtype=np.float32)
    b = rng.standard_normal((4096, d), dtype=np.float32)
    flops = 2 * 4096 * 4096 * d
    a.dot(b.T)  # warm
    t_np, _ = best_time(lambda: a @ b.T, repeats)
    ta, tb = torch.from_numpy(a), torch.from_numpy(b)
    ta @ tb.T
    t_torch, _ = best_time(lambda: ta @ tb.T, repeats)
    return {"numpy": flops / t_np / 1e9, "torch": flops / t_torch / 1e9}


def faiss_self_top_k(unit: np.ndarray, k: int) -> np.ndarray:
    import faiss

    index = faiss.IndexFlatIP(unit.shape[1])
    index.add(unit)
    _, idx = index.search(unit, k + 1)
    # Drop the row itself (normally rank 0; with exact duplicates it may sit elsewhere).
    keep = idx != np.arange(len(unit))[:, None]
    return np.stack([row[m][:k] for row, m in zip(idx, keep)])


def torch_self_top_k(unit: np.ndarray, k: int, block: int = 4096) -> np.ndarray:
    import torch

    x = torch.from_numpy(unit)
    out = []
    with torch.no_grad():
        for r0 in range(0, len(x), block):
            s = x[r0 : r0 + block] @ x.T  # (block, n)
            rows = torch.arange(s.shape[0])
            s[rows, rows + r0] = -torch.inf
            out.append(torch.topk(s, k, dim=1).indices)
    return torch.cat(out).numpy()


def agreement(a: np.ndarray, b: np.ndarray) -> float:
    """Mean fraction of shared neighbours per row (order ignored)."""
    return float(np.mean([len(set(x) & set(y)) / len(x) for x, y in zip(a.tolist(), b.tolist())]))


def main() -> int:
    args = parse_args()
    # Every method gets the same threads; saecore reads this when its pool first starts.
    os.environ["SAECORE_NUM_THREADS"] = str(args.threads)
    import torch

    torch.set_num_threads(args.threads)
    try:
        import faiss

        faiss.omp_set_num_threads(args.threads)
    except ImportError:
        print("faiss-cpu not installed (pip install faiss-cpu): skipping that baseline", file=sys.stderr)
        args.skip.append("faiss")
    from saecore import _native
    from saecore.geometry import neighbours

    ns = args.n or ([16384, 65536] if args.full else [4096, 8192])
    repeats = args.repeats or (1 if args.full else 2)
    print(f"threads={args.threads} (saecore pool: {_native.num_threads()}), k={args.k}, best of {repeats}")
    header = f"{'n':>6} {'d':>4} {'method':<15} {'seconds':>8} {'GFLOP/s':>8} {'of peak':>8} {'vs best base':>12} {'agree':>6}"
    for d in args.d:
        for n in ns:
            # Measured next to each case: on a shared machine the rate drifts with other load.
            peak = machine_gemm_peak(d)
            best_peak = max(peak.values())
            print(f"\nn={n} d={d}: machine fp32 GEMM peak {best_peak:.1f} GFLOP/s "
                  f"(numpy {peak['numpy']:.1f}, torch {peak['torch']:.1f})")
            print(header)
            rng = np.random.default_rng(n + d)
            a = rng.standard_normal((n, d), dtype=np.float32)
            b = rng.standard_normal((n, d), dtype=np.float32)
            unit = a / np.linalg.norm(a, axis=1, keepdims=True)
            flops = 2 * n * n * d
            results: dict[str, tuple[float, np.ndarray | None]] = {}
            t, (idx, _) = best_time(lambda a=a: neighbours(a, k=args.k, device="cpu"), repeats)
            results["saecore self"] = (t, idx)
            if "a-vs-b" not in args.skip:
                t, _ = best_time(lambda a=a, b=b: neighbours(a, b, k=args.k, device="cpu"), repeats)
                results["saecore a-vs-b"] = (t, None)
            if "faiss" not in args.skip:
                results["faiss"] = best_time(lambda u=unit: faiss_self_top_k(u, args.k), repeats)
            if "torch" not in args.skip:
                results["torch"] = best_time(lambda u=unit: torch_self_top_k(u, args.k), repeats)
            base = [results[m][0] for m in ("faiss", "torch") if m in results]
            fastest_base = min(base) if base else float("nan")
            ref = results.get("faiss", results.get("torch", (0, None)))[1]
            for method, (t, idx) in results.items():
                rate = flops / t / 1e9
                agree = f"{agreement(idx, ref):.3f}" if idx is not None and ref is not None else "-"
                print(f"{n:>6} {d:>4} {method:<15} {t:>8.2f} {rate:>8.1f} {rate / best_peak:>8.0%} "
                      f"{fastest_base / t:>11.2f}x {agree:>6}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
