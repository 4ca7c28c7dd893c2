//! Cosine neighbours of decoder vectors: blocked products with bounded per-row heaps.
//!
//! Rows are normalised to unit length once (float16 input is widened to float32 here), then the
//! cosine matrix is produced one square tile at a time by a single-threaded GEMM per tile, with the
//! tiles spread over saecore's thread pool. Each tile is scanned straight into a bounded top-k list
//! per row (or into a pair list, in threshold mode) and dropped, so memory is
//! `O((n_a + n_b)·d + n·k + threads·tile²)` — never an `n × n` matrix.
//!
//! Within one matrix (A-vs-A) the cosine matrix is symmetric, so only tiles on or above the diagonal
//! are multiplied and each off-diagonal tile feeds both its rows' and its columns' lists: half the
//! arithmetic of a plain blocked product.
//!
//! Defined behaviour:
//! - a zero row has cosine 0 with every row (it is left at zero by the normalisation), so it can
//!   still appear as a neighbour (after every positive cosine) and its own list holds cosines 0;
//! - a NaN or infinite element is an error naming the matrix and the row;
//! - A and B with different widths is an error naming both;
//! - `k` must lie in `1..=n_b` (A-vs-B) or `1..=n-1` (A-vs-A, the row itself is excluded); anything
//!   else is an error rather than a silent clamp, so a caller never gets fewer columns than asked;
//! - ties in cosine are broken by the smaller neighbour index, so results do not depend on the
//!   number of threads or on the order in which tiles finish.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;

use half::f16;
use rayon::prelude::*;

use crate::error::{Error, Result};

/// The element data of a row-major matrix, in one of the accepted dtypes.
#[derive(Clone, Copy, Debug)]
pub enum Elements<'a> {
    /// 32-bit floats.
    F32(&'a [f32]),
    /// 16-bit floats (widened to f32 when rows are normalised).
    F16(&'a [f16]),
}

/// A borrowed row-major `rows × cols` matrix with a name used in error messages.
#[derive(Clone, Copy, Debug)]
pub struct MatrixRef<'a> {
    name: &'a str,
    elements: Elements<'a>,
    rows: usize,
    cols: usize,
}

impl<'a> MatrixRef<'a> {
    /// Wrap `elements` as a `rows × cols` matrix; errors when the length does not match the shape.
    pub fn new(name: &'a str, elements: Elements<'a>, rows: usize, cols: usize) -> Result<Self> {
        let len = match elements {
            Elements::F32(s) => s.len(),
            Elements::F16(s) => s.len(),
        };
        if rows.checked_mul(cols) != Some(len) {
            return Err(Error::Invalid(format!(
                "matrix {name}: {len} elements do not make a {rows} x {cols} matrix"
            )));
        }
        if cols == 0 {
            return Err(Error::Invalid(format!("matrix {name}: rows have zero width")));
        }
        Ok(Self { name, elements, rows, cols })
    }

    /// Number of rows.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Number of columns (the vector width d).
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// The name used in error messages.
    pub fn name(&self) -> &str {
        self.name
    }
}

/// Tile geometry of the blocked product. The tile side only changes speed and memory, never the
/// set of neighbours; it is chosen from `n` alone (not the thread count) so that floating-point
/// results are the same whatever the machine's number of cores.
#[derive(Clone, Copy, Debug)]
pub struct Blocking {
    /// Rows of A (and of B) per tile side.
    pub tile: usize,
}

impl Blocking {
    /// The default tile for matrices of up to `n` rows: large enough that the GEMM runs near its
    /// peak and the per-tile scan is cheap next to it, small enough that the tile (`tile²` floats)
    /// stays in the L2/L3 cache and that small inputs still make several tiles for the threads.
    pub fn for_rows(n: usize) -> Self {
        let tile = (n / 8).next_power_of_two().clamp(64, 512);
        Self { tile }
    }
}

/// The k nearest rows of B (or of A itself) for every row of A.
#[derive(Clone, Debug, PartialEq)]
pub struct TopK {
    /// Rows of A.
    pub rows: usize,
    /// Neighbours per row.
    pub k: usize,
    /// Neighbour indices, row-major `rows × k`, best first.
    pub indices: Vec<u32>,
    /// Cosines matching `indices`, non-increasing along each row.
    pub cosines: Vec<f32>,
}

/// All pairs whose cosine reaches a threshold, sorted by row, then cosine descending, then column.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Pairs {
    /// Row of A of each pair.
    pub rows: Vec<u32>,
    /// Row of B (or of A, A-vs-A) of each pair.
    pub cols: Vec<u32>,
    /// Cosine of each pair.
    pub cosines: Vec<f32>,
}

/// Rows scaled to unit L2 norm, widened to f32. Zero rows stay zero; a NaN or infinite element is an
/// error naming the matrix and the row.
pub fn normalised_rows(m: &MatrixRef<'_>) -> Result<Vec<f32>> {
    let d = m.cols;
    let mut out = vec![0f32; m.rows * d];
    let bad_row = AtomicUsize::new(usize::MAX);
    crate::parallel::install(|| {
        out.par_chunks_mut(d).enumerate().for_each(|(r, dst)| {
            match m.elements {
                Elements::F32(s) => dst.copy_from_slice(&s[r * d..(r + 1) * d]),
                Elements::F16(s) => {
                    for (o, x) in dst.iter_mut().zip(&s[r * d..(r + 1) * d]) {
                        *o = x.to_f32();
                    }
                }
            }
            // f64 accumulation: the norm of a long f16/f32 row loses bits in f32.
            let sq: f64 = dst.iter().map(|&x| f64::from(x) * f64::from(x)).sum();
            if !sq.is_finite() {
                bad_row.fetch_min(r, Ordering::Relaxed);
                return;
            }
            if sq > 0.0 {
                let inv = (1.0 / sq.sqrt()) as f32;
                dst.iter_mut().for_each(|x| *x *= inv);
            }
        });
    });
    let r = bad_row.into_inner();
    if r != usize::MAX {
        let row = match m.elements {
            Elements::F32(s) => s[r * d..(r + 1) * d].to_vec(),
            Elements::F16(s) => s[r * d..(r + 1) * d].iter().map(|x| x.to_f32()).collect(),
        };
        let what = if row.iter().any(|x| x.is_nan()) { "NaN" } else { "an infinite value" };
        return Err(Error::Invalid(format!("matrix {}: row {r} contains {what}", m.name)));
    }
    Ok(out)
}

/// The `k` rows of `b` with the largest cosine to each row of `a`; with `b = None`, neighbours within
/// `a`, each row excluding itself. Ties go to the smaller index. See the module docs for zero rows,
/// NaN and the range of `k`.
pub fn top_k(a: &MatrixRef<'_>, b: Option<&MatrixRef<'_>>, k: usize, blocking: Blocking) -> Result<TopK> {
    let n_b = check_pair(a, b)?;
    let limit = if b.is_some() { n_b } else { n_b.saturating_sub(1) };
    if k == 0 || k > limit {
        let what = if b.is_some() {
            format!("the {n_b} rows of {}", b.map_or("", |m| m.name))
        } else {
            format!("{} - 1 = {limit} (the other rows of {})", a.rows, a.name)
        };
        return Err(Error::Invalid(format!("k = {k} must be between 1 and {what}")));
    }
    let tile = check_tile(blocking)?;
    // The lists and the result each hold rows × k (index, cosine) pairs: k is an argument.
    crate::memory::check_bytes(a.rows as u128 * k as u128 * 16, || {
        format!("the {k} nearest neighbours of each of the {} rows of {}", a.rows, a.name)
    })?;
    let an = normalised_rows(a)?;
    let bn = match b {
        Some(b) => Some(normalised_rows(b)?),
        None => None,
    };
    let product = Product::new(&an, bn.as_deref(), a.cols, tile);
    let lists: Vec<Mutex<RowLists>> =
        (0..product.row_blocks).map(|i| Mutex::new(RowLists::new(product.block_len(i, a.rows), k))).collect();
    crate::parallel::install(|| {
        product.for_each_tile(|t, scores| scan_tile_top_k(t, scores, &lists));
    });
    let mut out = TopK { rows: a.rows, k, indices: Vec::with_capacity(a.rows * k), cosines: Vec::with_capacity(a.rows * k) };
    for block in lists {
        let block = block.into_inner().unwrap_or_else(std::sync::PoisonError::into_inner);
        out.indices.extend_from_slice(&block.indices);
        out.cosines.extend_from_slice(&block.cosines);
    }
    Ok(out)
}

/// Every pair (row of `a`, row of `b`) with cosine ≥ `threshold`; with `b = None`, ordered pairs of
/// distinct rows of `a` (both (i, j) and (j, i) appear). The output can grow with n², so more than
/// `max_pairs` pairs is an error that says to raise the threshold or the limit.
pub fn above_threshold(
    a: &MatrixRef<'_>,
    b: Option<&MatrixRef<'_>>,
    threshold: f32,
    max_pairs: usize,
    blocking: Blocking,
) -> Result<Pairs> {
    check_pair(a, b)?;
    if !threshold.is_finite() {
        return Err(Error::Invalid(format!("threshold must be a finite number, not {threshold}")));
    }
    let tile = check_tile(blocking)?;
    let an = normalised_rows(a)?;
    let bn = match b {
        Some(b) => Some(normalised_rows(b)?),
        None => None,
    };
    let product = Product::new(&an, bn.as_deref(), a.cols, tile);
    let found: Mutex<Vec<(u32, u32, f32)>> = Mutex::new(Vec::new());
    let count = AtomicUsize::new(0);
    let overflow = AtomicBool::new(false);
    crate::parallel::install(|| {
        product.for_each_tile(|t, scores| {
            if overflow.load(Ordering::Relaxed) {
                return;
            }
            let local = collect_tile_pairs(t, scores, threshold);
            if count.fetch_add(local.len(), Ordering::Relaxed) + local.len() > max_pairs {
                overflow.store(true, Ordering::Relaxed);
                return;
            }
            found.lock().unwrap_or_else(std::sync::PoisonError::into_inner).extend(local);
        });
    });
    if overflow.into_inner() {
        return Err(Error::Invalid(format!(
            "more than max_pairs = {max_pairs} pairs have cosine >= {threshold}; raise the threshold or max_pairs"
        )));
    }
    let mut found = found.into_inner().unwrap_or_else(std::sync::PoisonError::into_inner);
    crate::parallel::install(|| {
        found.par_sort_unstable_by(|x, y| x.0.cmp(&y.0).then(y.2.total_cmp(&x.2)).then(x.1.cmp(&y.1)));
    });
    let mut out = Pairs::default();
    for (r, c, s) in found {
        out.rows.push(r);
        out.cols.push(c);
        out.cosines.push(s);
    }
    Ok(out)
}

/// Shared argument checks; returns the number of candidate rows (of B, or of A itself).
fn check_pair(a: &MatrixRef<'_>, b: Option<&MatrixRef<'_>>) -> Result<usize> {
    if a.rows >= u32::MAX as usize {
        return Err(Error::Invalid(format!("matrix {}: {} rows exceed the u32 index range", a.name, a.rows)));
    }
    match b {
        Some(b) if b.cols != a.cols => Err(Error::Invalid(format!(
            "matrices {} ({} x {}) and {} ({} x {}) have different vector widths d",
            a.name, a.rows, a.cols, b.name, b.rows, b.cols
        ))),
        Some(b) if b.rows >= u32::MAX as usize => {
            Err(Error::Invalid(format!("matrix {}: {} rows exceed the u32 index range", b.name, b.rows)))
        }
        Some(b) => Ok(b.rows),
        None => Ok(a.rows),
    }
}

fn check_tile(blocking: Blocking) -> Result<usize> {
    if blocking.tile == 0 {
        return Err(Error::Invalid("tile size must be at least 1".into()));
    }
    Ok(blocking.tile)
}

/// Bounded best-first lists for the rows of one row block: `k` slots per row, sorted by cosine
/// descending then index ascending; empty slots hold (-inf, u32::MAX) so any real candidate wins.
struct RowLists {
    k: usize,
    indices: Vec<u32>,
    cosines: Vec<f32>,
}

impl RowLists {
    fn new(rows: usize, k: usize) -> Self {
        Self { k, indices: vec![u32::MAX; rows * k], cosines: vec![f32::NEG_INFINITY; rows * k] }
    }

    /// The current worst (cosine, index) kept for `row`: the bar a candidate must clear.
    #[inline]
    fn bar(&self, row: usize) -> (f32, u32) {
        let last = row * self.k + self.k - 1;
        (self.cosines[last], self.indices[last])
    }

    /// Insert a candidate known to beat the bar of `row`, dropping the current worst.
    #[inline]
    fn insert(&mut self, row: usize, cos: f32, idx: u32) {
        let base = row * self.k;
        let (c, ix) = (&mut self.cosines[base..base + self.k], &mut self.indices[base..base + self.k]);
        let mut p = self.k - 1;
        while p > 0 && better(cos, idx, c[p - 1], ix[p - 1]) {
            c[p] = c[p - 1];
            ix[p] = ix[p - 1];
            p -= 1;
        }
        c[p] = cos;
        ix[p] = idx;
    }
}

/// The total order of candidates: higher cosine first, then the smaller index.
#[inline]
fn better(cos: f32, idx: u32, other_cos: f32, other_idx: u32) -> bool {
    cos > other_cos || (cos == other_cos && idx < other_idx)
}

/// One tile of the cosine matrix: rows `r0..r0+nr` of A against rows `c0..c0+nc` of B.
#[derive(Clone, Copy, Debug)]
struct Tile {
    row_block: usize,
    col_block: usize,
    r0: usize,
    nr: usize,
    c0: usize,
    nc: usize,
    /// A-vs-A: this tile also stands for its mirror image below the diagonal.
    symmetric: bool,
}

impl Tile {
    fn diagonal(&self) -> bool {
        self.symmetric && self.row_block == self.col_block
    }
}

/// The blocked product A·Bᵀ of row-normalised matrices, visited tile by tile.
struct Product<'a> {
    a: &'a [f32],
    b: &'a [f32],
    d: usize,
    tile: usize,
    row_blocks: usize,
    col_blocks: usize,
    n_a: usize,
    n_b: usize,
    symmetric: bool,
}

impl<'a> Product<'a> {
    fn new(a: &'a [f32], b: Option<&'a [f32]>, d: usize, tile: usize) -> Self {
        let n_a = a.len() / d;
        let (b, symmetric) = match b {
            Some(b) => (b, false),
            None => (a, true),
        };
        let n_b = b.len() / d;
        Self { a, b, d, tile, row_blocks: n_a.div_ceil(tile), col_blocks: n_b.div_ceil(tile), n_a, n_b, symmetric }
    }

    fn block_len(&self, block: usize, n: usize) -> usize {
        tile_len(block, self.tile, n)
    }

    /// Every tile to multiply: all of them for A-vs-B, those on or above the diagonal for A-vs-A.
    fn tiles(&self) -> Vec<Tile> {
        let mut tiles = Vec::new();
        for i in 0..self.row_blocks {
            let first_j = if self.symmetric { i } else { 0 };
            for j in first_j..self.col_blocks {
                tiles.push(Tile {
                    row_block: i,
                    col_block: j,
                    r0: i * self.tile,
                    nr: tile_len(i, self.tile, self.n_a),
                    c0: j * self.tile,
                    nc: tile_len(j, self.tile, self.n_b),
                    symmetric: self.symmetric,
                });
            }
        }
        tiles
    }

    /// Multiply every tile on the current rayon pool and hand each (tile, row-major scores) to
    /// `visit`; one score buffer per worker, reused across its tiles.
    fn for_each_tile(&self, visit: impl Fn(&Tile, &[f32]) + Sync) {
        let tiles = self.tiles();
        tiles.par_iter().with_max_len(1).for_each_init(
            || vec![0f32; self.tile * self.tile],
            |buf, t| {
                let scores = &mut buf[..t.nr * t.nc];
                self.multiply(t, scores);
                visit(t, scores);
            },
        );
    }

    /// scores[r, c] = <a[r0 + r], b[c0 + c]> by a single-threaded GEMM (the parallelism is across tiles).
    fn multiply(&self, t: &Tile, scores: &mut [f32]) {
        let d = self.d;
        let lhs = &self.a[t.r0 * d..(t.r0 + t.nr) * d];
        let rhs = &self.b[t.c0 * d..(t.c0 + t.nc) * d];
        assert_eq!(scores.len(), t.nr * t.nc);
        // SAFETY: dst is nr x nc row-major (row stride nc, column stride 1) and exactly scores.len()
        // long; lhs is nr x d row-major; rhs is read as the d x nc matrix Bᵀ (element (k, c) at
        // c*d + k), inside rhs's nc*d elements. read_dst = false, so dst's old contents are ignored.
        unsafe {
            gemm::gemm(
                t.nr,
                t.nc,
                d,
                scores.as_mut_ptr(),
                1,
                t.nc as isize,
                false,
                lhs.as_ptr(),
                1,
                d as isize,
                rhs.as_ptr(),
                d as isize,
                1,
                0.0,
                1.0,
                false,
                false,
                false,
                gemm::Parallelism::None,
            );
        }
    }
}

fn tile_len(block: usize, tile: usize, n: usize) -> usize {
    tile.min(n - block * tile)
}

/// Fold one tile into the row lists: its rows always; for an off-diagonal A-vs-A tile also its
/// columns (the mirror tile is never computed). Locks are taken one at a time, so no deadlock.
fn scan_tile_top_k(t: &Tile, scores: &[f32], lists: &[Mutex<RowLists>]) {
    {
        let mut rows = lists[t.row_block].lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        for r in 0..t.nr {
            let skip = if t.diagonal() { Some(r) } else { None };
            scan_row(&mut rows, r, &scores[r * t.nc..(r + 1) * t.nc], t.c0, skip);
        }
    }
    if t.symmetric && !t.diagonal() {
        let mut cols = lists[t.col_block].lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        scan_columns(&mut cols, t, scores);
    }
}

/// Offer one row of scores (candidates `c0 + c`) to the list of `row`; most scores fail the bar
/// test, so the common path is one compare per score.
#[inline]
fn scan_row(lists: &mut RowLists, row: usize, scores: &[f32], c0: usize, skip: Option<usize>) {
    let (mut bar_cos, mut bar_idx) = lists.bar(row);
    for (c, &s) in scores.iter().enumerate() {
        if s >= bar_cos && Some(c) != skip {
            let idx = (c0 + c) as u32;
            if better(s, idx, bar_cos, bar_idx) {
                lists.insert(row, s, idx);
                (bar_cos, bar_idx) = lists.bar(row);
            }
        }
    }
}

/// Offer the columns of an above-diagonal tile to the lists of the column rows (row `r0 + r` is a
/// candidate neighbour of row `c0 + c`). Walks the tile row by row for contiguous reads, keeping
/// each column's bar in a small array.
fn scan_columns(lists: &mut RowLists, t: &Tile, scores: &[f32]) {
    let mut bars: Vec<(f32, u32)> = (0..t.nc).map(|c| lists.bar(c)).collect();
    for r in 0..t.nr {
        let idx = (t.r0 + r) as u32;
        for (c, &s) in scores[r * t.nc..(r + 1) * t.nc].iter().enumerate() {
            let (bar_cos, bar_idx) = bars[c];
            if s >= bar_cos && better(s, idx, bar_cos, bar_idx) {
                lists.insert(c, s, idx);
                bars[c] = lists.bar(c);
            }
        }
    }
}

/// The pairs of one tile with score ≥ threshold, mirrored for off-diagonal A-vs-A tiles.
fn collect_tile_pairs(t: &Tile, scores: &[f32], threshold: f32) -> Vec<(u32, u32, f32)> {
    let mut out = Vec::new();
    for r in 0..t.nr {
        for (c, &s) in scores[r * t.nc..(r + 1) * t.nc].iter().enumerate() {
            if s >= threshold && !(t.diagonal() && r == c) {
                // -0.0 + 0.0 == +0.0: a zero cosine has one sign, so ties sort by column as documented.
                let s = s + 0.0;
                let (i, j) = ((t.r0 + r) as u32, (t.c0 + c) as u32);
                out.push((i, j, s));
                if t.symmetric && !t.diagonal() {
                    out.push((j, i, s));
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Plain reference: every cosine in f64, full sort by (cosine desc, index asc).
    fn reference(a: &[f32], b: Option<&[f32]>, d: usize) -> Vec<Vec<(f64, u32)>> {
        let unit = |m: &[f32]| -> Vec<Vec<f64>> {
            m.chunks(d)
                .map(|r| {
                    let n = r.iter().map(|&x| f64::from(x).powi(2)).sum::<f64>().sqrt();
                    r.iter().map(|&x| if n > 0.0 { f64::from(x) / n } else { 0.0 }).collect()
                })
                .collect()
        };
        let ua = unit(a);
        let ub = b.map_or_else(|| ua.clone(), unit);
        ua.iter()
            .enumerate()
            .map(|(i, x)| {
                let mut row: Vec<(f64, u32)> = ub
                    .iter()
                    .enumerate()
                    .filter(|&(j, _)| b.is_some() || j != i)
                    .map(|(j, y)| (x.iter().zip(y).map(|(p, q)| p * q).sum(), j as u32))
                    .collect();
                row.sort_by(|p, q| q.0.total_cmp(&p.0).then(p.1.cmp(&q.1)));
                row
            })
            .collect()
    }

    /// Our list equals the reference up to f32 rounding: the same cosines, and the same indices
    /// wherever the reference's cosines are separated by more than the rounding.
    fn assert_matches(got: &TopK, want: &[Vec<(f64, u32)>]) {
        for (r, want_row) in want.iter().enumerate() {
            let k = got.k;
            let cos = &got.cosines[r * k..(r + 1) * k];
            let idx = &got.indices[r * k..(r + 1) * k];
            for p in 0..k {
                assert!((f64::from(cos[p]) - want_row[p].0).abs() < 1e-4, "row {r} rank {p}: {} vs {}", cos[p], want_row[p].0);
                let gap_before = p == 0 || want_row[p - 1].0 - want_row[p].0 > 1e-4;
                let gap_after = want_row.get(p + 1).is_none_or(|n| want_row[p].0 - n.0 > 1e-4);
                if gap_before && gap_after {
                    assert_eq!(idx[p], want_row[p].1, "row {r} rank {p}");
                }
                if p > 0 {
                    assert!(better(cos[p - 1], idx[p - 1], cos[p], idx[p]), "row {r} not sorted");
                }
            }
        }
    }

    fn matrix(rows: usize, d: usize, vals: &[i8]) -> Vec<f32> {
        // Small integers make exact ties and duplicate rows common.
        (0..rows * d).map(|i| f32::from(vals[i % vals.len()])).collect()
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(40))]
        #[test]
        fn self_top_k_matches_reference(
            rows in 2usize..40, d in 1usize..9, tile in 1usize..12, kf in 0.0f64..1.0,
            vals in proptest::collection::vec(-3i8..4, 1..200),
        ) {
            let a = matrix(rows, d, &vals);
            let k = 1 + ((rows - 2) as f64 * kf) as usize;
            let m = MatrixRef::new("a", Elements::F32(&a), rows, d).unwrap();
            let got = top_k(&m, None, k, Blocking { tile }).unwrap();
            assert_matches(&got, &reference(&a, None, d));
            // The tiling changes cosines by rounding only (exact ties may then break differently,
            // which the reference comparison above allows for).
            let whole = top_k(&m, None, k, Blocking { tile: 1024 }).unwrap();
            for (x, y) in got.cosines.iter().zip(&whole.cosines) {
                prop_assert!((x - y).abs() < 1e-5, "{} vs {}", x, y);
            }
        }

        #[test]
        fn cross_top_k_matches_reference(
            na in 1usize..30, nb in 1usize..30, d in 1usize..9, tile in 1usize..12, kf in 0.0f64..1.0,
            vals in proptest::collection::vec(-3i8..4, 1..200), shift in 0usize..7,
        ) {
            let a = matrix(na, d, &vals);
            let b: Vec<f32> = matrix(nb + shift, d, &vals)[shift * d..].to_vec();
            let k = 1 + ((nb - 1) as f64 * kf) as usize;
            let ma = MatrixRef::new("a", Elements::F32(&a), na, d).unwrap();
            let mb = MatrixRef::new("b", Elements::F32(&b), nb, d).unwrap();
            let got = top_k(&ma, Some(&mb), k, Blocking { tile }).unwrap();
            assert_matches(&got, &reference(&a, Some(&b), d));
        }

        #[test]
        fn threshold_pairs_match_reference(
            rows in 2usize..30, d in 1usize..6, tile in 1usize..9,
            vals in proptest::collection::vec(-3i8..4, 1..100), t in -0.9f64..0.9,
        ) {
            let a = matrix(rows, d, &vals);
            let m = MatrixRef::new("a", Elements::F32(&a), rows, d).unwrap();
            let got = above_threshold(&m, None, t as f32, usize::MAX, Blocking { tile }).unwrap();
            let want = reference(&a, None, d);
            // Pairs away from the threshold by more than rounding must agree exactly.
            for (i, row) in want.iter().enumerate() {
                for &(c, j) in row {
                    let present = got.rows.iter().zip(&got.cols).any(|(&r, &cc)| r as usize == i && cc == j);
                    if c > t + 1e-5 { prop_assert!(present, "pair ({}, {}) cos {} missing", i, j, c); }
                    if c < t - 1e-5 { prop_assert!(!present, "pair ({}, {}) cos {} extra", i, j, c); }
                }
            }
        }
    }

    #[test]
    fn float16_equals_float32_of_the_same_values() {
        let a32 = matrix(17, 5, &[1, -2, 3, 0, 2, -1, 3]);
        let a16: Vec<f16> = a32.iter().map(|&x| f16::from_f32(x)).collect();
        let m32 = MatrixRef::new("a", Elements::F32(&a32), 17, 5).unwrap();
        let m16 = MatrixRef::new("a", Elements::F16(&a16), 17, 5).unwrap();
        let b = Blocking { tile: 4 };
        assert_eq!(top_k(&m32, None, 5, b).unwrap(), top_k(&m16, None, 5, b).unwrap());
    }

    #[test]
    fn zero_rows_have_cosine_zero() {
        let a = vec![1.0, 0.0, 0.0, 0.0, -1.0, 0.0];
        let m = MatrixRef::new("a", Elements::F32(&a), 3, 2).unwrap();
        let got = top_k(&m, None, 2, Blocking::for_rows(3)).unwrap();
        // row 1 (zero): cosine 0 to both others, smaller index first.
        assert_eq!(&got.indices[2..4], &[0, 2]);
        assert_eq!(&got.cosines[2..4], &[0.0, 0.0]);
        // row 0: the zero row (0) beats the opposite row (-1).
        assert_eq!(&got.indices[0..2], &[1, 2]);
    }

    #[test]
    fn errors_name_the_problem() {
        let a = vec![1.0, 2.0, f32::NAN, 1.0, 0.0, 1.0];
        let m = MatrixRef::new("decoder", Elements::F32(&a), 3, 2).unwrap();
        let e = top_k(&m, None, 1, Blocking::for_rows(3)).unwrap_err().to_string();
        assert!(e.contains("decoder") && e.contains("row 1") && e.contains("NaN"), "{e}");

        let ok = vec![1.0; 6];
        let m = MatrixRef::new("a", Elements::F32(&ok), 3, 2).unwrap();
        let e = top_k(&m, None, 3, Blocking::for_rows(3)).unwrap_err().to_string();
        assert!(e.contains("k = 3"), "{e}");
        assert!(top_k(&m, None, 0, Blocking::for_rows(3)).is_err());

        let other = vec![1.0; 6];
        let mb = MatrixRef::new("b", Elements::F32(&other), 2, 3).unwrap();
        let e = top_k(&m, Some(&mb), 1, Blocking::for_rows(3)).unwrap_err().to_string();
        assert!(e.contains("a (3 x 2)") && e.contains("b (2 x 3)"), "{e}");

        assert!(MatrixRef::new("x", Elements::F32(&ok), 4, 2).is_err());
        let e = above_threshold(&m, None, 0.5, 2, Blocking::for_rows(3)).unwrap_err().to_string();
        assert!(e.contains("max_pairs"), "{e}");
    }
}
