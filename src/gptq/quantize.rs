//! GPTQ's row loop: quantize one input channel (a row of `W: [K, N]`) at a time and feed its
//! error forward through the inverse-Hessian factor, in lazy batches (see the [module
//! docs](super) for the formulas).
//!
//! Two levels of lazy updates: inside a batch of `lazy_batch` rows, segments of [`INNER`] rows are
//! updated row by row (rank-1 updates on the segment's later rows); a segment's end updates the
//! rest of the batch with one GEMM, and a batch's end updates all later rows with one GEMM. So
//! almost all flops run in `dgemm`. With block-start scales, segment and batch ends are moved so
//! that a block never starts inside a segment it outlasts: its scale is then computed on weights
//! that have received every earlier row's feedback, exactly as in the row-by-row algorithm.

use super::{GptqFactor, GptqParams, GroupScales, Hessian, ScaleRule};
use crate::kernels;
use crate::scale_search::search_block;
use crate::{Bits, Error, FloatFormat, QuantizedWeight, Result, Tier, WeightData};
use rayon::prelude::*;

/// Rows per inner segment of a lazy batch.
pub const INNER: usize = 16;

/// `1.5 * 2^52`: `(x + M) - M` rounds |x| < 2^51 to an integer, ties to even.
const MAGIC64: f64 = 6_755_399_441_055_744.0;

/// Quantizes `weight` (`[K, N]` row-major, `y = x @ W`, K = `hessian.k()`) with GPTQ.
///
/// Returns the form of [`quantize_weight`](crate::quantize_weight()) for axis 0: codes packed in
/// the weight's row-major order (INT4: two per byte; INT8: one per byte), scales
/// `[ceil(K/B), N]` as values of the weight's dtype, zero points (`0..=15`, or `0..=255`) if
/// asked for, and the block length.
///
/// # Errors
/// [`Error::HessianShape`] if the weight's length is not a multiple of K;
/// [`Error::NonFinite`] for NaN/Inf weights; the errors of [`GptqFactor::new`];
/// [`Error::BadGptqParam`] for a lazy batch of 0 or an odd/zero block size.
pub fn gptq_quantize(weight: WeightData<'_>, hessian: &Hessian, params: &GptqParams) -> Result<QuantizedWeight> {
    let factor = GptqFactor::new(hessian, params.percdamp, params.act_order)?;
    gptq_quantize_factored(weight, &factor, params)
}

/// [`gptq_quantize`] with a factor prepared once (for weights sharing one activation); the
/// factor's `percdamp` and act order must be `params`'s.
pub fn gptq_quantize_factored(
    weight: WeightData<'_>,
    factor: &GptqFactor,
    params: &GptqParams,
) -> Result<QuantizedWeight> {
    gptq_quantize_factored_with(Tier::best(), weight, factor, params)
}

/// [`gptq_quantize_factored`] with the scale kernels on a chosen tier.
pub fn gptq_quantize_factored_with(
    tier: Tier,
    weight: WeightData<'_>,
    factor: &GptqFactor,
    params: &GptqParams,
) -> Result<QuantizedWeight> {
    kernels::check_tier(tier)?;
    let k = factor.k;
    if factor.act_order != params.act_order || factor.percdamp != params.percdamp {
        return Err(Error::BadGptqParam {
            what: "factor",
            why: "the GptqFactor was prepared with another percdamp or act order than these parameters",
        });
    }
    if params.lazy_batch == 0 {
        return Err(Error::BadGptqParam { what: "lazy batch", why: "must be at least 1 row (default 128)" });
    }
    if let crate::BlockSize::Blocked(b) = params.block_size {
        if b < 2 || b % 2 != 0 {
            return Err(Error::BadBlockSize { block_size: b as i64 });
        }
    }
    let shape_ok = if k == 0 { weight.is_empty() } else { weight.len().is_multiple_of(k) };
    if !shape_ok {
        return Err(Error::HessianShape { hessian_k: k, weight_len: weight.len() });
    }
    let n = weight.len().checked_div(k).unwrap_or(0);
    let block = params.block_size.resolve(k);
    let nb = k.div_ceil(block);
    let format = weight.format();
    let upfront = params.act_order || params.group_scales == GroupScales::Upfront;
    let row_weights: Option<Vec<f32>> = match &params.scale_rule {
        ScaleRule::Search { hessian_weighted: true, .. } => Some(factor.diagonal.iter().map(|&d| d as f32).collect()),
        _ => None,
    };
    let ctx = Ctx { tier, format, params, factor, k, block, upfront, row_weights };
    let threads = rayon::current_num_threads().max(1);
    let width = n.div_ceil(2 * threads).next_multiple_of(8).max(32).min(n.max(1));
    let stripes: Vec<usize> = (0..n).step_by(width).collect();
    let outs: Vec<Stripe> = stripes
        .par_iter()
        .map(|&c0| {
            let ns = width.min(n - c0);
            let mut w = vec![0.0f64; k * ns];
            let mut row = vec![0.0f32; ns];
            for r in 0..k {
                weight.copy_f32(tier, r * n + c0, &mut row)?;
                for (c, (o, &v)) in w[r * ns..(r + 1) * ns].iter_mut().zip(&row).enumerate() {
                    if !v.is_finite() {
                        let b = r / block;
                        return Err(Error::NonFinite {
                            block: b,
                            column: c0 + c,
                            start: b * block,
                            end: ((b + 1) * block).min(k),
                        });
                    }
                    *o = v as f64;
                }
            }
            ctx.stripe(w, ns)
        })
        .collect::<Result<_>>()?;
    let mut codes = vec![0u8; k * n];
    let mut scale = vec![0.0f32; nb * n];
    let mut zp = vec![0u8; if params.zero_point { nb * n } else { 0 }];
    for (&c0, s) in stripes.iter().zip(&outs) {
        let ns = s.ns;
        for r in 0..k {
            codes[r * n + c0..r * n + c0 + ns].copy_from_slice(&s.codes[r * ns..(r + 1) * ns]);
        }
        for b in 0..nb {
            scale[b * n + c0..b * n + c0 + ns].copy_from_slice(&s.scale[b * ns..(b + 1) * ns]);
            if params.zero_point {
                for (o, &z) in zp[b * n + c0..b * n + c0 + ns].iter_mut().zip(&s.zp[b * ns..(b + 1) * ns]) {
                    *o = z as u8;
                }
            }
        }
    }
    let packed = match params.bits {
        Bits::Four => {
            let mut packed = vec![0u8; (k * n).div_ceil(2)];
            kernels::pack_nibbles_with(tier, &codes, &mut packed)?;
            packed
        }
        Bits::Eight => codes,
    };
    Ok(QuantizedWeight { packed, scale, scale_shape: [nb, n], zero_point: params.zero_point.then_some(zp), block })
}

/// One stripe's result: codes `[K, ns]` (original row order), scales and zero points `[nb, ns]`.
struct Stripe {
    ns: usize,
    codes: Vec<u8>,
    scale: Vec<f32>,
    zp: Vec<f32>,
}

struct Ctx<'a> {
    tier: Tier,
    format: FloatFormat,
    params: &'a GptqParams,
    factor: &'a GptqFactor,
    k: usize,
    block: usize,
    upfront: bool,
    row_weights: Option<Vec<f32>>,
}

/// `rint` of a float64 already clamped to a small range.
#[inline(always)]
fn rint64(x: f64) -> f64 {
    (x + MAGIC64) - MAGIC64
}

impl Ctx<'_> {
    /// Scales (and zero points) of block `b` from its current rows `w` (`rows x ns`, float64).
    fn block_scales(&self, b: usize, w: &[f64], ns: usize, scale: &mut [f32], zp: &mut [f32]) -> Result<()> {
        let (tier, format, bits) = (self.tier, self.format, self.params.bits);
        let rows = w.len() / ns.max(1);
        let padded = rows < self.block;
        match &self.params.scale_rule {
            ScaleRule::Formula => {
                if self.params.zero_point {
                    let init = if padded { (0.0f64, 0.0f64) } else { (f64::INFINITY, f64::NEG_INFINITY) };
                    let mut lo = vec![init.0; ns];
                    let mut hi = vec![init.1; ns];
                    for row in w.chunks_exact(ns) {
                        for c in 0..ns {
                            lo[c] = lo[c].min(row[c]);
                            hi[c] = hi[c].max(row[c]);
                        }
                    }
                    let lo: Vec<f32> = lo.iter().map(|&v| v as f32).collect();
                    let hi: Vec<f32> = hi.iter().map(|&v| v as f32).collect();
                    kernels::scales_zero_point_with(tier, format, bits, &lo, &hi, 1.0, scale, zp)
                } else {
                    let mut amax = vec![0.0f64; ns];
                    for row in w.chunks_exact(ns) {
                        for c in 0..ns {
                            amax[c] = amax[c].max(row[c].abs());
                        }
                    }
                    let amax: Vec<f32> = amax.iter().map(|&v| v as f32).collect();
                    kernels::scales_symmetric_with(tier, format, bits, &amax, 1.0, scale)
                }
            }
            ScaleRule::Search { grid, .. } => {
                let wf: Vec<f32> = w.iter().map(|&v| v as f32).collect();
                let h = self.row_weights.as_ref().map(|h| &h[b * self.block..b * self.block + rows]);
                let zp = self.params.zero_point.then_some(zp);
                search_block(tier, format, bits, &wf, ns, padded, h, grid, scale, zp)
            }
        }
    }

    /// Where a segment starting at `a` may end, at most at `c`: before any block that starts
    /// inside it and outlasts it (block-start scales only).
    fn segment_end(&self, a: usize, c: usize) -> usize {
        if self.upfront {
            return c;
        }
        let mut bs = (a / self.block + 1) * self.block;
        while bs < c {
            if (bs + self.block).min(self.k) > c {
                return bs;
            }
            bs += self.block;
        }
        c
    }

    /// GPTQ on one column stripe `w: [K, ns]` (original row order; consumed).
    fn stripe(&self, mut w: Vec<f64>, ns: usize) -> Result<Stripe> {
        let (k, block) = (self.k, self.block);
        let f = self.factor;
        let p = self.params;
        let nb = k.div_ceil(block);
        for (i, &d) in f.dead.iter().enumerate() {
            if d {
                w[i * ns..(i + 1) * ns].fill(0.0);
            }
        }
        let mut scale = vec![0.0f32; nb * ns];
        let mut zp = vec![0.0f32; if p.zero_point { nb * ns } else { 0 }];
        let mut ready = vec![false; nb];
        let zp_block = |zp: &mut Vec<f32>, b: usize| -> std::ops::Range<usize> {
            if zp.is_empty() {
                0..0
            } else {
                b * ns..(b + 1) * ns
            }
        };
        if self.upfront {
            for b in 0..nb {
                let rows = b * block..((b + 1) * block).min(k);
                let zr = zp_block(&mut zp, b);
                self.block_scales(
                    b,
                    &w[rows.start * ns..rows.end * ns],
                    ns,
                    &mut scale[b * ns..(b + 1) * ns],
                    &mut zp[zr],
                )?;
                ready[b] = true;
            }
        }
        // The weight in processing order.
        let mut wp = if f.act_order {
            let mut v = vec![0.0f64; k * ns];
            for (i, &r) in f.perm.iter().enumerate() {
                v[i * ns..(i + 1) * ns].copy_from_slice(&w[r * ns..(r + 1) * ns]);
            }
            v
        } else {
            w
        };
        let mut codes = vec![0u8; k * ns];
        let lazy = p.lazy_batch;
        let mut err = vec![0.0f64; lazy.max(1) * ns];
        let (qmin, qmax, levels) = (p.bits.qmin() as f64, p.bits.qmax() as f64, p.bits.levels() as f64);
        let format = self.format;
        let mut i1 = 0;
        while i1 < k {
            let i2 = self.segment_end(i1, (i1 + lazy).min(k));
            let mut j1 = i1;
            while j1 < i2 {
                let j2 = self.segment_end(j1, (j1 + INNER).min(i2));
                for i in j1..j2 {
                    let r = f.perm[i];
                    let b = r / block;
                    if !ready[b] {
                        // Block start (no act order, so i == r == b * block).
                        let rows = i..((b + 1) * block).min(k);
                        let zr = zp_block(&mut zp, b);
                        self.block_scales(
                            b,
                            &wp[rows.start * ns..rows.end * ns],
                            ns,
                            &mut scale[b * ns..(b + 1) * ns],
                            &mut zp[zr],
                        )?;
                        ready[b] = true;
                    }
                    let d = f.u[i * k + i];
                    let s = &scale[b * ns..(b + 1) * ns];
                    let e = &mut err[(i - i1) * ns..(i - i1 + 1) * ns];
                    let row = &wp[i * ns..(i + 1) * ns];
                    let out = &mut codes[r * ns..(r + 1) * ns];
                    if p.zero_point {
                        let z = &zp[b * ns..(b + 1) * ns];
                        for c in 0..ns {
                            let y = (row[c] / s[c] as f64).clamp(-levels - 1.0, levels + 1.0);
                            let q = (rint64(y) + z[c] as f64).clamp(0.0, levels);
                            let dq = format.round((q as f32 - z[c]) * s[c]) as f64;
                            out[c] = q as u8;
                            e[c] = (row[c] - dq) / d;
                        }
                    } else {
                        for c in 0..ns {
                            let q = rint64((row[c] / s[c] as f64).clamp(qmin, qmax));
                            let dq = format.round(q as f32 * s[c]) as f64;
                            out[c] = q as i32 as i8 as u8;
                            e[c] = (row[c] - dq) / d;
                        }
                    }
                    // Rank-1 updates of the segment's later rows.
                    let tail = &mut wp[(i + 1) * ns..];
                    for (jj, wrow) in tail[..(j2 - i - 1) * ns].chunks_exact_mut(ns).enumerate() {
                        let u = f.u[i * k + i + 1 + jj];
                        for (x, &ec) in wrow.iter_mut().zip(e.iter()) {
                            *x -= u * ec;
                        }
                    }
                }
                // The rest of the batch, then (at the batch's end) the rest of the weight.
                gemm_update(&mut wp, &f.u, k, ns, j1, j2, i2, &err[(j1 - i1) * ns..(j2 - i1) * ns]);
                j1 = j2;
            }
            gemm_update(&mut wp, &f.u, k, ns, i1, i2, k, &err[..(i2 - i1) * ns]);
            i1 = i2;
        }
        Ok(Stripe { ns, codes, scale, zp })
    }
}

/// `wp[a1..end, :] -= U[a0..a1, a1..end]^T @ e` with `e: [a1 - a0, ns]` (one dgemm).
#[allow(clippy::too_many_arguments)]
fn gemm_update(wp: &mut [f64], u: &[f64], k: usize, ns: usize, a0: usize, a1: usize, end: usize, e: &[f64]) {
    let (m, depth) = (end - a1, a1 - a0);
    if m == 0 || depth == 0 || ns == 0 {
        return;
    }
    assert!(u.len() == k * k && e.len() == depth * ns && wp.len() >= end * ns);
    let c = &mut wp[a1 * ns..end * ns];
    // SAFETY: A(r, t) = U[a0 + t, a1 + r] at u[(a0 + t) * k + a1 + r], r < m, t < depth: inside u
    // (a0 + t < a1 <= k, a1 + r < end <= k; asserted len k * k); B = e is exactly [depth, ns]
    // row-major; C = c is exactly [m, ns] row-major; C does not overlap A or B.
    unsafe {
        matrixmultiply::dgemm(
            m,
            depth,
            ns,
            -1.0,
            u.as_ptr().add(a0 * k + a1),
            1,
            k as isize,
            e.as_ptr(),
            ns as isize,
            1,
            1.0,
            c.as_mut_ptr(),
            ns as isize,
            1,
        );
    }
}
