//! AWQ-clip: one clip ratio per (column, block), chosen on a grid.
//!
//! ```text
//! x' = x[0 :: max(1, T // 64)]                         (at most ~64 tokens)
//! for alpha in grid:                                   ([0.5, 0.55, ..., 0.95, 1.0])
//!     e = w - dq(q(w, alpha))                          (fused kernel, per block)
//!     loss[n, b] = mean_t (x'[t, block b] . e[block b, n])^2
//! best[n, b] = the alpha whose loss is strictly smallest first (start: alpha 1.0, loss +inf)
//! ```
//!
//! ModelOpt computes `sum(x * w) - sum(x * dq)`; the product with the error `w - dq` is the same
//! quantity with less cancellation, so losses agree to float32 rounding and chosen ratios agree
//! except at genuine near-ties. With a zero point the search quantizes with the zero point too
//! (ModelOpt searches symmetric ratios and then ignores them for zero-point weights).

use super::matmul::matmul;
use crate::quantize_weight::{fake_quantize_with, QuantParams};
use crate::{FloatFormat, Result, Tier};
use rayon::prelude::*;

/// The outcome of one AWQ-clip search.
#[derive(Clone, Debug, PartialEq)]
pub struct ClipSearch {
    /// The grid.
    pub alphas: Vec<f64>,
    /// `losses[a][b * n + j]`: loss of alpha `a` for block `b` of column `j`.
    pub losses: Vec<Vec<f32>>,
    /// The chosen ratio per block and column, `[nb][n]`, as values of the weight format.
    pub best_alpha: Vec<f32>,
}

/// Rows `0, step, 2 step, ...` of `x: [T, K]` with `step = max(1, T / max_tokens)`.
pub fn subsample(x: &[f32], k: usize, max_tokens: usize) -> Vec<f32> {
    let t = x.len().checked_div(k).unwrap_or(0);
    let step = (t / max_tokens.max(1)).max(1);
    x.chunks_exact(k.max(1)).step_by(step).flatten().copied().collect()
}

/// Searches the clip ratios of `w: [K, N]` for activations `x: [T, K]`.
pub fn clip_search(
    tier: Tier,
    format: FloatFormat,
    x: &[f32],
    w: &[f32],
    [k, n]: [usize; 2],
    params: &QuantParams,
    alphas: &[f64],
) -> Result<ClipSearch> {
    let block = params.block_size.resolve(k);
    let nb = k.div_ceil(block);
    let xs = subsample(x, k, 64);
    let t = xs.len().checked_div(k).unwrap_or(0);
    let losses: Vec<Result<Vec<f32>>> = alphas
        .par_iter()
        .map(|&alpha| {
            let p = QuantParams { alpha, ..*params };
            let dq = fake_quantize_with(tier, format, w, [k, n], &p, None)?;
            let err: Vec<f32> = w.iter().zip(&dq).map(|(a, b)| a - b).collect();
            let mut loss = vec![0.0f32; nb * n];
            for b in 0..nb {
                let (r0, r1) = (b * block, ((b + 1) * block).min(k));
                let rows = r1 - r0;
                let xb: Vec<f32> = xs.chunks_exact(k).flat_map(|row| row[r0..r1].iter().copied()).collect();
                let out = matmul(&xb, &err[r0 * n..r1 * n], t, rows, n);
                let mut acc = vec![0.0f32; n];
                for row in out.chunks_exact(n) {
                    for (a, &v) in acc.iter_mut().zip(row) {
                        *a += v * v;
                    }
                }
                for (j, a) in acc.into_iter().enumerate() {
                    loss[b * n + j] = a / t.max(1) as f32;
                }
            }
            Ok(loss)
        })
        .collect();
    let losses = losses.into_iter().collect::<Result<Vec<_>>>()?;
    let mut best_loss = vec![f32::INFINITY; nb * n];
    let mut best_alpha = vec![1.0f32; nb * n];
    for (alpha, loss) in alphas.iter().zip(&losses) {
        for ((bl, ba), &l) in best_loss.iter_mut().zip(best_alpha.iter_mut()).zip(loss) {
            if l < *bl {
                *bl = l;
                *ba = format.constant(*alpha);
            }
        }
    }
    Ok(ClipSearch { alphas: alphas.to_vec(), losses, best_alpha })
}
