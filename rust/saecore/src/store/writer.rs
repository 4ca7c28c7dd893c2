//! The shard writer: takes CSR batches of any size, cuts them into fixed `shard_rows` shards, and
//! compresses, writes and commits those on background threads.
//!
//! Shard `i` always covers token rows `[i * shard_rows, (i + 1) * shard_rows)`, whatever the batch
//! sizes were, so a rerun that resumes at the first uncommitted shard produces the same bytes as an
//! uninterrupted run. Memory: the shard being filled, plus at most `2 * threads` shards queued or in
//! flight.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use serde_json::{json, Map, Value};

use super::format::{
    file_entry, read_manifest, shard_name, staging_dir, write_manifest, Manifest, ShardEntry, ValueDtype,
};
use super::zarr_io::{Elem, ZarrDir};
use crate::error::{Error, Result};
use crate::memory::check_bytes;

/// Most token rows per shard: mining indexes rows and activations within a shard with `u32`.
pub const MAX_SHARD_ROWS: u64 = u32::MAX as u64 - 1;
/// Writer threads allowed per available core: compression saturates well before this; more is a typo.
pub const THREADS_PER_CORE: usize = 4;
/// Rows a fresh shard buffer reserves up front (it grows, fallibly, from there).
const INITIAL_ROWS: u64 = 1 << 16;

/// Row pointers handed in by a caller (NumPy's int64 from `cumsum`, or uint64).
#[derive(Clone, Copy, Debug)]
pub enum RowPtrIn<'a> {
    /// Signed 64-bit pointers.
    I64(&'a [i64]),
    /// Unsigned 64-bit pointers.
    U64(&'a [u64]),
}

/// Feature ids handed in by a caller (PyTorch's `nonzero` gives int64).
#[derive(Clone, Copy, Debug)]
pub enum FeaturesIn<'a> {
    /// Signed 64-bit ids.
    I64(&'a [i64]),
    /// Signed 32-bit ids.
    I32(&'a [i32]),
    /// Unsigned 32-bit ids.
    U32(&'a [u32]),
}

/// Activation values handed in by a caller.
#[derive(Clone, Copy, Debug)]
pub enum ValuesIn<'a> {
    /// Single precision.
    F32(&'a [f32]),
    /// Half precision.
    F16(&'a [half::f16]),
}

impl RowPtrIn<'_> {
    fn len(&self) -> usize {
        match self {
            RowPtrIn::I64(s) => s.len(),
            RowPtrIn::U64(s) => s.len(),
        }
    }
    fn get(&self, i: usize) -> Option<u64> {
        match self {
            RowPtrIn::I64(s) => u64::try_from(s[i]).ok(),
            RowPtrIn::U64(s) => Some(s[i]),
        }
    }
}

impl FeaturesIn<'_> {
    fn len(&self) -> usize {
        match self {
            FeaturesIn::I64(s) => s.len(),
            FeaturesIn::I32(s) => s.len(),
            FeaturesIn::U32(s) => s.len(),
        }
    }
    /// The id at `i`, or `u64::MAX` for a negative id (rejected by the range check).
    fn get(&self, i: usize) -> u64 {
        match self {
            FeaturesIn::I64(s) => u64::try_from(s[i]).unwrap_or(u64::MAX),
            FeaturesIn::I32(s) => u64::try_from(s[i]).unwrap_or(u64::MAX),
            FeaturesIn::U32(s) => u64::from(s[i]),
        }
    }
}

impl ValuesIn<'_> {
    fn len(&self) -> usize {
        match self {
            ValuesIn::F32(s) => s.len(),
            ValuesIn::F16(s) => s.len(),
        }
    }
    fn get(&self, i: usize) -> f32 {
        match self {
            ValuesIn::F32(s) => s[i],
            ValuesIn::F16(s) => s[i].to_f32(),
        }
    }
}

/// What a writer is asked to produce; all of it must match when a store is resumed.
#[derive(Clone, Debug)]
pub struct WriterOptions {
    /// Number of features; every id must be below it.
    pub d_sae: u32,
    /// Stored value dtype.
    pub value_dtype: ValueDtype,
    /// Token rows per shard.
    pub shard_rows: u64,
    /// Caller's description of the encoding (compared on resume).
    pub spec: Value,
    /// Background threads that compress and write shards (at least 1).
    pub threads: usize,
}

/// A shard's content being assembled: local row pointers, feature ids, values as stored bytes.
#[derive(Default)]
struct ShardBuf {
    row_ptr: Vec<u64>,
    feature: Vec<u32>,
    value: Vec<u8>,
}

impl ShardBuf {
    fn new(shard_rows: u64) -> Self {
        // Small and fixed: `shard_rows` is an argument, and the buffer grows fallibly in `append`.
        let mut row_ptr = Vec::with_capacity(shard_rows.min(INITIAL_ROWS) as usize + 1);
        row_ptr.push(0);
        ShardBuf { row_ptr, feature: Vec::new(), value: Vec::new() }
    }
    fn rows(&self) -> u64 {
        (self.row_ptr.len() - 1) as u64
    }
}

struct Job {
    index: u64,
    row_start: u64,
    buf: ShardBuf,
}

/// Committed manifest plus shards finished out of order, waiting for their predecessors.
struct Committer {
    root: PathBuf,
    manifest: Manifest,
    pending: BTreeMap<u64, ShardEntry>,
}

impl Committer {
    fn commit(&mut self, index: u64, entry: ShardEntry) -> Result<()> {
        self.pending.insert(index, entry);
        let mut advanced = false;
        while let Some(entry) = self.pending.remove(&(self.manifest.shards.len() as u64)) {
            self.manifest.shards.push(entry);
            advanced = true;
        }
        if advanced {
            write_manifest(&self.root, &self.manifest)?;
        }
        Ok(())
    }
}

/// Appends CSR batches to a sparse feature store; see the module docs.
pub struct ShardWriter {
    root: PathBuf,
    options: WriterOptions,
    committer: Arc<Mutex<Committer>>,
    failure: Arc<Mutex<Option<Error>>>,
    sender: Option<SyncSender<Job>>,
    workers: Vec<JoinHandle<()>>,
    buf: ShardBuf,
    next_index: u64,
    rows_at_open: u64,
    rows_written: u64,
    complete: bool,
}

impl ShardWriter {
    /// Create the store at `path`, or resume it if it holds a store made with the same options.
    pub fn open(path: &Path, options: WriterOptions) -> Result<Self> {
        check_writer_options(path, &options)?;
        let manifest = if path.join("zarr.json").exists() {
            let manifest = read_manifest(path)?;
            check_same_options(path, &manifest, &options)?;
            remove_uncommitted(path, manifest.shards.len() as u64)?;
            manifest
        } else {
            create_store(path, &options)?
        };
        let rows_at_open = manifest.rows_committed();
        let next_index = manifest.shards.len() as u64;
        let complete = manifest.complete;
        let committer = Arc::new(Mutex::new(Committer { root: path.to_path_buf(), manifest, pending: BTreeMap::new() }));
        let failure = Arc::new(Mutex::new(None));
        let (sender, receiver) = sync_channel::<Job>(options.threads);
        let receiver = Arc::new(Mutex::new(receiver));
        let workers = (0..options.threads)
            .map(|i| {
                let ctx = WorkerContext {
                    root: path.to_path_buf(),
                    value_dtype: options.value_dtype,
                    committer: committer.clone(),
                    failure: failure.clone(),
                    receiver: receiver.clone(),
                };
                std::thread::Builder::new()
                    .name(format!("saecore-writer-{i}"))
                    .spawn(move || ctx.run())
                    .map_err(|e| Error::io(path, e))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(ShardWriter {
            root: path.to_path_buf(),
            buf: ShardBuf::new(options.shard_rows),
            options,
            committer,
            failure,
            sender: Some(sender),
            workers,
            next_index,
            rows_at_open,
            rows_written: rows_at_open,
            complete,
        })
    }

    /// Token rows that were already committed when the store was opened (a resume starts here).
    pub fn rows_at_open(&self) -> u64 {
        self.rows_at_open
    }

    /// Token rows accepted so far (committed at open + appended since).
    pub fn rows_written(&self) -> u64 {
        self.rows_written
    }

    /// Shards committed so far (durable, visible to readers).
    pub fn shards_committed(&self) -> u64 {
        self.committer.lock().expect("committer lock").manifest.shards.len() as u64
    }

    /// Whether the store was already complete when opened, or `finish` has run.
    pub fn is_complete(&self) -> bool {
        self.complete
    }

    /// The store's folder.
    pub fn path(&self) -> &Path {
        &self.root
    }

    fn check_failure(&self) -> Result<()> {
        match self.failure.lock().expect("failure lock").take() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// Append one batch in CSR form: rows `i` has features `feature[row_ptr[i]..row_ptr[i+1]]`.
    ///
    /// Feature ids must be below `d_sae` and strictly increasing within each row; values must be
    /// finite and non-negative. Values that are exactly zero in the stored dtype are not stored.
    pub fn append(&mut self, row_ptr: RowPtrIn<'_>, feature: FeaturesIn<'_>, value: ValuesIn<'_>) -> Result<()> {
        self.check_failure()?;
        if self.complete {
            return Err(Error::Invalid(format!("{}: the feature store is complete; nothing can be appended", self.root.display())));
        }
        let rows = check_csr_shape(row_ptr, feature, value)?;
        if rows > 0 && self.last_shard_is_partial() {
            return Err(Error::Invalid(format!(
                "{}: the last committed shard is partial (the store was finished at row {}); rows cannot be appended",
                self.root.display(),
                self.rows_written
            )));
        }
        validate_batch(row_ptr, feature, value, &self.options, self.rows_written)?;
        let mut local = 0;
        while local < rows {
            // The rows that fit in the shard being filled: room for them is reserved fallibly first.
            let take = (self.options.shard_rows - self.buf.rows()).min((rows - local) as u64) as usize;
            self.reserve_rows(row_ptr, local, local + take)?;
            for r in local..local + take {
                self.push_row(r, row_ptr, feature, value);
            }
            local += take;
            if self.buf.rows() == self.options.shard_rows {
                self.dispatch()?;
            }
        }
        Ok(())
    }

    /// Grow the shard buffer for batch rows `lo..hi` (amortised, like `push`, but an error rather
    /// than an abort when memory runs out).
    fn reserve_rows(&mut self, row_ptr: RowPtrIn<'_>, lo: usize, hi: usize) -> Result<()> {
        let nnz = (row_ptr.get(hi).unwrap_or(0) - row_ptr.get(lo).unwrap_or(0)) as usize;
        let value_bytes = nnz.saturating_mul(self.options.value_dtype.size());
        let what = format!("{}: buffering shard {} ({} rows so far)", self.root.display(), self.next_index, self.buf.rows());
        let refused = |bytes: usize, e: std::collections::TryReserveError| Error::OutOfMemory {
            bytes: bytes as u128,
            what: what.clone(),
            reason: format!("the allocator refused ({e}); lower shard_rows or free memory"),
        };
        self.buf.row_ptr.try_reserve(hi - lo).map_err(|e| refused((hi - lo) * 8, e))?;
        self.buf.feature.try_reserve(nnz).map_err(|e| refused(nnz * 4, e))?;
        self.buf.value.try_reserve(value_bytes).map_err(|e| refused(value_bytes, e))
    }

    fn last_shard_is_partial(&self) -> bool {
        self.buf.rows() == 0
            && !self.rows_written.is_multiple_of(self.options.shard_rows)
            && self.rows_written == self.rows_at_open
    }

    /// Copy one validated row into the shard buffer, converting values to the stored dtype and
    /// dropping those that are zero there.
    fn push_row(&mut self, local: usize, row_ptr: RowPtrIn<'_>, feature: FeaturesIn<'_>, value: ValuesIn<'_>) {
        let (start, stop) = (row_ptr.get(local).unwrap_or(0) as usize, row_ptr.get(local + 1).unwrap_or(0) as usize);
        for j in start..stop {
            let v = value.get(j);
            let stored = match self.options.value_dtype {
                ValueDtype::F32 if v != 0.0 => {
                    self.buf.value.extend_from_slice(&v.to_le_bytes());
                    true
                }
                ValueDtype::F16 => {
                    let h = half::f16::from_f32(v);
                    let nonzero = h.to_f32() != 0.0;
                    if nonzero {
                        self.buf.value.extend_from_slice(&h.to_le_bytes());
                    }
                    nonzero
                }
                ValueDtype::F32 => false,
            };
            if stored {
                self.buf.feature.push(feature.get(j) as u32);
            }
        }
        self.buf.row_ptr.push(self.buf.feature.len() as u64);
        self.rows_written += 1;
    }

    fn dispatch(&mut self) -> Result<()> {
        let buf = std::mem::replace(&mut self.buf, ShardBuf::new(self.options.shard_rows));
        let job = Job { index: self.next_index, row_start: self.next_index * self.options.shard_rows, buf };
        self.next_index += 1;
        let sender = self.sender.as_ref().ok_or_else(|| Error::Invalid("writer is closed".into()))?;
        if sender.send(job).is_err() {
            self.check_failure()?;
            return Err(Error::Invalid("the writer's background threads stopped".into()));
        }
        Ok(())
    }

    fn join_workers(&mut self) {
        self.sender = None;
        for handle in self.workers.drain(..) {
            // A worker only panics on a bug; its error, if any, is already recorded in `failure`.
            let _ = handle.join();
        }
    }

    /// Write the last (partial) shard, wait for every shard to be committed, and mark the store
    /// complete. Returns the final manifest.
    pub fn finish(&mut self) -> Result<Manifest> {
        if !self.complete {
            if self.buf.rows() > 0 {
                self.dispatch()?;
            }
            self.join_workers();
            self.check_failure()?;
            let mut committer = self.committer.lock().expect("committer lock");
            if !committer.pending.is_empty() {
                return Err(Error::Invalid("internal: shards left uncommitted after the writer stopped".into()));
            }
            committer.manifest.complete = true;
            write_manifest(&self.root, &committer.manifest)?;
            self.complete = true;
        }
        let _ = fs::remove_dir_all(staging_dir(&self.root));
        Ok(self.committer.lock().expect("committer lock").manifest.clone())
    }

    /// Stop without finishing: wait for queued shards to be committed, drop the partial buffer.
    /// A later `open` resumes after the last committed shard.
    pub fn close(&mut self) -> Result<()> {
        self.join_workers();
        self.check_failure()
    }
}

impl Drop for ShardWriter {
    fn drop(&mut self) {
        self.join_workers();
    }
}

/// Refuse sizes that no data can justify before anything is allocated or spawned: a shard beyond
/// what mining can index, a thread count far beyond the cores, or shard buffers beyond the machine.
fn check_writer_options(path: &Path, o: &WriterOptions) -> Result<()> {
    if o.shard_rows == 0 || o.threads == 0 || o.d_sae == 0 {
        return Err(Error::Invalid(format!(
            "shard_rows ({}), threads ({}) and d_sae ({}) must all be positive",
            o.shard_rows, o.threads, o.d_sae
        )));
    }
    if o.shard_rows > MAX_SHARD_ROWS {
        return Err(Error::Invalid(format!(
            "shard_rows = {} is too large: a shard holds at most {MAX_SHARD_ROWS} rows (rows within a shard are 32-bit)",
            o.shard_rows
        )));
    }
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    if o.threads > THREADS_PER_CORE * cores {
        return Err(Error::Invalid(format!(
            "threads = {} writer threads is too many for {cores} cores (at most {})",
            o.threads,
            THREADS_PER_CORE * cores
        )));
    }
    // The filling shard plus up to 2 × threads queued or in flight, each at least its row pointers.
    let in_memory = (2 * o.threads as u128 + 1) * (u128::from(o.shard_rows) + 1) * 8;
    check_bytes(in_memory, || {
        format!(
            "{}: row pointers of the {} shards of shard_rows = {} rows a writer with {} threads may hold",
            path.display(),
            2 * o.threads + 1,
            o.shard_rows,
            o.threads
        )
    })
}

fn feature_display(feature: FeaturesIn<'_>, j: usize) -> String {
    match feature {
        FeaturesIn::I64(s) => s[j].to_string(),
        FeaturesIn::I32(s) => s[j].to_string(),
        FeaturesIn::U32(s) => s[j].to_string(),
    }
}

/// Check every entry of a batch before any of it is copied, so a bad batch leaves the writer as it was.
fn validate_batch(
    row_ptr: RowPtrIn<'_>,
    feature: FeaturesIn<'_>,
    value: ValuesIn<'_>,
    options: &WriterOptions,
    first_row: u64,
) -> Result<()> {
    for local in 0..row_ptr.len() - 1 {
        let global = first_row + local as u64;
        let (start, stop) = (row_ptr.get(local).unwrap_or(0) as usize, row_ptr.get(local + 1).unwrap_or(0) as usize);
        let mut previous: Option<u64> = None;
        for j in start..stop {
            let f = feature.get(j);
            if f >= u64::from(options.d_sae) {
                return Err(Error::Invalid(format!(
                    "row {global}: feature id {} outside 0..{}",
                    feature_display(feature, j),
                    options.d_sae
                )));
            }
            if let Some(p) = previous.filter(|&p| f <= p) {
                return Err(Error::Invalid(format!(
                    "row {global}: feature ids must be strictly increasing within a row ({p} then {f}); sort each row"
                )));
            }
            previous = Some(f);
            let v = value.get(j);
            if !v.is_finite() || v < 0.0 {
                return Err(Error::Invalid(format!("row {global}, feature {f}: activation {v} is not a finite non-negative number")));
            }
            if options.value_dtype == ValueDtype::F16 && half::f16::from_f32(v).is_infinite() {
                return Err(Error::Invalid(format!(
                    "row {global}, feature {f}: activation {v} exceeds the float16 range; write with value dtype float32"
                )));
            }
        }
    }
    Ok(())
}

/// Check the three arrays agree with each other; returns the number of rows.
fn check_csr_shape(row_ptr: RowPtrIn<'_>, feature: FeaturesIn<'_>, value: ValuesIn<'_>) -> Result<usize> {
    if row_ptr.len() == 0 {
        return Err(Error::Invalid("row_ptr is empty; it needs rows + 1 entries starting at 0".into()));
    }
    if feature.len() != value.len() {
        return Err(Error::Invalid(format!(
            "feature has {} entries but value has {}; they must be the same length",
            feature.len(),
            value.len()
        )));
    }
    let rows = row_ptr.len() - 1;
    let mut previous = 0u64;
    for i in 0..=rows {
        let p = row_ptr.get(i).ok_or_else(|| Error::Invalid(format!("row_ptr[{i}] is negative")))?;
        if (i == 0 && p != 0) || p < previous {
            return Err(Error::Invalid(format!(
                "row_ptr must start at 0 and never decrease; row_ptr[{i}] = {p} after {previous}"
            )));
        }
        previous = p;
    }
    if previous != feature.len() as u64 {
        return Err(Error::Invalid(format!(
            "row_ptr ends at {previous} but there are {} feature ids; the last pointer must equal nnz",
            feature.len()
        )));
    }
    Ok(rows)
}

fn spec_differences(old: &Value, new: &Value) -> Vec<String> {
    match (old, new) {
        (Value::Object(a), Value::Object(b)) => {
            let mut keys: Vec<&String> = a.keys().chain(b.keys()).collect();
            keys.sort();
            keys.dedup();
            keys.into_iter()
                .filter(|k| a.get(*k) != b.get(*k))
                .map(|k| format!("spec.{k}: store has {}, now {}", show(a.get(k)), show(b.get(k))))
                .collect()
        }
        _ if old != new => vec![format!("spec: store has {old}, now {new}")],
        _ => vec![],
    }
}

fn show(v: Option<&Value>) -> String {
    v.map_or_else(|| "(absent)".into(), Value::to_string)
}

fn check_same_options(path: &Path, manifest: &Manifest, options: &WriterOptions) -> Result<()> {
    let mut diffs = spec_differences(&manifest.spec, &options.spec);
    if manifest.d_sae != options.d_sae {
        diffs.push(format!("d_sae: store has {}, now {}", manifest.d_sae, options.d_sae));
    }
    if manifest.value_dtype != options.value_dtype {
        diffs.push(format!("value_dtype: store has {}, now {}", manifest.value_dtype.name(), options.value_dtype.name()));
    }
    if manifest.shard_rows != options.shard_rows {
        diffs.push(format!("shard_rows: store has {}, now {}", manifest.shard_rows, options.shard_rows));
    }
    if diffs.is_empty() {
        return Ok(());
    }
    Err(Error::Invalid(format!(
        "{}: holds a feature store made with other arguments; use a new path or delete it:\n  {}",
        path.display(),
        diffs.join("\n  ")
    )))
}

/// Delete shard folders a killed writer renamed into place but never committed, and its staging.
fn remove_uncommitted(root: &Path, committed: u64) -> Result<()> {
    let _ = fs::remove_dir_all(staging_dir(root));
    let shards = root.join("shards");
    let Ok(entries) = fs::read_dir(&shards) else { return Ok(()) };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.parse::<u64>().is_ok_and(|i| i >= committed) {
            fs::remove_dir_all(entry.path()).map_err(|e| Error::io(entry.path(), e))?;
        }
    }
    Ok(())
}

/// Build an empty store aside and rename it into place, so a crash never leaves a half-made store.
fn create_store(path: &Path, options: &WriterOptions) -> Result<Manifest> {
    if path.exists() && fs::read_dir(path).map_err(|e| Error::io(path, e))?.next().is_some() {
        return Err(Error::Invalid(format!(
            "{}: exists and is not a saecore feature store (no zarr.json); refusing to write into it",
            path.display()
        )));
    }
    let staging = staging_dir(path);
    let fresh = staging.join("new-store");
    let _ = fs::remove_dir_all(&fresh);
    let dir = ZarrDir::create(&fresh)?;
    dir.group("/shards", Map::new())?;
    let manifest = Manifest {
        d_sae: options.d_sae,
        value_dtype: options.value_dtype,
        shard_rows: options.shard_rows,
        spec: options.spec.clone(),
        shards: Vec::new(),
        complete: false,
        csc: None,
    };
    write_manifest(&fresh, &manifest)?;
    if path.exists() {
        fs::remove_dir(path).map_err(|e| Error::io(path, e))?;
    }
    if let Some(parent) = path.parent() {
        fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
    }
    fs::rename(&fresh, path).map_err(|e| Error::io(path, e))?;
    Ok(manifest)
}

struct WorkerContext {
    root: PathBuf,
    value_dtype: ValueDtype,
    committer: Arc<Mutex<Committer>>,
    failure: Arc<Mutex<Option<Error>>>,
    receiver: Arc<Mutex<Receiver<Job>>>,
}

impl WorkerContext {
    fn run(self) {
        loop {
            let job = match self.receiver.lock().expect("receiver lock").recv() {
                Ok(job) => job,
                Err(_) => return, // channel closed: the writer finished or was dropped
            };
            if self.failure.lock().expect("failure lock").is_some() {
                continue; // after a failure nothing more is committed; drain the queue
            }
            let result = write_shard(&self.root, self.value_dtype, &job)
                .and_then(|entry| self.committer.lock().expect("committer lock").commit(job.index, entry));
            if let Err(e) = result {
                self.failure.lock().expect("failure lock").get_or_insert(e);
            }
        }
    }
}

/// Write one shard into the staging folder, then rename it into `shards/`. Returns its manifest entry.
fn write_shard(root: &Path, value_dtype: ValueDtype, job: &Job) -> Result<ShardEntry> {
    let name = shard_name(job.index);
    let staged = staging_dir(root).join(&name);
    let _ = fs::remove_dir_all(&staged);
    let dir = ZarrDir::create(&staged)?;
    let rows = job.buf.rows();
    let nnz = job.buf.feature.len() as u64;
    let mut attrs = Map::new();
    attrs.insert("saecore_shard".into(), json!({"index": job.index, "row_start": job.row_start, "rows": rows, "nnz": nnz}));
    dir.group("/", attrs)?;

    let row_ptr_bytes: Vec<u8> = job.buf.row_ptr.iter().flat_map(|p| p.to_le_bytes()).collect();
    dir.array("/row_ptr", Elem::U64, rows + 1, rows + 1)?.store_chunk(0, row_ptr_bytes)?;
    let value_elem = match value_dtype {
        ValueDtype::F16 => Elem::F16,
        ValueDtype::F32 => Elem::F32,
    };
    let feature_array = dir.array("/feature", Elem::U32, nnz, nnz.max(1))?;
    let value_array = dir.array("/value", value_elem, nnz, nnz.max(1))?;
    if nnz > 0 {
        feature_array.store_chunk(0, job.buf.feature.iter().flat_map(|f| f.to_le_bytes()).collect())?;
        value_array.store_chunk(0, job.buf.value.clone())?;
    }
    let chunk = |array: &str| staged.join(array).join("c").join("0");
    let entry = ShardEntry {
        row_start: job.row_start,
        rows,
        nnz,
        row_ptr: file_entry(&chunk("row_ptr"))?,
        feature: if nnz > 0 { Some(file_entry(&chunk("feature"))?) } else { None },
        value: if nnz > 0 { Some(file_entry(&chunk("value"))?) } else { None },
    };
    let target = root.join("shards").join(&name);
    if target.exists() {
        fs::remove_dir_all(&target).map_err(|e| Error::io(&target, e))?;
    }
    fs::rename(&staged, &target).map_err(|e| Error::io(&target, e))?;
    Ok(entry)
}
