//! ModelOpt's `quant_tensor` on one block of rows, fused: the per-column statistics (absmax, or min
//! and max), the scales (and zero points) and the codes of a slab in one pass over the weight.
//!
//! ```text
//! symmetric:   amax = max_k |w[k, n]|        s = max(rnd(rnd(amax * alpha) / qmax), 1e-5)
//! zero point:  lo, hi = min_k / max_k w[k, n] (with a padding zero)   s, zp as in kernels::scales
//! codes:       q = clip(rint(rnd(w / s)), qmin, qmax)   or   clip(rint(rnd(w / s)) + zp, 0, levels)
//! ```
//!
//! The same numbers as [`block_absmax`](super::block_absmax) (or [`block_minmax`](super::block_minmax)),
//! [`scales`](super::scales) and [`quantize`](super::quantize) run one after the other on the whole
//! slab, bit for bit; only the order of the memory traffic differs. Those read a `rows x cols` slab
//! twice (a 128 x 4096 float32 block is 2 MiB: the second read came from memory again); this kernel
//! takes the slab a column tile at a time (`rows x tile`, about [`TILE_BYTES`]): the vertical
//! maximum over the tile's rows (contiguous runs of `tile` values, vectorized across the columns),
//! the tile's scales, then its codes while the tile is still in the core's cache.

use super::block_absmax::block_absmax_strided;
use super::block_minmax::block_minmax_strided;
use super::quantize::quantize_strided;
use super::{check_len, check_tier, scales_symmetric_alphas_with, scales_zero_point_alphas_with, slab_rows};
use crate::{Bits, FloatFormat, Result, Tier};

/// Bytes of float32 weight in one column tile: well inside a core's L2 (and a quarter of the 512 KiB
/// that the smallest current x86 L2s have), so the quantize pass reads the tile from cache.
pub const TILE_BYTES: usize = 128 * 1024;

/// Column tiles are a multiple of this many columns (a whole number of 64-byte cache lines and of
/// AVX-512 vectors per row).
const TILE_COLUMNS: usize = 16;

/// The column tile [`quantize_block_with`] takes for a slab of `rows` rows: as many columns as fit
/// [`TILE_BYTES`], a multiple of 16, at least 16.
pub fn tile_columns(rows: usize) -> usize {
    (TILE_BYTES / (4 * rows.max(1)) / TILE_COLUMNS * TILE_COLUMNS).max(TILE_COLUMNS)
}

/// The scales (and zero points) of the slab `w` (`rows x cols`, row-major, one block along the
/// quantized axis) into `scale[cols]` (and `zero_point[cols]`), and, unless `codes` is empty, its
/// codes into `codes[rows * cols]` (one byte per element, as [`quantize`](super::quantize) writes
/// them).
///
/// `alpha` is the Python float clip ratio (1.0: none); `padded` marks a last block shorter than the
/// block size, whose zero padding takes part in the min and max of the zero-point form. Scales and
/// zero points are f32 values of `format`; codes follow [`Bits`].
///
/// Returns `Ok(Some(c))` for the first column `c` whose values hold NaN or infinity (its scale and
/// those after it, and the codes of its tile and after, are then not written), else `Ok(None)`.
///
/// # Errors
/// [`crate::Error::TierUnavailable`]; [`crate::Error::LengthMismatch`] if `w` is not whole rows of
/// `cols`, `scale` (or `zero_point`) does not hold `cols` values, or `codes` is neither empty nor
/// `w.len()` bytes.
#[allow(clippy::too_many_arguments)]
pub fn quantize_block_with(
    tier: Tier,
    format: FloatFormat,
    bits: Bits,
    w: &[f32],
    cols: usize,
    alpha: f64,
    padded: bool,
    scale: &mut [f32],
    zero_point: Option<&mut [f32]>,
    codes: &mut [u8],
) -> Result<Option<usize>> {
    let rows = slab_rows("quantize_block weight", w.len(), cols)?;
    quantize_block_tiled_with(tier, format, bits, w, cols, tile_columns(rows), alpha, padded, scale, zero_point, codes)
}

/// [`quantize_block_with`] with column tiles of `tile` columns (>= 1; the last tile may be
/// narrower): for tests and benches of the tiling itself.
///
/// # Errors
/// As [`quantize_block_with`]; [`crate::Error::LengthMismatch`] for `tile == 0`.
#[allow(clippy::too_many_arguments)]
pub fn quantize_block_tiled_with(
    tier: Tier,
    format: FloatFormat,
    bits: Bits,
    w: &[f32],
    cols: usize,
    tile: usize,
    alpha: f64,
    padded: bool,
    scale: &mut [f32],
    mut zero_point: Option<&mut [f32]>,
    codes: &mut [u8],
) -> Result<Option<usize>> {
    check_tier(tier)?;
    let rows = slab_rows("quantize_block weight", w.len(), cols)?;
    check_len("quantize_block scale output", cols, scale.len())?;
    if let Some(z) = zero_point.as_deref() {
        check_len("quantize_block zero-point output", cols, z.len())?;
    }
    if !codes.is_empty() {
        check_len("quantize_block codes", w.len(), codes.len())?;
    }
    if tile == 0 {
        return Err(crate::Error::LengthMismatch { what: "quantize_block tile", expected: 1, actual: 0 });
    }
    let width = tile.min(cols);
    let alphas = vec![format.constant(alpha); width];
    let mut lo = vec![0.0f32; width];
    let mut hi = vec![0.0f32; width];
    let mut c0 = 0;
    while c0 < cols {
        let n = width.min(cols - c0);
        // The tile: rows of `n` values `cols` apart, starting at column c0 (none in an empty slab).
        let span = if rows == 0 { 0..0 } else { c0..(rows - 1) * cols + c0 + n };
        let wt = &w[span.clone()];
        let (lo, hi) = (&mut lo[..n], &mut hi[..n]);
        let s = &mut scale[c0..c0 + n];
        let z = match zero_point.as_deref_mut() {
            Some(z) => {
                block_minmax_strided(tier, wt, rows, n, cols, padded, lo, hi);
                if let Some(c) = (0..n).find(|&c| !lo[c].is_finite() || !hi[c].is_finite()) {
                    return Ok(Some(c0 + c));
                }
                let z = &mut z[c0..c0 + n];
                scales_zero_point_alphas_with(tier, format, bits, lo, hi, &alphas[..n], s, z)?;
                Some(&*z)
            }
            None => {
                block_absmax_strided(tier, wt, rows, n, cols, lo);
                if let Some(c) = lo.iter().position(|a| !a.is_finite()) {
                    return Ok(Some(c0 + c));
                }
                scales_symmetric_alphas_with(tier, format, bits, lo, &alphas[..n], s)?;
                None
            }
        };
        if !codes.is_empty() {
            quantize_strided(tier, format, bits, wt, rows, n, cols, s, z, &mut codes[span]);
        }
        c0 += n;
    }
    Ok(None)
}
