"""The sparse feature store: round trips, zarr-python interop, resume, visibility, corruption, bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import saecore
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from saecore.features import FeatureStore, build_csc, dense_to_csr, open_writer
from sparse_testdata import mine, random_dense, stored, write_store

SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def dense_of(fs: FeatureStore) -> np.ndarray:
    row_ptr, feature, value = fs.read_csr()
    out = np.zeros((fs.n_rows, fs.d_sae), np.float32)
    rows = np.repeat(np.arange(fs.n_rows), np.diff(row_ptr))
    out[rows, feature] = value
    return out


@SETTINGS
@given(
    seed=st.integers(0, 2**32 - 1),
    rows=st.integers(0, 70),
    d_sae=st.integers(1, 24),
    density=st.floats(0.0, 0.6),
    ties=st.booleans(),
    shard_rows=st.integers(1, 80),
    batch_rows=st.integers(1, 40),
    value_dtype=st.sampled_from(["float16", "float32"]),
)
def test_round_trip_and_feature_major_copy(tmp_path_factory, seed, rows, d_sae, density, ties, shard_rows, batch_rows, value_dtype):
    dense = random_dense(seed, rows, d_sae, density, ties)
    path = write_store(tmp_path_factory.mktemp("rt") / "f.zarr", dense, shard_rows=shard_rows, batch_rows=batch_rows, value_dtype=value_dtype)
    fs = FeatureStore(path)
    want = stored(dense, value_dtype)
    assert (fs.n_rows, fs.d_sae, fs.nnz, fs.complete) == (rows, d_sae, int(np.count_nonzero(want)), True)
    np.testing.assert_array_equal(dense_of(fs), want)
    build_csc(path, mem_budget_bytes=12 * 7, chunk_elems=5)  # many blocks, many chunks
    fs = FeatureStore(path)
    fs.verify()
    for f in range(d_sae):
        rows_f, values_f = fs.activations(f)
        np.testing.assert_array_equal(rows_f, np.flatnonzero(want[:, f]))
        np.testing.assert_array_equal(values_f, want[want[:, f] != 0, f])


def test_zarr_python_reads_the_store_without_saecore(tmp_path):
    dense = random_dense(1, 50, 12, 0.3, ties=False)
    path = write_store(tmp_path / "f.zarr", dense, shard_rows=16)
    build_csc(path, chunk_elems=8)
    script = f"""
import json, sys, warnings
import numpy as np, zarr
warnings.simplefilter("ignore")
g = zarr.open_group({str(path)!r}, mode="r")
m = g.attrs["saecore"]
out = {{"n_rows": m["n_rows"], "shards": []}}
for i, s in enumerate(m["shards"]):
    sh = g[f"shards/{{i:06d}}"]
    out["shards"].append([sh["row_ptr"][:].tolist(), sh["feature"][:].tolist(), sh["value"][:].astype(float).tolist()])
out["csc"] = [g["csc/col_ptr"][:].tolist(), g["csc/row"][:].tolist(), g["csc/value"][:].astype(float).tolist()]
out["saecore_imported"] = "saecore" in sys.modules
print(json.dumps(out))
"""
    got = json.loads(subprocess.run([sys.executable, "-c", script], check=True, capture_output=True, text=True).stdout)
    assert got["saecore_imported"] is False
    want = stored(dense, "float16")
    fs = FeatureStore(path)
    for i, (row_ptr, feature, value) in enumerate(got["shards"]):
        shard = fs.shard(i)
        assert row_ptr == shard.row_ptr.tolist() and feature == shard.feature.tolist()
        np.testing.assert_array_equal(np.float32(value), shard.value)
    col_ptr, rows, _values = got["csc"]
    assert col_ptr == [0, *np.cumsum((want != 0).sum(0)).tolist()]
    for f in range(12):
        assert rows[col_ptr[f] : col_ptr[f + 1]] == np.flatnonzero(want[:, f]).tolist()


def files_of(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_resume_after_close_writes_the_same_bytes(tmp_path):
    dense = random_dense(2, 90, 20, 0.2, ties=True)
    once = write_store(tmp_path / "once.zarr", dense, shard_rows=20, batch_rows=10)
    w = open_writer(tmp_path / "twice.zarr", 20, {"test": True}, shard_rows=20)
    w.append(*dense_to_csr(dense[:50]))
    w.close()  # rows 40..50 were only buffered: lost, as after a kill
    w = open_writer(tmp_path / "twice.zarr", 20, {"test": True}, shard_rows=20)
    assert w.rows_at_open == 40
    w.append(*dense_to_csr(dense[40:]))
    w.finish()
    assert files_of(once) == files_of(tmp_path / "twice.zarr")


def test_reopening_with_another_spec_names_the_differences(tmp_path):
    write_store(tmp_path / "f.zarr", random_dense(3, 10, 4, 0.5, True), shard_rows=4, spec={"sae": "a"})
    with pytest.raises(ValueError, match=r"spec.sae: store has \"a\", now \"b\"") as e:
        open_writer(tmp_path / "f.zarr", 4, {"sae": "b"}, shard_rows=4)
    assert "shard_rows" not in str(e.value)
    with pytest.raises(ValueError, match="d_sae: store has 4, now 5"):
        open_writer(tmp_path / "f.zarr", 5, {"sae": "a"}, shard_rows=4)


def test_a_reader_sees_only_committed_shards(tmp_path):
    dense = random_dense(4, 50, 8, 0.4, ties=False)
    w = open_writer(tmp_path / "f.zarr", 8, {}, shard_rows=20, threads=1)
    w.append(*dense_to_csr(dense[:45]))
    w.close()  # waits for the two full shards; rows 40..45 stay uncommitted
    early = FeatureStore(tmp_path / "f.zarr")
    assert (early.num_shards, early.n_rows, early.complete) == (2, 40, False)
    with pytest.raises(ValueError, match="incomplete"):
        mine(tmp_path / "f.zarr")
    w = open_writer(tmp_path / "f.zarr", 8, {}, shard_rows=20)
    w.append(*dense_to_csr(dense[40:]))
    w.finish()
    assert early.num_shards == 2  # an open reader keeps its snapshot
    late = FeatureStore(tmp_path / "f.zarr")
    assert (late.num_shards, late.n_rows, late.complete) == (3, 50, True)
    np.testing.assert_array_equal(dense_of(late), stored(dense, "float16"))


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda b: b[: len(b) // 2], "truncated"),
        (lambda b: b[:7] + bytes([b[7] ^ 0x04]) + b[8:], "CRC-32C"),
    ],
    ids=["truncated", "bit-flip"],
)
def test_damaged_shards_are_detected_and_named(tmp_path, damage, message):
    path = write_store(tmp_path / "f.zarr", random_dense(5, 60, 10, 0.4, False), shard_rows=20)
    chunk = path / "shards" / "000001" / "value" / "c" / "0"
    chunk.write_bytes(damage(chunk.read_bytes()))
    fs = FeatureStore(path)
    fs.shard(0)
    with pytest.raises(saecore.CorruptDataError, match=rf"shard 000001 array value.*{message}"):
        fs.shard(1)
    with pytest.raises(saecore.CorruptDataError, match="shard 000001"):
        fs.verify()
    with pytest.raises(saecore.CorruptDataError, match="shard 000001"):
        mine(path)


def test_a_damaged_manifest_is_reported(tmp_path):
    path = write_store(tmp_path / "f.zarr", random_dense(6, 10, 4, 0.5, True), shard_rows=5)
    meta = json.loads((path / "zarr.json").read_text())
    meta["attributes"]["saecore"]["shards"][1]["row_start"] = 7
    (path / "zarr.json").write_text(json.dumps(meta))
    with pytest.raises(saecore.CorruptDataError, match="shard 000001 starts at row 7, expected 5"):
        FeatureStore(path)
    (path / "zarr.json").write_text("{not json")
    with pytest.raises(saecore.CorruptDataError, match="not valid JSON"):
        FeatureStore(path)


@pytest.mark.parametrize(
    ("row_ptr", "feature", "value", "message"),
    [
        ([0, 1], [4], [1.0], "feature id 4 outside 0..4"),
        ([0, 2], [2, 1], [1.0, 1.0], "strictly increasing"),
        ([0, 1], [1], [np.nan], "not a finite non-negative"),
        ([0, 1], [1], [1e6], "float16 range"),
        ([0, 2], [1], [1.0], "feature has 1 entries but value has 1|row_ptr ends at 2"),
        ([0, 1], [1, 2], [1.0], "same length"),
    ],
)
def test_bad_batches_raise_value_errors_naming_the_problem(tmp_path, row_ptr, feature, value, message):
    w = open_writer(tmp_path / "f.zarr", 4, {}, shard_rows=2)
    with pytest.raises(ValueError, match=message):
        w.append(np.array(row_ptr, np.int64), np.array(feature, np.int64), np.array(value, np.float32))
    assert w.rows_written == 0


def test_wrong_dtypes_and_layouts_are_named(tmp_path):
    w = open_writer(tmp_path / "f.zarr", 4, {}, shard_rows=2)
    ptr, feat = np.array([0, 1], np.int64), np.array([1], np.int64)
    with pytest.raises(ValueError, match="value: expected a 1-D float32 array"):
        w.append(ptr, feat, np.array([1.0], np.float64))
    with pytest.raises(ValueError, match="feature: expected"):
        w.append(ptr, np.array([1.0]), np.array([1.0], np.float32))
    with pytest.raises(ValueError, match="row_ptr: array must be 1-D and C-contiguous"):
        w.append(np.array([0, 9, 1, 9], np.int64)[::2], feat, np.array([1.0], np.float32))
    # float16 values go in as a uint16 view, without a copy
    w.append(ptr, feat, np.array([1.5], np.float16).view(np.uint16))
    w.finish()
    assert FeatureStore(tmp_path / "f.zarr").shard(0).value.tolist() == [1.5]


def test_values_that_round_to_zero_are_dropped(tmp_path):
    dense = np.array([[1e-9, 0.5], [0.0, 1e-30]], np.float32)
    fs = FeatureStore(write_store(tmp_path / "f.zarr", dense, shard_rows=4))
    assert fs.nnz == 1
    np.testing.assert_array_equal(dense_of(fs), [[0, 0.5], [0, 0]])


def test_not_a_store_and_bad_feature_ids_are_clear(tmp_path):
    with pytest.raises(FileNotFoundError):
        FeatureStore(tmp_path / "missing.zarr")
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "x.txt").write_text("x")
    with pytest.raises(ValueError, match="not a saecore feature store"):
        open_writer(tmp_path / "junk", 4, {})
    path = write_store(tmp_path / "f.zarr", random_dense(7, 10, 4, 0.5, True), shard_rows=5)
    with pytest.raises(ValueError, match="no feature-major copy"):
        FeatureStore(path).activations(0)
    build_csc(path)
    with pytest.raises(ValueError, match=r"feature id 4 outside the valid range 0\.\.4"):
        FeatureStore(path).activations(4)
    with pytest.raises(ValueError, match=r"feature id -1 outside"):
        FeatureStore(path).activations(-1)
