//! The per-lane code arithmetic shared by [`quantize`](super::quantize),
//! [`quantize_packed`](super::quantize_packed) and [`qdq_error`](super::qdq_error): ModelOpt's
//! `rtn` on one vector of lanes, in the weight's [`Precision`].
//!
//! # f32 weights: a multiply by `1 / s`, exact by a boundary check
//!
//! The correctly rounded division `w / s` (numpy's) costs as many cycles per lane on every tier
//! (`vdivps` is one divider shared by the lanes), and bounded `quantize` on all of them. For f32
//! weights [`Divisor`] instead multiplies by the column's reciprocal `r = fl(1 / s)`, computed once
//! per slab, and proves per vector that the codes are the ones the division gives:
//!
//! - With `s` a normal float in [2^-125, 2^125] (else the slab divides), `r` is normal and
//!   `y' = fl(w * r) = (w / s)(1 + d1)(1 + d2)` while `y = fl(w / s) = (w / s)(1 + d3)`, each
//!   `|d| <= 2^-24`, so `|y' - y| <= 3.001 * 2^-24 * |y|` (a subnormal `y'` adds at most 2^-149).
//! - Codes only depend on `c = clamp(y, lo, hi)` through `rint`, with `|lo|, |hi| <= 256`
//!   (`qmin`/`qmax`, or ±(levels + 1) before a zero point), and clamp does not widen distances:
//!   `|c' - c| <= 257 * 3.001 * 2^-24 < 4.6e-5` (for |y'| above 257 both clamp to the same bound).
//! - If `c'` is at least [`RECIP_MARGIN`] = 2^-12 (2.4e-4, 5x that error) away from every
//!   half-integer (`|c' - rint(c')| < 0.5 - 2^-12`), `c` lies on the same side of the same
//!   half-integers, so `rint(c) == rint(c')` and the codes are equal.
//! - Otherwise (about 2 * 2^-12 of uniformly spread lanes, so ~1% of 16-lane vectors) the whole
//!   vector is computed again with the division.
//!
//! A NaN `w` gives NaN for both `y` and `y'` and the same clamp; an infinite `w` or an overflowing
//! product lies beyond the bounds on both paths. f16 and bf16 weights keep the division: their
//! code is `rint(rnd(y))`, whose steps lie at every half-ulp of the narrow format near a
//! half-integer, and the check would have to bracket those too (not done; see `kernels/mod.rs`).

use crate::float::Precision;
use crate::simd::{load_f32, rint_clamped, MAGIC};
use crate::FloatFormat;
use pulp::Simd;

/// How far from a half-integer (in code units) `w * (1 / s)` must land for its `rint` to be taken
/// as that of `w / s` (see the module docs for the error bound it covers, 4.6e-5).
pub(crate) const RECIP_MARGIN: f32 = 1.0 / 4096.0;

/// The smallest and largest |scale| whose reciprocal is a normal f32 with a relative error of at
/// most 2^-24 (with a factor 4 of headroom on each side).
const RECIP_SAFE: (f32, f32) = (1.0 / (1u128 << 125) as f32, (1u128 << 125) as f32);

/// The per-column scales of a slab, with their reciprocals when the weight is f32 and every scale
/// is a normal number in [2^-125, 2^125]; [`Divisor::code_lanes`] then multiplies and checks
/// instead of dividing. Built once per kernel call (one division per column).
pub(crate) struct Divisor {
    recip: Option<Vec<f32>>,
}

impl Divisor {
    pub(crate) fn new(format: FloatFormat, scale: &[f32]) -> Self {
        let safe = |s: &f32| (RECIP_SAFE.0..=RECIP_SAFE.1).contains(&s.abs());
        let recip =
            (format == FloatFormat::F32 && scale.iter().all(safe)).then(|| scale.iter().map(|&s| 1.0 / s).collect());
        Divisor { recip }
    }

    /// [`quantize_lanes`] of the columns `j..j + n` (`x` and `s` loaded from them), through the
    /// reciprocal when the slab has one.
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn code_lanes<S: Simd, P: Precision>(
        &self,
        simd: S,
        bounds: &CodeBounds<S>,
        x: S::f32s,
        s: S::f32s,
        zp: Option<S::f32s>,
        j: usize,
        n: usize,
    ) -> S::f32s {
        match &self.recip {
            Some(r) if P::FORMAT == FloatFormat::F32 => {
                let r = load_f32(simd, &r[j..j + n]);
                match quantize_lanes_recip(simd, bounds, x, r, zp) {
                    Some(q) => q,
                    None => quantize_lanes::<S, P>(simd, bounds, x, s, zp),
                }
            }
            _ => quantize_lanes::<S, P>(simd, bounds, x, s, zp),
        }
    }
}

/// The f32 code of each lane from `x * r` (`r = fl(1 / s)`), or `None` when a lane lands within
/// [`RECIP_MARGIN`] of a half-integer (the caller then divides; module docs).
#[inline(always)]
fn quantize_lanes_recip<S: Simd>(
    simd: S,
    bounds: &CodeBounds<S>,
    x: S::f32s,
    r: S::f32s,
    zp: Option<S::f32s>,
) -> Option<S::f32s> {
    let (lo, hi) = match zp {
        None => (bounds.qmin, bounds.qmax),
        Some(_) => (bounds.wide_lo, bounds.wide_hi),
    };
    let c = simd.min_f32s(simd.max_f32s(simd.mul_f32s(x, r), lo), hi);
    let m = simd.splat_f32s(MAGIC);
    let k = simd.sub_f32s(simd.add_f32s(c, m), m);
    // |c - k| is exact (k is the integer nearest c).
    let frac = simd.abs_f32s(simd.sub_f32s(c, k));
    let near = simd.greater_than_or_equal_f32s(frac, simd.splat_f32s(0.5 - RECIP_MARGIN));
    if bytemuck::bytes_of(&near).iter().any(|&b| b != 0) {
        return None;
    }
    Some(match zp {
        None => k,
        Some(z) => simd.min_f32s(simd.max_f32s(simd.add_f32s(k, z), bounds.zero), bounds.levels),
    })
}

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
