//! Widen f16 or bf16 values to f32 (exact): `out[i] = f32(src[i])`.
//!
//! bf16 is the upper half of an f32 (`bits << 16`); f16 goes through the hardware conversion on
//! AVX-512 and AVX2 (`vcvtph2ps`, 16 or 8 lanes at a time; the AVX2 tier requires F16C) and through
//! `half` elsewhere (which itself uses F16C or NEON fp16 when it detects them at run time). The input stays in its own 2-byte format until it is in
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
        let done = src.len() / 16 * 16;
        #[cfg(target_arch = "x86_64")]
        if let Some(v4) = crate::simd::as_v4(simd) {
            // The elements before the output's first 64-byte boundary through `half`, so that no
            // 64-byte store crosses two cache lines (+17-22% in L2, BENCHMARKS.md).
            let head = out.as_ptr().align_offset(64).min(src.len());
            let (src_head, src) = src.split_at(head);
            let (out_head, out) = out.split_at_mut(head);
            src_head.convert_to_f32_slice(out_head);
            let done = src.len() / 16 * 16;
            for (s, o) in src[..done].chunks_exact(16).zip(out.chunks_exact_mut(16)) {
                let h: [u16; 16] = bytemuck::cast(<[f16; 16]>::try_from(s).expect("16 lanes"));
                let f: [f32; 16] = bytemuck::cast(v4.avx512f._mm512_cvtph_ps(bytemuck::cast(h)));
                o.copy_from_slice(&f);
            }
            src[done..].convert_to_f32_slice(&mut out[done..]);
            return;
        }
        #[cfg(target_arch = "x86_64")]
        if crate::simd::as_v3(simd).is_some() {
            use core::arch::x86_64::_mm256_cvtph_ps;
            for (s, o) in src[..done].chunks_exact(16).zip(out.chunks_exact_mut(16)) {
                let h: [[u16; 8]; 2] = bytemuck::cast(<[f16; 16]>::try_from(s).expect("16 lanes"));
                // SAFETY: S is V3, which runs only through the AVX2 tier: the CPU has F16C (checked
                // by `Tier::is_available`) and the dispatch enables it around this inlined code.
                let (a, b) = unsafe { (_mm256_cvtph_ps(bytemuck::cast(h[0])), _mm256_cvtph_ps(bytemuck::cast(h[1]))) };
                let f: [[f32; 8]; 2] = [bytemuck::cast(a), bytemuck::cast(b)];
                o.copy_from_slice(bytemuck::cast_slice(&f));
            }
            src[done..].convert_to_f32_slice(&mut out[done..]);
            return;
        }
        let _ = simd;
        src.convert_to_f32_slice(out);
    }
}
