//! Partial mining results over a range of shards: what a distributed index moves between machines.
//!
//! Mining is a mergeable reduction, and a partial is its state after some shards, made canonical
//! (sorted, truncated) so that it depends only on *which* shards it covers:
//!
//! * [`Pass1Partial`]: per feature the count, exact sum ([`ExactSum`]), min, max and the best `k`
//!   examples (value descending, row ascending).
//! * [`Extrema`]: each feature's min and max from a complete pass 1 — the broadcast pass 2 needs.
//! * [`Pass2Partial`]: histogram counts and, per (feature, sample bin), the `s` smallest sampling
//!   keys with their rows and values.
//!
//! `merge` is exact, associative and commutative (every field is an exact sum, an extremum or a
//! bounded "best n" set under a total order), and refuses partials that cover a shard twice or were
//! made with other parameters; `finish` checks that every shard is covered once and builds the same
//! [`MineResult`] as [`super::mine`], which itself runs through these partials.
//!
//! ## Byte layout (little-endian throughout)
//! ```text
//! magic     8 bytes  "SAEPART\0"
//! version   u32      1
//! kind      u32      1 = pass 1, 2 = pass 2, 3 = extrema
//! d_sae     u32
//! params    kind 1: k u32
//!           kind 2: hist_bins u32, sample_bins u32, samples_per_bin u32, seed u64, extrema_crc u32
//!           kind 3: (none)
//! ranges    u32 n, then n × (first shard u64, end shard u64), sorted, disjoint, coalesced
//! arrays    each: u64 element count, then the elements
//!           kind 1: count u64[d], sum [u64; 6][d] (ExactSum limbs), min f32[d], max f32[d],
//!                   top_len u16[d], top_value f32[], top_row u64[]          (feature-major, best first)
//!           kind 2: hist u64[d·hist_bins], slot_len u16[d·sample_bins],
//!                   key u64[], row u64[], value f32[]                       (slot-major, key ascending)
//!           kind 3: min f32[d], max f32[d]        (a feature that never fired: min = +inf, max = -inf)
//! crc32c    u32      CRC-32C of every byte before it
//! ```
//! Size: about `d × (66 + 12·k)` bytes for pass 1 (k candidates at most) and
//! `d × (8·hist_bins + 2·sample_bins) + 20 × samples` for pass 2 — per-feature state, never per token.

use std::ops::Range;

use super::exact_sum::{ExactSum, LIMBS};
use super::{Drawn, Edges, MineOptions, MineResult, Pass1, Pass2, RankKey};
use crate::error::{Error, Result};

const MAGIC: &[u8; 8] = b"SAEPART\0";
const VERSION: u32 = 1;
const KIND_PASS1: u32 = 1;
const KIND_PASS2: u32 = 2;
const KIND_EXTREMA: u32 = 3;

/// Sorted, disjoint, coalesced shard ranges a partial covers.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Coverage(pub Vec<(u64, u64)>);

impl Coverage {
    /// The single range `shards`.
    pub fn of(shards: &Range<usize>) -> Self {
        Coverage(if shards.is_empty() { Vec::new() } else { vec![(shards.start as u64, shards.end as u64)] })
    }

    /// The union of two coverages; an overlap means a shard would be counted twice.
    fn union(&self, other: &Coverage) -> Result<Coverage> {
        let mut all: Vec<(u64, u64)> = self.0.iter().chain(&other.0).copied().collect();
        all.sort_unstable();
        let mut out: Vec<(u64, u64)> = Vec::with_capacity(all.len());
        for (lo, hi) in all {
            match out.last_mut() {
                Some(last) if lo < last.1 => {
                    return Err(Error::Invalid(format!("partials overlap: shards {lo}..{} are covered twice", hi.min(last.1))));
                }
                Some(last) if lo == last.1 => last.1 = hi,
                _ => out.push((lo, hi)),
            }
        }
        Ok(Coverage(out))
    }

    /// Error unless this covers exactly shards `0..n`.
    fn require_all(&self, n: usize, what: &str) -> Result<()> {
        let whole = n == 0 && self.0.is_empty() || self.0 == [(0, n as u64)];
        if whole {
            return Ok(());
        }
        Err(Error::Invalid(format!("{what} partial covers shards {:?}, not all of 0..{n}", self.0)))
    }
}

/// Pass-1 state over some shards (see the module docs).
#[derive(Clone, Debug, PartialEq)]
pub struct Pass1Partial {
    /// Number of features.
    pub d_sae: u32,
    /// Top examples kept per feature.
    pub k: u32,
    /// Shards covered.
    pub coverage: Coverage,
    /// Nonzero activations per feature.
    pub count: Vec<u64>,
    /// Exact sum per feature.
    pub sum: Vec<ExactSum>,
    /// Smallest activation (`+inf` if none).
    pub min: Vec<f32>,
    /// Largest activation (`-inf` if none).
    pub max: Vec<f32>,
    /// Kept examples per feature.
    pub top_len: Vec<u16>,
    /// Values of the kept examples, feature-major, best first.
    pub top_value: Vec<f32>,
    /// Rows of the kept examples.
    pub top_row: Vec<u64>,
}

/// Each feature's min and max after a complete pass 1: what pass 2 needs to place its bins.
#[derive(Clone, Debug, PartialEq)]
pub struct Extrema {
    /// Smallest activation per feature (`+inf` if it never fired).
    pub min: Vec<f32>,
    /// Largest activation per feature (`-inf` if it never fired).
    pub max: Vec<f32>,
}

/// Pass-2 state over some shards (see the module docs).
#[derive(Clone, Debug, PartialEq)]
pub struct Pass2Partial {
    /// Number of features.
    pub d_sae: u32,
    /// Histogram bins per feature.
    pub hist_bins: u32,
    /// Sample bins per feature.
    pub sample_bins: u32,
    /// Samples kept per bin.
    pub samples_per_bin: u32,
    /// Seed of the sampling hash.
    pub seed: u64,
    /// CRC-32C of the extrema the bins were placed with (partials from other extrema do not merge).
    pub extrema_crc: u32,
    /// Shards covered.
    pub coverage: Coverage,
    /// Histogram counts, `d_sae × hist_bins`.
    pub hist: Vec<u64>,
    /// Samples kept per (feature, bin) slot.
    pub slot_len: Vec<u16>,
    /// Sampling keys, slot-major, (key, row) ascending within a slot.
    pub key: Vec<u64>,
    /// Rows of the samples.
    pub row: Vec<u64>,
    /// Values of the samples.
    pub value: Vec<f32>,
}

// --- building from accumulators --------------------------------------------------------------

impl Pass1Partial {
    pub(super) fn from_acc(mut p: Pass1, shards: &Range<usize>) -> Self {
        p.flush_sums();
        let d = p.d();
        let mut out = Pass1Partial {
            d_sae: d as u32,
            k: p.k as u32,
            coverage: Coverage::of(shards),
            count: (0..d).map(|f| p.count(f)).collect(),
            sum: p.exact_sum.clone(),
            min: (0..d).map(|f| p.min(f)).collect(),
            max: (0..d).map(|f| p.max(f)).collect(),
            top_len: Vec::with_capacity(d),
            top_value: Vec::new(),
            top_row: Vec::new(),
        };
        for f in 0..d {
            let best = p.best(f);
            out.top_len.push(best.len() as u16);
            out.top_value.extend(best.iter().map(|e| e.value));
            out.top_row.extend(best.iter().map(|e| e.row));
        }
        out
    }

    /// The extrema pass 2 needs; errors unless this covers all `num_shards` shards.
    pub fn extrema(&self, num_shards: usize) -> Result<Extrema> {
        self.coverage.require_all(num_shards, "pass-1")?;
        Ok(Extrema { min: self.min.clone(), max: self.max.clone() })
    }

    /// Merge `other` into `self` (exact; any order or grouping gives the same partial).
    pub fn merge(&mut self, other: &Pass1Partial) -> Result<()> {
        if (self.d_sae, self.k) != (other.d_sae, other.k) {
            return Err(Error::Invalid(format!(
                "pass-1 partials differ: d_sae {} vs {}, k {} vs {}",
                self.d_sae, other.d_sae, self.k, other.k
            )));
        }
        self.coverage = self.coverage.union(&other.coverage)?;
        let k = self.k as usize;
        let (mut value, mut row, mut len) = (Vec::new(), Vec::new(), Vec::with_capacity(self.top_len.len()));
        let (mut a0, mut b0) = (0usize, 0usize);
        for f in 0..self.d_sae as usize {
            self.count[f] += other.count[f];
            self.sum[f].merge(&other.sum[f]);
            self.min[f] = self.min[f].min(other.min[f]);
            self.max[f] = self.max[f].max(other.max[f]);
            let (na, nb) = (self.top_len[f] as usize, other.top_len[f] as usize);
            let a = (a0..a0 + na).map(|i| RankKey::new(self.top_value[i], self.top_row[i]));
            let b = (b0..b0 + nb).map(|i| RankKey::new(other.top_value[i], other.top_row[i]));
            let mut keys: Vec<RankKey> = a.chain(b).collect();
            keys.sort_unstable_by(|x, y| y.cmp(x));
            keys.truncate(k);
            len.push(keys.len() as u16);
            for key in keys {
                let e = key.example();
                value.push(e.value);
                row.push(e.row);
            }
            (a0, b0) = (a0 + na, b0 + nb);
        }
        (self.top_value, self.top_row, self.top_len) = (value, row, len);
        Ok(())
    }
}

impl Pass2Partial {
    pub(super) fn from_acc(p: &Pass2<'_>, shards: &Range<usize>, options: &MineOptions, extrema_crc: u32) -> Self {
        let mut out = Pass2Partial {
            d_sae: p.seed_mix.len() as u32,
            hist_bins: options.hist_bins as u32,
            sample_bins: options.sample_bins as u32,
            samples_per_bin: options.samples_per_bin as u32,
            seed: options.seed,
            extrema_crc,
            coverage: Coverage::of(shards),
            hist: p.hist.clone(),
            slot_len: Vec::with_capacity(p.slot_len.len()),
            key: Vec::new(),
            row: Vec::new(),
            value: Vec::new(),
        };
        for slot in 0..p.slot_len.len() {
            let mut drawn = p.slots[slot * p.s..slot * p.s + p.slot_len[slot] as usize].to_vec();
            drawn.sort_unstable_by_key(|d| (d.key, d.row));
            out.push_slot(&drawn);
        }
        out
    }

    fn push_slot(&mut self, drawn: &[Drawn]) {
        self.slot_len.push(drawn.len() as u16);
        self.key.extend(drawn.iter().map(|d| d.key));
        self.row.extend(drawn.iter().map(|d| d.row));
        self.value.extend(drawn.iter().map(|d| d.value));
    }

    /// Merge `other` into `self` (exact; any order or grouping gives the same partial).
    pub fn merge(&mut self, other: &Pass2Partial) -> Result<()> {
        let params = |p: &Pass2Partial| (p.d_sae, p.hist_bins, p.sample_bins, p.samples_per_bin, p.seed, p.extrema_crc);
        if params(self) != params(other) {
            return Err(Error::Invalid(format!(
                "pass-2 partials differ (d_sae, hist_bins, sample_bins, samples_per_bin, seed, extrema crc): {:?} vs {:?}",
                params(self),
                params(other)
            )));
        }
        let coverage = self.coverage.union(&other.coverage)?;
        let mut hist = std::mem::take(&mut self.hist);
        hist.iter_mut().zip(&other.hist).for_each(|(a, b)| *a += b);
        let mine = std::mem::replace(self, Pass2Partial { coverage, hist, ..other.empty_like() });
        let s = self.samples_per_bin as usize;
        let (mut a0, mut b0) = (0usize, 0usize);
        for slot in 0..mine.slot_len.len() {
            let (na, nb) = (mine.slot_len[slot] as usize, other.slot_len[slot] as usize);
            let a = (a0..a0 + na).map(|i| Drawn { key: mine.key[i], row: mine.row[i], value: mine.value[i] });
            let b = (b0..b0 + nb).map(|i| Drawn { key: other.key[i], row: other.row[i], value: other.value[i] });
            let mut drawn: Vec<Drawn> = a.chain(b).collect();
            drawn.sort_unstable_by_key(|d| (d.key, d.row));
            drawn.truncate(s);
            self.push_slot(&drawn);
            (a0, b0) = (a0 + na, b0 + nb);
        }
        Ok(())
    }

    fn empty_like(&self) -> Pass2Partial {
        Pass2Partial {
            coverage: Coverage::default(),
            hist: Vec::new(),
            slot_len: Vec::new(),
            key: Vec::new(),
            row: Vec::new(),
            value: Vec::new(),
            ..*self
        }
    }
}

impl Extrema {
    /// CRC-32C of the encoded extrema: pass-2 partials record it so that only partials binned
    /// with the same extrema merge.
    pub fn crc(&self) -> u32 {
        let bytes = self.to_bytes();
        u32::from_le_bytes(bytes[bytes.len() - 4..].try_into().expect("4 bytes"))
    }

    pub(super) fn fired(&self, f: usize) -> bool {
        self.min[f] <= self.max[f]
    }
}

// --- finishing --------------------------------------------------------------------------------

/// Turn complete partials into the mining result; `n_rows` and `num_shards` come from the store.
pub fn finish(
    p1: &Pass1Partial,
    p2: Option<&Pass2Partial>,
    n_rows: u64,
    num_shards: usize,
) -> Result<MineResult> {
    let extrema = p1.extrema(num_shards)?;
    let d = p1.d_sae as usize;
    let fired = |f: usize, x: f32| if p1.count[f] > 0 { x } else { 0.0 };
    let mut r = MineResult {
        n_rows,
        d_sae: p1.d_sae,
        count: p1.count.clone(),
        sum: p1.sum.iter().map(ExactSum::to_f64).collect(),
        max: (0..d).map(|f| fired(f, p1.max[f])).collect(),
        min: (0..d).map(|f| fired(f, p1.min[f])).collect(),
        ..Default::default()
    };
    let mut i = 0;
    for f in 0..d {
        for rank in 0..p1.top_len[f] {
            r.top_feature.push(f as u32);
            r.top_rank.push(rank);
            r.top_row.push(p1.top_row[i]);
            r.top_value.push(p1.top_value[i]);
            i += 1;
        }
    }
    let Some(p2) = p2 else { return Ok(r) };
    p2.coverage.require_all(num_shards, "pass-2")?;
    if p2.d_sae != p1.d_sae || p2.extrema_crc != extrema.crc() {
        return Err(Error::Invalid("the pass-2 partial was not binned with this pass-1 partial's extrema".into()));
    }
    let edges = Edges::new(&extrema, p2.hist_bins as usize, p2.sample_bins as usize)?;
    r.hist_edges.clone_from(&edges.hist);
    r.sample_edges.clone_from(&edges.sample);
    r.hist_counts.clone_from(&p2.hist);
    let sb = p2.sample_bins as usize;
    let mut i = 0;
    for slot in 0..p2.slot_len.len() {
        let n = p2.slot_len[slot] as usize;
        let mut drawn: Vec<(f32, u64)> = (i..i + n).map(|j| (p2.value[j], p2.row[j])).collect();
        drawn.sort_by(|x, y| y.0.total_cmp(&x.0).then(x.1.cmp(&y.1)));
        for (value, row) in drawn {
            r.sample_feature.push((slot / sb) as u32);
            r.sample_bin.push((slot % sb) as u16);
            r.sample_row.push(row);
            r.sample_value.push(value);
        }
        i += n;
    }
    Ok(r)
}

// --- bytes --------------------------------------------------------------------------------------

struct Enc(Vec<u8>);

impl Enc {
    fn new(kind: u32, d_sae: u32) -> Self {
        let mut e = Enc(MAGIC.to_vec());
        e.u32(VERSION);
        e.u32(kind);
        e.u32(d_sae);
        e
    }
    fn u32(&mut self, x: u32) {
        self.0.extend_from_slice(&x.to_le_bytes());
    }
    fn u64(&mut self, x: u64) {
        self.0.extend_from_slice(&x.to_le_bytes());
    }
    fn coverage(&mut self, c: &Coverage) {
        self.u32(c.0.len() as u32);
        c.0.iter().for_each(|&(lo, hi)| {
            self.u64(lo);
            self.u64(hi);
        });
    }
    fn array<T: Copy, const N: usize>(&mut self, xs: &[T], le: impl Fn(T) -> [u8; N]) {
        self.u64(xs.len() as u64);
        self.0.reserve(xs.len() * N);
        xs.iter().for_each(|&x| self.0.extend_from_slice(&le(x)));
    }
    fn finish(mut self) -> Vec<u8> {
        let crc = crc32c::crc32c(&self.0);
        self.u32(crc);
        self.0
    }
}

struct Dec<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Dec<'a> {
    /// Check the magic, version, checksum and kind; returns the decoder and `d_sae`.
    fn open(bytes: &'a [u8], kind: u32) -> Result<(Self, u32)> {
        let body_len = bytes.len().checked_sub(4).filter(|&n| n >= 20 && &bytes[..8] == MAGIC);
        let Some(body_len) = body_len else {
            return Err(Error::Corrupt(format!("partial: not a saecore partial ({} bytes, bad magic or truncated)", bytes.len())));
        };
        let stored = u32::from_le_bytes(bytes[body_len..].try_into().expect("4 bytes"));
        let computed = crc32c::crc32c(&bytes[..body_len]);
        if stored != computed {
            return Err(Error::Corrupt(format!("partial: checksum mismatch (stored {stored:#010x}, computed {computed:#010x})")));
        }
        let mut d = Dec { bytes: &bytes[..body_len], pos: 8 };
        let (version, got_kind, d_sae) = (d.u32()?, d.u32()?, d.u32()?);
        if version != VERSION || got_kind != kind {
            return Err(Error::Invalid(format!("partial: version {version} kind {got_kind}, expected version {VERSION} kind {kind}")));
        }
        Ok((d, d_sae))
    }
    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.bytes.len());
        let Some(end) = end else { return Err(Error::Corrupt("partial: truncated".into())) };
        let out = &self.bytes[self.pos..end];
        self.pos = end;
        Ok(out)
    }
    fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().expect("4 bytes")))
    }
    fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().expect("8 bytes")))
    }
    fn coverage(&mut self) -> Result<Coverage> {
        let n = self.u32()? as usize;
        (0..n).map(|_| Ok((self.u64()?, self.u64()?))).collect::<Result<_>>().map(Coverage)
    }
    fn array<T, const N: usize>(&mut self, expect: Option<usize>, from: impl Fn([u8; N]) -> T) -> Result<Vec<T>> {
        let n = usize::try_from(self.u64()?).map_err(|_| Error::Corrupt("partial: array too long".into()))?;
        if expect.is_some_and(|e| e != n) {
            return Err(Error::Corrupt(format!("partial: array of {n} elements, expected {}", expect.unwrap_or(0))));
        }
        let raw = self.take(n.checked_mul(N).ok_or_else(|| Error::Corrupt("partial: array too long".into()))?)?;
        Ok(raw.chunks_exact(N).map(|c| from(c.try_into().expect("N bytes"))).collect())
    }
    fn end(&self) -> Result<()> {
        if self.pos == self.bytes.len() {
            Ok(())
        } else {
            Err(Error::Corrupt(format!("partial: {} trailing bytes", self.bytes.len() - self.pos)))
        }
    }
}

fn sum_from(b: [u8; 8 * LIMBS]) -> ExactSum {
    ExactSum::from_le_bytes(&b)
}

impl Pass1Partial {
    /// Encode (layout in the module docs).
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut e = Enc::new(KIND_PASS1, self.d_sae);
        e.u32(self.k);
        e.coverage(&self.coverage);
        e.array(&self.count, u64::to_le_bytes);
        e.array(&self.sum, |s| s.to_le_bytes());
        e.array(&self.min, f32::to_le_bytes);
        e.array(&self.max, f32::to_le_bytes);
        e.array(&self.top_len, u16::to_le_bytes);
        e.array(&self.top_value, f32::to_le_bytes);
        e.array(&self.top_row, u64::to_le_bytes);
        e.finish()
    }

    /// Decode and check; a failed checksum or a bad length is [`Error::Corrupt`].
    pub fn from_bytes(bytes: &[u8]) -> Result<Self> {
        let (mut dec, d_sae) = Dec::open(bytes, KIND_PASS1)?;
        let d = Some(d_sae as usize);
        let k = dec.u32()?;
        let coverage = dec.coverage()?;
        let count = dec.array(d, u64::from_le_bytes)?;
        let sum = dec.array(d, sum_from)?;
        let min = dec.array(d, f32::from_le_bytes)?;
        let max = dec.array(d, f32::from_le_bytes)?;
        let top_len: Vec<u16> = dec.array(d, u16::from_le_bytes)?;
        let n_top = top_len.iter().map(|&n| n as usize).sum();
        if top_len.iter().any(|&n| u32::from(n) > k) {
            return Err(Error::Corrupt(format!("partial: a feature keeps more than k = {k} examples")));
        }
        let top_value = dec.array(Some(n_top), f32::from_le_bytes)?;
        let top_row = dec.array(Some(n_top), u64::from_le_bytes)?;
        dec.end()?;
        Ok(Pass1Partial { d_sae, k, coverage, count, sum, min, max, top_len, top_value, top_row })
    }
}

impl Pass2Partial {
    /// Encode (layout in the module docs).
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut e = Enc::new(KIND_PASS2, self.d_sae);
        e.u32(self.hist_bins);
        e.u32(self.sample_bins);
        e.u32(self.samples_per_bin);
        e.u64(self.seed);
        e.u32(self.extrema_crc);
        e.coverage(&self.coverage);
        e.array(&self.hist, u64::to_le_bytes);
        e.array(&self.slot_len, u16::to_le_bytes);
        e.array(&self.key, u64::to_le_bytes);
        e.array(&self.row, u64::to_le_bytes);
        e.array(&self.value, f32::to_le_bytes);
        e.finish()
    }

    /// Decode and check; a failed checksum or a bad length is [`Error::Corrupt`].
    pub fn from_bytes(bytes: &[u8]) -> Result<Self> {
        let (mut dec, d_sae) = Dec::open(bytes, KIND_PASS2)?;
        let (hist_bins, sample_bins, samples_per_bin) = (dec.u32()?, dec.u32()?, dec.u32()?);
        let (seed, extrema_crc) = (dec.u64()?, dec.u32()?);
        let coverage = dec.coverage()?;
        let d = d_sae as usize;
        let hist = dec.array(Some(d * hist_bins as usize), u64::from_le_bytes)?;
        let slot_len: Vec<u16> = dec.array(Some(d * sample_bins as usize), u16::from_le_bytes)?;
        if slot_len.iter().any(|&n| u32::from(n) > samples_per_bin) {
            return Err(Error::Corrupt(format!("partial: a slot keeps more than {samples_per_bin} samples")));
        }
        let n = Some(slot_len.iter().map(|&n| n as usize).sum());
        let key = dec.array(n, u64::from_le_bytes)?;
        let row = dec.array(n, u64::from_le_bytes)?;
        let value = dec.array(n, f32::from_le_bytes)?;
        dec.end()?;
        let p = Pass2Partial { d_sae, hist_bins, sample_bins, samples_per_bin, seed, extrema_crc, coverage, hist, slot_len, key, row, value };
        Ok(p)
    }
}

impl Extrema {
    /// Encode (layout in the module docs).
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut e = Enc::new(KIND_EXTREMA, self.min.len() as u32);
        e.coverage(&Coverage::default());
        e.array(&self.min, f32::to_le_bytes);
        e.array(&self.max, f32::to_le_bytes);
        e.finish()
    }

    /// Decode and check; a failed checksum or a bad length is [`Error::Corrupt`].
    pub fn from_bytes(bytes: &[u8]) -> Result<Self> {
        let (mut dec, d_sae) = Dec::open(bytes, KIND_EXTREMA)?;
        let d = Some(d_sae as usize);
        dec.coverage()?;
        let min = dec.array(d, f32::from_le_bytes)?;
        let max = dec.array(d, f32::from_le_bytes)?;
        dec.end()?;
        Ok(Extrema { min, max })
    }
}
