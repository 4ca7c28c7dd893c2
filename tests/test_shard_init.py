"""Per-shard initialisation (issue 13): a latent-sharded rank builds only its own latents, with exactly
the values the one-process trainer gives them.

* In one process: SAEs holding uneven latent ranges (split inside an init chunk) initialise to the
  slices of the whole SAE, bit for bit, for every architecture; :func:`kth_largest` over blocks equals
  sorting (hypothesis).
* With real processes (gloo, 2 ranks): each rank's :class:`DistributedTrainer` starts equal to the
  one-process :class:`Trainer`'s slice (weights, biases, JumpReLU's θ₀ counted over both shards, the
  chosen values), and a rank's peak resident memory during set-up stays below the whole dictionary's
  weights while covering its own shard's.
"""

from __future__ import annotations

import itertools
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from hypothesis import given, settings
from hypothesis import strategies as st
from saecore.distributed import DistributedTrainer, Grid, init_grid
from saecore.sae import SAE, SAEConfig
from saecore.seeded_init import INIT_CHUNK_LATENTS, LatentShard, kth_largest
from saecore.toy import ToyConfig, write_toy_store
from saecore.training import TrainConfig, Trainer, open_store

ARCHS = ("relu", "topk", "batchtopk", "jumprelu", "matryoshka")
D_SAE = 3 * INIT_CHUNK_LATENTS  # 2 shards of 1.5 chunks: one chunk whole on each, the middle one split
TOY = ToyConfig(n_features=48, d=16, mean_active=3, noise=0.01, seed=2)


def small(**kw) -> TrainConfig:
    base = {"d_sae": D_SAE, "k": 2, "batch_size": 128, "progress": False, "holdout_fraction": 0.0}
    return TrainConfig(**{**base, **kw})


# One-process runs of each kind the sharded set-up must reproduce.
RUNS = {
    "relu": small(architecture="relu"),
    "topk": small(architecture="topk"),
    "batchtopk": small(architecture="batchtopk", b_dec_init="mean"),
    "jumprelu": small(architecture="jumprelu"),  # θ₀ calibrated: a quantile over both shards' latents
    "jumprelu-zeros": small(architecture="jumprelu", b_dec_init="zeros", seed=3),
}


@pytest.fixture(scope="module")
def store_path(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("toy") / "activations.zarr"
    write_toy_store(path, TOY, rows=2048, chunk_rows=256)
    return path


BIG_D_IN, BIG_D_SAE = 256, 1 << 17  # whole encoder + decoder: 256 MiB; one of 2 shards: 128 MiB
BIG_TOY = ToyConfig(n_features=512, d=BIG_D_IN, mean_active=3, noise=0.01, seed=3)


def _status_kib(field: str) -> int:
    line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith(field + ":"))
    return int(line.split()[1])


def _peak_growth(store: str, out: Path, grid: Grid) -> int:
    """Peak resident growth (bytes) of this rank while it sets up a latent-sharded jumprelu run (-1:
    this system cannot reset the peak)."""
    if not Path("/proc/self/clear_refs").exists():
        return -1
    store_ = open_store(store)
    cfg = TrainConfig(architecture="jumprelu", d_sae=BIG_D_SAE, k=4, batch_size=128, progress=False,
                      holdout_fraction=0.0)
    torch.optim.Adam([torch.zeros(1, requires_grad=True)])  # the first optimiser imports ~150 MiB of code
    Path("/proc/self/clear_refs").write_text("5")  # restart the peak (VmHWM) from the current RSS
    before = _status_kib("VmRSS")
    trainer = DistributedTrainer(store_, out, cfg, grid)
    growth = (_status_kib("VmHWM") - before) * 1024
    assert trainer.sae.W_enc.shape == (BIG_D_IN, BIG_D_SAE // 2)
    return growth


def _worker(rank: int, world: int, rendezvous: str, big_store: str, store: str, out: str) -> None:
    """The peak memory of a big set-up first (a clean baseline), then every run of RUNS set up
    latent-sharded; saves what each rank starts from."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world)
    grid = init_grid(2, torch.device("cpu"))
    Path(out, f"peak-{rank}.txt").write_text(str(_peak_growth(big_store, Path(out) / "big", grid)))
    for name, cfg in RUNS.items():
        t = DistributedTrainer(open_store(store), Path(out) / name, cfg, grid)
        torch.save({"state": t.sae.state_dict(), "chosen": t.chosen, "lambda": t.sparsity_coefficient,
                    "full": t.full_cfg.to_dict()}, Path(out) / f"{name}-{rank}.pt")
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def started(tmp_path_factory, store_path) -> Path:
    """Folder of what each of 2 gloo ranks started from (one spawn for both tests below)."""
    out = tmp_path_factory.mktemp("started")
    write_toy_store(out / "big.zarr", BIG_TOY, rows=512, chunk_rows=256)
    rendezvous = out / f"rdv-{os.urandom(4).hex()}"
    mp.spawn(_worker, args=(2, str(rendezvous), str(out / "big.zarr"), str(store_path), str(out)), nprocs=2,
             join=True)
    return out


def _slice(name: str, value: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    return value[:, lo:hi] if name == "W_enc" else value if name == "b_dec" else value[lo:hi]


def test_each_rank_starts_with_the_one_process_values_of_its_latents(store_path, started):
    L = D_SAE // 2
    for name, cfg in RUNS.items():
        ref = Trainer(open_store(store_path), started / f"ref-{name}", cfg)
        for rank in range(2):
            got = torch.load(started / f"{name}-{rank}.pt")
            for key, value in ref.sae.state_dict().items():
                assert torch.equal(got["state"][key], _slice(key, value, rank * L, (rank + 1) * L)), (name, rank, key)
            assert got["chosen"] == ref.chosen and got["lambda"] == ref.sparsity_coefficient, name
            assert got["full"] == ref.sae.cfg.to_dict(), name  # incl. θ₀ and the kernel width
        if name.startswith("jumprelu"):
            assert float(ref.sae.threshold[0]) > 1e-3 and "jumprelu_init_threshold" in ref.chosen


def test_a_rank_never_holds_the_whole_dictionary_while_it_starts(started):
    whole = 2 * BIG_D_IN * BIG_D_SAE * 4  # W_enc + W_dec of the whole dictionary, float32
    for rank in range(2):
        growth = int((started / f"peak-{rank}.txt").read_text())
        if growth < 0:
            pytest.skip("needs Linux's /proc/self/clear_refs (peak-RSS reset)")
        print(f"rank {rank}: peak RSS growth during set-up {growth / 2**20:.0f} MiB (whole weights "
              f"{whole / 2**20:.0f} MiB)")
        assert whole // 2 <= growth < whole  # its own shard resident, the whole never


@pytest.mark.parametrize("arch", ARCHS)
def test_latent_ranges_initialise_to_the_slices_of_the_whole_sae(arch):
    """Uneven ranges, split inside init chunks, bit for bit (θ₀ aside: it needs every shard's count,
    which the 2-process test above covers)."""
    d_sae, cuts = 2 * INIT_CHUNK_LATENTS + 512, [0, 700, 2100, 2 * INIT_CHUNK_LATENTS + 512]
    cfg = SAEConfig(arch, d_in=8, d_sae=d_sae, k=2)
    xs = torch.randn(300, 8, generator=torch.Generator().manual_seed(1)) * 2 + 1
    whole = SAE(cfg, seed=7)
    whole.initialise_from_data(xs, "geometric_median", 2, calibrate_jumprelu=False)
    for lo, hi in itertools.pairwise(cuts):
        groups = {"matryoshka_groups": [hi - lo]} if arch == "matryoshka" else {}
        part = SAE(SAEConfig.from_dict({**cfg.to_dict(), "d_sae": hi - lo, **groups}), seed=7, first_latent=lo)
        part.initialise_from_data(xs, "geometric_median", 2, calibrate_jumprelu=False,
                                  shard=LatentShard(lo, d_sae, seed=7))
        for key, value in whole.state_dict().items():
            assert torch.equal(part.state_dict()[key], _slice(key, value, lo, hi)), (arch, lo, key)
    # The directions are random, unit norm (0.1 for relu), and W_enc = W_decᵀ.
    norm = 0.1 if arch == "relu" else 1.0
    torch.testing.assert_close(whole.W_dec.norm(dim=1), torch.full((d_sae,), norm))
    assert torch.equal(whole.W_enc, whole.W_dec.t())
    c = INIT_CHUNK_LATENTS  # every chunk draws its own directions
    assert float((whole.W_dec[:c] * whole.W_dec[c:2 * c]).sum(1).abs().max()) < 0.999 * norm**2


def test_a_shard_that_splits_a_chunk_needs_its_seed():
    part = SAE(SAEConfig("topk", d_in=8, d_sae=100, k=2), seed=0, first_latent=50)
    with pytest.raises(ValueError, match="seed"):
        part.initialise_from_data(torch.ones(4, 8), "mean", 2, False, shard=LatentShard(50, 4096))


@settings(max_examples=60, deadline=None)
@given(values=st.lists(st.floats(-1e3, 1e3, width=32) | st.sampled_from([0.0, -0.0, 1.5, -2.0]), min_size=1,
                       max_size=200),
       cuts=st.lists(st.integers(0, 200), max_size=4), data=st.data())
def test_kth_largest_over_blocks_is_the_sorted_value(values, cuts, data):
    v = torch.tensor(values, dtype=torch.float32)
    m = data.draw(st.integers(1, len(values)))
    edges = sorted({0, len(values), *(c for c in cuts if c <= len(values))})
    got = kth_largest(lambda: [v[a:b] for a, b in itertools.pairwise(edges)], m)
    assert got == float(np.sort(v.numpy())[::-1][m - 1])
    assert int((v >= got).sum()) >= m and int((v > got).sum()) < m


