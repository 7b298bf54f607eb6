//! A sum in f64 of a function of two f32 arrays (AWQ-lite's losses: `sum(e * (M @ e))`,
//! `sum((x @ e)^2)`, `sum((a - b)^2)`), in 16 interleaved partial sums:
//!
//! ```text
//! acc[j] = sum over i = j (mod 16), i < 16 * (len / 16), in order, of f(a[i], b[i])
//! total  = (acc[0] + acc[1] + ... + acc[15]) + (the tail's f values summed in order)
//! ```
//!
//! A sum in order is one chain of dependent additions (4 cycles each); these vectorize and are no
//! less accurate. Each lane's operations (widening, `f`, one addition) are the same IEEE operations
//! at any vector width and Rust contracts nothing into FMA, so every tier gives the same bits: every
//! tier runs the one-lane body compiled with its target features ([`Tier::dispatch_autovec`]), where
//! LLVM puts the 16 accumulators in vector registers.

use super::{check_len, check_tier};
use crate::{Result, Tier};
use pulp::{Simd, WithSimd};

/// The number of interleaved partial sums.
pub const LANES: usize = 16;

/// `sum(f(a[i] as f64, b[i] as f64))` in the order above.
pub fn sum_f64(a: &[f32], b: &[f32], f: impl Fn(f64, f64) -> f64) -> Result<f64> {
    sum_f64_with(Tier::best(), a, b, f)
}

/// [`sum_f64`] on a chosen tier.
pub fn sum_f64_with(tier: Tier, a: &[f32], b: &[f32], f: impl Fn(f64, f64) -> f64) -> Result<f64> {
    check_tier(tier)?;
    check_len("sum_f64", a.len(), b.len())?;
    Ok(tier.dispatch_autovec(SumF64 { a, b, f }))
}

struct SumF64<'a, F> {
    a: &'a [f32],
    b: &'a [f32],
    f: F,
}

impl<F: Fn(f64, f64) -> f64> WithSimd for SumF64<'_, F> {
    type Output = f64;

    #[inline(always)]
    fn with_simd<S: Simd>(self, _simd: S) -> f64 {
        let Self { a, b, f } = self;
        let mut acc = [0.0f64; LANES];
        let (ca, cb) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
        let tail: f64 = ca.remainder().iter().zip(cb.remainder()).map(|(&p, &q)| f(p as f64, q as f64)).sum();
        for (pa, pb) in ca.zip(cb) {
            for j in 0..LANES {
                acc[j] += f(pa[j] as f64, pb[j] as f64);
            }
        }
        acc.iter().sum::<f64>() + tail
    }
}
