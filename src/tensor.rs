//! Whole-array quantization of a row-major tensor of any rank along one axis: the fast equivalent of
//! ModelOpt's numpy functions `find_scales`, `rtn`, `dq_tensor` and `quant_tensor`
//! (`modelopt/onnx/quantization/quant_utils.py`, ModelOpt 0.47.0), on the kernels of [`crate::kernels`].
//!
//! A tensor of shape `[d0, .., d(r-1)]` quantized along axis `a` is viewed as `[outer, len, inner]`
//! (`outer = d0 * .. * d(a-1)`, `len = d(a)`, `inner = d(a+1) * .. * d(r-1)`); blocks of `block`
//! elements run along `len`. Scales (and zero points) are `[outer, ceil(len / block), inner]`, which
//! is numpy's shape for `quantize_axis = 0` (`[ceil(K/B), N]`) and for the last axis (`[R, ceil(C/B)]`).
//! A last partial block is zero-padded for its statistics, as ModelOpt's `_pad` does (the zeros take
//! part in the min/max of a zero-point block); codes and dequantized values keep `len` elements.
//!
//! Per block (every step rounded to the weight's dtype, `rint` half to even; see [`crate::float`]):
//!
//! ```text
//! symmetric:   s  = max(rnd(rnd(amax(|w_blk|) * alpha) / qmax), 1e-5)     q = clip(rint(rnd(w / s)), qmin, qmax)
//! zero point:  s  = rnd(max(rnd(hi - lo), 1e-5) / levels)                  zp = clip(-rint(rnd(lo / s)), 0, levels)
//!              q  = clip(rint(rnd(w / s)) + zp, 0, levels)                 (lo, hi: the block range with 0, see kernels::scales)
//! dequantize:  dq = rnd(q * s)    or    rnd(rnd(q - zp) * s)
//! ```
//!
//! with `qmax = 7, qmin = -8, levels = 15` for 4 bits and `127, -128, 255` for 8 bits ([`Bits`]).
//! Blocks (or groups of rows, when the blocks are contiguous) run in parallel on rayon's pool.

use crate::kernels;
use crate::{Bits, BlockSize, Error, FloatFormat, Result, Tier, WeightData};
use half::{bf16, f16};
use rayon::prelude::*;

/// A tensor's shape around its quantize axis: `[outer, len, inner]` with blocks of `block` along `len`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Blocking {
    /// Product of the dimensions before the quantize axis.
    pub outer: usize,
    /// The quantize axis' length.
    pub len: usize,
    /// Product of the dimensions after the quantize axis.
    pub inner: usize,
    /// Elements per block along the quantize axis (>= 1; the whole axis for per-channel).
    pub block: usize,
}

impl Blocking {
    /// The blocking of a row-major tensor of `shape` quantized along `axis`.
    ///
    /// # Errors
    /// [`Error::BadAxis`] if `axis >= shape.len()`; [`Error::BadBlockSize`] for a block of 0 elements.
    pub fn new(shape: &[usize], axis: usize, block_size: BlockSize) -> Result<Blocking> {
        if axis >= shape.len() {
            return Err(Error::BadAxis { axis });
        }
        let len = shape[axis];
        let block = match block_size {
            BlockSize::Blocked(0) => return Err(Error::BadBlockSize { block_size: 0 }),
            other => other.resolve(len),
        };
        Ok(Blocking { outer: shape[..axis].iter().product(), len, inner: shape[axis + 1..].iter().product(), block })
    }

    /// Blocks along the quantize axis, `ceil(len / block)`.
    pub fn blocks(&self) -> usize {
        self.len.div_ceil(self.block)
    }

    /// Elements of the tensor.
    pub fn elements(&self) -> usize {
        self.outer * self.len * self.inner
    }

    /// Elements of the scale (and zero-point) tensor `[outer, blocks, inner]`.
    pub fn scale_len(&self) -> usize {
        self.outer * self.blocks() * self.inner
    }
}

/// Scales and zero points of a tensor, row-major `[outer, blocks, inner]` (see [`Blocking`]).
#[derive(Clone, Debug, PartialEq)]
pub struct TensorScales {
    /// Scales, values of the weight's dtype held as f32.
    pub scale: Vec<f32>,
    /// Zero points (integer values in `0..=levels`), with a zero point only.
    pub zero_point: Option<Vec<f32>>,
}

/// Dequantized output in the scale's dtype.
#[derive(Debug)]
pub enum Dequantized<'a> {
    /// float32 values.
    F32(&'a mut [f32]),
    /// float16 values.
    F16(&'a mut [f16]),
    /// bfloat16 values.
    BF16(&'a mut [bf16]),
}

impl Dequantized<'_> {
    fn format(&self) -> FloatFormat {
        match self {
            Dequantized::F32(_) => FloatFormat::F32,
            Dequantized::F16(_) => FloatFormat::F16,
            Dequantized::BF16(_) => FloatFormat::BF16,
        }
    }

    fn len(&self) -> usize {
        match self {
            Dequantized::F32(v) => v.len(),
            Dequantized::F16(v) => v.len(),
            Dequantized::BF16(v) => v.len(),
        }
    }
}

/// ModelOpt's `find_scales(w, block_size, quantize_axis, alpha, use_zero_point, num_bits)`: the
/// per-block scales (and zero points) of `w` (`blocking.elements()` values, row-major).
///
/// `alpha` is the Python float clip ratio (1.0: none), applied to the range before the division.
///
/// # Errors
/// [`Error::LengthMismatch`] if `w` does not hold `blocking.elements()` values; [`Error::NonFinite`]
/// if a block holds NaN or infinity (`block` along the axis, `column` the flat index across the
/// other axes, `outer * inner` of them).
pub fn find_scales(
    w: WeightData<'_>,
    blocking: Blocking,
    alpha: f64,
    zero_point: bool,
    bits: Bits,
) -> Result<TensorScales> {
    run(w, blocking, Step::Scales { alpha, zero_point }, bits, &mut [])
}

/// ModelOpt's `quant_tensor(w, block_size, quantize_axis, alpha, use_zero_point, num_bits)`: the
/// scales (returned) and the codes of `w` (written to `codes`, one byte per element: the int8 value's
/// two's complement byte, or `0..=levels` with a zero point).
///
/// # Errors
/// As [`find_scales`]; [`Error::LengthMismatch`] if `codes` does not hold `blocking.elements()` bytes.
pub fn quant_tensor(
    w: WeightData<'_>,
    blocking: Blocking,
    alpha: f64,
    zero_point: bool,
    bits: Bits,
    codes: &mut [u8],
) -> Result<TensorScales> {
    kernels::check_len("codes", blocking.elements(), codes.len())?;
    run(w, blocking, Step::Quantize { alpha, zero_point }, bits, codes)
}

/// ModelOpt's `rtn(w, s, block_size, quantize_axis, zp, num_bits)`: the codes of `w` for given
/// scales (and zero points), `[outer, blocks, inner]` f32 values of `w`'s dtype, into `codes` (one
/// byte per element, as [`quant_tensor`] writes them). Zero points must be integer values in
/// `0..=levels`.
///
/// # Errors
/// [`Error::LengthMismatch`] for buffers of the wrong length; [`Error::NonFinite`] if a block of `w`
/// holds NaN or infinity.
pub fn rtn(
    w: WeightData<'_>,
    blocking: Blocking,
    scale: &[f32],
    zero_point: Option<&[f32]>,
    bits: Bits,
    codes: &mut [u8],
) -> Result<()> {
    kernels::check_len("scales", blocking.scale_len(), scale.len())?;
    if let Some(z) = zero_point {
        kernels::check_len("zero points", blocking.scale_len(), z.len())?;
    }
    kernels::check_len("codes", blocking.elements(), codes.len())?;
    run(w, blocking, Step::Given { scale, zero_point }, bits, codes).map(|_| ())
}

/// ModelOpt's `dq_tensor(w, s, block_size, quantize_axis, zp)`: `q * s`, or `(q - zp) * s`, rounded
/// to the output's dtype, for codes `codes` (`signed`: int8 values, else uint8) and scales (and zero
/// points) `[outer, blocks, inner]` held as f32 values of the output's dtype.
///
/// # Errors
/// [`Error::LengthMismatch`] for buffers of the wrong length.
pub fn dq_tensor(
    codes: &[u8],
    signed: bool,
    blocking: Blocking,
    scale: &[f32],
    zero_point: Option<&[f32]>,
    mut out: Dequantized<'_>,
) -> Result<()> {
    let n = blocking.elements();
    kernels::check_len("codes", n, codes.len())?;
    kernels::check_len("output", n, out.len())?;
    kernels::check_len("scales", blocking.scale_len(), scale.len())?;
    if let Some(z) = zero_point {
        kernels::check_len("zero points", blocking.scale_len(), z.len())?;
    }
    if n == 0 {
        return Ok(());
    }
    let format = out.format();
    let tier = Tier::best();
    // The kernel reads bytes as signed without a zero point and as unsigned with one; other
    // combinations (and non-integer zero points) take the per-element formula.
    // (A fold of ORs, not `all`: without an early exit the scan vectorizes.)
    let kernel_reads = |c: &[u8]| match (signed, zero_point.is_some()) {
        (true, false) | (false, true) => true,
        (true, true) | (false, false) => c.iter().fold(0u8, |acc, &b| acc | b) < 0x80,
    };
    let zp_exact = zero_point.is_none_or(|z| z.iter().all(|&v| v.fract() == 0.0 && (0.0..=255.0).contains(&v)));
    let Blocking { len, inner, block, .. } = blocking;
    let nb = blocking.blocks();
    // One task per (outer, block) slab of `rows x inner` elements.
    let job = |slab: usize, codes: &[u8], out: &mut [f32]| -> Result<()> {
        let (o, b) = (slab / nb, slab % nb);
        let at = (o * nb + b) * inner;
        let s = &scale[at..at + inner];
        let z = zero_point.map(|z| &z[at..at + inner]);
        if inner > 1 && zp_exact && kernel_reads(codes) {
            return kernels::dequantize_with(tier, format, codes, inner, s, z, out);
        }
        for (k, (&q, o)) in codes.iter().zip(out.iter_mut()).enumerate() {
            let c = k % inner;
            let q = if signed { q as i8 as f32 } else { q as f32 };
            *o = match z {
                None => format.round(q * s[c]),
                Some(z) => format.round(format.round(q - z[c]) * s[c]),
            };
        }
        Ok(())
    };
    let slabs: Vec<(usize, &[u8])> =
        codes.chunks(len * inner).flat_map(|row| row.chunks(block * inner)).enumerate().collect();
    match &mut out {
        Dequantized::F32(out) => {
            let outs: Vec<&mut [f32]> = out.chunks_mut(len * inner).flat_map(|r| r.chunks_mut(block * inner)).collect();
            slabs.into_par_iter().zip(outs).try_for_each(|((i, c), o)| job(i, c, o))
        }
        Dequantized::F16(out) => {
            let outs: Vec<&mut [f16]> = out.chunks_mut(len * inner).flat_map(|r| r.chunks_mut(block * inner)).collect();
            narrow_slabs(slabs, outs, inner, &job, half::slice::HalfFloatSliceExt::convert_from_f32_slice)
        }
        Dequantized::BF16(out) => {
            let outs: Vec<&mut [bf16]> =
                out.chunks_mut(len * inner).flat_map(|r| r.chunks_mut(block * inner)).collect();
            narrow_slabs(slabs, outs, inner, &job, half::slice::HalfFloatSliceExt::convert_from_f32_slice)
        }
    }
}

/// f32 values staged per chunk of whole rows before they are narrowed to a 16-bit output: about
/// 32 KiB, so a chunk is written and read back in the core's cache (a whole 128 x 4096 slab, 2 MiB,
/// went through memory twice).
const STAGE: usize = 8192;

/// Runs `job` (slab index, codes, f32 output) on every slab in parallel, a chunk of whole rows at a
/// time, and narrows each chunk into `outs` with `narrow`.
fn narrow_slabs<T: Send>(
    slabs: Vec<(usize, &[u8])>,
    outs: Vec<&mut [T]>,
    inner: usize,
    job: &(impl Fn(usize, &[u8], &mut [f32]) -> Result<()> + Sync),
    narrow: fn(&mut [T], &[f32]),
) -> Result<()> {
    let chunk = (STAGE / inner).max(1) * inner;
    slabs.into_par_iter().zip(outs).try_for_each(|((i, codes), out)| {
        let mut staged = vec![0.0f32; chunk.min(codes.len())];
        for (codes, out) in codes.chunks(chunk).zip(out.chunks_mut(chunk)) {
            let staged = &mut staged[..codes.len()];
            job(i, codes, staged)?;
            narrow(out, staged);
        }
        Ok(())
    })
}

/// What a pass over the blocks computes.
#[derive(Clone, Copy)]
enum Step<'a> {
    /// Scales (and zero points) only.
    Scales { alpha: f64, zero_point: bool },
    /// Scales, then codes.
    Quantize { alpha: f64, zero_point: bool },
    /// Codes for given scales (and zero points).
    Given { scale: &'a [f32], zero_point: Option<&'a [f32]> },
}

impl Step<'_> {
    fn zero_point(&self) -> bool {
        match *self {
            Step::Scales { zero_point, .. } | Step::Quantize { zero_point, .. } => zero_point,
            Step::Given { zero_point, .. } => zero_point.is_some(),
        }
    }
}

/// Rows of the tensor's `[outer, len]` view transposed together when blocks are contiguous
/// (`inner == 1`): the kernels then vectorize across these rows.
const GROUP: usize = 64;

/// One pass over every block: statistics and scales (unless given), then codes (if `codes` is not
/// empty). Returns the scales computed (empty vectors for [`Step::Given`]).
fn run(w: WeightData<'_>, blocking: Blocking, step: Step<'_>, bits: Bits, codes: &mut [u8]) -> Result<TensorScales> {
    kernels::check_len("weight", blocking.elements(), w.len())?;
    let Blocking { outer, len, inner, block } = blocking;
    let nb = blocking.blocks();
    let computing = !matches!(step, Step::Given { .. });
    let zero_point = step.zero_point();
    let scale_len = if computing { blocking.scale_len() } else { 0 };
    let mut scale = vec![0.0f32; scale_len];
    let mut zp = vec![0.0f32; if computing && zero_point { scale_len } else { 0 }];
    if blocking.elements() == 0 {
        return Ok(TensorScales { scale, zero_point: (computing && zero_point).then_some(zp) });
    }
    let tier = Tier::best();
    let format = w.format();
    let ctx = Ctx { tier, format, bits, step, block, nb };
    if inner > 1 {
        // One task per (outer, block) slab: rows x inner, contiguous in the tensor.
        let mut code_slabs: Vec<&mut [u8]> = if codes.is_empty() {
            (0..outer * nb).map(|_| Default::default()).collect()
        } else {
            codes.chunks_mut(len * inner).flat_map(|r| r.chunks_mut(block * inner)).collect()
        };
        let mut scale_rows: Vec<&mut [f32]> = match computing {
            true => scale.chunks_mut(inner).collect(),
            false => (0..outer * nb).map(|_| Default::default()).collect(),
        };
        let mut zp_rows: Vec<&mut [f32]> = match computing && zero_point {
            true => zp.chunks_mut(inner).collect(),
            false => (0..outer * nb).map(|_| Default::default()).collect(),
        };
        code_slabs.par_iter_mut().zip(scale_rows.par_iter_mut()).zip(zp_rows.par_iter_mut()).enumerate().try_for_each(
            |(i, ((codes, scale), zp))| {
                let (o, b) = (i / nb, i % nb);
                let rows = block.min(len - b * block);
                let start = (o * len + b * block) * inner;
                let widened;
                let slab: &[f32] = match w {
                    WeightData::F32(v) => &v[start..start + rows * inner],
                    _ => {
                        let mut buf = vec![0.0f32; rows * inner];
                        w.copy_f32(tier, start, &mut buf)?;
                        widened = buf;
                        &widened
                    }
                };
                let column0 = o * inner;
                ctx.slab(slab, rows, b, column0, i, scale, zp, codes)
            },
        )?;
    } else {
        // Contiguous blocks: groups of rows of the [outer, len] view, transposed to [len, group].
        let mut code_groups: Vec<&mut [u8]> = match codes.is_empty() {
            true => (0..outer.div_ceil(GROUP)).map(|_| Default::default()).collect(),
            false => codes.chunks_mut(GROUP * len).collect(),
        };
        let mut scale_groups: Vec<&mut [f32]> = match computing {
            true => scale.chunks_mut(GROUP * nb).collect(),
            false => (0..outer.div_ceil(GROUP)).map(|_| Default::default()).collect(),
        };
        let mut zp_groups: Vec<&mut [f32]> = match computing && zero_point {
            true => zp.chunks_mut(GROUP * nb).collect(),
            false => (0..outer.div_ceil(GROUP)).map(|_| Default::default()).collect(),
        };
        code_groups
            .par_iter_mut()
            .zip(scale_groups.par_iter_mut())
            .zip(zp_groups.par_iter_mut())
            .enumerate()
            .try_for_each(|(gi, ((codes, scale), zp))| ctx.group(w, len, outer, gi, codes, scale, zp))?;
    }
    Ok(TensorScales { scale, zero_point: (computing && zero_point).then_some(zp) })
}

/// The parameters every block task shares.
struct Ctx<'a> {
    tier: Tier,
    format: FloatFormat,
    bits: Bits,
    step: Step<'a>,
    block: usize,
    nb: usize,
}

impl Ctx<'_> {
    /// One slab of `rows x cols` f32 values (block `b`; `column0` the flat index of its first column
    /// across the other axes; `at` the index of its scale row in `[outer * blocks]`): scales into
    /// `scale`/`zp` (when computed), codes into `codes` (when not empty).
    #[allow(clippy::too_many_arguments)]
    fn slab(
        &self,
        w: &[f32],
        rows: usize,
        b: usize,
        column0: usize,
        at: usize,
        scale: &mut [f32],
        zp: &mut [f32],
        codes: &mut [u8],
    ) -> Result<()> {
        let Ctx { tier, format, bits, step, block, .. } = *self;
        let cols = w.len() / rows.max(1);
        let non_finite =
            |c: usize| Error::NonFinite { block: b, column: column0 + c, start: b * block, end: b * block + rows };
        let (s, z): (&[f32], Option<&[f32]>) = match step {
            Step::Scales { alpha, zero_point } | Step::Quantize { alpha, zero_point } => {
                let alphas = vec![format.constant(alpha); cols];
                if zero_point {
                    let mut lo = vec![0.0f32; cols];
                    let mut hi = vec![0.0f32; cols];
                    kernels::block_minmax_with(tier, w, cols, rows < block, &mut lo, &mut hi)?;
                    if let Some(c) = (0..cols).find(|&c| !lo[c].is_finite() || !hi[c].is_finite()) {
                        return Err(non_finite(c));
                    }
                    kernels::scales_zero_point_alphas_with(tier, format, bits, &lo, &hi, &alphas, scale, zp)?;
                } else {
                    let mut amax = vec![0.0f32; cols];
                    kernels::block_absmax_with(tier, w, cols, &mut amax)?;
                    if let Some(c) = amax.iter().position(|a| !a.is_finite()) {
                        return Err(non_finite(c));
                    }
                    kernels::scales_symmetric_alphas_with(tier, format, bits, &amax, &alphas, scale)?;
                }
                (&*scale, zero_point.then_some(&*zp))
            }
            Step::Given { scale, zero_point } => {
                if let Some(k) = w.iter().position(|x| !x.is_finite()) {
                    return Err(non_finite(k % cols.max(1)));
                }
                let r = at * cols..(at + 1) * cols;
                (&scale[r.clone()], zero_point.map(|z| &z[r]))
            }
        };
        if codes.is_empty() {
            return Ok(());
        }
        kernels::quantize_with(tier, format, bits, w, cols, s, z, codes)
    }

    /// Group `gi` of up to [`GROUP`] rows of the `[outer, len]` view (blocks along its rows).
    #[allow(clippy::too_many_arguments)]
    fn group(
        &self,
        w: WeightData<'_>,
        len: usize,
        outer: usize,
        gi: usize,
        codes: &mut [u8],
        scale: &mut [f32],
        zp: &mut [f32],
    ) -> Result<()> {
        let Ctx { block, nb, step, .. } = *self;
        let r0 = gi * GROUP;
        let g = GROUP.min(outer - r0);
        let rows_f32 = w.to_f32(r0 * len..(r0 + g) * len);
        // [g, len] -> [len, g]
        let mut t = vec![0.0f32; g * len];
        for (r, row) in rows_f32.chunks_exact(len).enumerate() {
            for (i, &x) in row.iter().enumerate() {
                t[i * g + r] = x;
            }
        }
        let mut block_codes = vec![0u8; if codes.is_empty() { 0 } else { block * g }];
        let mut s = vec![0.0f32; g];
        let mut z = vec![0.0f32; g];
        for b in 0..nb {
            let rows = block.min(len - b * block);
            let slab = &t[b * block * g..(b * block + rows) * g];
            let given;
            let step = match step {
                Step::Given { scale, zero_point } => {
                    // Gather this block's scales of the group's rows into a contiguous row.
                    let pick = |v: &[f32]| (0..g).map(|r| v[(r0 + r) * nb + b]).collect::<Vec<f32>>();
                    given = (pick(scale), zero_point.map(pick));
                    Step::Given { scale: &given.0, zero_point: given.1.as_deref() }
                }
                other => other,
            };
            let ctx = Ctx { step, nb: 1, ..*self };
            let bc = &mut block_codes[..if codes.is_empty() { 0 } else { rows * g }];
            ctx.slab(slab, rows, b, r0, 0, &mut s, &mut z, bc)?;
            if !matches!(step, Step::Given { .. }) {
                for (r, (&sr, &zr)) in s.iter().zip(&z).enumerate() {
                    scale[r * nb + b] = sr;
                    if !zp.is_empty() {
                        zp[r * nb + b] = zr;
                    }
                }
            }
            for (i, row) in bc.chunks_exact(g).enumerate() {
                for (r, &c) in row.iter().enumerate() {
                    codes[r * len + b * block + i] = c;
                }
            }
        }
        Ok(())
    }
}
