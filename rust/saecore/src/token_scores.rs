//! Model-free scores of every feature: how much of its activation the current token (or the
//! previous and current token) explains, measured on held-out documents.
//!
//! **Token simulator.** For a feature `f` and a key `k` (the row's token, or its (previous token,
//! token) pair), the simulator predicts `m[f,k]`: the mean activation of `f` over the *training*
//! rows whose key is `k`, counting rows where `f` does not fire as 0. A held-out row whose key never
//! occurs in training is predicted by the feature's mean over all training rows. The score is the
//! Pearson correlation of prediction and actual activation over **all** held-out rows, zeros
//! included (NaN when either side is constant, e.g. a feature that never fires on held-out rows).
//!
//! **Split.** Whole documents are held out, so a document's tokens never straddle the split: row
//! `r` is held out iff `(mix64(seed ^ doc_id[r]) >> 11) · 2⁻⁵³ < held_out_fraction`
//! ([`is_held_out`]; `doc_id` read as the bits of a `u64`).
//!
//! **Previous token.** Row `r` has a previous token iff `r > 0`, `doc_id[r-1] == doc_id[r]` and
//! `position[r-1] + 1 == position[r]` — the row before it is the token the model saw just before
//! (rows dropped at harvest, e.g. BOS, and context boundaries break the chain). Otherwise its pair
//! key is `(NO_PREVIOUS, token)`: a key of its own, so document and context starts are predicted
//! from other starts with the same token.
//!
//! **Streaming.** One pass over the store's shards, folded by rayon workers into per-thread
//! accumulators that merge exactly (like [`crate::mining`]). The correlation needs, per feature,
//! `Σp, Σp², Σa, Σa², Σpa` over held-out rows. `Σa, Σa²` come from the held-out nonzeros; the
//! prediction is constant within a key, so with `n_held[k]` held-out rows of key `k` and `A[f,k]`
//! the held-out activation sum of `f` on them,
//! `Σp = Σ_k n_held[k]·m[f,k]`, `Σp² = Σ_k n_held[k]·m[f,k]²`, `Σpa = Σ_k A[f,k]·m[f,k]`.
//! Only keys where `f` fired in training have `m ≠ 0`, and unseen keys add `n_unseen·μ_f` terms, so
//! zero rows are counted analytically and no (row, feature) pair is ever visited unless it fired.
//!
//! **Memory.** Sparse tables only: one hash-map entry per (feature, key) pair that occurs (32-byte
//! key and sums, about 40–75 bytes with the map's slack), per key kind, so per worker at most
//! `≈ 2 × 75 B × (distinct pairs in the shards it read)`, and after the merge about
//! `2 × 75 B × distinct (feature, key) pairs` (≤ the store's nonzeros); plus per-key row counts,
//! `d_sae × 40 B` per worker, one decoded shard per worker, and the caller's key arrays
//! (16 bytes per row). Nothing is proportional to `rows × d_sae`.

use std::sync::atomic::AtomicU64;

use rustc_hash::FxHashMap;

use crate::error::{Error, Result};
use crate::mining::{fold_shards, mix64};
use crate::parallel;
use crate::store::{FeatureStore, Shard};

/// The previous-token id of a row that has none (first row of a document or a context).
pub const NO_PREVIOUS: u32 = u32::MAX;

/// How the split is drawn.
#[derive(Clone, Copy, Debug)]
pub struct TokenScoreOptions {
    /// Fraction of documents held out (strictly between 0 and 1).
    pub held_out_fraction: f64,
    /// Seed of the document hash.
    pub seed: u64,
}

impl Default for TokenScoreOptions {
    fn default() -> Self {
        TokenScoreOptions { held_out_fraction: 0.5, seed: 0 }
    }
}

/// Per-row keys from the activation store, row-aligned with the feature store.
#[derive(Clone, Copy, Debug)]
pub struct RowKeys<'a> {
    /// Token id of each row (non-negative).
    pub token_ids: &'a [i32],
    /// Document id of each row.
    pub doc_ids: &'a [i64],
    /// Position of each row within its context.
    pub positions: &'a [i32],
}

/// The scores; per-feature vectors are indexed by feature id.
#[derive(Clone, Debug, Default)]
pub struct TokenScores {
    /// Rows in the store.
    pub n_rows: u64,
    /// Rows of training documents.
    pub n_train_rows: u64,
    /// Rows of held-out documents (every one of them enters the correlation).
    pub n_held_rows: u64,
    /// Distinct token ids over all rows.
    pub n_tokens: u64,
    /// Distinct (previous token, token) keys over all rows.
    pub n_pairs: u64,
    /// Held-out rows whose token never occurs in training (predicted by the feature's mean).
    pub held_rows_unseen_token: u64,
    /// Held-out rows whose pair never occurs in training.
    pub held_rows_unseen_pair: u64,
    /// Token-simulator correlation per feature (NaN where undefined).
    pub token_corr: Vec<f64>,
    /// (previous token, token)-simulator correlation per feature.
    pub pair_corr: Vec<f64>,
    /// Nonzero activations in training rows.
    pub fires_train: Vec<u64>,
    /// Nonzero activations in held-out rows.
    pub fires_held: Vec<u64>,
    /// Distinct tokens the feature fires on (all rows).
    pub distinct_tokens: Vec<u64>,
    /// Distinct (previous token, token) keys the feature fires on (all rows).
    pub distinct_pairs: Vec<u64>,
}

/// Whether a document is held out (see the module docs for the rule).
pub fn is_held_out(doc_id: i64, seed: u64, held_out_fraction: f64) -> bool {
    let u = (mix64(seed ^ doc_id as u64) >> 11) as f64 * (1.0 / (1u64 << 53) as f64);
    u < held_out_fraction
}

/// Previous token of row `r` under the module's rule, or [`NO_PREVIOUS`].
pub fn previous_token(keys: &RowKeys<'_>, r: usize) -> u32 {
    if r > 0 && keys.doc_ids[r - 1] == keys.doc_ids[r] && keys.positions[r - 1].checked_add(1) == Some(keys.positions[r]) {
        keys.token_ids[r - 1] as u32
    } else {
        NO_PREVIOUS
    }
}

/// Pearson correlation from streamed sums over `n` rows; NaN when either side is constant.
pub fn pearson(n: f64, sx: f64, sy: f64, sxx: f64, syy: f64, sxy: f64) -> f64 {
    let vx = sxx - sx * sx / n;
    let vy = syy - sy * sy / n;
    // Relative guard: a constant side leaves only rounding error in the centred sum of squares.
    if n < 2.0 || vx <= 1e-12 * sxx || vy <= 1e-12 * syy {
        return f64::NAN;
    }
    ((sxy - sx * sy / n) / (vx * vy).sqrt()).clamp(-1.0, 1.0)
}

/// Activation sums of one (feature, key) pair, split by side.
#[derive(Clone, Copy, Debug, Default)]
struct Sums {
    train: f64,
    held: f64,
}

/// Rows of one key, split by side.
#[derive(Clone, Copy, Debug, Default)]
struct KeyRows {
    train: u64,
    held: u64,
}

/// Per-feature totals.
#[derive(Clone, Copy, Debug, Default)]
struct FeatureTotals {
    train_sum: f64,
    held_sum: f64,
    held_sq: f64,
    fires_train: u64,
    fires_held: u64,
}

/// One worker's share of the reduction (merges exactly with another's).
struct Acc {
    /// `(feature << 32 | token)` → sums.
    tok: FxHashMap<u64, Sums>,
    /// `(feature << 64 | previous << 32 | token)` → sums.
    pair: FxHashMap<u128, Sums>,
    tok_rows: FxHashMap<u32, KeyRows>,
    pair_rows: FxHashMap<u64, KeyRows>,
    feat: Vec<FeatureTotals>,
}

fn pair_key(prev: u32, tok: u32) -> u64 {
    (u64::from(prev) << 32) | u64::from(tok)
}

impl Acc {
    fn new(d: usize) -> Self {
        Acc {
            tok: FxHashMap::default(),
            pair: FxHashMap::default(),
            tok_rows: FxHashMap::default(),
            pair_rows: FxHashMap::default(),
            feat: vec![FeatureTotals::default(); d],
        }
    }

    fn add_shard(&mut self, shard: &Shard, keys: &RowKeys<'_>, o: &TokenScoreOptions) {
        for i in 0..shard.rows() {
            let r = shard.row_start as usize + i;
            let tok = keys.token_ids[r] as u32;
            let pk = pair_key(previous_token(keys, r), tok);
            let held = is_held_out(keys.doc_ids[r], o.seed, o.held_out_fraction);
            let side = |k: &mut KeyRows| if held { k.held += 1 } else { k.train += 1 };
            side(self.tok_rows.entry(tok).or_default());
            side(self.pair_rows.entry(pk).or_default());
            let (lo, hi) = (shard.row_ptr[i] as usize, shard.row_ptr[i + 1] as usize);
            for (&f, &v) in shard.feature[lo..hi].iter().zip(&shard.value[lo..hi]) {
                let v = f64::from(v);
                let t = &mut self.feat[f as usize];
                let s_tok = self.tok.entry((u64::from(f) << 32) | u64::from(tok)).or_default();
                let s_pair = self.pair.entry((u128::from(f) << 64) | u128::from(pk)).or_default();
                if held {
                    (t.held_sum, t.held_sq, t.fires_held) = (t.held_sum + v, t.held_sq + v * v, t.fires_held + 1);
                    s_tok.held += v;
                    s_pair.held += v;
                } else {
                    (t.train_sum, t.fires_train) = (t.train_sum + v, t.fires_train + 1);
                    s_tok.train += v;
                    s_pair.train += v;
                }
            }
        }
    }

    fn merge(&mut self, other: Acc) {
        merge_map(&mut self.tok, other.tok, |a, b| (a.train, a.held) = (a.train + b.train, a.held + b.held));
        merge_map(&mut self.pair, other.pair, |a, b| (a.train, a.held) = (a.train + b.train, a.held + b.held));
        merge_map(&mut self.tok_rows, other.tok_rows, |a, b| (a.train, a.held) = (a.train + b.train, a.held + b.held));
        merge_map(&mut self.pair_rows, other.pair_rows, |a, b| (a.train, a.held) = (a.train + b.train, a.held + b.held));
        for (a, b) in self.feat.iter_mut().zip(other.feat) {
            a.train_sum += b.train_sum;
            a.held_sum += b.held_sum;
            a.held_sq += b.held_sq;
            a.fires_train += b.fires_train;
            a.fires_held += b.fires_held;
        }
    }
}

/// Fold the smaller map into the larger (entries are summed).
fn merge_map<K: std::hash::Hash + Eq, V: Copy + Default>(
    into: &mut FxHashMap<K, V>,
    mut other: FxHashMap<K, V>,
    add: impl Fn(&mut V, &V),
) {
    if other.len() > into.len() {
        std::mem::swap(into, &mut other);
    }
    for (k, v) in other {
        add(into.entry(k).or_default(), &v);
    }
}

/// Per-feature `Σp, Σp², Σpa` of one simulator, summed over its (feature, key) entries.
struct Simulated {
    sp: Vec<f64>,
    spp: Vec<f64>,
    spa: Vec<f64>,
    distinct: Vec<u64>,
}

/// Walk one key kind's entries (`split` maps an entry key to (feature, row key)) into the sums.
fn simulate<K: Copy, R: std::hash::Hash + Eq>(
    entries: &FxHashMap<K, Sums>,
    rows: &FxHashMap<R, KeyRows>,
    fallback: &[f64],
    split: impl Fn(K) -> (usize, R),
) -> Simulated {
    let d = fallback.len();
    let mut s = Simulated { sp: vec![0.0; d], spp: vec![0.0; d], spa: vec![0.0; d], distinct: vec![0; d] };
    for (&key, sums) in entries {
        let (f, k) = split(key);
        let kr = rows[&k];
        s.distinct[f] += 1;
        let m = if kr.train > 0 { sums.train / kr.train as f64 } else { fallback[f] };
        s.spa[f] += sums.held * m;
        // Unseen keys' held-out rows are added for every feature at once in `finish`.
        if kr.train > 0 {
            s.sp[f] += kr.held as f64 * m;
            s.spp[f] += kr.held as f64 * m * m;
        }
    }
    s
}

/// Held-out rows of keys that never occur in training.
fn unseen_held<R>(rows: &FxHashMap<R, KeyRows>) -> u64 {
    rows.values().filter(|k| k.train == 0).map(|k| k.held).sum()
}

fn correlations(s: &Simulated, feat: &[FeatureTotals], fallback: &[f64], unseen: u64, n_held: u64) -> Vec<f64> {
    let (n, u) = (n_held as f64, unseen as f64);
    (0..feat.len())
        .map(|f| {
            let mu = fallback[f];
            let (sp, spp) = (s.sp[f] + u * mu, s.spp[f] + u * mu * mu);
            pearson(n, sp, feat[f].held_sum, spp, feat[f].held_sq, s.spa[f])
        })
        .collect()
}

fn finish(acc: &Acc, n_rows: u64) -> Result<TokenScores> {
    let n_train: u64 = acc.tok_rows.values().map(|k| k.train).sum();
    let n_held: u64 = acc.tok_rows.values().map(|k| k.held).sum();
    if n_train == 0 || n_held < 2 {
        return Err(Error::Invalid(format!(
            "token scores need training rows and at least 2 held-out rows; the split gave {n_train} training and {n_held} held-out rows (too few documents for held_out_fraction?)"
        )));
    }
    let fallback: Vec<f64> = acc.feat.iter().map(|t| t.train_sum / n_train as f64).collect();
    let tok = simulate(&acc.tok, &acc.tok_rows, &fallback, |k: u64| ((k >> 32) as usize, k as u32));
    let pair = simulate(&acc.pair, &acc.pair_rows, &fallback, |k: u128| ((k >> 64) as usize, k as u64));
    let (unseen_tok, unseen_pair) = (unseen_held(&acc.tok_rows), unseen_held(&acc.pair_rows));
    Ok(TokenScores {
        n_rows,
        n_train_rows: n_train,
        n_held_rows: n_held,
        n_tokens: acc.tok_rows.len() as u64,
        n_pairs: acc.pair_rows.len() as u64,
        held_rows_unseen_token: unseen_tok,
        held_rows_unseen_pair: unseen_pair,
        token_corr: correlations(&tok, &acc.feat, &fallback, unseen_tok, n_held),
        pair_corr: correlations(&pair, &acc.feat, &fallback, unseen_pair, n_held),
        fires_train: acc.feat.iter().map(|t| t.fires_train).collect(),
        fires_held: acc.feat.iter().map(|t| t.fires_held).collect(),
        distinct_tokens: tok.distinct,
        distinct_pairs: pair.distinct,
    })
}

fn check_inputs(store: &FeatureStore, keys: &RowKeys<'_>, o: &TokenScoreOptions) -> Result<()> {
    store.require_complete()?;
    let n = store.n_rows();
    for (name, len) in [("token_ids", keys.token_ids.len()), ("doc_ids", keys.doc_ids.len()), ("positions", keys.positions.len())] {
        if len as u64 != n {
            return Err(Error::Invalid(format!("{name} has {len} rows but the feature store {} has {n}", store.path().display())));
        }
    }
    if let Some(r) = keys.token_ids.iter().position(|&t| t < 0) {
        return Err(Error::Invalid(format!("token_ids[{r}] = {} is negative", keys.token_ids[r])));
    }
    if !(o.held_out_fraction > 0.0 && o.held_out_fraction < 1.0) {
        return Err(Error::Invalid(format!("held_out_fraction must be strictly between 0 and 1, got {}", o.held_out_fraction)));
    }
    Ok(())
}

/// Score every feature of the complete store (see the module docs). `progress` counts shards read.
pub fn token_scores(store: &FeatureStore, keys: &RowKeys<'_>, options: &TokenScoreOptions, progress: &AtomicU64) -> Result<TokenScores> {
    check_inputs(store, keys, options)?;
    let d = store.d_sae() as usize;
    let acc = parallel::install(|| {
        let all = 0..store.num_shards();
        fold_shards(store, all, true, progress, || Ok(Acc::new(d)), |a, s| a.add_shard(s, keys, options), Acc::merge)
    })?;
    finish(&acc, store.n_rows())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pearson_matches_the_centred_formula() {
        let (x, y) = ([1.0, 2.0, 0.0, 4.0], [0.5, 2.5, 0.0, 3.0]);
        let n = 4.0;
        let (mx, my) = (x.iter().sum::<f64>() / n, y.iter().sum::<f64>() / n);
        let cov: f64 = x.iter().zip(&y).map(|(a, b)| (a - mx) * (b - my)).sum();
        let vx: f64 = x.iter().map(|a| (a - mx) * (a - mx)).sum();
        let vy: f64 = y.iter().map(|b| (b - my) * (b - my)).sum();
        let sum = |v: &[f64]| v.iter().sum::<f64>();
        let dot = |a: &[f64], b: &[f64]| a.iter().zip(b).map(|(p, q)| p * q).sum::<f64>();
        let r = pearson(n, sum(&x), sum(&y), dot(&x, &x), dot(&y, &y), dot(&x, &y));
        assert!((r - cov / (vx * vy).sqrt()).abs() < 1e-12);
        assert!(pearson(n, 8.0, sum(&y), 16.0, dot(&y, &y), 2.0 * sum(&y)).is_nan(), "constant x has no correlation");
    }

    #[test]
    fn previous_token_needs_same_document_and_adjacent_position() {
        let keys = RowKeys { token_ids: &[5, 6, 7, 8, 9], doc_ids: &[0, 0, 0, 1, 1], positions: &[1, 2, 4, 5, 6] };
        let prev: Vec<u32> = (0..5).map(|r| previous_token(&keys, r)).collect();
        assert_eq!(prev, vec![NO_PREVIOUS, 5, NO_PREVIOUS, NO_PREVIOUS, 8]);
    }

    #[test]
    fn split_is_by_document_and_near_the_fraction() {
        let held = (0..10_000i64).filter(|&d| is_held_out(d, 7, 0.3)).count();
        assert!((2_800..3_200).contains(&held), "{held} of 10000 documents held out at fraction 0.3");
        assert_eq!(is_held_out(42, 7, 0.3), is_held_out(42, 7, 0.3));
    }
}
