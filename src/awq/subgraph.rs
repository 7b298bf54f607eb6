//! AWQ-lite per subgraph (ModelOpt's `awqlite_run_per_subgraph`): one scale for all the weights that
//! share an activation, searched on their combined loss.
//!
//! ```text
//! x_m[k] = sum_t |x[t, k]| / T                        (float32 sum, cast to the dtype)
//! w_m[k] = mean_n |W[k, n]| / (amax + 1e-6)           W = the siblings concatenated along N,
//!                                                     amax over numpy's reshape(B, -1) (strided)
//! s(alpha) = max(x_m^alpha / (w_m^(1 - alpha) + 1e-4), 1e-4) / sqrt(max * min), inf/NaN -> 1
//! loss(alpha) = sum_i mean((x @ W_i - (x / s) @ dq(q(W_i * s)))^2)
//! ```
//!
//! ModelOpt's alphas come from `np.arange` as `np.float64` scalars, which (NEP 50) promote the
//! scale and everything after it to float64: the scaled weights are quantized in float64 and only
//! the final scales are cast to the weight dtype. [`quantize_f64`] does that quantization.

use super::lite::{first_min, mse};
use super::matmul::matmul;
use super::stats::contiguous_mean;
use crate::{Error, FloatFormat, QuantParams, QuantizedWeight, Result};
use rayon::prelude::*;

/// `(x_m, w_m)` of one activation and its sibling weights (`ws[i]`: `[K, n_i]`).
pub fn subgraph_means(
    format: FloatFormat,
    x: &[f32],
    k: usize,
    ws: &[(&[f32], usize)],
    block: usize,
) -> Result<(Vec<f32>, Vec<f32>)> {
    let t = x.len().checked_div(k).unwrap_or(0);
    let mut sum = vec![0.0f32; k];
    for (i, row) in x.chunks_exact(k.max(1)).enumerate() {
        for (s, &v) in sum.iter_mut().zip(row) {
            *s = if i == 0 { v.abs() } else { *s + v.abs() };
        }
    }
    let x_m: Vec<f32> = sum.iter().map(|&s| format.round(s / t as f32)).collect();
    let m: usize = ws.iter().map(|(_, n)| n).sum();
    // Row k of the concatenation.
    let cat: Vec<f32> =
        (0..k).flat_map(|r| ws.iter().flat_map(move |(w, n)| w[r * n..(r + 1) * n].iter().copied())).collect();
    if block == 0 || !(k * m).is_multiple_of(block) {
        return Err(Error::LengthMismatch {
            what: "per-subgraph weights (K * sum(N) must be a multiple of the block size)",
            expected: (k * m).div_ceil(block.max(1)) * block,
            actual: k * m,
        });
    }
    let cols = k * m / block;
    let mut amax = vec![0.0f32; cols];
    for i in 0..block {
        for (j, a) in amax.iter_mut().enumerate() {
            *a = a.max(cat[i * cols + j].abs());
        }
    }
    let eps = format.constant(1e-6);
    let div: Vec<f32> = amax.iter().map(|&a| format.round(a + eps)).collect();
    let w_m = (0..k)
        .map(|r| {
            let row: Vec<f32> = (0..m).map(|c| r * m + c).map(|e| format.round(cat[e].abs() / div[e % cols])).collect();
            contiguous_mean(format, &row)
        })
        .collect();
    Ok((x_m, w_m))
}

/// The float64 scale for one alpha.
pub fn subgraph_scale(x_m: &[f32], w_m: &[f32], alpha: f64) -> Vec<f64> {
    let s: Vec<f64> = x_m
        .iter()
        .zip(w_m)
        .map(|(&x, &w)| {
            let v = (x as f64).powf(alpha) / ((w as f64).powf(1.0 - alpha) + 1e-4);
            if v.is_nan() {
                v
            } else {
                v.max(1e-4)
            }
        })
        .collect();
    let any_nan = s.iter().any(|v| v.is_nan());
    let max = if any_nan { f64::NAN } else { s.iter().fold(f64::NEG_INFINITY, |m, &v| m.max(v)) };
    let min = if any_nan { f64::NAN } else { s.iter().fold(f64::INFINITY, |m, &v| m.min(v)) };
    let norm = (max * min).sqrt();
    s.iter().map(|&v| v / norm).map(|v| if v.is_finite() { v } else { 1.0 }).collect()
}

/// ModelOpt's `quant_tensor` on float64 weights (`[k, n]`, blocks along k), with the scales cast
/// to `format` at the end as ModelOpt does: codes packed as usual. With a zero point the block
/// range contains zero (`min(min, 0)`, `max(max, 0)`; ModelOpt's own range does not, see
/// [`scales`](crate::kernels::scales)).
pub fn quantize_f64(format: FloatFormat, w: &[f64], [k, n]: [usize; 2], params: &QuantParams) -> QuantizedWeight {
    let block = params.block_size.resolve(k);
    let nb = k.div_ceil(block);
    let (qmin, qmax, levels) = (params.bits.qmin() as f64, params.bits.qmax() as f64, params.bits.levels() as f64);
    let mut scale = vec![0.0f64; nb * n];
    let mut zps = vec![0.0f64; nb * n];
    for b in 0..nb {
        let rows = b * block..((b + 1) * block).min(k);
        for c in 0..n {
            let vals = rows.clone().map(|r| w[r * n + c]);
            if params.zero_point {
                // The range contains zero (which also covers the padding zeros of a short block).
                let (mut lo, mut hi) = (0.0f64, 0.0f64);
                for v in vals {
                    lo = lo.min(v);
                    hi = hi.max(v);
                }
                let s = (hi * params.alpha - lo * params.alpha).max(1e-5) / levels;
                scale[b * n + c] = s;
                zps[b * n + c] = (-(lo * params.alpha / s).round_ties_even()).clamp(0.0, levels);
            } else {
                let amax = vals.fold(0.0f64, |m, v| m.max(v.abs()));
                scale[b * n + c] = (amax * params.alpha / qmax).max(1e-5);
            }
        }
    }
    let codes: Vec<u8> = w
        .iter()
        .enumerate()
        .map(|(e, &v)| {
            let i = (e / n / block) * n + e % n;
            let y = (v / scale[i]).round_ties_even();
            if params.zero_point {
                (y + zps[i]).clamp(0.0, levels) as u8
            } else {
                y.clamp(qmin, qmax) as i8 as u8
            }
        })
        .collect();
    let cast = |v: f64| match format {
        FloatFormat::F32 => v as f32,
        FloatFormat::F16 => half::f16::from_f64(v).to_f32(),
        FloatFormat::BF16 => half::bf16::from_f64(v).to_f32(),
    };
    QuantizedWeight {
        packed: match params.bits {
            crate::Bits::Four => crate::reference::pack(&codes),
            crate::Bits::Eight => codes,
        },
        scale: scale.iter().map(|&v| cast(v)).collect(),
        scale_shape: [nb, n],
        zero_point: params.zero_point.then(|| zps.iter().map(|&z| z as u8).collect()),
        block,
    }
}

/// `dq(q(w))` of [`quantize_f64`] in float64.
fn fake_quantize_f64(w: &[f64], [k, n]: [usize; 2], params: &QuantParams) -> Vec<f64> {
    let block = params.block_size.resolve(k);
    let nb = k.div_ceil(block);
    let (qmin, qmax, levels) = (params.bits.qmin() as f64, params.bits.qmax() as f64, params.bits.levels() as f64);
    let mut out = vec![0.0f64; w.len()];
    for b in 0..nb {
        for c in 0..n {
            let rows = b * block..((b + 1) * block).min(k);
            let vals: Vec<f64> = rows.clone().map(|r| w[r * n + c]).collect();
            if params.zero_point {
                // The range contains zero (which also covers the padding zeros of a short block).
                let (mut lo, mut hi) = (0.0f64, 0.0f64);
                for &v in &vals {
                    lo = lo.min(v);
                    hi = hi.max(v);
                }
                let s = (hi - lo).max(1e-5) / levels;
                let z = (-(lo / s).round_ties_even()).clamp(0.0, levels);
                for (r, &v) in rows.zip(&vals) {
                    out[r * n + c] = (((v / s).round_ties_even() + z).clamp(0.0, levels) - z) * s;
                }
            } else {
                let s = (vals.iter().fold(0.0f64, |m, v| m.max(v.abs())) / qmax).max(1e-5);
                for (r, &v) in rows.zip(&vals) {
                    out[r * n + c] = (v / s).round_ties_even().clamp(qmin, qmax) * s;
                }
            }
        }
    }
    out
}

/// The outcome of one per-subgraph search.
#[derive(Clone, Debug, PartialEq)]
pub struct SubgraphSearch {
    /// The grid.
    pub alphas: Vec<f64>,
    /// Combined loss per alpha.
    pub losses: Vec<f64>,
    /// Index of the chosen alpha.
    pub best: usize,
    /// The chosen scale (float64, as ModelOpt keeps it).
    pub best_scale: Vec<f64>,
    /// Activation statistic.
    pub x_m: Vec<f32>,
    /// Weight statistic.
    pub w_m: Vec<f32>,
}

/// Searches one scale for the sibling weights `ws[i]: [K, n_i]` fed by `x: [T, K]`.
pub fn subgraph_search(
    format: FloatFormat,
    x: &[f32],
    k: usize,
    ws: &[(&[f32], usize)],
    params: &QuantParams,
    alphas: &[f64],
) -> Result<SubgraphSearch> {
    let block = params.block_size.resolve(k);
    let t = x.len().checked_div(k).unwrap_or(0);
    let (x_m, w_m) = subgraph_means(format, x, k, ws, block)?;
    let reference: Vec<Vec<f32>> = ws.iter().map(|(w, n)| matmul(x, w, t, k, *n)).collect();
    let losses: Vec<f64> = alphas
        .par_iter()
        .map(|&alpha| {
            let s = subgraph_scale(&x_m, &w_m, alpha);
            let xs: Vec<f32> = x
                .chunks_exact(k.max(1))
                .flat_map(|row| row.iter().zip(&s).map(|(&v, &sk)| (v as f64 / sk) as f32))
                .collect();
            ws.iter()
                .zip(&reference)
                .map(|((w, n), r)| {
                    let scaled: Vec<f64> = w
                        .chunks_exact(*n)
                        .zip(&s)
                        .flat_map(|(row, &sk)| row.iter().map(move |&v| v as f64 * sk))
                        .collect();
                    let dq: Vec<f32> =
                        fake_quantize_f64(&scaled, [k, *n], params).into_iter().map(|v| v as f32).collect();
                    mse(r, &matmul(&xs, &dq, t, k, *n))
                })
                .sum()
        })
        .collect();
    let best = first_min(&losses);
    let best_scale = subgraph_scale(&x_m, &w_m, alphas[best]);
    Ok(SubgraphSearch { alphas: alphas.to_vec(), losses, best, best_scale, x_m, w_m })
}
