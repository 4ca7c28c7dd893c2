"""The issue's toy superposition, trained with TrainConfig's defaults (docs/training.md, "The issue's toy").

200 directions in 48 dims, each on with probability 0.02, exponential magnitudes, 20 correlated pairs,
noise 0.02; 400 latents, k = 4; 262,144 rows, batch 512. Prints per architecture the mean max cosine of
the true directions to the decoder rows, the share recovered at cos > 0.9, L0 and dead latents on fresh
rows, and latents on for more than half of them.

    PYTHONPATH=python python bench/toy_defaults.py [OUT_DIR] [ARCH,ARCH,...]
"""

from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path

import torch
from saecore.toy import ToyConfig, sample, true_directions, write_toy_store
from saecore.training import TrainConfig, train

TOY = ToyConfig(n_features=200, d=48, mean_active=4, noise=0.02, seed=11, magnitudes="exponential", correlated_pairs=20)
ARCHS = ["relu", "topk", "batchtopk", "jumprelu", "matryoshka"]


def main(out: Path, archs: list[str]) -> None:
    torch.set_num_threads(1)
    store = out / "activations.zarr"
    if not store.exists():
        write_toy_store(store, TOY, rows=262144, chunk_rows=8192)
    truth = torch.from_numpy(true_directions(TOY)).double()
    fresh = torch.from_numpy(sample(TOY, 16384, block=999))
    for arch in archs:
        t0 = time.time()
        folder = out / arch
        shutil.rmtree(folder, ignore_errors=True)
        cfg = TrainConfig(architecture=arch, d_sae=400, k=4, batch_size=512, holdout_fraction=0.0, progress=False)
        sae = train(store, folder, cfg)
        w = sae.W_dec.detach().double()
        cos = (truth @ (w / w.norm(dim=1, keepdim=True)).T).max(1).values
        with torch.no_grad():
            on = sae.encode(fresh) > 0
        print(f"{arch:10s} mean max cos {cos.mean():.3f}  share>0.9 {(cos > 0.9).double().mean():.3f}  "
              f"L0 {on.sum(1).double().mean():.1f}  dead {int((on.sum(0) == 0).sum())}  "
              f"on>50% {int((on.double().mean(0) > 0.5).sum())}  ({time.time() - t0:.0f} s)", flush=True)


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "runs/toy-defaults"), sys.argv[2].split(",") if len(sys.argv) > 2 else ARCHS)
