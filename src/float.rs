//! Weight element formats, and the rounding that makes `f32` arithmetic equal numpy's.
//!
//! ModelOpt computes every step in the weight's own dtype. numpy evaluates a float16 (and ml_dtypes a
//! bfloat16) operation as `to_half(op(to_f32(a), to_f32(b)))`; for `+ - * /` on 11- or 8-bit significands
//! the f32 result rounded once to the narrow type is the correctly rounded narrow result (24 >= 2p + 2, so
//! the double rounding is innocuous). Every kernel therefore computes in f32 and applies
//! [`Precision::round`] after each arithmetic step: the identity for f32, round-to-nearest-even to f16 or
//! bf16 otherwise. Python float constants (`alpha`, `1e-5`) are "weak" under NEP 50: they are first
//! converted to the weight dtype ([`Precision::constant`]).
//!
//! The SIMD rounding is written with integer operations only, so it is the same on every tier:
//! - bf16: `r = (a + 0x7fff + ((a >> 16) & 1)) & 0xffff_0000` on the magnitude bits `a`.
//! - f16 normal range (|x| >= 2^-14): `r = (a + 0xfff + ((a >> 13) & 1)) & 0xffff_e000`, then
//!   `r >= 65536.0` becomes infinity.
//! - f16 subnormal range: `(|x| + 0.5) - 0.5` in f32 rounds |x| to a multiple of 2^-24, ties to even.
//!
//! The scalar references use the `half` crate instead, an independent implementation.

use pulp::Simd;

/// The element type of a weight tensor.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum FloatFormat {
    /// IEEE binary32.
    F32,
    /// IEEE binary16.
    F16,
    /// bfloat16 (the upper half of a binary32).
    BF16,
}

impl FloatFormat {
    /// Bytes per element.
    pub const fn size(self) -> usize {
        match self {
            FloatFormat::F32 => 4,
            FloatFormat::F16 | FloatFormat::BF16 => 2,
        }
    }

    /// ONNX's name of the type.
    pub const fn name(self) -> &'static str {
        match self {
            FloatFormat::F32 => "float32",
            FloatFormat::F16 => "float16",
            FloatFormat::BF16 => "bfloat16",
        }
    }

    /// The largest finite value of this format.
    pub fn max_finite(self) -> f32 {
        match self {
            FloatFormat::F32 => f32::MAX,
            FloatFormat::F16 => half::f16::MAX.to_f32(),
            FloatFormat::BF16 => half::bf16::MAX.to_f32(),
        }
    }

    /// [`max_finite`](Self::max_finite) as text for messages.
    pub const fn max_finite_text(self) -> &'static str {
        match self {
            FloatFormat::F32 => "3.4028235e38",
            FloatFormat::F16 => "65504",
            FloatFormat::BF16 => "3.3895314e38",
        }
    }

    /// Rounds an f32 value to this format and back (the identity for f32).
    #[inline]
    pub fn round(self, x: f32) -> f32 {
        match self {
            FloatFormat::F32 => x,
            FloatFormat::F16 => half::f16::from_f32(x).to_f32(),
            FloatFormat::BF16 => half::bf16::from_f32(x).to_f32(),
        }
    }

    /// A Python float constant as numpy sees it next to an array of this format (NEP 50 weak scalar).
    pub fn constant(self, x: f64) -> f32 {
        match self {
            FloatFormat::F32 => x as f32,
            FloatFormat::F16 => half::f16::from_f64(x).to_f32(),
            FloatFormat::BF16 => half::bf16::from_f64(x).to_f32(),
        }
    }
}

/// Compile-time choice of the rounding applied after each arithmetic step.
pub trait Precision: Copy + Send + Sync + 'static {
    /// The format this rounding stands for.
    const FORMAT: FloatFormat;

    /// Rounds every lane to this format (f32 in, f32 out). Bit-exact with [`FloatFormat::round`]
    /// for every non-NaN input.
    fn round_simd<S: Simd>(simd: S, x: S::f32s) -> S::f32s;
}

/// f32 weights: no rounding.
#[derive(Clone, Copy, Debug)]
pub struct F32;
/// f16 weights.
#[derive(Clone, Copy, Debug)]
pub struct F16;
/// bf16 weights.
#[derive(Clone, Copy, Debug)]
pub struct BF16;

impl Precision for F32 {
    const FORMAT: FloatFormat = FloatFormat::F32;
    #[inline(always)]
    fn round_simd<S: Simd>(_simd: S, x: S::f32s) -> S::f32s {
        x
    }
}

impl Precision for F16 {
    const FORMAT: FloatFormat = FloatFormat::F16;
    #[inline(always)]
    fn round_simd<S: Simd>(simd: S, x: S::f32s) -> S::f32s {
        // AVX-512 and AVX2 (with F16C, which the AVX2 tier requires): the hardware conversion pair
        // (round to nearest even, subnormals kept, overflow to infinity) is the same function as the
        // integer rounding below; the tests hold both to `half` bit for bit.
        #[cfg(target_arch = "x86_64")]
        if let Some(v4) = crate::simd::as_v4(simd) {
            let v: pulp::f32x16 = bytemuck::cast(x);
            let h = v4.avx512f._mm512_cvtps_ph::<0x08>(bytemuck::cast(v));
            let back: pulp::f32x16 = bytemuck::cast(v4.avx512f._mm512_cvtph_ps(h));
            return bytemuck::cast(back);
        }
        #[cfg(target_arch = "x86_64")]
        if crate::simd::as_v3(simd).is_some() {
            use core::arch::x86_64::{_mm256_cvtph_ps, _mm256_cvtps_ph};
            let v: pulp::f32x8 = bytemuck::cast(x);
            // SAFETY: S is V3, which runs only through the AVX2 tier: the CPU has F16C (checked by
            // `Tier::is_available`) and the dispatch enables it around this inlined code.
            let back = unsafe { _mm256_cvtph_ps(_mm256_cvtps_ph::<0x00>(bytemuck::cast(v))) };
            return bytemuck::cast(bytemuck::cast::<_, pulp::f32x8>(back));
        }
        let bits: S::u32s = pulp::cast(x);
        let sign = simd.and_u32s(bits, simd.splat_u32s(0x8000_0000));
        let abs = simd.and_u32s(bits, simd.splat_u32s(0x7fff_ffff));
        // Normal range: round the 23-bit significand to 10 bits, ties to even.
        let lsb = simd.and_u32s(simd.wrapping_dyn_shr_u32s(abs, simd.splat_u32s(13)), simd.splat_u32s(1));
        let normal =
            simd.and_u32s(simd.add_u32s(simd.add_u32s(abs, simd.splat_u32s(0xfff)), lsb), simd.splat_u32s(0xffff_e000));
        let overflow = simd.greater_than_or_equal_u32s(normal, simd.splat_u32s(0x4780_0000));
        let normal = simd.select_u32s(overflow, simd.splat_u32s(0x7f80_0000), normal);
        // Subnormal range: the FPU rounds |x| + 0.5 to a multiple of 2^-24.
        let half = simd.splat_f32s(0.5);
        let sub = simd.sub_f32s(simd.add_f32s(pulp::cast(abs), half), half);
        let is_sub = simd.less_than_u32s(abs, simd.splat_u32s(0x3880_0000));
        let rounded = simd.select_u32s(is_sub, pulp::cast(sub), normal);
        // NaN stays NaN.
        let is_nan = simd.greater_than_u32s(abs, simd.splat_u32s(0x7f80_0000));
        let rounded = simd.select_u32s(is_nan, abs, rounded);
        pulp::cast(simd.or_u32s(rounded, sign))
    }
}

impl Precision for BF16 {
    const FORMAT: FloatFormat = FloatFormat::BF16;
    #[inline(always)]
    fn round_simd<S: Simd>(simd: S, x: S::f32s) -> S::f32s {
        let bits: S::u32s = pulp::cast(x);
        let sign = simd.and_u32s(bits, simd.splat_u32s(0x8000_0000));
        let abs = simd.and_u32s(bits, simd.splat_u32s(0x7fff_ffff));
        let lsb = simd.and_u32s(simd.wrapping_dyn_shr_u32s(abs, simd.splat_u32s(16)), simd.splat_u32s(1));
        let rounded = simd
            .and_u32s(simd.add_u32s(simd.add_u32s(abs, simd.splat_u32s(0x7fff)), lsb), simd.splat_u32s(0xffff_0000));
        let is_nan = simd.greater_than_u32s(abs, simd.splat_u32s(0x7f80_0000));
        let rounded = simd.select_u32s(is_nan, abs, rounded);
        pulp::cast(simd.or_u32s(rounded, sign))
    }
}
