//! The one error type of the core crate. Each message names the file, array or id at fault.

use std::path::PathBuf;

/// Everything that can go wrong in the core.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An operating-system I/O failure on a named path.
    #[error("{path}: {source}")]
    Io {
        /// The file or folder being read or written.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// An argument has the wrong shape, length, dtype or range; the message says which.
    #[error("{0}")]
    Invalid(String),
    /// Data on disk fails its checksum, is truncated, or does not parse; the message names it.
    #[error("corrupt data: {0}")]
    Corrupt(String),
    /// An allocation whose size comes from input (a manifest field, an argument) was refused
    /// before it could abort the process: larger than the machine's memory, overflowing, or
    /// refused by the allocator (e.g. under `ulimit -v`). The message says how much and for what.
    #[error("cannot allocate {} for {what}: {reason}", crate::memory::human_bytes(*bytes))]
    OutOfMemory {
        /// Bytes asked for (`u128`, so an overflowing request can still be reported).
        bytes: u128,
        /// What the memory was for, naming the file or argument its size came from.
        what: String,
        /// Why it was refused.
        reason: String,
    },
}

/// Result alias for the core crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// Wrap an I/O error with the path it happened on.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io { path: path.into(), source }
    }
}
