//! Small generic building blocks shared by the kernels.
//!
//! Round half to even without a rounding instruction: for |x| < 2^22, `(x + M) - M` with
//! `M = 1.5 * 2^23` rounds x to an integer in the FPU's default mode (ties to even), and the bit
//! pattern of `x + M` is `bits(M) + x` (two's complement), which gives the integer itself. Every
//! caller clamps x to a small range first, so the precondition always holds; since rint is monotone,
//! `clip(rint(x), lo, hi) == rint(clip(x, lo, hi))` for integer bounds.

use pulp::Simd;

/// The AVX-512 token when `S` is [`pulp::x86::V4`] (the instantiation for the AVX-512 tier).
#[cfg(target_arch = "x86_64")]
#[inline(always)]
pub(crate) fn as_v4<S: Simd>(simd: S) -> Option<pulp::x86::V4> {
    if core::any::TypeId::of::<S>() == core::any::TypeId::of::<pulp::x86::V4>() {
        // SAFETY: S is V4 (equal TypeId), so this copies a V4 token, which exists only when the CPU
        // has AVX-512; the token is a plain Copy value.
        Some(unsafe { core::mem::transmute_copy(&simd) })
    } else {
        None
    }
}

/// The AVX2 token when `S` is [`pulp::x86::V3`]. Kernels run on V3 only through
/// [`Tier::Avx2`](crate::Tier::Avx2), which requires F16C and enables it around the kernel, so a
/// caller holding this token may use the F16C conversions.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
pub(crate) fn as_v3<S: Simd>(simd: S) -> Option<pulp::x86::V3> {
    if core::any::TypeId::of::<S>() == core::any::TypeId::of::<pulp::x86::V3>() {
        // SAFETY: S is V3 (equal TypeId), so this copies a V3 token, which exists only when the CPU
        // has AVX2; the token is a plain Copy value.
        Some(unsafe { core::mem::transmute_copy(&simd) })
    } else {
        None
    }
}

/// `1.5 * 2^23`.
pub(crate) const MAGIC: f32 = 12_582_912.0;
/// `MAGIC.to_bits()`.
pub(crate) const MAGIC_BITS: u32 = 0x4B40_0000;

/// `rint(clamp(x, lo, hi))` as a float; `lo`, `hi` integers with |lo|, |hi| < 2^22.
#[inline(always)]
pub(crate) fn rint_clamped<S: Simd>(simd: S, x: S::f32s, lo: S::f32s, hi: S::f32s) -> S::f32s {
    let x = simd.min_f32s(simd.max_f32s(x, lo), hi);
    let m = simd.splat_f32s(MAGIC);
    simd.sub_f32s(simd.add_f32s(x, m), m)
}

/// The two's complement integer of an integer-valued float with |x| < 2^22.
#[inline(always)]
pub(crate) fn to_int<S: Simd>(simd: S, x: S::f32s) -> S::u32s {
    let biased: S::u32s = pulp::cast(simd.add_f32s(x, simd.splat_f32s(MAGIC)));
    simd.sub_u32s(biased, simd.splat_u32s(MAGIC_BITS))
}

/// The float of a two's complement integer with |v| < 2^22.
#[inline(always)]
pub(crate) fn from_int<S: Simd>(simd: S, v: S::u32s) -> S::f32s {
    let biased: S::f32s = pulp::cast(simd.add_u32s(v, simd.splat_u32s(MAGIC_BITS)));
    simd.sub_f32s(biased, simd.splat_f32s(MAGIC))
}

/// Whether every lane of a comparison's mask is true: `kortest` on AVX-512, `vmovmskps` on AVX2,
/// lane by lane elsewhere.
#[inline(always)]
pub(crate) fn all_lanes<S: Simd>(simd: S, mask: S::m32s) -> bool {
    let bytes = bytemuck::bytes_of(&mask);
    #[cfg(target_arch = "x86_64")]
    if as_v4(simd).is_some() {
        return bytes == [0xff, 0xff];
    }
    #[cfg(target_arch = "x86_64")]
    if let Some(v3) = as_v3(simd) {
        let m: [u8; 32] = bytes.try_into().expect("8 lanes");
        return v3.avx._mm256_movemask_ps(bytemuck::cast(m)) == 0xff;
    }
    let _ = simd;
    bytes.chunks(bytes.len() / S::F32_LANES).all(|lane| lane.iter().any(|&b| b != 0))
}

/// The lanes of a vector as a slice.
#[inline(always)]
pub(crate) fn lanes_u32<S: Simd>(v: &S::u32s) -> &[u32] {
    bytemuck::cast_slice(core::slice::from_ref(v))
}

/// The lanes of a vector as a mutable slice.
#[inline(always)]
pub(crate) fn lanes_u32_mut<S: Simd>(v: &mut S::u32s) -> &mut [u32] {
    bytemuck::cast_slice_mut(core::slice::from_mut(v))
}

/// Loads `min(len, LANES)` bytes, each widened to one u32 lane (the rest zero), sign-extended
/// when `signed`. AVX-512 and AVX2 widen a full vector with one `vpmovsxbd` / `vpmovzxbd`.
#[inline(always)]
pub(crate) fn load_bytes_ext<S: Simd>(simd: S, bytes: &[u8], signed: bool) -> S::u32s {
    #[cfg(target_arch = "x86_64")]
    if bytes.len() == 16 {
        if let Some(v4) = as_v4(simd) {
            let b: [u8; 16] = bytes.try_into().expect("16 bytes");
            let x: core::arch::x86_64::__m128i = bytemuck::cast(b);
            let w = if signed { v4.avx512f._mm512_cvtepi8_epi32(x) } else { v4.avx512f._mm512_cvtepu8_epi32(x) };
            return bytemuck::cast(bytemuck::cast::<_, pulp::u32x16>(w));
        }
    }
    #[cfg(target_arch = "x86_64")]
    if bytes.len() == 8 {
        if let Some(v3) = as_v3(simd) {
            let b: [u8; 8] = bytes.try_into().expect("8 bytes");
            let x: core::arch::x86_64::__m128i = bytemuck::cast([u64::from_le_bytes(b), 0]);
            let w = if signed { v3.avx2._mm256_cvtepi8_epi32(x) } else { v3.avx2._mm256_cvtepu8_epi32(x) };
            return bytemuck::cast(bytemuck::cast::<_, pulp::u32x8>(w));
        }
    }
    let mut v = simd.splat_u32s(0);
    for (lane, &b) in lanes_u32_mut::<S>(&mut v).iter_mut().zip(bytes) {
        *lane = if signed { b as i8 as i32 as u32 } else { b as u32 };
    }
    v
}

/// Stores the low byte of the first `out.len()` lanes. On AVX-512 a full vector is narrowed by one
/// instruction (`vpmovdb`), on AVX2 by two packs and a shuffle; elsewhere lane by lane.
#[inline(always)]
pub(crate) fn store_low_bytes<S: Simd>(simd: S, v: S::u32s, out: &mut [u8]) {
    #[cfg(target_arch = "x86_64")]
    if out.len() == 16 {
        if let Some(v4) = as_v4(simd) {
            let lanes: pulp::u32x16 = bytemuck::cast(v);
            let bytes: [u8; 16] = bytemuck::cast(v4.avx512f._mm512_cvtepi32_epi8(bytemuck::cast(lanes)));
            out.copy_from_slice(&bytes);
            return;
        }
    }
    #[cfg(target_arch = "x86_64")]
    if out.len() == 8 {
        if let Some(v3) = as_v3(simd) {
            let lanes: pulp::u32x8 = bytemuck::cast(v);
            // Low bytes (so the saturating packs keep them), u32 -> u16 -> u8 within each 128-bit
            // half, then the two halves' first four bytes side by side.
            let x = v3.avx2._mm256_and_si256(bytemuck::cast(lanes), v3.avx._mm256_set1_epi32(0xff));
            let x = v3.avx2._mm256_packus_epi32(x, x);
            let x = v3.avx2._mm256_packus_epi16(x, x);
            let lo = v3.avx._mm256_castsi256_si128(x);
            let hi = v3.avx2._mm256_extracti128_si256::<1>(x);
            let both: [u8; 16] = bytemuck::cast(v3.sse2._mm_unpacklo_epi32(lo, hi));
            out.copy_from_slice(&both[..8]);
            return;
        }
    }
    let _ = simd;
    for (o, &lane) in out.iter_mut().zip(lanes_u32::<S>(&v)) {
        *o = lane as u8;
    }
}

/// Stores the nibble pairs of the first `2 * out.len()` lanes (each lane a code in 0..=15):
/// `out[i] = lane[2i] | lane[2i + 1] << 4`. Full vectors are paired in registers: as u64 lanes,
/// `v | v >> 28` holds the byte in its low 8 bits, narrowed by `vpmovqb` on AVX-512 and by a byte
/// shuffle on AVX2.
#[inline(always)]
pub(crate) fn store_nibble_pairs<S: Simd>(simd: S, v: S::u32s, out: &mut [u8]) {
    #[cfg(target_arch = "x86_64")]
    if out.len() == 8 {
        if let Some(v4) = as_v4(simd) {
            let lanes: pulp::u32x16 = bytemuck::cast(v);
            let x: core::arch::x86_64::__m512i = bytemuck::cast(lanes);
            let x = v4.avx512f._mm512_or_si512(x, v4.avx512f._mm512_srli_epi64::<28>(x));
            let bytes: [u8; 16] = bytemuck::cast(v4.avx512f._mm512_cvtepi64_epi8(x));
            out.copy_from_slice(&bytes[..8]);
            return;
        }
    }
    #[cfg(target_arch = "x86_64")]
    if out.len() == 4 {
        if let Some(v3) = as_v3(simd) {
            let lanes: pulp::u32x8 = bytemuck::cast(v);
            let x: core::arch::x86_64::__m256i = bytemuck::cast(lanes);
            let x = v3.avx2._mm256_or_si256(x, v3.avx2._mm256_srli_epi64::<28>(x));
            // Bytes 0 and 8 of each 128-bit half to its bytes 0 and 1.
            let idx = v3.avx._mm256_setr_epi8(
                0, 8, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, 0, 8, -1, -1, -1, -1, -1, -1, -1, -1, -1,
                -1, -1, -1, -1, -1,
            );
            let x = v3.avx2._mm256_shuffle_epi8(x, idx);
            let lo = v3.avx._mm256_castsi256_si128(x);
            let hi = v3.avx2._mm256_extracti128_si256::<1>(x);
            let both: [u8; 16] = bytemuck::cast(v3.sse2._mm_unpacklo_epi16(lo, hi));
            out.copy_from_slice(&both[..4]);
            return;
        }
    }
    let _ = simd;
    let lanes = lanes_u32::<S>(&v);
    for (i, o) in out.iter_mut().enumerate() {
        *o = (lanes[2 * i] | (lanes[2 * i + 1] << 4)) as u8;
    }
}

/// Loads `s.len() <= LANES` floats (a full vector when `s.len() == LANES`, else masked).
#[inline(always)]
pub(crate) fn load_f32<S: Simd>(simd: S, s: &[f32]) -> S::f32s {
    if s.len() == S::F32_LANES {
        bytemuck::cast_slice::<f32, S::f32s>(s)[0]
    } else {
        simd.partial_load_f32s(s)
    }
}

/// Stores the first `s.len() <= LANES` lanes.
#[inline(always)]
pub(crate) fn store_f32<S: Simd>(simd: S, s: &mut [f32], v: S::f32s) {
    if s.len() == S::F32_LANES {
        bytemuck::cast_slice_mut::<f32, S::f32s>(s)[0] = v;
    } else {
        simd.partial_store_f32s(s, v)
    }
}

/// Loads `s.len() <= LANES` u32s.
#[inline(always)]
pub(crate) fn load_u32<S: Simd>(simd: S, s: &[u32]) -> S::u32s {
    if s.len() == S::U32_LANES {
        bytemuck::cast_slice::<u32, S::u32s>(s)[0]
    } else {
        simd.partial_load_u32s(s)
    }
}

/// Stores the first `s.len() <= LANES` u32 lanes.
#[inline(always)]
pub(crate) fn store_u32<S: Simd>(simd: S, s: &mut [u32], v: S::u32s) {
    if s.len() == S::U32_LANES {
        bytemuck::cast_slice_mut::<u32, S::u32s>(s)[0] = v;
    } else {
        simd.partial_store_u32s(s, v)
    }
}

/// Calls `f(start, len)` for each run of at most LANES columns of `0..cols`, in order.
///
/// One call site, so `f` is inlined into the kernel and runs with the tier's target features.
/// (Issue #20 tried two call sites, full runs with the constant LANES and the tail apart, to drop
/// the per-run `min`; with two call sites the kernels' closures were no longer inlined, so every
/// pulp operation in them became a call without the tier's features: quantize, block_minmax,
/// qdq_error and AVX2 dequantize ran 10-30x slower than the scalar tier, criterion 2026-12-03
/// 11:06 UTC, BENCHMARKS.md.)
#[inline(always)]
pub(crate) fn for_each_chunk<S: Simd>(cols: usize, mut f: impl FnMut(usize, usize)) {
    let lanes = S::F32_LANES;
    let mut j = 0;
    while j < cols {
        let n = lanes.min(cols - j);
        f(j, n);
        j += lanes;
    }
}

/// Asks the CPU to bring the cache lines of `s` into L2 ahead of a later pass over them, without
/// waiting for them (x86-64: `prefetcht1` per 64-byte line; nothing elsewhere).
#[inline(always)]
pub(crate) fn prefetch<T>(s: &[T]) {
    #[cfg(target_arch = "x86_64")]
    {
        let p = s.as_ptr().cast::<i8>();
        for off in (0..std::mem::size_of_val(s)).step_by(64) {
            // SAFETY: a prefetch reads nothing architecturally and never faults; `p + off` is inside `s`.
            unsafe { core::arch::x86_64::_mm_prefetch::<{ core::arch::x86_64::_MM_HINT_T1 }>(p.add(off)) };
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = s;
}

/// An element type the kernels read straight from a weight: f32, or f16 / bf16 widened to f32 in
/// registers (exact), so a 2-byte weight is read once, at its own size, with no f32 copy.
pub(crate) trait Element: bytemuck::Pod + Send + Sync {
    /// Loads `s.len() <= LANES` elements as f32 lanes (a full vector when `s.len() == LANES`).
    fn load<S: Simd>(simd: S, s: &[Self]) -> S::f32s;
    /// The element as f32 (exact).
    fn to_f32(self) -> f32;
    /// Widens `src` into `out` (same length), exact: `half`'s slice conversions for f16/bf16.
    fn widen_slice(src: &[Self], out: &mut [f32]);
}

impl Element for f32 {
    #[inline(always)]
    fn load<S: Simd>(simd: S, s: &[f32]) -> S::f32s {
        load_f32(simd, s)
    }

    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }

    fn widen_slice(src: &[f32], out: &mut [f32]) {
        out.copy_from_slice(src);
    }
}

impl Element for half::f16 {
    /// AVX-512: one `vcvtph2ps` for 16 lanes; AVX2: its F16C form for 8; elsewhere lane by lane.
    #[inline(always)]
    fn load<S: Simd>(simd: S, s: &[Self]) -> S::f32s {
        #[cfg(target_arch = "x86_64")]
        if s.len() == 16 {
            if let Some(v4) = as_v4(simd) {
                let h: [u16; 16] = bytemuck::cast(<[half::f16; 16]>::try_from(s).expect("16 lanes"));
                let f: pulp::f32x16 = bytemuck::cast(v4.avx512f._mm512_cvtph_ps(bytemuck::cast(h)));
                return bytemuck::cast(f);
            }
        }
        #[cfg(target_arch = "x86_64")]
        if s.len() == 8 && as_v3(simd).is_some() {
            let h: [u16; 8] = bytemuck::cast(<[half::f16; 8]>::try_from(s).expect("8 lanes"));
            // SAFETY: S is V3, which runs only through the AVX2 tier: the CPU has F16C (checked by
            // `Tier::is_available`) and the dispatch enables it around this inlined code.
            let f = unsafe { core::arch::x86_64::_mm256_cvtph_ps(bytemuck::cast(h)) };
            return bytemuck::cast(bytemuck::cast::<_, pulp::f32x8>(f));
        }
        widen_lanes(simd, s)
    }

    /// The software conversion, inlined (`half`'s `to_f32` checks for F16C at each call).
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self.to_f32_const()
    }

    fn widen_slice(src: &[Self], out: &mut [f32]) {
        half::slice::HalfFloatSliceExt::convert_to_f32_slice(src, out);
    }
}

impl Element for half::bf16 {
    /// The bits shifted into the upper half of each u32 lane: AVX-512 and AVX2 widen a full
    /// vector with one `vpmovzxwd` and shift it; elsewhere lane by lane.
    #[inline(always)]
    fn load<S: Simd>(simd: S, s: &[Self]) -> S::f32s {
        #[cfg(target_arch = "x86_64")]
        if s.len() == 16 {
            if let Some(v4) = as_v4(simd) {
                let h: [u16; 16] = bytemuck::cast(<[half::bf16; 16]>::try_from(s).expect("16 lanes"));
                let x = v4.avx512f._mm512_cvtepu16_epi32(bytemuck::cast(h));
                let f: pulp::u32x16 = bytemuck::cast(v4.avx512f._mm512_slli_epi32::<16>(x));
                return bytemuck::cast(f);
            }
        }
        #[cfg(target_arch = "x86_64")]
        if s.len() == 8 {
            if let Some(v3) = as_v3(simd) {
                let h: [u16; 8] = bytemuck::cast(<[half::bf16; 8]>::try_from(s).expect("8 lanes"));
                let x = v3.avx2._mm256_cvtepu16_epi32(bytemuck::cast(h));
                let f: pulp::u32x8 = bytemuck::cast(v3.avx2._mm256_slli_epi32::<16>(x));
                return bytemuck::cast(f);
            }
        }
        widen_lanes(simd, s)
    }

    #[inline(always)]
    fn to_f32(self) -> f32 {
        f32::from_bits((self.to_bits() as u32) << 16)
    }

    fn widen_slice(src: &[Self], out: &mut [f32]) {
        half::slice::HalfFloatSliceExt::convert_to_f32_slice(src, out);
    }
}

/// `s.len() <= LANES` elements widened one by one (the one-lane tiers, NEON and tails).
#[inline(always)]
fn widen_lanes<S: Simd, E: Element>(simd: S, s: &[E]) -> S::f32s {
    if S::F32_LANES == 1 && s.len() == 1 {
        return simd.splat_f32s(s[0].to_f32());
    }
    let mut buf = [0.0f32; 16];
    for (o, &x) in buf.iter_mut().zip(s) {
        *o = x.to_f32();
    }
    load_f32(simd, &buf[..s.len()])
}
