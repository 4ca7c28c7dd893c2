//! Store round trips, resume, corruption detection, the CSC copy, and mining against a naive
//! reference, on random sparse data (proptest).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use proptest::prelude::*;
use saecore::mining::{density_histogram, mine, sample_key, MineOptions};
use saecore::store::{build_csc, CscOptions, FeatureStore, FeaturesIn, RowPtrIn, ShardWriter, ValueDtype, ValuesIn, WriterOptions};
use saecore::Error;

/// A fresh folder under the system temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> Self {
        static N: AtomicUsize = AtomicUsize::new(0);
        let p = std::env::temp_dir().join(format!(
            "saecore-test-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
    fn store(&self) -> PathBuf {
        self.0.join("f.zarr")
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Dense reference data: rows of (feature, value) with ascending features and positive values.
#[derive(Clone, Debug)]
struct Data {
    d_sae: u32,
    rows: Vec<Vec<(u32, f32)>>,
}

impl Data {
    fn csr(&self, lo: usize, hi: usize) -> (Vec<i64>, Vec<i64>, Vec<f32>) {
        let mut ptr = vec![0i64];
        let (mut f, mut v) = (vec![], vec![]);
        for row in &self.rows[lo..hi] {
            for &(a, b) in row {
                f.push(i64::from(a));
                v.push(b);
            }
            ptr.push(f.len() as i64);
        }
        (ptr, f, v)
    }

    /// The data as the store keeps it: values rounded to `dtype`, zeros dropped.
    fn stored(&self, dtype: ValueDtype) -> Vec<Vec<(u32, f32)>> {
        let round = |v: f32| match dtype {
            ValueDtype::F16 => half::f16::from_f32(v).to_f32(),
            ValueDtype::F32 => v,
        };
        self.rows.iter().map(|r| r.iter().map(|&(f, v)| (f, round(v))).filter(|&(_, v)| v != 0.0).collect()).collect()
    }
}

/// Random rows with a few heavy features, repeated values (ties), empty rows and empty features.
fn data_strategy() -> impl Strategy<Value = Data> {
    (1u32..40, 0usize..120).prop_flat_map(|(d, n)| {
        let row = proptest::collection::btree_map(0..d, prop_oneof![Just(1.0f32), Just(0.5f32), 1e-3f32..100.0, Just(0.0f32)], 0..(d as usize).min(8));
        proptest::collection::vec(row, n).prop_map(move |rows| Data {
            d_sae: d,
            rows: rows.into_iter().map(|m| m.into_iter().collect()).collect(),
        })
    })
}

fn options(d: u32, dtype: ValueDtype, shard_rows: u64, threads: usize) -> WriterOptions {
    WriterOptions { d_sae: d, value_dtype: dtype, shard_rows, spec: serde_json::json!({"test": 1}), threads }
}

/// Write `data` in batches cut at `cuts` (sorted positions); return the finished writer's store.
fn write(path: &Path, data: &Data, dtype: ValueDtype, shard_rows: u64, cuts: &[usize], threads: usize) {
    let mut w = ShardWriter::open(path, options(data.d_sae, dtype, shard_rows, threads)).unwrap();
    let mut bounds: Vec<usize> = cuts.iter().map(|&c| c.min(data.rows.len())).collect();
    bounds.push(0);
    bounds.push(data.rows.len());
    bounds.sort_unstable();
    for pair in bounds.windows(2) {
        let (p, f, v) = data.csr(pair[0], pair[1]);
        w.append(RowPtrIn::I64(&p), FeaturesIn::I64(&f), ValuesIn::F32(&v)).unwrap();
    }
    w.finish().unwrap();
}

fn read_all(store: &FeatureStore) -> Vec<Vec<(u32, f32)>> {
    let mut rows = vec![];
    for i in 0..store.num_shards() {
        let s = store.read_shard(i).unwrap();
        assert_eq!(s.row_start as usize, rows.len());
        for r in 0..s.rows() {
            let (lo, hi) = (s.row_ptr[r] as usize, s.row_ptr[r + 1] as usize);
            rows.push(s.feature[lo..hi].iter().copied().zip(s.value[lo..hi].iter().copied()).collect());
        }
    }
    rows
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn store_and_csc_round_trip(
        data in data_strategy(),
        shard_rows in 1u64..50,
        cuts in proptest::collection::vec(0usize..120, 0..5),
        f16 in any::<bool>(),
        budget in 1u64..64,
        chunk_elems in 1u64..20,
    ) {
        let tmp = TempDir::new("roundtrip");
        let dtype = if f16 { ValueDtype::F16 } else { ValueDtype::F32 };
        write(&tmp.store(), &data, dtype, shard_rows, &cuts, 2);
        let store = FeatureStore::open(&tmp.store()).unwrap();
        let expected = data.stored(dtype);
        prop_assert_eq!(store.n_rows() as usize, data.rows.len());
        prop_assert_eq!(read_all(&store), expected.clone());

        build_csc(&tmp.store(), &CscOptions { mem_budget_bytes: budget * 12, chunk_elems }).unwrap();
        let store = FeatureStore::open(&tmp.store()).unwrap();
        store.verify().unwrap();
        for f in 0..data.d_sae {
            let want: Vec<(u64, f32)> = expected.iter().enumerate()
                .flat_map(|(r, row)| row.iter().filter(move |e| e.0 == f).map(move |e| (r as u64, e.1)))
                .collect();
            let (rows, values) = store.feature_activations(f).unwrap();
            prop_assert_eq!(rows.into_iter().zip(values).collect::<Vec<_>>(), want);
        }
    }

    #[test]
    fn mining_matches_naive_reference(
        data in data_strategy(),
        shard_rows in 1u64..40,
        k in 0usize..5,
        hist_bins in 1usize..6,
        sample_bins in 1usize..5,
        samples_per_bin in 0usize..4,
        seed in any::<u64>(),
    ) {
        let tmp = TempDir::new("mining");
        write(&tmp.store(), &data, ValueDtype::F16, shard_rows, &[], 1);
        let store = FeatureStore::open(&tmp.store()).unwrap();
        let o = MineOptions { k, hist_bins, sample_bins, samples_per_bin, seed, second_pass: true };
        let got = mine(&store, &o, &AtomicU64::new(0)).unwrap();
        let rows = data.stored(ValueDtype::F16);
        let d = data.d_sae as usize;
        let (mut top_f, mut top_r, mut top_v) = (vec![], vec![], vec![]);
        let (mut s_f, mut s_b, mut s_r, mut s_v) = (vec![], vec![], vec![], vec![]);
        for f in 0..d {
            let mut acts: Vec<(u64, f32)> = rows.iter().enumerate()
                .flat_map(|(r, row)| row.iter().filter(move |e| e.0 as usize == f).map(move |e| (r as u64, e.1)))
                .collect();
            prop_assert_eq!(got.count[f], acts.len() as u64);
            let sum: f64 = acts.iter().map(|a| f64::from(a.1)).sum();
            prop_assert!((got.sum[f] - sum).abs() <= 1e-9 * sum.max(1.0));
            let max = acts.iter().map(|a| a.1).fold(0.0f32, f32::max);
            let min = acts.iter().map(|a| a.1).fold(f32::INFINITY, f32::min);
            prop_assert_eq!(got.max[f], max);
            prop_assert_eq!(got.min[f], if acts.is_empty() { 0.0 } else { min });
            // histogram: the returned edges are log-spaced from min to max, counts follow the edge rule
            let e = &got.hist_edges[f * (hist_bins + 1)..(f + 1) * (hist_bins + 1)];
            let counts = &got.hist_counts[f * hist_bins..(f + 1) * hist_bins];
            if !acts.is_empty() {
                prop_assert_eq!(e[0], min);
                prop_assert_eq!(e[hist_bins], max);
                for j in 0..=hist_bins {
                    let want = f64::from(min) * (f64::from(max) / f64::from(min)).powf(j as f64 / hist_bins as f64);
                    prop_assert!((f64::from(e[j]) - want).abs() <= 1e-6 * want);
                }
                let mut want = vec![0u64; hist_bins];
                for a in &acts {
                    want[(0..hist_bins).rev().find(|&j| e[j] <= a.1).unwrap()] += 1;
                }
                prop_assert_eq!(counts.to_vec(), want);
            } else {
                prop_assert!(counts.iter().all(|&c| c == 0));
            }
            // samples: bottom-s keys per fraction-of-max bin
            let se = &got.sample_edges[f * (sample_bins + 1)..(f + 1) * (sample_bins + 1)];
            for b in 0..sample_bins {
                let mut members: Vec<(u64, u64, f32)> = acts.iter()
                    .filter(|a| (0..sample_bins).rev().find(|&j| se[j] <= a.1).unwrap() == b)
                    .map(|a| (sample_key(seed, f as u32, a.0), a.0, a.1))
                    .collect();
                members.sort_by_key(|x| (x.0, x.1));
                members.truncate(samples_per_bin);
                members.sort_by(|x, y| y.2.total_cmp(&x.2).then(x.1.cmp(&y.1)));
                for m in members {
                    s_f.push(f as u32); s_b.push(b as u16); s_r.push(m.1); s_v.push(m.2);
                }
            }
            // top-k: larger value first, then smaller row
            acts.sort_by(|x, y| y.1.total_cmp(&x.1).then(x.0.cmp(&y.0)));
            for (rank, a) in acts.iter().take(k).enumerate() {
                let _ = rank;
                top_f.push(f as u32); top_r.push(a.0); top_v.push(a.1);
            }
        }
        prop_assert_eq!(&got.top_feature, &top_f);
        prop_assert_eq!(&got.top_row, &top_r);
        prop_assert_eq!(&got.top_value, &top_v);
        prop_assert_eq!(&got.sample_feature, &s_f);
        prop_assert_eq!(&got.sample_bin, &s_b);
        prop_assert_eq!(&got.sample_row, &s_r);
        prop_assert_eq!(&got.sample_value, &s_v);
    }
}

fn sample_data(n: usize, d: u32) -> Data {
    let rows = (0..n)
        .map(|r| (0..d).filter(|f| (r as u32 * 7 + f * 3).is_multiple_of(5)).map(|f| (f, 0.25 * (1 + (r + f as usize) % 9) as f32)).collect())
        .collect();
    Data { d_sae: d, rows }
}

fn chunk_files(root: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out = vec![];
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(&dir).unwrap().flatten() {
            if e.file_type().unwrap().is_dir() {
                stack.push(e.path());
            } else {
                out.push((e.path().strip_prefix(root).unwrap().to_path_buf(), std::fs::read(e.path()).unwrap()));
            }
        }
    }
    out.sort();
    out
}

#[test]
fn resume_after_close_gives_identical_bytes() {
    let data = sample_data(103, 11);
    let once = TempDir::new("once");
    write(&once.store(), &data, ValueDtype::F16, 10, &[37, 64], 2);

    let twice = TempDir::new("twice");
    let mut w = ShardWriter::open(&twice.store(), options(11, ValueDtype::F16, 10, 2)).unwrap();
    let (p, f, v) = data.csr(0, 45);
    w.append(RowPtrIn::I64(&p), FeaturesIn::I64(&f), ValuesIn::F32(&v)).unwrap();
    w.close().unwrap(); // like a kill: rows 40..45 sit in the unflushed buffer and are lost
    drop(w);
    let mut w = ShardWriter::open(&twice.store(), options(11, ValueDtype::F16, 10, 2)).unwrap();
    assert_eq!(w.rows_at_open(), 40);
    let (p, f, v) = data.csr(40, 103);
    w.append(RowPtrIn::I64(&p), FeaturesIn::I64(&f), ValuesIn::F32(&v)).unwrap();
    w.finish().unwrap();
    assert_eq!(chunk_files(&once.store()), chunk_files(&twice.store()));
}

#[test]
fn reopening_with_other_options_names_the_difference() {
    let tmp = TempDir::new("mismatch");
    write(&tmp.store(), &sample_data(5, 4), ValueDtype::F16, 2, &[], 1);
    let mut o = options(4, ValueDtype::F16, 3, 1);
    o.spec = serde_json::json!({"test": 2});
    let err = ShardWriter::open(&tmp.store(), o).err().unwrap().to_string();
    assert!(err.contains("shard_rows: store has 2, now 3"), "{err}");
    assert!(err.contains("spec.test: store has 1, now 2"), "{err}");
}

#[test]
fn bad_batches_are_rejected_with_the_row_and_feature() {
    let tmp = TempDir::new("bad");
    let mut w = ShardWriter::open(&tmp.store(), options(4, ValueDtype::F16, 2, 1)).unwrap();
    let cases: Vec<(Vec<i64>, Vec<i64>, Vec<f32>, &str)> = vec![
        (vec![0, 1], vec![4], vec![1.0], "feature id 4 outside 0..4"),
        (vec![0, 2], vec![2, 1], vec![1.0, 1.0], "strictly increasing"),
        (vec![0, 1], vec![1], vec![f32::NAN], "not a finite non-negative"),
        (vec![0, 1], vec![1], vec![-1.0], "not a finite non-negative"),
        (vec![0, 1], vec![1], vec![1e6], "float16 range"),
        (vec![0, 2], vec![1], vec![1.0], "row_ptr ends at 2"),
        (vec![1, 1], vec![1], vec![1.0], "must start at 0"),
    ];
    for (p, f, v, msg) in cases {
        let err = w.append(RowPtrIn::I64(&p), FeaturesIn::I64(&f), ValuesIn::F32(&v)).unwrap_err();
        assert!(matches!(err, Error::Invalid(_)) && err.to_string().contains(msg), "{err} vs {msg}");
    }
    assert_eq!(w.rows_written(), 0, "a rejected batch must leave the writer unchanged");
}

#[test]
fn reader_sees_only_committed_shards() {
    let tmp = TempDir::new("visibility");
    let data = sample_data(25, 6);
    let mut w = ShardWriter::open(&tmp.store(), options(6, ValueDtype::F32, 10, 1)).unwrap();
    let (p, f, v) = data.csr(0, 25);
    w.append(RowPtrIn::I64(&p), FeaturesIn::I64(&f), ValuesIn::F32(&v)).unwrap();
    // Two full shards are queued; wait until both are committed (the partial third is buffered).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while w.shards_committed() < 2 {
        assert!(std::time::Instant::now() < deadline, "shards were not committed: {:?}", w.close());
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    let early = FeatureStore::open(&tmp.store()).unwrap();
    assert_eq!((early.num_shards(), early.n_rows(), early.is_complete()), (2, 20, false));
    assert!(matches!(mine(&early, &MineOptions::default(), &AtomicU64::new(0)), Err(Error::Invalid(_))));
    w.finish().unwrap();
    assert_eq!(early.num_shards(), 2, "an open reader keeps its snapshot");
    let late = FeatureStore::open(&tmp.store()).unwrap();
    assert_eq!((late.num_shards(), late.n_rows(), late.is_complete()), (3, 25, true));
}

fn corrupt_and_read(edit: impl Fn(&Path)) -> Error {
    let tmp = TempDir::new("corrupt");
    write(&tmp.store(), &sample_data(30, 8), ValueDtype::F16, 10, &[], 1);
    edit(&tmp.store().join("shards/000001/feature/c/0"));
    let store = FeatureStore::open(&tmp.store()).unwrap();
    store.read_shard(0).unwrap();
    let err = store.read_shard(1).unwrap_err();
    assert!(store.verify().is_err());
    err
}

#[test]
fn bit_flip_truncation_and_loss_are_named() {
    let flip = corrupt_and_read(|p| {
        let mut b = std::fs::read(p).unwrap();
        let mid = b.len() / 2;
        b[mid] ^= 0x10;
        std::fs::write(p, b).unwrap();
    });
    let cut = corrupt_and_read(|p| {
        let b = std::fs::read(p).unwrap();
        std::fs::write(p, &b[..b.len() - 3]).unwrap();
    });
    let gone = corrupt_and_read(|p| std::fs::remove_file(p).unwrap());
    for (err, what) in [(flip, "CRC-32C"), (cut, "truncated"), (gone, "missing")] {
        let msg = err.to_string();
        assert!(matches!(err, Error::Corrupt(_)), "{msg}");
        assert!(msg.contains("shard 000001") && msg.contains("feature") && msg.contains(what), "{msg}");
    }
}

#[test]
fn csc_corruption_and_bad_feature_ids_are_reported() {
    let tmp = TempDir::new("csc");
    write(&tmp.store(), &sample_data(30, 8), ValueDtype::F16, 10, &[], 1);
    let no_csc = FeatureStore::open(&tmp.store()).unwrap();
    assert!(no_csc.feature_activations(0).unwrap_err().to_string().contains("no feature-major copy"));
    build_csc(&tmp.store(), &CscOptions { mem_budget_bytes: 120, chunk_elems: 16 }).unwrap();
    let store = FeatureStore::open(&tmp.store()).unwrap();
    let err = store.feature_activations(8).unwrap_err().to_string();
    assert!(err.contains("feature id 8 outside the valid range 0..8"), "{err}");
    let p = tmp.store().join("csc/row/c/1");
    let mut b = std::fs::read(&p).unwrap();
    b[0] ^= 1;
    std::fs::write(&p, b).unwrap();
    let err = store.verify().unwrap_err();
    assert!(matches!(err, Error::Corrupt(_)) && err.to_string().contains("csc array row chunk 1"), "{err}");
}

#[test]
fn density_histogram_rejects_impossible_counts() {
    assert!(density_histogram(&[5], 4, 3).is_err());
    assert!(density_histogram(&[1], 0, 3).is_err());
    let h = density_histogram(&[1, 1000, 0], 1000, 3).unwrap();
    assert_eq!(h.count.iter().sum::<u64>(), 3);
    assert_eq!(h.count[0], 1);
}
