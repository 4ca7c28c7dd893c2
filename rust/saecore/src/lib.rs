//! saecore core: the parts of the sparse-autoencoder pipeline that are pure data crunching.
//!
//! This crate never sees a Python type, so `cargo test -p saecore` runs without libpython and the
//! same code can serve a Rust CLI or a benchmark. The pyo3 binding lives in `rust/saecore-py`.
#![deny(missing_docs)]

pub mod error;
pub mod memory;
pub mod mining;
pub mod neighbours;
pub mod parallel;
pub mod store;
pub mod token_scores;

pub use error::{Error, Result};
