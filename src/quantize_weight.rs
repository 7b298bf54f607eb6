//! A whole 2-D weight through the kernels: the fast equivalent of ModelOpt's
//! `find_scales` + `rtn` + 4-bit packing.
//!
//! Axis 0 (`[K, N]`, blocks of B rows along K) runs block by block, in parallel (rayon): each
//! block's rows are widened to f32 if needed, reduced to per-column statistics, turned into scales
//! (and zero points), quantized and packed straight into the block's part of the output (a block is
//! `B * N` codes, an even count since B is even, so blocks never share a byte). For 4-bit codes and
//! an even N the weight is read from memory once, in its own format (column stripes of 256 KiB
//! that stay in L2; f16/bf16 widened in registers, no f32 copy), by the fused pass of each stripe:
//! block absmax -> scale -> round-ties-even -> nibble pairs written into the packed weight, with no
//! code buffer (`BlockJob::run_fused`); while a stripe is quantized the next one is prefetched into
//! L2, so reading memory overlaps the division instead of following it. Axis 1 (blocks along the
//! contiguous axis: Gather tables, `transB=1` Gemm weights) transposes into an f32 scratch, runs
//! the same kernels, and transposes the codes back before packing.

use crate::kernels;
use crate::simd::Element;
use crate::{Bits, Error, FloatFormat, Result, Tier};
use rayon::prelude::*;
use std::borrow::Cow;

/// Block size along the quantized axis.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BlockSize {
    /// Blocks of this many elements (even, >= 2).
    Blocked(usize),
    /// One block spanning the whole axis (ModelOpt's `block_size = -1`).
    PerChannel,
}

impl BlockSize {
    /// From ModelOpt's integer convention (-1 = per channel).
    pub fn from_i64(b: i64) -> Result<BlockSize> {
        match b {
            -1 => Ok(BlockSize::PerChannel),
            b if b >= 2 && b % 2 == 0 => Ok(BlockSize::Blocked(b as usize)),
            b => Err(Error::BadBlockSize { block_size: b }),
        }
    }

    /// The block length for an axis of `len` elements.
    pub fn resolve(self, len: usize) -> usize {
        match self {
            BlockSize::Blocked(b) => b,
            BlockSize::PerChannel => len.max(1),
        }
    }
}

/// How to quantize.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct QuantParams {
    /// Block size along `axis`.
    pub block_size: BlockSize,
    /// 0: blocks along the rows (MatMul `[K, N]`); 1: along the columns.
    pub axis: usize,
    /// UINT4 with a zero point per block instead of symmetric INT4.
    pub zero_point: bool,
    /// Clip ratio applied to the block range (1.0 for RTN; AWQ-clip searches it).
    pub alpha: f64,
    /// Code width (4 bits unless a layer is kept at INT8).
    pub bits: Bits,
}

impl QuantParams {
    /// Symmetric INT4 along axis 0, alpha 1: ModelOpt's RTN.
    pub fn rtn(block_size: BlockSize) -> QuantParams {
        QuantParams { block_size, axis: 0, zero_point: false, alpha: 1.0, bits: Bits::Four }
    }
}

/// The elements of a weight, in its own format, row-major.
#[derive(Clone, Copy, Debug)]
pub enum WeightData<'a> {
    /// f32 values.
    F32(&'a [f32]),
    /// f16 values.
    F16(&'a [half::f16]),
    /// bf16 values.
    BF16(&'a [half::bf16]),
}

impl WeightData<'_> {
    /// The element format.
    pub fn format(&self) -> FloatFormat {
        match self {
            WeightData::F32(_) => FloatFormat::F32,
            WeightData::F16(_) => FloatFormat::F16,
            WeightData::BF16(_) => FloatFormat::BF16,
        }
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        match self {
            WeightData::F32(v) => v.len(),
            WeightData::F16(v) => v.len(),
            WeightData::BF16(v) => v.len(),
        }
    }

    /// Whether there are no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Copies elements `start..start + out.len()` into `out` as f32 (exact; f16 and bf16 widened
    /// in registers on `tier`).
    pub fn copy_f32(&self, tier: Tier, start: usize, out: &mut [f32]) -> Result<()> {
        let range = start..start + out.len();
        match self {
            WeightData::F32(v) => out.copy_from_slice(&v[range]),
            WeightData::F16(v) => kernels::widen_f16_with(tier, &v[range], out)?,
            WeightData::BF16(v) => kernels::widen_bf16(&v[range], out)?,
        }
        Ok(())
    }

    /// Elements `range` as f32 (borrowed for f32 data; the conversion is exact).
    pub fn to_f32(&self, range: std::ops::Range<usize>) -> Cow<'_, [f32]> {
        use half::slice::HalfFloatSliceExt;
        match self {
            WeightData::F32(v) => Cow::Borrowed(&v[range]),
            WeightData::F16(v) => {
                let src = &v[range];
                let mut out = vec![0.0f32; src.len()];
                src.convert_to_f32_slice(&mut out);
                Cow::Owned(out)
            }
            WeightData::BF16(v) => {
                let src = &v[range];
                let mut out = vec![0.0f32; src.len()];
                src.convert_to_f32_slice(&mut out);
                Cow::Owned(out)
            }
        }
    }
}

/// A quantized weight, ready to be written as ONNX tensors.
#[derive(Clone, Debug, PartialEq)]
pub struct QuantizedWeight {
    /// The codes in the weight's own row-major order: 4-bit codes packed two per byte
    /// (`ceil(R*C/2)` bytes), 8-bit codes one per byte.
    pub packed: Vec<u8>,
    /// Scales, exactly representable in the weight format, row-major in `scale_shape`.
    pub scale: Vec<f32>,
    /// `[ceil(K/B), N]` for axis 0, `[R, ceil(C/B)]` for axis 1.
    pub scale_shape: [usize; 2],
    /// Zero points (0..=15, or 0..=255 for 8 bits), one per scale, unpacked.
    pub zero_point: Option<Vec<u8>>,
    /// The block length used (K, or C, for per-channel).
    pub block: usize,
}

impl QuantizedWeight {
    /// The same quantization of the transposed weight: `self` quantizes `W: [k, n]` along axis 0
    /// (scales `[nb, n]`); the result quantizes `W^T: [n, k]` along axis 1 (scales `[n, nb]`),
    /// as a `transB=1` Gemm weight or a Gather table stores it. For methods that work on the
    /// `[K, N]` view only (GPTQ, the scale search on a transposed view).
    ///
    /// # Errors
    /// [`Error::LengthMismatch`] if the codes or scales do not match `[k, n]`.
    pub fn to_axis1(&self, bits: Bits, [k, n]: [usize; 2]) -> Result<QuantizedWeight> {
        let nb = k.div_ceil(self.block.max(1));
        kernels::check_len("scales", nb * n, self.scale.len())?;
        kernels::check_len("codes", bits.bytes_for(k * n), self.packed.len())?;
        let codes = match bits {
            Bits::Four => kernels::unpack_nibbles(&self.packed, k * n, false)?.into_iter().map(|v| v as u8).collect(),
            Bits::Eight => self.packed.clone(),
        };
        let t = transpose(&codes, k, n);
        let packed = match bits {
            Bits::Four => crate::reference::pack(&t),
            Bits::Eight => t,
        };
        Ok(QuantizedWeight {
            packed,
            scale: transpose(&self.scale, nb, n),
            scale_shape: [n, nb],
            zero_point: self.zero_point.as_ref().map(|z| transpose(z, nb, n)),
            block: self.block,
        })
    }
}

impl QuantizedWeight {
    /// The dequantized values `dq = (q - zp) * s` (symmetric: `q * s`, `q` signed), rounded to
    /// `format`, of a weight quantized along axis 0 (`self` from a `[k, n]` view: scales
    /// `[ceil(k / block), n]`), row-major `[k, n]`: the weight the quantized model computes with.
    ///
    /// # Errors
    /// [`Error::LengthMismatch`] if the codes, scales or zero points do not match `[k, n]`.
    pub fn dequantize_axis0(&self, format: FloatFormat, bits: Bits, [k, n]: [usize; 2]) -> Result<Vec<f32>> {
        let block = self.block.max(1);
        let nb = k.div_ceil(block);
        kernels::check_len("scales", nb * n, self.scale.len())?;
        kernels::check_len("codes", bits.bytes_for(k * n), self.packed.len())?;
        if let Some(z) = &self.zero_point {
            kernels::check_len("zero points", nb * n, z.len())?;
        }
        let codes: Vec<u8> = match bits {
            Bits::Four => kernels::unpack_nibbles(&self.packed, k * n, self.zero_point.is_none())?
                .into_iter()
                .map(|v| v as u8)
                .collect(),
            Bits::Eight => self.packed.clone(),
        };
        let zp: Option<Vec<f32>> = self.zero_point.as_ref().map(|z| z.iter().map(|&v| v as f32).collect());
        let mut out = vec![0.0f32; k * n];
        for b in 0..nb {
            let rows = b * block..((b + 1) * block).min(k);
            let cols = b * n..(b + 1) * n;
            kernels::dequantize::dequantize(
                format,
                &codes[rows.start * n..rows.end * n],
                n,
                &self.scale[cols.clone()],
                zp.as_ref().map(|z| &z[cols]),
                &mut out[rows.start * n..rows.end * n],
            )?;
        }
        Ok(out)
    }
}

/// Quantizes a row-major weight of `shape` on the best tier.
pub fn quantize_weight(data: WeightData<'_>, shape: [usize; 2], params: &QuantParams) -> Result<QuantizedWeight> {
    quantize_weight_with(Tier::best(), data, shape, params)
}

/// [`quantize_weight`] on a chosen tier.
pub fn quantize_weight_with(
    tier: Tier,
    data: WeightData<'_>,
    shape: [usize; 2],
    params: &QuantParams,
) -> Result<QuantizedWeight> {
    quantize_weight_alphas_with(tier, data, shape, params, None)
}

/// [`quantize_weight`] with one clip ratio per block (AWQ-clip's choice), laid out like the scales
/// of the axis-0 view: `alphas[b * n + j]` for block `b` of column `j` (for axis 1, `j` runs over
/// the rows of the stored weight). Values must be values of the weight format.
pub fn quantize_weight_alphas_with(
    tier: Tier,
    data: WeightData<'_>,
    shape: [usize; 2],
    params: &QuantParams,
    alphas: Option<&[f32]>,
) -> Result<QuantizedWeight> {
    kernels::check_tier(tier)?;
    let [r, c] = shape;
    kernels::check_len("weight", r * c, data.len())?;
    let format = data.format();
    match params.axis {
        0 => {
            let block = params.block_size.resolve(r);
            let out = axis0(tier, format, data, [r, c], block, params, alphas, Output::Packed, Vec::new())?;
            Ok(out.into_quantized(block))
        }
        1 => {
            let block = params.block_size.resolve(c);
            // Transpose to [C, R] in f32, quantize along its rows, transpose codes and scales back.
            let w = data.to_f32(0..r * c);
            let t = transpose(&w, r, c);
            let q = axis0(tier, format, WeightData::F32(&t), [c, r], block, params, alphas, Output::Codes, Vec::new())?;
            let codes = transpose(&q.data, c, r);
            let packed = match params.bits {
                Bits::Four => {
                    let mut packed = vec![0u8; (r * c).div_ceil(2)];
                    kernels::pack_nibbles_with(tier, &codes, &mut packed)?;
                    packed
                }
                Bits::Eight => codes,
            };
            let nb = q.nb;
            Ok(QuantizedWeight {
                packed,
                scale: transpose(&q.scale, nb, r),
                scale_shape: [r, nb],
                zero_point: q.zero_point.map(|z| transpose(&z, nb, r)),
                block,
            })
        }
        axis => Err(Error::BadAxis { axis }),
    }
}

/// The dequantized weight (`dq(q(w))`, values of the weight format) of an f32 `[k, n]` matrix
/// holding values of `format`, blocks along axis 0: what ModelOpt's
/// `dq_tensor(*quant_tensor(w, ...))` computes, for the AWQ searches.
pub fn fake_quantize_with(
    tier: Tier,
    format: FloatFormat,
    w: &[f32],
    [k, n]: [usize; 2],
    params: &QuantParams,
    alphas: Option<&[f32]>,
) -> Result<Vec<f32>> {
    let mut out = Vec::new();
    fake_quantize_into(tier, format, w, [k, n], params, alphas, &mut out)?;
    Ok(out)
}

/// [`fake_quantize_with`] into `out` (resized to `k * n`; its allocation is reused, so a search
/// that fake-quantizes many candidates does not take fresh pages from the system for each).
#[allow(clippy::too_many_arguments)]
pub fn fake_quantize_into(
    tier: Tier,
    format: FloatFormat,
    w: &[f32],
    [k, n]: [usize; 2],
    params: &QuantParams,
    alphas: Option<&[f32]>,
    out: &mut Vec<f32>,
) -> Result<()> {
    kernels::check_tier(tier)?;
    kernels::check_len("weight", k * n, w.len())?;
    let block = params.block_size.resolve(k);
    let storage = std::mem::take(out);
    let q = axis0(tier, format, WeightData::F32(w), [k, n], block, params, alphas, Output::Dequantized, storage)?;
    *out = q.dequantized;
    Ok(())
}

/// One block of [`fake_quantize_into`] alone, on the calling thread (no rayon work): `w` holds the
/// rows of block `b` (`w.len() / n` of them, rows `b * block ..` of a `[k, n]` weight whose blocks
/// are `block = params.block_size.resolve(k)` rows), dequantized into `out` (as long as `w`). The
/// values, and the error of a non-finite value, are those the whole-weight call gives for these
/// rows: a search can quantize a weight band by band while each band is in cache.
pub fn fake_quantize_block_into(
    tier: Tier,
    format: FloatFormat,
    w: &[f32],
    n: usize,
    [b, block]: [usize; 2],
    params: &QuantParams,
    out: &mut [f32],
) -> Result<()> {
    kernels::check_tier(tier)?;
    kernels::check_len("block output", w.len(), out.len())?;
    let rows = w.len().checked_div(n).unwrap_or(0);
    kernels::check_len("block", rows * n, w.len())?;
    if rows == 0 {
        return Ok(());
    }
    let alphas = vec![format.constant(params.alpha); n];
    let job = BlockJob::new(tier, format, params, n, [b, block, rows], &alphas);
    job.stripe(w, 0, &mut vec![0.0; n], None, &mut [], out, Output::Dequantized)
}

fn transpose<T: Copy + Default>(v: &[T], rows: usize, cols: usize) -> Vec<T> {
    let mut t = vec![T::default(); v.len()];
    for i in 0..rows {
        for j in 0..cols {
            t[j * rows + i] = v[i * cols + j];
        }
    }
    t
}

/// Bytes per column stripe (of f32 scratch, or of the weight read in place): a block's rows x the
/// stripe's columns stay in L2 while they are reduced, quantized and packed (two passes over the
/// stripe, one read of the weight), beside the next stripe being prefetched. Measured on the fused
/// path with prefetching (4096 x 4096, one core, interleaved): 256 KiB beat 128 KiB, 512 KiB and,
/// for f32, whole 2 MiB blocks (BENCHMARKS.md).
const STRIPE_BYTES: usize = 256 << 10;

/// Columns per stripe for blocks of `rows` rows and `n` columns of `elem_bytes`-byte elements: a
/// multiple of 16 (whole vectors, and even, so each row's codes of a stripe start on a byte), or all
/// of them when `n` is odd.
pub(crate) fn stripe_width(rows: usize, n: usize, elem_bytes: usize) -> usize {
    if n % 2 == 1 {
        return n.max(1);
    }
    let w = (STRIPE_BYTES / elem_bytes / rows.max(1)) / 16 * 16;
    w.max(16).min(n).max(1)
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Output {
    /// Packed codes.
    Packed,
    /// One code per byte.
    Codes,
    /// The dequantized values.
    Dequantized,
}

struct Axis0 {
    data: Vec<u8>,
    dequantized: Vec<f32>,
    scale: Vec<f32>,
    zero_point: Option<Vec<u8>>,
    nb: usize,
    n: usize,
}

impl Axis0 {
    fn into_quantized(self, block: usize) -> QuantizedWeight {
        QuantizedWeight {
            packed: self.data,
            scale: self.scale,
            scale_shape: [self.nb, self.n],
            zero_point: self.zero_point,
            block,
        }
    }
}

/// Blocks along the rows of a `[k, n]` matrix, in parallel.
#[allow(clippy::too_many_arguments)]
fn axis0(
    tier: Tier,
    format: FloatFormat,
    source: WeightData<'_>,
    [k, n]: [usize; 2],
    block: usize,
    params: &QuantParams,
    alphas: Option<&[f32]>,
    output: Output,
    mut dequantized: Vec<f32>,
) -> Result<Axis0> {
    let nb = k.div_ceil(block);
    if let Some(a) = alphas {
        kernels::check_len("alphas", nb * n, a.len())?;
    }
    let mut scale = vec![0.0f32; nb * n];
    let mut zero_point = params.zero_point.then(|| vec![0u8; nb * n]);
    let (code_bytes, per_block) = match output {
        Output::Packed => (params.bits.bytes_for(k * n), params.bits.bytes_for(block * n)),
        Output::Codes => (k * n, block * n),
        Output::Dequantized => (0, 0),
    };
    // A single block (per channel) takes all bytes, even when K * N is odd.
    let per_block = if nb == 1 { code_bytes } else { per_block };
    let mut data = vec![0u8; code_bytes];
    // `dequantized` is storage to reuse: every value is overwritten below, so it is not cleared
    // (a memset of the whole buffer per AWQ-lite alpha otherwise).
    dequantized.resize(if output == Output::Dequantized { k * n } else { 0 }, 0.0);
    if k == 0 || n == 0 {
        return Ok(Axis0 { data, dequantized, scale, zero_point, nb, n });
    }
    let default_alphas = vec![format.constant(params.alpha); n];
    let mut zp_chunks: Vec<Option<&mut [u8]>> = match zero_point.as_mut() {
        Some(z) => z.chunks_mut(n).map(Some).collect(),
        None => (0..nb).map(|_| None).collect(),
    };
    let mut code_chunks: Vec<&mut [u8]> = if code_bytes > 0 {
        data.chunks_mut(per_block.max(1)).collect()
    } else {
        (0..nb).map(|_| Default::default()).collect()
    };
    let mut dq_chunks: Vec<&mut [f32]> = if output == Output::Dequantized {
        dequantized.chunks_mut(block * n).collect()
    } else {
        (0..nb).map(|_| Default::default()).collect()
    };
    let results: Vec<Result<()>> = code_chunks
        .par_iter_mut()
        .zip(dq_chunks.par_iter_mut())
        .zip(scale.par_chunks_mut(n))
        .zip(zp_chunks.par_iter_mut())
        .enumerate()
        .map(|(b, (((codes, dq), scale), zp))| {
            let rows = block.min(k - b * block);
            let alphas = alphas.map_or(&default_alphas[..], |a| &a[b * n..(b + 1) * n]);
            let job = BlockJob::new(tier, format, params, n, [b, block, rows], alphas);
            job.run(source, rows, scale, zp.as_deref_mut(), codes, dq, output)
        })
        .collect();
    results.into_iter().collect::<Result<()>>()?;
    Ok(Axis0 { data, dequantized, scale, zero_point, nb, n })
}

/// One block of rows.
struct BlockJob<'a> {
    tier: Tier,
    format: FloatFormat,
    bits: Bits,
    n: usize,
    padded: bool,
    zero_point: bool,
    b: usize,
    block: usize,
    alphas: &'a [f32],
}

impl<'a> BlockJob<'a> {
    /// Block `b` (`rows` of them, fewer than `block` for a short last block) of an `n`-column weight.
    fn new(
        tier: Tier,
        format: FloatFormat,
        params: &QuantParams,
        n: usize,
        [b, block, rows]: [usize; 3],
        alphas: &'a [f32],
    ) -> BlockJob<'a> {
        let (bits, zero_point, padded) = (params.bits, params.zero_point, rows < block);
        BlockJob { tier, format, bits, n, padded, zero_point, b, block, alphas }
    }

    /// Quantizes rows `b * block ..` (`rows` of them) of `source`, stripe by stripe.
    #[allow(clippy::too_many_arguments)]
    fn run(
        &self,
        source: WeightData<'_>,
        rows: usize,
        scale: &mut [f32],
        mut zp_out: Option<&mut [u8]>,
        codes_out: &mut [u8],
        dq_out: &mut [f32],
        output: Output,
    ) -> Result<()> {
        let n = self.n;
        let row0 = self.b * self.block;
        // Packed 4-bit codes with an even column count take the fused path, which reads every format
        // in place. Otherwise f32 rows are used in place, whole (a copy costs more than it saves),
        // and f16/bf16 rows are widened stripe by stripe into a scratch that stays in L2.
        let in_place = match source {
            WeightData::F32(v) => Some(&v[row0 * n..(row0 + rows) * n]),
            _ => None,
        };
        let dequantized = output == Output::Dequantized;
        let packing = output == Output::Packed && self.bits == Bits::Four;
        if packing && n.is_multiple_of(2) {
            // From the block's first row to the end of the weight: the fused pass prefetches the
            // next block's first stripe while it quantizes the block's last one.
            let from_block = row0 * n..;
            return match source {
                WeightData::F32(v) => {
                    self.run_fused(&v[from_block], rows, scale, zp_out, codes_out, stripe_width(rows, n, 4))
                }
                WeightData::F16(v) => {
                    self.run_fused(&v[from_block], rows, scale, zp_out, codes_out, stripe_width(rows, n, 2))
                }
                WeightData::BF16(v) => {
                    self.run_fused(&v[from_block], rows, scale, zp_out, codes_out, stripe_width(rows, n, 2))
                }
            };
        }
        let width = if in_place.is_some() { n.max(1) } else { stripe_width(rows, n, 4) };
        if let (Some(w), false) = (in_place, packing) {
            // One stripe, written straight into the output.
            let zp = zp_out.as_deref_mut();
            return match dequantized {
                true => self.stripe(w, 0, scale, zp, &mut [], dq_out, output),
                false => self.stripe(w, 0, scale, zp, codes_out, &mut [], output),
            };
        }
        let mut scratch = vec![0.0f32; if in_place.is_some() { 0 } else { rows * width }];
        let mut codes = vec![0u8; if dequantized { 0 } else { rows * width }];
        let mut dq = vec![0.0f32; if dequantized { rows * width } else { 0 }];
        let mut c0 = 0;
        while c0 < n {
            let s = width.min(n - c0);
            let codes = &mut codes[..if dequantized { 0 } else { rows * s }];
            let dq = &mut dq[..if dequantized { rows * s } else { 0 }];
            let w: &[f32] = match in_place {
                Some(v) => v,
                None => {
                    let w = &mut scratch[..rows * s];
                    for (r, row) in w.chunks_exact_mut(s).enumerate() {
                        source.copy_f32(self.tier, (row0 + r) * n + c0, row)?;
                    }
                    w
                }
            };
            let zp = zp_out.as_deref_mut().map(|z| &mut z[c0..c0 + s]);
            self.stripe(w, c0, &mut scale[c0..c0 + s], zp, codes, dq, output)?;
            // Scatter the stripe's rows into the block's output.
            match output {
                // Packed 4-bit codes reach here only for an odd column count (else `run_fused`),
                // which is one whole-width stripe.
                Output::Packed if self.bits == Bits::Four => {
                    kernels::pack_nibbles_with(self.tier, codes, codes_out)?;
                }
                Output::Packed | Output::Codes => {
                    for (r, row) in codes.chunks_exact(s).enumerate() {
                        codes_out[r * n + c0..r * n + c0 + s].copy_from_slice(row);
                    }
                }
                Output::Dequantized => {
                    for (r, row) in dq.chunks_exact(s).enumerate() {
                        dq_out[r * n + c0..r * n + c0 + s].copy_from_slice(row);
                    }
                }
            }
            c0 += s;
        }
        Ok(())
    }

    /// The fused path for 4-bit packed output with an even column count, reading the block's rows
    /// (the first `rows x n` elements of `w`, row stride `n`; `w` goes on to the end of the weight)
    /// in the weight's own element type: stripe by stripe of `width` columns (about `STRIPE_BYTES`,
    /// which stay in L2 between the two passes), block absmax (or min/max) -> scales ->
    /// round-ties-even codes -> nibble pairs written straight into the block's packed rows
    /// ([`kernels::quantize_packed::quantize_packed_rows`]), f16/bf16 widened in registers on AVX2
    /// and AVX-512 (into an f32 scratch per stripe elsewhere): the weight is read from memory once.
    /// While a stripe is quantized (bound by the division, from L2) the next one (the next block's
    /// first stripe after the last) is prefetched, so its first pass does not wait for memory.
    fn run_fused<E: Element>(
        &self,
        w: &[E],
        rows: usize,
        scale: &mut [f32],
        mut zp_out: Option<&mut [u8]>,
        codes_out: &mut [u8],
        width: usize,
    ) -> Result<()> {
        let n = self.n;
        // Tiers without hardware f16 conversions (scalar, NEON) widen one element at a time in
        // registers, 2.5x slower than `half`'s slice conversion into an f32 scratch (BENCHMARKS.md).
        let scratch_needed = std::mem::size_of::<E>() == 2 && !matches!(self.tier, Tier::Avx2 | Tier::Avx512);
        let mut scratch = vec![0.0f32; if scratch_needed { rows * width.min(n) } else { 0 }];
        let mut c0 = 0;
        while c0 < n {
            let s = width.min(n - c0);
            let next = match c0 + s < n {
                true => &w[c0 + s..rows * n],
                false => &w[(rows * n).min(w.len())..(2 * rows * n).min(w.len())],
            };
            let w = &w[c0..];
            let zp_out = zp_out.as_deref_mut().map(|z| &mut z[c0..c0 + s]);
            let scale = &mut scale[c0..c0 + s];
            let codes_out = &mut codes_out[c0 / 2..];
            if scratch_needed {
                let buf = &mut scratch[..rows * s];
                for (r, row) in buf.chunks_exact_mut(s).enumerate() {
                    E::widen_slice(&w[r * n..r * n + s], row);
                }
                self.fused_stripe(buf, rows, s, c0, scale, zp_out, codes_out, &[])?;
            } else {
                self.fused_stripe(w, rows, n, c0, scale, zp_out, codes_out, next)?;
            }
            c0 += s;
        }
        Ok(())
    }

    /// One stripe of the fused path: `rows x scale.len()` elements, row `r` at `w[r * stride..]`
    /// (columns `c0..` of the block), packed into `codes_out` (the block's packed rows from column
    /// `c0`, row stride `n / 2` bytes), prefetching `next` (the next stripe, same layout; may be empty).
    #[allow(clippy::too_many_arguments)]
    fn fused_stripe<E: Element>(
        &self,
        w: &[E],
        rows: usize,
        stride: usize,
        c0: usize,
        scale: &mut [f32],
        zp_out: Option<&mut [u8]>,
        codes_out: &mut [u8],
        next: &[E],
    ) -> Result<()> {
        let s = scale.len();
        let zp = self.stripe_scales(w, rows, stride, c0, scale, zp_out)?;
        let zp = self.zero_point.then_some(&zp[..]);
        kernels::quantize_packed::quantize_packed_rows(
            self.tier,
            self.format,
            w,
            rows,
            s,
            stride,
            scale,
            zp,
            codes_out,
            self.n / 2,
            next,
            kernels::native_f16(),
        );
        // The overflow check reads codes; only a column whose widest code could overflow needs
        // them (rare: huge scales in f16), so they are computed again just then.
        if overflow_possible(self.format, self.bits, scale, zp) {
            let wf: Vec<f32> =
                (0..rows).flat_map(|r| w[r * stride..r * stride + s].iter().map(|x| x.to_f32())).collect();
            let mut codes = vec![0u8; wf.len()];
            kernels::quantize_with(self.tier, self.format, self.bits, &wf, s, scale, zp, &mut codes)?;
            self.check_overflow(&codes, c0, rows, scale, zp)?;
        }
        Ok(())
    }

    /// Statistics and scales (and zero points, into `zp_out` and returned as floats; empty without
    /// zero points) of one stripe of `rows x scale.len()` elements, row `r` at `w[r * stride..]`
    /// (columns `c0..c0 + scale.len()` of the block).
    fn stripe_scales<E: Element>(
        &self,
        w: &[E],
        rows: usize,
        stride: usize,
        c0: usize,
        scale: &mut [f32],
        zp_out: Option<&mut [u8]>,
    ) -> Result<Vec<f32>> {
        let BlockJob { tier, format, bits, n: _, padded, zero_point, b, block, alphas } = *self;
        let s = scale.len();
        let alphas = &alphas[c0..c0 + s];
        let non_finite =
            |column: usize| Error::NonFinite { block: b, column: c0 + column, start: b * block, end: b * block + rows };
        let mut zp = vec![0.0f32; if zero_point { s } else { 0 }];
        if zero_point {
            let mut lo = vec![0.0f32; s];
            let mut hi = vec![0.0f32; s];
            kernels::block_minmax::block_minmax_rows(tier, w, rows, s, stride, padded, &mut lo, &mut hi);
            if let Some(c) = (0..s).find(|&c| !lo[c].is_finite() || !hi[c].is_finite()) {
                return Err(non_finite(c));
            }
            kernels::scales_zero_point_alphas_with(tier, format, bits, &lo, &hi, alphas, scale, &mut zp)?;
            if let Some(zp_out) = zp_out {
                for (o, &z) in zp_out.iter_mut().zip(&zp) {
                    *o = z as u8;
                }
            }
        } else {
            let mut amax = vec![0.0f32; s];
            kernels::block_absmax::block_absmax_rows(tier, w, rows, s, stride, &mut amax);
            if let Some(c) = amax.iter().position(|a| !a.is_finite()) {
                return Err(non_finite(c));
            }
            kernels::scales_symmetric_alphas_with(tier, format, bits, &amax, alphas, scale)?;
        }
        Ok(zp)
    }

    /// [`Error::DequantizedOverflow`] for the first column of the stripe's `codes` (`rows x
    /// scale.len()`, columns `c0..` of the block) whose dequantized value overflows the format.
    fn check_overflow(&self, codes: &[u8], c0: usize, rows: usize, scale: &[f32], zp: Option<&[f32]>) -> Result<()> {
        let BlockJob { format, bits, b, block, .. } = *self;
        match dequantized_overflow(format, bits, codes, scale, zp) {
            Some(c) => Err(Error::DequantizedOverflow {
                block: b,
                column: c0 + c,
                start: b * block,
                end: b * block + rows,
                format,
            }),
            None => Ok(()),
        }
    }

    /// Statistics, scales, and codes (or dequantized values) of one stripe `w` (`rows x s`, columns
    /// `c0..c0 + s` of the block).
    #[allow(clippy::too_many_arguments)]
    fn stripe(
        &self,
        w: &[f32],
        c0: usize,
        scale: &mut [f32],
        zp_out: Option<&mut [u8]>,
        codes: &mut [u8],
        dq_out: &mut [f32],
        output: Output,
    ) -> Result<()> {
        let BlockJob { tier, format, bits, zero_point, .. } = *self;
        let s = scale.len();
        let rows = w.len() / s.max(1);
        let zp = self.stripe_scales(w, rows, s, c0, scale, zp_out)?;
        let zp = zero_point.then_some(&zp[..]);
        match output {
            Output::Packed | Output::Codes => {
                kernels::quantize_with(tier, format, bits, w, s, scale, zp, codes)?;
                self.check_overflow(codes, c0, rows, scale, zp)
            }
            Output::Dequantized => {
                kernels::qdq_error_with(tier, format, bits, w, s, scale, zp, kernels::QdqOutput::Dequantized, dq_out)
            }
        }
    }
}

/// The first column of a slab of `codes` (`rows x scale.len()`) whose dequantized value
/// `rnd((q - zp) * s)` (or `rnd(q * s)`) overflows `format`. Only columns whose widest possible
/// code, `levels` (or `-qmin`) steps, could overflow are scanned, so the usual case costs one
/// comparison per column.
fn dequantized_overflow(
    format: FloatFormat,
    bits: Bits,
    codes: &[u8],
    scale: &[f32],
    zp: Option<&[f32]>,
) -> Option<usize> {
    let cols = scale.len();
    (0..cols).filter(|&c| column_may_overflow(format, bits, scale[c], zp.is_some())).find(|&c| {
        codes.iter().skip(c).step_by(cols.max(1)).any(|&q| {
            let steps = match zp {
                Some(z) => q as f32 - z[c],
                None => q as i8 as f32,
            };
            !format.round(steps * scale[c]).is_finite()
        })
    })
}

/// Whether a column of scale `scale` could dequantize to a value beyond `format`'s range: its widest
/// code, `levels` (with a zero point) or `-qmin` steps, times the scale.
fn column_may_overflow(format: FloatFormat, bits: Bits, scale: f32, zero_point: bool) -> bool {
    let widest = if zero_point { bits.levels() } else { -bits.qmin() } as f64;
    scale as f64 * widest > format.max_finite() as f64
}

/// Whether any column of a stripe could overflow ([`column_may_overflow`]).
fn overflow_possible(format: FloatFormat, bits: Bits, scale: &[f32], zp: Option<&[f32]>) -> bool {
    scale.iter().any(|&s| column_may_overflow(format, bits, s, zp.is_some()))
}
