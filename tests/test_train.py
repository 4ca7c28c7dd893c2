"""The trainer: learns, resumes exactly after SIGINT, refuses changed configs, reports bad input clearly,
shuffles deterministically with bounded memory, and follows Anthropic's schedules."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import numpy as np
import pytest
import saecore
import torch
import zarr
from saecore._trainer_state import load_state
from saecore.activations import ActivationStore
from saecore.errors import CorruptDataError, StoreError
from saecore.sae import SAE
from saecore.toy import ToyConfig, write_toy_store
from saecore.training import (
    STATE_FILENAME,
    ConfigMismatchError,
    ShuffledBatches,
    TrainConfig,
    Trainer,
    train,
)

TOY = ToyConfig(n_features=32, d=16, mean_active=2, noise=0.01, seed=1)


@pytest.fixture(scope="module")
def toy_store(tmp_path_factory) -> ActivationStore:
    return write_toy_store(tmp_path_factory.mktemp("toy") / "activations.zarr", TOY, rows=8192, chunk_rows=1024)


def small(**kw) -> TrainConfig:
    base = {"d_sae": 48, "batch_size": 256, "lr": 3e-3, "progress": False, "shuffle_buffer_rows": 2048, "dead_window_tokens": 2048}
    return TrainConfig(**{**base, **kw})


def test_training_lowers_loss_and_writes_a_checkpoint(toy_store, tmp_path):
    losses: list[float] = []
    stats_seen: list[dict] = []

    def on_step(step, stats):
        losses.append(stats["mse"])
        stats_seen.append(stats)

    sae = train(toy_store, tmp_path / "sae", small(architecture="topk", k=2, batch_size=128, lr=1e-2), on_step=on_step)
    assert len(losses) == 7168 // 128  # one epoch over the rows left after the holdout chunk
    assert np.mean(losses[-5:]) < 0.6 * np.mean(losses[:3])
    print("toy topk: mse first/last", losses[0], losses[-1], "EV", stats_seen[-1]["explained_variance"])
    assert stats_seen[-1]["explained_variance"] > 0.5 and stats_seen[-1]["l0"] == pytest.approx(2.0)
    for name in ("cfg.json", "sae_weights.safetensors", STATE_FILENAME):
        assert (tmp_path / "sae" / name).exists()
    loaded = SAE.load(tmp_path / "sae")
    x = torch.from_numpy(toy_store.read("toy", 0, 64))
    torch.testing.assert_close(loaded.encode(x), sae.encode(x))
    # Rerunning a finished run is a no-op that returns the same SAE.
    again = train(toy_store, tmp_path / "sae", small(architecture="topk", k=2, batch_size=128, lr=1e-2))
    assert torch.equal(again.W_dec, sae.W_dec)


@pytest.mark.parametrize("arch", ["relu", "batchtopk"])
def test_resume_after_sigint_equals_uninterrupted_run(toy_store, tmp_path, arch):
    cfg = small(architecture=arch, k=2, checkpoint_every_steps=4)
    reference = train(toy_store, tmp_path / "ref", cfg)

    def interrupt(step, stats):
        if step == 11:
            os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(KeyboardInterrupt, match="step 11"):
        train(toy_store, tmp_path / "run", cfg, on_step=interrupt)
    state = load_state(tmp_path / "run" / STATE_FILENAME)
    assert state["step"] == 11 and not state["complete"]
    resumed = train(toy_store, tmp_path / "run", cfg)
    for name, p in reference.state_dict().items():
        assert torch.equal(p, resumed.state_dict()[name]), name


def test_resume_with_changed_config_is_refused_naming_the_change(toy_store, tmp_path):
    def stop(step, stats):
        if step == 3:
            os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(KeyboardInterrupt):
        train(toy_store, tmp_path, small(architecture="topk", k=2), on_step=stop)
    with pytest.raises(ConfigMismatchError, match=r"k: checkpoint has 2, now 3"):
        train(toy_store, tmp_path, small(architecture="topk", k=3))
    # Settings that do not change the computation may change.
    train(toy_store, tmp_path, small(architecture="topk", k=2, checkpoint_every_steps=7, device="cpu"))


def test_resume_on_a_store_of_another_width_names_both_sizes(toy_store, tmp_path):
    train(toy_store, tmp_path / "sae", small(architecture="relu", num_tokens=512))
    other = write_toy_store(tmp_path / "other.zarr", ToyConfig(n_features=16, d=8), rows=2048, chunk_rows=1024)
    with pytest.raises(ConfigMismatchError, match=r"d_in=16.*d_model=8"):
        train(other, tmp_path / "sae", small(architecture="relu", num_tokens=512))


def test_non_finite_row_stops_with_its_row_after_saving(tmp_path):
    store = write_toy_store(tmp_path / "bad.zarr", TOY, rows=2048, chunk_rows=1024)
    bad_row = 1500
    arr = zarr.open_array(str(tmp_path / "bad.zarr" / "acts" / "toy"), mode="r+")
    row = arr[bad_row]
    row[3] = np.nan
    arr[bad_row] = row
    with pytest.raises(ValueError, match=rf"store row {bad_row}\b"):
        train(ActivationStore(store.path), tmp_path / "sae", small(holdout_fraction=0.0))
    assert (tmp_path / "sae" / STATE_FILENAME).exists()


def test_store_smaller_than_a_batch_and_missing_store_are_clear_errors(toy_store, tmp_path):
    with pytest.raises(ValueError, match="less than one batch"):
        train(toy_store, tmp_path / "a", small(batch_size=100_000))
    with pytest.raises(FileNotFoundError, match="no activation store"):
        train(tmp_path / "missing.zarr", tmp_path / "b", small())
    (tmp_path / "empty").mkdir()
    with pytest.raises(StoreError, match="not an activation store"):
        train(tmp_path / "empty", tmp_path / "c", small())


def test_shuffled_batches_visit_each_row_once_per_epoch_and_resume_mid_stream(toy_store):
    stream = ShuffledBatches(toy_store, "toy", n_rows=7168, batch_size=512, buffer_rows=2048, seed=5)
    it = stream.batches(0)
    batches = [next(it) for _ in range(14 + 3)]  # one epoch (14 batches) and the start of the next
    rows = np.concatenate([r for _, r in batches[:14]])
    assert sorted(rows.tolist()) == list(range(7168))
    assert not np.array_equal(rows[:512], np.arange(512))  # actually shuffled
    assert not np.array_equal(batches[14][1], batches[0][1])  # a new order in epoch 2
    for x, r in batches[:2]:
        np.testing.assert_array_equal(x, toy_store.read("toy", 0, 8192)[r])
    resumed = stream.batches(9)
    for step in range(9, 17):
        np.testing.assert_array_equal(next(resumed)[1], batches[step][1])


def test_schedules_follow_anthropic(toy_store, tmp_path):
    t = Trainer(toy_store, tmp_path, small(architecture="relu", num_tokens=256 * 100, lr=1e-3, l1_coefficient=5.0), None)
    assert t.total_steps == 100
    assert t.sparsity_coefficient_at(0) == pytest.approx(1.0)  # warm-up over 5 steps: 1, 2, 3, 4, 5
    assert t.sparsity_coefficient_at(4) == pytest.approx(5.0)
    assert t.sparsity_coefficient_at(50) == 5.0
    assert t.lr_at(79) == 1e-3
    assert t.lr_at(80) == pytest.approx(1e-3)
    assert t.lr_at(90) == pytest.approx(5e-4)
    assert t.lr_at(99) == pytest.approx(5e-5)  # (100 - 99) / 20 of the base rate


def test_relu_dead_latents_are_resampled(toy_store, tmp_path):
    resampled = []
    # A huge sparsity penalty kills most latents quickly; resampling must bring some back.
    train(toy_store, tmp_path, small(architecture="relu", l1_coefficient=200.0, dead_window_tokens=1024, num_tokens=3 * 7168),
          on_step=lambda s, st: resampled.append(st["resampled"]))
    assert sum(resampled) > 0


def test_topk_auxk_is_active_when_latents_die(toy_store, tmp_path):
    trainer = Trainer(toy_store, tmp_path, small(architecture="topk", k=1, d_sae=96), None)
    trainer.tokens_since_fired[:50] = trainer.dead_window  # mark half the latents dead
    x = torch.from_numpy(toy_store.read("toy", 0, 256))
    out = trainer.sae(x, dead_mask=trainer.dead_mask())
    assert float(out.aux_loss) > 0
    out.aux_loss.backward()
    assert trainer.sae.W_dec.grad[:50].abs().sum() > 0 and trainer.sae.W_dec.grad[50:].abs().sum() == 0


def test_cli_train_and_package_level_call(toy_store, tmp_path):
    from saecore.cli import main

    code = main(["train", str(toy_store.path), str(tmp_path / "cli"), "--arch", "topk", "--k", "2", "--d-sae", "32",
                 "--batch-size", "512", "--no-progress"])
    assert code == 0
    sae = SAE.load(tmp_path / "cli")
    assert sae.cfg.architecture == "topk" and sae.cfg.d_sae == 32 and sae.cfg.hook_name == "toy"
    again = saecore.train(toy_store, Path(tmp_path / "pkg"), small(architecture="topk", k=2, num_tokens=512))
    assert isinstance(again, SAE)


class _Payload:
    """Unpickling this runs ``open(marker, "w")``: a stand-in for any code a planted pickle could run."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


@pytest.mark.parametrize("planted_as", [STATE_FILENAME, "trainer_state.pt"])
def test_a_planted_pickle_trainer_state_is_refused_unexecuted(toy_store, tmp_path, planted_as):
    import pickle

    marker = tmp_path / "pwned"
    out = tmp_path / "sae"
    out.mkdir()
    (out / planted_as).write_bytes(pickle.dumps({"format": "saecore.trainer/1", "x": _Payload(marker)}))
    with pytest.raises((CorruptDataError, StoreError), match=planted_as.replace(".", r"\.")):
        train(toy_store, out, small())
    assert not marker.exists()
    # Also as torch.save writes it (a zip holding data.pkl), the form an old trainer_state.pt has.
    torch.save({"x": _Payload(marker)}, out / planted_as)
    with pytest.raises((CorruptDataError, StoreError), match=planted_as.replace(".", r"\.")):
        train(toy_store, out, small())
    assert not marker.exists()
    # The payload is real: unpickling it would have made the marker.
    pickle.loads(pickle.dumps(_Payload(marker))).close()
    assert marker.exists()
