//! Widen f16 or bf16 values to f32 (exact): `out[i] = f32(src[i])`.
//!
//! bf16 is the upper half of an f32 (`bits << 16`); f16 goes through the hardware conversion on
//! AVX-512 (`vcvtph2ps`, 16 lanes at a time) and through `half` elsewhere (F16C or NEON fp16 when
//! the CPU has them, detected at run time). The input stays in its own 2-byte format until it is in
//! registers, so a weight is read once, at half the bytes of f32.

use super::{check_len, check_tier};
use crate::{Result, Tier};
use half::slice::HalfFloatSliceExt;
use half::{bf16, f16};
use pulp::{Simd, WithSimd};

/// Widens f16 values into `out`.
pub fn widen_f16(src: &[f16], out: &mut [f32]) -> Result<()> {
    widen_f16_with(Tier::best(), src, out)
}

/// [`widen_f16`] on a chosen tier.
pub fn widen_f16_with(tier: Tier, src: &[f16], out: &mut [f32]) -> Result<()> {
    check_tier(tier)?;
    check_len("widen output", src.len(), out.len())?;
    tier.dispatch(WidenF16 { src, out });
    Ok(())
}

/// Widens bf16 values into `out` (a shift; the compiler vectorizes it for every tier).
pub fn widen_bf16(src: &[bf16], out: &mut [f32]) -> Result<()> {
    check_len("widen output", src.len(), out.len())?;
    for (o, &b) in out.iter_mut().zip(src) {
        *o = f32::from_bits((b.to_bits() as u32) << 16);
    }
    Ok(())
}

struct WidenF16<'a> {
    src: &'a [f16],
    out: &'a mut [f32],
}

impl WithSimd for WidenF16<'_> {
    type Output = ();

    #[inline(always)]
    fn with_simd<S: Simd>(self, simd: S) {
        let Self { src, out } = self;
        #[cfg(target_arch = "x86_64")]
        if core::any::TypeId::of::<S>() == core::any::TypeId::of::<pulp::x86::V4>() {
            // SAFETY: S is V4 (equal TypeId), so the CPU has AVX-512 (the caller holds a V4 token);
            // the token is a plain Copy value.
            let v4: pulp::x86::V4 = unsafe { core::mem::transmute_copy(&simd) };
            let mut chunks = src.chunks_exact(16).zip(out.chunks_exact_mut(16));
            for (s, o) in &mut chunks {
                let h: [f16; 16] = s.try_into().expect("16 lanes");
                // SAFETY: [f16; 16] (repr(transparent) u16s) and __m256i are both 32 plain bytes.
                let h: core::arch::x86_64::__m256i = unsafe { core::mem::transmute(h) };
                let f = v4.avx512f._mm512_cvtph_ps(h);
                // SAFETY: __m512 is 16 plain f32 lanes.
                let f: [f32; 16] = unsafe { core::mem::transmute(f) };
                o.copy_from_slice(&f);
            }
            let done = src.len() / 16 * 16;
            src[done..].convert_to_f32_slice(&mut out[done..]);
            return;
        }
        let _ = simd;
        src.convert_to_f32_slice(out);
    }
}
