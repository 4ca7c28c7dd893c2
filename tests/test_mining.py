"""Mining (Rust) against a plain NumPy reference: statistics, histograms, top-k, quantile samples,
density histogram; independence from the sharding; the GIL released around the work."""

from __future__ import annotations

import threading

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from saecore import _native
from sparse_testdata import bin_of, mine, mix64, random_dense, stored, write_store

SETTINGS = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def reference(dense: np.ndarray, r: dict, k: int, hb: int, sb: int, s: int, seed: int) -> dict:
    """Every statistic recomputed with NumPy from the dense matrix (bin edges taken from ``r`` and
    checked separately, so bin membership is compared exactly)."""
    _n, d = dense.shape
    nz = dense != 0
    count = nz.sum(0)
    ref = {
        "count": count,
        "sum": dense.sum(0, dtype=np.float64),
        "max": dense.max(0, initial=0),
        "min": np.where(count > 0, np.where(nz, dense, np.inf).min(0, initial=np.inf), 0),
    }
    hist_edges = r["hist_edges"].reshape(d, hb + 1)
    sample_edges = r["sample_edges"].reshape(d, sb + 1)
    top = {"feature": [], "rank": [], "row": [], "value": []}
    samples = {"feature": [], "bin": [], "row": [], "value": []}
    hist = np.zeros((d, hb), np.uint64)
    for f in range(d):
        rows = np.flatnonzero(nz[:, f]).astype(np.uint64)
        vals = dense[nz[:, f], f]
        order = np.lexsort((rows, -vals))[:k]  # larger value first, then smaller row
        top["feature"] += [f] * len(order)
        top["rank"] += list(range(len(order)))
        top["row"] += rows[order].tolist()
        top["value"] += vals[order].tolist()
        if not len(rows):
            continue
        hist[f] = np.bincount(bin_of(hist_edges[f], vals), minlength=hb)
        keys = mix64(mix64(np.array([seed ^ f], np.uint64))[0] ^ rows)
        bins = bin_of(sample_edges[f], vals)
        for b in range(sb):
            members = np.flatnonzero(bins == b)
            chosen = members[np.lexsort((rows[members], keys[members]))[:s]]  # s smallest keys
            chosen = chosen[np.lexsort((rows[chosen], -vals[chosen]))]
            samples["feature"] += [f] * len(chosen)
            samples["bin"] += [b] * len(chosen)
            samples["row"] += rows[chosen].tolist()
            samples["value"] += vals[chosen].tolist()
    ref["top"], ref["samples"], ref["hist"] = top, samples, hist
    return ref


def check_edges(r: dict, d: int, hb: int, sb: int) -> None:
    """Histogram edges are log-spaced from each feature's min to its max; sample edges split [0, max]."""
    he, se = r["hist_edges"].reshape(d, hb + 1), r["sample_edges"].reshape(d, sb + 1)
    for f in np.flatnonzero(r["count"]):
        lo, hi = float(r["min"][f]), float(r["max"][f])
        assert he[f, 0] == r["min"][f] and he[f, -1] == r["max"][f]
        np.testing.assert_allclose(he[f], lo * (hi / lo) ** (np.arange(hb + 1) / hb), rtol=1e-6)
        np.testing.assert_allclose(se[f], hi * np.arange(sb + 1) / sb, rtol=1e-6)
        assert se[f, -1] == r["max"][f]


def assert_matches_reference(r: dict, dense: np.ndarray, k: int, hb: int, sb: int, s: int, seed: int) -> None:
    n, d = dense.shape
    ref = reference(dense, r, k, hb, sb, s, seed)
    assert (r["n_rows"], r["d_sae"]) == (n, d)
    np.testing.assert_array_equal(r["count"], ref["count"])
    np.testing.assert_allclose(r["sum"], ref["sum"], rtol=1e-12)
    np.testing.assert_array_equal(r["max"], ref["max"])
    np.testing.assert_array_equal(r["min"], ref["min"])
    check_edges(r, d, hb, sb)
    np.testing.assert_array_equal(r["hist_counts"].reshape(d, hb), ref["hist"])
    for name in ("feature", "rank", "row", "value"):
        np.testing.assert_array_equal(r[f"top_{name}"], np.array(ref["top"][name], dtype=r[f"top_{name}"].dtype))
    for name in ("feature", "bin", "row", "value"):
        np.testing.assert_array_equal(r[f"sample_{name}"], np.array(ref["samples"][name], dtype=r[f"sample_{name}"].dtype))


@SETTINGS
@given(
    seed=st.integers(0, 2**32 - 1),
    rows=st.integers(0, 80),
    d_sae=st.integers(1, 20),
    density=st.floats(0.0, 0.7),
    ties=st.booleans(),
    value_dtype=st.sampled_from(["float16", "float32"]),
    k=st.integers(0, 6),
    hb=st.integers(1, 8),
    sb=st.integers(1, 6),
    s=st.integers(0, 5),
    sample_seed=st.integers(0, 2**64 - 1),
)
def test_mining_matches_numpy_whatever_the_sharding(tmp_path_factory, seed, rows, d_sae, density, ties, value_dtype, k, hb, sb, s, sample_seed):
    dense = random_dense(seed, rows, d_sae, density, ties)
    want = stored(dense, value_dtype)
    params = {"k": k, "hist_bins": hb, "sample_bins": sb, "samples_per_bin": s, "seed": sample_seed}
    tmp = tmp_path_factory.mktemp("mine")
    huge = write_store(tmp / "huge.zarr", dense, shard_rows=max(rows, 1), value_dtype=value_dtype)
    tiny = write_store(tmp / "tiny.zarr", dense, shard_rows=1, batch_rows=7, value_dtype=value_dtype)
    r_huge = mine(huge, **params)
    r_tiny = mine(tiny, **params)
    assert_matches_reference(r_huge, want, k, hb, sb, s, sample_seed)
    for key, value in r_huge.items():
        if key.startswith("t_"):
            continue
        if key == "sum":  # summation order differs with the sharding
            np.testing.assert_allclose(r_tiny[key], value, rtol=1e-12)
        else:
            np.testing.assert_array_equal(r_tiny[key], value, err_msg=key)


def test_quantile_samples_cover_every_activation_level(tmp_path):
    rng = np.random.default_rng(0)
    dense = np.zeros((4000, 2), np.float32)
    dense[:, 0] = rng.uniform(0, 10, 4000)  # spread over all levels
    dense[:100, 1] = 1.0  # one value: everything in the top bin
    path = write_store(tmp_path / "f.zarr", dense, shard_rows=512, value_dtype="float32")
    r = mine(path, sample_bins=10, samples_per_bin=7, k=3)
    f0 = r["sample_feature"] == 0
    assert np.array_equal(np.bincount(r["sample_bin"][f0], minlength=10), [7] * 10)
    edges = r["sample_edges"].reshape(2, 11)[0]
    assert np.all(r["sample_value"][f0] >= edges[r["sample_bin"][f0]])
    f1 = r["sample_feature"] == 1
    assert r["sample_bin"][f1].tolist() == [9] * 7
    assert r["top_row"][r["top_feature"] == 1].tolist() == [0, 1, 2]  # all tied: smallest rows win


def test_density_histogram_matches_numpy():
    rng = np.random.default_rng(1)
    n_rows = 12345
    count = rng.integers(0, n_rows + 1, 500).astype(np.uint64)
    count[:37] = 0
    lo, hi, got = _native.density_histogram(count, n_rows, 25)
    assert (lo[0], hi[0], got[0]) == (-np.inf, -np.inf, 37)
    edges = np.append(lo[1:], hi[-1])
    assert edges[0] == np.floor(np.log10(1 / n_rows)) and edges[-1] == 0
    np.testing.assert_allclose(np.diff(edges), -edges[0] / 25)
    x = np.log10(count[count > 0] / n_rows)
    np.testing.assert_array_equal(got[1:], np.bincount(bin_of(edges, x), minlength=25))
    with pytest.raises(ValueError, match="fires 12346 times in 12345 rows"):
        _native.density_histogram(np.array([n_rows + 1], np.uint64), n_rows, 5)


def test_two_mining_calls_from_two_threads_overlap(tmp_path):
    # If the GIL were held during the Rust work the two calls could only run one after the other;
    # their Rust-side wall-clock spans overlapping shows the GIL is released.
    rng = np.random.default_rng(2)
    rows, d, per_row = 60_000, 2048, 24
    feature = np.sort(rng.integers(0, d, (rows, per_row)), axis=1)
    keep = np.concatenate([np.ones((rows, 1), bool), np.diff(feature, axis=1) > 0], axis=1)
    counts = keep.sum(1)
    row_ptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    w = _native.FeatureStoreWriter(str(tmp_path / "f.zarr"), d, value_dtype="float16", shard_rows=4096, spec_json="{}", threads=2)
    w.append(row_ptr, feature[keep].astype(np.int64), rng.exponential(1, int(counts.sum())).astype(np.float32))
    w.finish()
    barrier = threading.Barrier(2)
    spans: list[tuple[int, int]] = []

    def run() -> None:
        barrier.wait()
        r = mine(tmp_path / "f.zarr", k=32, samples_per_bin=20)
        spans.append((r["t_start_ns"], r["t_end_ns"]))

    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    (a0, a1), (b0, b1) = spans
    assert a0 < b1 and b0 < a1, f"Rust spans do not overlap: {spans}"


def test_progress_counts_both_passes(tmp_path):
    path = write_store(tmp_path / "f.zarr", random_dense(3, 100, 8, 0.3, False), shard_rows=10)
    progress = _native.Progress()
    mine(path, progress=progress)
    assert progress.value == 20
    mine(path, progress=progress, second_pass=False)
    assert progress.value == 30


def test_mine_returns_the_shape_its_stub_declares(tmp_path):
    """``_native.pyi`` types mine's dict as ``_MineResult``; stubtest does not look inside a returned dict,
    so every key, Python type and NumPy dtype is compared with a real result here."""
    import ast
    from importlib import resources

    stub = ast.parse(resources.files("saecore").joinpath("_native.pyi").read_text())
    (cls,) = [n for n in stub.body if isinstance(n, ast.ClassDef) and n.name == "_MineResult"]
    declared = {n.target.id: ast.unparse(n.annotation) for n in cls.body if isinstance(n, ast.AnnAssign)}
    path = write_store(tmp_path / "f.zarr", random_dense(1, 300, 12, 0.2, False), shard_rows=64)
    r = mine(path, k=4, hist_bins=8, sample_bins=5, samples_per_bin=3, seed=0, second_pass=True,
                     progress=None)
    assert set(r) == set(declared)
    for key, annotation in declared.items():
        if annotation == "int":
            assert type(r[key]) is int, key
        else:
            dtype = annotation.removeprefix("npt.NDArray[numpy.").removesuffix("]")
            assert isinstance(r[key], np.ndarray) and r[key].dtype == np.dtype(dtype), (key, r[key].dtype, dtype)
