//! The per-lane code arithmetic shared by [`quantize`](super::quantize),
//! [`quantize_packed`](super::quantize_packed) and [`qdq_error`](super::qdq_error): ModelOpt's
//! `rtn` on one vector of lanes, in the weight's [`Precision`].

use crate::float::Precision;
use crate::simd::rint_clamped;
use pulp::Simd;

/// The code bounds of a [`Bits`](crate::Bits) width, splatted once outside the loops.
#[derive(Clone, Copy)]
pub(crate) struct CodeBounds<S: Simd> {
    qmin: S::f32s,
    qmax: S::f32s,
    wide_lo: S::f32s,
    wide_hi: S::f32s,
    zero: S::f32s,
    levels: S::f32s,
}

impl<S: Simd> CodeBounds<S> {
    #[inline(always)]
    pub(crate) fn new(simd: S, bits: crate::Bits) -> Self {
        let wide = bits.levels() + 1.0;
        CodeBounds {
            qmin: simd.splat_f32s(bits.qmin()),
            qmax: simd.splat_f32s(bits.qmax()),
            wide_lo: simd.splat_f32s(-wide),
            wide_hi: simd.splat_f32s(wide),
            zero: simd.splat_f32s(0.0),
            levels: simd.splat_f32s(bits.levels()),
        }
    }
}

/// The code of each lane as an integer-valued float, exactly ModelOpt's `rtn`:
/// `clip(rint(rnd(x / s)), qmin, qmax)`, or with a zero point `clip(rint(rnd(x / s)) + zp, 0, levels)`
/// (bounds of [`Bits`](crate::Bits)). The zero-point form clamps `rnd(x / s)` to
/// [-(levels + 1), levels + 1] first, which changes nothing after the final clip (zp is in
/// 0..=levels) and keeps the magic-number rounding in range.
#[inline(always)]
pub(crate) fn quantize_lanes<S: Simd, P: Precision>(
    simd: S,
    bounds: &CodeBounds<S>,
    x: S::f32s,
    s: S::f32s,
    zp: Option<S::f32s>,
) -> S::f32s {
    let y = P::round_simd(simd, simd.div_f32s(x, s));
    match zp {
        None => rint_clamped(simd, y, bounds.qmin, bounds.qmax),
        Some(z) => {
            let q = simd.add_f32s(rint_clamped(simd, y, bounds.wide_lo, bounds.wide_hi), z);
            simd.min_f32s(simd.max_f32s(q, bounds.zero), bounds.levels)
        }
    }
}
