"""Model-free feature scores: the Rust token simulators against a NumPy reference, planted token, pair
and context features, and the logit-lens shape statistics against scipy."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import pandas
import pyarrow.parquet as pq
import pytest
import scipy.stats
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from saecore.activations import ActivationStoreWriter
from saecore.run import TOKEN_SCORES_FILE as FILE
from saecore.taxonomy import input_class, logit_shape, output_class, shape_stats
from saecore.token_scores import read_meta, score_arrays, token_scores
from sparse_testdata import mix64, random_dense, stored, write_store

# --- NumPy reference: predictions materialised row by row ------------------------------------------


def held_out(docs: np.ndarray, seed: int, fraction: float) -> np.ndarray:
    u = (mix64(docs.view(np.uint64) ^ np.uint64(seed)) >> np.uint64(11)).astype(np.float64) * 2.0**-53
    return u < fraction


def key_ids(toks: np.ndarray, docs: np.ndarray, pos: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Dense ids of each row's token key and (previous token, token) key; -1 = no previous token."""
    prev = np.full(len(toks), -1, np.int64)
    linked = (docs[1:] == docs[:-1]) & (pos[1:] == pos[:-1] + 1)
    prev[1:][linked] = toks[:-1][linked]
    tok_key = np.unique(toks, return_inverse=True)[1]
    pair_key = np.unique(np.stack([prev, toks.astype(np.int64)], 1), axis=0, return_inverse=True)[1].reshape(-1)
    return tok_key, pair_key


def simulate(dense: np.ndarray, key: np.ndarray, held: np.ndarray) -> np.ndarray:
    """Prediction [held rows, d]: the training mean per key, the feature's training mean for unseen keys."""
    train = ~held
    n_keys = int(key.max()) + 1
    rows = np.bincount(key[train], minlength=n_keys).astype(np.float64)
    sums = np.zeros((n_keys, dense.shape[1]))
    np.add.at(sums, key[train], dense[train].astype(np.float64))
    mean = dense[train].astype(np.float64).sum(0) / train.sum()
    table = np.where(rows[:, None] > 0, sums / np.maximum(rows, 1)[:, None], mean[None, :])
    return table[key[held]]


def pearson_columns(pred: np.ndarray, actual: np.ndarray) -> np.ndarray:
    out = np.full(pred.shape[1], np.nan)
    for f in range(pred.shape[1]):
        if np.ptp(pred[:, f]) > 0 and np.ptp(actual[:, f]) > 0:
            out[f] = np.corrcoef(pred[:, f], actual[:, f])[0, 1]
    return out


def reference(dense, toks, docs, pos, fraction, seed) -> dict[str, np.ndarray]:
    held = held_out(docs, seed, fraction)
    tok_key, pair_key = key_ids(toks, docs, pos)
    actual = dense[held].astype(np.float64)
    fired = dense != 0
    return {
        "token_corr": pearson_columns(simulate(dense, tok_key, held), actual),
        "pair_corr": pearson_columns(simulate(dense, pair_key, held), actual),
        "fires_train": fired[~held].sum(0),
        "fires_held": fired[held].sum(0),
        "distinct_tokens": np.array([len(np.unique(tok_key[fired[:, f]])) for f in range(dense.shape[1])]),
        "distinct_pairs": np.array([len(np.unique(pair_key[fired[:, f]])) for f in range(dense.shape[1])]),
        "n_held": held.sum(),
    }


@st.composite
def keyed_stores(draw):
    seed = draw(st.integers(0, 2**31))
    rows = draw(st.integers(2, 300))
    rng = np.random.default_rng(seed)
    dense = stored(random_dense(seed, rows, draw(st.integers(1, 12)), draw(st.sampled_from([0.05, 0.3, 0.8])), draw(st.booleans())), "float16")
    toks = rng.integers(0, draw(st.integers(1, 8)), rows).astype(np.int32)
    docs = np.sort(rng.integers(0, draw(st.integers(1, 30)), rows)).astype(np.int64) - 3  # some negative ids
    pos = rng.integers(0, 3, rows).cumsum().astype(np.int32)  # steps of 0, 1, 2: adjacent or not
    return dense, toks, docs, pos, draw(st.sampled_from([0.3, 0.5, 0.8])), draw(st.integers(0, 2**64 - 1)), draw(st.integers(1, 64))


@settings(max_examples=60, deadline=None)
@given(keyed_stores())
def test_rust_scores_match_the_numpy_reference(case):
    dense, toks, docs, pos, fraction, seed, shard_rows = case
    held = held_out(docs, seed, fraction)
    with tempfile.TemporaryDirectory() as tmp:
        path = write_store(Path(tmp) / "f.zarr", dense, shard_rows=shard_rows, batch_rows=37)
        if held.sum() < 2 or held.all():
            with pytest.raises(ValueError, match="held-out rows"):
                score_arrays(path, toks, docs, pos, held_out_fraction=fraction, seed=seed)
            return
        table = score_arrays(path, toks, docs, pos, held_out_fraction=fraction, seed=seed)
    ref = reference(dense, toks, docs, pos, fraction, seed)
    for name in ("token_corr", "pair_corr"):
        got = table[name].to_numpy()
        np.testing.assert_array_equal(np.isnan(got), np.isnan(ref[name]), err_msg=name)
        np.testing.assert_allclose(got, ref[name], rtol=1e-7, atol=1e-9, err_msg=name)
    for name in ("fires_train", "fires_held", "distinct_tokens", "distinct_pairs"):
        np.testing.assert_array_equal(table[name].to_numpy(), ref[name], err_msg=name)
    meta = read_meta(table)
    assert (meta["n_held_rows"], meta["n_train_rows"]) == (ref["n_held"], len(toks) - ref["n_held"])
    assert meta["n_tokens"] == len(np.unique(toks))


# --- planted features -------------------------------------------------------------------------------

TOKEN_FEATURES = {0: 3, 1: 7, 2: 11}  # feature -> the token it fires on
PAIR_FEATURES = {3: (1, 2), 4: (5, 9)}  # feature -> (previous token, token)
CONTEXT_FEATURES = {5: 0, 6: 1, 7: 2}  # feature -> documents with doc_id % 5 == this fire on every row
DEAD = 8


def planted(n_docs: int = 1200, doc_len: int = 50, vocab: int = 16, seed: int = 0):
    rng = np.random.default_rng(seed)
    toks = rng.integers(0, vocab, n_docs * doc_len).astype(np.int32)
    docs = np.repeat(np.arange(n_docs, dtype=np.int64), doc_len)
    pos = np.tile(np.arange(doc_len, dtype=np.int32), n_docs)
    n = len(toks)
    dense = np.zeros((n, 9), np.float32)
    noise = lambda k: (0.1 * rng.standard_normal(k)).astype(np.float32)
    for f, t in TOKEN_FEATURES.items():
        rows = np.flatnonzero(toks == t)
        dense[rows, f] = 2.0 + noise(len(rows))
    prev = np.concatenate([[-1], toks[:-1]])
    prev[pos == 0] = -1
    for f, (a, b) in PAIR_FEATURES.items():
        rows = np.flatnonzero((prev == a) & (toks == b))
        dense[rows, f] = 3.0 + noise(len(rows))
    for f, r in CONTEXT_FEATURES.items():
        rows = np.flatnonzero(docs % 5 == r)
        dense[rows, f] = 1.0 + np.abs(noise(len(rows)))
    return dense, toks, docs, pos


def assert_same_scores(a, b) -> None:
    """Equal tables up to the last bits of the sums (workers merge in any order); NaN equals NaN."""
    assert a.schema.equals(b.schema, check_metadata=False) and a.num_rows == b.num_rows
    pd_a, pd_b = a.to_pandas(), b.to_pandas()
    pandas.testing.assert_frame_equal(pd_a, pd_b, rtol=1e-12, check_exact=False)


@pytest.fixture(scope="module")
def planted_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("planted")
    dense, toks, docs, pos = planted()
    writer = ActivationStoreWriter.open(root / "activations.zarr", {"model": "synthetic", "hooks": ["h"], "dtype": "float32"},
                                        {"h": 2}, capacity_rows=len(toks), chunk_rows=4096)
    writer.append({"h": np.zeros((len(toks), 2), np.float32)}, toks, docs, pos)
    writer.finish()
    (root / "features").mkdir()
    write_store(root / "features" / "sae.zarr", dense, shard_rows=7000, batch_rows=7000,
                spec={"activation_store": str(root / "activations.zarr")})
    table = token_scores(root / "features" / "sae.zarr", seed=3)
    return root, table


def test_planted_token_features_rank_first_and_context_features_below(planted_run):
    _, table = planted_run
    token, pair = table["token_corr"].to_numpy(), table["pair_corr"].to_numpy()
    live = np.flatnonzero(~np.isnan(token))
    top = live[np.argsort(-token[live])][: len(TOKEN_FEATURES)]
    assert set(top) == set(TOKEN_FEATURES), f"token scores {token}"
    assert token[list(TOKEN_FEATURES)].min() > 0.95
    for f in PAIR_FEATURES:
        assert pair[f] > 0.9 and pair[f] > token[f] + 0.3, (f, token[f], pair[f])
    for f in CONTEXT_FEATURES:
        assert max(token[f], pair[f]) < 0.2 < token[list(TOKEN_FEATURES)].min(), (f, token[f], pair[f])
    assert np.isnan(token[DEAD]) and np.isnan(pair[DEAD])
    classes = table["input_class"].to_pylist()
    assert [classes[f] for f in TOKEN_FEATURES] == ["token"] * 3
    assert [classes[f] for f in PAIR_FEATURES] == ["pair"] * 2
    assert [classes[f] for f in CONTEXT_FEATURES] == ["context"] * 3
    assert classes[DEAD] == "dead" and table["taxonomy"][DEAD].as_py() == "dead/unknown"


def test_token_scores_writes_the_table_into_the_runs_index_folder(planted_run):
    root, table = planted_run
    on_disk = pq.read_table(root / "index" / "sae" / FILE)
    assert_same_scores(on_disk, table)
    meta = read_meta(on_disk)
    assert meta["n_train_rows"] + meta["n_held_rows"] == meta["n_rows"] == 60_000
    assert meta["n_tokens"] == 16 and meta["held_rows_unseen_token"] == 0
    assert not list((root / "index" / "sae").glob(".*partial*")), "no temporary file is left behind"


def test_bad_key_arrays_are_refused_with_their_name(planted_run):
    root, _ = planted_run
    path = root / "features" / "sae.zarr"
    _, toks, docs, pos = planted()
    with pytest.raises(ValueError, match="token_ids has 59999 rows but the feature store"):
        score_arrays(path, toks[1:], docs[1:], pos[1:])
    with pytest.raises(ValueError, match="doc_ids: expected a 1-D integer array, got dtype float64"):
        score_arrays(path, toks, docs.astype(np.float64), pos)
    bad = toks.copy()
    bad[5] = -2
    with pytest.raises(ValueError, match=r"token_ids\[5\] = -2 is negative"):
        score_arrays(path, bad, docs, pos)
    with pytest.raises(ValueError, match="held_out_fraction must be strictly between 0 and 1"):
        score_arrays(path, toks, docs, pos, held_out_fraction=1.0)


# --- logit-lens shape -------------------------------------------------------------------------------


def crafted_rows(vocab: int = 4000) -> np.ndarray:
    rng = np.random.default_rng(0)
    bulk = rng.standard_normal(vocab)
    spike_up, spike_down = bulk.copy(), bulk.copy()
    spike_up[:8] += 40.0  # a few promoted tokens far out: a prediction feature
    spike_down[:8] -= 40.0  # a suppression feature
    split = np.where(rng.random(vocab) < 0.4, 3.0, -2.0) + 0.1 * rng.standard_normal(vocab)  # partition
    return np.stack([bulk, spike_up, spike_down, split, rng.exponential(size=vocab), np.full(vocab, 2.5)])


def test_shape_stats_match_scipy_and_sort_the_crafted_features():
    rows = crafted_rows()
    s = shape_stats(rows)
    np.testing.assert_allclose(s.skew[:5], scipy.stats.skew(rows[:5], axis=1, bias=True), rtol=1e-10)
    np.testing.assert_allclose(s.kurtosis[:5], scipy.stats.kurtosis(rows[:5], axis=1, fisher=False, bias=True), rtol=1e-10)
    assert np.isnan(s.skew[5]) and np.isnan(s.kurtosis[5]), "a constant row has no shape"
    assert list(output_class(s.skew, s.kurtosis, 6)) == ["other", "prediction", "suppression", "partition", "other", "unknown"]


def test_logit_shape_batches_equal_one_full_product():
    from saecore import models
    from saecore.logit_lens import lens_scores
    from saecore.sae import SAE, SAEConfig

    model, _ = models.tiny_llama(seed=0)
    sae = SAE(SAEConfig(architecture="relu", d_in=model.config.hidden_size, d_sae=10, hook_name="h", model_name="tiny"))
    with torch.no_grad():
        sae.W_dec.copy_(torch.randn(10, model.config.hidden_size, generator=torch.Generator().manual_seed(1)))
        full = lens_scores(sae.W_dec, model).double().numpy()
    got = logit_shape(sae, model, batch_features=3)
    np.testing.assert_allclose(got.skew, scipy.stats.skew(full, axis=1), rtol=1e-6)
    np.testing.assert_allclose(got.kurtosis, scipy.stats.kurtosis(full, axis=1, fisher=False), rtol=1e-6)


def test_input_classes_follow_the_documented_thresholds():
    token = np.array([0.9, 0.3, 0.55, 0.1, np.nan, 0.45])
    pair = np.array([0.95, 0.8, 0.6, 0.15, np.nan, 0.52])
    assert list(input_class(token, pair)) == ["token", "pair", "token", "context", "dead", "context"]


def test_cli_writes_the_table_and_refuses_a_bad_fraction(planted_run, tmp_path, capsys):
    from saecore.cli import main

    root, table = planted_run
    assert main(["token-scores", "--features", str(root / "features" / "sae.zarr"), "--out", str(tmp_path), "--seed", "3"]) == 0
    assert "token/unknown 3" in capsys.readouterr().out
    assert_same_scores(pq.read_table(tmp_path / FILE), table)
    assert main(["token-scores", "--features", str(root / "features" / "sae.zarr"), "--held-out-fraction", "0"]) == 2
    assert "--held-out-fraction: must be in (0, 1), got 0.0" in capsys.readouterr().err
