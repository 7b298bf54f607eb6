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

use super::check_slab;
use crate::float::{Precision, BF16, F16, F32};
use crate::kernels::code::{quantize_lanes, reciprocals, CodeBounds};
use crate::simd::{for_each_chunk, load_f32, store_f32};
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
    macro_rules! run {
        ($p:expr) => {
            tier.dispatch(Qdq { w, bits, cols, scale, zero_point, error, out, _p: $p })
        };
    }
    match format {
        FloatFormat::F32 => run!(F32),
        FloatFormat::F16 => run!(F16),
        FloatFormat::BF16 => run!(BF16),
    }
    Ok(())
}

struct Qdq<'a, P> {
    w: &'a [f32],
    bits: Bits,
    cols: usize,
    scale: &'a [f32],
    zero_point: Option<&'a [f32]>,
    error: bool,
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
        let Self { w, bits: _, cols, scale, zero_point, error, out, _p: _ } = self;
        let bounds = CodeBounds::new(simd, bits);
        let recip = reciprocals::<S, P>(scale);
        for (row, out) in w.chunks_exact(cols).zip(out.chunks_exact_mut(cols)) {
            for_each_chunk::<S>(cols, |j, n| {
                let x = load_f32(simd, &row[j..j + n]);
                let dq = fake_quantize_lanes::<S, P>(simd, &bounds, x, j, n, scale, &recip, zero_point);
                let v = if error { simd.sub_f32s(x, dq) } else { dq };
                store_f32(simd, &mut out[j..j + n], v);
            });
        }
    }
}

/// `dq = rnd(code(x) * s)` (or `rnd((code(x) - zp) * s)`) of the lanes `x` of columns `j..j + n`.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
pub(crate) fn fake_quantize_lanes<S: Simd, P: Precision>(
    simd: S,
    bounds: &CodeBounds<S>,
    x: S::f32s,
    j: usize,
    n: usize,
    scale: &[f32],
    recip: &[f32],
    zero_point: Option<&[f32]>,
) -> S::f32s {
    let s = load_f32(simd, &scale[j..j + n]);
    let r = load_f32(simd, &recip[j..j + n]);
    let zp = zero_point.map(|z| load_f32(simd, &z[j..j + n]));
    let q = quantize_lanes::<S, P>(simd, bounds, x, s, r, zp);
    let dq = match zp {
        None => simd.mul_f32s(q, s),
        Some(zp) => simd.mul_f32s(simd.sub_f32s(q, zp), s),
    };
    P::round_simd(simd, dq)
}
