//! Quantize and pack in one pass: the codes of [`quantize`](super::quantize) written straight as
//! ONNX nibbles (column `2i` in the low nibble of byte `i` of the row, `2i + 1` in the high one),
//! for slabs with an even column count (so rows never share a byte).
//!
//! Each step quantizes one vector of consecutive columns (exactly `quantize`'s arithmetic) and
//! pairs neighbouring lanes into bytes, `byte = (q[2i] & 0xf) | (q[2i + 1] & 0xf) << 4`, written
//! straight into the packed row: no code buffer and no second pass. The pairing still reads the lanes
//! back through memory, which measures slower than `quantize` followed by
//! [`pack_nibbles`](super::pack_nibbles) (benches/kernels.rs), so the pipeline uses those two until
//! the pairing is done in registers.

use super::{check_slab, check_tier};
use crate::float::{Precision, BF16, F16, F32};
use crate::simd::{for_each_chunk, lanes_u32, load_f32, quantize_lanes, to_int, CodeBounds};
use crate::{Error, FloatFormat, Result, Tier};
use pulp::{Simd, WithSimd};

/// Quantizes the slab `w` (`rows * cols`, `cols` even) into `packed[rows * cols / 2]`.
pub fn quantize_packed(
    format: FloatFormat,
    w: &[f32],
    cols: usize,
    scale: &[f32],
    zero_point: Option<&[f32]>,
    packed: &mut [u8],
) -> Result<()> {
    quantize_packed_with(Tier::best(), format, w, cols, scale, zero_point, packed)
}

/// [`quantize_packed`] on a chosen tier.
pub fn quantize_packed_with(
    tier: Tier,
    format: FloatFormat,
    w: &[f32],
    cols: usize,
    scale: &[f32],
    zero_point: Option<&[f32]>,
    packed: &mut [u8],
) -> Result<()> {
    check_tier(tier)?;
    if cols % 2 != 0 {
        return Err(Error::LengthMismatch {
            what: "quantize_packed columns (must be even)",
            expected: cols + 1,
            actual: cols,
        });
    }
    check_slab("quantize_packed", tier, w.len(), cols, scale, zero_point, w.len() / 2, packed.len())?;
    if cols == 0 {
        return Ok(());
    }
    macro_rules! run {
        ($p:expr) => {
            tier.dispatch(Job { w, cols, scale, zero_point, packed, _p: $p })
        };
    }
    match format {
        FloatFormat::F32 => run!(F32),
        FloatFormat::F16 => run!(F16),
        FloatFormat::BF16 => run!(BF16),
    }
    Ok(())
}

struct Job<'a, P> {
    w: &'a [f32],
    cols: usize,
    scale: &'a [f32],
    zero_point: Option<&'a [f32]>,
    packed: &'a mut [u8],
    _p: P,
}

impl<P: Precision> WithSimd for Job<'_, P> {
    type Output = ();

    #[inline(always)]
    fn with_simd<S: Simd>(self, simd: S) {
        let Self { w, cols, scale, zero_point, packed, _p: _ } = self;
        let bounds = CodeBounds::new(simd, crate::Bits::Four);
        let nib = simd.splat_u32s(0xf);
        // One-lane tiers pair columns through a row of codes (kept in L1).
        let odd_lanes = S::F32_LANES % 2 == 1;
        let mut codes = if odd_lanes { vec![0u8; cols] } else { Vec::new() };
        for (row, out) in w.chunks_exact(cols).zip(packed.chunks_exact_mut(cols / 2)) {
            for_each_chunk::<S>(cols, |j, m| {
                let x = load_f32(simd, &row[j..j + m]);
                let s = load_f32(simd, &scale[j..j + m]);
                let zp = zero_point.map(|z| load_f32(simd, &z[j..j + m]));
                let q = quantize_lanes::<S, P>(simd, &bounds, x, s, zp);
                let q = simd.and_u32s(to_int(simd, q), nib);
                let lanes = lanes_u32::<S>(&q);
                if odd_lanes {
                    for (c, &l) in codes[j..j + m].iter_mut().zip(lanes) {
                        *c = l as u8;
                    }
                } else {
                    // m is even (LANES and cols are): pair neighbouring lanes into bytes.
                    for (p, o) in out[j / 2..(j + m) / 2].iter_mut().enumerate() {
                        *o = (lanes[2 * p] | (lanes[2 * p + 1] << 4)) as u8;
                    }
                }
            });
            if odd_lanes {
                for (o, pair) in out.iter_mut().zip(codes.chunks_exact(2)) {
                    *o = pair[0] | (pair[1] << 4);
                }
            }
        }
    }
}
