//! One-pass mining of sparse feature activations: statistics, histograms, top-k, quantile samples.
//!
//! Mining is a mergeable reduction over the store's shards: each worker thread folds the shards it
//! pulls into its own accumulator, and the accumulators are merged at the end, so one shard, many
//! threads or many machines run the same code and give the same answer.
//!
//! * **Pass 1** (one streaming pass): per feature the count, sum, max and min of its nonzero
//!   activations, and its top-k examples — ordered by larger value first, then smaller row, so ties
//!   are broken the same way whatever the shard or thread order.
//! * **Pass 2** (needs each feature's min and max from pass 1): a log-spaced histogram between the
//!   feature's min and max, and *quantile samples*: the activations are binned by fraction of the
//!   feature's max (`[b/B, (b+1)/B) · max`) and `s` examples are drawn uniformly from each bin. The
//!   draw is a bottom-s sketch: each activation gets a pseudo-random key `hash(seed, feature, row)`
//!   and a bin keeps the `s` smallest keys. Bottom-s sets merge exactly, so the sample is a uniform
//!   sample without replacement and identical for any sharding or thread count.
//!
//! Bin rule (histograms, sample bins, density histogram): a value `x` with edges `e[0..=n]` falls in
//! the largest bin `j < n` with `e[j] <= x`; the edges are part of the output.
//!
//! Pass 1 folds each decoded shard row by row into 16-byte per-feature statistics that stay in L2
//! (the top-k buffers are touched only by the few activations that beat a feature's threshold).
//! Pass 2's per-feature state (edges, counts, reservoir thresholds) is too large for that, so it
//! regroups each shard feature-major (`ByFeature`) and folds one feature's run at a time.
//!
//! Memory: `threads × (2 × one decoded shard + d_sae × (48 + 32·k + 8·hist_bins + sample_bins·(16 + 24·s)) bytes)`,
//! never proportional to the number of tokens.

use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;

pub mod exact_sum;
pub mod partial;

use exact_sum::ExactSum;
pub use partial::{Extrema, Pass1Partial, Pass2Partial};

use crate::error::{Error, Result};
use crate::memory::{check_bytes, try_vec};
use crate::parallel;
use crate::store::{FeatureStore, Scratch, Shard};

/// What to compute.
#[derive(Clone, Copy, Debug)]
pub struct MineOptions {
    /// Top examples kept per feature.
    pub k: usize,
    /// Log-spaced histogram bins per feature.
    pub hist_bins: usize,
    /// Activation-level bins (fractions of the feature's max) for quantile samples.
    pub sample_bins: usize,
    /// Examples drawn per sample bin.
    pub samples_per_bin: usize,
    /// Seed of the sampling hash.
    pub seed: u64,
    /// Run pass 2 (histograms and samples); pass 1 alone gives statistics and top-k.
    pub second_pass: bool,
}

impl Default for MineOptions {
    fn default() -> Self {
        MineOptions { k: 20, hist_bins: 32, sample_bins: 10, samples_per_bin: 10, seed: 0, second_pass: true }
    }
}

/// Everything mining produces; per-feature arrays are indexed by feature id.
#[derive(Clone, Debug, Default)]
pub struct MineResult {
    /// Token rows mined.
    pub n_rows: u64,
    /// Number of features.
    pub d_sae: u32,
    /// Nonzero activations per feature.
    pub count: Vec<u64>,
    /// Sum of activations per feature.
    pub sum: Vec<f64>,
    /// Largest activation per feature (0 for a feature that never fires).
    pub max: Vec<f32>,
    /// Smallest nonzero activation per feature (0 for a feature that never fires).
    pub min: Vec<f32>,
    /// Top-k examples, flattened in (feature, rank) order: feature ids.
    pub top_feature: Vec<u32>,
    /// Rank within the feature (0 = largest value).
    pub top_rank: Vec<u16>,
    /// Token row of each top example.
    pub top_row: Vec<u64>,
    /// Activation of each top example.
    pub top_value: Vec<f32>,
    /// Histogram edges, `d_sae × (hist_bins + 1)`, log-spaced from min to max (zeros if dead).
    pub hist_edges: Vec<f32>,
    /// Histogram counts, `d_sae × hist_bins`.
    pub hist_counts: Vec<u64>,
    /// Sample-bin edges, `d_sae × (sample_bins + 1)`: `max · b / sample_bins`.
    pub sample_edges: Vec<f32>,
    /// Quantile samples, flattened in (feature, bin, value desc, row asc) order: feature ids.
    pub sample_feature: Vec<u32>,
    /// Sample bin of each sample.
    pub sample_bin: Vec<u16>,
    /// Token row of each sample.
    pub sample_row: Vec<u64>,
    /// Activation of each sample.
    pub sample_value: Vec<f32>,
}

/// SplitMix64 finaliser: the sampling hash (reproduced in the Python reference).
pub fn mix64(z: u64) -> u64 {
    let mut z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Sampling key of activation (`feature`, `row`).
pub fn sample_key(seed: u64, feature: u32, row: u64) -> u64 {
    mix64(mix64(seed ^ u64::from(feature)) ^ row)
}

/// The per-activation statistics of a feature: 16 bytes, aligned so one activation touches one
/// cache line, and 16,384 features' worth (256 KiB) stays in a core's L2 while a shard streams
/// past. Everything touched only by top-k candidates lives in separate arrays.
#[derive(Clone, Copy, Debug)]
#[repr(C, align(16))]
struct HotStats {
    /// Sum over the current shard only (row order); folded into `Pass1::exact_sum` after each shard.
    sum: f64,
    /// Activations since the last flush into `Pass1::flushed_count` (fits: see `add_shard`).
    count: u32,
    min: f32,
}

const EMPTY_HOT: HotStats = HotStats { sum: 0.0, count: 0, min: f32::INFINITY };

#[derive(Clone, Copy, Debug, Default)]
struct Example {
    value: f32,
    row: u64,
}

/// An example packed into one integer that orders by rank: the value's bits (a non-negative
/// `f32` orders like its bit pattern) above the complemented row, so a larger value ranks higher
/// and, between equal values, the smaller row. Selection then runs on plain integer compares.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord)]
struct RankKey(u128);

impl RankKey {
    #[inline]
    fn new(value: f32, row: u64) -> Self {
        RankKey((u128::from(value.to_bits()) << 64) | u128::from(!row))
    }

    #[inline]
    fn value(self) -> f32 {
        f32::from_bits((self.0 >> 64) as u32)
    }

    fn example(self) -> Example {
        Example { value: self.value(), row: !(self.0 as u64) }
    }
}

/// Pass-1 accumulator: statistics plus, per feature, an unsorted buffer of candidate examples.
///
/// Candidates are appended (one cache line touched) until the buffer holds `2k`; then a selection
/// keeps the best `k` and their worst becomes the admission threshold. That is amortised O(1) per
/// candidate instead of a heap's O(log k) dependent memory accesses, and after the first few
/// thousand rows almost every activation is rejected by one compare against the threshold.
/// A feature's max is its best example's value (tracked separately only when `k == 0`).
struct Pass1 {
    k: usize,
    cap: usize,
    hot: Vec<HotStats>,
    /// Exact sum of the per-shard sums: the same bits whatever the shard order or grouping.
    exact_sum: Vec<ExactSum>,
    flushed_count: Vec<u64>,
    rows_since_flush: u64,
    /// Per-feature max, kept only when `k == 0` (otherwise the top example has it).
    max_without_top: Vec<f32>,
    /// Value of the worst kept example once a buffer was compacted (`-inf` before).
    threshold: Vec<f32>,
    /// The full threshold (value and row), read only to settle a tie with `threshold`.
    worst: Vec<RankKey>,
    len: Vec<u32>,
    buf: Vec<RankKey>,
}

/// `vec![fill; n]` for a per-feature array, an error naming the array when it cannot be had.
fn per_feature<T: Clone>(n: usize, fill: T, what: &str) -> Result<Vec<T>> {
    try_vec(n, fill, || format!("mining: {what} ({n} entries)"))
}

impl Pass1 {
    fn new(d: usize, k: usize) -> Result<Self> {
        let cap = if k == 0 { 0 } else { 2 * k };
        Ok(Pass1 {
            k,
            cap,
            hot: vec![EMPTY_HOT; d],
            exact_sum: vec![ExactSum::default(); d],
            flushed_count: vec![0; d],
            rows_since_flush: 0,
            max_without_top: if k == 0 { per_feature(d, f32::NEG_INFINITY, "per-feature maxima")? } else { Vec::new() },
            threshold: per_feature(d, f32::NEG_INFINITY, "top-k thresholds")?,
            worst: per_feature(d, RankKey(0), "top-k thresholds")?,
            len: per_feature(d, 0, "top-k lengths")?,
            buf: per_feature(d.saturating_mul(cap), RankKey(0), "top-k candidate buffers")?,
        })
    }

    fn d(&self) -> usize {
        self.hot.len()
    }

    fn count(&self, f: usize) -> u64 {
        self.flushed_count[f] + u64::from(self.hot[f].count)
    }

    /// Fold each feature's per-shard sum into its exact sum (after every shard, so a shard's sum
    /// never depends on which shards the same worker saw before it).
    fn flush_sums(&mut self) {
        for (exact, h) in self.exact_sum.iter_mut().zip(&mut self.hot) {
            if h.sum != 0.0 {
                exact.add_f64(h.sum);
                h.sum = 0.0;
            }
        }
    }

    fn min(&self, f: usize) -> f32 {
        self.hot[f].min
    }

    fn max(&self, f: usize) -> f32 {
        if self.k == 0 {
            return self.max_without_top[f];
        }
        let kept = &self.buf[f * self.cap..f * self.cap + self.len[f] as usize];
        kept.iter().map(|key| key.value()).fold(f32::NEG_INFINITY, f32::max)
    }

    #[cfg(test)]
    fn add(&mut self, f: usize, value: f32, row: u64) {
        let h = &mut self.hot[f];
        h.count += 1;
        h.sum += f64::from(value);
        h.min = h.min.min(value);
        if self.k == 0 {
            self.max_without_top[f] = self.max_without_top[f].max(value);
        }
        self.offer(f, RankKey::new(value, row));
    }

    /// Consider `key` for feature `f`'s top-k.
    #[inline]
    fn offer(&mut self, f: usize, key: RankKey) {
        if self.k == 0 {
            return;
        }
        let (t, v) = (self.threshold[f], key.value());
        if v < t || (v == t && key <= self.worst[f]) {
            return;
        }
        let len = self.len[f] as usize;
        self.buf[f * self.cap + len] = key;
        self.len[f] += 1;
        if len + 1 == self.cap {
            self.compact(f);
        }
    }

    /// Keep the best `k` of a full buffer; their worst becomes the admission threshold.
    #[cold]
    fn compact(&mut self, f: usize) {
        let k = self.k;
        let buf = &mut self.buf[f * self.cap..(f + 1) * self.cap];
        buf.select_nth_unstable_by(k - 1, |x, y| y.cmp(x));
        let worst = buf[k - 1];
        self.worst[f] = worst;
        self.threshold[f] = worst.value();
        self.len[f] = k as u32;
    }

    /// The best `k` examples of feature `f`, best first.
    fn best(&self, f: usize) -> Vec<Example> {
        let mut keys = self.buf[f * self.cap..f * self.cap + self.len[f] as usize].to_vec();
        keys.sort_unstable_by(|x, y| y.cmp(x));
        keys.truncate(self.k);
        keys.into_iter().map(RankKey::example).collect()
    }

    /// Move the `u32` hot counts into the `u64` totals.
    fn flush_counts(&mut self) {
        for (total, h) in self.flushed_count.iter_mut().zip(&mut self.hot) {
            *total += u64::from(h.count);
            h.count = 0;
        }
        self.rows_since_flush = 0;
    }

    /// Fold a shard row by row, straight into the per-feature statistics: they fit in L2, so
    /// this beats regrouping the shard by feature (which writes and re-reads every activation).
    /// Each feature still sees its activations in row order, so sums are added in the same order.
    fn add_shard(&mut self, shard: &Shard) {
        // A feature fires at most once per row, so a hot count cannot pass the rows seen since
        // the last flush; flushing before that could exceed u32 keeps the counts exact.
        let rows = shard.rows() as u64;
        if self.rows_since_flush + rows > u64::from(u32::MAX) {
            self.flush_counts();
        }
        self.rows_since_flush += rows;
        let (row_ptr, feature, value) = (&shard.row_ptr, &shard.feature, &shard.value);
        for r in 0..shard.rows() {
            let row = shard.row_start + r as u64;
            let (lo, hi) = (row_ptr[r] as usize, row_ptr[r + 1] as usize);
            for (&f, &v) in feature[lo..hi].iter().zip(&value[lo..hi]) {
                let f = f as usize;
                let h = &mut self.hot[f];
                h.sum += f64::from(v);
                h.count += 1;
                h.min = h.min.min(v);
                if self.k == 0 {
                    self.max_without_top[f] = self.max_without_top[f].max(v);
                } else if v >= self.threshold[f] {
                    // Values are finite, so `>=` passes exactly the candidates that can tie or
                    // beat the threshold; `offer` settles ties by row.
                    self.offer(f, RankKey::new(v, row));
                }
            }
        }
        self.flush_sums();
    }

    fn merge(&mut self, other: Pass1) {
        for f in 0..self.d() {
            let b = other.hot[f];
            self.flushed_count[f] += other.flushed_count[f] + u64::from(b.count);
            self.exact_sum[f].merge(&other.exact_sum[f]);
            self.exact_sum[f].add_f64(b.sum);
            let a = &mut self.hot[f];
            a.min = a.min.min(b.min);
            if self.k == 0 {
                self.max_without_top[f] = self.max_without_top[f].max(other.max_without_top[f]);
            }
            for i in 0..other.len[f] as usize {
                self.offer(f, other.buf[f * other.cap + i]);
            }
        }
    }
}

/// A drawn sample: key decides membership, (row, value) is the payload.
#[derive(Clone, Copy, Debug, Default)]
struct Drawn {
    key: u64,
    row: u64,
    value: f32,
}

/// Pass-2 accumulator: histogram counts and bottom-s reservoirs per (feature, sample bin).
struct Pass2<'a> {
    edges: &'a Edges,
    seed_mix: &'a [u64],
    hist: Vec<u64>,
    s: usize,
    slot_len: Vec<u32>,
    /// Largest kept key of each full slot (`u64::MAX` until full): most candidates are rejected
    /// by this compact array without touching the slot's reservoir.
    slot_worst: Vec<u64>,
    slots: Vec<Drawn>,
    by_feature: ByFeature,
}

/// Per-feature bin edges and the constants that make a first guess of the bin cheap.
struct Edges {
    hist_bins: usize,
    sample_bins: usize,
    hist: Vec<f32>,
    sample: Vec<f32>,
    /// `fast_log2` of the feature's min: with `hist_scale`, a first guess of a value's bin.
    log2_min: Vec<f32>,
    hist_scale: Vec<f64>,
    sample_scale: Vec<f64>,
}

impl Edges {
    fn new(extrema: &Extrema, hist_bins: usize, sample_bins: usize) -> Result<Self> {
        let d = extrema.min.len();
        let (hb, sb) = (hist_bins, sample_bins);
        let mut e = Edges {
            hist_bins: hb,
            sample_bins: sb,
            hist: per_feature(d.saturating_mul(hb + 1), 0.0, "histogram edges")?,
            sample: per_feature(d.saturating_mul(sb + 1), 0.0, "sample-bin edges")?,
            log2_min: per_feature(d, 0.0, "histogram scales")?,
            hist_scale: per_feature(d, 0.0, "histogram scales")?,
            sample_scale: per_feature(d, 0.0, "sample-bin scales")?,
        };
        for f in 0..d {
            if !extrema.fired(f) {
                continue;
            }
            let (min, max) = (extrema.min[f], extrema.max[f]);
            let (lo, hi) = (f64::from(min), f64::from(max));
            let ratio = hi / lo;
            let hist = &mut e.hist[f * (hb + 1)..(f + 1) * (hb + 1)];
            for (j, edge) in hist.iter_mut().enumerate() {
                *edge = (lo * ratio.powf(j as f64 / hb as f64)) as f32;
            }
            hist[0] = min;
            hist[hb] = max;
            let sample = &mut e.sample[f * (sb + 1)..(f + 1) * (sb + 1)];
            for (b, edge) in sample.iter_mut().enumerate() {
                *edge = (hi * b as f64 / sb as f64) as f32;
            }
            sample[sb] = max;
            e.log2_min[f] = fast_log2(min);
            e.hist_scale[f] = if hi > lo { hb as f64 / (hi.log2() - lo.log2()) } else { 0.0 };
            e.sample_scale[f] = sb as f64 / hi;
        }
        Ok(e)
    }
}

/// log2 of a positive finite `x` to within 0.09, read off its bits (exponent plus mantissa as a
/// linear fraction): only a first guess of a histogram bin, which `locate` then corrects.
#[inline]
fn fast_log2(x: f32) -> f32 {
    x.to_bits() as f32 * (1.0 / (1u32 << 23) as f32) - 127.0
}

/// The largest `j < n` with `edges[j] <= x`, starting the search from the estimate `guess`.
#[inline]
fn locate(edges: &[f32], x: f32, guess: f64) -> usize {
    let n = edges.len() - 1;
    let mut j = if guess.is_finite() && guess > 0.0 { (guess as usize).min(n - 1) } else { 0 };
    while j + 1 < n && edges[j + 1] <= x {
        j += 1;
    }
    while j > 0 && edges[j] > x {
        j -= 1;
    }
    j
}

impl<'a> Pass2<'a> {
    fn new(edges: &'a Edges, seed_mix: &'a [u64], s: usize) -> Result<Self> {
        let d = seed_mix.len();
        let slots = d.saturating_mul(edges.sample_bins);
        Ok(Pass2 {
            edges,
            seed_mix,
            hist: per_feature(d.saturating_mul(edges.hist_bins), 0, "histogram counts")?,
            s,
            slot_len: per_feature(slots, 0, "sample reservoirs")?,
            slot_worst: per_feature(slots, u64::MAX, "sample reservoirs")?,
            slots: per_feature(slots.saturating_mul(s), Drawn::default(), "sample reservoirs")?,
            by_feature: ByFeature::default(),
        })
    }

    /// Keep the `s` smallest keys of a slot in a max-heap on (key, row).
    #[inline]
    fn offer(&mut self, slot: usize, d: Drawn) {
        if d.key > self.slot_worst[slot] {
            return;
        }
        let s = self.s;
        let len = self.slot_len[slot] as usize;
        let heap = &mut self.slots[slot * s..(slot + 1) * s];
        let above = |a: Drawn, b: Drawn| (a.key, a.row) > (b.key, b.row);
        if len < s {
            heap[len] = d;
            let mut i = len;
            while i > 0 && above(heap[i], heap[(i - 1) / 2]) {
                heap.swap(i, (i - 1) / 2);
                i = (i - 1) / 2;
            }
            self.slot_len[slot] += 1;
            if len + 1 == s {
                self.slot_worst[slot] = heap[0].key;
            }
        } else if above(heap[0], d) {
            heap[0] = d;
            let mut i = 0;
            loop {
                let (l, r) = (2 * i + 1, 2 * i + 2);
                let mut top = i;
                if l < s && above(heap[l], heap[top]) {
                    top = l;
                }
                if r < s && above(heap[r], heap[top]) {
                    top = r;
                }
                if top == i {
                    break;
                }
                heap.swap(i, top);
                i = top;
            }
            self.slot_worst[slot] = heap[0].key;
        }
    }

    /// Bin and sample one feature's activations of a shard; the feature's edges, counts and
    /// reservoirs stay in cache for the whole run.
    fn add_feature(&mut self, f: usize, row_start: u64, run: &[(u32, f32)]) {
        let e = self.edges;
        let (hb, sb) = (e.hist_bins, e.sample_bins);
        if hb > 0 {
            let edges = &e.hist[f * (hb + 1)..(f + 1) * (hb + 1)];
            let (log2_min, scale) = (e.log2_min[f], e.hist_scale[f]);
            let counts = &mut self.hist[f * hb..(f + 1) * hb];
            for &(_, v) in run {
                counts[locate(edges, v, f64::from(fast_log2(v) - log2_min) * scale)] += 1;
            }
        }
        if sb > 0 && self.s > 0 {
            let (scale, seed_mix) = (e.sample_scale[f], self.seed_mix[f]);
            let sample_edges = &e.sample[f * (sb + 1)..(f + 1) * (sb + 1)];
            for &(r, value) in run {
                let slot = f * sb + locate(sample_edges, value, f64::from(value) * scale);
                let row = row_start + u64::from(r);
                let key = mix64(seed_mix ^ row);
                // Nearly every activation of a busy bin loses to the bin's s smallest keys: reject
                // it here, without a call, on the compact array of each slot's largest kept key.
                if key <= self.slot_worst[slot] {
                    self.offer(slot, Drawn { key, row, value });
                }
            }
        }
    }

    fn add_shard(&mut self, shard: &Shard) {
        let mut by = std::mem::take(&mut self.by_feature);
        by.fill(shard, self.seed_mix.len());
        by.for_each(|f, run| self.add_feature(f, shard.row_start, run));
        self.by_feature = by;
    }

    fn merge(&mut self, other: Pass2<'a>) {
        self.hist.iter_mut().zip(&other.hist).for_each(|(a, b)| *a += b);
        for slot in 0..self.slot_len.len() {
            for i in 0..other.slot_len[slot] as usize {
                self.offer(slot, other.slots[slot * self.s + i]);
            }
        }
    }
}

/// A shard regrouped feature-major by a stable counting sort: each feature's activations become one
/// contiguous run of (row offset, value), rows ascending, so a pass touches a feature's state once
/// per shard instead of once per activation. Per-feature results are unchanged (the top-k and
/// sample sets are exact and sums are still added in row order). Reused across shards by a worker.
#[derive(Default)]
struct ByFeature {
    /// `start[f]..start[f + 1]` is feature `f`'s run (`mine` checks shards hold < 2^32 nonzeros).
    start: Vec<u32>,
    cursor: Vec<u32>,
    /// (row offset within the shard, value): one cache line written per scattered activation.
    entries: Vec<(u32, f32)>,
}

impl ByFeature {
    fn fill(&mut self, shard: &Shard, d: usize) {
        self.start.clear();
        self.start.resize(d + 1, 0);
        for &f in &shard.feature {
            self.start[f as usize + 1] += 1;
        }
        for f in 0..d {
            self.start[f + 1] += self.start[f];
        }
        self.cursor.clear();
        self.cursor.extend_from_slice(&self.start[..d]);
        self.entries.resize(shard.feature.len(), (0, 0.0));
        for r in 0..shard.rows() {
            let (lo, hi) = (shard.row_ptr[r] as usize, shard.row_ptr[r + 1] as usize);
            for (&f, &v) in shard.feature[lo..hi].iter().zip(&shard.value[lo..hi]) {
                let p = self.cursor[f as usize];
                self.cursor[f as usize] = p + 1;
                self.entries[p as usize] = (r as u32, v);
            }
        }
    }

    /// Call `visit(feature, run)` for every feature with activations in the shard.
    fn for_each(&self, mut visit: impl FnMut(usize, &[(u32, f32)])) {
        for (f, w) in self.start.windows(2).enumerate() {
            if w[0] < w[1] {
                visit(f, &self.entries[w[0] as usize..w[1] as usize]);
            }
        }
    }
}

/// Fold every shard of `store` into per-thread accumulators and merge them. `progress` counts
/// finished shards (a caller may poll it from another thread).
pub(crate) fn fold_shards<A: Send>(
    store: &FeatureStore,
    shards: Range<usize>,
    with_values: bool,
    progress: &AtomicU64,
    make: impl Fn() -> Result<A> + Sync,
    step: impl Fn(&mut A, &Shard) + Sync,
    merge: impl Fn(&mut A, A),
) -> Result<A> {
    let next = AtomicUsize::new(shards.start);
    let stop = AtomicBool::new(false);
    let failure: Mutex<Option<Error>> = Mutex::new(None);
    let finished: Mutex<Vec<A>> = Mutex::new(Vec::new());
    let n = shards.end;
    let workers = rayon::current_num_threads().min(shards.len().max(1));
    rayon::scope(|scope| {
        for _ in 0..workers {
            scope.spawn(|_| {
                let mut acc = match make() {
                    Ok(acc) => acc,
                    Err(e) => {
                        stop.store(true, Ordering::Relaxed);
                        failure.lock().expect("failure lock").get_or_insert(e);
                        return;
                    }
                };
                let (mut scratch, mut shard) = (Scratch::default(), Shard::default());
                while !stop.load(Ordering::Relaxed) {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= n {
                        break;
                    }
                    match store.read_shard_into(i, with_values, &mut scratch, &mut shard) {
                        Ok(()) => step(&mut acc, &shard),
                        Err(e) => {
                            stop.store(true, Ordering::Relaxed);
                            failure.lock().expect("failure lock").get_or_insert(e);
                        }
                    }
                    progress.fetch_add(1, Ordering::Relaxed);
                }
                finished.lock().expect("accumulator lock").push(acc);
            });
        }
    });
    if let Some(e) = failure.into_inner().expect("failure lock") {
        return Err(e);
    }
    let mut parts = finished.into_inner().expect("accumulator lock").into_iter();
    let mut total = match parts.next() {
        Some(first) => first,
        None => make()?,
    };
    for part in parts {
        merge(&mut total, part);
    }
    Ok(total)
}

/// Mine the complete store at `store`; see the module docs. `progress` counts shards processed
/// over both passes (`2 × num_shards` in all when `second_pass`). This is the distributed path run
/// in one process: pass 1 over every shard into a [`Pass1Partial`], its extrema, pass 2 into a
/// [`Pass2Partial`], then [`partial::finish`] — so a merge of partials gives the same result.
pub fn mine(store: &FeatureStore, options: &MineOptions, progress: &AtomicU64) -> Result<MineResult> {
    let all = 0..store.num_shards();
    let p1 = mine_pass1(store, all.clone(), options, progress)?;
    if !options.second_pass {
        return partial::finish(&p1, None, store.n_rows(), store.num_shards());
    }
    let extrema = p1.extrema(store.num_shards())?;
    let p2 = mine_pass2(store, all, &extrema, options, progress)?;
    partial::finish(&p1, Some(&p2), store.n_rows(), store.num_shards())
}

/// Pass 1 (statistics and top-k) over the shards `shards` of `store`, on the thread pool.
pub fn mine_pass1(store: &FeatureStore, shards: Range<usize>, o: &MineOptions, progress: &AtomicU64) -> Result<Pass1Partial> {
    check_range(store, &shards, o)?;
    let d = store.d_sae() as usize;
    let acc = parallel::install(|| fold_shards(store, shards.clone(), true, progress, || Pass1::new(d, o.k), Pass1::add_shard, Pass1::merge))?;
    Ok(Pass1Partial::from_acc(acc, &shards))
}

/// Pass 2 (histograms and quantile samples) over the shards `shards` of `store`, binned with the
/// `extrema` of a complete pass 1.
pub fn mine_pass2(
    store: &FeatureStore,
    shards: Range<usize>,
    extrema: &Extrema,
    o: &MineOptions,
    progress: &AtomicU64,
) -> Result<Pass2Partial> {
    check_range(store, &shards, o)?;
    let d = store.d_sae() as usize;
    if extrema.min.len() != d || extrema.max.len() != d {
        return Err(Error::Invalid(format!("extrema cover {} features but {} has d_sae = {d}", extrema.min.len(), store.path().display())));
    }
    let edges = Edges::new(extrema, o.hist_bins, o.sample_bins)?;
    let seed_mix: Vec<u64> = (0..d as u32).map(|f| mix64(o.seed ^ u64::from(f))).collect();
    let s = o.samples_per_bin;
    let fold = || fold_shards(store, shards.clone(), true, progress, || Pass2::new(&edges, &seed_mix, s), Pass2::add_shard, Pass2::merge);
    let acc = parallel::install(fold)?;
    Ok(Pass2Partial::from_acc(&acc, &shards, o, extrema.crc()))
}

fn check_range(store: &FeatureStore, shards: &Range<usize>, o: &MineOptions) -> Result<()> {
    store.require_complete()?;
    check_options(o)?;
    check_mining_memory(store, o)?;
    if shards.start > shards.end || shards.end > store.num_shards() {
        return Err(Error::Invalid(format!(
            "{}: shard range {}..{} outside 0..{}",
            store.path().display(),
            shards.start,
            shards.end,
            store.num_shards()
        )));
    }
    if let Some(big) = store.manifest().shards.iter().position(|s| s.rows.max(s.nnz) >= u64::from(u32::MAX)) {
        return Err(Error::Invalid(format!("{}: shard {big} has 2^32 or more rows or nonzeros", store.path().display())));
    }
    Ok(())
}

fn check_options(o: &MineOptions) -> Result<()> {
    let limit = usize::from(u16::MAX);
    if o.k > limit || o.hist_bins > limit || o.sample_bins > limit || o.samples_per_bin > limit {
        return Err(Error::Invalid(format!(
            "k ({}), hist_bins ({}), sample_bins ({}) and samples_per_bin ({}) must be at most 65535",
            o.k, o.hist_bins, o.sample_bins, o.samples_per_bin
        )));
    }
    if o.samples_per_bin > usize::from(u16::MAX) {
        return Err(Error::Invalid(format!("samples_per_bin ({}) must be at most 65535", o.samples_per_bin)));
    }
    Ok(())
}

/// Refuse up front what the per-thread accumulators (module docs: `d_sae × (48 + 32·k + 8·hist_bins
/// + sample_bins·(16 + 24·s))` bytes each) cannot get, before any is allocated: `d_sae` comes from
/// the store's manifest, the rest from arguments, and a lie in either is a clear error, not an abort.
fn check_mining_memory(store: &FeatureStore, o: &MineOptions) -> Result<()> {
    let d = u128::from(store.d_sae());
    let (k, hb, sb, s) = (o.k as u128, o.hist_bins as u128, o.sample_bins as u128, o.samples_per_bin as u128);
    let per_feature = 48 + 32 * k + 8 * hb + sb * (16 + 24 * s);
    let threads = parallel::num_threads().min(store.num_shards().max(1)) as u128;
    check_bytes(threads * d * per_feature, || {
        format!(
            "mining {}: {threads} thread(s) × d_sae = {d} features (from its manifest) × {per_feature} bytes \
             (k = {k}, hist_bins = {hb}, sample_bins = {sb}, samples_per_bin = {s})",
            store.path().display()
        )
    })
}

/// Histogram of log10 firing density across features.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct DensityHistogram {
    /// Lower edge of each bin (log10 density). Row 0 holds dead features: `-inf..-inf`.
    pub lo_log10: Vec<f64>,
    /// Upper edge of each bin.
    pub hi_log10: Vec<f64>,
    /// Features per bin.
    pub count: Vec<u64>,
}

/// Bin `log10(count / n_rows)` of every feature into `n_bins` equal bins spanning
/// `[floor(log10(1 / n_rows)), 0]`; features that never fire go to a first `-inf` row.
pub fn density_histogram(count: &[u64], n_rows: u64, n_bins: usize) -> Result<DensityHistogram> {
    if n_rows == 0 || n_bins == 0 {
        return Err(Error::Invalid(format!("density histogram needs n_rows > 0 and n_bins > 0 (got {n_rows}, {n_bins})")));
    }
    if let Some(bad) = count.iter().position(|&c| c > n_rows) {
        return Err(Error::Invalid(format!("feature {bad} fires {} times in {n_rows} rows", count[bad])));
    }
    // n_bins is an argument: refuse a size no machine holds before building edges and counts.
    crate::memory::elems::<[f64; 3]>(n_bins as u128 + 1, || format!("a density histogram of n_bins = {n_bins} bins"))?;
    let left = (1.0 / n_rows as f64).log10().floor();
    let edges: Vec<f64> = (0..=n_bins).map(|j| left - left * j as f64 / n_bins as f64).collect();
    let mut h = DensityHistogram {
        lo_log10: std::iter::once(f64::NEG_INFINITY).chain(edges[..n_bins].iter().copied()).collect(),
        hi_log10: std::iter::once(f64::NEG_INFINITY).chain(edges[1..].iter().copied()).collect(),
        count: vec![0; n_bins + 1],
    };
    for &c in count {
        if c == 0 {
            h.count[0] += 1;
            continue;
        }
        let x = (c as f64 / n_rows as f64).log10();
        let mut j = 0;
        while j + 1 < n_bins && edges[j + 1] <= x {
            j += 1;
        }
        h.count[j + 1] += 1;
    }
    Ok(h)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heap_keeps_largest_with_row_tiebreak() {
        let mut p = Pass1::new(1, 3).unwrap();
        for (row, v) in [(5, 1.0), (1, 2.0), (9, 2.0), (3, 2.0), (0, 0.5), (2, 2.0)] {
            p.add(0, v, row);
        }
        let part = Pass1Partial::from_acc(p, &(0..0));
        let r = partial::finish(&part, None, FeatureStoreStub::store().n_rows(), 0).unwrap();
        assert_eq!(r.top_row, vec![1, 2, 3]);
        assert_eq!(r.top_value, vec![2.0, 2.0, 2.0]);
        assert_eq!(r.count, vec![6]);
    }

    #[test]
    fn by_feature_runs_keep_rows_ascending() {
        let shard = Shard {
            row_start: 10,
            row_ptr: vec![0, 2, 2, 4],
            feature: vec![1, 3, 0, 1],
            value: vec![1.0, 2.0, 3.0, 4.0],
        };
        let mut by = ByFeature::default();
        by.fill(&shard, 5);
        let mut seen = Vec::new();
        by.for_each(|f, run| seen.push((f, run.to_vec())));
        assert_eq!(seen, vec![(0, vec![(2, 3.0)]), (1, vec![(0, 1.0), (2, 4.0)]), (3, vec![(0, 2.0)])]);
    }

    #[test]
    fn locate_follows_the_edge_rule() {
        let edges = [1.0f32, 2.0, 2.0, 4.0];
        assert_eq!(locate(&edges, 1.0, 0.0), 0);
        assert_eq!(locate(&edges, 2.0, 0.0), 2);
        assert_eq!(locate(&edges, 3.9, 9.0), 2);
        assert_eq!(locate(&edges, 4.0, 1.0), 2);
        assert_eq!(locate(&edges, 1.5, 2.0), 0);
    }

    #[test]
    fn density_histogram_puts_dead_features_first() {
        let h = density_histogram(&[0, 1, 10, 100], 100, 4).unwrap();
        assert_eq!(h.count, vec![1, 1, 0, 1, 1]);
        assert_eq!(h.lo_log10[1], -2.0);
        assert_eq!(h.hi_log10[4], 0.0);
    }

    /// A store is only needed for its row and feature counts in `pass1_result`.
    struct FeatureStoreStub;
    impl FeatureStoreStub {
        fn store() -> FeatureStore {
            let dir = std::env::temp_dir().join(format!("saecore-mining-stub-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            let options = crate::store::WriterOptions {
                d_sae: 1,
                value_dtype: crate::store::ValueDtype::F32,
                shard_rows: 4,
                spec: serde_json::Value::Null,
                threads: 1,
            };
            let mut w = crate::store::ShardWriter::open(&dir, options).unwrap();
            w.finish().unwrap();
            FeatureStore::open(&dir).unwrap()
        }
    }
}
