"""Many SAEs trained on the fly from one model pass (``saecore.onthefly``), against training from a store.

* Real SmolLM2, 2 hooks × 2 sizes, 2,048 tokens: on-the-fly weights equal (float tolerance; in practice
  bit for bit) those `saecore train` gets from a separately harvested float32 store of the same tokens.
  Exact rather than statistical, because the stream's shuffle is deterministic: when the run fits one
  shuffle window and one store chunk, the store trainer's shuffle and the stream's are the same
  permutation, and window 0 (the stream's input-scale estimate) is the whole store.
* Tiny model, several windows: the stream's batches equal the store's rows read in order through the
  same windows; a run interrupted (SIGINT) and rerun ends equal to an uninterrupted one.
* 2 gloo ranks (data parallel, then 2 latent shards; the LM work dealt over the ranks) equal one process,
  and the store rank 0 writes on the way equals the one-process store.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import TINY_HOOK
from saecore import models
from saecore.activations import ActivationStore
from saecore.cli import main
from saecore.harvesting import Exclusions, HarvestConfig, _special_ids, harvest
from saecore.onthefly import (
    ModelStream,
    OnTheFlyConfig,
    parse_spec,
    plan_saes,
    shuffled_batches,
    train_on_the_fly,
    windows,
)
from saecore.sae import SAE
from saecore.training import TrainConfig, train

HOOKS = [TINY_HOOK, "blocks.2.hook_resid_post"]


def tiny_cfg(**kw) -> TrainConfig:
    base = {"architecture": "topk", "d_sae": 64, "k": 4, "batch_size": 100, "shuffle_buffer_rows": 512, "lr": 1e-3,
            "progress": False, "holdout_fraction": 0.0, "dead_window_tokens": 400, "checkpoint_every_steps": 4}
    return TrainConfig(**{**base, **kw})


TINY_H = HarvestConfig(context_length=32, max_tokens=64 * 32, dtype="float32", chunk_rows=256, progress=False)
TINY_OTF = OnTheFlyConfig(hooks=[",".join(HOOKS)], saes=["d_sae=64", "d_sae=128,k=8,arch=batchtopk"])


def _weights(saes: dict[str, SAE]) -> dict[str, dict[str, torch.Tensor]]:
    return {name: {k: v.clone() for k, v in s.state_dict().items()} for name, s in saes.items()}


def _assert_same(a: dict, b: dict, exact: bool = False) -> None:
    assert a.keys() == b.keys()
    for name, tensors in a.items():
        for key, value in tensors.items():
            if exact:
                assert torch.equal(value, b[name][key]), f"{name}: {key}"
            else:
                torch.testing.assert_close(value, b[name][key], rtol=2e-4, atol=2e-5, msg=f"{name}: {key}")


@pytest.mark.slow
def test_on_the_fly_equals_training_from_a_harvested_store(smollm2, tmp_path):
    torch.set_num_threads(2)
    hooks = ["blocks.3.hook_resid_post", "blocks.6.hook_resid_post"]
    hcfg = HarvestConfig(hooks=hooks, context_length=64, max_tokens=2048, dtype="float32", chunk_rows=4096,
                         progress=False)
    cfg = TrainConfig(architecture="topk", d_sae=256, k=8, batch_size=256, shuffle_buffer_rows=4096, progress=False,
                      holdout_fraction=0.0)
    otf = OnTheFlyConfig(hooks=hooks, saes=["d_sae=256,k=8", "d_sae=512,k=16"])
    saes = train_on_the_fly(smollm2, "pydoc", tmp_path / "run", cfg, otf, hcfg)
    assert len(saes) == 4 and not (tmp_path / "run" / "activations.zarr").exists()

    store = harvest(smollm2, "pydoc", tmp_path / "store.zarr", hcfg)
    assert store.chunk_rows >= store.num_rows  # one chunk, one window: the two shuffles coincide
    for name, sae in saes.items():
        loaded = SAE.load(tmp_path / "run" / "saes" / name)  # the run layout every later verb reads
        assert loaded.cfg.hook_name == sae.cfg.hook_name and name.startswith(sae.cfg.hook_name)
        reference = train(store, tmp_path / "ref" / name,
                          TrainConfig(**{**cfg.to_dict(), "hook": sae.cfg.hook_name, "d_sae": sae.cfg.d_sae,
                                         "k": sae.cfg.k}))
        for key, value in reference.state_dict().items():
            torch.testing.assert_close(loaded.state_dict()[key], value, rtol=1e-5, atol=1e-6, msg=f"{name}: {key}")


def test_stream_batches_are_the_store_rows_through_the_same_windows(tiny_model, small_corpus, tmp_path):
    model, tok = tiny_model
    hcfg = HarvestConfig(**{**TINY_H.__dict__, "hooks": HOOKS})
    store = harvest(tiny_model, small_corpus, tmp_path / "a.zarr", hcfg)
    excl = Exclusions(True, _special_ids(tok), None)
    stream = ModelStream(model, tok, small_corpus, hcfg, excl)
    assert stream.count_rows() == store.num_rows

    def from_store(start_row: int):
        for first in range(0, store.num_rows, 300):  # blocks that do not line up with the windows
            stop = min(first + 300, store.num_rows)
            if stop > start_row:
                yield first, {h: store.read(h, first, stop) for h in HOOKS}

    W, B = 512, 100
    ours = list(shuffled_batches(windows(stream.blocks(0), W), HOOKS, W, B, seed=3))
    theirs = list(shuffled_batches(windows(from_store(0), W), HOOKS, W, B, seed=3))
    assert len(ours) == store.num_rows // B
    for a, b in zip(ours, theirs, strict=True):
        for x, y in zip(a, b, strict=True):
            np.testing.assert_array_equal(x, y)
    assert sorted(np.concatenate([b[-1] for b in ours]).tolist()) != list(range(len(ours) * B))  # shuffled
    # From step 12 on (window 2), skipping the LM batches before it: the same batches.
    later = list(shuffled_batches(windows(stream.blocks(1024), W, 2), HOOKS, W, B, seed=3, start_step=12))
    for a, b in zip(later, ours[12:], strict=True):
        for x, y in zip(a, b, strict=True):
            np.testing.assert_array_equal(x, y)


def test_interrupted_on_the_fly_run_resumes_to_the_uninterrupted_result(tiny_model, small_corpus, tmp_path):
    whole = _weights(train_on_the_fly(tiny_model, small_corpus, tmp_path / "whole", tiny_cfg(), TINY_OTF, TINY_H))

    def interrupt(name: str, step: int, stats: dict) -> None:
        if step == 14 and name == f"{TINY_HOOK}-batchtopk-128-k8":
            os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(KeyboardInterrupt, match="step 14"):
        train_on_the_fly(tiny_model, small_corpus, tmp_path / "run", tiny_cfg(), TINY_OTF, TINY_H, on_step=interrupt)
    steps: list[int] = []
    resumed = train_on_the_fly(tiny_model, small_corpus, tmp_path / "run", tiny_cfg(), TINY_OTF, TINY_H,
                               on_step=lambda name, step, stats: steps.append(step))
    assert min(steps) == 15  # resumed at window 2 (rows 1400…), not from the start
    _assert_same(whole, _weights(resumed), exact=True)


def test_sae_specs_are_checked_and_named():
    assert parse_spec("arch=relu,d_sae=2048,l1_coefficient=3,name=wide") == {
        "architecture": "relu", "d_sae": 2048, "l1_coefficient": 3.0, "name": "wide"}
    jobs = plan_saes(TrainConfig(architecture="topk"), ["blocks.3.hook_resid_post"],
                     ["d_sae=1024,k=16", "arch=relu,d_sae=1024,lr=0.001"])
    assert [j.name for j in jobs] == ["blocks.3.hook_resid_post-topk-1024-k16", "blocks.3.hook_resid_post-relu-1024-lr0.001"]
    assert jobs[1].cfg.lr == 0.001 and jobs[1].cfg.hook == "blocks.3.hook_resid_post"
    with pytest.raises(ValueError, match="batch_size.*cannot differ"):
        parse_spec("batch_size=10")
    with pytest.raises(ValueError, match="'width' is not a training field"):
        parse_spec("width=10")
    with pytest.raises(ValueError, match="'k=x' is not FIELD|k='x' is not a int"):
        parse_spec("k=x")
    with pytest.raises(ValueError, match="same SAE folder name"):
        plan_saes(TrainConfig(), ["h"], ["d_sae=64", "d_sae=64"])
    with pytest.raises(ValueError, match="k=64 exceeds d_sae=32"):
        plan_saes(TrainConfig(architecture="topk"), ["h"], ["d_sae=32,k=64"])


def test_the_train_verb_trains_on_the_fly(tiny_model_dir, small_corpus_dir, tmp_path, capsys):
    run = tmp_path / "run"
    argv = ["train", "--model", str(tiny_model_dir), "--corpus", str(small_corpus_dir), "--hooks", ",".join(HOOKS),
            "--sae", "d_sae=32", "--sae", "d_sae=64,name=wide", "--arch", "topk", "--k", "4", "--batch-size", "128",
            "--max-tokens", "1024", "--context-length", "32", "--shuffle-buffer-rows", "512", "--no-progress",
            "--write-store", "--dtype", "float32", str(run)]
    assert main(argv) == 0
    assert "saved 4 SAEs" in capsys.readouterr().out
    names = sorted(p.name for p in (run / "saes").iterdir())
    assert names == sorted(f"{h}-{n}" for h in HOOKS for n in ("topk-32-k4", "wide"))
    store = ActivationStore(run / "activations.zarr")  # --write-store: the harvest of the same pass
    assert store.hooks == HOOKS and store.num_rows > 900
    assert SAE.load(run / "saes" / names[0]).cfg.d_in == 64


# --- two ranks ----------------------------------------------------------------------------------


def _worker(rank: int, world: int, rendezvous: str, model_dir: str, corpus: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world)
    model = models.load(model_dir, device="cpu", dtype=torch.float32)  # a saved folder loads in seconds
    otf = OnTheFlyConfig(hooks=TINY_OTF.hooks, saes=TINY_OTF.saes, write_store=True)
    for name, shards in (("data", 1), ("latent", 2)):
        saes = train_on_the_fly(model, corpus, Path(out) / name, tiny_cfg(), otf, TINY_H, latent_shards=shards)
        if rank == 0:
            torch.save(_weights(saes), Path(out) / f"{name}.pt")
    dist.destroy_process_group()


def test_two_ranks_on_the_fly_equal_one_process(tiny_model_dir, small_corpus_dir, tmp_path):
    rendezvous = tmp_path / "rdv"
    mp.spawn(_worker, args=(2, str(rendezvous), str(tiny_model_dir), str(small_corpus_dir), str(tmp_path)), nprocs=2,
             join=True)
    otf = OnTheFlyConfig(hooks=TINY_OTF.hooks, saes=TINY_OTF.saes, write_store=True)
    model = models.load(tiny_model_dir, device="cpu", dtype=torch.float32)
    one = _weights(train_on_the_fly(model, small_corpus_dir, tmp_path / "one", tiny_cfg(), otf, TINY_H))
    for name in ("data", "latent"):
        _assert_same(one, torch.load(tmp_path / f"{name}.pt"))
        a, b = ActivationStore(tmp_path / "one" / "activations.zarr"), ActivationStore(tmp_path / name / "activations.zarr")
        assert a.num_rows == b.num_rows
        np.testing.assert_array_equal(a.token_ids[:], b.token_ids[:])
        for h in HOOKS:
            np.testing.assert_allclose(a.read(h, 0, a.num_rows), b.read(h, 0, b.num_rows), rtol=1e-5, atol=1e-5)
