//! Block absmax: `amax[n] = max_k |w[k, n]|` over the rows of a slab.
//!
//! Computed on the magnitude bits as unsigned integers: for non-negative floats the integer order
//! is the float order, and NaN (bits above `0x7f80_0000`) wins the maximum, so a non-finite block
//! shows as a non-finite `amax` on every tier alike (float `max` instructions differ on NaN).

use super::{check_len, check_tier, slab_rows};
use crate::simd::{for_each_chunk, load_u32, store_u32};
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
    tier.dispatch(BlockAbsmax { w, cols, amax });
    Ok(())
}

struct BlockAbsmax<'a> {
    w: &'a [f32],
    cols: usize,
    amax: &'a mut [f32],
}

impl WithSimd for BlockAbsmax<'_> {
    type Output = ();

    #[inline(always)]
    fn with_simd<S: Simd>(self, simd: S) {
        let Self { w, cols, amax } = self;
        let acc: &mut [u32] = bytemuck::cast_slice_mut(amax);
        acc.fill(0);
        if cols == 0 {
            return;
        }
        let mask = simd.splat_u32s(0x7fff_ffff);
        for row in w.chunks_exact(cols) {
            let row: &[u32] = bytemuck::cast_slice(row);
            for_each_chunk::<S>(cols, |j, n| {
                let x = simd.and_u32s(load_u32(simd, &row[j..j + n]), mask);
                let a = load_u32(simd, &acc[j..j + n]);
                store_u32(simd, &mut acc[j..j + n], simd.max_u32s(a, x));
            });
        }
    }
}
