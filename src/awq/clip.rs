//! AWQ-clip: one clip ratio per (column, block), chosen on a grid.
//!
//! ```text
//! x' = x[0 :: max(1, T // 64)]                         (at most ~64 tokens)
//! for alpha in grid:                                   ([0.5, 0.55, ..., 0.95, 1.0])
//!     org = sum(x'[t, block b] * w[block b, n]),  cur = the same with dq(q(w, alpha))
//!     loss[n, b] = mean_t (org - cur)^2
//! best[n, b] = the alpha whose loss is strictly smallest first (start: alpha 1.0, loss +inf)
//! ```
//!
//! The loss is computed exactly as ModelOpt's numpy code does (products, pairwise sums, differences
//! and squares in the weight dtype), so the chosen ratios are ModelOpt's. With a zero point the
//! search quantizes with the zero point too (ModelOpt searches symmetric ratios and then ignores
//! them for zero-point weights).

use crate::kernels;
use crate::quantize_weight::QuantParams;
use crate::{Error, FloatFormat, Result, Tier};
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

/// The block's activations `[T, B]` and weight rows `[B, n]`, zero-padded to B rows as ModelOpt
/// pads `x` and `w`.
fn padded_block(xs: &[f32], w: &[f32], k: usize, n: usize, r0: usize, r1: usize, block: usize) -> (Vec<f32>, Vec<f32>) {
    let xb: Vec<f32> = xs
        .chunks_exact(k)
        .flat_map(|row| row[r0..r1].iter().copied().chain(std::iter::repeat_n(0.0, block - (r1 - r0))))
        .collect();
    (xb, padded_rows(w, n, r0, r1, block).into_owned())
}

/// Weight rows `r0..r1` of `w: [K, n]`, zero-padded to `block` rows (borrowed when whole).
fn padded_rows(w: &[f32], n: usize, r0: usize, r1: usize, block: usize) -> std::borrow::Cow<'_, [f32]> {
    if r1 - r0 == block {
        return std::borrow::Cow::Borrowed(&w[r0 * n..r1 * n]);
    }
    let mut wb = w[r0 * n..r1 * n].to_vec();
    wb.resize(block * n, 0.0);
    std::borrow::Cow::Owned(wb)
}

/// `acc[j] += rnd(rnd(o - c)^2)` over the tokens' rows of `org` and `cur` (`[T, n]`), in order.
fn accumulate_squares(format: FloatFormat, org: &[f32], cur: &[f32], acc: &mut [f32]) {
    let n = acc.len();
    for (o, c) in org.chunks_exact(n).zip(cur.chunks_exact(n)) {
        if format == FloatFormat::F32 {
            for ((a, &o), &c) in acc.iter_mut().zip(o).zip(c) {
                let d = o - c;
                *a += d * d;
            }
        } else {
            for ((a, &o), &c) in acc.iter_mut().zip(o).zip(c) {
                let d = format.round(o - c);
                *a += format.round(d * d);
            }
        }
    }
}

/// Searches the clip ratios of `w: [K, N]` for activations `x: [T, K]` (values of `format`).
///
/// The loss is ModelOpt's, operation for operation: `org = sum(x * w)` and `cur = sum(x * dq)` per
/// token, block and column (products and running sums in the weight dtype, see
/// [`block_dot`](crate::kernels::block_dot)), then `mean_t ((org - cur) ** 2)` accumulated in
/// float32 over the tokens in order. So the losses, and the chosen ratios, are ModelOpt's exactly.
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
    let blocks: Vec<(Vec<f32>, Vec<f32>)> =
        (0..nb).map(|b| padded_block(&xs, w, k, n, b * block, ((b + 1) * block).min(k), block)).collect();
    // org = sum(x * w) per block: the same for every alpha.
    let org: Vec<Vec<f32>> = blocks
        .par_iter()
        .map(|(xb, wb)| {
            let mut out = vec![0.0f32; t * n];
            kernels::block_dot_with(tier, format, xb, wb, [block, n], &mut out).map(|_| out)
        })
        .collect::<Result<_>>()?;
    // Block statistics, the same for every alpha: absmax, or min and max (the padding zeros
    // included, as ModelOpt pads before quantizing).
    let stats: Vec<(Vec<f32>, Vec<f32>)> = blocks
        .par_iter()
        .enumerate()
        .map(|(b, (_, wb))| {
            let (mut lo, mut hi) = (vec![0.0f32; n], vec![0.0f32; n]);
            let finite = if params.zero_point {
                kernels::block_minmax_with(tier, wb, n, false, &mut lo, &mut hi)?;
                (0..n).position(|c| !lo[c].is_finite() || !hi[c].is_finite())
            } else {
                kernels::block_absmax_with(tier, wb, n, &mut lo)?;
                lo.iter().position(|a| !a.is_finite())
            };
            match finite {
                Some(column) => {
                    Err(Error::NonFinite { block: b, column, start: b * block, end: ((b + 1) * block).min(k) })
                }
                None => Ok((lo, hi)),
            }
        })
        .collect::<Result<_>>()?;
    let losses: Vec<Result<Vec<f32>>> = alphas
        .par_iter()
        .map(|&alpha| {
            let ratio = vec![format.constant(alpha); n];
            let (mut scale, mut zp) = (vec![0.0f32; n], vec![0.0f32; n]);
            let mut dqb = vec![0.0f32; block * n];
            let mut loss = vec![0.0f32; nb * n];
            let mut cur = vec![0.0f32; t * n];
            let mut acc = vec![0.0f32; n];
            for (b, (((xb, wb), org), (lo, hi))) in blocks.iter().zip(&org).zip(&stats).enumerate() {
                // dq(q(w, alpha)) of the block: what fake_quantize_with computes, from the
                // precomputed statistics.
                let zero_point = if params.zero_point {
                    kernels::scales_zero_point_alphas_with(
                        tier,
                        format,
                        params.bits,
                        lo,
                        hi,
                        &ratio,
                        &mut scale,
                        &mut zp,
                    )?;
                    Some(&zp[..])
                } else {
                    kernels::scales_symmetric_alphas_with(tier, format, params.bits, lo, &ratio, &mut scale)?;
                    None
                };
                let dq = kernels::QdqOutput::Dequantized;
                kernels::qdq_error_with(tier, format, params.bits, wb, n, &scale, zero_point, dq, &mut dqb)?;
                kernels::block_dot_with(tier, format, xb, &dqb, [block, n], &mut cur)?;
                acc.fill(0.0);
                accumulate_squares(format, org, &cur, &mut acc);
                for (j, &a) in acc.iter().enumerate() {
                    loss[b * n + j] = format.round(a / t.max(1) as f32);
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
