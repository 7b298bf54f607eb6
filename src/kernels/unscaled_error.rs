//! The error of a fake quantization in the unscaled weight's terms (AWQ-lite's error form):
//!
//! ```text
//! e[r, c] = w[r, c] - dq[r, c] / s[r]        (in place of dq)
//! ```
//!
//! One IEEE division and one subtraction per element, the same bits at any vector width: every
//! tier runs the one-lane body compiled with its target features ([`Tier::dispatch_autovec`]),
//! which LLVM vectorizes.

use super::{check_len, check_tier, slab_rows};
use crate::{Result, Tier};
use pulp::{Simd, WithSimd};

/// `dq = w - dq / s[:, None]` of `w`, `dq: [rows, cols]`, `s: [rows]`.
pub fn unscaled_error(dq: &mut [f32], w: &[f32], s: &[f32], cols: usize) -> Result<()> {
    unscaled_error_with(Tier::best(), dq, w, s, cols)
}

/// [`unscaled_error`] on a chosen tier.
pub fn unscaled_error_with(tier: Tier, dq: &mut [f32], w: &[f32], s: &[f32], cols: usize) -> Result<()> {
    check_tier(tier)?;
    let rows = slab_rows("unscaled_error", w.len(), cols)?;
    check_len("unscaled_error", rows, s.len())?;
    check_len("unscaled_error", w.len(), dq.len())?;
    if cols > 0 {
        tier.dispatch_autovec(UnscaledError { dq, w, s, cols });
    }
    Ok(())
}

struct UnscaledError<'a> {
    dq: &'a mut [f32],
    w: &'a [f32],
    s: &'a [f32],
    cols: usize,
}

impl WithSimd for UnscaledError<'_> {
    type Output = ();

    #[inline(always)]
    fn with_simd<S: Simd>(self, _simd: S) {
        let Self { dq, w, s, cols } = self;
        for ((erow, wrow), &sk) in dq.chunks_exact_mut(cols).zip(w.chunks_exact(cols)).zip(s) {
            for (e, &wv) in erow.iter_mut().zip(wrow) {
                *e = wv - *e / sk;
            }
        }
    }
}
