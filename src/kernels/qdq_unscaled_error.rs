//! AWQ-lite's error matrix of a slab in one pass: the slab is scaled by one factor per row in
//! registers (never stored), fake-quantized, and its error written in the unscaled weight's terms:
//!
//! ```text
//! x = rnd(w[r, c] * t[r])                (as scale_rows)
//! out[r, c] = w[r, c] - dq(x) / t[r]     (in f32, as unscaled_error; dq as qdq_error's)
//! ```
//!
//! The same bits as [`scale_rows`](super::scale_rows), [`qdq_error`](super::qdq_error)'s
//! `Dequantized` output and [`unscaled_error`](super::unscaled_error) in turn, with one store per
//! element instead of three.

use super::qdq_error::fake_quantize_lanes;
use super::{check_len, check_slab};
use crate::float::{Precision, BF16, F16, F32};
use crate::kernels::code::{reciprocals, CodeBounds};
use crate::simd::{load_f32, store_f32};
use crate::{Bits, FloatFormat, Result, Tier};
use pulp::{Simd, WithSimd};

/// AWQ-lite's error `out = w - dq(q(rnd(w * t[:, None]))) / t[:, None]` of the slab `w`
/// (`rows * cols`) with row factors `t[rows]` and column scales `scale[cols]` (and
/// `zero_point[cols]`), the scales being those of the scaled slab `rnd(w * t[:, None])`.
#[allow(clippy::too_many_arguments)]
pub fn qdq_unscaled_error(
    format: FloatFormat,
    bits: Bits,
    w: &[f32],
    cols: usize,
    t: &[f32],
    scale: &[f32],
    zero_point: Option<&[f32]>,
    out: &mut [f32],
) -> Result<()> {
    qdq_unscaled_error_with(Tier::best(), format, bits, w, cols, t, scale, zero_point, out)
}

/// [`qdq_unscaled_error`] on a chosen tier.
#[allow(clippy::too_many_arguments)]
pub fn qdq_unscaled_error_with(
    tier: Tier,
    format: FloatFormat,
    bits: Bits,
    w: &[f32],
    cols: usize,
    t: &[f32],
    scale: &[f32],
    zero_point: Option<&[f32]>,
    out: &mut [f32],
) -> Result<()> {
    check_slab("qdq_unscaled_error", tier, w.len(), cols, scale, zero_point, w.len(), out.len())?;
    if cols == 0 {
        return Ok(());
    }
    check_len("qdq_unscaled_error row factors", w.len() / cols, t.len())?;
    qdq_unscaled_error_rows(tier, format, bits, w, [cols, cols], t, scale, zero_point, out);
    Ok(())
}

/// [`qdq_unscaled_error_with`] on a column stripe: row `r` of the slab (`cols` elements) at
/// `w[r * stride..]` and `out[r * stride..]`, `t.len()` rows. The caller has checked the tier, that
/// `scale` (and `zero_point`) hold `cols` values, and that `w` and `out` hold
/// `(rows - 1) * stride + cols` elements or more.
#[allow(clippy::too_many_arguments)]
pub(crate) fn qdq_unscaled_error_rows(
    tier: Tier,
    format: FloatFormat,
    bits: Bits,
    w: &[f32],
    [cols, stride]: [usize; 2],
    t: &[f32],
    scale: &[f32],
    zero_point: Option<&[f32]>,
    out: &mut [f32],
) {
    if cols == 0 {
        return;
    }
    macro_rules! run {
        ($p:expr) => {
            tier.dispatch(Job { w, bits, cols, stride, t, scale, zero_point, out, _p: $p })
        };
    }
    match format {
        FloatFormat::F32 => run!(F32),
        FloatFormat::F16 => run!(F16),
        FloatFormat::BF16 => run!(BF16),
    }
}

struct Job<'a, P> {
    w: &'a [f32],
    bits: Bits,
    cols: usize,
    stride: usize,
    t: &'a [f32],
    scale: &'a [f32],
    zero_point: Option<&'a [f32]>,
    out: &'a mut [f32],
    _p: P,
}

impl<P: Precision> WithSimd for Job<'_, P> {
    type Output = ();

    #[inline(always)]
    fn with_simd<S: Simd>(self, simd: S) {
        // The width as a constant in each arm, so the bounds are literals to the optimizer.
        match self.bits {
            Bits::Four => self.body::<S, 4>(simd),
            Bits::Eight => self.body::<S, 8>(simd),
        }
    }
}

impl<P: Precision> Job<'_, P> {
    #[inline(always)]
    fn body<S: Simd, const BITS: u32>(self, simd: S) {
        let bits = if BITS == 8 { Bits::Eight } else { Bits::Four };
        let Self { w, bits: _, cols, stride, t, scale, zero_point, out, _p: _ } = self;
        let bounds = CodeBounds::new(simd, bits);
        let recip = reciprocals::<S, P>(scale);
        for (r, &tr) in t.iter().enumerate() {
            let at = r * stride..r * stride + cols;
            let (w, out) = (&w[at.clone()], &mut out[at]);
            let t = simd.splat_f32s(tr);
            // A plain loop: a first version through `for_each_chunk`, its closure shared by two
            // call sites, was not inlined and ran without the tier's target features (the 48M
            // model's searches 1.5x slower).
            let mut j = 0;
            while j < cols {
                let n = S::F32_LANES.min(cols - j);
                let wv = load_f32(simd, &w[j..j + n]);
                let x = P::round_simd(simd, simd.mul_f32s(wv, t));
                let dq = fake_quantize_lanes::<S, P>(simd, &bounds, x, j, n, scale, &recip, zero_point);
                store_f32(simd, &mut out[j..j + n], simd.sub_f32s(wv, simd.div_f32s(dq, t)));
                j += S::F32_LANES;
            }
        }
    }
}
