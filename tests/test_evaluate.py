"""Evaluation: the pinned metric definitions against direct computations, CE-loss recovered at its
two anchors (a perfect SAE → 1, an SAE that outputs zero → 0), metrics.json, and the CLI.
A slow test trains on real SmolLM2 activations and checks the loss falls and the metrics are sane."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from saecore.evaluate import evaluate, format_table, reconstruction_metrics
from saecore.sae import SAE, SAEConfig
from saecore.training import TrainConfig, train

TINY_HOOK = "blocks.1.hook_resid_post"


def _identity_sae(d: int, hook: str) -> SAE:
    """x = ReLU(x) − ReLU(−x): a ReLU SAE with 2·d latents that reconstructs exactly."""
    sae = SAE(SAEConfig("relu", d_in=d, d_sae=2 * d, hook_name=hook, model_name="tiny"))
    eye = torch.eye(d)
    with torch.no_grad():
        sae.W_enc.copy_(torch.cat([eye, -eye], 1))
        sae.W_dec.copy_(torch.cat([eye, -eye], 0))
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    return sae


def _random_sae(d: int, hook: str) -> SAE:
    sae = SAE(SAEConfig("topk", d_in=d, d_sae=4 * d, k=4, hook_name=hook, model_name="tiny"), seed=2)
    with torch.no_grad():
        sae.b_dec.normal_()
    return sae


def test_reconstruction_metrics_match_their_definitions(tiny_store):
    sae = _random_sae(tiny_store.d_model(TINY_HOOK), TINY_HOOK)
    m = reconstruction_metrics(sae, tiny_store, TINY_HOOK, 100, 1700, block_rows=256)
    x = torch.from_numpy(tiny_store.read(TINY_HOOK, 100, 1700)).double()
    f = sae.encode(x.float())
    err = (x - sae.decode(f).double()).pow(2).sum()
    assert m["explained_variance"] == pytest.approx(float(1 - err / (x - x.mean(0)).pow(2).sum()), rel=1e-6)
    assert m["mse"] == pytest.approx(float(err / len(x)), rel=1e-6)
    assert m["normalized_mse"] == pytest.approx(float(err / x.pow(2).sum()), rel=1e-6)
    assert m["l0"] == pytest.approx(float((f > 0).sum(-1).double().mean()), rel=1e-6)
    assert m["dead_fraction"] == pytest.approx(float((~(f > 0).any(0)).double().mean()))
    assert m["tokens"] == m["dead_window_tokens"] == 1600


def test_ce_loss_recovered_anchors_and_metrics_file(tiny_store, tiny_model, small_corpus_dir, tmp_path):
    d = tiny_store.d_model(TINY_HOOK)
    _identity_sae(d, TINY_HOOK).save(tmp_path / "perfect")
    m = evaluate(tmp_path / "perfect", tiny_store, tiny_model, n_contexts=4, context_length=32, corpus=small_corpus_dir)
    assert m["explained_variance"] == pytest.approx(1.0, abs=1e-5)
    assert m["ce_loss_recovered"] == pytest.approx(1.0, abs=1e-3)
    assert m["kl_div"] == pytest.approx(0.0, abs=1e-4)
    assert m["ce_loss_zero_ablation"] != pytest.approx(m["ce_loss_clean"])
    on_disk = json.loads((tmp_path / "perfect" / "metrics.json").read_text())
    assert on_disk["ce_loss_recovered"] == m["ce_loss_recovered"]

    zero = _identity_sae(d, TINY_HOOK)
    with torch.no_grad():
        zero.W_dec.zero_()
    zero.save(tmp_path / "zero")
    m0 = evaluate(tmp_path / "zero", tiny_store, tiny_model, n_contexts=4, context_length=32, corpus=small_corpus_dir)
    assert m0["ce_loss_recovered"] == pytest.approx(0.0, abs=1e-4)
    assert m0["kl_div"] > 0
    assert "ce_loss_recovered" in format_table(m0)


def test_eval_refuses_a_store_of_another_width(tiny_store, tmp_path):
    _identity_sae(8, TINY_HOOK).save(tmp_path)
    with pytest.raises(ValueError, match=r"d_in=8.*d_model=64"):
        evaluate(tmp_path, tiny_store, splice=False)


def test_cli_eval_uses_the_training_store_and_holdout(tiny_store, tmp_path, capsys):
    from saecore.cli import main

    cfg = TrainConfig(architecture="topk", d_sae=128, k=8, batch_size=128, lr=1e-3, progress=False, holdout_fraction=0.25)
    train(tiny_store, tmp_path / "sae", cfg)
    assert main(["eval", str(tmp_path / "sae"), "--no-splice"]) == 0
    out = capsys.readouterr().out
    assert "explained_variance" in out
    m = json.loads((tmp_path / "sae" / "metrics.json").read_text())
    assert m["rows_held_out"] is True and m["rows"][1] == tiny_store.num_rows and m["rows"][0] > 0
    assert 0.0 < m["explained_variance"] <= 1.0 and m["l0"] == pytest.approx(8.0, abs=0.5)


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_real_smollm2_activations_train_and_evaluate(smollm2, tmp_path):
    """Harvest a small slice of SmolLM2 at its middle layer, train TopK, splice it back in."""
    from saecore.harvesting import HarvestConfig, harvest

    torch.set_num_threads(2)
    hook = "blocks.15.hook_resid_post"
    store = harvest(
        model=smollm2,
        corpus="default",
        out=tmp_path / "activations.zarr",
        cfg=HarvestConfig(
            hooks=[hook], context_length=64, batch_size=8, dtype="float32", max_tokens=64 * 64, chunk_rows=512, progress=False
        ),
    )
    mses: list[float] = []
    cfg = TrainConfig(architecture="topk", d_sae=1024, k=32, batch_size=256, lr=2e-3, progress=False,
                      holdout_fraction=0.1, num_tokens=3 * 3500)  # three passes over ~3.5 k training rows
    train(store, tmp_path / "sae", cfg, on_step=lambda s, st: mses.append(st["mse"]))
    assert np.mean(mses[-3:]) < 0.8 * np.mean(mses[:3])
    m = evaluate(tmp_path / "sae", store, smollm2, n_contexts=4, context_length=64)
    print("SmolLM2 topk metrics:", json.dumps({k: m[k] for k in ("l0", "explained_variance", "ce_loss_recovered", "kl_div")}))
    assert 0.1 < m["explained_variance"] <= 1.0  # a minute of CPU training: sane, not good
    assert m["l0"] == pytest.approx(32, abs=1)
    assert m["ce_loss_clean"] < m["ce_loss_with_sae"] < m["ce_loss_zero_ablation"]
    assert 0.0 < m["ce_loss_recovered"] <= 1.0 and m["kl_div"] > 0


def test_eval_refuses_nan_activations_naming_the_row(tmp_path):
    import zarr
    from saecore.activations import ActivationStore
    from saecore.toy import ToyConfig, write_toy_store

    store = write_toy_store(tmp_path / "a.zarr", ToyConfig(n_features=8, d=8, seed=0), rows=1024, chunk_rows=256)
    arr = zarr.open_array(str(store.path / "acts" / "toy"), mode="r+")
    row = arr[700]
    row[2] = np.nan
    arr[700] = row
    with pytest.raises(ValueError, match=r"non-finite activation at store row 700"):
        reconstruction_metrics(_identity_sae(8, "toy"), ActivationStore(store.path), "toy", 0, 1024)
