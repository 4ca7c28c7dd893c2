"""The neighbour kernel (Rust core via saecore.geometry.neighbours) against a NumPy brute force.

Comparisons allow for float32 rounding: returned cosines must equal the reference's sorted cosines,
each returned index must really have the cosine reported for it, and indices are distinct and never
the row itself — together that is "a correct top k", whatever rounding does to near-ties. Exact ties
(duplicate rows, one-hot rows whose cosines are exactly 0 and 1) must go to the smaller index.
"""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from saecore import _native
from saecore.geometry import _torch_neighbours, neighbours

TOL = 2e-5


def reference_cosines(a: np.ndarray, b: np.ndarray | None) -> np.ndarray:
    """Full cosine matrix in float64, zero rows → cosine 0, self pairs (A-vs-A) → -inf."""
    def unit(m: np.ndarray) -> np.ndarray:
        m = m.astype(np.float64)
        n = np.linalg.norm(m, axis=1, keepdims=True)
        return np.divide(m, n, out=np.zeros_like(m), where=n > 0)

    ua = unit(a)
    s = ua @ (ua if b is None else unit(b)).T
    if b is None:
        np.fill_diagonal(s, -np.inf)
    return s


def assert_valid_top_k(idx: np.ndarray, cos: np.ndarray, ref: np.ndarray, k: int) -> None:
    n = ref.shape[0]
    assert idx.shape == cos.shape == (n, k)
    assert idx.dtype == np.uint32 and cos.dtype == np.float32
    want = -np.sort(-ref, axis=1)[:, :k]
    np.testing.assert_allclose(cos, want, atol=TOL, rtol=0)
    np.testing.assert_allclose(np.take_along_axis(ref, idx.astype(np.int64), 1), cos, atol=TOL, rtol=0)
    for r in range(n):
        assert len(set(idx[r].tolist())) == k, f"row {r}: repeated neighbour"
        # Best first; equal cosines in index order (the deterministic tie-break).
        for p in range(k - 1):
            assert cos[r, p] > cos[r, p + 1] or (cos[r, p] == cos[r, p + 1] and idx[r, p] < idx[r, p + 1])


def matrices(draw, rows: int, d: int, dtype) -> np.ndarray:
    """Small integers (many exact ties, duplicate and zero rows) or general floats."""
    if draw(st.booleans()):
        vals = draw(st.lists(st.integers(-3, 3), min_size=1, max_size=40))
        flat = np.resize(np.array(vals, dtype=np.float64), rows * d)
    else:
        flat = np.random.default_rng(draw(st.integers(0, 2**31))).standard_normal(rows * d)
    return flat.reshape(rows, d).astype(dtype)


@st.composite
def self_case(draw):
    rows, d = draw(st.integers(2, 50)), draw(st.integers(1, 20))
    dtype = draw(st.sampled_from([np.float32, np.float16]))
    k = draw(st.one_of(st.just(1), st.just(rows - 1), st.integers(1, rows - 1)))
    return matrices(draw, rows, d, dtype), k, draw(st.one_of(st.none(), st.integers(1, 17)))


@st.composite
def cross_case(draw):
    na, nb, d = draw(st.integers(1, 40)), draw(st.integers(1, 40)), draw(st.integers(1, 20))
    dtype = draw(st.sampled_from([np.float32, np.float16]))
    k = draw(st.one_of(st.just(1), st.just(nb), st.integers(1, nb)))
    return (matrices(draw, na, d, dtype), matrices(draw, nb, d, dtype), k,
            draw(st.one_of(st.none(), st.integers(1, 17))))


SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@SETTINGS
@given(self_case())
def test_self_top_k_matches_brute_force(case):
    a, k, tile = case
    idx, cos = neighbours(a, k=k, device="cpu", tile=tile)
    assert_valid_top_k(idx, cos, reference_cosines(a, None), k)
    assert not (idx == np.arange(len(a))[:, None]).any(), "a row is listed as its own neighbour"


@SETTINGS
@given(cross_case())
def test_cross_top_k_matches_brute_force(case):
    a, b, k, tile = case
    idx, cos = neighbours(a, b, k=k, device="cpu", tile=tile)
    assert_valid_top_k(idx, cos, reference_cosines(a, b), k)


@SETTINGS
@given(self_case(), st.floats(-0.9, 0.95), st.booleans())
def test_threshold_mode_matches_brute_force(case, t, cross):
    a, _, tile = case
    b = a[::-1].copy() if cross else None
    rows, cols, cos = neighbours(a, b, threshold=t, device="cpu", tile=tile)
    ref = reference_cosines(a, b)
    got = set(zip(rows.tolist(), cols.tolist()))
    assert len(got) == len(rows), "duplicate pairs"
    np.testing.assert_allclose(ref[rows, cols], cos, atol=TOL, rtol=0)
    clear_in = {(int(i), int(j)) for i, j in zip(*np.nonzero(ref >= t + TOL))}
    clear_out = {(int(i), int(j)) for i, j in zip(*np.nonzero(ref < t - TOL))}
    assert clear_in <= got and not (got & clear_out)
    key = np.lexsort((cols, -cos.astype(np.float64), rows))
    assert (key == np.arange(len(rows))).all(), "pairs not sorted by row, cosine desc, column"


@SETTINGS
@given(cross_case(), st.booleans())
def test_torch_path_equals_rust_path(case, cross):
    """The PyTorch block path (the one CUDA runs) agrees with the Rust core, ties included."""
    a, b, k, _ = case
    if not cross:
        b = None
        if len(a) < 2:
            return
        k = min(k, len(a) - 1)
    _, cos = neighbours(a, b, k=k, device="cpu")
    t_idx, t_cos = _torch_neighbours(a, b, k, None, "cpu", block_elements=64)
    ref = reference_cosines(a, b)
    assert_valid_top_k(t_idx, t_cos, ref, k)
    np.testing.assert_allclose(t_cos, cos, atol=TOL, rtol=0)


def test_exact_ties_go_to_the_smaller_index():
    # One-hot rows and duplicates: every cosine is exactly 0 or 1, so ties are exact.
    eye = np.eye(4, dtype=np.float32)
    a = eye[[0, 1, 0, 2, 0, 1, 3]]  # rows 0, 2, 4 equal; rows 1, 5 equal
    idx, cos = neighbours(a, k=6, device="cpu", tile=2)
    assert idx[0].tolist() == [2, 4, 1, 3, 5, 6] and cos[0].tolist() == [1, 1, 0, 0, 0, 0]
    assert idx[4].tolist() == [0, 2, 1, 3, 5, 6]
    assert idx[5].tolist() == [1, 0, 2, 3, 4, 6]
    t_idx, t_cos = _torch_neighbours(a, None, 6, None, "cpu")
    assert (t_idx == idx).all() and (t_cos == cos).all()


def test_zero_rows_have_cosine_zero():
    a = np.array([[1, 0], [0, 0], [-1, 0], [0, 2]], dtype=np.float32)
    idx, cos = neighbours(a, k=3, device="cpu")
    assert idx[1].tolist() == [0, 2, 3] and cos[1].tolist() == [0, 0, 0]
    assert idx[0].tolist() == [1, 3, 2] and cos[0].tolist() == [0, 0, -1]


def test_float16_and_torch_inputs():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((64, 24)).astype(np.float16)
    i16, c16 = neighbours(a, k=5, device="cpu")
    i32, c32 = neighbours(a.astype(np.float32), k=5, device="cpu")
    assert (i16 == i32).all() and (c16 == c32).all()
    bf16 = torch.from_numpy(a.astype(np.float32)).to(torch.bfloat16)
    it, ct = neighbours(bf16, k=5, device="cpu")
    assert_valid_top_k(it, ct, reference_cosines(bf16.float().numpy(), None), 5)
    # Non-contiguous input is copied, not rejected, by the Python layer.
    i_nc, _ = neighbours(np.asfortranarray(a.astype(np.float32)), k=5, device="cpu")
    assert (i_nc == i32).all()


@pytest.mark.parametrize("device", ["cpu", "torch"])
def test_errors_name_the_problem(device):
    run = (lambda *a, **kw: neighbours(*a, device="cpu", **kw)) if device == "cpu" else (
        lambda a, b=None, k=10, threshold=None: _torch_neighbours(a, b, k, threshold, "cpu"))
    a = np.ones((5, 3), dtype=np.float32)
    bad = a.copy()
    bad[3, 1] = np.nan
    with pytest.raises(ValueError, match=r"row 3 contains NaN"):
        run(bad, k=2)
    bad[3, 1] = np.inf
    with pytest.raises(ValueError, match=r"row 3 contains an infinite value"):
        run(bad, k=2)
    with pytest.raises(ValueError, match=r"a \(5 x 3\) and b \(4 x 2\)"):
        run(a, np.ones((4, 2), dtype=np.float32), k=2)
    with pytest.raises(ValueError, match=r"k = 5 must be between 1 and 5 - 1 = 4"):
        run(a, k=5)
    with pytest.raises(ValueError, match=r"k = 0"):
        run(a, k=0)
    with pytest.raises(ValueError, match=r"k = 5 must be between 1 and the 4 rows of b"):
        run(a, np.ones((4, 3), dtype=np.float32), k=5)
    with pytest.raises(ValueError, match=r"2-D"):
        run(np.ones(5, dtype=np.float32), k=1)


def test_native_rejects_bad_arrays_directly():
    with pytest.raises(ValueError, match=r"matrix a: expected a 2-D float32"):
        _native.neighbours_top_k(np.ones((3, 3), dtype=np.float64), None, 1, tile=None, name_a="a", name_b="b")
    with pytest.raises(ValueError, match=r"matrix a: array must be C-contiguous"):
        _native.neighbours_top_k(np.ones((3, 4), dtype=np.float32)[:, ::2], None, 1, tile=None, name_a="a", name_b="b")
    with pytest.raises(ValueError, match=r"max_pairs = 3"):
        _native.neighbours_threshold(
            np.ones((3, 2), dtype=np.float32), None, 0.5, max_pairs=3, tile=None, name_a="a", name_b="b"
        )


def test_calls_release_the_gil():
    """Two threads run the kernel while the main thread keeps ticking: if either call held the GIL,
    the main thread would stall for that call's whole duration."""
    a = np.random.default_rng(1).standard_normal((3000, 256)).astype(np.float32)
    neighbours(a[:100], k=1, device="cpu")  # warm the pool
    spans: list[tuple[float, float]] = []

    def work():
        t0 = time.perf_counter()
        neighbours(a, k=5, device="cpu")
        spans.append((t0, time.perf_counter()))

    threads = [threading.Thread(target=work) for _ in range(2)]
    ticks = [time.perf_counter()]
    for t in threads:
        t.start()
    while any(t.is_alive() for t in threads):
        ticks.append(time.perf_counter())
        time.sleep(0.001)
    for t in threads:
        t.join()
    shortest = min(e - s for s, e in spans)
    max_gap = float(np.diff(ticks).max())
    assert max_gap < shortest / 2, f"main thread stalled {max_gap:.3f}s during {shortest:.3f}s calls"
    (s1, e1), (s2, e2) = spans
    assert s1 < e2 and s2 < e1, "the two calls did not overlap in time"


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_path_equals_cpu_path():
    rng = np.random.default_rng(2)
    a = rng.standard_normal((3000, 96)).astype(np.float32)
    b = rng.standard_normal((1700, 96)).astype(np.float32)
    for other in (None, b):
        ci, cc = neighbours(a, other, k=7, device="cpu")
        gi, gc = neighbours(a, other, k=7, device="cuda")
        np.testing.assert_allclose(gc, cc, atol=1e-4, rtol=0)
        assert (gi == ci).mean() > 0.999
        assert_valid_top_k(gi, gc, reference_cosines(a, other), 7)
    cpu_pairs = neighbours(a, None, threshold=0.3, device="cpu")
    gpu_pairs = neighbours(a, None, threshold=0.3, device="cuda")
    cpu_set = set(zip(cpu_pairs[0].tolist(), cpu_pairs[1].tolist()))
    gpu_set = set(zip(gpu_pairs[0].tolist(), gpu_pairs[1].tolist()))
    assert len(cpu_set ^ gpu_set) <= 4  # only pairs within rounding of the threshold may differ
