"""Benchmark: the data stages on a local Ray cluster against their one-process runs, in one run.

1. **Index**: the full two-pass mining of a synthetic feature store (bench/index.py's generator: Zipf
   feature frequencies, float16 values) in-process (Rust, 2 threads) and on Ray with 1 and 2 workers
   (bench/cluster.py's measurement: each configuration in a fresh process, its result checked equal
   to the in-process one before its time counts; Ray's start-up reported apart).
2. **Ray's per-task overhead**: the round trip of trivial tasks on a 2-CPU local cluster — the fixed
   cost each map or merge task adds, which sets where Ray starts to pay.
3. **Harvest**: SmolLM2-135M over the built-in corpus, one process (torch, 2 threads) vs ``--ray`` with
   1 and 2 workers (one CPU each, one batch per part). Reported: the end-to-end wall time, and the
   steady-state rate — tokens the driver appended to the store after its first batch, over the time
   from that first append to the last — which leaves out what does not grow with the corpus (loading
   the model in every worker, Ray's actor start). The Ray stores are checked equal to the one-process
   store before their times count.

    python bench/distributed.py                                   # 1M-token index, 8192-token harvest
    python bench/distributed.py --index-tokens 10000000 --harvest-tokens 32768
"""

from __future__ import annotations

import argparse
import filecmp
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/index.py's generator, bench/cluster.py's runner
from cluster import run as run_index
from cluster import same
from index import saecore_write, synth

OVERHEAD = r"""
import json, time, ray
ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
noop = ray.remote(num_cpus=1)(lambda x: x)
ray.get([noop.remote(i) for i in range(20)])  # warm the worker pool
t = time.perf_counter(); n = 400
ray.get([noop.remote(i) for i in range(n)])
print(json.dumps({"per_task_ms": (time.perf_counter() - t) / n * 1e3}))
"""

HARVEST = r"""
import json, sys, time
from saecore.activations import ActivationStoreWriter
from saecore.harvesting import HarvestConfig, harvest
stamps = []  # (time, tokens) of every batch the driver appends to the store, whichever path made it
append = ActivationStoreWriter.append
def timed(self, acts, token_ids, doc_ids, positions, counters=None):
    append(self, acts, token_ids, doc_ids, positions, counters=counters)
    stamps.append((time.perf_counter(), counters["tokens_seen"]))
ActivationStoreWriter.append = timed
out, tokens, workers = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
kw = dict(context_length=128, batch_size=8, max_tokens=tokens, progress=False)
startup = 0.0
if workers:
    import ray
    t = time.perf_counter()
    ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False, configure_logging=False)
    startup = time.perf_counter() - t
    kw.update(ray="local", ray_workers=workers, batches_per_part=1)
t = time.perf_counter()
harvest("smollm2-135m", "default", out, HarvestConfig(**kw))
wall = time.perf_counter() - t
steady = sum(n for _, n in stamps[1:]) / max(stamps[-1][0] - stamps[0][0], 1e-9)
print(json.dumps({"seconds": wall, "startup": startup, "steady": steady}))
"""


def child(code: str, *args: str, threads: int = 2) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM="false")
    p = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env, check=True)
    return json.loads(p.stdout.strip().splitlines()[-1])


def same_tree(a: Path, b: Path) -> None:
    files = sorted(str(p.relative_to(a)) for p in a.rglob("*") if p.is_file())
    assert files == sorted(str(p.relative_to(b)) for p in b.rglob("*") if p.is_file()), (a, b)
    _, mismatch, errors = filecmp.cmpfiles(a, b, files, shallow=False)
    assert not mismatch and not errors, mismatch + errors


def bench_index(tmp: Path, tokens: int, d_sae: int, per_token: int, shard_rows: int, per_task: int) -> None:
    row_ptr, feature, value = synth(tokens, d_sae, per_token)
    store = tmp / "features.zarr"
    saecore_write(store, row_ptr, feature, value, d_sae, shard_rows=shard_rows)
    nnz = len(feature)
    del row_ptr, feature, value
    print(f"\n## Index: {tokens:,} tokens × {d_sae} features, {nnz:,} nonzeros, "
          f"{-(-tokens // shard_rows)} shards, {per_task or 'auto (about 4 tasks per worker)'} shards per task")
    rows = [("in-process Rust index (2 threads)", run_index(store, "inproc", 2, 0, tmp / "ref.npz"))]
    # One thread: the work one Ray worker does, so Ray's own cost is (Ray, 1 worker) − this row.
    rows.append(("in-process Rust index (1 thread)", run_index(store, "inproc", 1, 0, tmp / "ref1.npz")))
    same(tmp / "ref.npz", tmp / "ref1.npz")
    for workers in (1, 2):
        res = run_index(store, "ray", workers, per_task, tmp / f"ray{workers}.npz")
        same(tmp / "ref.npz", tmp / f"ray{workers}.npz")
        rows.append((f"Ray, {workers} worker{'s' * (workers > 1)}", res))
    base = rows[0][1]["seconds"]
    print(f"| {'configuration':<36} | {'index s':>8} | {'vs in-process':>13} | {'Ray start s':>11} |")
    print(f"|{'-' * 38}|{'-' * 10}|{'-' * 15}|{'-' * 13}|")
    for name, r in rows:
        print(f"| {name:<36} | {r['seconds']:8.2f} | {r['seconds'] / base:12.2f}x | {r['startup']:11.2f} |")
    one, two, single = rows[2][1]["seconds"], rows[3][1]["seconds"], rows[1][1]["seconds"]
    print(f"Ray 2 workers vs 1: {one / two:.2f}x; Ray's own cost with 1 worker: {one - single:.2f} s "
          f"({(one - single) / single:.0%} of the 1-thread index); all identical to the in-process index")


def bench_harvest(tmp: Path, tokens: int) -> None:
    print(f"\n## Harvest: SmolLM2-135M, blocks.6.hook_resid_post, {tokens:,} tokens (contexts of 128, batches of 8)")
    rows = []
    for workers in (0, 1, 2):
        out = tmp / f"h{workers}.zarr"
        r = child(HARVEST, str(out), str(tokens), str(workers), threads=2 if workers == 0 else 1)
        if workers:
            same_tree(tmp / "h0.zarr", out)
        name = "one process (torch, 2 threads)" if workers == 0 else f"Ray, {workers} worker{'s' * (workers > 1)} (1 CPU each)"
        rows.append((name, r))
    base = rows[0][1]["steady"]
    print(f"| {'configuration':<36} | {'wall s':>7} | {'steady tok/s':>12} | {'vs one process':>14} | {'Ray start s':>11} |")
    print(f"|{'-' * 38}|{'-' * 9}|{'-' * 14}|{'-' * 16}|{'-' * 13}|")
    for name, r in rows:
        print(f"| {name:<36} | {r['seconds']:7.1f} | {r['steady']:12.0f} | {r['steady'] / base:13.2f}x | {r['startup']:11.2f} |")
    print(f"Ray 2 workers vs 1 (steady tokens/s): {rows[2][1]['steady'] / rows[1][1]['steady']:.2f}x; "
          "every Ray store identical to the one-process store")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--index-tokens", type=int, default=1_000_000)
    ap.add_argument("--d-sae", type=int, default=16384)
    ap.add_argument("--per-token", type=int, default=32)
    ap.add_argument("--shard-rows", type=int, default=16384)
    ap.add_argument("--shards-per-task", type=int, default=0,
                    help="shards per map task; 0 = saecore's default (about four tasks per worker CPU)")
    ap.add_argument("--harvest-tokens", type=int, default=8192)
    ap.add_argument("--skip", choices=["index", "harvest"], default=None)
    args = ap.parse_args()
    print(f"machine: {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if args.skip != "index":
            bench_index(tmp, args.index_tokens, args.d_sae, args.per_token, args.shard_rows, args.shards_per_task)
        print(f"\nRay per-task overhead (2-CPU local cluster, trivial tasks): {child(OVERHEAD)['per_task_ms']:.2f} ms")
        if args.skip != "harvest":
            bench_harvest(tmp, args.harvest_tokens)
    print(f"load average at the end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    t0 = time.time()
    main()
    print(f"(bench wall time {time.time() - t0:.0f} s)")
