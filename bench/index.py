"""Benchmark: per-feature statistics + top-k over sparse SAE activations, saecore vs the usual tools.

Synthetic data: N tokens × D features, ~L nonzeros per token with Zipf-distributed feature
frequencies and float16-representable values. Every method computes, for every feature, the firing
count, sum, max and the top-k (value, token) examples:

* saecore   — Rust pass 1 over the on-disk feature store (read + CRC + zstd decode + mine), all cores
* SciPy     — CSR → CSC (``tocsc``) then per-column ``argpartition``           (data already in RAM)
* SciPy .npz — the same, starting from the compressed ``.npz`` a SciPy user would keep on disk
  (``load_npz`` + float16 → float32), i.e. from the same starting point as saecore
* NumPy     — ``lexsort`` by (feature, -value), then the first k of each group    (data already in RAM)
* pyarrow   — ``Table.sort_by`` + ``group_by().aggregate``                       (data already in RAM)
* torch     — SAEDashboard's method: densify token chunks, running ``topk`` over the token axis

The baselines start from in-memory CSR arrays (no I/O, no decompression), saecore from its compressed
store on disk (page cache warm). Each method runs in a forked child; "peak MB" is the child's peak RSS
above its RSS at the start. Also printed: the time to just read the store's bytes (the bandwidth
bound) from the page cache and from the disk (the files evicted first with
``posix_fadvise(DONTNEED)``), saecore pass 1 from a cold cache, read + verify + decode, the full
two-pass index, and bytes per nonzero on disk vs SciPy's .npz and a Parquet (row, feature, value)
table.

    python bench/index.py            # quick: 100k tokens × 16384 features × 32 nnz/token
    python bench/index.py --full     # 10M tokens (needs ~12 GB RAM for the in-memory baselines)
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import resource
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

K = 20


def synth(n_tokens: int, d_sae: int, per_token: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """CSR (row_ptr int64, feature int32, value float32) with Zipf(1) feature frequencies."""
    rng = np.random.default_rng(seed)
    cdf = np.cumsum(1.0 / np.arange(1, d_sae + 1))
    cdf /= cdf[-1]
    perm = rng.permutation(d_sae).astype(np.int32)
    ptrs, feats = [np.zeros(1, np.int64)], []
    offset = 0
    for start in range(0, n_tokens, 1 << 18):
        b = min(1 << 18, n_tokens - start)
        f = np.sort(perm[np.searchsorted(cdf, rng.random((b, per_token)))], axis=1)  # (b, L)
        keep = np.ones_like(f, dtype=bool)
        keep[:, 1:] = np.diff(f, axis=1) != 0  # repeated draws collapse: fewer than L for hot features
        counts = keep.sum(1)
        ptrs.append(offset + np.cumsum(counts))
        offset += int(counts.sum())
        feats.append(f[keep])
    feature = np.concatenate(feats)
    value = np.maximum(rng.exponential(1.0, len(feature)), 1e-3).astype(np.float16).astype(np.float32)
    return np.concatenate(ptrs), feature, value


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def in_child(fn: Callable[[], Any]) -> tuple[float, float, Any]:
    """Run ``fn`` in a forked child: (seconds, peak MB above the child's starting RSS, result).
    The CPU seconds of all its threads are kept in ``CPU[-1]`` (less sensitive to a loaded machine)."""
    ctx = mp.get_context("fork")
    parent, child = ctx.Pipe(duplex=False)

    def target() -> None:
        base = rss_mb()
        c0, t0 = cpu_seconds(), time.perf_counter()
        out = fn()
        seconds, cpu = time.perf_counter() - t0, cpu_seconds() - c0
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        child.send((seconds, cpu, max(peak - base, 0.0), out))

    p = ctx.Process(target=target)
    p.start()
    seconds, cpu, peak, out = parent.recv()
    p.join()
    CPU.append(cpu)
    return seconds, peak, out


CPU: list[float] = []


# --- the methods ---------------------------------------------------------------------------------


def top_signature(top_value: np.ndarray, top_feature: np.ndarray, d: int) -> np.ndarray:
    """Sum of each feature's top-k values (a cheap cross-check between methods)."""
    return np.bincount(top_feature, weights=top_value.astype(np.float64), minlength=d)


def scipy_method(row_ptr, feature, value, d):
    import scipy.sparse as sp

    n = len(row_ptr) - 1
    csc = sp.csr_matrix((value, feature, row_ptr), shape=(n, d)).tocsc()
    counts = np.diff(csc.indptr)
    nonempty = counts > 0
    sums = np.add.reduceat(csc.data, csc.indptr[:-1][nonempty]) if nonempty.any() else np.zeros(0)
    maxs = np.maximum.reduceat(csc.data, csc.indptr[:-1][nonempty]) if nonempty.any() else np.zeros(0)
    tv, tf = [], []
    for f in np.flatnonzero(nonempty):
        a, b = csc.indptr[f], csc.indptr[f + 1]
        vals = csc.data[a:b]
        part = np.argpartition(-vals, K - 1)[:K] if b - a > K else np.arange(b - a)
        order = part[np.lexsort((csc.indices[a:b][part], -vals[part]))]
        tv.append(vals[order])
        tf.append(np.full(len(order), f))
    return top_signature(np.concatenate(tv), np.concatenate(tf), d), counts, sums, maxs


def numpy_method(row_ptr, feature, value, d):
    rows = np.repeat(np.arange(len(row_ptr) - 1), np.diff(row_ptr))
    order = np.lexsort((rows, -value, feature))
    f_sorted = feature[order]
    starts = np.searchsorted(f_sorted, np.arange(d))
    counts = np.bincount(feature, minlength=d)
    rank = np.arange(len(order)) - np.repeat(starts, counts)
    top = rank < K
    sums = np.bincount(feature, weights=value, minlength=d)
    return top_signature(value[order][top], f_sorted[top], d), counts, sums


def pyarrow_method(row_ptr, feature, value, d):
    import pyarrow as pa
    import pyarrow.compute as pc

    rows = np.repeat(np.arange(len(row_ptr) - 1), np.diff(row_ptr))
    t = pa.table({"feature": feature, "value": value, "row": rows})
    stats = t.group_by("feature").aggregate([("value", "count"), ("value", "sum"), ("value", "max")])
    s = t.sort_by([("feature", "ascending"), ("value", "descending"), ("row", "ascending")])
    f_sorted = s.column("feature").to_numpy()
    starts = np.searchsorted(f_sorted, np.arange(d))
    counts = np.bincount(f_sorted, minlength=d)
    rank = np.arange(len(f_sorted)) - np.repeat(starts, counts)
    mask = pa.array(rank < K)
    top = s.filter(mask)
    return top_signature(top.column("value").to_numpy(), top.column("feature").to_numpy(), d), stats.num_rows, pc.sum(stats.column("value_sum")).as_py()


def torch_method(row_ptr, feature, value, d, chunk: int = 4096):
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    n = len(row_ptr) - 1
    best_v = torch.zeros(0, d)
    counts, sums, maxs = torch.zeros(d), torch.zeros(d, dtype=torch.float64), torch.zeros(d)
    for a in range(0, n, chunk):
        b = min(a + chunk, n)
        lo, hi = int(row_ptr[a]), int(row_ptr[b])
        dense = torch.zeros(b - a, d)  # (chunk, d_sae)
        rows = torch.from_numpy(np.repeat(np.arange(b - a), np.diff(row_ptr[a : b + 1])))
        dense[rows, torch.from_numpy(feature[lo:hi].astype(np.int64))] = torch.from_numpy(value[lo:hi])
        counts += (dense > 0).sum(0)
        sums += dense.sum(0, dtype=torch.float64)
        maxs = torch.maximum(maxs, dense.max(0).values)
        cand = torch.cat([best_v, dense])  # (k + chunk, d_sae)
        best_v = cand.topk(min(K, len(cand)), dim=0).values
    best_v = best_v.numpy()
    f = np.broadcast_to(np.arange(d), best_v.shape)
    keep = best_v > 0
    return top_signature(best_v[keep], f[keep], d), counts.numpy()


def saecore_write(path: Path, row_ptr, feature, value, d, shard_rows: int = 16384):
    from saecore import _native, features

    w = _native.FeatureStoreWriter(
        str(path), d, value_dtype=features.VALUE_DTYPE, shard_rows=shard_rows, spec_json="{}", threads=os.cpu_count() or 1
    )
    step = 1 << 16  # encode-sized batches
    n = len(row_ptr) - 1
    for a in range(0, n, step):
        b = min(a + step, n)
        lo, hi = int(row_ptr[a]), int(row_ptr[b])
        w.append(row_ptr[a : b + 1] - lo, feature[lo:hi], value[lo:hi])
    w.finish()


def saecore_mine(path: Path, d: int, second_pass: bool):
    from saecore import _native
    from saecore.index import IndexConfig

    params = {**IndexConfig().mining_params(), "k": K}
    r = _native.mine(str(path), second_pass=second_pass, progress=None, **params)
    return top_signature(r["top_value"], r["top_feature"], d), r["count"]


def scipy_npz_method(npz: Path, d: int):
    import scipy.sparse as sp

    m = sp.load_npz(npz)
    return scipy_method(m.indptr, m.indices, m.data.astype(np.float32), d)


def saecore_csc(store: Path) -> None:
    """Build the store's feature-major copy (read, decode, transpose, compress, write) on a copy."""
    from saecore import features

    copy = store.with_name(store.name + ".csc-bench")
    shutil.copytree(store, copy)
    try:
        features.build_csc(copy)
    finally:
        shutil.rmtree(copy, ignore_errors=True)


def scipy_csc(row_ptr, feature, value, d, out: Path | None) -> None:
    """SciPy's feature-major copy: ``tocsc`` in RAM, optionally saved as a compressed ``.npz``."""
    import scipy.sparse as sp

    csc = sp.csr_matrix((value, feature, row_ptr), shape=(len(row_ptr) - 1, d)).tocsc()
    if out is not None:
        csc.data = csc.data.astype(np.float16)
        sp.save_npz(out, csc, compressed=True)


def evict(files: list[Path]) -> None:
    """Drop the files' pages from the page cache, so the next read comes from the disk."""
    for p in files:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def read_bytes(files: list[Path]) -> int:
    total = 0
    for p in files:
        with open(p, "rb") as f:
            total += len(f.read())
    return total


def saecore_decode(path: Path) -> None:
    from saecore import _native

    _native.FeatureStoreReader(str(path)).verify()


# --- main ----------------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--full", action="store_true", help="10M tokens instead of 100k")
    ap.add_argument("--tokens", type=int, default=None)
    ap.add_argument("--features", type=int, default=16384)
    ap.add_argument("--nnz", type=int, default=32, help="draws per token (Zipf repeats collapse)")
    ap.add_argument("--skip", default="", help="comma-separated baselines to skip (scipy,scipy-npz,numpy,pyarrow,torch)")
    ap.add_argument("--torch-max-tokens", type=int, default=2_000_000, help="skip torch above this (it is O(N·D))")
    args = ap.parse_args()
    n = args.tokens or (10_000_000 if args.full else 100_000)
    d = args.features
    skip = set(filter(None, args.skip.split(",")))
    # Import every library before timing anything: children are forked, so no method pays for an
    # import (saecore's pulls in zarr). Nothing here starts a thread pool before the fork.
    import pyarrow.compute
    import saecore._native  # noqa: F401
    import scipy.sparse  # noqa: F401
    import torch  # noqa: F401

    t0 = time.perf_counter()
    row_ptr, feature, value = synth(n, d, args.nnz)
    nnz = len(feature)
    print(f"data: {n:,} tokens x {d:,} features, {nnz:,} nonzeros ({nnz / n:.1f}/token), generated in {time.perf_counter() - t0:.1f} s")
    print(f"machine: {os.cpu_count()} CPU cores; SAECORE_NUM_THREADS={os.environ.get('SAECORE_NUM_THREADS', '(all)')}")
    tmp = Path(tempfile.mkdtemp(prefix="saecore-bench-"))
    try:
        store = tmp / "features.zarr"
        w_s, _, _ = in_child(lambda: saecore_write(store, row_ptr, feature, value, d))
        files = [p for p in (store / "shards").rglob("*") if p.is_file() and p.parent.name == "c"]
        store_bytes = sum(p.stat().st_size for p in files)
        print(f"saecore store written in {w_s:.2f} s ({n / w_s:,.0f} tokens/s, f16 -> zstd on writer threads)")

        npz = tmp / "m.npz"
        if "scipy-npz" not in skip:
            import scipy.sparse as sp

            sp.save_npz(npz, sp.csr_matrix((value.astype(np.float16), feature, row_ptr), shape=(n, d)), compressed=True)
            read_bytes([npz])  # warm, like the store
        evict(files)
        cold_s, _, _ = in_child(lambda: read_bytes(files))
        evict(files)
        cold_mine_s, _, _ = in_child(lambda: saecore_mine(store, d, False))
        read_bytes(files)  # warm the page cache
        results: dict[str, tuple[float, float, float]] = {}
        sigs: dict[str, np.ndarray] = {}
        s, mb, (sig, _) = in_child(lambda: saecore_mine(store, d, False))
        results["saecore (pass 1)"], sigs["saecore"] = (s, mb, CPU[-1]), sig
        for name, fn in [("scipy", scipy_method), ("numpy", numpy_method), ("pyarrow", pyarrow_method), ("torch", torch_method)]:
            if name in skip or (name == "torch" and n > args.torch_max_tokens):
                continue
            s, mb, out = in_child(lambda fn=fn: fn(row_ptr, feature, value, d))
            results[name], sigs[name] = (s, mb, CPU[-1]), out[0]
            if name == "scipy" and "scipy-npz" not in skip:
                s, mb, out = in_child(lambda: scipy_npz_method(npz, d))
                results["scipy (from .npz)"], sigs["scipy (from .npz)"] = (s, mb, CPU[-1]), out[0]
        idx_s, idx_mb, _ = in_child(lambda: saecore_mine(store, d, True))
        idx_cpu = CPU[-1]
        # The copy time includes duplicating the store (a plain file copy) so the original stays intact.
        csc_s, csc_mb, _ = in_child(lambda: saecore_csc(store))
        copy_s, _, _ = in_child(lambda: shutil.rmtree(shutil.copytree(store, store.with_name("copy-only"))))
        tocsc_s, tocsc_mb, _ = (0.0, 0.0, None) if "scipy" in skip else in_child(lambda: scipy_csc(row_ptr, feature, value, d, None))
        tocsc_npz_s = 0.0 if "scipy-npz" in skip else in_child(lambda: scipy_csc(row_ptr, feature, value, d, tmp / "csc.npz"))[0]
        read_s, _, _ = in_child(lambda: read_bytes(files))
        dec_s, _, _ = in_child(lambda: saecore_decode(store))
        dec_cpu = CPU[-1]

        ref = sigs["saecore"]
        base = results["saecore (pass 1)"][0]
        print(f"\nper-feature count/sum/max + top-{K}  ({nnz:,} nonzeros)")
        base_cpu = results["saecore (pass 1)"][2]
        print(f"{'method':<20}{'seconds':>10}{'tokens/s':>14}{'x saecore':>11}{'CPU s':>9}{'x CPU':>8}{'peak MB':>10}  top-k agrees")
        for name, (sec, mb, cpu) in results.items():
            key = "saecore" if name.startswith("saecore") else name
            agree = np.allclose(sigs[key], ref, rtol=1e-5)
            print(f"{name:<20}{sec:>10.3f}{n / sec:>14,.0f}{sec / base:>11.1f}{cpu:>9.2f}{cpu / base_cpu:>8.1f}{mb:>10.0f}  {'yes' if agree else 'NO'}")
        in_ram = [(v[0], k) for k, v in results.items() if not k.startswith("saecore") and "npz" not in k]
        if in_ram:
            best = min(in_ram)
            print(f"\nsaecore vs best baseline ({best[1]}, data already decoded in RAM): {best[0] / base:.1f}x faster")
        if "scipy (from .npz)" in results:
            print(f"saecore vs SciPy from its own compressed file (same starting point): {results['scipy (from .npz)'][0] / base:.1f}x faster")
        print(f"full index (2 passes: + histograms, quantile samples): {idx_s:.3f} s ({idx_cpu:.2f} CPU s), peak {idx_mb:.0f} MB")
        print(f"\nfeature-major copy: saecore build_csc (from the store on disk to csc/ on disk) {csc_s - copy_s:.3f} s "
              f"(after subtracting {copy_s:.3f} s to copy the store aside), peak {csc_mb:.0f} MB")
        if tocsc_s:
            print(f"  SciPy tocsc (arrays in RAM, result in RAM): {tocsc_s:.3f} s, peak {tocsc_mb:.0f} MB"
                  + (f"; tocsc + save_npz(float16, compressed): {tocsc_npz_s:.3f} s" if tocsc_npz_s else ""))
        print(f"\nbandwidth bound: read the store's {store_bytes / 2**20:.1f} MiB from the page cache: {read_s:.3f} s "
              f"({store_bytes / read_s / 2**30:.2f} GiB/s); from the disk: {cold_s:.3f} s ({store_bytes / cold_s / 2**30:.2f} GiB/s)")
        print(f"saecore pass 1 from a cold cache: {cold_mine_s:.3f} s = {cold_mine_s / cold_s:.2f}x the disk read")
        print(f"read + CRC + zstd decode of every shard (all cores): {dec_s:.3f} s ({dec_cpu:.2f} CPU s)")
        print(f"load average while running: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
        print(f"saecore pass 1 = {base / read_s:.1f}x the read time, {base / dec_s:.2f}x the decode time "
              f"({base_cpu / max(dec_cpu, 1e-9):.2f}x in CPU time); "
              f"{nnz / base / 1e6:.0f} M nonzeros/s = {nnz / base / 1e6 / (os.cpu_count() or 1):.0f} M/s per core")

        import pyarrow as pa
        import pyarrow.parquet as pq
        import scipy.sparse as sp

        if not npz.exists():
            sp.save_npz(npz, sp.csr_matrix((value.astype(np.float16), feature, row_ptr), shape=(n, d)), compressed=True)
        rows = np.repeat(np.arange(n, dtype=np.uint32), np.diff(row_ptr))
        pq.write_table(pa.table({"row": rows, "feature": feature.astype(np.uint32), "value": pa.array(value.astype(np.float16))}),
                       tmp / "m.parquet", compression="zstd")
        print(f"\nbytes per nonzero on disk: saecore {store_bytes / nnz:.2f} (token-major, f16, shuffle+zstd) | "
              f"SciPy .npz {(tmp / 'm.npz').stat().st_size / nnz:.2f} | Parquet zstd {(tmp / 'm.parquet').stat().st_size / nnz:.2f}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
