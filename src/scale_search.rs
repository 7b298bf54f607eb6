//! Data-free scale search: per block and column, the scale (and zero point) on a grid that
//! minimizes the block's weight reconstruction error, optionally weighted per row.
//!
//! ```text
//! err(s, zp) = sum_k h_k (w_k - dq(q(w_k; s, zp)))^2          (h_k = 1, or the Hessian diagonal)
//!
//! candidates, in order (the first strictly smallest error wins, so ties keep the earlier one):
//!   symmetric:  ModelOpt's formula           s = max(rnd(rnd(amax) / qmax), c)        (always first)
//!               15 levels x clip ratio r     s = max(rnd(rnd(amax * r) / qmax), c)     codes -8..7
//!               16 levels x clip ratio r     s = rnd(rnd(e * r) / qmin)                codes -8..7
//!                                            e = the block's signed extreme (largest |w|, its sign)
//!   zero point: ModelOpt's formula           [lo, hi] = [min, max]                     (always first)
//!               range with zero x r          [lo, hi] = [min(min, 0) * r, max(max, 0) * r]
//!               s = rnd(max(rnd(hi - lo), c) / levels),  zp = clip(-rint(rnd(lo / s)), 0, levels)
//! ```
//!
//! `rnd` rounds to the weight dtype, `c = rnd(1e-5)`; `qmax, qmin, levels` are 7, -8, 15 for
//! 4 bits and 127, -128, 255 for 8. The 16-level scale is ONNX Runtime's RTN
//! (`MlasQuantizeBlockwise`: `scale = max / -8` with `max` the signed extreme), which puts the
//! extreme on code -8 and uses all 16 levels; its scale is negative when the extreme is positive
//! (DequantizeLinear and MatMulNBits take any sign). A 16-level scale under `c` in magnitude is
//! replaced by `c`. The clip ratios default to AWQ-clip's grid `0.5, 0.55, ..., 1.0`
//! ([`clip_alphas`](crate::awq::clip_alphas); any finer grid in `(0, 1]` works).
//!
//! Because ModelOpt's formula is the first candidate, the chosen scale's error is never larger
//! than the formula's. Each candidate is evaluated with the crate's fake-quantization kernel
//! ([`qdq_error`](crate::kernels::qdq_error()), bit-exact with the codes [`quantize`](crate::kernels::quantize())
//! writes), so the error minimized is the error of the stored codes. The result is a
//! [`QuantizedWeight`] like [`quantize_weight`](crate::quantize_weight())'s.

use crate::kernels::{self, scales::CLIP_MIN, QdqOutput};
use crate::{Bits, Error, FloatFormat, QuantParams, QuantizedWeight, Result, Tier, WeightData};
use rayon::prelude::*;

/// The candidate scales of the search.
#[derive(Clone, Debug, PartialEq)]
pub struct ScaleGrid {
    /// Clip ratios in `(0, 1]` (ratio 1 is the full range).
    pub clip_ratios: Vec<f64>,
    /// Symmetric: ModelOpt's 15-level scales `amax * r / qmax`.
    pub modelopt_levels: bool,
    /// Symmetric: ONNX Runtime's 16-level scales `extreme * r / qmin`.
    pub full_levels: bool,
}

impl Default for ScaleGrid {
    /// Both grids, clip ratios `0.5, 0.55, ..., 1.0` (AWQ-clip's).
    fn default() -> Self {
        ScaleGrid { clip_ratios: crate::awq::clip_alphas(0.5, 0.05), modelopt_levels: true, full_levels: true }
    }
}

impl ScaleGrid {
    /// Both grids at clip ratios `min, min + 0.05, ..., 1.0` (`min` = 1: the full range only,
    /// the choice between the two grids per block).
    pub fn clipped_to(min: f64) -> ScaleGrid {
        ScaleGrid { clip_ratios: crate::awq::clip_alphas(min, 0.05), ..ScaleGrid::default() }
    }

    fn check(&self) -> Result<()> {
        if self.clip_ratios.iter().any(|r| !(r.is_finite() && *r > 0.0 && *r <= 1.0)) {
            return Err(Error::BadGptqParam { what: "scale search clip ratio", why: "every ratio must be in (0, 1]" });
        }
        Ok(())
    }
}

/// Searches the scales (and zero points) of one block: `w` is `rows x n` row-major (values of
/// `format`), `padded` says the block is the zero-padded last one (ModelOpt's min/max then
/// include 0), `row_weights` (`rows` long, non-negative) weights each row's squared error.
/// Writes `scale[n]` (values of `format`) and, with a zero point, `zero_point[n]` (integer-valued,
/// `0..=levels`).
///
/// # Errors
/// Length mismatches, an unavailable tier, non-finite weights ([`Error::NonFinite`] with block 0:
/// the caller knows which block it passed), a bad grid.
#[allow(clippy::too_many_arguments)]
pub fn search_block(
    tier: Tier,
    format: FloatFormat,
    bits: Bits,
    w: &[f32],
    n: usize,
    padded: bool,
    row_weights: Option<&[f32]>,
    grid: &ScaleGrid,
    scale: &mut [f32],
    zero_point: Option<&mut [f32]>,
) -> Result<()> {
    kernels::check_tier(tier)?;
    grid.check()?;
    let rows = kernels::slab_rows("scale search block", w.len(), n)?;
    kernels::check_len("scale search scales", n, scale.len())?;
    if let Some(h) = row_weights {
        kernels::check_len("scale search row weights", rows, h.len())?;
    }
    let non_finite = |column: usize| Error::NonFinite { block: 0, column, start: 0, end: rows };
    let (mut lo, mut hi) = (vec![0.0f32; n], vec![0.0f32; n]);
    kernels::block_minmax_with(tier, w, n, padded, &mut lo, &mut hi)?;
    if let Some(c) = (0..n).find(|&c| !lo[c].is_finite() || !hi[c].is_finite()) {
        return Err(non_finite(c));
    }
    let clip_min = format.constant(CLIP_MIN);
    let mut best = vec![f32::INFINITY; n];
    let mut cand_s = vec![0.0f32; n];
    let mut cand_z = vec![0.0f32; n];
    let mut err = vec![0.0f32; rows * n];
    let mut acc = vec![0.0f32; n];
    let mut consider = |cand_s: &[f32], cand_z: Option<&[f32]>, scale: &mut [f32], zp_out: Option<&mut [f32]>| {
        kernels::qdq_error_with(tier, format, bits, w, n, cand_s, cand_z, QdqOutput::Error, &mut err)?;
        acc.fill(0.0);
        for (r, row) in err.chunks_exact(n.max(1)).enumerate() {
            let h = row_weights.map_or(1.0, |h| h[r]);
            for (a, &e) in acc.iter_mut().zip(row) {
                *a += h * (e * e);
            }
        }
        let mut zp_out = zp_out;
        for j in 0..n {
            if acc[j] < best[j] {
                best[j] = acc[j];
                scale[j] = cand_s[j];
                if let (Some(z), Some(c)) = (zp_out.as_deref_mut(), cand_z) {
                    z[j] = c[j];
                }
            }
        }
        Ok::<(), Error>(())
    };
    match zero_point {
        Some(zp) => {
            kernels::check_len("scale search zero points", n, zp.len())?;
            let ones = vec![1.0f32; n];
            kernels::scales_zero_point_alphas_with(tier, format, bits, &lo, &hi, &ones, &mut cand_s, &mut cand_z)?;
            consider(&cand_s, Some(&cand_z), scale, Some(zp))?;
            let lo0: Vec<f32> = lo.iter().map(|&v| v.min(0.0)).collect();
            let hi0: Vec<f32> = hi.iter().map(|&v| v.max(0.0)).collect();
            for &r in &grid.clip_ratios {
                let ratio = vec![format.constant(r); n];
                kernels::scales_zero_point_alphas_with(
                    tier,
                    format,
                    bits,
                    &lo0,
                    &hi0,
                    &ratio,
                    &mut cand_s,
                    &mut cand_z,
                )?;
                consider(&cand_s, Some(&cand_z), scale, Some(zp))?;
            }
        }
        None => {
            let amax: Vec<f32> = lo.iter().zip(&hi).map(|(&l, &h)| l.abs().max(h.abs())).collect();
            let ones = vec![1.0f32; n];
            kernels::scales_symmetric_alphas_with(tier, format, bits, &amax, &ones, &mut cand_s)?;
            consider(&cand_s, None, scale, None)?;
            for &r in &grid.clip_ratios {
                let ratio = vec![format.constant(r); n];
                if grid.modelopt_levels && r != 1.0 {
                    kernels::scales_symmetric_alphas_with(tier, format, bits, &amax, &ratio, &mut cand_s)?;
                    consider(&cand_s, None, scale, None)?;
                }
                if grid.full_levels {
                    let qmin = bits.qmin();
                    for j in 0..n {
                        // The signed extreme: ties between |min| and |max| take max (negative scale).
                        let e = if -lo[j] > hi[j] { lo[j] } else { hi[j] };
                        let s = format.round(format.round(e * ratio[j]) / qmin);
                        cand_s[j] = if s.abs() < clip_min { clip_min } else { s };
                    }
                    consider(&cand_s, None, scale, None)?;
                }
            }
        }
    }
    Ok(())
}

/// Quantizes a whole weight with searched scales: [`quantize_weight`](crate::quantize_weight())'s
/// output form (codes packed in the weight's row-major order, scales `[ceil(K/B), N]` for axis 0
/// or `[R, ceil(C/B)]` for axis 1, zero points), blocks in parallel. `params.alpha` is ignored
/// (the clip ratio is searched). `row_weights`, if given, holds one non-negative weight per
/// element of the quantized axis (e.g. the Hessian diagonal `2 E[x_k^2]` of a MatMul weight's
/// inputs, for an activation-aware search).
///
/// # Errors
/// As [`quantize_weight`](crate::quantize_weight()), plus [`Error::BadGptqParam`] for a bad grid.
pub fn scale_search_weight(
    data: WeightData<'_>,
    shape: [usize; 2],
    params: &QuantParams,
    grid: &ScaleGrid,
    row_weights: Option<&[f32]>,
) -> Result<QuantizedWeight> {
    scale_search_weight_with(Tier::best(), data, shape, params, grid, row_weights)
}

/// [`scale_search_weight`] on a chosen tier.
pub fn scale_search_weight_with(
    tier: Tier,
    data: WeightData<'_>,
    [r, c]: [usize; 2],
    params: &QuantParams,
    grid: &ScaleGrid,
    row_weights: Option<&[f32]>,
) -> Result<QuantizedWeight> {
    kernels::check_tier(tier)?;
    grid.check()?;
    kernels::check_len("weight", r * c, data.len())?;
    let format = data.format();
    let w = data.to_f32(0..r * c);
    let (kn, [k, n]) = match params.axis {
        0 => (w, [r, c]),
        1 => (std::borrow::Cow::Owned(transpose(&w, r, c)), [c, r]),
        axis => return Err(Error::BadAxis { axis }),
    };
    if let Some(h) = row_weights {
        kernels::check_len("scale search row weights", k, h.len())?;
    }
    let block = params.block_size.resolve(k);
    let nb = k.div_ceil(block);
    let mut codes = vec![0u8; k * n];
    let mut scale = vec![0.0f32; nb * n];
    let mut zp = vec![0.0f32; if params.zero_point { nb * n } else { 0 }];
    let zp_chunks: Vec<&mut [f32]> = if params.zero_point {
        zp.chunks_mut(n.max(1)).collect()
    } else {
        (0..nb).map(|_| Default::default()).collect()
    };
    codes
        .par_chunks_mut((block * n).max(1))
        .zip(scale.par_chunks_mut(n.max(1)))
        .zip(zp_chunks)
        .enumerate()
        .try_for_each(|(b, ((codes, scale), zp))| {
            let rows = b * block..((b + 1) * block).min(k);
            let wb = &kn[rows.start * n..rows.end * n];
            let h = row_weights.map(|h| &h[rows.clone()]);
            let padded = rows.len() < block;
            let zp: Option<&mut [f32]> = params.zero_point.then_some(zp);
            let mut zp = zp;
            search_block(tier, format, params.bits, wb, n, padded, h, grid, scale, zp.as_deref_mut()).map_err(|e| {
                match e {
                    Error::NonFinite { column, .. } => {
                        Error::NonFinite { block: b, column, start: rows.start, end: rows.end }
                    }
                    e => e,
                }
            })?;
            kernels::quantize_with(tier, format, params.bits, wb, n, scale, zp.as_deref(), &mut codes[..wb.len()])
        })?;
    let codes = if params.axis == 1 { transpose(&codes, k, n) } else { codes };
    let packed = match params.bits {
        Bits::Four => {
            let mut packed = vec![0u8; (k * n).div_ceil(2)];
            kernels::pack_nibbles_with(tier, &codes, &mut packed)?;
            packed
        }
        Bits::Eight => codes,
    };
    let zero_point = params.zero_point.then(|| zp.iter().map(|&z| z as u8).collect::<Vec<u8>>());
    Ok(if params.axis == 1 {
        QuantizedWeight {
            packed,
            scale: transpose(&scale, nb, n),
            scale_shape: [n, nb],
            zero_point: zero_point.map(|z| transpose(&z, nb, n)),
            block,
        }
    } else {
        QuantizedWeight { packed, scale, scale_shape: [nb, n], zero_point, block }
    })
}

/// The transpose of row-major `[rows, cols]`.
fn transpose<T: Copy + Default>(v: &[T], rows: usize, cols: usize) -> Vec<T> {
    let mut t = vec![T::default(); v.len()];
    for i in 0..rows {
        for j in 0..cols {
            t[j * rows + i] = v[i * cols + j];
        }
    }
    t
}
