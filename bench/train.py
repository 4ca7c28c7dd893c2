"""SAE training throughput: saecore vs SAELens, same data, sizes and batch, in one run.

    python bench/train.py                              # d_in 576, d_sae 4096 and 16384, batch 4096
    python bench/train.py --d-sae 4096 --steps 3 --arch topk

Per case (architecture × d_sae), each side runs the same number of full optimisation steps on the same
batches (toy activations of width d_in: the data do not change the cost):

  saecore  saecore.train.sae_step: forward, loss, backward, decoder-gradient projection, clip, Adam,
           renormalisation — what the trainer runs each step. TopK uses its sparse path (embedding_bag
           decode, encoder backward over the k selected latents only).
  SAELens  the body of sae_lens' SAETrainer._train_step: TrainingSAE.training_forward_pass, its
           firing statistics, backward, clip_grad_norm_(1.0), Adam step, zero_grad
           (StandardTrainingSAE with apply_b_dec_to_input=False; TopKTrainingSAE, k = 32).

Sides alternate and the best step time of each is kept, so load from other processes hits both
alike. Printed: tokens/s, the ratio, and the fraction of the compute bound, measured in this run as
the machine's best fp32 GEMM rate on the step's own shapes: a dense step needs ≈ 12·d_in·d_sae FLOP per
token (ReLU), while TopK needs only the encoder's forward product densely (≈ 2·d_in·d_sae), because
the gradient reaches just k latents per token.
"""

from __future__ import annotations

import argparse
import time

import torch
from saecore.sae import SAE, SAEConfig
from saecore.toy import ToyConfig, sample
from saecore.training import sae_step


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


def saecore_runner(sae: SAE, arch: str, d_sae: int):
    sae.train()
    opt = torch.optim.Adam(sae.parameters(), lr=1e-4)
    dead = torch.zeros(d_sae, dtype=torch.bool)

    def step(x: torch.Tensor) -> float:
        loss, _ = sae_step(sae, opt, x, 5.0 if arch == "relu" else 0.0, 1 / 32, dead, 1.0)
        return float(loss)

    return step


def saelens_runner(arch: str, d_in: int, d_sae: int, k: int, weights: SAE):
    from sae_lens import (
        StandardTrainingSAE,
        StandardTrainingSAEConfig,
        TopKTrainingSAE,
        TopKTrainingSAEConfig,
    )
    from sae_lens.saes.sae import TrainStepInput

    if arch == "relu":
        sae = StandardTrainingSAE(StandardTrainingSAEConfig(d_in=d_in, d_sae=d_sae, l1_coefficient=5.0,
                                                            apply_b_dec_to_input=False))
        coefficients = {"l1": 5.0}
    else:
        sae = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=d_in, d_sae=d_sae, k=k))
        coefficients = {}
    with torch.no_grad():  # the same starting point as saecore's, so both see the same sparsity
        for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
            getattr(sae, name).copy_(getattr(weights, name))
    sae.train()
    opt = torch.optim.Adam(sae.parameters(), lr=1e-4)
    since_fired = torch.zeros(d_sae)
    dead = torch.zeros(d_sae, dtype=torch.bool)

    def step(x: torch.Tensor) -> float:
        out = sae.training_forward_pass(TrainStepInput(sae_in=x, coefficients=coefficients, dead_neuron_mask=dead,
                                                       n_training_steps=0, is_logging_step=False))
        with torch.no_grad():  # SAETrainer's firing statistics, as it computes them every step
            firing = out.feature_acts.bool().float()
            did_fire = firing.sum(-2).bool()
            since_fired.add_(1)
            since_fired[did_fire] = 0
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(sae.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
        return float(out.loss.detach())

    return step


def _initial_sae(arch: str, d_in: int, d_sae: int, k: int, l0: int, x: torch.Tensor) -> SAE:
    """Anthropic's init; for relu with ``l0`` > 0, b_enc set so that about l0 latents fire per token,
    as in a trained SAE (at init about half of them fire)."""
    sae = SAE(SAEConfig(arch, d_in=d_in, d_sae=d_sae, k=k), seed=0)
    if arch == "relu" and l0:
        with torch.no_grad():
            pre = x[:512] @ sae.W_enc  # (512, d_sae)
            sae.b_enc.fill_(-float(torch.quantile(pre.flatten()[:1_000_000], 1 - l0 / d_sae)))
    return sae


def run_case(arch: str, d_in: int, d_sae: int, k: int, batch: int, steps: int, l0: int) -> dict:
    data = [torch.from_numpy(sample(ToyConfig(n_features=4 * d_in, d=d_in, mean_active=32, seed=1), batch, block=i))
            for i in range(steps + 1)]
    sae = _initial_sae(arch, d_in, d_sae, k, l0, data[0])
    runners = {"SAELens": saelens_runner(arch, d_in, d_sae, k, sae), "saecore": saecore_runner(sae, arch, d_sae)}
    with torch.no_grad():
        measured_l0 = float((sae.encode(data[0]) > 0).sum(-1).float().mean())
    best = {name: float("inf") for name in runners}
    for name, step in runners.items():  # warm-up step each
        step(data[0])
    gflops = 0.0
    for i in range(steps):  # alternate sides step by step, and re-measure the GEMM rate each round
        gflops = max(gflops, gemm_gflops(batch, d_in, d_sae, reps=2))
        for name, step in runners.items():
            t = time.perf_counter()
            step(data[i + 1])
            best[name] = min(best[name], time.perf_counter() - t)
    flop_per_token = (12 if arch == "relu" else 2) * d_in * d_sae
    tps = {name: batch / t for name, t in best.items()}
    return {
        "arch": arch, "d_sae": d_sae, "l0": measured_l0, "gflops": gflops, "tokens_per_s": tps,
        "ratio": tps["saecore"] / tps["SAELens"],
        "bound_fraction": {n: v * flop_per_token / (gflops * 1e9) for n, v in tps.items()},
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--d-in", type=int, default=576)
    p.add_argument("--d-sae", type=int, nargs="+", default=[4096, 16384])
    p.add_argument("--arch", nargs="+", default=["relu", "topk"], choices=["relu", "topk"])
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--l0", type=int, nargs="+", default=[0, 64],
                   help="relu: latents firing per token at the start (0: Anthropic's init as is, ~d_sae/2)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--device", default="cpu", help="cpu (cuda: the same code on the GPU; see the note in the docs)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, d_in {args.d_in}, batch {args.batch}, "
          f"best of {args.steps} steps per side (after one warm-up step)")
    header = f"{'arch':<6}{'d_sae':>7}{'L0':>7}{'saecore tok/s':>15}{'SAELens tok/s':>15}{'ratio':>8}{'GEMM GF/s':>11}" \
             f"{'saecore %bound':>16}{'SAELens %bound':>16}"
    print(header)
    for d_sae in args.d_sae:
        for arch in args.arch:
            for l0 in args.l0 if arch == "relu" else [0]:
                r = run_case(arch, args.d_in, d_sae, args.k, args.batch, args.steps, l0)
                print(f"{arch:<6}{d_sae:>7}{r['l0']:>7.0f}{r['tokens_per_s']['saecore']:>15.0f}"
                      f"{r['tokens_per_s']['SAELens']:>15.0f}{r['ratio']:>7.2f}x{r['gflops']:>11.1f}"
                      f"{100 * r['bound_fraction']['saecore']:>15.1f}%{100 * r['bound_fraction']['SAELens']:>15.1f}%",
                      flush=True)
    print("bound: relu 12·d_in·d_sae FLOP/token (dense step); topk 2·d_in·d_sae (dense encoder forward only)")


if __name__ == "__main__":
    main()
