//! Sparse feature-activation store: token-major CSR shards in Zarr v3, a checksummed manifest, and a
//! feature-major (CSC) copy.
//!
//! Writers ([`ShardWriter`]) cut CSR batches into fixed-size shards and commit each one by an atomic
//! rewrite of the manifest; readers ([`FeatureStore`]) see exactly the shards committed when they
//! opened the store, and verify every chunk's length and CRC-32C before decoding it, so a truncated or
//! bit-flipped file is reported as [`Error::Corrupt`] naming the shard. See [`format`] for the layout.

pub mod csc;
pub mod format;
pub mod writer;
mod zarr_io;

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

pub use csc::{build_csc, CscOptions};
pub use format::{parse_spec, FileEntry, Manifest, ShardEntry, ValueDtype};
pub use writer::{FeaturesIn, RowPtrIn, ShardWriter, ValuesIn, WriterOptions};

use crate::error::{Error, Result};
use format::{decode_values_into, decode_verified_into, read_manifest, shard_chunk_path, shard_name};
pub use format::Scratch;

/// One decoded token-major shard.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Shard {
    /// Global row of the shard's first token.
    pub row_start: u64,
    /// CSR row pointers, local to the shard: row `i` owns entries `row_ptr[i]..row_ptr[i+1]`.
    pub row_ptr: Vec<u64>,
    /// Feature ids (ascending within a row).
    pub feature: Vec<u32>,
    /// Values as `f32` (empty when the shard was read without values).
    pub value: Vec<f32>,
}

impl Shard {
    /// Number of token rows.
    pub fn rows(&self) -> usize {
        self.row_ptr.len().saturating_sub(1)
    }
}

/// A read-only view of a feature store, fixed to the shards committed when it was opened.
pub struct FeatureStore {
    root: PathBuf,
    manifest: Manifest,
    col_ptr: OnceLock<Vec<u64>>,
}

impl FeatureStore {
    /// Open the store at `path` (reads and checks the manifest; no shard data is read).
    pub fn open(path: &Path) -> Result<Self> {
        if !path.exists() {
            return Err(Error::io(path, std::io::Error::new(std::io::ErrorKind::NotFound, "no feature store here")));
        }
        let manifest = read_manifest(path)?;
        Ok(FeatureStore { root: path.to_path_buf(), manifest, col_ptr: OnceLock::new() })
    }

    /// The store's folder.
    pub fn path(&self) -> &Path {
        &self.root
    }

    /// The manifest as read at open.
    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// Number of features.
    pub fn d_sae(&self) -> u32 {
        self.manifest.d_sae
    }

    /// Token rows in the committed shards.
    pub fn n_rows(&self) -> u64 {
        self.manifest.rows_committed()
    }

    /// Activations in the committed shards.
    pub fn nnz(&self) -> u64 {
        self.manifest.nnz_committed()
    }

    /// Committed shards.
    pub fn num_shards(&self) -> usize {
        self.manifest.shards.len()
    }

    /// Whether the writer finished.
    pub fn is_complete(&self) -> bool {
        self.manifest.complete
    }

    /// Fail unless the writer finished (mining a prefix silently would give wrong densities).
    pub fn require_complete(&self) -> Result<()> {
        if self.manifest.complete {
            return Ok(());
        }
        Err(Error::Invalid(format!(
            "{}: the feature store is incomplete ({} rows in {} committed shards); rerun `saecore encode` to finish it",
            self.root.display(),
            self.n_rows(),
            self.num_shards()
        )))
    }

    fn shard_entry(&self, index: usize) -> Result<&ShardEntry> {
        self.manifest.shards.get(index).ok_or_else(|| {
            Error::Invalid(format!("{}: shard {index} out of range 0..{}", self.root.display(), self.num_shards()))
        })
    }

    /// Read, verify and decode shard `index` (values too when `with_values`).
    pub fn read_shard_parts(&self, index: usize, with_values: bool) -> Result<Shard> {
        let mut shard = Shard::default();
        self.read_shard_into(index, with_values, &mut Scratch::default(), &mut shard)?;
        Ok(shard)
    }

    /// [`read_shard_parts`](Self::read_shard_parts) into reused buffers (for loops over many shards).
    pub fn read_shard_into(&self, index: usize, with_values: bool, scratch: &mut Scratch, out: &mut Shard) -> Result<()> {
        let entry = self.shard_entry(index)?;
        let name = format!("{}: shard {}", self.root.display(), shard_name(index as u64));
        // Sizes from the manifest; the decoders check them against each chunk before allocating.
        let (rows, nnz) = (entry.rows, entry.nnz);
        let path = |array: &str| shard_chunk_path(&self.root, index as u64, array);
        let what = |array: &str| format!("{name} array {array}");
        out.row_start = entry.row_start;
        decode_verified_into(&path("row_ptr"), entry.row_ptr, &what("row_ptr"), rows.saturating_add(1), scratch, &mut out.row_ptr, u64::from_le_bytes)?;
        // The decoders overwrite `out`'s buffers in place (clearing them first would re-zero
        // them for every shard); they are only emptied when this shard has nothing to decode.
        match (entry.feature, entry.value) {
            (Some(f), Some(v)) => {
                decode_verified_into(&path("feature"), f, &what("feature"), nnz, scratch, &mut out.feature, u32::from_le_bytes)?;
                if with_values {
                    decode_values_into(&path("value"), v, &what("value"), nnz, self.manifest.value_dtype, scratch, &mut out.value)?;
                } else {
                    out.value.clear();
                }
            }
            _ => {
                out.feature.clear();
                out.value.clear();
            }
        }
        check_shard(&name, &out.row_ptr, &out.feature, self.manifest.d_sae, nnz)?;
        check_values(&name, &out.value)
    }

    /// Read, verify and decode shard `index`.
    pub fn read_shard(&self, index: usize) -> Result<Shard> {
        self.read_shard_parts(index, true)
    }

    /// Verify every committed chunk file (lengths, checksums, decodability) without keeping data.
    pub fn verify(&self) -> Result<()> {
        crate::parallel::install(|| {
            use rayon::prelude::*;
            // Buffers reused per worker, as mining does, so this times reading and decoding only.
            (0..self.num_shards()).into_par_iter().try_for_each_init(
                || (Scratch::default(), Shard::default()),
                |(scratch, shard), i| self.read_shard_into(i, true, scratch, shard),
            )
        })?;
        if self.manifest.csc.is_some() {
            csc::verify(self)?;
        }
        Ok(())
    }

    /// Every activation of feature `feature` as `(rows, values)`, rows ascending, from the
    /// feature-major copy (one contiguous read).
    pub fn feature_activations(&self, feature: u32) -> Result<(Vec<u64>, Vec<f32>)> {
        csc::feature_activations(self, feature)
    }

    pub(crate) fn col_ptr_cache(&self) -> &OnceLock<Vec<u64>> {
        &self.col_ptr
    }
}

/// Stored values are finite and positive (the writer refuses the rest and drops zeros); mining's
/// orderings and log-spaced histograms rely on it, so a chunk that says otherwise is corrupt.
fn check_values(name: &str, value: &[f32]) -> Result<()> {
    // `fold` without early exit compiles to a vector loop; the position is looked up only on failure.
    let all_ok = value.iter().fold(true, |ok, &v| ok & (v > 0.0) & (v < f32::INFINITY));
    if all_ok {
        return Ok(());
    }
    let (j, v) = value.iter().enumerate().find(|&(_, &v)| !(v > 0.0 && v < f32::INFINITY)).map_or((0, 0.0), |(j, &v)| (j, v));
    Err(Error::Corrupt(format!("{name}: stored value {j} is {v}, not a finite positive activation")))
}

/// Structural checks after decoding: a flipped bit that passes the checksum (i.e. a bug, or a file
/// swapped for another valid one) must still not turn into out-of-range reads.
fn check_shard(name: &str, row_ptr: &[u64], feature: &[u32], d_sae: u32, nnz: u64) -> Result<()> {
    let monotone = row_ptr.first() == Some(&0) && row_ptr.windows(2).all(|w| w[0] <= w[1]);
    if !monotone || row_ptr.last().copied() != Some(nnz) {
        return Err(Error::Corrupt(format!("{name}: row_ptr is not a valid CSR pointer array for {nnz} entries")));
    }
    if let Some(bad) = feature.iter().find(|&&f| f >= d_sae) {
        return Err(Error::Corrupt(format!("{name}: feature id {bad} outside 0..{d_sae}")));
    }
    Ok(())
}
