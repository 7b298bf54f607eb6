//! Block dot products in numpy's order, for AWQ-clip's loss: for each token `t` and column `n`,
//!
//! ```text
//! acc = rnd(x[t, 0] * w[0, n]);  acc = rnd(acc + rnd(x[t, k] * w[k, n])) for k = 1, 2, ...
//! ```
//!
//! which is what ModelOpt's `np.sum(x * w, axis=-1)` computes on its 4-D broadcast product: numpy's
//! iterator places the reduced axis outside, so the sum runs in order over the block's rows,
//! rounding to the dtype after every product and every addition (observed against ModelOpt's own
//! outputs, float32 and float16). Vectorized across columns: each lane runs that scalar order.

use super::{check_len, check_tier};
use crate::float::{Precision, BF16, F16, F32};
use crate::simd::{for_each_chunk, load_f32, store_f32};
use crate::{FloatFormat, Result, Tier};
use pulp::{Simd, WithSimd};

/// `x: [T, rows]` (the block's columns of the activations), `w: [rows, cols]` (the block's rows of
/// the weight), `out: [T, cols]`.
pub fn block_dot(format: FloatFormat, x: &[f32], w: &[f32], [rows, cols]: [usize; 2], out: &mut [f32]) -> Result<()> {
    block_dot_with(Tier::best(), format, x, w, [rows, cols], out)
}

/// [`block_dot`] on a chosen tier.
pub fn block_dot_with(
    tier: Tier,
    format: FloatFormat,
    x: &[f32],
    w: &[f32],
    [rows, cols]: [usize; 2],
    out: &mut [f32],
) -> Result<()> {
    check_tier(tier)?;
    check_len("block_dot weight", rows * cols, w.len())?;
    let t = x.len().checked_div(rows).unwrap_or_else(|| out.len().checked_div(cols).unwrap_or(0));
    check_len("block_dot activations", t * rows, x.len())?;
    check_len("block_dot output", t * cols, out.len())?;
    if cols == 0 || t == 0 {
        return Ok(());
    }
    macro_rules! run {
        ($p:expr) => {
            tier.dispatch(BlockDot { x, w, rows, cols, out, _p: $p })
        };
    }
    match format {
        FloatFormat::F32 => run!(F32),
        FloatFormat::F16 => run!(F16),
        FloatFormat::BF16 => run!(BF16),
    }
    Ok(())
}

struct BlockDot<'a, P> {
    x: &'a [f32],
    w: &'a [f32],
    rows: usize,
    cols: usize,
    out: &'a mut [f32],
    _p: P,
}

impl<P: Precision> WithSimd for BlockDot<'_, P> {
    type Output = ();

    #[inline(always)]
    fn with_simd<S: Simd>(self, simd: S) {
        let Self { x, w, rows, cols, out, _p: _ } = self;
        let t = out.len() / cols;
        if rows == 0 {
            out.fill(0.0);
            return;
        }
        let rows1 = rows;
        // Panels of 4 vectors of columns, packed contiguously (the weight's rows are `cols` apart,
        // often a multiple of 4 KiB, which would make every row of a column chunk fight for the
        // same cache set), times 4 tokens: 16 independent accumulators in registers. Each lane
        // still adds its own products in row order, so the result is the scalar order exactly.
        const VECS: usize = 4;
        let lanes = S::F32_LANES;
        let pw = VECS * lanes;
        let panels = if t >= 4 { cols / pw } else { 0 };
        let mut panel = vec![0.0f32; rows * pw];
        for p in 0..panels {
            let j0 = p * pw;
            for (k, dst) in panel.chunks_exact_mut(pw).enumerate() {
                dst.copy_from_slice(&w[k * cols + j0..k * cols + j0 + pw]);
            }
            let mut ti = 0;
            while ti + 4 <= t {
                let xs: [&[f32]; 4] = core::array::from_fn(|u| &x[(ti + u) * rows1..(ti + u + 1) * rows1]);
                let mut acc = [[simd.splat_f32s(0.0); VECS]; 4];
                for (k, wrow) in panel.chunks_exact(pw).enumerate() {
                    let wv: [S::f32s; VECS] =
                        core::array::from_fn(|v| load_f32(simd, &wrow[v * lanes..(v + 1) * lanes]));
                    for (a, xt) in acc.iter_mut().zip(xs) {
                        let xb = simd.splat_f32s(xt[k]);
                        for (av, &wk) in a.iter_mut().zip(&wv) {
                            let p = P::round_simd(simd, simd.mul_f32s(xb, wk));
                            *av = P::round_simd(simd, simd.add_f32s(*av, p));
                        }
                    }
                }
                for (u, a) in acc.iter().enumerate() {
                    for (v, &av) in a.iter().enumerate() {
                        let at = (ti + u) * cols + j0 + v * lanes;
                        store_f32(simd, &mut out[at..at + lanes], av);
                    }
                }
                ti += 4;
            }
            for tt in ti..t {
                let xt = &x[tt * rows1..(tt + 1) * rows1];
                let mut acc = [simd.splat_f32s(0.0); VECS];
                for (k, wrow) in panel.chunks_exact(pw).enumerate() {
                    let xb = simd.splat_f32s(xt[k]);
                    for (v, av) in acc.iter_mut().enumerate() {
                        let wk = load_f32(simd, &wrow[v * lanes..(v + 1) * lanes]);
                        let p = P::round_simd(simd, simd.mul_f32s(xb, wk));
                        *av = P::round_simd(simd, simd.add_f32s(*av, p));
                    }
                }
                for (v, &av) in acc.iter().enumerate() {
                    let at = tt * cols + j0 + v * lanes;
                    store_f32(simd, &mut out[at..at + lanes], av);
                }
            }
        }
        // The remaining columns, a vector at a time.
        let done = panels * pw;
        let (w_rest, cols_rest) = (w, cols);
        // Four tokens at a time: four independent add chains hide the addition latency; each lane
        // still adds its own products in row order, so the result is the scalar order exactly.
        for_each_chunk::<S>(cols_rest - done, |j, n| {
            let j = j + done;
            let w = w_rest;
            let mut ti = 0;
            while ti + 4 <= t {
                let xs = [&x[ti * rows1..], &x[(ti + 1) * rows1..], &x[(ti + 2) * rows1..], &x[(ti + 3) * rows1..]];
                let mut acc = [simd.splat_f32s(0.0); 4];
                for k in 0..rows {
                    let wk = load_f32(simd, &w[k * cols + j..k * cols + j + n]);
                    for (a, xt) in acc.iter_mut().zip(xs) {
                        let p = P::round_simd(simd, simd.mul_f32s(simd.splat_f32s(xt[k]), wk));
                        *a = P::round_simd(simd, simd.add_f32s(*a, p));
                    }
                }
                for (u, a) in acc.into_iter().enumerate() {
                    store_f32(simd, &mut out[(ti + u) * cols + j..(ti + u) * cols + j + n], a);
                }
                ti += 4;
            }
            for tt in ti..t {
                let xt = &x[tt * rows1..];
                let mut acc = simd.splat_f32s(0.0);
                for k in 0..rows {
                    let wk = load_f32(simd, &w[k * cols + j..k * cols + j + n]);
                    let p = P::round_simd(simd, simd.mul_f32s(simd.splat_f32s(xt[k]), wk));
                    acc = P::round_simd(simd, simd.add_f32s(acc, p));
                }
                store_f32(simd, &mut out[tt * cols + j..tt * cols + j + n], acc);
            }
        });
    }
}
