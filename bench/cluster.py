"""Benchmark: the full two-pass index on Ray (1 and 2 workers) vs the in-process Rust index.

Synthetic store from bench/index.py's generator (Zipf feature frequencies, float16 values). Each Ray
configuration starts its own local cluster with ``num_cpus`` = workers, mines the whole store (two
map-reduce rounds, tree merge, finish on the driver) and is checked equal to the in-process result
before its time is reported. The in-process index is given the same cores
(``SAECORE_NUM_THREADS`` = 2); each Ray task runs the Rust core single-threaded, so parallelism comes
from Ray alone. Times exclude Ray's start-up (reported separately) and the table writing.

    python bench/cluster.py                    # 1M tokens × 16384 features × 32 nnz/token
    python bench/cluster.py --tokens 10000000  # the issue's 10M-token size (~2 GB store build)
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))  # for bench/index.py's generator and writer
from index import saecore_write, synth

PARAMS = {"k": 20, "hist_bins": 32, "sample_bins": 10, "samples_per_bin": 10, "seed": 0}

CHILD = r"""
import json, sys, time, numpy as np
from saecore import _native
path, mode, workers, per_task, out = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
params = json.loads(sys.argv[6])
if mode == "inproc":
    t0 = time.perf_counter(); r = _native.mine(path, **params, second_pass=True, progress=None); t = time.perf_counter() - t0; startup = 0.0
else:
    import ray
    from saecore import cluster as distributed
    from saecore.features import FeatureStore
    t0 = time.perf_counter()
    ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False, configure_logging=False,
             runtime_env={"env_vars": {"SAECORE_NUM_THREADS": "1"}})
    startup = time.perf_counter() - t0
    n = FeatureStore(path).num_shards
    t0 = time.perf_counter()
    r = distributed.mine(path, n, params, shards_per_task=per_task or None, progress=False)
    t = time.perf_counter() - t0
    ray.shutdown()
np.savez(out, **{k: np.asarray(v) for k, v in r.items() if not k.startswith("t_")})
print(json.dumps({"seconds": t, "startup": startup}))
"""


def run(path: Path, mode: str, workers: int, per_task: int, out: Path) -> dict:
    import json

    env = dict(os.environ, SAECORE_NUM_THREADS=str(workers if mode == "inproc" else 1))
    args = [sys.executable, "-c", CHILD, str(path), mode, str(workers), str(per_task), str(out), json.dumps(PARAMS)]
    p = subprocess.run(args, capture_output=True, text=True, env=env, check=False)
    if p.returncode:
        raise SystemExit(f"{mode} ({workers} workers) failed:\n{p.stderr[-3000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def same(a: Path, b: Path) -> None:
    x, y = np.load(a), np.load(b)
    for key in x.files:
        np.testing.assert_array_equal(x[key], y[key], err_msg=key)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=1_000_000)
    ap.add_argument("--d-sae", type=int, default=16384)
    ap.add_argument("--per-token", type=int, default=32)
    ap.add_argument("--shard-rows", type=int, default=16384)
    ap.add_argument("--shards-per-task", type=int, default=0,
                    help="shards per map task; 0 = saecore's default (about four tasks per worker CPU)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        row_ptr, feature, value = synth(args.tokens, args.d_sae, args.per_token)
        store = tmp / "features.zarr"
        saecore_write(store, row_ptr, feature, value, args.d_sae, shard_rows=args.shard_rows)
        nnz = len(feature)
        del row_ptr, feature, value
        n_shards = -(-args.tokens // args.shard_rows)
        print(f"{args.tokens:,} tokens × {args.d_sae} features, {nnz:,} nonzeros, {n_shards} shards, "
              f"{args.shards_per_task or 'auto (about 4 tasks per worker)'} shards per task; machine: {os.cpu_count()} cores")
        rows = [("in-process Rust index (2 threads)", run(store, "inproc", 2, 0, tmp / "ref.npz"))]
        for workers in (1, 2):
            res = run(store, "ray", workers, args.shards_per_task, tmp / f"ray{workers}.npz")
            same(tmp / "ref.npz", tmp / f"ray{workers}.npz")  # checked equal before the time counts
            rows.append((f"Ray, {workers} worker{'s' * (workers > 1)}", res))
        base = rows[0][1]["seconds"]
        print(f"| {'configuration':<36} | {'index s':>8} | {'vs in-process':>13} | {'Ray start s':>11} |")
        print(f"|{'-' * 38}|{'-' * 10}|{'-' * 15}|{'-' * 13}|")
        for name, r in rows:
            print(f"| {name:<36} | {r['seconds']:8.2f} | {r['seconds'] / base:12.2f}x | {r['startup']:11.2f} |")
        one, two = rows[1][1]["seconds"], rows[2][1]["seconds"]
        print(f"Ray 2 workers vs 1: {one / two:.2f}x faster; all results identical to the in-process index")


if __name__ == "__main__":
    t = time.time()
    main()
    print(f"(bench wall time {time.time() - t:.0f} s)")
