//! Map the core's error enum to Python exceptions: I/O → OSError family, bad arguments → ValueError,
//! corrupt data → `saecore.CorruptDataError` (a ValueError subclass, so generic handlers still work),
//! a refused input-sized allocation → MemoryError (its message names the size and where it came from).

use pyo3::exceptions::{PyFileNotFoundError, PyMemoryError, PyOSError, PyValueError};
use pyo3::prelude::*;

pyo3::create_exception!(saecore, CorruptDataError, PyValueError, "Data on disk failed a checksum, is truncated, or does not parse.");

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
            saecore::Error::Corrupt(_) => CorruptDataError::new_err(message),
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

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("CorruptDataError", m.py().get_type::<CorruptDataError>())?;
    Ok(())
}
