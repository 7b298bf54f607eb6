//! [`quantize_packed`](super::quantize_packed::quantize_packed) of f16 weights with f16 scales by
//! native AVX512-FP16 arithmetic, the sub-path of the AVX-512 tier the pipeline takes for f16 weights
//! when the CPU has AVX512-FP16 ([`native_f16`]): 32 f16 lanes per vector, the correctly rounded
//! f16 quotient `x / s`, computed as the f32 product by the column's reciprocal rounded to f16
//! (`vcvtph2ps`, `vmulps`, `vcvtps2ph`) or, for the rare vector with a product near an f16
//! rounding midpoint, by the f16 division (`vdivph`); clamp (`vmaxph`, `vminph`), round half to
//! even by adding `1.5 * 2^10` (`vaddph`, which also leaves the integer in the low bits), nibble
//! pairs narrowed by `vpmovdb`. The f32 lanes take a widening, an f32 division and the
//! `vcvtps2ph` / `vcvtph2ps` round trip per 16 lanes instead. Why the codes are the same bit for
//! bit is proved in `kernels::code` ("f16: the native division" and "f16: the reciprocal", a
//! private module).
//!
//! It applies when every scale is an f16 value and every zero point an integer in 0..=15 (always
//! so in the pipeline: the scales are rounded to the weight's format); otherwise the caller keeps
//! the f32 lanes.

use std::sync::OnceLock;

/// `1.5 * 2^10` as f16 bits: for an f16 `y` with `|y| <= 512`, `y + 1536` rounds `y` to an
/// integer, ties to even, and its bits are `0x6600 + rint(y)` (the f16 step is 1 in [1024, 2048)).
const MAGIC_BITS: u16 = 0x6600;

/// Whether f16 codes take the native AVX512-FP16 sub-path on the AVX-512 tier: the CPU has
/// AVX512-FP16 and AVX-512, and `NIBBLE_FP16` is not `off` (to measure the f32 lanes instead).
/// Detected once per process.
pub fn native_f16() -> bool {
    static NATIVE: OnceLock<bool> = OnceLock::new();
    *NATIVE.get_or_init(|| native_f16_available() && std::env::var("NIBBLE_FP16").map_or(true, |v| v != "off"))
}

/// Whether the CPU runs the native sub-path (AVX512-FP16 and the AVX-512 tier), whatever
/// `NIBBLE_FP16` says.
pub fn native_f16_available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        crate::Tier::Avx512.is_available() && std::arch::is_x86_feature_detected!("avx512fp16")
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// The scales (and zero points) as f16 bits, padded with a whole vector's worth of neutral lanes
/// (scale 1, zero point 0) so the last run of columns loads a full vector, when every scale is
/// an f16 value (its bits survive the round trip) and every zero point an integer in 0..=15; else
/// `None` (the f32 lanes run). Also the reciprocals `fl(1 / s)` in f32, padded with 1.
pub(crate) fn f16_operands(scale: &[f32], zero_point: Option<&[f32]>) -> Option<F16Operands> {
    use half::slice::HalfFloatSliceExt;
    let pad = |mut v: Vec<u16>, with: u16| {
        v.resize(v.len() + LANES, with);
        v
    };
    // `half`'s slice conversions (F16C, vectorized) both ways.
    let mut h = vec![half::f16::ZERO; scale.len()];
    h.convert_from_f32_slice(scale);
    let mut back = vec![0.0f32; scale.len()];
    h.convert_to_f32_slice(&mut back);
    if back.iter().zip(scale).any(|(b, s)| b.to_bits() != s.to_bits()) {
        return None;
    }
    let s: Vec<u16> = bytemuck::cast_slice(&h).to_vec();
    let zp = match zero_point {
        None => None,
        Some(z) => {
            let ok = z.iter().all(|&v| (0.0..=15.0).contains(&v) && v.fract() == 0.0);
            let z: Vec<u16> = z.iter().map(|&v| half::f16::from_f32(v).to_bits()).collect();
            Some(pad(ok.then_some(z)?, 0))
        }
    };
    // `1 / s` rounded to f32 (`s` is an f32 value): the reciprocals `kernels::code` multiplies by.
    let mut recip: Vec<f32> = scale.iter().map(|&s| 1.0 / s).collect();
    recip.resize(scale.len() + LANES, 1.0);
    Some(F16Operands { scale: pad(s, half::f16::ONE.to_bits()), recip, zero_point: zp })
}

/// [`f16_operands`]' result: the scales as f16 bits, their f32 reciprocals and the zero points as
/// f16 bits, each padded with `LANES` neutral lanes.
pub(crate) struct F16Operands {
    pub(crate) scale: Vec<u16>,
    pub(crate) recip: Vec<f32>,
    pub(crate) zero_point: Option<Vec<u16>>,
}

/// f16 lanes per vector.
const LANES: usize = 32;

/// [`quantize_packed_rows`](super::quantize_packed::quantize_packed_rows)'s loop for f16 weights
/// with the [`f16_operands`] `scale` and `zero_point` (padded), on the native sub-path. The caller
/// has checked [`native_f16_available`] and the lengths (as for `quantize_packed_rows`).
#[allow(clippy::too_many_arguments)]
pub(crate) fn quantize_packed_rows(
    w: &[half::f16],
    rows: usize,
    cols: usize,
    w_stride: usize,
    operands: &F16Operands,
    packed: &mut [u8],
    row_stride: usize,
    next: &[half::f16],
) {
    let F16Operands { scale, recip, zero_point } = operands;
    let zero_point = zero_point.as_deref();
    assert!(native_f16_available(), "AVX512-FP16 unavailable");
    assert!(
        scale.len() >= cols + LANES
            && recip.len() >= cols + LANES
            && zero_point.is_none_or(|z| z.len() >= cols + LANES),
        "padded operands"
    );
    let w: &[u16] = bytemuck::cast_slice(w);
    let next: &[u16] = bytemuck::cast_slice(next);
    #[cfg(target_arch = "x86_64")]
    {
        let job = Rows { w, rows, cols, w_stride, scale, recip, packed, row_stride, next };
        // SAFETY: `native_f16_available` (asserted above) checked AVX512-FP16 and pulp's V4 token,
        // which cover every feature `native::rows` enables.
        unsafe {
            match zero_point {
                None => native::rows::<false>(job, &[]),
                Some(z) => native::rows::<true>(job, z),
            }
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (w, rows, cols, w_stride, scale, zero_point, packed, row_stride, next);
}

/// The arguments of [`native::rows`].
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
struct Rows<'a> {
    w: &'a [u16],
    rows: usize,
    cols: usize,
    w_stride: usize,
    scale: &'a [u16],
    recip: &'a [f32],
    packed: &'a mut [u8],
    row_stride: usize,
    next: &'a [u16],
}

#[cfg(target_arch = "x86_64")]
mod native {
    use super::{Rows, LANES, MAGIC_BITS};
    use core::arch::x86_64::*;

    /// Every row, `LANES` columns at a time (a shorter last run through a padded copy).
    ///
    /// # Safety
    /// The CPU must have AVX512-FP16 and every feature of pulp's V4 token.
    #[target_feature(
        enable = "avx512fp16,avx512f,avx512bw,avx512cd,avx512dq,avx512vl,avx,avx2,fma,f16c,bmi1,bmi2,lzcnt,popcnt"
    )]
    pub(super) unsafe fn rows<const ZP: bool>(job: Rows<'_>, zero_point: &[u16]) {
        let Rows { w, rows, cols, w_stride, scale, recip, packed, row_stride, next } = job;
        for r in 0..rows {
            let row = &w[r * w_stride..r * w_stride + cols];
            let out = &mut packed[r * row_stride..r * row_stride + cols / 2];
            let mut j = 0;
            while j < cols {
                let m = LANES.min(cols - j);
                let x = match <&[u16; LANES]>::try_from(&row[j..j + m]) {
                    Ok(x) => load(x),
                    Err(_) => {
                        let mut buf = [0u16; LANES];
                        buf[..m].copy_from_slice(&row[j..j + m]);
                        load(&buf)
                    }
                };
                let s = load(scale[j..j + LANES].try_into().expect("padded scales"));
                let r: &[f32; LANES] = recip[j..j + LANES].try_into().expect("padded reciprocals");
                let r = bytemuck::cast::<_, [__m512; 2]>(*r);
                let zp = if ZP {
                    Some(load(zero_point[j..j + LANES].try_into().expect("padded zero points")))
                } else {
                    None
                };
                let bytes = code_pairs(x, s, r, zp);
                // m is even (cols is): m / 2 whole bytes (a constant 16 but for the last run, so
                // the usual store is one instruction, not a call to memcpy).
                match <&mut [u8; LANES / 2]>::try_from(&mut out[j / 2..(j + m) / 2]) {
                    Ok(o) => *o = bytes,
                    Err(_) => out[j / 2..(j + m) / 2].copy_from_slice(&bytes[..m / 2]),
                }
                j += LANES;
            }
            let ahead = (r * w_stride).min(next.len());
            crate::simd::prefetch(&next[ahead..(ahead + cols).min(next.len())]);
        }
    }

    #[inline]
    #[target_feature(enable = "avx512fp16,avx512f,avx512bw")]
    fn load(v: &[u16; LANES]) -> __m512h {
        _mm512_castsi512_ph(bytemuck::cast::<_, __m512i>(*v))
    }

    /// Round to nearest, ties to even, whatever MXCSR says, exceptions suppressed.
    const NEAREST: i32 = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;

    /// `rnd_f16(x / s)` of 32 lanes, `r` the lanes' f32 reciprocals of `s` (low 16 lanes, then
    /// high): `rnd_f16(fl(x * r))` unless a lane's product lies within 4 f32 steps of an f16
    /// rounding midpoint (its 13 low bits within 4 of `0x1000`), then the division `vdivph` for
    /// the whole vector (`kernels::code`, "f16: the reciprocal").
    #[inline]
    #[target_feature(enable = "avx512fp16,avx512f,avx512bw,avx512dq")]
    fn quotient(x: __m512h, s: __m512h, r: [__m512; 2]) -> __m512h {
        let xi = _mm512_castph_si512(x);
        let lo = _mm512_mul_round_ps::<NEAREST>(_mm512_cvtph_ps(_mm512_castsi512_si256(xi)), r[0]);
        let hi = _mm512_mul_round_ps::<NEAREST>(_mm512_cvtph_ps(_mm512_extracti64x4_epi64::<1>(xi)), r[1]);
        // Low 13 bits in 0x1000 - 4 ..= 0x1000 + 3: (bits + 4 - 0x1000) mod 2^13 in 0..=7.
        let near = |p: __m512| {
            let shifted = _mm512_add_epi32(_mm512_castps_si512(p), _mm512_set1_epi32(4 - 0x1000));
            _mm512_testn_epi32_mask(shifted, _mm512_set1_epi32(0x1ff8))
        };
        if near(lo) | near(hi) != 0 {
            return _mm512_div_round_ph::<NEAREST>(x, s);
        }
        let lo = _mm512_cvt_roundps_ph::<NEAREST>(lo);
        let hi = _mm512_cvt_roundps_ph::<NEAREST>(hi);
        _mm512_castsi512_ph(_mm512_inserti64x4::<1>(_mm512_castsi256_si512(lo), hi))
    }

    /// The nibble pairs of 32 lanes: byte `i` holds the codes of lanes `2i` (low nibble) and
    /// `2i + 1`, each `clip(rint(x / s), -8, 7)`, or with zero points
    /// `clip(rint(clip(x / s, -16, 16)) + zp, 0, 15)`, the division in f16 (`kernels::code`).
    #[inline]
    #[target_feature(enable = "avx512fp16,avx512f,avx512bw,avx512dq")]
    fn code_pairs(x: __m512h, s: __m512h, r: [__m512; 2], zp: Option<__m512h>) -> [u8; 16] {
        let splat = |bits: u16| _mm512_castsi512_ph(_mm512_set1_epi16(bits as i16));
        let magic = splat(MAGIC_BITS);
        let y = quotient(x, s, r);
        // vmaxph / vminph return the second operand when one is NaN, as `vmaxps` does in the
        // f32 lanes' clamp: a NaN quotient becomes the lower bound on both paths.
        let biased = match zp {
            None => {
                let y = _mm512_min_ph(_mm512_max_ph(y, splat(0xc800)), splat(0x4700)); // -8, 7
                _mm512_add_round_ph::<NEAREST>(y, magic)
            }
            Some(z) => {
                let y = _mm512_min_ph(_mm512_max_ph(y, splat(0xcc00)), splat(0x4c00)); // -16, 16
                                                                                       // Integers from 1520 to 1567: both sums are exact.
                let q = _mm512_add_round_ph::<NEAREST>(_mm512_add_round_ph::<NEAREST>(y, magic), z);
                _mm512_min_ph(_mm512_max_ph(q, magic), splat(MAGIC_BITS + 15))
            }
        };
        // Each u32 lane holds two codes in the low nibbles of its halves: pair them into its low
        // byte, then narrow.
        let v = _mm512_and_si512(_mm512_castph_si512(biased), _mm512_set1_epi32(0x000f_000f));
        let v = _mm512_or_si512(v, _mm512_srli_epi32::<12>(v));
        bytemuck::cast(_mm512_cvtepi32_epi8(v))
    }
}
