//! AWQ statistics and scale formulas, as ModelOpt's numpy code computes them (`int4.py`:
//! `get_act_scale`, `get_weight_scale`, `get_scale`, the sibling mean, the alpha grids).
//!
//! ```text
//! act_scale[k]    = mean_t |x[t, k]|                                   (x: [T, K])
//! weight_scale[k] = mean_n |w[k, n]| / (amax_j + tiny)                 amax over numpy's reshape(B, -1)
//! s(alpha)[k]     = clip(x_max^alpha / (w_max^(1 - alpha) + tiny), 1e-4, 1e4)
//! s              /= sqrt(max(s) * min(s))
//! ```
//!
//! numpy details reproduced: `reshape(B, -1)` of the zero-padded row-major weight groups strided
//! rows (`amax` runs over rows r, r + K/B, r + 2K/B, ...); a reduction along the contiguous axis
//! uses numpy's pairwise summation (8 accumulators, blocks of 128); float16 means accumulate in
//! float32 and round once; `tiny` is `finfo(dtype).tiny` (6.1e-5 for float16); Python float
//! constants (`alpha`, `1e-4`) take the array's dtype (NEP 50).

use crate::FloatFormat;

/// `np.finfo(dtype).tiny`.
pub fn tiny(format: FloatFormat) -> f32 {
    match format {
        FloatFormat::F32 => f32::MIN_POSITIVE,
        FloatFormat::F16 => 6.103_515_6e-5,
        FloatFormat::BF16 => f32::MIN_POSITIVE,
    }
}

/// `np.arange(start, stop, step)` as numpy computes it: `ceil((stop - start) / step)` values
/// `start + i * step`.
pub fn arange(start: f64, stop: f64, step: f64) -> Vec<f64> {
    let n = ((stop - start) / step).ceil().max(0.0) as usize;
    (0..n).map(|i| start + i as f64 * step).collect()
}

/// AWQ-lite's grid: `np.arange(0, 1 + step, step)` (11 values for step 0.1, with
/// 0.30000000000000004 and friends).
pub fn lite_alphas(step: f64) -> Vec<f64> {
    arange(0.0, 1.0 + step, step)
}

/// AWQ-clip's grid: `[round(k, 2) for k in np.arange(min, 1.0, step)] + [1.0]`.
pub fn clip_alphas(min: f64, step: f64) -> Vec<f64> {
    let mut v: Vec<f64> =
        arange(min, 1.0, step).into_iter().map(|k| format!("{k:.2}").parse().expect("number")).collect();
    v.push(1.0);
    v
}

/// numpy's `pairwise_sum` for float32 (`n < 8`: a plain loop from 0; up to 128: eight
/// accumulators; above: halves split at a multiple of 8).
pub fn pairwise_sum(a: &[f32]) -> f32 {
    let n = a.len();
    if n < 8 {
        let mut res = 0.0f32;
        for &x in a {
            res += x;
        }
        res
    } else if n <= 128 {
        let mut r = [0f32; 8];
        r.copy_from_slice(&a[..8]);
        let whole = n - n % 8;
        let mut i = 8;
        while i < whole {
            for j in 0..8 {
                r[j] += a[i + j];
            }
            i += 8;
        }
        let mut res = ((r[0] + r[1]) + (r[2] + r[3])) + ((r[4] + r[5]) + (r[6] + r[7]));
        for &x in &a[whole..] {
            res += x;
        }
        res
    } else {
        let mut n2 = n / 2;
        n2 -= n2 % 8;
        pairwise_sum(&a[..n2]) + pairwise_sum(&a[n2..])
    }
}

/// `np.sum(a)` along a contiguous axis: numpy's pairwise sum of all elements.
pub fn contiguous_sum(a: &[f32]) -> f32 {
    pairwise_sum(a)
}

/// `a.mean()` along a contiguous axis in `format` (float16 accumulates in float32).
pub fn contiguous_mean(format: FloatFormat, a: &[f32]) -> f32 {
    format.round(contiguous_sum(a) / a.len() as f32)
}

/// `np.abs(x).mean(0)` of `x: [T, K]`: rows summed in order in float32, divided by T, rounded to
/// the dtype.
pub fn act_scale(format: FloatFormat, x: &[f32], k: usize) -> Vec<f32> {
    let t = x.len().checked_div(k).unwrap_or(0);
    let mut acc = vec![0.0f32; k];
    for (i, row) in x.chunks_exact(k.max(1)).enumerate() {
        for (a, &v) in acc.iter_mut().zip(row) {
            *a = if i == 0 { v.abs() } else { *a + v.abs() };
        }
    }
    acc.iter().map(|&s| format.round(s / t as f32)).collect()
}

/// `get_weight_scale(w, block_size)` of `w: [K, N]`.
///
/// numpy's `reshape(B, -1)` has `m = (Kp / B) N` columns, a whole number of weight rows, so the
/// divisor of `w[r, c]` is `denom[(r mod Kp / B) N + c]`: each row is divided by a contiguous row of
/// `denom` (on the tier's SIMD, into one reused buffer) and then averaged.
pub fn weight_scale(format: FloatFormat, w: &[f32], [k, n]: [usize; 2], block: usize) -> Vec<f32> {
    let blocks = k.div_ceil(block);
    let m = blocks * n;
    let w = &w[..k * n];
    // The amax over the strided rows of the zero-padded weight (the padding's zeros change no
    // maximum of absolute values).
    let mut amax = vec![0.0f32; m];
    for part in w.chunks(m.max(1)) {
        for (a, &v) in amax.iter_mut().zip(part) {
            *a = a.max(v.abs());
        }
    }
    let denom: Vec<f32> = amax.iter().map(|&a| format.round(a + tiny(format))).collect();
    let mut row = vec![0.0f32; n];
    (0..k)
        .map(|r| {
            let d = &denom[(r % blocks) * n..][..n];
            crate::kernels::divide_columns(&w[r * n..][..n], d, &mut row).expect("one divisor per column");
            // |w| / d = |w / d|: d > 0, and the quotient's magnitude does not depend on the signs.
            for v in row.iter_mut() {
                *v = v.abs();
            }
            if format != FloatFormat::F32 {
                crate::kernels::round_to_format(format, &mut row).expect("lengths are the slice's own");
            }
            contiguous_mean(format, &row)
        })
        .collect()
}

/// `x ** alpha` for a float array and a Python float exponent, in the array's dtype.
///
/// float16 and bfloat16: numpy (ml_dtypes) evaluates C `powf` on the widened values and rounds;
/// Rust's `f32::powf` is that same libm function. float32: numpy dispatches to its own SIMD
/// routine where the CPU has one (SVML on AVX-512, within 1 ulp of the exact result) and to libm
/// elsewhere, so its last bit depends on the machine; nibble uses the correctly rounded power
/// (computed in f64), which is machine-independent and within 1 ulp of every one of those.
fn pow(format: FloatFormat, x: f32, alpha: f64) -> f32 {
    let a = format.constant(alpha);
    match format {
        FloatFormat::F32 => ((x as f64).powf(a as f64)) as f32,
        _ => format.round(x.powf(a)),
    }
}

/// `get_scale(x_max, w_max, alpha)`.
pub fn awq_scale(format: FloatFormat, x_max: &[f32], w_max: &[f32], alpha: f64) -> Vec<f32> {
    let t = tiny(format);
    let (lo, hi) = (format.constant(1e-4), format.constant(1e4));
    let s: Vec<f32> = x_max
        .iter()
        .zip(w_max)
        .map(|(&x, &w)| {
            let num = pow(format, x, alpha);
            let den = format.round(pow(format, w, 1.0 - alpha) + t);
            format.round(num / den).clamp(lo, hi)
        })
        .collect();
    let max = s.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
    let min = s.iter().fold(f32::INFINITY, |m, &v| m.min(v));
    let norm = format.round(format.round(max * min).sqrt());
    s.iter().map(|&v| format.round(v / norm)).collect()
}

/// The mean of sibling scales: `np.concatenate([s[:, None] ...], axis=1).mean(axis=1)`.
pub fn mean_scales(format: FloatFormat, scales: &[&[f32]]) -> Vec<f32> {
    let k = scales.first().map_or(0, |s| s.len());
    (0..k)
        .map(|i| {
            let row: Vec<f32> = scales.iter().map(|s| s[i]).collect();
            contiguous_mean(format, &row)
        })
        .collect()
}
