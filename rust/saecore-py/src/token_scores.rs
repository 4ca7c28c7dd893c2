//! Python wrapper of `saecore::token_scores`.

use std::path::PathBuf;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;

use numpy::{IntoPyArray, PyReadonlyArray1};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::PyDict;
use saecore::store::FeatureStore;
use saecore::token_scores::{self as core, RowKeys, TokenScoreOptions};

use crate::errors::detach;
use crate::mining::PyProgress;

/// A 1-D array argument as a contiguous slice of the expected dtype, or a `ValueError` naming it.
fn column<'py, T: numpy::Element>(obj: &Bound<'py, PyAny>, name: &str, dtype: &str) -> PyResult<PyReadonlyArray1<'py, T>> {
    let array = obj.extract::<PyReadonlyArray1<'py, T>>().map_err(|_| {
        let got = obj.getattr("dtype").map_or_else(|_| obj.get_type().to_string(), |d| d.to_string());
        let ndim = obj.getattr("ndim").map_or_else(|_| "?".to_string(), |d| d.to_string());
        PyValueError::new_err(format!("{name}: expected a 1-D {dtype} array, got dtype {got} with ndim {ndim}"))
    })?;
    Ok(array)
}

fn contiguous<'a, T: numpy::Element>(array: &'a PyReadonlyArray1<'_, T>, name: &str) -> PyResult<&'a [T]> {
    array.as_slice().map_err(|_| PyValueError::new_err(format!("{name}: array must be C-contiguous")))
}

/// Token-simulator scores of every feature of the complete store at `path`; `token_ids` (int32),
/// `doc_ids` (int64) and `positions` (int32) are row-aligned with the store. Returns a dict of
/// counts and per-feature numpy arrays (see `saecore.token_scores`).
#[pyfunction]
#[pyo3(signature = (path, token_ids, doc_ids, positions, *, held_out_fraction=0.5, seed=0, progress=None))]
#[allow(clippy::too_many_arguments)]
fn token_scores<'py>(
    py: Python<'py>,
    path: PathBuf,
    token_ids: &Bound<'py, PyAny>,
    doc_ids: &Bound<'py, PyAny>,
    positions: &Bound<'py, PyAny>,
    held_out_fraction: f64,
    seed: u64,
    progress: Option<PyRef<'_, PyProgress>>,
) -> PyResult<Bound<'py, PyDict>> {
    let tokens = column::<i32>(token_ids, "token_ids", "int32")?;
    let docs = column::<i64>(doc_ids, "doc_ids", "int64")?;
    let pos = column::<i32>(positions, "positions", "int32")?;
    let keys = RowKeys {
        token_ids: contiguous(&tokens, "token_ids")?,
        doc_ids: contiguous(&docs, "doc_ids")?,
        positions: contiguous(&pos, "positions")?,
    };
    let counter = progress.map_or_else(|| Arc::new(AtomicU64::new(0)), |p| p.count.clone());
    let options = TokenScoreOptions { held_out_fraction, seed };
    let r = detach(py, || {
        let store = FeatureStore::open(&path)?;
        core::token_scores(&store, &keys, &options, &counter)
    })?;
    let out = PyDict::new(py);
    out.set_item("n_rows", r.n_rows)?;
    out.set_item("n_train_rows", r.n_train_rows)?;
    out.set_item("n_held_rows", r.n_held_rows)?;
    out.set_item("n_tokens", r.n_tokens)?;
    out.set_item("n_pairs", r.n_pairs)?;
    out.set_item("held_rows_unseen_token", r.held_rows_unseen_token)?;
    out.set_item("held_rows_unseen_pair", r.held_rows_unseen_pair)?;
    out.set_item("token_corr", r.token_corr.into_pyarray(py))?;
    out.set_item("pair_corr", r.pair_corr.into_pyarray(py))?;
    out.set_item("fires_train", r.fires_train.into_pyarray(py))?;
    out.set_item("fires_held", r.fires_held.into_pyarray(py))?;
    out.set_item("distinct_tokens", r.distinct_tokens.into_pyarray(py))?;
    out.set_item("distinct_pairs", r.distinct_pairs.into_pyarray(py))?;
    Ok(out)
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(token_scores, m)?)?;
    Ok(())
}
