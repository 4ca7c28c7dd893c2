"""bench/synth_vs_saelens.py's SAELens side: it sees saecore's batches in saecore's order, trains every
architecture with SAELens' trainer for the same budget, and is scored by the same evaluation as saecore."""

from __future__ import annotations

import importlib.util
import itertools
from pathlib import Path

import pytest
import torch
from saecore.bench_synth import BenchSynthConfig, train_config, write_training_store
from saecore.sae import ARCHITECTURES, SAE, SAEConfig
from saecore.synth import SynthConfig, SynthModel, evaluate_synth
from saecore.training import Trainer

pytest.importorskip("sae_lens")
BENCH = Path(__file__).resolve().parent.parent / "bench" / "synth_vs_saelens.py"
ROWS, BATCH, WIDTH, K = 2048, 256, 64, 4


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("synth_vs_saelens", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def setting(tmp_path_factory):
    model = SynthModel(SynthConfig(num_features=256, hidden_dim=32, hierarchy_roots=4, ortho_steps=10, seed=5))
    store = write_training_store(tmp_path_factory.mktemp("svs") / "activations.zarr", model, ROWS)
    cfg = BenchSynthConfig(out=tmp_path_factory.mktemp("unused"), width=WIDTH, k=K, batch_size=BATCH, seed=3,
                           lr=1e-3, progress=False)
    run = {"seed": 3, "width": WIDTH, "k": K, "batch_size": BATCH, "samples": ROWS, "lr": 1e-3,
           "saelens_coefficients": {"l1": 1.0, "l0": 1.0}}
    return model, store, cfg, run


def test_saelens_gets_the_batches_saecores_trainer_reads(bench, setting, tmp_path):
    _, store, cfg, _ = setting
    tcfg = train_config(cfg, "batchtopk", WIDTH, K)
    theirs = list(itertools.islice(bench.same_batches(store, tcfg), ROWS // BATCH + 1))
    ours = [torch.from_numpy(x) for x, _ in itertools.islice(Trainer(store, tmp_path, tcfg)._batches(), len(theirs))]
    assert all(torch.equal(a, b) for a, b in zip(theirs, ours, strict=True))
    # One epoch covers every stored row once.
    assert torch.cat(theirs[:-1]).double().sum(0).allclose(torch.from_numpy(store.read("synth", 0, ROWS)).double().sum(0))


def test_every_architecture_trains_with_saelens_for_the_same_budget(bench, setting, tmp_path):
    _, store, cfg, run = setting
    inference_class = {"relu": "StandardSAE", "topk": "TopKSAE", "batchtopk": "JumpReLUSAE",
                       "jumprelu": "JumpReLUSAE", "matryoshka": "JumpReLUSAE"}
    for arch in ARCHITECTURES:
        sae, seconds, seen = bench.train_saelens(arch, store, tmp_path / arch, train_config(cfg, arch, WIDTH, K), run)
        assert seen == ROWS and seconds > 0
        assert type(sae).__name__ == inference_class[arch]
        assert tuple(sae.W_dec.shape) == (WIDTH, 32) and torch.isfinite(sae.W_dec).all()
    assert bench.saelens_training_sae("matryoshka", 32, WIDTH, K, run["saelens_coefficients"]).cfg.matryoshka_widths == [
        4, 8, 16, 32, 64]


def test_the_shared_evaluation_scores_a_saelens_sae_as_its_saecore_twin(bench, setting, tmp_path):
    """The SAELens SAE after training, and a saecore SAE with the same weights (SAELens subtracts b_dec
    before encoding; saecore folds that into b_enc): the same metrics from evaluate_synth."""
    model, store, cfg, run = setting
    lens, _, _ = bench.train_saelens("batchtopk", store, tmp_path / "lens", train_config(cfg, "batchtopk", WIDTH, K), run)
    twin = SAE(SAEConfig(architecture="batchtopk", d_in=32, d_sae=WIDTH, k=K))
    with torch.no_grad():
        twin.W_enc.copy_(lens.W_enc)
        twin.b_enc.copy_(lens.b_enc - lens.b_dec @ lens.W_enc)
        twin.W_dec.copy_(lens.W_dec)
        twin.b_dec.copy_(lens.b_dec)
        twin.threshold.copy_(lens.threshold)
    theirs = evaluate_synth(lens, model, 4096, block=1)
    ours = evaluate_synth(twin, model, 4096, block=1)
    assert theirs["mcc"] == ours["mcc"] and theirs["uniqueness"] == ours["uniqueness"]
    assert 0 < theirs["l0"] < WIDTH
    assert ours == pytest.approx(theirs, rel=1e-4, abs=1e-5)
