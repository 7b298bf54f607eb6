//! Scales and zero points from block statistics, rounded to the weight dtype after every step.
//!
//! ```text
//! symmetric:  s  = max(rnd(rnd(amax * alpha) / qmax), c)                    c = rnd(1e-5)
//! zero point: hi = rnd(max(max, 0) * alpha), lo = rnd(min(min, 0) * alpha)
//!             s  = rnd(max(rnd(hi - lo), c) / levels)
//!                  (if rnd(hi - lo) overflows the dtype: s = rnd((hi - lo) / levels) in f64)
//!             zp = clip(-rint(rnd(lo / s)), 0, levels)
//! ```
//!
//! with `qmax = 7, levels = 15` for 4-bit codes and `127, 255` for 8-bit ones ([`Bits`]).
//!
//! The zero-point range always contains zero (`min(min, 0)`, `max(max, 0)`, as ONNX Runtime's and
//! PyTorch's asymmetric quantizers do): ModelOpt takes the block's own min and max, so a block whose
//! values are all positive gets zp 0 with `lo > 0` and all its codes saturate at 15 (all negative:
//! zp 15, codes 0). For blocks that straddle zero the two are the same numbers. NaN stays NaN.
//!
//! The range `hi - lo` of a float16 (or bfloat16, float32) block can exceed the dtype's largest
//! value although both ends are finite (f16: +40000 and -40000); numpy then gets an infinite range
//! and a NaN zero point. Such lanes are recomputed as `s = rnd((hi - lo) / levels)` with the
//! difference and quotient in f64, rounded once to the dtype; every other lane is unchanged.
//!
//! ModelOpt applies no alpha in the zero-point form (its AWQ-clip then silently ignores the clip
//! ratio); with alpha = 1 the formulas above are exactly ModelOpt's, and with alpha < 1 they apply the
//! clip as intended. `alpha` is given as the Python float it stands for and converted to the dtype.

use super::{check_len, check_tier};
use crate::float::{Precision, BF16, F16, F32};
use crate::simd::{for_each_chunk, load_f32, rint_clamped, store_f32};
use crate::{Bits, FloatFormat, Result, Tier};
use pulp::{Simd, WithSimd};

/// ModelOpt's `CLIP_MIN`.
pub const CLIP_MIN: f64 = 1e-5;

/// Symmetric INT4 scales from block absmax values.
pub fn scales_symmetric(format: FloatFormat, bits: Bits, amax: &[f32], alpha: f64, scale: &mut [f32]) -> Result<()> {
    scales_symmetric_with(Tier::best(), format, bits, amax, alpha, scale)
}

/// [`scales_symmetric`] on a chosen tier.
pub fn scales_symmetric_with(
    tier: Tier,
    format: FloatFormat,
    bits: Bits,
    amax: &[f32],
    alpha: f64,
    scale: &mut [f32],
) -> Result<()> {
    let alphas = vec![format.constant(alpha); amax.len()];
    scales_symmetric_alphas_with(tier, format, bits, amax, &alphas, scale)
}

/// [`scales_symmetric`] with one clip ratio per column (`alphas[c]` already a value of `format`,
/// as AWQ-clip's per-block choices are).
pub fn scales_symmetric_alphas_with(
    tier: Tier,
    format: FloatFormat,
    bits: Bits,
    amax: &[f32],
    alphas: &[f32],
    scale: &mut [f32],
) -> Result<()> {
    check_tier(tier)?;
    check_len("scales_symmetric output", amax.len(), scale.len())?;
    check_len("scales_symmetric alphas", amax.len(), alphas.len())?;
    let clip_min = format.constant(CLIP_MIN);
    let qmax = bits.qmax();
    match format {
        FloatFormat::F32 => tier.dispatch(Symmetric::<F32> { amax, alphas, qmax, clip_min, scale, _p: F32 }),
        FloatFormat::F16 => tier.dispatch(Symmetric::<F16> { amax, alphas, qmax, clip_min, scale, _p: F16 }),
        FloatFormat::BF16 => tier.dispatch(Symmetric::<BF16> { amax, alphas, qmax, clip_min, scale, _p: BF16 }),
    }
    Ok(())
}

/// Unsigned scales and zero points (as integer-valued floats in `0..=levels`) from block min and max.
pub fn scales_zero_point(
    format: FloatFormat,
    bits: Bits,
    min: &[f32],
    max: &[f32],
    alpha: f64,
    scale: &mut [f32],
    zero_point: &mut [f32],
) -> Result<()> {
    scales_zero_point_with(Tier::best(), format, bits, min, max, alpha, scale, zero_point)
}

/// [`scales_zero_point`] on a chosen tier.
#[allow(clippy::too_many_arguments)]
pub fn scales_zero_point_with(
    tier: Tier,
    format: FloatFormat,
    bits: Bits,
    min: &[f32],
    max: &[f32],
    alpha: f64,
    scale: &mut [f32],
    zero_point: &mut [f32],
) -> Result<()> {
    let alphas = vec![format.constant(alpha); min.len()];
    scales_zero_point_alphas_with(tier, format, bits, min, max, &alphas, scale, zero_point)
}

/// [`scales_zero_point`] with one clip ratio per column (values of `format`).
#[allow(clippy::too_many_arguments)]
pub fn scales_zero_point_alphas_with(
    tier: Tier,
    format: FloatFormat,
    bits: Bits,
    min: &[f32],
    max: &[f32],
    alphas: &[f32],
    scale: &mut [f32],
    zero_point: &mut [f32],
) -> Result<()> {
    check_tier(tier)?;
    check_len("scales_zero_point max", min.len(), max.len())?;
    check_len("scales_zero_point alphas", min.len(), alphas.len())?;
    check_len("scales_zero_point scale output", min.len(), scale.len())?;
    check_len("scales_zero_point zero-point output", min.len(), zero_point.len())?;
    let clip_min = format.constant(CLIP_MIN);
    let levels = bits.levels();
    macro_rules! run {
        ($p:expr) => {
            tier.dispatch(ZeroPoint { min, max, alphas, levels, clip_min, scale, zero_point, _p: $p })
        };
    }
    match format {
        FloatFormat::F32 => run!(F32),
        FloatFormat::F16 => run!(F16),
        FloatFormat::BF16 => run!(BF16),
    }
    // Lanes whose rounded range overflowed the dtype although both ends are finite (rare; the same
    // scalar code on every tier).
    for c in 0..min.len() {
        if scale[c].is_infinite() && min[c].is_finite() && max[c].is_finite() {
            (scale[c], zero_point[c]) = zero_point_wide_range(format, levels, min[c], max[c], alphas[c]);
        }
    }
    Ok(())
}

/// Scale and zero point of a block whose range `rnd(hi - lo)` overflows `format`: the range and
/// `range / levels` in f64 (the difference exact for f16 ends), rounded once to `format`; then the zero
/// point as usual. `min`, `max` finite; `alpha` a value of `format`.
pub fn zero_point_wide_range(format: FloatFormat, levels: f32, min: f32, max: f32, alpha: f32) -> (f32, f32) {
    let hi = format.round(if max < 0.0 { 0.0 } else { max } * alpha);
    let lo = format.round(if min > 0.0 { 0.0 } else { min } * alpha);
    let s = format.constant((hi as f64 - lo as f64) / levels as f64);
    let t = format.round(lo / s).round_ties_even();
    (s, (-t).clamp(0.0, levels) + 0.0)
}

struct Symmetric<'a, P> {
    amax: &'a [f32],
    alphas: &'a [f32],
    qmax: f32,
    clip_min: f32,
    scale: &'a mut [f32],
    _p: P,
}

impl<P: Precision> WithSimd for Symmetric<'_, P> {
    type Output = ();

    #[inline(always)]
    fn with_simd<S: Simd>(self, simd: S) {
        let Self { amax, alphas, qmax, clip_min, scale, _p: _ } = self;
        let qmax = simd.splat_f32s(qmax);
        let clip_min = simd.splat_f32s(clip_min);
        for_each_chunk::<S>(amax.len(), |j, n| {
            let a = load_f32(simd, &amax[j..j + n]);
            let alpha = load_f32(simd, &alphas[j..j + n]);
            let s = P::round_simd(simd, simd.mul_f32s(a, alpha));
            let s = P::round_simd(simd, simd.div_f32s(s, qmax));
            store_f32(simd, &mut scale[j..j + n], simd.max_f32s(s, clip_min));
        });
    }
}

struct ZeroPoint<'a, P> {
    min: &'a [f32],
    max: &'a [f32],
    alphas: &'a [f32],
    levels: f32,
    clip_min: f32,
    scale: &'a mut [f32],
    zero_point: &'a mut [f32],
    _p: P,
}

impl<P: Precision> WithSimd for ZeroPoint<'_, P> {
    type Output = ();

    #[inline(always)]
    fn with_simd<S: Simd>(self, simd: S) {
        let Self { min, max, alphas, levels, clip_min, scale, zero_point, _p: _ } = self;
        let clip_min = simd.splat_f32s(clip_min);
        let (lo_q, hi_q) = (simd.splat_f32s(-levels), simd.splat_f32s(0.0));
        let levels = simd.splat_f32s(levels);
        let zero = simd.splat_f32s(0.0);
        for_each_chunk::<S>(min.len(), |j, n| {
            let alpha = load_f32(simd, &alphas[j..j + n]);
            // The range contains zero: max(max, 0) and min(min, 0) (NaN compares false and stays).
            let mx = load_f32(simd, &max[j..j + n]);
            let mn = load_f32(simd, &min[j..j + n]);
            let mx = simd.select_f32s(simd.less_than_f32s(mx, zero), zero, mx);
            let mn = simd.select_f32s(simd.greater_than_f32s(mn, zero), zero, mn);
            let hi = P::round_simd(simd, simd.mul_f32s(mx, alpha));
            let lo = P::round_simd(simd, simd.mul_f32s(mn, alpha));
            let range = simd.max_f32s(P::round_simd(simd, simd.sub_f32s(hi, lo)), clip_min);
            let s = P::round_simd(simd, simd.div_f32s(range, levels));
            // clip(-rint(t), 0, L) == -rint(clip(t, -L, 0)); adding +0.0 turns -0.0 into +0.0.
            let t = P::round_simd(simd, simd.div_f32s(lo, s));
            let zp = simd.sub_f32s(hi_q, rint_clamped(simd, t, lo_q, hi_q));
            store_f32(simd, &mut scale[j..j + n], s);
            store_f32(simd, &mut zero_point[j..j + n], zp);
        });
    }
}
