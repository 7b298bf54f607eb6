//! The scalar oracle: ModelOpt's numpy code (`modelopt/onnx/quantization/quant_utils.py`:
//! `find_scales`, `rtn`, `dq_tensor`, and ONNX's 4-bit packing), written out operation by operation
//! with the same dtype for every intermediate. Rounding to f16/bf16 goes through the `half` crate,
//! independently of the kernels' integer rounding.
//!
//! Slab-level functions (one block of rows, per-column results) are the per-element formulas; the
//! tensor-level functions add numpy's padding, transposes and `repeat`s around them. Min and max use
//! `f32::total_cmp` (numpy's choice between -0.0 and +0.0 changes no output: the range is clipped to
//! 1e-5 and a zero-valued zero point is stored as the integer 0 either way).

use crate::{Bits, FloatFormat};

/// Python's `1e-5` in the weight dtype.
fn clip_min(format: FloatFormat) -> f32 {
    format.constant(crate::kernels::scales::CLIP_MIN)
}

/// round half to even (`np.rint`).
fn rint(x: f32) -> f32 {
    x.round_ties_even()
}

/// `np.abs(w).max(axis)` over the rows of a slab, per column (NaN propagates).
pub fn block_absmax(w: &[f32], cols: usize) -> Vec<f32> {
    let mut out = vec![0.0f32; cols];
    for (k, &x) in w.iter().enumerate() {
        let a = x.abs();
        let o = &mut out[k % cols];
        if a.is_nan() || a > *o {
            *o = if o.is_nan() { *o } else { a };
        }
    }
    out
}

/// Per-column minimum and maximum of a slab, with an extra 0.0 row when `include_zero`.
pub fn block_minmax(w: &[f32], cols: usize, include_zero: bool) -> (Vec<f32>, Vec<f32>) {
    let start = if include_zero { (0.0, 0.0) } else { (f32::INFINITY, f32::NEG_INFINITY) };
    let mut lo = vec![start.0; cols];
    let mut hi = vec![start.1; cols];
    for (k, &x) in w.iter().enumerate() {
        let c = k % cols;
        lo[c] = lo[c].min_total(x);
        hi[c] = hi[c].max_total(x);
    }
    (lo, hi)
}

trait TotalOrd {
    fn min_total(self, other: Self) -> Self;
    fn max_total(self, other: Self) -> Self;
}
impl TotalOrd for f32 {
    fn min_total(self, other: f32) -> f32 {
        if other.total_cmp(&self).is_lt() {
            other
        } else {
            self
        }
    }
    fn max_total(self, other: f32) -> f32 {
        if other.total_cmp(&self).is_gt() {
            other
        } else {
            self
        }
    }
}

/// `s = (w_amax * alpha) / scale; s = np.clip(s, CLIP_MIN, None)` (`scale = 2 ** (num_bits - 1) - 1`),
/// in the weight dtype.
pub fn scales_symmetric(format: FloatFormat, bits: Bits, amax: &[f32], alpha: f64) -> Vec<f32> {
    let alpha = format.constant(alpha);
    let qmax = format.constant(bits.qmax() as f64);
    amax.iter()
        .map(|&a| {
            let s = format.round(a * alpha);
            let s = format.round(s / qmax);
            s.max(clip_min(format))
        })
        .collect()
}

/// `s = (max - min).clip(min=CLIP_MIN) / max_int; z = (-np.round(min / s)).clip(0, max_int)`
/// (`max_int = 2 ** num_bits - 1`), with `max` and `min` first multiplied by alpha (a no-op at
/// ModelOpt's alpha = 1).
///
/// Two corrections to ModelOpt: the range contains zero (`min = min(min, 0)`, `max = max(max, 0)`;
/// ModelOpt's own range saturates one-sided blocks), and a range that overflows the dtype
/// (`rnd(hi - lo) = inf` with finite ends) is divided by `max_int` in float64 and rounded once.
pub fn scales_zero_point(
    format: FloatFormat,
    bits: Bits,
    min: &[f32],
    max: &[f32],
    alpha: f64,
) -> (Vec<f32>, Vec<f32>) {
    let alpha = format.constant(alpha);
    let levels = format.constant(bits.levels() as f64);
    min.iter()
        .zip(max)
        .map(|(&lo, &hi)| {
            let hi = if hi < 0.0 { 0.0 } else { hi };
            let lo = if lo > 0.0 { 0.0 } else { lo };
            let hi = format.round(hi * alpha);
            let lo = format.round(lo * alpha);
            let range = format.round(hi - lo).max(clip_min(format));
            let s = if range.is_infinite() && hi.is_finite() && lo.is_finite() {
                // float64 difference and quotient, one rounding to the dtype.
                match format {
                    FloatFormat::F32 => ((hi as f64 - lo as f64) / levels as f64) as f32,
                    FloatFormat::F16 => half::f16::from_f64((hi as f64 - lo as f64) / levels as f64).to_f32(),
                    FloatFormat::BF16 => half::bf16::from_f64((hi as f64 - lo as f64) / levels as f64).to_f32(),
                }
            } else {
                format.round(range / levels)
            };
            let temp = format.round(lo / s);
            let temp = rint(temp);
            let temp = -temp;
            let z = temp.clamp(0.0, bits.levels()) + 0.0;
            (s, z)
        })
        .unzip()
}

/// `np.rint(w / s).clip(minq, maxq).astype(np.int8)`, or with `+ zp` before `.clip(0, max_int)`, per
/// element of a slab; returns the int8 values as bytes.
pub fn quantize(format: FloatFormat, bits: Bits, w: &[f32], cols: usize, scale: &[f32], zp: Option<&[f32]>) -> Vec<u8> {
    w.iter()
        .enumerate()
        .map(|(k, &x)| {
            let c = k % cols;
            let y = rint(format.round(x / scale[c]));
            let q = match zp {
                None => y.clamp(bits.qmin(), bits.qmax()),
                Some(zp) => format.round(y + zp[c]).clamp(0.0, bits.levels()),
            };
            if q < 0.0 {
                q as i8 as u8
            } else {
                q as u8
            }
        })
        .collect()
}

/// `q * s`, or `(q - zp) * s`, in the weight dtype, per element of a slab.
pub fn dequantize(format: FloatFormat, codes: &[u8], cols: usize, scale: &[f32], zp: Option<&[f32]>) -> Vec<f32> {
    codes
        .iter()
        .enumerate()
        .map(|(k, &b)| {
            let c = k % cols;
            match zp {
                None => format.round((b as i8 as f32) * scale[c]),
                Some(zp) => format.round(format.round(b as f32 - zp[c]) * scale[c]),
            }
        })
        .collect()
}

/// Packs int4 values in ONNX order (element `2i` low nibble of byte `i`, odd tail high nibble 0).
pub fn pack(values: &[u8]) -> Vec<u8> {
    values.chunks(2).map(|p| (p[0] & 0xf) | (p.get(1).map_or(0, |h| h & 0xf) << 4)).collect()
}

/// Scales (and zero points) of a whole 2-D tensor, shaped as numpy returns them.
#[derive(Clone, Debug, PartialEq)]
pub struct Scales {
    /// Row-major values; `[ceil(K/B), N]` for axis 0, `[R, ceil(C/B)]` for axis 1.
    pub scale: Vec<f32>,
    /// Zero points (integer-valued) in the same shape, if asked for.
    pub zero_point: Option<Vec<f32>>,
    /// The shape of `scale`.
    pub shape: [usize; 2],
}

/// Zero-pads the quantized axis to a multiple of `block`, and makes it the row axis (numpy's
/// `_pad` followed by the transposes in `find_scales`): returns the `[padded_len, others]` matrix.
fn blocked_rows(w: &[f32], shape: [usize; 2], block: usize, axis: usize) -> (Vec<f32>, usize, usize) {
    let [r, c] = shape;
    let (len, others) = if axis == 0 { (r, c) } else { (c, r) };
    let padded = len.div_ceil(block) * block;
    let mut m = vec![0.0f32; padded * others];
    for i in 0..r {
        for j in 0..c {
            let (k, n) = if axis == 0 { (i, j) } else { (j, i) };
            m[k * others + n] = w[i * c + j];
        }
    }
    (m, padded, others)
}

/// `find_scales(w, block_size, quantize_axis, alpha, use_zero_point, num_bits)` for a 2-D `w` of `shape`.
#[allow(clippy::too_many_arguments)]
pub fn find_scales(
    format: FloatFormat,
    bits: Bits,
    w: &[f32],
    shape: [usize; 2],
    block: usize,
    axis: usize,
    alpha: f64,
    zero_point: bool,
) -> Scales {
    let (m, padded, others) = blocked_rows(w, shape, block, axis);
    let nb = padded / block;
    let mut scale = Vec::with_capacity(nb * others);
    let mut zps = Vec::with_capacity(nb * others);
    for slab in m.chunks_exact(block * others) {
        if zero_point {
            // The padded rows are part of `slab` already (they are zeros).
            let (lo, hi) = block_minmax(slab, others, false);
            let (s, z) = scales_zero_point(format, bits, &lo, &hi, alpha);
            scale.extend(s);
            zps.extend(z);
        } else {
            scale.extend(scales_symmetric(format, bits, &block_absmax(slab, others), alpha));
        }
    }
    // `scale` is [nb, others]; numpy's axis-1 result is its transpose [R, nb].
    let transpose = |v: Vec<f32>| -> Vec<f32> {
        if axis == 0 {
            v
        } else {
            (0..others).flat_map(|n| (0..nb).map(move |b| (b, n))).map(|(b, n)| v[b * others + n]).collect()
        }
    };
    let shape_out = if axis == 0 { [nb, others] } else { [others, nb] };
    Scales { scale: transpose(scale), zero_point: zero_point.then(|| transpose(zps)), shape: shape_out }
}

/// Scale index of element `(i, j)`.
fn scale_index(scales: &Scales, i: usize, j: usize, block: usize, axis: usize) -> usize {
    if axis == 0 {
        (i / block) * scales.shape[1] + j
    } else {
        i * scales.shape[1] + j / block
    }
}

/// `rtn(w, s, block_size, quantize_axis, zp, num_bits)`: the int8 codes of the whole tensor.
pub fn rtn(
    format: FloatFormat,
    bits: Bits,
    w: &[f32],
    shape: [usize; 2],
    scales: &Scales,
    block: usize,
    axis: usize,
) -> Vec<u8> {
    let c = shape[1];
    w.iter()
        .enumerate()
        .map(|(e, &x)| {
            let si = scale_index(scales, e / c, e % c, block, axis);
            let zp = scales.zero_point.as_ref().map(|z| std::slice::from_ref(&z[si]));
            quantize(format, bits, &[x], 1, &scales.scale[si..=si], zp)[0]
        })
        .collect()
}

/// `dq_tensor(q, s, block_size, quantize_axis, zp)`.
pub fn dq_tensor(
    format: FloatFormat,
    codes: &[u8],
    shape: [usize; 2],
    scales: &Scales,
    block: usize,
    axis: usize,
) -> Vec<f32> {
    let c = shape[1];
    codes
        .iter()
        .enumerate()
        .map(|(e, &q)| {
            let si = scale_index(scales, e / c, e % c, block, axis);
            let zp = scales.zero_point.as_ref().map(|z| std::slice::from_ref(&z[si]));
            dequantize(format, &[q], 1, &scales.scale[si..=si], zp)[0]
        })
        .collect()
}

/// `np.sum(x * w, axis=-1)` per token and column of ModelOpt's 4-D AWQ-clip product: products and
/// running sums rounded to the dtype, in order over the block's rows.
pub fn block_dot(format: FloatFormat, x: &[f32], w: &[f32], [rows, cols]: [usize; 2], t: usize) -> Vec<f32> {
    let mut out = vec![0.0f32; t * cols];
    for ti in 0..t {
        for c in 0..cols {
            let mut acc = 0.0f32;
            for k in 0..rows {
                acc = format.round(acc + format.round(x[ti * rows + k] * w[k * cols + c]));
            }
            out[ti * cols + c] = acc;
        }
    }
    out
}

/// AWQ's `w * s[:, None]` rounded to the dtype, per element, and whether every result is finite.
pub fn scale_rows(format: FloatFormat, w: &[f32], s: &[f32], cols: usize) -> (Vec<f32>, bool) {
    let out: Vec<f32> = w.iter().enumerate().map(|(i, &v)| format.round(v * s[i / cols])).collect();
    let finite = out.iter().all(|v| v.is_finite());
    (out, finite)
}

/// AWQ-lite's error `w - dq / s[:, None]`, per element.
pub fn unscaled_error(dq: &[f32], w: &[f32], s: &[f32], cols: usize) -> Vec<f32> {
    w.iter().zip(dq).enumerate().map(|(i, (&wv, &d))| wv - d / s[i / cols]).collect()
}

/// AWQ-lite's error matrix of a slab: `w - dq(q(rnd(w * t[:, None]))) / t[:, None]` with the
/// column scales (and zero points) given, composed of the references above.
#[allow(clippy::too_many_arguments)]
pub fn qdq_unscaled_error(
    format: FloatFormat,
    bits: Bits,
    w: &[f32],
    cols: usize,
    t: &[f32],
    scale: &[f32],
    zp: Option<&[f32]>,
) -> Vec<f32> {
    let (x, _) = scale_rows(format, w, t, cols);
    let dq = dequantize(format, &quantize(format, bits, &x, cols, scale, zp), cols, scale, zp);
    unscaled_error(&dq, w, t, cols)
}

/// `x / s[None, :]`, per element.
pub fn divide_columns(x: &[f32], s: &[f32]) -> Vec<f32> {
    x.iter().enumerate().map(|(i, &v)| v / s[i % s.len()]).collect()
}

/// `sum(f(a[i], b[i]))` in f64: element `i` of the whole 16-element groups goes to partial sum
/// `i mod 16` (in order), the partial sums are added in order, then the tail's sum (in order).
pub fn sum_f64(a: &[f32], b: &[f32], f: impl Fn(f64, f64) -> f64) -> f64 {
    let whole = a.len() / 16 * 16;
    let mut acc = [0.0f64; 16];
    for i in 0..whole {
        acc[i % 16] += f(a[i] as f64, b[i] as f64);
    }
    let tail: f64 = (whole..a.len()).map(|i| f(a[i] as f64, b[i] as f64)).sum();
    acc.iter().sum::<f64>() + tail
}
