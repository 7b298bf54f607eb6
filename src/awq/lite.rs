//! AWQ-lite: one scale `s[k]` per input channel, chosen on a grid of alphas.
//!
//! ```text
//! for alpha in grid:                       (np.arange(0, 1 + step, step))
//!     s      = awq_scale(act_scale(x), weight_scale(w), alpha)
//!     loss   = mean((x @ w - rnd(x / s) @ dq(q(rnd(w * s[:, None]))))^2)
//! best = first alpha with the smallest loss
//! ```
//!
//! Everything elementwise is computed exactly as numpy does in the weight dtype; the products and
//! the loss are float32 products accumulated in f64 (ModelOpt uses BLAS, whose summation order is
//! its own), so losses agree to a relative 1e-5 or so and the chosen alpha is the same except at
//! genuine near-ties. The alphas run in parallel.

use super::matmul::matmul;
use super::stats::{act_scale, awq_scale, weight_scale};
use crate::quantize_weight::{fake_quantize_with, QuantParams};
use crate::{FloatFormat, Result, Tier};
use rayon::prelude::*;

/// The outcome of one AWQ-lite search.
#[derive(Clone, Debug, PartialEq)]
pub struct LiteSearch {
    /// The grid.
    pub alphas: Vec<f64>,
    /// Loss per alpha.
    pub losses: Vec<f64>,
    /// Index of the chosen alpha.
    pub best: usize,
    /// The chosen scale `s[K]` (values of the weight format).
    pub best_scale: Vec<f32>,
    /// `mean |x|` per input channel.
    pub act_scale: Vec<f32>,
    /// The weight statistic per input channel.
    pub weight_scale: Vec<f32>,
}

/// `w * s[:, None]` rounded to the format.
pub fn scale_rows(format: FloatFormat, w: &[f32], s: &[f32], n: usize) -> Vec<f32> {
    w.chunks_exact(n.max(1)).zip(s).flat_map(|(row, &sk)| row.iter().map(move |&v| format.round(v * sk))).collect()
}

/// `x * 1.0 / s` rounded to the format (`x: [T, K]`).
pub fn divide_columns(format: FloatFormat, x: &[f32], s: &[f32]) -> Vec<f32> {
    let k = s.len();
    x.chunks_exact(k.max(1)).flat_map(|row| row.iter().zip(s).map(|(&v, &sk)| format.round(v / sk))).collect()
}

/// Mean squared difference in f64.
pub fn mse(a: &[f32], b: &[f32]) -> f64 {
    let sum: f64 = a.iter().zip(b).map(|(&p, &q)| (p as f64 - q as f64).powi(2)).sum();
    sum / a.len().max(1) as f64
}

/// Searches the AWQ-lite scale for `w: [K, N]` with activations `x: [T, K]` (values of `format`).
pub fn lite_search(
    tier: Tier,
    format: FloatFormat,
    x: &[f32],
    w: &[f32],
    [k, n]: [usize; 2],
    params: &QuantParams,
    alphas: &[f64],
) -> Result<LiteSearch> {
    let t = x.len().checked_div(k).unwrap_or(0);
    let block = params.block_size.resolve(k);
    let act = act_scale(format, x, k);
    let wsc = weight_scale(format, w, [k, n], block);
    let reference = matmul(x, w, t, k, n);
    let losses: Vec<Result<f64>> = alphas
        .par_iter()
        .map(|&alpha| {
            let s = awq_scale(format, &act, &wsc, alpha);
            let dq = fake_quantize_with(tier, format, &scale_rows(format, w, &s, n), [k, n], params, None)?;
            let out = matmul(&divide_columns(format, x, &s), &dq, t, k, n);
            Ok(mse(&reference, &out))
        })
        .collect();
    let losses = losses.into_iter().collect::<Result<Vec<f64>>>()?;
    let best = first_min(&losses);
    let best_scale = awq_scale(format, &act, &wsc, alphas[best]);
    Ok(LiteSearch { alphas: alphas.to_vec(), losses, best, best_scale, act_scale: act, weight_scale: wsc })
}

/// Index of the first smallest value (Python's `min(d, key=d.get)`); NaN never wins.
pub fn first_min(v: &[f64]) -> usize {
    let mut best = 0;
    for (i, &x) in v.iter().enumerate() {
        if x < v[best] || v[best].is_nan() {
            best = i;
        }
    }
    best
}
