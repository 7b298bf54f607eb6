//! Fused quantize-dequantize ("fake quantization") of a slab, for the AWQ searches, without
//! materializing the codes:
//!
//! ```text
//! symmetric:  dq = rnd(clip(rint(rnd(w / s)), qmin, qmax) * s)
//! zero point: dq = rnd((clip(rint(rnd(w / s)) + zp, 0, levels) - zp) * s)
//! out = dq                    (QdqOutput::Dequantized, what ModelOpt's dq_tensor(rtn(w)) gives)
//! out = w - dq  (in f32)      (QdqOutput::Error, the per-element quantization error)
//! ```
//!
//! Bit-exact with [`quantize`](super::quantize) followed by [`dequantize`](super::dequantize).
//!
//! [`qdq_unscaled_error`] is AWQ-lite's error matrix of a slab in one pass: the slab is scaled by
//! one factor per row in registers (never stored), fake-quantized, and its error written in the
//! unscaled weight's terms:
//!
//! ```text
//! x = rnd(w[r, c] * t[r])      (as scale_rows)
//! out[r, c] = w[r, c] - dq(x) / t[r]   (in f32, as unscaled_error)
//! ```
//!
//! the same bits as [`scale_rows`](super::scale_rows), this kernel's `Dequantized` output and
//! [`unscaled_error`](super::unscaled_error) in turn, with one store per element instead of three.

use super::{check_len, check_slab};
use crate::float::{Precision, BF16, F16, F32};
use crate::kernels::code::{quantize_lanes, reciprocals, CodeBounds};
use crate::simd::{load_f32, store_f32};
use crate::{Bits, FloatFormat, Result, Tier};
use pulp::{Simd, WithSimd};

/// What [`qdq_error`] writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QdqOutput {
    /// The dequantized weight `dq`.
    Dequantized,
    /// The error `w - dq`, computed in f32.
    Error,
}

/// Fake-quantizes the slab `w` (`rows * cols`) with `scale[cols]` (and `zero_point[cols]`).
#[allow(clippy::too_many_arguments)]
pub fn qdq_error(
    format: FloatFormat,
    bits: Bits,
    w: &[f32],
    cols: usize,
    scale: &[f32],
    zero_point: Option<&[f32]>,
    output: QdqOutput,
    out: &mut [f32],
) -> Result<()> {
    qdq_error_with(Tier::best(), format, bits, w, cols, scale, zero_point, output, out)
}

/// [`qdq_error`] on a chosen tier.
#[allow(clippy::too_many_arguments)]
pub fn qdq_error_with(
    tier: Tier,
    format: FloatFormat,
    bits: Bits,
    w: &[f32],
    cols: usize,
    scale: &[f32],
    zero_point: Option<&[f32]>,
    output: QdqOutput,
    out: &mut [f32],
) -> Result<()> {
    check_slab("qdq", tier, w.len(), cols, scale, zero_point, w.len(), out.len())?;
    if cols == 0 {
        return Ok(());
    }
    let error = output == QdqOutput::Error;
    let job = Qdq { w, bits, cols, scale, zero_point, error, unscale: None, out, _p: () };
    run(tier, format, job);
    Ok(())
}

/// Runs `job` on `tier` in `format`'s precision.
fn run(tier: Tier, format: FloatFormat, job: Qdq<'_, ()>) {
    let Qdq { w, bits, cols, scale, zero_point, error, unscale, out, _p: () } = job;
    macro_rules! run {
        ($p:expr) => {
            tier.dispatch(Qdq { w, bits, cols, scale, zero_point, error, unscale, out, _p: $p })
        };
    }
    match format {
        FloatFormat::F32 => run!(F32),
        FloatFormat::F16 => run!(F16),
        FloatFormat::BF16 => run!(BF16),
    }
}

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
    let unscale = Some(Unscale { t, stride });
    run(tier, format, Qdq { w, bits, cols, scale, zero_point, error: true, unscale, out, _p: () });
}

/// The row factors and row stride of [`qdq_unscaled_error_rows`].
#[derive(Clone, Copy)]
struct Unscale<'a> {
    t: &'a [f32],
    stride: usize,
}

struct Qdq<'a, P> {
    w: &'a [f32],
    bits: Bits,
    cols: usize,
    scale: &'a [f32],
    zero_point: Option<&'a [f32]>,
    error: bool,
    unscale: Option<Unscale<'a>>,
    out: &'a mut [f32],
    _p: P,
}

impl<P: Precision> WithSimd for Qdq<'_, P> {
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

impl<P: Precision> Qdq<'_, P> {
    #[inline(always)]
    fn body<S: Simd, const BITS: u32>(self, simd: S) {
        let bits = if BITS == 8 { Bits::Eight } else { Bits::Four };
        let Self { w, bits: _, cols, scale, zero_point, error, unscale, out, _p: _ } = self;
        let bounds = CodeBounds::new(simd, bits);
        let recip = reciprocals::<S, P>(scale);
        match unscale {
            None => {
                for (row, out) in w.chunks_exact(cols).zip(out.chunks_exact_mut(cols)) {
                    qdq_row::<S, P>(simd, &bounds, row, None, scale, &recip, zero_point, error, out);
                }
            }
            Some(Unscale { t, stride }) => {
                for (r, &tr) in t.iter().enumerate() {
                    let at = r * stride..r * stride + cols;
                    let t = Some(simd.splat_f32s(tr));
                    qdq_row::<S, P>(simd, &bounds, &w[at.clone()], t, scale, &recip, zero_point, true, &mut out[at]);
                }
            }
        }
    }
}

/// One row: the input `x` (`rnd(w * t)` when the row has a factor `t`, else `w`), its fake
/// quantization, and what [`Qdq`] writes of it (the error in `w`'s terms, `w - dq / t`, with a
/// factor). A function rather than a closure so that it is inlined into the tier's code (a closure
/// called from two sites may not be, and then runs without the tier's target features).
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn qdq_row<S: Simd, P: Precision>(
    simd: S,
    bounds: &CodeBounds<S>,
    w: &[f32],
    t: Option<S::f32s>,
    scale: &[f32],
    recip: &[f32],
    zero_point: Option<&[f32]>,
    error: bool,
    out: &mut [f32],
) {
    // A plain loop, not `for_each_chunk`: its closure, reached from this function's two inlined
    // call sites, was not inlined and ran without the tier's target features (the 48M model's
    // searches 1.5x slower).
    let cols = scale.len();
    let mut j = 0;
    while j < cols {
        let n = S::F32_LANES.min(cols - j);
        let wv = load_f32(simd, &w[j..j + n]);
        let x = t.map_or(wv, |t| P::round_simd(simd, simd.mul_f32s(wv, t)));
        let s = load_f32(simd, &scale[j..j + n]);
        let r = load_f32(simd, &recip[j..j + n]);
        let zp = zero_point.map(|z| load_f32(simd, &z[j..j + n]));
        let q = quantize_lanes::<S, P>(simd, bounds, x, s, r, zp);
        let dq = match zp {
            None => simd.mul_f32s(q, s),
            Some(zp) => simd.mul_f32s(simd.sub_f32s(q, zp), s),
        };
        let dq = P::round_simd(simd, dq);
        let v = match (t, error) {
            (Some(t), _) => simd.sub_f32s(wv, simd.div_f32s(dq, t)),
            (None, true) => simd.sub_f32s(x, dq),
            (None, false) => dq,
        };
        store_f32(simd, &mut out[j..j + n], v);
        j += S::F32_LANES;
    }
}
