//! AWQ-lite: one scale `s[k]` per input channel, chosen on a grid of alphas.
//!
//! ```text
//! for alpha in grid:                       (np.arange(0, 1 + step, step))
//!     s      = awq_scale(act_scale(x), weight_scale(w), alpha)
//!     loss   = mean((x @ w - rnd(x / s) @ dq(q(rnd(w * s[:, None]))))^2)
//! best = first alpha with the smallest loss
//! ```
//!
//! An alpha whose scaled weight `rnd(w * s)` is not finite (a float16 weight times a large scale
//! passing 65504) is skipped: its loss is `+inf`, so it is never chosen, and it is listed in
//! [`LiteSearch::skipped`]. (ModelOpt computes that alpha's NaN loss, which `min` never picks either.)
//! A weight that is itself not finite is an error, as in
//! [`fake_quantize_with`](crate::quantize_weight::fake_quantize_with); so is a grid whose every
//! alpha overflows ([`Error::ScaledWeightOverflow`](crate::Error::ScaledWeightOverflow)).
//!
//! Everything elementwise is computed exactly as numpy does in the weight dtype; the products are
//! float32 SGEMMs (ModelOpt uses BLAS, whose summation order is its own) and the loss is summed in
//! f64, so losses agree to a relative 1e-5 or so and the chosen alpha is the same except at genuine
//! near-ties. The alphas run in parallel.
//!
//! With float32 weights and more tokens than input channels (T > K), the loss goes through the
//! Gram matrix of the activations instead, which is the same quantity in exact arithmetic:
//!
//! ```text
//! x @ w - (x / s) @ dq  =  x @ E,   E = w - dq / s[:, None]
//! loss = sum(E * (G @ E)) / (T N),  G = x^T x        (K x K x N per alpha instead of T x K x N)
//!      = sum(E * (M @ E)) / (T N),  M = tril(G) + tril(G, -1)
//! ```
//!
//! The last line holds because G is symmetric: `sum(E * (G @ E)) = sum_ij G_ij <E_i, E_j>` over the
//! rows `E_i` of E, and the pairs `i > j` and `j > i` give the same term. M is lower triangular, so
//! `M @ E` is a triangular product of half the multiply-adds (`K (K + 1) / 2 x N`).
//!
//! With float32 weights and T <= K, the same error matrix gives the loss in one product per alpha,
//! `loss = mean((x @ E)^2)`, instead of ModelOpt's `x @ w` once and `(x / s) @ dq` per alpha (no
//! division of the `T x K` activations per alpha, no subtraction, one product fewer per weight).
//!
//! (For f16/bf16 weights numpy rounds `x / s` to the dtype, which neither form can follow, so
//! those keep the direct products.)

use super::matmul::matmul_into;
use super::stats::{act_scale, awq_scale, weight_scale};
use crate::quantize_weight::{fake_quantize_block_into, fake_quantize_into, stripe_width, QuantParams};
use crate::{FloatFormat, Result, Tier};
use rayon::prelude::*;
use std::sync::Mutex;

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
    /// Indices of the alphas skipped because `rnd(w * s)` overflowed the weight's dtype (loss `+inf`).
    pub skipped: Vec<usize>,
}

/// Rounds f32 results to `format` in place (vectorized; nothing to do for f32).
fn round_all(format: FloatFormat, v: &mut [f32]) {
    if format != FloatFormat::F32 {
        crate::kernels::round_to_format(format, v).expect("lengths are the slice's own");
    }
}

/// `w * s[:, None]` rounded to the format.
pub fn scale_rows(format: FloatFormat, w: &[f32], s: &[f32], n: usize) -> Vec<f32> {
    let mut out = Vec::new();
    let _finite = scale_rows_into(format, w, s, n, &mut out);
    out
}

/// [`scale_rows`] into `out` (its allocation is reused); returns whether every value is finite.
/// Each row is scaled, rounded and checked while it is in cache (on the tier's SIMD:
/// [`kernels::scale_rows`](crate::kernels::scale_rows)).
pub fn scale_rows_into(format: FloatFormat, w: &[f32], s: &[f32], n: usize, out: &mut Vec<f32>) -> bool {
    let n = n.max(1);
    let rows = (w.len() / n).min(s.len());
    out.resize(rows * n, 0.0);
    crate::kernels::scale_rows(format, &w[..rows * n], &s[..rows], n, out).expect("whole rows, one scale each")
}

/// `x * 1.0 / s` rounded to the format (`x: [T, K]`).
pub fn divide_columns(format: FloatFormat, x: &[f32], s: &[f32]) -> Vec<f32> {
    let mut out = Vec::new();
    divide_columns_into(format, x, s, &mut out);
    out
}

/// [`divide_columns`] into `out` (its allocation is reused).
pub fn divide_columns_into(format: FloatFormat, x: &[f32], s: &[f32], out: &mut Vec<f32>) {
    let len = x.len().checked_div(s.len()).unwrap_or(0) * s.len();
    out.resize(len, 0.0);
    crate::kernels::divide_columns(&x[..len], s, out).expect("whole rows, one divisor per column");
    round_all(format, out);
}

/// `sum(f(a[i], b[i]))` in f64 ([`kernels::sum_f64`](crate::kernels::sum_f64): 16 interleaved
/// partial sums on the tier's SIMD).
fn sum_f64(a: &[f32], b: &[f32], f: impl Fn(f64, f64) -> f64) -> f64 {
    crate::kernels::sum_f64(a, b, f).expect("equal lengths")
}

/// `E = w - dq / s[:, None]` in place of `dq` (`w`, `dq: [K, N]`, `s: [K]`): the error of the fake
/// quantization in the unscaled weight's terms (the module docs).
fn error_into(dq: &mut [f32], w: &[f32], s: &[f32], n: usize) {
    if n > 0 {
        crate::kernels::unscaled_error(dq, w, s, n).expect("whole rows, one scale each");
    }
}

/// The error matrix `E = w - dq(q(rnd(w * s[:, None]))) / s[:, None]` of `w: [K, N]` into `e`
/// (resized to `K * N`), one quantization block's band of rows at a time. The same values as
/// [`scale_rows_into`], [`fake_quantize_into`] and `E = w - dq / s` over the whole weight (blocks
/// run along axis 0, so bands are independent), in one pass over memory instead of three.
/// `Ok(false)` when a scaled value is not finite while every weight is (`weight_finite`: the alpha
/// is skipped; `e` is then partly written); a non-finite weight is the error
/// [`fake_quantize_into`] reports.
///
/// Symmetric blocks go column stripe by column stripe of each band (about 256 KiB of `w`, which
/// stays in L2 between the two passes): the absmax of the scaled stripe, with the finite check
/// ([`block_absmax_scaled_rows`](crate::kernels::block_absmax)), the scales, then the error straight
/// from `w` ([`qdq_unscaled_error`](crate::kernels::qdq_unscaled_error)): the scaled weight is
/// computed in registers twice and never stored, and `e` is written once. Zero-point blocks scale
/// the band into `scaled` (one band long and reused), fake-quantize it into its rows of `e`
/// ([`fake_quantize_block_into`]) and turn those into the error.
#[allow(clippy::too_many_arguments)]
pub fn error_matrix_into(
    tier: Tier,
    format: FloatFormat,
    w: &[f32],
    s: &[f32],
    [k, n]: [usize; 2],
    params: &QuantParams,
    weight_finite: bool,
    scaled: &mut Vec<f32>,
    e: &mut Vec<f32>,
) -> Result<bool> {
    crate::kernels::check_tier(tier)?;
    crate::kernels::check_len("weight", k * n, w.len())?;
    crate::kernels::check_len("scale", k, s.len())?;
    e.resize(k * n, 0.0);
    if n == 0 {
        return Ok(true);
    }
    let block = params.block_size.resolve(k);
    let bands = w.chunks(block * n).zip(e.chunks_mut(block * n)).enumerate();
    if params.zero_point {
        for (b, (wb, eb)) in bands {
            let sb = &s[b * block..b * block + wb.len() / n];
            let finite = scale_rows_into(format, wb, sb, n, scaled);
            if weight_finite && !finite {
                return Ok(false);
            }
            fake_quantize_block_into(tier, format, scaled, n, [b, block], params, eb)?;
            error_into(eb, wb, sb, n);
        }
        return Ok(true);
    }
    let width = stripe_width(block.min(k), n, 4);
    let alphas = vec![format.constant(params.alpha); width];
    let (mut amax, mut scale) = (vec![0.0f32; width], vec![0.0f32; width]);
    for (b, (wb, eb)) in bands {
        let rows = wb.len() / n;
        let sb = &s[b * block..b * block + rows];
        for c0 in (0..n).step_by(width) {
            let cols = width.min(n - c0);
            let (amax, scale) = (&mut amax[..cols], &mut scale[..cols]);
            crate::kernels::block_absmax::block_absmax_scaled_rows(tier, &wb[c0..], sb, cols, n, amax);
            round_all(format, amax);
            if let Some(c) = amax.iter().position(|a| !a.is_finite()) {
                if weight_finite {
                    return Ok(false);
                }
                let end = b * block + rows;
                return Err(crate::Error::NonFinite { block: b, column: c0 + c, start: b * block, end });
            }
            crate::kernels::scales_symmetric_alphas_with(tier, format, params.bits, amax, &alphas[..cols], scale)?;
            let (wc, ec) = (&wb[c0..], &mut eb[c0..]);
            crate::kernels::qdq_unscaled_error::qdq_unscaled_error_rows(
                tier,
                format,
                params.bits,
                wc,
                [cols, n],
                sb,
                scale,
                None,
                ec,
            );
        }
    }
    Ok(true)
}

/// Mean squared difference in f64.
pub fn mse(a: &[f32], b: &[f32]) -> f64 {
    sum_f64(a, b, |p, q| (p - q) * (p - q)) / a.len().max(1) as f64
}

/// How the AWQ-lite losses are computed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LossForm {
    /// f32 weights: Gram form with T > K, error form otherwise; f16/bf16: direct products.
    Auto,
    /// `x @ w` and `(x / s) @ dq` per alpha, as ModelOpt computes them.
    Direct,
    /// Through `G = x^T x` (f32 weights only; see the module docs).
    Gram,
    /// `mean((x @ E)^2)` (f32 weights only; see the module docs).
    Error,
}

/// The buffers of one alpha's loss: the scaled weight, its fake quantization (or error matrix),
/// the divided activations (direct form) and the product.
#[derive(Default)]
struct Buffers {
    scaled: Vec<f32>,
    dq: Vec<f32>,
    lhs: Vec<f32>,
    product: Vec<f32>,
}

/// Buffers reused from alpha to alpha and from weight to weight (one set per thread at work).
///
/// A fresh allocation of several megabytes is served by `mmap`, and every 4 KiB page of it then
/// costs a page fault and the kernel's zeroing: with new buffers per alpha, the 48M-parameter
/// model's search took 540 thousand page faults and 1.2 s of system time.
#[derive(Default)]
pub struct LiteScratch(Mutex<Vec<Buffers>>);

impl LiteScratch {
    /// Runs `f` with a set of buffers (taken from the pool, or new), then gives them back.
    fn with<R>(&self, f: impl FnOnce(&mut Buffers) -> R) -> R {
        let mut b = self.0.lock().unwrap_or_else(|e| e.into_inner()).pop().unwrap_or_default();
        let r = f(&mut b);
        self.0.lock().unwrap_or_else(|e| e.into_inner()).push(b);
        r
    }
}

/// Searches the AWQ-lite scale for `w: [K, N]` with activations `x: [T, K]` (values of `format`).
pub fn lite_search(
    tier: Tier,
    format: FloatFormat,
    x: &[f32],
    w: &[f32],
    shape: [usize; 2],
    params: &QuantParams,
    alphas: &[f64],
) -> Result<LiteSearch> {
    lite_search_in(&LiteScratch::default(), tier, format, x, w, shape, params, alphas, LossForm::Auto)
}

/// [`lite_search`] with a chosen [`LossForm`] (`Gram` on f16/bf16 weights falls back to `Direct`).
#[allow(clippy::too_many_arguments)]
pub fn lite_search_with(
    tier: Tier,
    format: FloatFormat,
    x: &[f32],
    w: &[f32],
    shape: [usize; 2],
    params: &QuantParams,
    alphas: &[f64],
    form: LossForm,
) -> Result<LiteSearch> {
    lite_search_in(&LiteScratch::default(), tier, format, x, w, shape, params, alphas, form)
}

/// [`lite_search_with`] with buffers kept in `scratch` for the next searches.
#[allow(clippy::too_many_arguments)]
pub fn lite_search_in(
    scratch: &LiteScratch,
    tier: Tier,
    format: FloatFormat,
    x: &[f32],
    w: &[f32],
    [k, n]: [usize; 2],
    params: &QuantParams,
    alphas: &[f64],
    form: LossForm,
) -> Result<LiteSearch> {
    let t = x.len().checked_div(k).unwrap_or(0);
    let block = params.block_size.resolve(k);
    let act = act_scale(format, x, k);
    let wsc = weight_scale(format, w, [k, n], block);
    let form = match (format, form) {
        (FloatFormat::F32, LossForm::Auto) if t > k => LossForm::Gram,
        (FloatFormat::F32, LossForm::Auto) => LossForm::Error,
        (FloatFormat::F32, form) => form,
        _ => LossForm::Direct,
    };
    let weight_finite = w.iter().all(|v| v.is_finite());
    // Fills `b.dq` (the error matrix E in the Gram and error forms, the fake-quantized weight in the
    // direct one) and returns the scale; `None` when the scaled weight overflows (a finite weight
    // only: a NaN weight is the error fake_quantize_with reports).
    let fake_quantized = |alpha: f64, b: &mut Buffers| -> Result<Option<Vec<f32>>> {
        let s = awq_scale(format, &act, &wsc, alpha);
        if matches!(form, LossForm::Gram | LossForm::Error) {
            let ok = error_matrix_into(tier, format, w, &s, [k, n], params, weight_finite, &mut b.scaled, &mut b.dq)?;
            return Ok(ok.then_some(s));
        }
        let finite = scale_rows_into(format, w, &s, n, &mut b.scaled);
        if weight_finite && !finite {
            return Ok(None);
        }
        fake_quantize_into(tier, format, &b.scaled, [k, n], params, None, &mut b.dq)?;
        Ok(Some(s))
    };
    // What every alpha reads: the Gram form's M, the direct form's reference `x @ w`.
    let fixed = match form {
        LossForm::Gram => super::matmul::gram_lower_doubled(x, t, k),
        LossForm::Direct => super::matmul::par_matmul(x, w, t, k, n),
        _ => vec![],
    };
    let losses: Vec<Result<Option<f64>>> = alphas
        .par_iter()
        .map(|&alpha| {
            scratch.with(|b| {
                let Some(s) = fake_quantized(alpha, b)? else { return Ok(None) };
                let mean = |sum: f64| sum / (t * n).max(1) as f64;
                Ok(Some(match form {
                    LossForm::Gram => {
                        super::matmul::lower_triangular_matmul_into(&fixed, &b.dq, k, n, &mut b.product);
                        mean(sum_f64(&b.dq, &b.product, |p, q| p * q))
                    }
                    LossForm::Error => {
                        matmul_into(x, &b.dq, t, k, n, &mut b.product);
                        mean(sum_f64(&b.product, &b.product, |p, _| p * p))
                    }
                    _ => {
                        divide_columns_into(format, x, &s, &mut b.lhs);
                        matmul_into(&b.lhs, &b.dq, t, k, n, &mut b.product);
                        mse(&fixed, &b.product)
                    }
                }))
            })
        })
        .collect();
    let losses = losses.into_iter().collect::<Result<Vec<Option<f64>>>>()?;
    let skipped: Vec<usize> = (0..losses.len()).filter(|&i| losses[i].is_none()).collect();
    if !alphas.is_empty() && skipped.len() == alphas.len() {
        return Err(crate::Error::ScaledWeightOverflow { format });
    }
    let losses: Vec<f64> = losses.into_iter().map(|l| l.unwrap_or(f64::INFINITY)).collect();
    let best = first_min(&losses);
    let best_scale = awq_scale(format, &act, &wsc, alphas[best]);
    Ok(LiteSearch { alphas: alphas.to_vec(), losses, best, best_scale, act_scale: act, weight_scale: wsc, skipped })
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
