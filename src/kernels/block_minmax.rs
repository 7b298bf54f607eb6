//! Block min and max: `min[n] = min_k w[k, n]`, `max[n] = max_k w[k, n]` over the rows of a slab,
//! optionally with one extra zero (the padding of a last block shorter than the block size).
//!
//! Floats are compared through the order-preserving integer key `bits ^ ((bits >> 31) * 0x7fff_ffff)`
//! read as i32 (negative floats get their magnitude bits flipped), which is a total order:
//! `-NaN < -Inf < ... < -0.0 < +0.0 < ... < +Inf < +NaN`. Every tier gives the same answer, and a
//! block with NaN or infinity has a non-finite min or max.

use super::{check_len, check_tier, slab_rows};
use crate::simd::{for_each_chunk, load_u32, store_u32, Element};
use crate::{Result, Tier};
use pulp::{Simd, WithSimd};

/// Writes the minimum and maximum of each column of the slab `w` (`w.len()` a multiple of `cols`).
/// With `include_zero`, `+0.0` takes part as if one more row of zeros were present. An empty slab
/// without `include_zero` gives `+Inf` / `-Inf`.
pub fn block_minmax(w: &[f32], cols: usize, include_zero: bool, min: &mut [f32], max: &mut [f32]) -> Result<()> {
    block_minmax_with(Tier::best(), w, cols, include_zero, min, max)
}

/// [`block_minmax`] on a chosen tier.
pub fn block_minmax_with(
    tier: Tier,
    w: &[f32],
    cols: usize,
    include_zero: bool,
    min: &mut [f32],
    max: &mut [f32],
) -> Result<()> {
    check_tier(tier)?;
    slab_rows("block_minmax weight", w.len(), cols)?;
    check_len("block_minmax min output", cols, min.len())?;
    check_len("block_minmax max output", cols, max.len())?;
    block_minmax_rows(tier, w, w.len() / cols.max(1), cols, cols, include_zero, min, max);
    Ok(())
}

/// [`block_minmax_with`] over `rows` rows of `cols` elements of any [`Element`] type, row `r` at
/// `w[r * stride..]` (a column stripe of a wider matrix, f16/bf16 widened in registers). The caller
/// has checked the tier, the output lengths (`cols`) and that `w` holds `(rows - 1) * stride +
/// cols` elements or more.
#[allow(clippy::too_many_arguments)]
pub(crate) fn block_minmax_rows<E: Element>(
    tier: Tier,
    w: &[E],
    rows: usize,
    cols: usize,
    stride: usize,
    include_zero: bool,
    min: &mut [f32],
    max: &mut [f32],
) {
    tier.dispatch(BlockMinMax { w, rows, cols, stride, include_zero, min, max });
}

/// The order key of a float (an involution).
#[inline(always)]
pub(crate) fn key(bits: u32) -> u32 {
    bits ^ ((bits >> 31).wrapping_neg() >> 1)
}

#[inline(always)]
fn key_simd<S: Simd>(simd: S, bits: S::u32s) -> S::i32s {
    let sign = simd.wrapping_dyn_shr_u32s(bits, simd.splat_u32s(31));
    let flip = simd.wrapping_dyn_shr_u32s(simd.sub_u32s(simd.splat_u32s(0), sign), simd.splat_u32s(1));
    pulp::cast(simd.xor_u32s(bits, flip))
}

struct BlockMinMax<'a, E> {
    w: &'a [E],
    rows: usize,
    cols: usize,
    stride: usize,
    include_zero: bool,
    min: &'a mut [f32],
    max: &'a mut [f32],
}

impl<E: Element> WithSimd for BlockMinMax<'_, E> {
    type Output = ();

    #[inline(always)]
    fn with_simd<S: Simd>(self, simd: S) {
        let Self { w, rows, cols, stride, include_zero, min, max } = self;
        let lo: &mut [u32] = bytemuck::cast_slice_mut(min);
        let hi: &mut [u32] = bytemuck::cast_slice_mut(max);
        // Keys of the start values: +0.0 with padding, else +Inf for min and -Inf for max.
        let (lo0, hi0) =
            if include_zero { (0u32, 0u32) } else { (key(f32::INFINITY.to_bits()), key(f32::NEG_INFINITY.to_bits())) };
        lo.fill(lo0);
        hi.fill(hi0);
        if cols > 0 {
            for r in 0..rows {
                let row = &w[r * stride..r * stride + cols];
                for_each_chunk::<S>(cols, |j, n| {
                    let k = key_simd(simd, pulp::cast(E::load(simd, &row[j..j + n])));
                    let a: S::i32s = pulp::cast(load_u32(simd, &lo[j..j + n]));
                    let b: S::i32s = pulp::cast(load_u32(simd, &hi[j..j + n]));
                    store_u32(simd, &mut lo[j..j + n], pulp::cast(simd.min_i32s(a, k)));
                    store_u32(simd, &mut hi[j..j + n], pulp::cast(simd.max_i32s(b, k)));
                });
            }
        }
        // Keys back to floats.
        for v in lo.iter_mut().chain(hi.iter_mut()) {
            *v = key(*v);
        }
    }
}
