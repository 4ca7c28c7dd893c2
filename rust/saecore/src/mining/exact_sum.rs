//! An exact, order-independent accumulator for the per-feature `sum`.
//!
//! Floating-point addition is not associative, so a sum folded in a different grouping (other
//! threads, other machines, another merge tree) can differ in the last bits. Mining therefore sums
//! each shard's activations in `f64` in row order (the same on every machine, since a shard's
//! content is fixed) and adds that per-shard sum into this fixed-point accumulator, which is exact:
//! merging in any order or grouping gives the same bits, rounded to `f64` once at the end.
//!
//! Layout: a 384-bit two's-complement integer in units of 2^-149 (the smallest `f32` subnormal).
//! Every stored activation is a multiple of 2^-149, and so is every `f64` sum of them (rounding only
//! happens above 2^-96, where the `f64` spacing is coarser than 2^-149), so nothing is lost. The top
//! bit is the sign; magnitudes up to 2^234 fit, far beyond `f32::MAX × 2^64` activations.

/// 64-bit limbs, least significant first.
pub const LIMBS: usize = 6;
/// Binary exponent of the accumulator's least significant bit.
const LSB_EXP: i32 = -149;

/// A fixed-point sum of `f64` values (see the module docs).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ExactSum(pub [u64; LIMBS]);

impl ExactSum {
    /// Add `x` (finite). Bits of `x` below 2^-149 (impossible for sums of `f32` values) are dropped,
    /// which still depends on `x` alone, so the result stays order-independent.
    pub fn add_f64(&mut self, x: f64) {
        if x == 0.0 || !x.is_finite() {
            return;
        }
        let bits = x.to_bits();
        let biased = ((bits >> 52) & 0x7ff) as i32;
        let frac = bits & ((1u64 << 52) - 1);
        let (mant, exp) = if biased == 0 { (frac, -1074) } else { (frac | (1u64 << 52), biased - 1075) };
        let shift = exp - LSB_EXP;
        let (mant, shift) = if shift < 0 { (mant >> (-shift).min(63), 0) } else { (mant, shift as usize) };
        let wide = u128::from(mant) << (shift % 64);
        let mut addend = [0u64; LIMBS];
        let limb = shift / 64;
        if limb < LIMBS {
            addend[limb] = wide as u64;
        }
        if limb + 1 < LIMBS {
            addend[limb + 1] = (wide >> 64) as u64;
        }
        let addend = ExactSum(addend);
        if x > 0.0 {
            self.merge(&addend);
        } else {
            self.merge(&addend.negated());
        }
    }

    /// Add another accumulator (two's-complement addition with carry).
    pub fn merge(&mut self, other: &ExactSum) {
        let mut carry = false;
        for (a, &b) in self.0.iter_mut().zip(&other.0) {
            let (s1, c1) = a.overflowing_add(b);
            let (s2, c2) = s1.overflowing_add(u64::from(carry));
            *a = s2;
            carry = c1 || c2;
        }
    }

    fn negated(&self) -> ExactSum {
        let mut out = ExactSum(self.0.map(|l| !l));
        out.merge(&ExactSum::one_lsb());
        out
    }

    fn one_lsb() -> ExactSum {
        let mut one = [0u64; LIMBS];
        one[0] = 1;
        ExactSum(one)
    }

    fn bit(&self, i: usize) -> bool {
        (self.0[i / 64] >> (i % 64)) & 1 == 1
    }

    /// The `n <= 64` bits starting at bit `lo`.
    fn bits(&self, lo: usize, n: usize) -> u64 {
        let (limb, off) = (lo / 64, lo % 64);
        let low = u128::from(self.0[limb]);
        let high = if limb + 1 < LIMBS { u128::from(self.0[limb + 1]) } else { 0 };
        let v = ((high << 64) | low) >> off;
        (v as u64) & if n == 64 { u64::MAX } else { (1u64 << n) - 1 }
    }

    /// The sum rounded once to the nearest `f64` (ties to even).
    pub fn to_f64(&self) -> f64 {
        let negative = self.bit(64 * LIMBS - 1);
        let mag = if negative { self.negated() } else { *self };
        let Some(top) = (0..64 * LIMBS).rev().find(|&i| mag.bit(i)) else { return 0.0 };
        let value = if top < 53 {
            // Exact: fewer than 53 significant bits.
            mag.bits(0, 53) as f64 * pow2(LSB_EXP)
        } else {
            let lo = top - 52;
            let mut mant = mag.bits(lo, 53);
            let round = mag.bit(lo - 1);
            let sticky = (0..lo - 1).any(|i| mag.bit(i));
            if round && (sticky || mant & 1 == 1) {
                mant += 1; // may reach 2^53, which is still exact as an f64
            }
            mant as f64 * pow2(lo as i32 + LSB_EXP)
        };
        if negative {
            -value
        } else {
            value
        }
    }

    /// Little-endian bytes (48).
    pub fn to_le_bytes(&self) -> [u8; 8 * LIMBS] {
        let mut out = [0u8; 8 * LIMBS];
        for (chunk, limb) in out.chunks_exact_mut(8).zip(&self.0) {
            chunk.copy_from_slice(&limb.to_le_bytes());
        }
        out
    }

    /// Inverse of [`ExactSum::to_le_bytes`].
    pub fn from_le_bytes(bytes: &[u8]) -> ExactSum {
        let mut limbs = [0u64; LIMBS];
        for (limb, chunk) in limbs.iter_mut().zip(bytes.chunks_exact(8)) {
            *limb = u64::from_le_bytes(chunk.try_into().expect("8-byte chunk"));
        }
        ExactSum(limbs)
    }
}

/// 2^e for `e` in the normal `f64` range.
fn pow2(e: i32) -> f64 {
    f64::from_bits(((e + 1023) as u64) << 52)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn small_values_are_exact() {
        let mut s = ExactSum::default();
        for x in [1.5, 0.25, f64::from(f32::MIN_POSITIVE), -0.75, 3.0e9] {
            s.add_f64(x);
        }
        assert_eq!(s.to_f64(), 1.5 + 0.25 + f64::from(f32::MIN_POSITIVE) - 0.75 + 3.0e9);
        let mut z = ExactSum::default();
        z.add_f64(2.0);
        z.add_f64(-2.0);
        assert_eq!(z, ExactSum::default());
        assert_eq!(z.to_f64(), 0.0);
    }

    #[test]
    fn rounds_half_to_even() {
        // 2^53 + 1 is a tie between 2^53 and 2^53 + 2: even wins.
        let mut s = ExactSum::default();
        s.add_f64(9_007_199_254_740_992.0);
        s.add_f64(1.0);
        assert_eq!(s.to_f64(), 9_007_199_254_740_992.0);
        s.add_f64(1.0);
        s.add_f64(1.0);
        assert_eq!(s.to_f64(), 9_007_199_254_740_996.0);
    }

    proptest! {
        /// Any grouping of the same values gives the same bits, and the result is the correctly
        /// rounded sum (checked against an exact i128 reference on a coarse grid).
        #[test]
        fn order_independent_and_correctly_rounded(
            xs in prop::collection::vec(-1_000_000i64..1_000_000, 0..60),
            scale in -20i32..40,
            split in 0usize..60,
        ) {
            let vals: Vec<f64> = xs.iter().map(|&x| x as f64 * pow2(scale - 20)).collect();
            let mut forward = ExactSum::default();
            vals.iter().for_each(|&v| forward.add_f64(v));
            let (a, b) = vals.split_at(split.min(vals.len()));
            let (mut left, mut right) = (ExactSum::default(), ExactSum::default());
            b.iter().rev().for_each(|&v| right.add_f64(v));
            a.iter().for_each(|&v| left.add_f64(v));
            right.merge(&left);
            prop_assert_eq!(forward, right);
            let exact: i128 = xs.iter().map(|&x| i128::from(x)).sum();
            prop_assert_eq!(forward.to_f64(), exact as f64 * pow2(scale - 20));
        }
    }
}
