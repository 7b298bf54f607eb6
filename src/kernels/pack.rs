//! INT4/UINT4 nibble packing in ONNX order: element `2i` goes to the low nibble of byte `i`,
//! element `2i + 1` to its high nibble; an odd count leaves the last high nibble 0.
//!
//! Vectorized as SWAR on u32 lanes, each holding four codes `b0 b1 b2 b3`:
//! `x &= 0x0f0f_0f0f; x = (x | x >> 4) & 0x00ff_00ff; x = (x | x >> 8) & 0xffff` leaves the two
//! output bytes `b0 | b1 << 4` and `b2 | b3 << 4` in the low half of the lane. AVX-512 and AVX2
//! work on u16 lanes instead and narrow in registers (see `Pack::with_simd`).

use super::{check_len, check_tier};
use crate::simd::lanes_u32;
#[cfg(target_arch = "x86_64")]
use crate::simd::{as_v3, as_v4};
use crate::{Result, Tier};
#[cfg(target_arch = "x86_64")]
use core::arch::x86_64::__m256i;
use pulp::{Simd, WithSimd};

/// Packs the low nibble of each code byte; `out.len() == codes.len().div_ceil(2)`.
pub fn pack_nibbles(codes: &[u8], out: &mut [u8]) -> Result<()> {
    pack_nibbles_with(Tier::best(), codes, out)
}

/// [`pack_nibbles`] on a chosen tier.
pub fn pack_nibbles_with(tier: Tier, codes: &[u8], out: &mut [u8]) -> Result<()> {
    check_tier(tier)?;
    check_len("pack output", codes.len().div_ceil(2), out.len())?;
    tier.dispatch(Pack { codes, out });
    Ok(())
}

/// Unpacks `count` nibbles, sign-extending them when `signed` (INT4) — the inverse of
/// [`pack_nibbles`], for checks and inspection.
pub fn unpack_nibbles(packed: &[u8], count: usize, signed: bool) -> Result<Vec<i8>> {
    check_len("unpack input", count.div_ceil(2), packed.len())?;
    Ok((0..count)
        .map(|i| {
            let nib = (packed[i / 2] >> (4 * (i % 2))) & 0xf;
            if signed {
                ((nib << 4) as i8) >> 4
            } else {
                nib as i8
            }
        })
        .collect())
}

struct Pack<'a> {
    codes: &'a [u8],
    out: &'a mut [u8],
}

impl WithSimd for Pack<'_> {
    type Output = ();

    #[inline(always)]
    fn with_simd<S: Simd>(self, simd: S) {
        let Self { codes, out } = self;
        // AVX-512: 128 codes at a time. `vpmaddubsw` of the masked codes by bytes `1, 16` leaves
        // `c0 + 16 * c1` (at most 255) in each u16 lane; one `vpackuswb` narrows two such vectors
        // (interleaved by 128-bit lane) and one `vpermq` puts their quarters in order: two
        // shuffles per 64 output bytes.
        #[cfg(target_arch = "x86_64")]
        if let Some(v4) = as_v4(simd) {
            let whole = codes.len() / 128 * 128;
            let low = v4.avx512f._mm512_set1_epi8(0x0f);
            let weights = v4.avx512f._mm512_set1_epi16(0x1001);
            let order = v4.avx512f._mm512_set_epi64(7, 5, 3, 1, 6, 4, 2, 0);
            let pairs = |x: [u8; 64]| {
                let x = v4.avx512f._mm512_and_si512(bytemuck::cast(x), low);
                v4.avx512bw._mm512_maddubs_epi16(x, weights)
            };
            for (c, o) in codes[..whole].chunks_exact(128).zip(out.chunks_exact_mut(64)) {
                let [a, b]: [[u8; 64]; 2] = bytemuck::cast(<[u8; 128]>::try_from(c).expect("128 codes"));
                let x = v4.avx512bw._mm512_packus_epi16(pairs(a), pairs(b));
                let bytes: [u8; 64] = bytemuck::cast(v4.avx512f._mm512_permutexvar_epi64(order, x));
                o.copy_from_slice(&bytes);
            }
            return swar(simd, &codes[whole..], &mut out[whole / 2..]);
        }
        // AVX2: 64 codes at a time as u16 lanes `c0 | c1 << 8`, `(x | x >> 4)` leaves the byte
        // `c0 | c1 << 4` in each lane's low half, narrowed by a saturating pack of the masked lanes
        // and a lane permute.
        #[cfg(target_arch = "x86_64")]
        if let Some(v3) = as_v3(simd) {
            let whole = codes.len() / 64 * 64;
            let low = v3.avx._mm256_set1_epi8(0x0f);
            let byte = v3.avx._mm256_set1_epi16(0xff);
            let pairs = |x: __m256i| {
                let x = v3.avx2._mm256_and_si256(x, low);
                let x = v3.avx2._mm256_or_si256(x, v3.avx2._mm256_srli_epi16::<4>(x));
                v3.avx2._mm256_and_si256(x, byte)
            };
            for (c, o) in codes[..whole].chunks_exact(64).zip(out.chunks_exact_mut(32)) {
                let [a, b]: [[u8; 32]; 2] = bytemuck::cast(<[u8; 64]>::try_from(c).expect("64 codes"));
                let x = v3.avx2._mm256_packus_epi16(pairs(bytemuck::cast(a)), pairs(bytemuck::cast(b)));
                let bytes: [u8; 32] = bytemuck::cast(v3.avx2._mm256_permute4x64_epi64::<0b11_01_10_00>(x));
                o.copy_from_slice(&bytes);
            }
            return swar(simd, &codes[whole..], &mut out[whole / 2..]);
        }
        swar(simd, codes, out)
    }
}

/// The generic SWAR packing (the scalar tier, NEON and the tails).
#[inline(always)]
fn swar<S: Simd>(simd: S, codes: &[u8], out: &mut [u8]) {
    // Whole vectors: LANES u32 words = 4 * LANES codes = 2 * LANES output bytes.
    let step = 4 * S::U32_LANES;
    let whole = codes.len() / step * step;
    let (m0, m1, m2) = (simd.splat_u32s(0x0f0f_0f0f), simd.splat_u32s(0x00ff_00ff), simd.splat_u32s(0xffff));
    let (four, eight) = (simd.splat_u32s(4), simd.splat_u32s(8));
    for (chunk, dst) in codes[..whole].chunks_exact(step).zip(out.chunks_exact_mut(step / 2)) {
        let mut buf = simd.splat_u32s(0);
        bytemuck::bytes_of_mut(&mut buf).copy_from_slice(chunk);
        let x = simd.and_u32s(buf, m0);
        let x = simd.and_u32s(simd.or_u32s(x, simd.wrapping_dyn_shr_u32s(x, four)), m1);
        let x = simd.and_u32s(simd.or_u32s(x, simd.wrapping_dyn_shr_u32s(x, eight)), m2);
        for (pair, &lane) in dst.chunks_exact_mut(2).zip(lanes_u32::<S>(&x)) {
            pair.copy_from_slice(&(lane as u16).to_le_bytes());
        }
    }
    for (i, o) in out[whole / 2..].iter_mut().enumerate() {
        let lo = codes[whole + 2 * i] & 0xf;
        let hi = codes.get(whole + 2 * i + 1).map_or(0, |b| b & 0xf);
        *o = lo | (hi << 4);
    }
}
