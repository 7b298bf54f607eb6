//! Block absmax: `amax[n] = max_k |w[k, n]|` over the rows of a slab.
//!
//! Computed on the magnitude bits as unsigned integers: for non-negative floats the integer order
//! is the float order, and NaN (bits above `0x7f80_0000`) wins the maximum, so a non-finite block
//! shows as a non-finite `amax` on every tier alike (float `max` instructions differ on NaN).

use super::{check_len, check_tier, slab_rows};
use crate::simd::{for_each_chunk, load_u32, store_u32, Element};
use crate::{Result, Tier};
use pulp::{Simd, WithSimd};

/// `amax[n] = max over rows of |w[row * cols + n]|`; `w.len()` a multiple of `cols`,
/// `amax.len() == cols`. An empty slab gives zeros.
pub fn block_absmax(w: &[f32], cols: usize, amax: &mut [f32]) -> Result<()> {
    block_absmax_with(Tier::best(), w, cols, amax)
}

/// [`block_absmax`] on a chosen tier.
pub fn block_absmax_with(tier: Tier, w: &[f32], cols: usize, amax: &mut [f32]) -> Result<()> {
    check_tier(tier)?;
    slab_rows("block_absmax weight", w.len(), cols)?;
    check_len("block_absmax output", cols, amax.len())?;
    block_absmax_rows(tier, w, w.len() / cols.max(1), cols, cols, amax);
    Ok(())
}

/// [`block_absmax_with`] over `rows` rows of `cols` elements of any [`Element`] type, row `r` at
/// `w[r * stride..]` (a column stripe of a wider matrix, f16/bf16 widened in registers). The caller
/// has checked the tier, `amax.len() == cols` and that `w` holds `(rows - 1) * stride + cols`
/// elements or more.
pub(crate) fn block_absmax_rows<E: Element>(
    tier: Tier,
    w: &[E],
    rows: usize,
    cols: usize,
    stride: usize,
    amax: &mut [f32],
) {
    tier.dispatch(BlockAbsmax { w, rows, cols, stride, t: None, amax });
}

/// [`block_absmax_rows`] of the slab scaled by one factor per row, `amax[n] = max over rows r of
/// |w[r * stride + n] * t[r]|` (the products in f32, in registers; `t.len()` rows). This is also
/// the absmax of `rnd(w * t[:, None])` once rounded to the format (rounding is monotone and odd),
/// and it is finite exactly when every product is (NaN wins, as above): AWQ-lite's finite check.
pub(crate) fn block_absmax_scaled_rows(tier: Tier, w: &[f32], t: &[f32], cols: usize, stride: usize, amax: &mut [f32]) {
    tier.dispatch(BlockAbsmax { w, rows: t.len(), cols, stride, t: Some(t), amax });
}

struct BlockAbsmax<'a, E> {
    w: &'a [E],
    rows: usize,
    cols: usize,
    stride: usize,
    t: Option<&'a [f32]>,
    amax: &'a mut [f32],
}

impl<E: Element> WithSimd for BlockAbsmax<'_, E> {
    type Output = ();

    #[inline(always)]
    fn with_simd<S: Simd>(self, simd: S) {
        let Self { w, rows, cols, stride, t, amax } = self;
        let acc: &mut [u32] = bytemuck::cast_slice_mut(amax);
        acc.fill(0);
        if cols == 0 {
            return;
        }
        let mask = simd.splat_u32s(0x7fff_ffff);
        for r in 0..rows {
            let row = &w[r * stride..r * stride + cols];
            let tr = t.map(|t| simd.splat_f32s(t[r]));
            for_each_chunk::<S>(cols, |j, n| {
                let v = E::load(simd, &row[j..j + n]);
                let v = tr.map_or(v, |tr| simd.mul_f32s(v, tr));
                let x = simd.and_u32s(pulp::cast(v), mask);
                let a = load_u32(simd, &acc[j..j + n]);
                store_u32(simd, &mut acc[j..j + n], simd.max_u32s(a, x));
            });
        }
    }
}
