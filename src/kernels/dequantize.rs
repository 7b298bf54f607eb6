//! Dequantize code bytes of a slab with per-column scales (and zero points).
//!
//! ```text
//! symmetric:  dq = rnd(q * s)            q the signed byte (-8..=7, or -128..=127 for 8 bits)
//! zero point: dq = rnd((q - zp) * s)     q the unsigned byte (0..=15, or 0..=255); q - zp is exact
//! ```

use super::check_slab;
use crate::float::{Precision, BF16, F16, F32};
use crate::simd::{from_int, load_bytes_ext, load_f32, store_f32};
use crate::{FloatFormat, Result, Tier};
use pulp::{Simd, WithSimd};

/// Dequantizes `codes[rows * cols]` into `out[rows * cols]`. Without zero points the codes are
/// signed bytes (as written by [`quantize`](super::quantize)); with them, unsigned.
pub fn dequantize(
    format: FloatFormat,
    codes: &[u8],
    cols: usize,
    scale: &[f32],
    zero_point: Option<&[f32]>,
    out: &mut [f32],
) -> Result<()> {
    dequantize_with(Tier::best(), format, codes, cols, scale, zero_point, out)
}

/// [`dequantize`] on a chosen tier.
pub fn dequantize_with(
    tier: Tier,
    format: FloatFormat,
    codes: &[u8],
    cols: usize,
    scale: &[f32],
    zero_point: Option<&[f32]>,
    out: &mut [f32],
) -> Result<()> {
    check_slab("dequantize", tier, codes.len(), cols, scale, zero_point, codes.len(), out.len())?;
    if cols == 0 {
        return Ok(());
    }
    macro_rules! run {
        ($p:expr) => {
            tier.dispatch(Dequantize { codes, cols, scale, zero_point, out, _p: $p })
        };
    }
    match format {
        FloatFormat::F32 => run!(F32),
        FloatFormat::F16 => run!(F16),
        FloatFormat::BF16 => run!(BF16),
    }
    Ok(())
}

struct Dequantize<'a, P> {
    codes: &'a [u8],
    cols: usize,
    scale: &'a [f32],
    zero_point: Option<&'a [f32]>,
    out: &'a mut [f32],
    _p: P,
}

impl<P: Precision> WithSimd for Dequantize<'_, P> {
    type Output = ();

    /// Whole vectors of each row go through a plain zip over the row's vectors, code bytes and
    /// scale (and zero-point) vectors: no per-run bookkeeping, no bounds checks. The row's last
    /// `cols % LANES` columns take one partial vector.
    #[inline(always)]
    fn with_simd<S: Simd>(self, simd: S) {
        let Self { codes, cols, scale, zero_point, out, _p: _ } = self;
        let lanes = S::F32_LANES;
        let whole = cols / lanes * lanes;
        let (scale_v, _) = S::as_simd_f32s(scale);
        let signed = zero_point.is_none();
        // The zero-point choice stays outside the loops, so each loop is specialized. The code
        // bytes are widened in registers (sign-extended without zero points).
        for (row, out) in codes.chunks_exact(cols).zip(out.chunks_exact_mut(cols)) {
            let (out_v, out_tail) = S::as_mut_simd_f32s(out);
            let q = row[..whole].chunks_exact(lanes);
            match zero_point {
                None => {
                    for ((o, q), &s) in out_v.iter_mut().zip(q).zip(scale_v) {
                        *o = value::<S, P>(simd, q, true, s, None);
                    }
                }
                Some(zp) => {
                    let (zp_v, _) = S::as_simd_f32s(zp);
                    for (((o, q), &s), &z) in out_v.iter_mut().zip(q).zip(scale_v).zip(zp_v) {
                        *o = value::<S, P>(simd, q, false, s, Some(z));
                    }
                }
            }
            if whole < cols {
                let zp = zero_point.map(|z| load_f32(simd, &z[whole..]));
                let v = value::<S, P>(simd, &row[whole..], signed, load_f32(simd, &scale[whole..]), zp);
                store_f32(simd, out_tail, v);
            }
        }
    }
}

/// `rnd((q - zp) * s)` (or `rnd(q * s)`) for up to LANES code bytes.
#[inline(always)]
fn value<S: Simd, P: Precision>(simd: S, q: &[u8], signed: bool, s: S::f32s, zp: Option<S::f32s>) -> S::f32s {
    let q = from_int(simd, load_bytes_ext(simd, q, signed));
    let steps = match zp {
        Some(z) => simd.sub_f32s(q, z),
        None => q,
    };
    P::round_simd(simd, simd.mul_f32s(steps, s))
}
