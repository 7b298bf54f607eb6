//! Quantize and pack in one pass: the codes of [`quantize`](super::quantize) written straight as
//! ONNX nibbles (column `2i` in the low nibble of byte `i` of the row, `2i + 1` in the high one),
//! for slabs with an even column count (so rows never share a byte).
//!
//! Each step quantizes one vector of consecutive columns (exactly `quantize`'s arithmetic) and
//! pairs neighbouring lanes into bytes, `byte = (q[2i] & 0xf) | (q[2i + 1] & 0xf) << 4`, in
//! registers (`simd::store_nibble_pairs`), written straight into the packed row: no code buffer and
//! no second pass. The pipeline (`quantize_weight`) runs it on each stripe of a block, reading the
//! weight in its own format (f16/bf16 widened in registers) and writing into the packed weight
//! through [`quantize_packed_rows`].

use super::quantize_packed_f16::{self as f16, f16_operands, native_f16_available};
use super::{check_slab, check_tier};
use crate::float::{Precision, BF16, F16, F32};
use crate::kernels::code::{quantize_lanes, reciprocals, CodeBounds};
use crate::simd::{for_each_chunk, load_f32, prefetch, store_nibble_pairs, to_int, Element};
use crate::{Error, FloatFormat, Result, Tier};
use pulp::{Simd, WithSimd};
use std::any::TypeId;

/// Quantizes the slab `w` (`rows * cols`, `cols` even) into `packed[rows * cols / 2]`.
pub fn quantize_packed(
    format: FloatFormat,
    w: &[f32],
    cols: usize,
    scale: &[f32],
    zero_point: Option<&[f32]>,
    packed: &mut [u8],
) -> Result<()> {
    quantize_packed_with(Tier::best(), format, w, cols, scale, zero_point, packed)
}

/// [`quantize_packed`] on a chosen tier.
pub fn quantize_packed_with(
    tier: Tier,
    format: FloatFormat,
    w: &[f32],
    cols: usize,
    scale: &[f32],
    zero_point: Option<&[f32]>,
    packed: &mut [u8],
) -> Result<()> {
    checked_slab(tier, format, w, cols, scale, zero_point, packed, false)
}

/// [`quantize_packed_with`] of f16 weights read as f16 (as the pipeline reads them), rounding in
/// f16: on the AVX-512 tier with `native` and a CPU with AVX512-FP16, the native f16 sub-path
/// ([`quantize_packed_f16`](super::quantize_packed_f16); when its scales and zero points allow),
/// else the tier's f32 lanes. For tests and benches that compare the two.
#[doc(hidden)]
pub fn quantize_packed_f16_with(
    tier: Tier,
    native: bool,
    w: &[half::f16],
    cols: usize,
    scale: &[f32],
    zero_point: Option<&[f32]>,
    packed: &mut [u8],
) -> Result<()> {
    checked_slab(tier, FloatFormat::F16, w, cols, scale, zero_point, packed, native)
}

/// Checks a whole slab (row stride `cols`) and quantizes it.
#[allow(clippy::too_many_arguments)]
fn checked_slab<E: Element>(
    tier: Tier,
    format: FloatFormat,
    w: &[E],
    cols: usize,
    scale: &[f32],
    zero_point: Option<&[f32]>,
    packed: &mut [u8],
    native: bool,
) -> Result<()> {
    check(tier, w, cols, scale, zero_point, packed)?;
    let rows = w.len() / cols.max(1);
    quantize_packed_rows(tier, format, w, rows, cols, cols, scale, zero_point, packed, cols / 2, &[], native);
    Ok(())
}

/// The checks of [`quantize_packed_with`].
fn check<E>(tier: Tier, w: &[E], cols: usize, scale: &[f32], zero_point: Option<&[f32]>, packed: &[u8]) -> Result<()> {
    check_tier(tier)?;
    if !cols.is_multiple_of(2) {
        return Err(Error::LengthMismatch {
            what: "quantize_packed columns (must be even)",
            expected: cols + 1,
            actual: cols,
        });
    }
    check_slab("quantize_packed", tier, w.len(), cols, scale, zero_point, w.len() / 2, packed.len())
}

/// [`quantize_packed`] of `rows` rows of `cols` elements of any [`Element`] type (f16/bf16 widened
/// in registers), row `r` read at `w[r * w_stride..]` and written at `packed[r * row_stride..]`
/// (`row_stride >= cols / 2` bytes), so a column stripe of a wider weight is read in its own
/// format and goes straight into its place in the packed matrix. The caller has checked the tier,
/// an even `cols`, the scales (`cols`), that `w` holds `(rows - 1) * w_stride + cols` elements or
/// more and `packed` `(rows - 1) * row_stride + cols / 2` bytes or more.
///
/// `next` (empty for none) is what the caller reads next, laid out like `w`: after each row `r` the
/// lines of `next[r * w_stride..][..cols]` (as far as `next` goes) are prefetched into L2, so the
/// next stripe's first pass, which reads memory, finds them there while this pass, bound by the
/// division, overlaps their loading.
///
/// With `native` (the pipeline passes [`native_f16`](super::native_f16)), f16 weights in f16 on the AVX-512 tier of a
/// CPU with AVX512-FP16 take the native f16 sub-path when the scales are f16 values and the zero
/// points integers in 0..=15 (always so in the pipeline; [`quantize_packed_f16`](super::quantize_packed_f16)).
#[allow(clippy::too_many_arguments)]
pub(crate) fn quantize_packed_rows<E: Element>(
    tier: Tier,
    format: FloatFormat,
    w: &[E],
    rows: usize,
    cols: usize,
    w_stride: usize,
    scale: &[f32],
    zero_point: Option<&[f32]>,
    packed: &mut [u8],
    row_stride: usize,
    next: &[E],
    native: bool,
) {
    if cols == 0 {
        return;
    }
    let f16_in_f16 = format == FloatFormat::F16 && TypeId::of::<E>() == TypeId::of::<half::f16>();
    if native && f16_in_f16 && tier == Tier::Avx512 && native_f16_available() {
        if let Some(operands) = f16_operands(scale, zero_point) {
            // E is half::f16 (equal TypeId): the casts keep every element as it is.
            let (w, next) = (bytemuck::cast_slice(w), bytemuck::cast_slice(next));
            f16::quantize_packed_rows(w, rows, cols, w_stride, &operands, packed, row_stride, next);
            return;
        }
    }
    // f32 on AVX2: the scalar body auto-vectorized with AVX2 beats the hand-written lanes (on
    // AVX-512 the hand-written lanes win; dispatch table in `kernels`).
    let job = Job { w, rows, cols, w_stride, scale, zero_point, packed, row_stride, next, _p: F32 };
    match (format, tier) {
        (FloatFormat::F32, Tier::Avx2) => tier.dispatch_autovec(job),
        _ => run(tier, format, job),
    }
}

/// [`quantize_packed_with`] on the tier's hand-written lanes for every format (f32 included), for
/// the benches that compare them with the auto-vectorized f32 body the dispatch uses.
#[doc(hidden)]
pub fn quantize_packed_handwritten_with(
    tier: Tier,
    format: FloatFormat,
    w: &[f32],
    cols: usize,
    scale: &[f32],
    zero_point: Option<&[f32]>,
    packed: &mut [u8],
) -> Result<()> {
    check(tier, w, cols, scale, zero_point, packed)?;
    if cols == 0 {
        return Ok(());
    }
    let rows = w.len() / cols;
    let job =
        Job { w, rows, cols, w_stride: cols, scale, zero_point, packed, row_stride: cols / 2, next: &[], _p: F32 };
    run(tier, format, job);
    Ok(())
}

/// Runs `job` (built for f32) on `tier`'s hand-written lanes in `format`'s precision.
fn run<E: Element>(tier: Tier, format: FloatFormat, job: Job<'_, E, F32>) {
    let Job { w, rows, cols, w_stride, scale, zero_point, packed, row_stride, next, _p: _ } = job;
    macro_rules! run {
        ($p:expr) => {
            tier.dispatch(Job { w, rows, cols, w_stride, scale, zero_point, packed, row_stride, next, _p: $p })
        };
    }
    match format {
        FloatFormat::F32 => run!(F32),
        FloatFormat::F16 => run!(F16),
        FloatFormat::BF16 => run!(BF16),
    }
}

struct Job<'a, E, P> {
    w: &'a [E],
    rows: usize,
    cols: usize,
    w_stride: usize,
    scale: &'a [f32],
    zero_point: Option<&'a [f32]>,
    packed: &'a mut [u8],
    row_stride: usize,
    next: &'a [E],
    _p: P,
}

impl<E: Element, P: Precision> WithSimd for Job<'_, E, P> {
    type Output = ();

    #[inline(always)]
    fn with_simd<S: Simd>(self, simd: S) {
        let Self { w, rows, cols, w_stride, scale, zero_point, packed, row_stride, next, _p: _ } = self;
        let bounds = CodeBounds::new(simd, crate::Bits::Four);
        let recip = reciprocals::<S, P>(scale);
        let nib = simd.splat_u32s(0xf);
        // One-lane tiers pair columns through a row of codes (kept in L1).
        let odd_lanes = S::F32_LANES % 2 == 1;
        let mut codes = if odd_lanes { vec![0u8; cols] } else { Vec::new() };
        // The zero-point choice stays outside the loops, so each loop is specialized.
        macro_rules! rows {
            ($zp:expr) => {
                for r in 0..rows {
                    let row = &w[r * w_stride..r * w_stride + cols];
                    let out = &mut packed[r * row_stride..r * row_stride + cols / 2];
                    for_each_chunk::<S>(cols, |j, m| {
                        let x = E::load(simd, &row[j..j + m]);
                        let s = load_f32(simd, &scale[j..j + m]);
                        let rc = load_f32(simd, &recip[j..j + m]);
                        #[allow(clippy::redundant_closure_call)]
                        let q = quantize_lanes::<S, P>(simd, &bounds, x, s, rc, ($zp)(j, m));
                        let q = simd.and_u32s(to_int(simd, q), nib);
                        if odd_lanes {
                            codes[j] = crate::simd::lanes_u32::<S>(&q)[0] as u8;
                        } else {
                            // m is even (LANES and cols are): pair neighbouring lanes into bytes.
                            store_nibble_pairs(simd, q, &mut out[j / 2..(j + m) / 2]);
                        }
                    });
                    let ahead = (r * w_stride).min(next.len());
                    prefetch(&next[ahead..(ahead + cols).min(next.len())]);
                    if odd_lanes {
                        for (o, pair) in out.iter_mut().zip(codes.chunks_exact(2)) {
                            *o = pair[0] | (pair[1] << 4);
                        }
                    }
                }
            };
        }
        match zero_point {
            None => rows!(|_, _| None),
            Some(z) => rows!(|j: usize, m: usize| Some(load_f32(simd, &z[j..j + m]))),
        }
    }
}
