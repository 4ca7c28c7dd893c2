"""Distributed training with real processes (gloo, 2 ranks): data-parallel and latent-sharded runs equal
one-process training on the same global batch for every architecture; a rank SIGKILLed mid-run resumes
to the identical result; another latent-shard count is refused; torchrun runs the ``train`` verb and its
consolidated checkpoint loads in SAELens."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import sae_lens
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from saecore.activations import ActivationStore
from saecore.cli import main
from saecore.distributed import (
    MANIFEST,
    ConfigMismatchError,
    consolidate,
    read_manifest,
    train_distributed,
)
from saecore.sae import SAE
from saecore.toy import ToyConfig, write_toy_store
from saecore.training import TrainConfig, train

ARCHS = ("relu", "topk", "batchtopk", "jumprelu", "matryoshka")
TOY = ToyConfig(n_features=48, d=16, mean_active=3, noise=0.01, seed=2)


def small(**kw) -> TrainConfig:
    # dead_window = 2 steps: AuxK (topk family) and relu resampling both run within the 6 steps.
    base = {"d_sae": 128, "k": 2, "batch_size": 128, "num_tokens": 6 * 128, "lr": 1e-2, "progress": False, "holdout_fraction": 0.0,
                "shuffle_buffer_rows": 1024, "dead_window_tokens": 256, "checkpoint_every_steps": 1000, "l0_coefficient": 1e-2}
    return TrainConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def store_path(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("toy") / "activations.zarr"
    write_toy_store(path, TOY, rows=2048, chunk_rows=256)
    return path


def _init(rank: int, world: int, rendezvous: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world)


def _worker_runs(rank: int, world: int, rendezvous: str, store: str, out: str, runs: list) -> None:
    """Train each (name, cfg, latent_shards) in turn; rank 0 saves the resulting weights."""
    _init(rank, world, rendezvous)
    for name, cfg, shards in runs:
        sae = train_distributed(store, Path(out) / name, cfg, latent_shards=shards)
        if rank == 0:
            torch.save(sae.state_dict(), Path(out) / f"{name}.pt")
    dist.destroy_process_group()


def _worker_killed(rank: int, world: int, rendezvous: str, store: str, out: str, cfg: TrainConfig, at: int) -> None:
    """Rank 1 SIGKILLs itself right after step ``at`` (before that step is checkpointed)."""
    _init(rank, world, rendezvous)

    def die(step: int, stats: dict) -> None:
        if rank == 1 and step == at:
            os.kill(os.getpid(), signal.SIGKILL)

    train_distributed(store, out, cfg, latent_shards=2, on_step=die)


def _spawn(fn, tmp_path: Path, *args) -> None:
    rendezvous = tmp_path / f"rdv-{os.urandom(4).hex()}"
    mp.spawn(fn, args=(2, str(rendezvous), *args), nprocs=2, join=True)


def _assert_same(a: dict, b: dict, name: str, exact: bool = False) -> None:
    for key, value in a.items():
        if exact:
            assert torch.equal(value, b[key]), f"{name}: {key} differs"
        else:
            torch.testing.assert_close(value, b[key], rtol=2e-4, atol=2e-5, msg=f"{name}: {key} differs")


@pytest.mark.parametrize("mode", ["data", "latent"])
def test_two_ranks_equal_one_process_for_every_architecture(store_path, tmp_path, mode):
    shards = 1 if mode == "data" else 2
    runs = [(arch, small(architecture=arch), shards) for arch in ARCHS]
    _spawn(_worker_runs, tmp_path, str(store_path), str(tmp_path), runs)
    for arch, cfg, _ in runs:
        stats: list[dict] = []
        reference = train(store_path, tmp_path / f"ref-{arch}", cfg, on_step=lambda s, st, seen=stats: seen.append(st))
        if arch in ("topk", "batchtopk", "matryoshka"):  # dead latents appeared, so AuxK's global statistics ran
            assert max(st["dead_fraction"] for st in stats) > 0, arch
        _assert_same(reference.state_dict(), torch.load(tmp_path / f"{arch}.pt"), f"{mode} {arch}")
        # The consolidated checkpoint is the usual SAELens-layout one.
        torch.testing.assert_close(SAE.load(tmp_path / arch).W_dec, reference.W_dec, rtol=2e-4, atol=2e-5)


def test_rank_killed_mid_run_resumes_to_the_uninterrupted_result(store_path, tmp_path, capsys):
    cfg = small(architecture="batchtopk", num_tokens=8 * 128, checkpoint_every_steps=2)
    _spawn(_worker_runs, tmp_path, str(store_path), str(tmp_path), [("whole", cfg, 2)])
    # Whichever rank's failure spawn sees first (the killed one, or its partner's broken collective).
    with pytest.raises((mp.ProcessExitedException, mp.ProcessRaisedException)):
        _spawn(_worker_killed, tmp_path, str(store_path), str(tmp_path / "killed"), cfg, 5)
    manifest = read_manifest(tmp_path / "killed")
    assert manifest["step"] == 4 and not manifest["complete"]
    # `saecore consolidate` exports the committed step, elsewhere or into the run folder itself.
    assert main(["consolidate", str(tmp_path / "killed"), "--out", str(tmp_path / "export")]) == 0
    assert "partial: step 4 of 8" in capsys.readouterr().out
    assert torch.equal(SAE.load(tmp_path / "export").W_enc, consolidate(tmp_path / "killed", write=False).W_enc)
    assert main(["consolidate", str(tmp_path / "killed")]) == 0
    _spawn(_worker_runs, tmp_path, str(store_path), str(tmp_path), [("killed", cfg, 2)])
    _assert_same(torch.load(tmp_path / "whole.pt"), torch.load(tmp_path / "killed.pt"), "resumed", exact=True)
    # The resumed run's end replaced the partial export in its folder.
    _assert_same(torch.load(tmp_path / "whole.pt"), SAE.load(tmp_path / "killed").state_dict(), "final", exact=True)

    # Resuming with another latent-shard count is refused, naming both counts.
    half_done = tmp_path / "killed"
    assert (half_done / "dist" / MANIFEST).exists()
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rdv-one'}", rank=0, world_size=1)
    try:
        with pytest.raises(ConfigMismatchError, match="--latent-shards 2"):
            train_distributed(store_path, half_done, cfg, latent_shards=1)
    finally:
        dist.destroy_process_group()


def test_torchrun_runs_the_train_verb_and_saelens_loads_the_result(store_path, tmp_path):
    out = tmp_path / "sae"
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(Path(__import__("saecore").__file__).parents[1]),
                                          os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "saecore", "train", str(store_path), str(out), "--arch", "topk", "--k", "3", "--d-sae", "32",
           "--batch-size", "128", "--tokens", "512", "--latent-shards", "2", "--no-progress"]
    done = subprocess.run(cmd, check=False, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "2 processes (2 latent shards)" in done.stdout
    theirs = sae_lens.SAE.load_from_disk(str(out), device="cpu")
    ours = SAE.load(out)
    assert ours.cfg.d_sae == 32 and theirs.cfg.architecture() == "topk"
    x = torch.from_numpy(ActivationStore(store_path).read("toy", 0, 64))
    with torch.no_grad():
        torch.testing.assert_close(theirs.encode(x), ours.encode(x), rtol=1e-5, atol=1e-5)
    # One process (no torchrun) with the same settings gives the same SAE.
    single = train(store_path, tmp_path / "one", TrainConfig(architecture="topk", k=3, d_sae=32, batch_size=128,
                                                             num_tokens=512, progress=False))
    torch.testing.assert_close(single.W_dec, ours.W_dec, rtol=2e-4, atol=2e-5)
