//! Python wrappers of `saecore::mining`.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use numpy::{IntoPyArray, PyArray1, PyReadonlyArray1};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict};
use saecore::mining::{self as core, partial, Extrema, MineOptions, MineResult, Pass1Partial, Pass2Partial};
use saecore::store::FeatureStore;

use crate::errors::detach;

/// A counter the Rust side advances (shards processed) while Python polls it for a progress bar.
#[pyclass(module = "saecore._native", name = "Progress")]
#[derive(Default)]
pub struct PyProgress {
    pub(crate) count: Arc<AtomicU64>,
}

#[pymethods]
impl PyProgress {
    #[new]
    fn new() -> Self {
        PyProgress::default()
    }

    /// Units of work finished so far.
    #[getter]
    fn value(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }
}

fn now_ns() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64)
}

/// Mine the complete feature store at `path`. Returns a dict of numpy arrays (see
/// `saecore.index` for the fields) plus `t_start_ns`/`t_end_ns`, the wall-clock span of the Rust
/// work (taken with the GIL released).
#[pyfunction]
// Every option is explicit: the defaults live once, in `saecore.index.IndexConfig`.
#[pyo3(signature = (path, *, k, hist_bins, sample_bins, samples_per_bin, seed, second_pass, progress))]
#[allow(clippy::too_many_arguments)]
fn mine<'py>(
    py: Python<'py>,
    path: PathBuf,
    k: usize,
    hist_bins: usize,
    sample_bins: usize,
    samples_per_bin: usize,
    seed: u64,
    second_pass: bool,
    progress: Option<PyRef<'_, PyProgress>>,
) -> PyResult<Bound<'py, PyDict>> {
    let counter = progress.map_or_else(|| Arc::new(AtomicU64::new(0)), |p| p.count.clone());
    let options = MineOptions { k, hist_bins, sample_bins, samples_per_bin, seed, second_pass };
    let (r, start, end) = detach(py, || {
        let start = now_ns();
        let store = FeatureStore::open(&path)?;
        let result = core::mine(&store, &options, &counter)?;
        Ok((result, start, now_ns()))
    })?;
    result_dict(py, r, start, end)
}

fn result_dict(py: Python<'_>, r: MineResult, start: u64, end: u64) -> PyResult<Bound<'_, PyDict>> {
    let out = PyDict::new(py);
    out.set_item("n_rows", r.n_rows)?;
    out.set_item("d_sae", r.d_sae)?;
    out.set_item("t_start_ns", start)?;
    out.set_item("t_end_ns", end)?;
    out.set_item("count", r.count.into_pyarray(py))?;
    out.set_item("sum", r.sum.into_pyarray(py))?;
    out.set_item("max", r.max.into_pyarray(py))?;
    out.set_item("min", r.min.into_pyarray(py))?;
    out.set_item("top_feature", r.top_feature.into_pyarray(py))?;
    out.set_item("top_rank", r.top_rank.into_pyarray(py))?;
    out.set_item("top_row", r.top_row.into_pyarray(py))?;
    out.set_item("top_value", r.top_value.into_pyarray(py))?;
    out.set_item("hist_edges", r.hist_edges.into_pyarray(py))?;
    out.set_item("hist_counts", r.hist_counts.into_pyarray(py))?;
    out.set_item("sample_edges", r.sample_edges.into_pyarray(py))?;
    out.set_item("sample_feature", r.sample_feature.into_pyarray(py))?;
    out.set_item("sample_bin", r.sample_bin.into_pyarray(py))?;
    out.set_item("sample_row", r.sample_row.into_pyarray(py))?;
    out.set_item("sample_value", r.sample_value.into_pyarray(py))?;
    Ok(out)
}

/// Histogram of log10 firing density: `(lo_log10, hi_log10, count)`; row 0 counts dead features.
#[pyfunction]
#[allow(clippy::type_complexity)]
fn density_histogram<'py>(
    py: Python<'py>,
    count: PyReadonlyArray1<'py, u64>,
    n_rows: u64,
    n_bins: usize,
) -> PyResult<(Bound<'py, PyArray1<f64>>, Bound<'py, PyArray1<f64>>, Bound<'py, PyArray1<u64>>)> {
    let counts = count.as_slice().map_err(|_| PyValueError::new_err("count: array must be C-contiguous"))?;
    let h = detach(py, || core::density_histogram(counts, n_rows, n_bins))?;
    Ok((h.lo_log10.into_pyarray(py), h.hi_log10.into_pyarray(py), h.count.into_pyarray(py)))
}

/// Mine shards `first..end` of the store at `path` into an encoded partial (bytes; layout in
/// `saecore::mining::partial`). `pass_=1` gives statistics and top-k; `pass_=2` needs `extrema`
/// (from `mine_extrema` on the merged pass-1 partial) and gives histograms and samples.
#[pyfunction]
#[pyo3(signature = (path, first, end, *, pass_, k, hist_bins, sample_bins, samples_per_bin, seed, extrema=None, progress=None))]
#[allow(clippy::too_many_arguments)]
fn mine_partial<'py>(
    py: Python<'py>,
    path: PathBuf,
    first: usize,
    end: usize,
    pass_: u8,
    k: usize,
    hist_bins: usize,
    sample_bins: usize,
    samples_per_bin: usize,
    seed: u64,
    extrema: Option<&[u8]>,
    progress: Option<PyRef<'_, PyProgress>>,
) -> PyResult<Bound<'py, PyBytes>> {
    let counter = progress.map_or_else(|| Arc::new(AtomicU64::new(0)), |p| p.count.clone());
    let options = MineOptions { k, hist_bins, sample_bins, samples_per_bin, seed, second_pass: pass_ == 2 };
    let extrema = extrema.map(<[u8]>::to_vec);
    let bytes = match (pass_, extrema) {
        (1, None) => detach(py, || Ok(core::mine_pass1(&FeatureStore::open(&path)?, first..end, &options, &counter)?.to_bytes()))?,
        (2, Some(ex)) => detach(py, || {
            let extrema = Extrema::from_bytes(&ex)?;
            Ok(core::mine_pass2(&FeatureStore::open(&path)?, first..end, &extrema, &options, &counter)?.to_bytes())
        })?,
        (1, Some(_)) => return Err(PyValueError::new_err("pass_=1 takes no extrema")),
        (2, None) => return Err(PyValueError::new_err("pass_=2 needs the extrema of the complete pass 1")),
        (p, _) => return Err(PyValueError::new_err(format!("pass_ must be 1 or 2, got {p}"))),
    };
    Ok(PyBytes::new(py, &bytes))
}

/// Merge encoded partials of one pass (all pass 1 or all pass 2) into one encoded partial. A
/// partial whose checksum fails raises `CorruptDataError` naming its position in `parts`.
#[pyfunction]
fn merge_partials<'py>(py: Python<'py>, parts: Vec<Bound<'py, PyBytes>>) -> PyResult<Bound<'py, PyBytes>> {
    let parts: Vec<Vec<u8>> = parts.iter().map(|p| p.as_bytes().to_vec()).collect();
    if parts.is_empty() {
        return Err(PyValueError::new_err("merge_partials: no partials to merge"));
    }
    let bytes = detach(py, || {
        let named = |i: usize, e: saecore::Error| match e {
            saecore::Error::Corrupt(m) => {
                let detail = m.strip_prefix("partial: ").unwrap_or(&m);
                saecore::Error::Corrupt(format!("partial {i} of {}: {detail}", parts.len()))
            }
            other => other,
        };
        if parts[0].get(12..16) == Some(&1u32.to_le_bytes()[..]) {
            let mut acc = Pass1Partial::from_bytes(&parts[0]).map_err(|e| named(0, e))?;
            for (i, p) in parts.iter().enumerate().skip(1) {
                acc.merge(&Pass1Partial::from_bytes(p).map_err(|e| named(i, e))?)?;
            }
            Ok(acc.to_bytes())
        } else {
            let mut acc = Pass2Partial::from_bytes(&parts[0]).map_err(|e| named(0, e))?;
            for (i, p) in parts.iter().enumerate().skip(1) {
                acc.merge(&Pass2Partial::from_bytes(p).map_err(|e| named(i, e))?)?;
            }
            Ok(acc.to_bytes())
        }
    })?;
    Ok(PyBytes::new(py, &bytes))
}

/// Check an encoded partial (magic, checksum, lengths); returns `(pass, shard ranges)`.
#[pyfunction]
fn check_partial(py: Python<'_>, part: &[u8]) -> PyResult<(u8, Vec<(u64, u64)>)> {
    let part = part.to_vec();
    detach(py, || {
        if part.get(12..16) == Some(&1u32.to_le_bytes()[..]) {
            Ok((1, Pass1Partial::from_bytes(&part)?.coverage.0))
        } else {
            Ok((2, Pass2Partial::from_bytes(&part)?.coverage.0))
        }
    })
}

/// The extrema (encoded) of a merged pass-1 partial covering all `num_shards` shards.
#[pyfunction]
fn mine_extrema<'py>(py: Python<'py>, pass1: &[u8], num_shards: usize) -> PyResult<Bound<'py, PyBytes>> {
    let pass1 = pass1.to_vec();
    let bytes = detach(py, || Ok(Pass1Partial::from_bytes(&pass1)?.extrema(num_shards)?.to_bytes()))?;
    Ok(PyBytes::new(py, &bytes))
}

/// Turn merged partials covering every shard of the store at `path` into the same dict `mine` returns.
#[pyfunction]
#[pyo3(signature = (path, pass1, pass2=None))]
fn finish_partials<'py>(py: Python<'py>, path: PathBuf, pass1: &[u8], pass2: Option<&[u8]>) -> PyResult<Bound<'py, PyDict>> {
    let (pass1, pass2) = (pass1.to_vec(), pass2.map(<[u8]>::to_vec));
    let start = now_ns();
    let r = detach(py, || {
        let store = FeatureStore::open(&path)?;
        let p1 = Pass1Partial::from_bytes(&pass1)?;
        let p2 = pass2.as_deref().map(Pass2Partial::from_bytes).transpose()?;
        partial::finish(&p1, p2.as_ref(), store.n_rows(), store.num_shards())
    })?;
    result_dict(py, r, start, now_ns())
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PyProgress>()?;
    m.add_function(wrap_pyfunction!(mine_partial, m)?)?;
    m.add_function(wrap_pyfunction!(merge_partials, m)?)?;
    m.add_function(wrap_pyfunction!(check_partial, m)?)?;
    m.add_function(wrap_pyfunction!(mine_extrema, m)?)?;
    m.add_function(wrap_pyfunction!(finish_partials, m)?)?;
    m.add_function(wrap_pyfunction!(mine, m)?)?;
    m.add_function(wrap_pyfunction!(density_histogram, m)?)?;
    Ok(())
}
