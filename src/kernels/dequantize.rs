//! Dequantize code bytes of a slab with per-column scales (and zero points).
//!
//! ```text
//! symmetric:  dq = rnd(q * s)            q the signed byte (-8..=7, or -128..=127 for 8 bits)
//! zero point: dq = rnd((q - zp) * s)     q the unsigned byte (0..=15, or 0..=255); q - zp is exact
//! ```

use super::check_slab;
use crate::float::{Precision, BF16, F16, F32};
use crate::simd::{for_each_chunk, from_int, load_bytes_ext, load_f32, store_f32};
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

    #[inline(always)]
    fn with_simd<S: Simd>(self, simd: S) {
        let Self { codes, cols, scale, zero_point, out, _p: _ } = self;
        // The zero-point choice stays outside the loops, so each loop is specialized. The code
        // bytes are widened in registers (sign-extended without zero points).
        let rows = codes.chunks_exact(cols).zip(out.chunks_exact_mut(cols));
        match zero_point {
            None => {
                for (row, out) in rows {
                    for_each_chunk::<S>(cols, |j, n| {
                        let q = from_int(simd, load_bytes_ext(simd, &row[j..j + n], true));
                        let dq = simd.mul_f32s(q, load_f32(simd, &scale[j..j + n]));
                        store_f32(simd, &mut out[j..j + n], P::round_simd(simd, dq));
                    });
                }
            }
            Some(zp) => {
                for (row, out) in rows {
                    for_each_chunk::<S>(cols, |j, n| {
                        let q = from_int(simd, load_bytes_ext(simd, &row[j..j + n], false));
                        let steps = simd.sub_f32s(q, load_f32(simd, &zp[j..j + n]));
                        let dq = simd.mul_f32s(steps, load_f32(simd, &scale[j..j + n]));
                        store_f32(simd, &mut out[j..j + n], P::round_simd(simd, dq));
                    });
                }
            }
        }
    }
}
