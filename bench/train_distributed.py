"""Distributed training throughput: 1 rank vs 2 ranks, data vs latent sharding, in one run.

    python bench/train_distributed.py                       # d_in 256, d_sae 8192, batch 2048, topk + relu
    python bench/train_distributed.py --d-sae 4096 --steps 10 --arch topk

Each case trains the same SAE on the same toy store with the real trainer (``saecore.train`` for one
rank; :func:`saecore.distributed.train_distributed` on 2 gloo processes — NCCL and one GPU per rank
when CUDA is present) and reports:

  tokens/s       global tokens per second over the steps after the first two (warm-up excluded);
  comm/step      payload bytes one rank hands to collectives per step (gradients, partial decodes,
                 selection candidates, statistics; a ring all-reduce moves ≈ 2·(N−1)/N of its payload);
  of bound       tokens/s ÷ the machine's matmul bound for the step, measured in this run as the best
                 fp32 torch.mm rate on the step's own shapes over the whole machine (all threads), with
                 the FLOP model of bench/train.py: ≈ 12·d_in·d_sae per token for dense steps (relu,
                 jumprelu), ≈ 2·d_in·d_sae for TopK/BatchTopK (only the encoder's forward is dense).

The one-rank case uses every thread; each of the 2 ranks gets half of them, so on a 2-core machine
the comparison is the parallel efficiency of the collectives, not a speed-up from more hardware.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from saecore import distributed
from saecore.toy import ToyConfig, write_toy_store
from saecore.training import TrainConfig, train

WARMUP_STEPS = 2


def gemm_gflops(m: int, k: int, n: int, reps: int = 3) -> float:
    """Best fp32 torch.mm rate (GFLOP/s) on [m, k] @ [k, n]: the practical compute ceiling."""
    a, b = torch.randn(m, k), torch.randn(k, n)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t)
    return 2 * m * k * n / best / 1e9


def flops_per_token(arch: str, d_in: int, d_sae: int) -> float:
    return (2 if arch in ("topk", "batchtopk") else 12) * d_in * d_sae


class StepClock:
    """on_step callback: wall time and communicated bytes after the warm-up steps."""

    def __init__(self) -> None:
        self.t0 = self.bytes0 = None
        self.steps = 0
        self.elapsed = 0.0
        self.bytes = 0

    def __call__(self, step: int, stats: dict) -> None:
        if step == WARMUP_STEPS:
            self.t0, self.bytes0 = time.perf_counter(), distributed.COMM_BYTES[0]
        elif step > WARMUP_STEPS and self.t0 is not None:
            self.steps = step - WARMUP_STEPS
            self.elapsed = time.perf_counter() - self.t0
            self.bytes = distributed.COMM_BYTES[0] - self.bytes0


def _worker(rank: int, world: int, rdv: str, store: str, out: str, cfg: TrainConfig, shards: int, threads: int,
            result: str) -> None:
    torch.set_num_threads(threads)
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(rank)
    dist.init_process_group(backend, init_method=f"file://{rdv}", rank=rank, world_size=world)
    clock = StepClock()
    distributed.train_distributed(store, out, cfg, latent_shards=shards, on_step=clock)
    if rank == 0:
        Path(result).write_text(json.dumps({"steps": clock.steps, "elapsed": clock.elapsed, "bytes": clock.bytes}))
    dist.destroy_process_group()


def run_case(store: Path, work: Path, cfg: TrainConfig, ranks: int, shards: int, threads: int) -> dict:
    out = work / f"{cfg.architecture}-{ranks}-{shards}"
    if ranks == 1:
        torch.set_num_threads(threads)
        clock = StepClock()
        train(store, out, cfg, on_step=clock)
        return {"steps": clock.steps, "elapsed": clock.elapsed, "bytes": 0}
    result = work / f"{out.name}.json"
    mp.spawn(_worker, args=(ranks, str(work / f"rdv-{out.name}"), str(store), str(out), cfg, shards,
                            max(1, threads // ranks), str(result)), nprocs=ranks, join=True)
    return json.loads(result.read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--d-in", type=int, default=256)
    ap.add_argument("--d-sae", type=int, default=8192)
    ap.add_argument("--batch-size", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--arch", nargs="+", default=["topk", "relu"])
    ap.add_argument("--k", type=int, default=32)
    args = ap.parse_args()
    threads = torch.get_num_threads()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        rows = args.batch_size * args.steps
        store = write_toy_store(work / "activations.zarr", ToyConfig(n_features=4 * args.d_in, d=args.d_in, seed=0),
                                rows=rows, chunk_rows=min(4096, args.batch_size))
        bound = gemm_gflops(args.batch_size, args.d_in, args.d_sae)
        print(f"machine: {os.cpu_count()} CPUs, {threads} torch threads, device {device}; "
              f"fp32 matmul bound {bound:.1f} GFLOP/s on [{args.batch_size}x{args.d_in}]@[{args.d_in}x{args.d_sae}]")
        print(f"d_in {args.d_in}, d_sae {args.d_sae}, batch {args.batch_size}, {args.steps} steps "
              f"({WARMUP_STEPS} warm-up excluded)\n")
        print("| arch | ranks | sharding | tokens/s | comm/step | of bound |")
        print("|---|---:|---|---:|---:|---:|")
        for arch in args.arch:
            cfg = TrainConfig(architecture=arch, d_sae=args.d_sae, k=args.k, batch_size=args.batch_size,
                              num_tokens=rows, holdout_fraction=0.0, shuffle_buffer_rows=rows, progress=False,
                              checkpoint_every_steps=10**9, device=device)
            for ranks, shards, label in ((1, 1, "-"), (2, 1, "data"), (2, 2, "latent")):
                r = run_case(store.path, work, cfg, ranks, shards, threads)
                tps = r["steps"] * args.batch_size / r["elapsed"]
                frac = tps * flops_per_token(arch, args.d_in, args.d_sae) / (bound * 1e9)
                mib = r["bytes"] / max(r["steps"], 1) / 2**20
                print(f"| {arch} | {ranks} | {label} | {tps:,.0f} | {mib:.2f} MiB | {frac:.2f} |", flush=True)


if __name__ == "__main__":
    main()
