"""``saecore index`` and :class:`saecore.FeatureIndex`: the documented Parquet schemas, values equal to a
NumPy reference, examples with decoded context, clear errors, and the pipeline end to end (harvest →
train → encode → index) where the top example's value is recomputed from the activation store."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pytest
import saecore
import torch
from conftest import TINY_HOOK
from saecore.encode import encode
from saecore.index import FeatureIndex, index
from saecore.sae import SAE, SAEConfig
from saecore.toy import ToyConfig, write_toy_store

SCHEMAS = {
    "stats": pa.schema([("feature", pa.uint32()), ("count", pa.uint64()), ("density", pa.float64()), ("sum", pa.float64()), ("max", pa.float32()), ("mean_nonzero", pa.float64())]),
    "histograms": pa.schema([("feature", pa.uint32()), ("bin", pa.uint16()), ("lo", pa.float32()), ("hi", pa.float32()), ("count", pa.uint64())]),
    "topk": pa.schema([("feature", pa.uint32()), ("rank", pa.uint16()), ("row", pa.uint64()), ("doc_id", pa.int64()), ("position", pa.int32()), ("value", pa.float32())]),
    "samples": pa.schema([("feature", pa.uint32()), ("bin", pa.uint16()), ("row", pa.uint64()), ("doc_id", pa.int64()), ("position", pa.int32()), ("value", pa.float32())]),
    "density_histogram": pa.schema([("lo_log10", pa.float64()), ("hi_log10", pa.float64()), ("count", pa.uint64())]),
}


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
    """A toy activation store, a random top-k SAE, its feature store and index, and the dense truth."""
    root = tmp_path_factory.mktemp("index")
    store = write_toy_store(root / "activations.zarr", ToyConfig(n_features=32, d=16, seed=5), rows=2500, chunk_rows=512)
    sae = SAE(SAEConfig(architecture="topk", d_in=16, d_sae=48, k=3, hook_name="toy"), seed=2)
    with torch.no_grad():
        sae.b_enc.uniform_(-0.5, 0.0)
        sae.b_enc[:6] = -100.0  # dead features
    sae.save(root / "sae")
    encode(store, root / "sae", root / "features.zarr", batch_rows=500, shard_rows=1000, progress=False)
    with torch.no_grad():
        dense = sae.encode(torch.from_numpy(store.read("toy", 0, store.num_rows))).numpy().astype(np.float16).astype(np.float32)
    idx = index(root / "features.zarr", root / "index", k=5, hist_bins=8, sample_bins=4, samples_per_bin=3, progress=False)
    return store, dense, idx, root


def test_tables_have_the_documented_schemas(toy_run):
    _, _, _idx, root = toy_run
    for name, schema in SCHEMAS.items():
        table = pa.parquet.read_table(root / "index" / f"{name}.parquet")
        assert table.schema.remove_metadata() == schema, name
    meta = json.loads((root / "index" / "meta.json").read_text())
    assert (meta["n_tokens"], meta["d_sae"], meta["k"], meta["hist_bins"]) == (2500, 48, 5, 8)
    assert meta["sae"] == str((root / "sae").resolve())


def test_statistics_and_examples_match_numpy(toy_run):
    store, dense, idx, _ = toy_run
    nz = dense > 0
    count = nz.sum(0)
    stats = idx.stats().to_pydict()
    np.testing.assert_array_equal(stats["count"], count)
    np.testing.assert_allclose(stats["density"], count / 2500)
    np.testing.assert_allclose(stats["sum"], dense.sum(0, dtype=np.float64), rtol=1e-12)
    np.testing.assert_array_equal(stats["max"], dense.max(0))
    np.testing.assert_allclose(stats["mean_nonzero"], np.where(count > 0, dense.sum(0, dtype=np.float64) / np.maximum(count, 1), 0))
    assert 0 < np.count_nonzero(count == 0) < 48, "the fixture should have dead and live features"
    doc_ids, positions = np.asarray(store.doc_ids[:]), np.asarray(store.positions[:])
    for f in range(48):
        col = dense[:, f]
        order = np.lexsort((np.arange(2500), -col))[: min(5, count[f])]
        top = idx.top(f, context=False)
        assert [e.row for e in top] == order.tolist()
        assert [e.value for e in top] == col[order].tolist()
        assert [e.rank for e in top] == list(range(len(order)))
        assert [(e.doc_id, e.position) for e in top] == list(zip(doc_ids[order].tolist(), positions[order].tolist()))
        acts = idx.activations(f)
        np.testing.assert_array_equal(acts.rows, np.flatnonzero(col))
        np.testing.assert_array_equal(acts.values, col[col > 0])
        hist = idx.histogram(f).to_pydict()
        assert sum(hist["count"]) == count[f]
        samples = idx.samples(f, context=False)
        assert all(col[e.row] == e.value for e in samples)
        assert len(samples) <= 4 * 3 and len({e.row for e in samples}) == len(samples)
    dh = idx.density_histogram().to_pydict()
    assert sum(dh["count"]) == 48 and dh["count"][0] == np.count_nonzero(count == 0)


def test_top_examples_carry_their_context(toy_run, tiny_model):
    store, dense, idx, root = toy_run
    tokenizer = tiny_model[1]
    idx = FeatureIndex(root / "index", tokenizer=tokenizer, context=(5, 2))
    f = int(np.argmax((dense > 0).sum(0)))
    ex = idx.top(f, k=2)[0]
    token_ids = np.asarray(store.token_ids[:])
    assert ex.tokens[ex.highlight] == tokenizer.decode([int(token_ids[ex.row])])
    assert "«" + ex.tokens[ex.highlight] + "»" in ex.text
    assert len(ex.tokens) <= 8
    assert all(s.tokens is not None and s.bin is not None for s in idx.samples(f))


def test_bad_feature_ids_and_missing_index_are_clear(toy_run, tmp_path):
    _, _, idx, _ = toy_run
    for bad in (48, -1):
        with pytest.raises(ValueError, match=rf"feature id {bad} outside the valid range 0\.\.47"):
            idx.top(bad)
    with pytest.raises(ValueError, match="feature id 99"):
        idx.activations(99)
    with pytest.raises(FileNotFoundError, match="run `saecore index`"):
        FeatureIndex(tmp_path)


def test_the_cli_writes_the_index(toy_run, tmp_path):
    _, _, idx, root = toy_run
    out = subprocess.run(
        [sys.executable, "-m", "saecore.cli", "index", "--features", str(root / "features.zarr"), "--out", str(tmp_path / "ix"),
         "--k", "5", "--hist-bins", "8", "--sample-bins", "4", "--samples-per-bin", "3", "--no-progress"],
        check=True, capture_output=True, text=True,
    )
    assert "48 features over 2500 tokens" in out.stdout
    again = FeatureIndex(tmp_path / "ix")
    for name in ("stats", "topk", "samples", "histograms"):
        assert again._table(name).equals(idx._table(name)), name


def _pipeline(store, hook: str, tmp_path, d_sae: int, k: int, steps_tokens: int, tokenizer=None):
    """train → encode → index on ``store``; returns (sae, index) (the index decodes with ``tokenizer``, if given)."""
    from saecore.training import TrainConfig, train

    cfg = TrainConfig(architecture="topk", d_sae=d_sae, k=k, batch_size=256, lr=3e-3, num_tokens=steps_tokens, hook=hook,
                      progress=False, shuffle_buffer_rows=2048, dead_window_tokens=1024)
    train(store, tmp_path / "saes" / "sae", cfg)
    encode(store, tmp_path / "saes" / "sae", tmp_path / "features" / "sae.zarr", batch_rows=256, shard_rows=512, progress=False)
    idx = index(tmp_path / "features" / "sae.zarr", tmp_path / "index" / "sae", k=4, progress=False)
    if tokenizer is not None:
        idx = FeatureIndex(idx.path, tokenizer=tokenizer)
    return SAE.load(tmp_path / "saes" / "sae"), idx


def _check_top_examples_recompute(store, hook: str, sae, idx, features: int = 8) -> None:
    stats = idx.stats().to_pydict()
    live = [f for f in np.argsort(stats["count"])[::-1][:features].tolist() if stats["count"][f] > 0]
    assert live, "the SAE never fired"
    for f in live:
        ex = idx.top(f, k=1)[0]
        with torch.no_grad():
            recomputed = float(sae.encode(torch.from_numpy(store.read(hook, ex.row, ex.row + 1)))[0, f])
        assert ex.value == pytest.approx(recomputed, rel=2e-3, abs=1e-6), (f, ex.row)  # stored as float16
        assert ex.value == stats["max"][f]
        assert ex.tokens and "«" in ex.text


def test_end_to_end_on_the_tiny_model(tiny_store, tiny_model, tmp_path):
    # The store records the model "tiny-llama(…)", which has no tokenizer to load by name: pass it.
    _, tokenizer = tiny_model
    sae, idx = _pipeline(tiny_store, TINY_HOOK, tmp_path, d_sae=96, k=8, steps_tokens=4096, tokenizer=tokenizer)
    assert idx.n_tokens == tiny_store.num_rows
    _check_top_examples_recompute(tiny_store, TINY_HOOK, sae, idx)


@pytest.mark.slow
def test_end_to_end_on_the_real_model(smollm2, small_corpus_dir, tmp_path):
    from saecore.harvesting import HarvestConfig, harvest

    hook = "blocks.9.hook_resid_post"
    store = harvest(
        model=smollm2,
        corpus=small_corpus_dir,
        out=tmp_path / "activations.zarr",
        cfg=HarvestConfig(hooks=[hook], context_length=64, batch_size=8, dtype="float32", max_tokens=64 * 48, progress=False),
    )
    torch.set_num_threads(2)
    sae, idx = _pipeline(store, hook, tmp_path, d_sae=512, k=16, steps_tokens=8192)
    _check_top_examples_recompute(store, hook, sae, idx)
    assert isinstance(saecore.FeatureIndex(idx.path), FeatureIndex)
