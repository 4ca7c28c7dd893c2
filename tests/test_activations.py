"""The activation store on its own: round trips per dtype, commits, resume, refusals, corruption."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import zarr
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from saecore import StoreError, StoreMismatchError
from saecore.activations import (
    ActivationStore,
    ActivationStoreWriter,
    bf16_bits_to_float,
    float_to_bf16_bits,
    remove_store,
)
from saecore.errors import CorruptDataError

HOOK = "blocks.0.hook_resid_post"


def _spec(dtype="float32", **kw):
    return {"model": "test", "hooks": [HOOK], "dtype": dtype, "context_length": 4, **kw}


def _batch(rng, rows, d=8):
    return (
        {HOOK: rng.normal(size=(rows, d)).astype(np.float32)},
        rng.integers(0, 100, rows).astype(np.int32),
        np.arange(rows, dtype=np.int64),
        np.arange(rows, dtype=np.int32) % 4,
    )


def _write(path, batches, dtype="float32", chunk_rows=16, finish=True):
    w = ActivationStoreWriter.open(path, _spec(dtype), {HOOK: 8}, capacity_rows=8, chunk_rows=chunk_rows)
    for b in batches[w.batches_done :]:
        w.append(*b, counters={"tokens_seen": len(b[1])})
    return w.finish({"note": "x"}) if finish else w


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_round_trip_grows_past_capacity(tmp_path, dtype):
    rng = np.random.default_rng(0)
    batches = [_batch(rng, n) for n in (5, 0, 13, 7, 20)]
    store = _write(tmp_path / "s.zarr", batches, dtype)
    want = np.concatenate([b[0][HOOK] for b in batches])
    cast = torch.from_numpy(want).to(getattr(torch, dtype)).float().numpy()
    assert store.num_rows == 45 and store.d_model() == 8 and store.attrs["note"] == "x"
    np.testing.assert_array_equal(store.read(HOOK, 0, 45), cast)
    np.testing.assert_array_equal(np.concatenate([b for _, b in store.iter_blocks(block_rows=10)]), cast)
    np.testing.assert_array_equal(store.token_ids[:], np.concatenate([b[1] for b in batches]))
    assert store.attrs["counters"] == {"tokens_seen": 45}
    assert store.mean_squared_norm() == pytest.approx(float((want.astype(np.float64) ** 2).sum(1).mean()))


@settings(max_examples=200, deadline=None)
@given(
    arrays(
        np.float32,
        st.integers(1, 64),
        elements=st.floats(width=32, allow_nan=False, allow_infinity=False, allow_subnormal=False),
    )
)
def test_bf16_bits_match_torch_rounding(x):
    bits = float_to_bf16_bits(x)
    ref = torch.from_numpy(x.copy()).to(torch.bfloat16)
    np.testing.assert_array_equal(bits, ref.view(torch.int16).numpy().view(np.uint16))
    np.testing.assert_array_equal(bf16_bits_to_float(bits), ref.float().numpy())


def test_float16_overflow_is_refused_by_name(tmp_path):
    w = ActivationStoreWriter.open(tmp_path / "s.zarr", _spec("float16"), {HOOK: 8}, capacity_rows=8, chunk_rows=4)
    acts = {HOOK: np.full((4, 8), 1e5, np.float32)}
    with pytest.raises(ValueError, match=r"blocks\.0\.hook_resid_post.*overflow float16.*bfloat16"):
        w.append(acts, np.zeros(4, np.int32), np.zeros(4, np.int64), np.zeros(4, np.int32))


def test_nan_is_refused_with_its_row(tmp_path):
    w = ActivationStoreWriter.open(tmp_path / "s.zarr", _spec(), {HOOK: 8}, capacity_rows=8)
    acts = np.zeros((3, 8), np.float32)
    acts[2, 5] = np.nan
    with pytest.raises(ValueError, match="row 2"):
        w.append({HOOK: acts}, np.array([1, 2, 77], np.int32), np.zeros(3, np.int64), np.zeros(3, np.int32))


def test_uncommitted_rows_are_invisible_and_resume_continues(tmp_path):
    rng = np.random.default_rng(1)
    batches = [_batch(rng, 6) for _ in range(6)]
    path = tmp_path / "s.zarr"
    w = _write(path, batches[:4], chunk_rows=12, finish=False)  # 4 batches: 2 committed by flush, 2 buffered
    assert json.loads((path / "commit.json").read_text())["batches_done"] == 4
    w.append(*batches[4])  # buffered only, then "crash"
    del w
    with pytest.raises(StoreError, match="incomplete"):
        ActivationStore(path)
    store = _write(path, batches)
    whole = _write(tmp_path / "whole.zarr", batches)
    np.testing.assert_array_equal(store.read(HOOK, 0, store.num_rows), whole.read(HOOK, 0, whole.num_rows))
    assert store.num_rows == 36 and store.attrs["counters"] == whole.attrs["counters"]


def test_other_spec_is_refused_naming_the_difference(tmp_path):
    _write(tmp_path / "s.zarr", [_batch(np.random.default_rng(2), 4)])
    with pytest.raises(StoreMismatchError, match="dtype: store has 'float32', now 'float16'"):
        ActivationStoreWriter.open(tmp_path / "s.zarr", _spec("float16"), {HOOK: 8}, capacity_rows=8)


def test_refuses_foreign_folders_and_damaged_stores(tmp_path):
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "keep.txt").write_text("mine")
    with pytest.raises(StoreError, match="not an activation store"):
        ActivationStoreWriter.open(tmp_path / "other", _spec(), {HOOK: 8}, capacity_rows=8)
    with pytest.raises(StoreError, match="refusing to delete"):
        remove_store(tmp_path / "other")
    assert (tmp_path / "other" / "keep.txt").exists()
    path = tmp_path / "s.zarr"
    _write(path, [_batch(np.random.default_rng(3), 4)])
    (path / "commit.json").write_text("{trunc")
    with pytest.raises(StoreError, match="commit.json: unreadable commit record"):
        ActivationStore(path)
    _write(tmp_path / "t.zarr", [_batch(np.random.default_rng(3), 4)])
    zarr.open_group(str(tmp_path / "t.zarr"), mode="r+")["token_ids"].resize((2,))
    with pytest.raises(CorruptDataError, match="token_ids/zarr.json: sha256 differs"):  # resized after completion
        ActivationStore(tmp_path / "t.zarr")
    with pytest.raises(FileNotFoundError):
        ActivationStore(tmp_path / "missing.zarr")


def test_a_store_claiming_rows_it_never_wrote_is_refused(tmp_path):
    """Metadata, arrays and commit record all saying 10⁹ rows: refused at open (no chunk file for them),
    not read as 10⁹ rows of zeros."""
    from saecore.toy import ToyConfig, write_toy_store

    store = write_toy_store(tmp_path / "a.zarr", ToyConfig(n_features=8, d=8, seed=0), rows=1024, chunk_rows=256)
    big = 10**9
    for name in ("acts/toy", "token_ids", "doc_ids", "positions"):
        meta_path = store.path / name / "zarr.json"
        meta = json.loads(meta_path.read_text())
        meta["shape"][0] = big
        meta_path.write_text(json.dumps(meta))
    group = json.loads((store.path / "zarr.json").read_text())
    group["attributes"]["saecore"]["num_rows"] = big
    (store.path / "zarr.json").write_text(json.dumps(group))
    commit = json.loads((store.path / "commit.json").read_text())
    commit["rows_committed"] = big
    (store.path / "commit.json").write_text(json.dumps(commit))
    with pytest.raises(CorruptDataError, match=r"commit.json: sha256 does not match"):  # its seal
        ActivationStore(store.path)
    del commit["sha256"], commit["metadata_sha256"]  # an unsealed record, as older stores have: the chunks still tell
    (store.path / "commit.json").write_text(json.dumps(commit))
    with pytest.raises(CorruptDataError, match=r"acts/toy/c/3906249/0: missing"):
        ActivationStore(store.path)
    assert zarr.open_group(str(store.path), mode="r")["acts/toy"].shape[0] == big  # zarr itself would read on
