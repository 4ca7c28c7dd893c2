//! Map the core's error enum to Python exceptions: I/O → OSError family, bad arguments → ValueError,
//! corrupt data → `saecore.errors.CorruptDataError`.
//!
//! `CorruptDataError` is declared in Python (`class CorruptDataError(SaecoreError, ValueError)`) so every
//! saecore error shares the root `SaecoreError` while generic `ValueError` handlers still catch it. The
//! class is imported when the first corrupt-data error is raised (not at module init), so
//! `saecore.errors` never has to import `_native`: no import cycle.
//! A refused input-sized allocation → MemoryError (its message names the size and where it came from).

use pyo3::exceptions::{PyFileNotFoundError, PyMemoryError, PyOSError, PyValueError};
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::PyType;

static CORRUPT_DATA_ERROR: PyOnceLock<Py<PyType>> = PyOnceLock::new();

/// A `saecore.errors.CorruptDataError` carrying `message` (the import error, should that import fail).
fn corrupt_data_error(message: String) -> PyErr {
    Python::attach(|py| match CORRUPT_DATA_ERROR.import(py, "saecore.errors", "CorruptDataError") {
        Ok(cls) => PyErr::from_type(cls.clone(), message),
        Err(e) => e,
    })
}

/// Newtype so `?` can turn a core error into a `PyErr` (the orphan rule forbids a direct `From`).
pub struct CoreError(pub saecore::Error);

impl From<saecore::Error> for CoreError {
    fn from(e: saecore::Error) -> Self {
        CoreError(e)
    }
}

impl From<CoreError> for PyErr {
    fn from(e: CoreError) -> PyErr {
        let message = e.0.to_string();
        match e.0 {
            saecore::Error::Io { source, .. } if source.kind() == std::io::ErrorKind::NotFound => {
                PyFileNotFoundError::new_err(message)
            }
            saecore::Error::Io { .. } => PyOSError::new_err(message),
            saecore::Error::Invalid(_) => PyValueError::new_err(message),
            saecore::Error::Corrupt(_) => corrupt_data_error(message),
            saecore::Error::OutOfMemory { .. } => PyMemoryError::new_err(message),
        }
    }
}

/// Run core work with the GIL released and map its error.
pub fn detach<T: Send>(
    py: Python<'_>,
    work: impl FnOnce() -> saecore::Result<T> + Send,
) -> PyResult<T> {
    py.detach(work).map_err(|e| CoreError(e).into())
}
