//! Divide each column of a matrix by its own divisor (AWQ's `x * (1 / s)` in numpy's order, and the
//! weight statistic's `|w| / amax`):
//!
//! ```text
//! out[r, c] = x[r, c] / s[c]
//! ```
//!
//! One IEEE division per element, the same bits at any vector width: every tier runs the one-lane
//! body compiled with its target features ([`Tier::dispatch_autovec`]), which LLVM vectorizes.

use super::{check_len, check_tier, slab_rows};
use crate::{Result, Tier};
use pulp::{Simd, WithSimd};

/// `out = x / s[None, :]` of `x: [rows, cols]`, `s: [cols]`.
pub fn divide_columns(x: &[f32], s: &[f32], out: &mut [f32]) -> Result<()> {
    divide_columns_with(Tier::best(), x, s, out)
}

/// [`divide_columns`] on a chosen tier.
pub fn divide_columns_with(tier: Tier, x: &[f32], s: &[f32], out: &mut [f32]) -> Result<()> {
    check_tier(tier)?;
    slab_rows("divide_columns", x.len(), s.len())?;
    check_len("divide_columns", x.len(), out.len())?;
    if !s.is_empty() {
        tier.dispatch_autovec(DivideColumns { x, s, out });
    }
    Ok(())
}

struct DivideColumns<'a> {
    x: &'a [f32],
    s: &'a [f32],
    out: &'a mut [f32],
}

impl WithSimd for DivideColumns<'_> {
    type Output = ();

    #[inline(always)]
    fn with_simd<S: Simd>(self, _simd: S) {
        let Self { x, s, out } = self;
        for (orow, row) in out.chunks_exact_mut(s.len()).zip(x.chunks_exact(s.len())) {
            for ((o, &v), &sk) in orow.iter_mut().zip(row).zip(s) {
                *o = v / sk;
            }
        }
    }
}
