//! The feature-major (CSC) copy: a streaming transpose of the token-major shards, bounded in memory.
//!
//! 1. One pass counts each feature's activations (feature ids only), giving `col_ptr`.
//! 2. Features are cut into consecutive blocks whose activations fit the memory budget; for each
//!    block one pass over the shards scatters that block's entries into place (rows come out
//!    ascending because shards are visited in row order).
//! 3. Finished elements stream into fixed-size chunks that are compressed in parallel.
//!
//! Peak memory ≈ `mem_budget_bytes` (12 bytes per buffered activation) plus 2 × threads decoded
//! shards plus one output chunk per thread — unless a single feature alone exceeds the budget, in
//! which case its block holds that feature's activations.

use std::fs;
use std::path::Path;

use rayon::prelude::*;
use serde_json::Map;

use super::format::{
    bytes_to_f32, bytes_to_u64, csc_chunk_path, decode_chunk, file_entry, read_verified, staging_dir, write_manifest,
    CscEntry, FileEntry, Manifest, ValueDtype,
};
use super::zarr_io::{Elem, ZarrArray, ZarrDir};
use super::{FeatureStore, Scratch, Shard};
use crate::error::{Error, Result};
use crate::parallel;

/// Knobs of the transpose.
#[derive(Clone, Copy, Debug)]
pub struct CscOptions {
    /// Bytes of activations buffered per block (12 bytes each: row u64 + value f32).
    pub mem_budget_bytes: u64,
    /// Elements per output chunk of `csc/row` and `csc/value`.
    pub chunk_elems: u64,
}

impl Default for CscOptions {
    fn default() -> Self {
        CscOptions { mem_budget_bytes: 1 << 30, chunk_elems: 1 << 20 }
    }
}

const BYTES_PER_BUFFERED: u64 = 12;

/// Build `csc/` for the complete store at `path` (a no-op when it is already committed) and
/// return the updated manifest.
pub fn build_csc(path: &Path, options: &CscOptions) -> Result<Manifest> {
    if options.chunk_elems == 0 {
        return Err(Error::Invalid("chunk_elems must be positive".into()));
    }
    // One padded output chunk (row u64 + value f32) per thread is built in memory.
    let per_chunk = u128::from(options.chunk_elems) * (BYTES_PER_BUFFERED as u128);
    crate::memory::check_bytes(per_chunk * parallel::num_threads() as u128, || {
        format!("building {}'s feature-major copy in chunks of chunk_elems = {}", path.display(), options.chunk_elems)
    })?;
    let store = FeatureStore::open(path)?;
    store.require_complete()?;
    if store.manifest().csc.is_some() {
        return Ok(store.manifest().clone());
    }
    parallel::install(|| build(&store, options))
}

fn build(store: &FeatureStore, options: &CscOptions) -> Result<Manifest> {
    let counts = count_features(store)?;
    let col_ptr: Vec<u64> = std::iter::once(0)
        .chain(counts.iter().scan(0u64, |acc, &c| {
            *acc += c;
            Some(*acc)
        }))
        .collect();
    let nnz = *col_ptr.last().unwrap_or(&0);
    let staged = staging_dir(store.path()).join("csc");
    let _ = fs::remove_dir_all(&staged);
    let dir = ZarrDir::create(&staged)?;
    dir.group("/", Map::new())?;
    let d1 = col_ptr.len() as u64;
    dir.array("/col_ptr", Elem::U64, d1, d1)?.store_chunk(0, col_ptr.iter().flat_map(|p| p.to_le_bytes()).collect())?;
    let dtype = store.manifest().value_dtype;
    let value_elem = if dtype == ValueDtype::F16 { Elem::F16 } else { Elem::F32 };
    let mut sink = ChunkSink {
        rows_array: dir.array("/row", Elem::U64, nnz, options.chunk_elems)?,
        values_array: dir.array("/value", value_elem, nnz, options.chunk_elems)?,
        dtype,
        chunk_elems: options.chunk_elems as usize,
        staged: staged.clone(),
        rows: Vec::new(),
        values: Vec::new(),
        next_chunk: 0,
        row_entries: Vec::new(),
        value_entries: Vec::new(),
    };
    let budget = (options.mem_budget_bytes / BYTES_PER_BUFFERED).max(1);
    for (f0, f1) in plan_blocks(&counts, budget) {
        let (rows, values) = fill_block(store, f0, f1, &col_ptr)?;
        sink.push(rows, values)?;
    }
    let (row_entries, value_entries) = sink.finish()?;
    let entry = CscEntry {
        nnz,
        chunk_elems: options.chunk_elems,
        col_ptr: file_entry(&staged.join("col_ptr").join("c").join("0"))?,
        row: row_entries,
        value: value_entries,
    };
    commit(store, &staged, entry)
}

/// Rename the staged copy into the store and record it in the manifest.
fn commit(store: &FeatureStore, staged: &Path, entry: CscEntry) -> Result<Manifest> {
    let target = store.path().join("csc");
    if target.exists() {
        fs::remove_dir_all(&target).map_err(|e| Error::io(&target, e))?; // leftover of a killed build
    }
    fs::rename(staged, &target).map_err(|e| Error::io(&target, e))?;
    let mut manifest = store.manifest().clone();
    manifest.csc = Some(entry);
    write_manifest(store.path(), &manifest)?;
    let _ = fs::remove_dir_all(staging_dir(store.path()));
    Ok(manifest)
}

/// Activations per feature, from the feature ids alone. One count array per thread (`d_sae` comes
/// from the manifest, so each is allocated fallibly), each thread taking every `threads`-th shard.
fn count_features(store: &FeatureStore) -> Result<Vec<u64>> {
    let d = store.d_sae() as usize;
    let (n, threads) = (store.num_shards(), rayon::current_num_threads().min(store.num_shards()).max(1));
    let what = || format!("{}: counting the activations of d_sae = {d} features (from its manifest)", store.path().display());
    let parts: Vec<Vec<u64>> = (0..threads)
        .into_par_iter()
        .map(|t| {
            let mut acc = crate::memory::try_vec(d, 0u64, what)?;
            let (mut scratch, mut shard) = (Scratch::default(), Shard::default());
            for i in (t..n).step_by(threads) {
                store.read_shard_into(i, false, &mut scratch, &mut shard)?;
                shard.feature.iter().for_each(|&f| acc[f as usize] += 1);
            }
            Ok(acc)
        })
        .collect::<Result<_>>()?;
    let mut parts = parts.into_iter();
    let mut total = parts.next().unwrap_or_default();
    for part in parts {
        total.iter_mut().zip(&part).for_each(|(x, y)| *x += y);
    }
    Ok(total)
}

/// Consecutive feature ranges `[f0, f1)` with at most `budget` activations each (a lone feature
/// above the budget gets a block of its own).
pub fn plan_blocks(counts: &[u64], budget: u64) -> Vec<(usize, usize)> {
    let mut blocks = Vec::new();
    let mut start = 0;
    let mut filled = 0u64;
    for (f, &c) in counts.iter().enumerate() {
        if f > start && filled + c > budget {
            blocks.push((start, f));
            start = f;
            filled = 0;
        }
        filled += c;
    }
    if start < counts.len() {
        blocks.push((start, counts.len()));
    }
    blocks
}

/// One pass over all shards gathering the activations of features `f0..f1` in CSC order.
///
/// The block's feature range is cut into one part per thread with about equal activation counts;
/// each part's rows and values are a contiguous slice of the output, so every thread scatters
/// its own features from the shared decoded shards into memory no other thread touches. Shards
/// are scattered in row order, so each column stays sorted.
fn fill_block(store: &FeatureStore, f0: usize, f1: usize, col_ptr: &[u64]) -> Result<(Vec<u64>, Vec<f32>)> {
    let base = col_ptr[f0];
    let n = (col_ptr[f1] - base) as usize;
    let what = || format!("{}: the {n} activations of features {f0}..{f1} of the feature-major copy", store.path().display());
    let mut rows = crate::memory::try_vec(n, 0u64, what)?;
    let mut values = crate::memory::try_vec(n, 0f32, what)?;
    let threads = rayon::current_num_threads();
    let mut parts = split_features(&col_ptr[f0..=f1], threads)
        .into_iter()
        .map(|(a, b)| (f0 + a, f0 + b))
        .collect::<Vec<_>>();
    parts.retain(|&(a, b)| a < b);
    let mut targets = Vec::with_capacity(parts.len());
    let (mut rows_rest, mut values_rest) = (rows.as_mut_slice(), values.as_mut_slice());
    for &(a, b) in &parts {
        let len = (col_ptr[b] - col_ptr[a]) as usize;
        let (r, rr) = std::mem::take(&mut rows_rest).split_at_mut(len);
        let (v, vr) = std::mem::take(&mut values_rest).split_at_mut(len);
        (rows_rest, values_rest) = (rr, vr);
        let cursor: Vec<usize> = col_ptr[a..b].iter().map(|&p| (p - col_ptr[a]) as usize).collect();
        targets.push(Part { first: a, end: b, rows: r, values: v, cursor });
    }
    let group = 2 * threads;
    let indices: Vec<usize> = (0..store.num_shards()).collect();
    for batch in indices.chunks(group) {
        let shards: Vec<Shard> = batch.par_iter().map(|&i| store.read_shard(i)).collect::<Result<_>>()?;
        targets.par_iter_mut().for_each(|part| shards.iter().for_each(|shard| part.scatter(shard)));
    }
    Ok((rows, values))
}

/// `k` consecutive feature ranges (relative to `ptr[0]`'s feature) with about equal activations.
fn split_features(ptr: &[u64], k: usize) -> Vec<(usize, usize)> {
    let d = ptr.len() - 1;
    let total = ptr[d] - ptr[0];
    let mut cuts = vec![0];
    for j in 1..k {
        let goal = ptr[0] + total * j as u64 / k as u64;
        let at = ptr.partition_point(|&p| p < goal).min(d);
        cuts.push(at.max(*cuts.last().unwrap_or(&0)));
    }
    cuts.push(d);
    cuts.windows(2).map(|w| (w[0], w[1])).collect()
}

/// One thread's share of a block: features `first..end` and their slice of the output.
struct Part<'a> {
    first: usize,
    end: usize,
    rows: &'a mut [u64],
    values: &'a mut [f32],
    cursor: Vec<usize>,
}

impl Part<'_> {
    fn scatter(&mut self, shard: &Shard) {
        for r in 0..shard.rows() {
            let row = shard.row_start + r as u64;
            for j in shard.row_ptr[r] as usize..shard.row_ptr[r + 1] as usize {
                let f = shard.feature[j] as usize;
                if f >= self.first && f < self.end {
                    let slot = &mut self.cursor[f - self.first];
                    self.rows[*slot] = row;
                    self.values[*slot] = shard.value[j];
                    *slot += 1;
                }
            }
        }
    }
}

/// Cuts a stream of (row, value) pairs into fixed chunks and writes them, compressing in parallel.
struct ChunkSink {
    rows_array: ZarrArray,
    values_array: ZarrArray,
    dtype: ValueDtype,
    chunk_elems: usize,
    staged: std::path::PathBuf,
    rows: Vec<u64>,
    values: Vec<f32>,
    next_chunk: u64,
    row_entries: Vec<FileEntry>,
    value_entries: Vec<FileEntry>,
}

impl ChunkSink {
    fn push(&mut self, rows: Vec<u64>, values: Vec<f32>) -> Result<()> {
        if self.rows.is_empty() {
            self.rows = rows;
            self.values = values;
        } else {
            self.rows.extend_from_slice(&rows);
            self.values.extend_from_slice(&values);
        }
        let full = self.rows.len() / self.chunk_elems;
        if full > 0 {
            let take = full * self.chunk_elems;
            let rest_rows = self.rows.split_off(take);
            let rest_values = self.values.split_off(take);
            let rows = std::mem::replace(&mut self.rows, rest_rows);
            let values = std::mem::replace(&mut self.values, rest_values);
            self.write_chunks(&rows, &values)?;
        }
        Ok(())
    }

    fn write_chunks(&mut self, rows: &[u64], values: &[f32]) -> Result<()> {
        let first = self.next_chunk;
        let entries: Vec<(FileEntry, FileEntry)> = rows
            .par_chunks(self.chunk_elems)
            .zip(values.par_chunks(self.chunk_elems))
            .enumerate()
            .map(|(i, (r, v))| self.write_one(first + i as u64, r, v))
            .collect::<Result<_>>()?;
        self.next_chunk += entries.len() as u64;
        for (r, v) in entries {
            self.row_entries.push(r);
            self.value_entries.push(v);
        }
        Ok(())
    }

    fn write_one(&self, index: u64, rows: &[u64], values: &[f32]) -> Result<(FileEntry, FileEntry)> {
        // The edge chunk is padded with zeros: Zarr's regular grid stores every chunk at full size.
        let pad = self.chunk_elems - rows.len();
        let mut row_bytes: Vec<u8> = rows.iter().flat_map(|r| r.to_le_bytes()).collect();
        row_bytes.resize(row_bytes.len() + pad * 8, 0);
        let mut value_bytes: Vec<u8> = match self.dtype {
            ValueDtype::F16 => values.iter().flat_map(|&v| half::f16::from_f32(v).to_le_bytes()).collect(),
            ValueDtype::F32 => values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        };
        value_bytes.resize(value_bytes.len() + pad * self.dtype.size(), 0);
        self.rows_array.store_chunk(index, row_bytes)?;
        self.values_array.store_chunk(index, value_bytes)?;
        let entry = |array: &str| file_entry(&self.staged.join(array).join("c").join(index.to_string()));
        Ok((entry("row")?, entry("value")?))
    }

    fn finish(mut self) -> Result<(Vec<FileEntry>, Vec<FileEntry>)> {
        if !self.rows.is_empty() {
            let rows = std::mem::take(&mut self.rows);
            let values = std::mem::take(&mut self.values);
            self.write_chunks(&rows, &values)?;
        }
        Ok((self.row_entries, self.value_entries))
    }
}

fn csc_entry(store: &FeatureStore) -> Result<&CscEntry> {
    store.manifest().csc.as_ref().ok_or_else(|| {
        Error::Invalid(format!(
            "{}: has no feature-major copy yet; build it with saecore.features.build_csc (or `saecore encode`, which builds it when it finishes)",
            store.path().display()
        ))
    })
}

fn col_ptr(store: &FeatureStore) -> Result<&[u64]> {
    if let Some(cached) = store.col_ptr_cache().get() {
        return Ok(cached);
    }
    let entry = csc_entry(store)?;
    let what = format!("{}: csc array col_ptr", store.path().display());
    let raw = read_verified(&csc_chunk_path(store.path(), "col_ptr", 0), entry.col_ptr, &what)?;
    let n = u64::from(store.d_sae()) + 1;
    let ptr = bytes_to_u64(&decode_chunk(&raw, n, 8, &what)?);
    let valid = ptr.first() == Some(&0) && ptr.windows(2).all(|w| w[0] <= w[1]) && ptr.last() == Some(&entry.nnz);
    if !valid {
        return Err(Error::Corrupt(format!("{what}: not a valid pointer array for {} activations", entry.nnz)));
    }
    Ok(store.col_ptr_cache().get_or_init(|| ptr))
}

fn read_chunk(store: &FeatureStore, entry: &CscEntry, index: usize) -> Result<(Vec<u64>, Vec<f32>)> {
    // The chunk count was checked against nnz / chunk_elems when the manifest was parsed.
    let n = entry.chunk_elems;
    let dtype = store.manifest().value_dtype;
    let decode = |array: &str, file: FileEntry, elem: usize| -> Result<Vec<u8>> {
        let what = format!("{}: csc array {array} chunk {index}", store.path().display());
        let raw = read_verified(&csc_chunk_path(store.path(), array, index as u64), file, &what)?;
        decode_chunk(&raw, n, elem, &what)
    };
    let rows = bytes_to_u64(&decode("row", entry.row[index], 8)?);
    let values = bytes_to_f32(&decode("value", entry.value[index], dtype.size())?, dtype);
    Ok((rows, values))
}

/// All activations of `feature` from the CSC copy, rows ascending.
pub fn feature_activations(store: &FeatureStore, feature: u32) -> Result<(Vec<u64>, Vec<f32>)> {
    if feature >= store.d_sae() {
        return Err(Error::Invalid(format!("feature id {feature} outside the valid range 0..{}", store.d_sae())));
    }
    let entry = csc_entry(store)?;
    let ptr = col_ptr(store)?;
    let (start, end) = (ptr[feature as usize], ptr[feature as usize + 1]);
    let what = || format!("{}: the {} activations of feature {feature}", store.path().display(), end - start);
    let len = crate::memory::elems::<u64>(end - start, what)?;
    let mut rows = crate::memory::try_with_capacity(len, what)?;
    let mut values = crate::memory::try_with_capacity(len, what)?;
    if start == end {
        return Ok((rows, values));
    }
    let ce = entry.chunk_elems;
    for c in start / ce..=(end - 1) / ce {
        let (r, v) = read_chunk(store, entry, c as usize)?;
        let lo = (start.max(c * ce) - c * ce) as usize;
        let hi = (end.min((c + 1) * ce) - c * ce) as usize;
        rows.extend_from_slice(&r[lo..hi]);
        values.extend_from_slice(&v[lo..hi]);
    }
    Ok((rows, values))
}

/// Check every CSC chunk against its checksum and that it decodes.
pub fn verify(store: &FeatureStore) -> Result<()> {
    let entry = csc_entry(store)?;
    col_ptr(store)?;
    parallel::install(|| (0..entry.row.len()).into_par_iter().try_for_each(|i| read_chunk(store, entry, i).map(drop)))
}

#[cfg(test)]
mod tests {
    use super::split_features;

    #[test]
    fn feature_split_covers_the_range_in_order_with_balanced_parts() {
        // Column pointers of 6 features with 10, 0, 30, 5, 5, 50 activations.
        let ptr = [100, 110, 110, 140, 145, 150, 200];
        for k in 1..=8 {
            let parts = split_features(&ptr, k);
            assert_eq!(parts.len(), k);
            assert_eq!(parts.first().map(|p| p.0), Some(0));
            assert_eq!(parts.last().map(|p| p.1), Some(6));
            assert!(parts.windows(2).all(|w| w[0].1 == w[1].0 && w[0].0 <= w[0].1));
        }
        // Two parts cut where the running count reaches half of the 100 activations: 50 and 50.
        assert_eq!(split_features(&ptr, 2), vec![(0, 5), (5, 6)]);
        // One feature holding everything: the parts without it are empty.
        assert_eq!(split_features(&[0, 0, 9, 9], 3), vec![(0, 2), (2, 2), (2, 3)]);
    }
}
