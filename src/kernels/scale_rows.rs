//! Scale each row of a matrix by its own factor and round to the weight format, reporting whether
//! every result is finite (AWQ's `w * s[:, None]`):
//!
//! ```text
//! out[r, c] = rnd(w[r, c] * s[r])        finite = all(isfinite(out))
//! ```
//!
//! The product is one IEEE multiplication per element, the same bits at any vector width: every tier
//! runs the one-lane body compiled with its target features ([`Tier::dispatch_autovec`]), which LLVM
//! vectorizes. f16/bf16 rounding is [`round_to_format_with`](super::round_to_format_with), row by
//! row while the row is in cache.

use super::{check_len, check_tier, round_to_format_with, slab_rows};
use crate::{FloatFormat, Result, Tier};
use pulp::{Simd, WithSimd};

/// `out = rnd(w * s[:, None])` of `w: [rows, cols]`, `s: [rows]`; returns whether every value of
/// `out` is finite.
pub fn scale_rows(format: FloatFormat, w: &[f32], s: &[f32], cols: usize, out: &mut [f32]) -> Result<bool> {
    scale_rows_with(Tier::best(), format, w, s, cols, out)
}

/// [`scale_rows`] on a chosen tier.
pub fn scale_rows_with(
    tier: Tier,
    format: FloatFormat,
    w: &[f32],
    s: &[f32],
    cols: usize,
    out: &mut [f32],
) -> Result<bool> {
    check_tier(tier)?;
    let rows = slab_rows("scale_rows", w.len(), cols)?;
    check_len("scale_rows", rows, s.len())?;
    check_len("scale_rows", w.len(), out.len())?;
    if cols == 0 {
        return Ok(true);
    }
    Ok(tier.dispatch_autovec(ScaleRows { tier, format, w, s, cols, out }))
}

struct ScaleRows<'a> {
    tier: Tier,
    format: FloatFormat,
    w: &'a [f32],
    s: &'a [f32],
    cols: usize,
    out: &'a mut [f32],
}

impl WithSimd for ScaleRows<'_> {
    type Output = bool;

    #[inline(always)]
    fn with_simd<S: Simd>(self, _simd: S) -> bool {
        let Self { tier, format, w, s, cols, out } = self;
        let mut finite = true;
        for ((o, row), &sk) in out.chunks_exact_mut(cols).zip(w.chunks_exact(cols)).zip(s) {
            for (o, &v) in o.iter_mut().zip(row) {
                *o = v * sk;
            }
            if format != FloatFormat::F32 {
                round_to_format_with(tier, format, o).expect("the tier was checked");
            }
            finite &= o.iter().fold(true, |all, v| all & v.is_finite());
        }
        finite
    }
}
