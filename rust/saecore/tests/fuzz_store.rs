//! Hostile-input properties of the store reader and the manifest parser (issue 12): arbitrary bytes,
//! bit flips, truncations and crafted numbers in a valid store's manifest and chunk files must give
//! `Ok` with the right data or an `Err` — never a panic, an abort, or a huge allocation.
//!
//! Each case copies a small template store (4 shards + the feature-major copy), damages one file,
//! and reads everything through the public API: open, every shard, verify, every feature's
//! activations, and mining. Bounded to a few hundred cases per property so the file runs in seconds.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::OnceLock;

use proptest::prelude::*;
use saecore::mining::{mine, MineOptions};
use saecore::store::format::{decode_chunk, read_manifest, Manifest};
use saecore::store::{build_csc, CscOptions, FeatureStore, FeaturesIn, RowPtrIn, Shard, ShardWriter, ValueDtype, ValuesIn, WriterOptions};
use serde_json::Value;

const D_SAE: u32 = 24;
const ROWS: usize = 50;
const SHARD_ROWS: u64 = 16;

fn scratch_dir(tag: &str) -> PathBuf {
    static N: AtomicUsize = AtomicUsize::new(0);
    let p = std::env::temp_dir().join(format!("saecore-fuzz-{tag}-{}-{}", std::process::id(), N.fetch_add(1, Ordering::Relaxed)));
    let _ = std::fs::remove_dir_all(&p);
    std::fs::create_dir_all(&p).unwrap();
    p
}

/// The template store and what a correct reader returns from it.
struct Template {
    path: PathBuf,
    shards: Vec<Shard>,
    activations: Vec<(Vec<u64>, Vec<f32>)>,
    files: Vec<PathBuf>,
}

fn template() -> &'static Template {
    static T: OnceLock<Template> = OnceLock::new();
    T.get_or_init(|| {
        let path = scratch_dir("template").join("f.zarr");
        let options = WriterOptions { d_sae: D_SAE, value_dtype: ValueDtype::F16, shard_rows: SHARD_ROWS, spec: Value::Null, threads: 2 };
        let mut w = ShardWriter::open(&path, options).unwrap();
        let (mut ptr, mut feat, mut val) = (vec![0i64], vec![], vec![]);
        for r in 0..ROWS as u32 {
            for f in (0..D_SAE).filter(|f| (r * 7 + f * 3) % 5 == 0) {
                feat.push(i64::from(f));
                val.push(0.25 + (r + f) as f32 / 8.0);
            }
            ptr.push(feat.len() as i64);
        }
        w.append(RowPtrIn::I64(&ptr), FeaturesIn::I64(&feat), ValuesIn::F32(&val)).unwrap();
        w.finish().unwrap();
        build_csc(&path, &CscOptions { mem_budget_bytes: 1 << 20, chunk_elems: 64 }).unwrap();
        let store = FeatureStore::open(&path).unwrap();
        let shards = (0..store.num_shards()).map(|i| store.read_shard(i).unwrap()).collect();
        let activations = (0..D_SAE).map(|f| store.feature_activations(f).unwrap()).collect();
        let mut files = vec![];
        collect_files(&path, &mut files);
        files.sort();
        Template { path, shards, activations, files }
    })
}

fn collect_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        if e.path().is_dir() {
            collect_files(&e.path(), out);
        } else {
            out.push(e.path());
        }
    }
}

/// A fresh copy of the template; returns (case folder, store path).
fn copy_template() -> (PathBuf, PathBuf) {
    let t = template();
    let case = scratch_dir("case");
    let store = case.join("f.zarr");
    for f in &t.files {
        let target = store.join(f.strip_prefix(&t.path).unwrap());
        std::fs::create_dir_all(target.parent().unwrap()).unwrap();
        std::fs::copy(f, &target).unwrap();
    }
    (case, store)
}

#[derive(Default, Debug)]
struct Outcome {
    ok_reads: usize,
    errors: usize,
}

/// Read everything through the public API. Any read that succeeds must give what the template
/// gives when `exact`; otherwise (the checksums were recomputed, so the bytes are "valid") it must
/// at least be a well-formed shard. Errors are fine: the property is no panic and no abort.
fn read_everything(path: &Path, exact: bool) -> Outcome {
    let t = template();
    let mut out = Outcome::default();
    let Ok(store) = FeatureStore::open(path) else {
        out.errors += 1;
        return out;
    };
    for i in 0..store.num_shards().min(16) {
        match store.read_shard(i) {
            Ok(s) => {
                out.ok_reads += 1;
                if exact {
                    assert_eq!(Some(&s), t.shards.get(i), "shard {i} read Ok but differs from the template");
                } else {
                    assert_well_formed(&s, store.d_sae());
                }
            }
            Err(_) => out.errors += 1,
        }
    }
    match store.verify() {
        Ok(()) => out.ok_reads += 1,
        Err(_) => out.errors += 1,
    }
    for f in 0..store.d_sae().min(D_SAE + 2) {
        match store.feature_activations(f) {
            Ok(a) => {
                out.ok_reads += 1;
                if exact {
                    assert_eq!(Some(&a), t.activations.get(f as usize), "feature {f} read Ok but differs");
                }
            }
            Err(_) => out.errors += 1,
        }
    }
    // Mining allocates per feature: run it where d_sae is the template's, or absurd (then it must be
    // refused up front), never on a plausible-but-large lie that would really take gigabytes here.
    let d = store.d_sae();
    if d <= 1 << 12 || d == u32::MAX {
        let options = MineOptions { k: 3, hist_bins: 4, sample_bins: 2, samples_per_bin: 2, seed: 1, second_pass: true };
        match mine(&store, &options, &AtomicU64::new(0)) {
            Ok(_) => out.ok_reads += 1,
            Err(_) => out.errors += 1,
        }
    }
    out
}

fn assert_well_formed(s: &Shard, d_sae: u32) {
    assert_eq!(s.row_ptr.first(), Some(&0));
    assert!(s.row_ptr.windows(2).all(|w| w[0] <= w[1]));
    assert_eq!(s.row_ptr.last().copied(), Some(s.feature.len() as u64));
    assert!(s.feature.iter().all(|&f| f < d_sae));
    assert!(s.value.iter().all(|&v| v > 0.0 && v.is_finite()));
}

/// One damage to a byte string: flip a bit, truncate, overwrite a byte, or splice in bytes.
#[derive(Clone, Debug)]
enum Damage {
    Flip(usize, u8),
    Truncate(usize),
    Set(usize, u8),
    Insert(usize, Vec<u8>),
}

fn damage_strategy() -> impl Strategy<Value = Damage> {
    prop_oneof![
        (any::<usize>(), 0u8..8).prop_map(|(i, b)| Damage::Flip(i, b)),
        any::<usize>().prop_map(Damage::Truncate),
        (any::<usize>(), any::<u8>()).prop_map(|(i, v)| Damage::Set(i, v)),
        (any::<usize>(), proptest::collection::vec(any::<u8>(), 1..16)).prop_map(|(i, v)| Damage::Insert(i, v)),
    ]
}

fn apply(bytes: &mut Vec<u8>, damage: &Damage) {
    let n = bytes.len().max(1);
    match damage {
        Damage::Flip(i, b) if !bytes.is_empty() => bytes[i % n] ^= 1 << b,
        Damage::Truncate(i) => bytes.truncate(i % n),
        Damage::Set(i, v) if !bytes.is_empty() => bytes[i % n] = *v,
        Damage::Insert(i, v) => {
            let at = i % (bytes.len() + 1);
            bytes.splice(at..at, v.iter().copied());
        }
        _ => {}
    }
}

/// Numbers a liar would pick: edges of every integer width, and near the true values.
fn crafted_number() -> impl Strategy<Value = u64> {
    prop_oneof![
        Just(0u64),
        Just(1),
        Just(2),
        Just(15),
        Just(17),
        Just(23),
        Just(25),
        Just(u64::from(u32::MAX)),
        Just(u64::from(u32::MAX) + 1),
        Just(1 << 40),
        Just(1_000_000_000_000),
        Just(u64::MAX / 8),
        Just(u64::MAX),
        any::<u64>(),
    ]
}

/// JSON pointers of every number a manifest holds that a reader sizes or indexes something by.
fn manifest_numbers(m: &Value) -> Vec<String> {
    let mut out = vec!["/d_sae".to_string(), "/shard_rows".into(), "/n_rows".into(), "/nnz".into()];
    let shards = m["shards"].as_array().map_or(0, Vec::len);
    for i in 0..shards {
        for k in ["row_start", "rows", "nnz"] {
            out.push(format!("/shards/{i}/{k}"));
        }
        out.push(format!("/shards/{i}/row_ptr/0"));
        out.push(format!("/shards/{i}/feature/0"));
    }
    out.extend(["/csc/nnz", "/csc/chunk_elems", "/csc/col_ptr/0", "/csc/row/0/0", "/csc/value/1/0"].map(String::from));
    out
}

fn manifest_doc(store: &Path) -> Value {
    serde_json::from_slice(&std::fs::read(store.join("zarr.json")).unwrap()).unwrap()
}

fn write_doc(store: &Path, doc: &Value) {
    std::fs::write(store.join("zarr.json"), serde_json::to_vec(doc).unwrap()).unwrap();
}

fn config(cases: u32) -> ProptestConfig {
    ProptestConfig { cases, failure_persistence: None, ..ProptestConfig::default() }
}

// 128 damaged stores per property (each is copied and read end to end) and 512 raw byte strings:
// a few seconds on two cores.
proptest! {
    #![proptest_config(config(128))]

    /// Raw damage to the manifest's JSON text: parse errors or checked lies, never a panic.
    #[test]
    fn damaged_manifest_text_is_an_error_or_the_right_data(damage in damage_strategy()) {
        let (case, store) = copy_template();
        let mut bytes = std::fs::read(store.join("zarr.json")).unwrap();
        apply(&mut bytes, &damage);
        std::fs::write(store.join("zarr.json"), &bytes).unwrap();
        read_everything(&store, true);
        let _ = std::fs::remove_dir_all(case);
    }

    /// One manifest number replaced by a crafted one (d_sae = 2^32 - 1, rows = 10^12, ...): the
    /// reader checks it against the layout and the chunks' own data before sizing anything by it.
    #[test]
    fn crafted_manifest_numbers_are_checked_before_allocating(pick in any::<prop::sample::Index>(), value in crafted_number()) {
        let (case, store) = copy_template();
        let mut doc = manifest_doc(&store);
        let fields = manifest_numbers(&doc["attributes"]["saecore"]);
        let field = pick.get(&fields);
        if let Some(slot) = doc["attributes"]["saecore"].pointer_mut(field) {
            *slot = Value::from(value);
        }
        write_doc(&store, &doc);
        read_everything(&store, true);
        let _ = std::fs::remove_dir_all(case);
    }

    /// Damage to a chunk file under its recorded checksum: always caught, never decoded.
    #[test]
    fn damaged_chunks_fail_their_checksum(file in any::<prop::sample::Index>(), damage in damage_strategy()) {
        let t = template();
        let (case, store) = copy_template();
        let chunks: Vec<&PathBuf> = t.files.iter().filter(|p| p.parent().is_some_and(|d| d.ends_with("c"))).collect();
        let target = store.join(file.get(&chunks).strip_prefix(&t.path).unwrap());
        let mut bytes = std::fs::read(&target).unwrap();
        let before = bytes.clone();
        apply(&mut bytes, &damage);
        std::fs::write(&target, &bytes).unwrap();
        let outcome = read_everything(&store, true);
        if bytes != before {
            prop_assert!(outcome.errors > 0, "{target:?} damaged ({damage:?}) but every read passed");
        }
        let _ = std::fs::remove_dir_all(case);
    }

    /// Damage to a shard chunk *with the manifest's size and CRC recomputed* (a "valid" lying file):
    /// the decoder's own checks (frame size, CSR structure, id and value ranges) must catch it.
    #[test]
    fn damaged_chunks_with_matching_checksums_still_decode_safely(file in 0usize..12, damage in damage_strategy()) {
        let (case, store) = copy_template();
        let shard = file / 3;
        let array = ["row_ptr", "feature", "value"][file % 3];
        let target = store.join("shards").join(format!("{shard:06}")).join(array).join("c").join("0");
        let mut bytes = std::fs::read(&target).unwrap();
        apply(&mut bytes, &damage);
        std::fs::write(&target, &bytes).unwrap();
        let mut doc = manifest_doc(&store);
        doc["attributes"]["saecore"]["shards"][shard][array] = serde_json::json!([bytes.len(), crc32c::crc32c(&bytes)]);
        write_doc(&store, &doc);
        read_everything(&store, false);
        let _ = std::fs::remove_dir_all(case);
    }

}

proptest! {
    #![proptest_config(config(512))]

    /// Arbitrary bytes as `zarr.json`, and arbitrary JSON values as the manifest object.
    #[test]
    fn arbitrary_bytes_as_a_manifest_are_an_error(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let dir = scratch_dir("bytes");
        std::fs::write(dir.join("zarr.json"), &bytes).unwrap();
        prop_assert!(read_manifest(&dir).is_err());
        if let Ok(v) = serde_json::from_slice::<Value>(&bytes) {
            let _ = Manifest::from_json(&v, &dir);
        }
        let _ = std::fs::remove_dir_all(dir);
    }

    /// The chunk decoder on arbitrary bytes and any claimed element count: an error or exactly the
    /// claimed length, and no allocation beyond what the bytes could hold.
    #[test]
    fn chunk_decoder_takes_arbitrary_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..256), n in crafted_number(), elem in prop::sample::select(vec![2usize, 4, 8])) {
        if let Ok(out) = decode_chunk(&bytes, n, elem, "fuzz chunk") {
            prop_assert_eq!(out.len() as u128, u128::from(n) * elem as u128);
        }
    }
}

/// A zstd frame that declares 1 TB of content, with the manifest agreeing: refused from the
/// frame's size bound before any buffer is sized (the allocation that used to abort).
#[test]
fn a_frame_claiming_a_terabyte_is_refused_without_allocating() {
    // Magic, a frame header declaring an 8-byte content size of 2^40, and one empty last raw block.
    let mut frame = Vec::new();
    frame.extend_from_slice(&0xFD2F_B528u32.to_le_bytes());
    frame.push(0b1100_0000 | 0b0010_0000); // FCS field 8 bytes, single segment
    frame.extend_from_slice(&(1u64 << 40).to_le_bytes());
    frame.extend_from_slice(&[1, 0, 0]); // a last raw block of 0 bytes
    let err = decode_chunk(&frame, (1u64 << 40) / 8, 8, "crafted chunk").unwrap_err();
    assert!(err.to_string().contains("crafted chunk"), "{err}");
}
