//! On-disk layout of the sparse feature store: the manifest, chunk files, checksums and codecs.
//!
//! ```text
//! SAE.zarr/
//!   zarr.json                     Zarr v3 group; attributes["saecore"] is the manifest (below)
//!   shards/NNNNNN/                one Zarr group per committed block of `shard_rows` tokens
//!     row_ptr  [rows+1] uint64    CSR row pointers (0-based, local to the shard)
//!     feature  [nnz]    uint32    feature ids, ascending within each row
//!     value    [nnz]    float16 | float32
//!   csc/                          feature-major copy, written once the token-major shards are complete
//!     col_ptr  [d_sae+1] uint64
//!     row      [nnz]     uint64   global token rows, ascending within each feature
//!     value    [nnz]     float16 | float32
//! ```
//! Every array is encoded `bytes(little) → numcodecs.shuffle(element size) → zstd`; zarr-python reads
//! it with no saecore import. The manifest records each chunk file's length and CRC-32C, and a shard
//! exists for readers only once its manifest entry is written (write aside, then rename).

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde_json::{json, Map, Value};

use crate::error::{Error, Result};
use crate::memory::{check_bytes, try_reserve_total, try_resize, try_vec};

/// Format tag stored in the manifest; readers refuse anything else.
pub const FORMAT: &str = "saecore.features/1";
/// Key of the manifest inside the root group's attributes.
pub const MANIFEST_KEY: &str = "saecore";
/// zstd level of every chunk (level 3: within a few percent of level 6's size at twice the speed).
pub const ZSTD_LEVEL: i32 = 3;

/// Stored dtype of activation values.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ValueDtype {
    /// IEEE half precision (2 bytes): the default; SAE activations need no more.
    F16,
    /// IEEE single precision (4 bytes).
    F32,
}

impl ValueDtype {
    /// The numpy/zarr name of the dtype.
    pub fn name(self) -> &'static str {
        match self {
            ValueDtype::F16 => "float16",
            ValueDtype::F32 => "float32",
        }
    }

    /// Bytes per stored value.
    pub fn size(self) -> usize {
        match self {
            ValueDtype::F16 => 2,
            ValueDtype::F32 => 4,
        }
    }

    /// Parse `"float16"` / `"float32"`.
    pub fn parse(name: &str) -> Result<Self> {
        match name {
            "float16" | "f16" => Ok(ValueDtype::F16),
            "float32" | "f32" => Ok(ValueDtype::F32),
            other => Err(Error::Invalid(format!("value dtype must be 'float16' or 'float32', got {other:?}"))),
        }
    }
}

/// Length and CRC-32C of one chunk file, as committed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FileEntry {
    /// Length in bytes.
    pub size: u64,
    /// CRC-32C (Castagnoli) of the whole file.
    pub crc32c: u32,
}

impl FileEntry {
    fn to_json(self) -> Value {
        json!([self.size, self.crc32c])
    }

    fn from_json(v: &Value, what: &str) -> Result<Self> {
        let pair = v.as_array().filter(|a| a.len() == 2);
        let parsed = pair.and_then(|a| Some((a[0].as_u64()?, u32::try_from(a[1].as_u64()?).ok()?)));
        parsed
            .map(|(size, crc32c)| FileEntry { size, crc32c })
            .ok_or_else(|| Error::Corrupt(format!("manifest: {what} has no valid [size, crc32c] entry")))
    }
}

/// One committed token-major shard.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ShardEntry {
    /// First global token row of the shard.
    pub row_start: u64,
    /// Number of token rows.
    pub rows: u64,
    /// Number of stored (nonzero) activations.
    pub nnz: u64,
    /// Chunk file of `row_ptr`.
    pub row_ptr: FileEntry,
    /// Chunk file of `feature`; `None` when the shard holds no activations (no chunk is written).
    pub feature: Option<FileEntry>,
    /// Chunk file of `value`; `None` when the shard holds no activations.
    pub value: Option<FileEntry>,
}

/// The committed feature-major copy.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CscEntry {
    /// Total activations (equals the sum of the shards' nnz).
    pub nnz: u64,
    /// Elements per chunk of `row` and `value`.
    pub chunk_elems: u64,
    /// Chunk file of `col_ptr` (one chunk).
    pub col_ptr: FileEntry,
    /// Chunk files of `row`, in order.
    pub row: Vec<FileEntry>,
    /// Chunk files of `value`, in order.
    pub value: Vec<FileEntry>,
}

/// Everything a reader needs to trust the store: identity, committed shards, checksums.
#[derive(Clone, Debug, PartialEq)]
pub struct Manifest {
    /// Number of features (columns).
    pub d_sae: u32,
    /// Stored value dtype.
    pub value_dtype: ValueDtype,
    /// Token rows per shard (every committed shard but the store's last has exactly this many).
    pub shard_rows: u64,
    /// Caller-defined description of what was encoded (SAE, activation store, hook...). A writer
    /// reopened with a different spec refuses to resume.
    pub spec: Value,
    /// Committed shards, in row order, contiguous from row 0.
    pub shards: Vec<ShardEntry>,
    /// True once the writer finished: no more shards will come.
    pub complete: bool,
    /// The feature-major copy, once built.
    pub csc: Option<CscEntry>,
}

impl Manifest {
    /// Token rows covered by the committed shards.
    pub fn rows_committed(&self) -> u64 {
        self.shards.last().map_or(0, |s| s.row_start + s.rows)
    }

    /// Activations in the committed shards.
    pub fn nnz_committed(&self) -> u64 {
        // Saturating: a crafted manifest must not overflow (it is refused later, not here).
        self.shards.iter().fold(0u64, |total, s| total.saturating_add(s.nnz))
    }

    /// The manifest as the JSON object stored in the root group's attributes.
    pub fn to_json(&self) -> Value {
        let shards: Vec<Value> = self
            .shards
            .iter()
            .map(|s| {
                json!({
                    "row_start": s.row_start,
                    "rows": s.rows,
                    "nnz": s.nnz,
                    "row_ptr": s.row_ptr.to_json(),
                    "feature": s.feature.map(FileEntry::to_json),
                    "value": s.value.map(FileEntry::to_json),
                })
            })
            .collect();
        let csc = self.csc.as_ref().map(|c| {
            json!({
                "nnz": c.nnz,
                "chunk_elems": c.chunk_elems,
                "col_ptr": c.col_ptr.to_json(),
                "row": c.row.iter().map(|e| e.to_json()).collect::<Vec<_>>(),
                "value": c.value.iter().map(|e| e.to_json()).collect::<Vec<_>>(),
            })
        });
        json!({
            "format": FORMAT,
            "d_sae": self.d_sae,
            "value_dtype": self.value_dtype.name(),
            "shard_rows": self.shard_rows,
            "spec": self.spec,
            "complete": self.complete,
            "n_rows": self.rows_committed(),
            "nnz": self.nnz_committed(),
            "checksum": "crc32c",
            "shards": shards,
            "csc": csc,
        })
    }

    /// Parse the manifest object; any missing or mistyped field is reported as corruption.
    pub fn from_json(v: &Value, path: &Path) -> Result<Self> {
        let bad = |what: &str| Error::Corrupt(format!("{}: manifest field {what} is missing or invalid", path.display()));
        let obj = v.as_object().ok_or_else(|| bad("(root)"))?;
        let format = obj.get("format").and_then(Value::as_str).ok_or_else(|| bad("format"))?;
        if format != FORMAT {
            return Err(Error::Invalid(format!(
                "{}: feature store format {format:?}, this saecore reads {FORMAT:?}",
                path.display()
            )));
        }
        let u64_field = |name: &str| obj.get(name).and_then(Value::as_u64).ok_or_else(|| bad(name));
        let d_sae = u32::try_from(u64_field("d_sae")?).map_err(|_| bad("d_sae"))?;
        let value_dtype = ValueDtype::parse(obj.get("value_dtype").and_then(Value::as_str).ok_or_else(|| bad("value_dtype"))?)?;
        let shard_rows = u64_field("shard_rows")?;
        if d_sae == 0 || shard_rows == 0 {
            return Err(bad(if d_sae == 0 { "d_sae (0)" } else { "shard_rows (0)" }));
        }
        let complete = obj.get("complete").and_then(Value::as_bool).ok_or_else(|| bad("complete"))?;
        let spec = obj.get("spec").cloned().unwrap_or(Value::Null);
        let shards = obj
            .get("shards")
            .and_then(Value::as_array)
            .ok_or_else(|| bad("shards"))?
            .iter()
            .enumerate()
            .map(|(i, s)| parse_shard(s, i, path))
            .collect::<Result<Vec<_>>>()?;
        check_shard_layout(&shards, shard_rows, d_sae, path)?;
        let csc = match obj.get("csc") {
            None | Some(Value::Null) => None,
            Some(c) => Some(parse_csc(c, path)?),
        };
        let manifest = Manifest { d_sae, value_dtype, shard_rows, spec, shards, complete, csc };
        if let Some(c) = &manifest.csc {
            check_csc_entry(c, manifest.nnz_committed(), path)?;
        }
        Ok(manifest)
    }
}

fn parse_shard(v: &Value, index: usize, path: &Path) -> Result<ShardEntry> {
    let what = format!("shard {}", shard_name(index as u64));
    let bad = || Error::Corrupt(format!("{}: manifest entry of {what} is invalid", path.display()));
    let obj = v.as_object().ok_or_else(bad)?;
    let num = |k: &str| obj.get(k).and_then(Value::as_u64).ok_or_else(bad);
    let optional = |k: &str| match obj.get(k) {
        None | Some(Value::Null) => Ok(None),
        Some(e) => FileEntry::from_json(e, &format!("{what}/{k}")).map(Some),
    };
    let entry = ShardEntry {
        row_start: num("row_start")?,
        rows: num("rows")?,
        nnz: num("nnz")?,
        row_ptr: FileEntry::from_json(obj.get("row_ptr").ok_or_else(bad)?, &format!("{what}/row_ptr"))?,
        feature: optional("feature")?,
        value: optional("value")?,
    };
    if (entry.nnz == 0) != entry.feature.is_none() || entry.feature.is_none() != entry.value.is_none() {
        return Err(bad());
    }
    Ok(entry)
}

/// The manifest's promise that shard `i` covers rows `[i * shard_rows, ...)`, that every shard but
/// the last holds exactly `shard_rows` rows and none more, and that no shard holds more activations
/// than `rows × d_sae`. Readers index shards by `row / shard_rows`, so a manifest that breaks this
/// (a hand-edited `shard_rows`, say) would silently read the wrong rows; the sizes are then checked
/// once more against each chunk's own data when it is decoded.
fn check_shard_layout(shards: &[ShardEntry], shard_rows: u64, d_sae: u32, path: &Path) -> Result<()> {
    let lie = |i: usize, what: String| {
        Error::Corrupt(format!("{}: manifest shard {} {what}", path.display(), shard_name(i as u64)))
    };
    let mut next = 0u64;
    for (i, s) in shards.iter().enumerate() {
        if s.row_start != next {
            return Err(lie(i, format!("starts at row {}, expected {next}", s.row_start)));
        }
        let last = i + 1 == shards.len();
        if s.rows == 0 || s.rows > shard_rows || (!last && s.rows != shard_rows) {
            return Err(lie(i, format!("holds {} rows, but shards hold {shard_rows} rows (the last one 1..={shard_rows})", s.rows)));
        }
        if u128::from(s.nnz) > u128::from(s.rows) * u128::from(d_sae) {
            return Err(lie(i, format!("claims {} activations, more than its {} rows × {d_sae} features", s.nnz, s.rows)));
        }
        next = next.checked_add(s.rows).ok_or_else(|| lie(i, "ends past row 2^64".into()))?;
    }
    Ok(())
}

/// The feature-major copy must hold exactly the shards' activations, in exactly as many chunks as
/// `nnz / chunk_elems` needs.
fn check_csc_entry(c: &CscEntry, shard_nnz: u64, path: &Path) -> Result<()> {
    let chunks = c.nnz.div_ceil(c.chunk_elems);
    if c.nnz != shard_nnz || c.row.len() as u64 != chunks || c.value.len() as u64 != chunks {
        return Err(Error::Corrupt(format!(
            "{}: manifest csc lists {} activations in {} row / {} value chunks of {}, but the shards hold {shard_nnz} (needing {} chunks)",
            path.display(),
            c.nnz,
            c.row.len(),
            c.value.len(),
            c.chunk_elems,
            shard_nnz.div_ceil(c.chunk_elems)
        )));
    }
    Ok(())
}

fn parse_csc(v: &Value, path: &Path) -> Result<CscEntry> {
    let bad = |what: &str| Error::Corrupt(format!("{}: manifest csc field {what} is invalid", path.display()));
    let obj = v.as_object().ok_or_else(|| bad("(root)"))?;
    let list = |k: &str| -> Result<Vec<FileEntry>> {
        obj.get(k)
            .and_then(Value::as_array)
            .ok_or_else(|| bad(k))?
            .iter()
            .enumerate()
            .map(|(i, e)| FileEntry::from_json(e, &format!("csc/{k} chunk {i}")))
            .collect()
    };
    Ok(CscEntry {
        nnz: obj.get("nnz").and_then(Value::as_u64).ok_or_else(|| bad("nnz"))?,
        chunk_elems: obj.get("chunk_elems").and_then(Value::as_u64).filter(|&c| c > 0).ok_or_else(|| bad("chunk_elems"))?,
        col_ptr: FileEntry::from_json(obj.get("col_ptr").ok_or_else(|| bad("col_ptr"))?, "csc/col_ptr")?,
        row: list("row")?,
        value: list("value")?,
    })
}

/// Parse a writer's spec from JSON text (the binding passes `json.dumps(spec)`).
pub fn parse_spec(text: &str) -> Result<Value> {
    serde_json::from_str(text).map_err(|e| Error::Invalid(format!("spec is not valid JSON: {e}")))
}

/// Folder name of shard `index` (zero-padded so a directory listing sorts in row order).
pub fn shard_name(index: u64) -> String {
    format!("{index:06}")
}

/// Path of the (single) chunk file of array `array` in shard `index`.
pub fn shard_chunk_path(root: &Path, index: u64, array: &str) -> PathBuf {
    root.join("shards").join(shard_name(index)).join(array).join("c").join("0")
}

/// Path of chunk `chunk` of the feature-major array `array` (`col_ptr`, `row`, `value`).
pub fn csc_chunk_path(root: &Path, array: &str, chunk: u64) -> PathBuf {
    root.join("csc").join(array).join("c").join(chunk.to_string())
}

/// Folder where shards are assembled before being renamed into the store (a sibling of the store,
/// so zarr-python never sees a half-built node inside the hierarchy).
pub fn staging_dir(root: &Path) -> PathBuf {
    let name = root.file_name().map_or_else(|| "store".into(), |n| n.to_string_lossy().into_owned());
    root.with_file_name(format!(".{name}.staging"))
}

/// Read the manifest from the root group's `zarr.json`.
pub fn read_manifest(root: &Path) -> Result<Manifest> {
    let meta_path = root.join("zarr.json");
    let text = fs::read(&meta_path).map_err(|e| Error::io(&meta_path, e))?;
    let doc: Value = serde_json::from_slice(&text)
        .map_err(|e| Error::Corrupt(format!("{}: not valid JSON ({e})", meta_path.display())))?;
    let manifest = doc
        .get("attributes")
        .and_then(|a| a.get(MANIFEST_KEY))
        .ok_or_else(|| Error::Invalid(format!("{}: not a saecore feature store (no attributes.{MANIFEST_KEY})", root.display())))?;
    Manifest::from_json(manifest, root)
}

/// Commit `manifest`: write the root group's `zarr.json` aside, flush it, and rename it into place.
pub fn write_manifest(root: &Path, manifest: &Manifest) -> Result<()> {
    let mut attributes = Map::new();
    attributes.insert(MANIFEST_KEY.into(), manifest.to_json());
    let doc = json!({"zarr_format": 3, "node_type": "group", "attributes": attributes});
    let bytes = serde_json::to_vec(&doc).map_err(|e| Error::Invalid(format!("manifest does not serialise: {e}")))?;
    write_atomic(&root.join("zarr.json"), &bytes)
}

/// Write `bytes` to `path` by writing a sibling temporary file, syncing it, and renaming it.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = path.with_file_name(format!(
        ".{}.{}.partial",
        path.file_name().map_or_else(String::new, |n| n.to_string_lossy().into_owned()),
        std::process::id()
    ));
    let mut f = fs::File::create(&tmp).map_err(|e| Error::io(&tmp, e))?;
    f.write_all(bytes).map_err(|e| Error::io(&tmp, e))?;
    f.sync_data().map_err(|e| Error::io(&tmp, e))?;
    drop(f);
    fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
}

/// Checksum and length of a file just written.
pub fn file_entry(path: &Path) -> Result<FileEntry> {
    let bytes = fs::read(path).map_err(|e| Error::io(path, e))?;
    Ok(FileEntry { size: bytes.len() as u64, crc32c: crc32c::crc32c(&bytes) })
}

/// Read a chunk file and check it against its manifest entry. `what` names it in errors.
pub fn read_verified(path: &Path, expected: FileEntry, what: &str) -> Result<Vec<u8>> {
    let bytes = match fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(Error::Corrupt(format!("{what}: chunk file {} is missing", path.display())))
        }
        Err(e) => return Err(Error::io(path, e)),
    };
    if bytes.len() as u64 != expected.size {
        return Err(Error::Corrupt(format!(
            "{what}: {} is {} bytes, the manifest says {} (truncated or overwritten)",
            path.display(),
            bytes.len(),
            expected.size
        )));
    }
    let crc = crc32c::crc32c(&bytes);
    if crc != expected.crc32c {
        return Err(Error::Corrupt(format!(
            "{what}: {} fails its CRC-32C (0x{crc:08x}, manifest 0x{:08x}); the file is damaged",
            path.display(),
            expected.crc32c
        )));
    }
    Ok(bytes)
}

/// Reusable buffers for decoding shards, so a worker that decodes many shards allocates (and
/// page-faults) once instead of once per chunk.
#[derive(Default)]
pub struct Scratch {
    raw: Vec<u8>,
    plain: Vec<u8>,
    halves: Vec<u16>,
}

/// The most bytes `compressed` bytes of zstd can decode to: a block decodes to at most 128 KiB and
/// takes at least 4 bytes (an RLE block: 3-byte header and the byte to repeat).
fn zstd_max_decoded(compressed: usize) -> u128 {
    (compressed as u128 / 4 + 1) * (128 << 10)
}

/// Bytes that `n` elements of `elem` bytes take, checked against the verified chunk `raw` before any
/// buffer is sized from `n` (which comes from the manifest): the zstd frame header's content size
/// when it has one (saecore's writer always records it), and the most `raw` could decode to in any
/// case. A manifest whose `rows`/`nnz`/`d_sae` lies about a chunk is thus corruption, never a
/// multi-terabyte allocation.
pub fn checked_decoded_len(raw: &[u8], n: u64, elem: usize, what: &str) -> Result<usize> {
    let bytes = u128::from(n) * elem as u128;
    match zstd::zstd_safe::get_frame_content_size(raw) {
        Ok(Some(size)) if u128::from(size) != bytes => {
            return Err(Error::Corrupt(format!(
                "{what}: the chunk holds {size} bytes but the manifest's sizes need {bytes} ({n} elements of {elem} bytes)"
            )))
        }
        Ok(_) => {}
        Err(_) => return Err(Error::Corrupt(format!("{what}: the chunk is not a zstd frame"))),
    }
    if bytes > zstd_max_decoded(raw.len()) {
        return Err(Error::Corrupt(format!(
            "{what}: the manifest's sizes need {bytes} bytes ({n} elements), more than its {} compressed bytes can hold",
            raw.len()
        )));
    }
    check_bytes(bytes + 1, || format!("decoding {what}"))?;
    usize::try_from(bytes).map_err(|_| Error::Corrupt(format!("{what}: {bytes} bytes exceed the address space")))
}

/// Read, verify and decode a chunk of `n` elements of `E` bytes into `out`, reusing `scratch`.
/// `n` comes from the manifest and is checked against the chunk before anything is allocated.
pub fn decode_verified_into<T, const E: usize>(
    path: &Path,
    expected: FileEntry,
    what: &str,
    n: u64,
    scratch: &mut Scratch,
    out: &mut Vec<T>,
    from_le: impl Fn([u8; E]) -> T,
) -> Result<()> {
    use std::io::Read;
    scratch.raw.clear();
    let opened = fs::File::open(path).and_then(|mut f| f.read_to_end(&mut scratch.raw));
    match opened {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(Error::Corrupt(format!("{what}: chunk file {} is missing", path.display())))
        }
        Err(e) => return Err(Error::io(path, e)),
    }
    check_entry(&scratch.raw, path, expected, what)?;
    let len = checked_decoded_len(&scratch.raw, n, E, what)?;
    let n = len / E;
    // One spare byte: a stream that decodes to more than expected then shows up as a length error.
    // The buffer only ever grows (shrinking and regrowing would zero it again for every array).
    if scratch.plain.len() < len + 1 {
        try_resize(&mut scratch.plain, len + 1, 0, || format!("decoding {what}"))?;
    }
    let written = zstd::bulk::decompress_to_buffer(&scratch.raw, &mut scratch.plain[..len + 1])
        .map_err(|e| Error::Corrupt(format!("{what}: zstd stream does not decode ({e})")))?;
    if written != len {
        return Err(Error::Corrupt(format!("{what}: decodes to {written} bytes, expected {len}")));
    }
    // Byte planes as slices of exactly `n` and an output slice of exactly `n`: the gather below
    // has no bounds checks or capacity checks left, so it compiles to a vectorised byte interleave.
    let planes: [&[u8]; E] = std::array::from_fn(|j| &scratch.plain[j * n..(j + 1) * n]);
    // Every element is overwritten below, so only growth needs filling.
    out.truncate(n);
    try_reserve_total(out, n, || format!("the decoded {what}"))?;
    out.resize_with(n, || from_le([0; E]));
    for (i, slot) in out.iter_mut().enumerate() {
        *slot = from_le(std::array::from_fn(|j| planes[j][i]));
    }
    Ok(())
}

/// Decode a value chunk of `dtype` into `f32`s, reusing `scratch`.
pub fn decode_values_into(
    path: &Path,
    expected: FileEntry,
    what: &str,
    n: u64,
    dtype: ValueDtype,
    scratch: &mut Scratch,
    out: &mut Vec<f32>,
) -> Result<()> {
    match dtype {
        ValueDtype::F32 => decode_verified_into(path, expected, what, n, scratch, out, f32::from_le_bytes),
        ValueDtype::F16 => {
            use half::slice::{HalfBitsSliceExt, HalfFloatSliceExt};
            let mut halves = std::mem::take(&mut scratch.halves);
            let result = decode_verified_into(path, expected, what, n, scratch, &mut halves, u16::from_le_bytes);
            let widened = result.and_then(|()| {
                out.truncate(halves.len());
                try_resize(out, halves.len(), 0.0, || format!("the decoded {what}"))?;
                halves.reinterpret_cast::<half::f16>().convert_to_f32_slice(out);
                Ok(())
            });
            scratch.halves = halves;
            widened
        }
    }
}

fn check_entry(bytes: &[u8], path: &Path, expected: FileEntry, what: &str) -> Result<()> {
    if bytes.len() as u64 != expected.size {
        return Err(Error::Corrupt(format!(
            "{what}: {} is {} bytes, the manifest says {} (truncated or overwritten)",
            path.display(),
            bytes.len(),
            expected.size
        )));
    }
    let crc = crc32c::crc32c(bytes);
    if crc != expected.crc32c {
        return Err(Error::Corrupt(format!(
            "{what}: {} fails its CRC-32C (0x{crc:08x}, manifest 0x{:08x}); the file is damaged",
            path.display(),
            expected.crc32c
        )));
    }
    Ok(())
}

/// Decode a chunk written as `bytes → shuffle(E) → zstd` into `n` little-endian elements of `E` bytes
/// (`n` is checked against the chunk before anything is allocated).
pub fn decode_chunk(encoded: &[u8], n: u64, elem_size: usize, what: &str) -> Result<Vec<u8>> {
    let expected = checked_decoded_len(encoded, n, elem_size, what)?;
    let mut shuffled = try_vec(expected + 1, 0u8, || format!("decoding {what}"))?;
    let written = zstd::bulk::decompress_to_buffer(encoded, &mut shuffled)
        .map_err(|e| Error::Corrupt(format!("{what}: zstd stream does not decode ({e})")))?;
    if written != expected {
        return Err(Error::Corrupt(format!("{what}: decodes to {written} bytes, expected {expected}")));
    }
    shuffled.truncate(expected);
    Ok(unshuffle(&shuffled, elem_size))
}

/// Inverse of numcodecs' byte shuffle: byte `b` of element `i` lives at `b * n + i`.
pub fn unshuffle(shuffled: &[u8], elem_size: usize) -> Vec<u8> {
    let n = shuffled.len() / elem_size;
    let mut out = vec![0u8; shuffled.len()];
    for (b, plane) in shuffled.chunks_exact(n.max(1)).enumerate().take(elem_size) {
        for (i, &byte) in plane.iter().enumerate() {
            out[i * elem_size + b] = byte;
        }
    }
    out
}

/// Little-endian bytes → `u64`s.
pub fn bytes_to_u64(bytes: &[u8]) -> Vec<u64> {
    bytes.chunks_exact(8).map(|c| u64::from_le_bytes(c.try_into().expect("8-byte chunk"))).collect()
}

/// Little-endian bytes → `u32`s.
pub fn bytes_to_u32(bytes: &[u8]) -> Vec<u32> {
    bytes.chunks_exact(4).map(|c| u32::from_le_bytes(c.try_into().expect("4-byte chunk"))).collect()
}

/// Little-endian value bytes of `dtype` → `f32`s.
pub fn bytes_to_f32(bytes: &[u8], dtype: ValueDtype) -> Vec<f32> {
    match dtype {
        ValueDtype::F32 => bytes.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().expect("4-byte chunk"))).collect(),
        ValueDtype::F16 => {
            use half::slice::HalfFloatSliceExt;
            let halves: Vec<half::f16> =
                bytes.chunks_exact(2).map(|c| half::f16::from_le_bytes(c.try_into().expect("2-byte chunk"))).collect();
            let mut out = vec![0f32; halves.len()];
            halves.convert_to_f32_slice(&mut out);
            out
        }
    }
}
