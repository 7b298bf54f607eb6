//! Quantize a slab with per-column scales (and zero points), one code byte per element.
//!
//! ```text
//! symmetric:  q = clip(rint(rnd(w / s)), qmin, qmax)      stored as the i8 byte (two's complement)
//! zero point: q = clip(rint(rnd(w / s)) + zp, 0, levels)  stored as 0..=levels
//! ```
//!
//! with the bounds of [`Bits`] (-8..=7 and 0..=15 for 4 bits, -128..=127 and 0..=255 for 8).
//!
//! `rint` is round half to even (the per-lane arithmetic is `kernels::code::quantize_lanes`, shared with the
//! fused kernels).

use super::check_slab;
use crate::float::{Precision, BF16, F16, F32};
use crate::kernels::code::{quantize_lanes, reciprocals, CodeBounds};
use crate::simd::{for_each_chunk, load_f32, store_low_bytes, to_int};
use crate::{Bits, FloatFormat, Result, Tier};
use pulp::{Simd, WithSimd};

/// Quantizes the slab `w` (`rows * cols`, row-major) with `scale[cols]` and optional
/// `zero_point[cols]` into `codes[rows * cols]`.
pub fn quantize(
    format: FloatFormat,
    bits: Bits,
    w: &[f32],
    cols: usize,
    scale: &[f32],
    zero_point: Option<&[f32]>,
    codes: &mut [u8],
) -> Result<()> {
    quantize_with(Tier::best(), format, bits, w, cols, scale, zero_point, codes)
}

/// [`quantize`] on a chosen tier.
#[allow(clippy::too_many_arguments)]
pub fn quantize_with(
    tier: Tier,
    format: FloatFormat,
    bits: Bits,
    w: &[f32],
    cols: usize,
    scale: &[f32],
    zero_point: Option<&[f32]>,
    codes: &mut [u8],
) -> Result<()> {
    let op = Quantize { w, bits, cols, scale, zero_point, codes, _p: F32 };
    checked(tier, format, op, true)
}

/// [`quantize_with`] on the tier's hand-written lanes for every format (f32 included), for the
/// benches that compare them with the auto-vectorized f32 body the dispatch uses.
#[doc(hidden)]
#[allow(clippy::too_many_arguments)]
pub fn quantize_handwritten_with(
    tier: Tier,
    format: FloatFormat,
    bits: Bits,
    w: &[f32],
    cols: usize,
    scale: &[f32],
    zero_point: Option<&[f32]>,
    codes: &mut [u8],
) -> Result<()> {
    let op = Quantize { w, bits, cols, scale, zero_point, codes, _p: F32 };
    checked(tier, format, op, false)
}

/// Checks `op`'s lengths and runs it: f32 on the auto-vectorized scalar body when `autovec` (it
/// beats the hand-written lanes on both x86 tiers, dispatch table in `kernels`), else on the
/// tier's hand-written lanes.
fn checked(tier: Tier, format: FloatFormat, op: Quantize<'_, F32>, autovec: bool) -> Result<()> {
    let Quantize { w, cols, scale, zero_point, ref codes, .. } = op;
    check_slab("quantize", tier, w.len(), cols, scale, zero_point, w.len(), codes.len())?;
    if cols == 0 {
        return Ok(());
    }
    match format {
        FloatFormat::F32 if autovec => tier.dispatch_autovec(op),
        _ => run(tier, format, op),
    }
    Ok(())
}

/// Runs `op` (built for f32) on `tier`'s hand-written lanes in `format`'s precision.
fn run(tier: Tier, format: FloatFormat, op: Quantize<'_, F32>) {
    let Quantize { w, bits, cols, scale, zero_point, codes, _p: _ } = op;
    macro_rules! run {
        ($p:expr) => {
            tier.dispatch(Quantize { w, bits, cols, scale, zero_point, codes, _p: $p })
        };
    }
    match format {
        FloatFormat::F32 => run!(F32),
        FloatFormat::F16 => run!(F16),
        FloatFormat::BF16 => run!(BF16),
    }
}

struct Quantize<'a, P> {
    w: &'a [f32],
    bits: Bits,
    cols: usize,
    scale: &'a [f32],
    zero_point: Option<&'a [f32]>,
    codes: &'a mut [u8],
    _p: P,
}

impl<P: Precision> WithSimd for Quantize<'_, P> {
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

impl<P: Precision> Quantize<'_, P> {
    #[inline(always)]
    fn body<S: Simd, const BITS: u32>(self, simd: S) {
        let bits = if BITS == 8 { Bits::Eight } else { Bits::Four };
        let Self { w, bits: _, cols, scale, zero_point, codes, _p: _ } = self;
        let bounds = CodeBounds::new(simd, bits);
        let recip = reciprocals::<S, P>(scale);
        // The zero-point choice stays outside the loops, so each loop is specialized.
        let rows = w.chunks_exact(cols).zip(codes.chunks_exact_mut(cols));
        match zero_point {
            None => {
                for (row, out) in rows {
                    for_each_chunk::<S>(cols, |j, n| {
                        let x = load_f32(simd, &row[j..j + n]);
                        let s = load_f32(simd, &scale[j..j + n]);
                        let r = load_f32(simd, &recip[j..j + n]);
                        let q = quantize_lanes::<S, P>(simd, &bounds, x, s, r, None);
                        store_low_bytes(simd, to_int(simd, q), &mut out[j..j + n]);
                    });
                }
            }
            Some(zero_point) => {
                for (row, out) in rows {
                    for_each_chunk::<S>(cols, |j, n| {
                        let x = load_f32(simd, &row[j..j + n]);
                        let s = load_f32(simd, &scale[j..j + n]);
                        let r = load_f32(simd, &recip[j..j + n]);
                        let zp = load_f32(simd, &zero_point[j..j + n]);
                        let q = quantize_lanes::<S, P>(simd, &bounds, x, s, r, Some(zp));
                        store_low_bytes(simd, to_int(simd, q), &mut out[j..j + n]);
                    });
                }
            }
        }
    }
}
