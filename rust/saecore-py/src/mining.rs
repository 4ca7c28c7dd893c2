//! Python wrappers of `saecore::mining`.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use numpy::{IntoPyArray, PyArray1, PyReadonlyArray1};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::PyDict;
use saecore::mining::{self as core, MineOptions};
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

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PyProgress>()?;
    m.add_function(wrap_pyfunction!(mine, m)?)?;
    m.add_function(wrap_pyfunction!(density_histogram, m)?)?;
    Ok(())
}
