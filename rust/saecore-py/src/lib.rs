//! `saecore._native`: the thin pyo3 binding of the `saecore` core crate.
//!
//! Each file here wraps one core module: it extracts and checks arguments with the GIL held, then runs
//! the core inside `py.detach` (GIL released) and maps the core's error to a Python exception.

use pyo3::prelude::*;

mod errors;
mod mining;
mod neighbours;
mod store;
mod token_scores;

/// Number of threads the core's pool uses (`SAECORE_NUM_THREADS` caps it).
#[pyfunction]
fn num_threads(py: Python<'_>) -> usize {
    py.detach(saecore::parallel::num_threads)
}

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add_function(wrap_pyfunction!(num_threads, m)?)?;
    store::register(m)?;
    mining::register(m)?;
    neighbours::register(m)?;
    token_scores::register(m)?;
    Ok(())
}
