//! The per-lane code arithmetic shared by [`quantize`](super::quantize),
//! [`quantize_packed`](super::quantize_packed) and [`qdq_error`](super::qdq_error): ModelOpt's
//! `rtn` on one vector of lanes, in the weight's [`Precision`].
//!
//! # bf16: the division off the hot path
//!
//! Every code needs `rint(rnd_P(x / s))`: the correctly rounded f32 quotient `y0 = fl(x / s)`,
//! rounded to the weight's precision P (`y1 = rnd_P(y0)`), then to an integer, ties to even. For
//! bf16 the SIMD tiers multiply by the column's reciprocal instead, `y' = fl(x * r)` with
//! `r = fl(1 / s)` computed once per column and slab ([`reciprocals`]), and keep `rnd_bf16(y')` for
//! vectors whose every lane passes the test below, which proves it equal to `y1`; any other vector
//! is computed by the division, exactly as before.
//!
//! **Why it is exact.** `r` is NaN unless `2^-125 <= |s| <= 2^125`, so `1 / s` is a normal number:
//! `r = (1 / s)(1 + a)`, `|a| <= 2^-24`, and `x * r = v (1 + a)` with `v = x / s` exact; NaN fails
//! the test. `y'` and `y0` are the f32 roundings (monotone) of two reals of the same sign at most a
//! factor `1 +- 2^-24` apart, so both lie between the roundings of `|v| (1 - 2^-24)` and
//! `|v| (1 + 2^-24)` (sign apart): an interval of width `2^-23 |v|` in which f32 values are at least
//! `2^-24 |v| (1 - 2^-24)` apart (or 2^-149, wider than the interval, when subnormal), so it holds
//! at most three of them and the bits of `y'` and `y0` are at most 4 apart. The rounding to bf16,
//! on the bits `u` of a finite f32 (sign apart), rounds `u` to the nearest multiple of 2^16, ties to
//! even: its only boundaries are `u = 0x8000 (mod 2^16)`. A lane passes when `y'` is finite and the
//! low 16 bits of its bits are not within 8 of 0x8000; then no boundary lies between the bits of
//! `y'` and `y0`, so `y1 = rnd_bf16(y')`, which, away from a tie, is `(u + 0x8000) & !0xffff` (the
//! sign bit rides along: no carry reaches it from a finite value). About 2^-12 of the lanes fail
//! for arbitrary quotients, and none when `x` and `s` are both bf16 values, as in the pipeline (a
//! quotient of two 8-bit significands is never within 2^-17 of a 9-bit midpoint, 64 f32 steps).
//!
//! Measured (BENCHMARKS.md, "The division off the hot path"): bf16 `quantize_packed` +13-16% on
//! AVX-512. f32 and f16 in these f32 lanes keep the division: the same idea with a half-integer test
//! (`e + |y'| (2^-p + 2^-20) < 1/2`, `e` the distance of `y'` to its nearest integer) made f16
//! 6-15% slower and f32 no faster, because
//! these loops are bound by their instruction count, not by the divider (f16's rounding is two
//! hardware conversions, cheaper than the test, and 5% of its vectors took the division). The
//! one-lane scalar tier keeps the division for every format. (The native f16 sub-path below
//! multiplies by the reciprocal too: see "f16: the reciprocal".)
//!
//! # f16: the native division (AVX512-FP16)
//!
//! On a CPU with AVX512-FP16 the AVX-512 tier computes the codes of f16 weights with f16 scales
//! in f16 itself ([`quantize_packed_f16`](super::quantize_packed_f16)): `y = rnd_f16(x / s)` by
//! one correctly rounded f16 division (`vdivph`, round to nearest even by its embedded rounding,
//! so MXCSR's rounding field plays no part), instead of `y1 = rnd_f16(rnd_f32(x / s))`.
//!
//! **Why `y = y1`.** Write `q = x / s` (exact). If `q` is NaN or infinite, or 0, both are the same
//! (IEEE division by 0 or infinity, the same NaN rules). Otherwise `|q|` lies in
//! `[2^-24 / 65504, 65504 / 2^-24]`, inside f32's normal range, so `rnd_f32(q) = q (1 + e)`,
//! `|e| <= 2^-24`. `rnd_f16` is monotone and changes value only at the f16 midpoints (the points
//! halfway between neighbouring f16 values, with 65520 the overflow threshold, and the multiples
//! of 2^-25 between subnormals): `rnd_f16(rnd_f32(q)) = rnd_f16(q)` unless a midpoint `m` lies
//! between `q` and `rnd_f32(q)` or on `rnd_f32(q)` with `q != m`. Every midpoint is
//! `m = M 2^a` with an integer `|M| < 2^12` (11 significant bits plus one), and
//! `x = X 2^c`, `s = S 2^b` with integers `|X|, |S| < 2^11` (subnormals included). If `q != m`,
//! `x - m s = X 2^c - M S 2^(a + b)` is a nonzero multiple of `2^min(c, a + b)`, so
//! `|q - m| / |m| = |x - m s| / |m s|` is at least `2^c / |M S 2^(a + b)|` (when `c <= a + b`; with
//! `|m s|` within a factor 2 of `|x| < 2^11 2^c` that is more than `2^-12`) or `1 / |M S| > 2^-23`
//! (when `a + b < c`). Either way `|q - m| > 2^-23 |m|`, about twice the `2^-24 |q|` that the f32
//! rounding moves `q`: `rnd_f32(q)` stays strictly on `q`'s side of every midpoint. If `q = m`, `m`
//! (12 bits, in f32's normal range) is an f32 value and `rnd_f32(q) = q`. This is the classic
//! "24 >= 2 * 11 + 2" result, checked here for the subnormal grid as well. FP16 arithmetic ignores
//! MXCSR's DAZ and FTZ (checked on the Intel host of 2026-12-04: with both set, `vdivph` still
//! kept subnormal operands and results; Rust leaves both off anyway, as the f32 lanes require),
//! and `tests/kernels.rs` sweeps every f16 weight against subnormal, tiny, huge, zero, negative and
//! infinite scales, symmetric and with every zero point.
//!
//! The rest stays in f16: clamp to `[qmin, qmax]` (or `[-16, 16]` with a zero point) by
//! `vmaxph` / `vminph`, which, like `vmaxps` in the f32 lanes, return the bound for a NaN
//! quotient; then `rint` by adding `1.5 * 2^10` (exact to an integer, ties to even, for `|y| <= 512`,
//! its bits `0x6600 + rint(y)`), the zero point added and clamped to `[0, 15]` on those biased
//! integers (exact: all lie in [1520, 1567], where f16's step is 1). The code is the low nibble.
//!
//! # f16: the reciprocal (native sub-path)
//!
//! `vdivph` bounded the native sub-path, so it computes `y = rnd_f16(x / s)` by a product
//! instead: `r = fl(1 / s)` in f32 once per column and call (`f16_operands`), then per 32 lanes
//! `x` widened to f32 (`vcvtph2ps`, exact), `p = fl(x * r)` (`vmulps`, round to nearest even by
//! its embedded rounding) and `y' = rnd_f16(p)` (`vcvtps2ph`, the same); a vector in which some
//! lane's `p` has its 13 low bits within `0x1000 - 4 ..= 0x1000 + 3` takes the division above
//! instead, for all 32 lanes. The rest (clamp, `rint`, zero point, pack) is unchanged.
//!
//! **Why the codes are the same.** Write `q = x / s` (exact) and `u = 2^-24`.
//! *Special operands.* `s = +-0`: `r = +-inf`, so `p = +-inf = q` for finite nonzero or infinite
//! `x`, and `p = NaN = q` for `x = +-0` (0 * inf, 0 / 0). `s = +-inf`: `r = +-0`, `p = q = +-0`
//! (same sign) for finite `x`, `p = q = NaN` for infinite `x`. `s` NaN: `r`, `p`, `q` all NaN.
//! `x` NaN: `p`, `q` NaN; `x = +-inf`, `s` finite nonzero: `p = q = +-inf`; `x = +-0`: `p = q`, a
//! zero. `vcvtps2ph` keeps infinities, zeros and NaNs, and the clamp sends every NaN to the lower
//! bound on both paths (`vmaxph` returns its second operand), whatever its sign and payload; the
//! two zeros give the same code.
//! *Finite nonzero operands.* `|s|` lies in `[2^-24, 65504]`, so `1 / s` is in f32's normal range:
//! `r = (1 / s)(1 + a)`, `|a| <= u`; `|x * r|` lies in `[2^-24 * 2^-16, 65504 * 2^24]`, also
//! normal (no f32 subnormal ever appears, so DAZ and FTZ could not matter): `p = x r (1 + b)`,
//! `|b| <= u`, and `|p - q| <= (2u + u^2) |q|`.
//! *Small quotients.* If `|q| < 2^-14` or `|p| < 2^-14`, both are below `2^-14 (1 + 3u) < 1/2`,
//! so both `rnd_f16` results are at most `1/2` in magnitude and `rint` makes both 0 (ties to
//! even): the same code.
//! *The rest* (`|q|, |p| >= 2^-14`). `rnd_f16` is monotone and constant between consecutive
//! rounding boundaries, which here are the midpoints between neighbouring normal f16 values and
//! 65520 (the overflow threshold; RNE sends it to infinity, `p` and `q` above it both round to
//! infinity). So `y' = y` unless a boundary `m` lies in the closed interval between `q` and `p`.
//! Each `m` has the form `(2k + 1) 2^(e - 11)` with `2^e <= |m| < 2^(e + 1)`, so as an f32 value
//! its 13 low bits are exactly `0x1000` (sign apart), and it lies at least `2^(e - 11)` inside its
//! binade. `q` and `p` are within `(2u + u^2) |q|`, far less, of `m`, so all three share `m`'s
//! binade, whose f32 step is `2^(e - 23)`; then `|p - m| <= |p - q| < (2u + u^2) 2^(e + 1)`,
//! just over 2 steps, so, `p` and `m` both being f32 values of that binade, their bits are at
//! most 2 apart: `p`'s 13 low bits within `0x1000 +- 2`, inside the window above, and the vector
//! takes the division. Otherwise no boundary separates `p` from `q` and `y' = y`; the codes are
//! then equal since they are the same function of `y`.
//!
//! The window's margin (`-4 ..= +3` for the `+-2` needed) makes it a test of one add and one
//! `vptestnmd` per 16 lanes. For f16 operands the product never actually rounds otherwise than
//! the division: `tests/kernels.rs` (`f16_reciprocal_product_rounds_like_the_division`) checks all
//! 2^20 pairs of significands, which, by scaling, is every pair of f16 values with a quotient in
//! f16's normal range. The fallback keeps the proof free of that enumeration; it sends about
//! 2% of the vectors of uniformly spread f16 pairs to the division, and dropping it made the
//! kernel 20% faster in isolation but the pipeline no faster (BENCHMARKS.md, "Issue #20, sixth
//! session: f16 codes without the division").

use crate::float::{FloatFormat, Precision};
use crate::simd::{all_lanes, rint_clamped};
use pulp::Simd;
use std::borrow::Cow;

/// The code bounds of a [`Bits`](crate::Bits) width, splatted once outside the loops.
#[derive(Clone, Copy)]
pub(crate) struct CodeBounds<S: Simd> {
    qmin: S::f32s,
    qmax: S::f32s,
    wide_lo: S::f32s,
    wide_hi: S::f32s,
    zero: S::f32s,
    levels: S::f32s,
}

impl<S: Simd> CodeBounds<S> {
    #[inline(always)]
    pub(crate) fn new(simd: S, bits: crate::Bits) -> Self {
        let wide = bits.levels() + 1.0;
        CodeBounds {
            qmin: simd.splat_f32s(bits.qmin()),
            qmax: simd.splat_f32s(bits.qmax()),
            wide_lo: simd.splat_f32s(-wide),
            wide_hi: simd.splat_f32s(wide),
            zero: simd.splat_f32s(0.0),
            levels: simd.splat_f32s(bits.levels()),
        }
    }
}

/// Whether [`quantize_lanes`] multiplies by the reciprocals on tier `S` in precision `P`.
const fn uses_reciprocals<S: Simd, P: Precision>() -> bool {
    S::F32_LANES > 1 && matches!(P::FORMAT, FloatFormat::BF16)
}

/// The `recip` argument of [`quantize_lanes`] for each column: `1 / s` when `2^-125 <= |s| <= 2^125`,
/// NaN otherwise (zero, tiny, huge or NaN scales, whose lanes then always take the division); the
/// scales themselves, unread, where the division is kept.
pub(crate) fn reciprocals<S: Simd, P: Precision>(scale: &[f32]) -> Cow<'_, [f32]> {
    const LO: f32 = 1.0 / (1u128 << 125) as f32;
    const HI: f32 = (1u128 << 125) as f32;
    if !uses_reciprocals::<S, P>() {
        return Cow::Borrowed(scale);
    }
    scale.iter().map(|&s| if (LO..=HI).contains(&s.abs()) { 1.0 / s } else { f32::NAN }).collect()
}

/// `rnd_P(x / s)`: for bf16 on SIMD tiers `rnd_bf16(x * recip)` when every lane passes the test
/// (module doc), else the division.
#[inline(always)]
fn rounded_quotient<S: Simd, P: Precision>(simd: S, x: S::f32s, s: S::f32s, recip: S::f32s) -> S::f32s {
    if uses_reciprocals::<S, P>() {
        let u: S::u32s = pulp::cast(simd.mul_f32s(x, recip));
        let magnitude = simd.and_u32s(u, simd.splat_u32s(0x7fff_ffff));
        let finite = simd.less_than_u32s(magnitude, simd.splat_u32s(0x7f80_0000));
        let low = simd.and_u32s(simd.sub_u32s(u, simd.splat_u32s(0x8000 - 8)), simd.splat_u32s(0xffff));
        let far = simd.greater_than_u32s(low, simd.splat_u32s(16));
        if all_lanes(simd, simd.and_m32s(finite, far)) {
            return pulp::cast(simd.and_u32s(simd.add_u32s(u, simd.splat_u32s(0x8000)), simd.splat_u32s(0xffff_0000)));
        }
    }
    P::round_simd(simd, simd.div_f32s(x, s))
}

/// The code of each lane as an integer-valued float, exactly ModelOpt's `rtn`:
/// `clip(rint(rnd(x / s)), qmin, qmax)`, or with a zero point `clip(rint(rnd(x / s)) + zp, 0, levels)`
/// (bounds of [`Bits`](crate::Bits)), `recip` the lanes' [`reciprocals`]. The zero-point form
/// clamps `rnd(x / s)` to [-(levels + 1), levels + 1] first, which changes nothing after the final
/// clip (zp is in 0..=levels) and keeps the magic-number rounding in range.
#[inline(always)]
pub(crate) fn quantize_lanes<S: Simd, P: Precision>(
    simd: S,
    bounds: &CodeBounds<S>,
    x: S::f32s,
    s: S::f32s,
    recip: S::f32s,
    zp: Option<S::f32s>,
) -> S::f32s {
    let y = rounded_quotient::<S, P>(simd, x, s, recip);
    match zp {
        None => rint_clamped(simd, y, bounds.qmin, bounds.qmax),
        Some(z) => {
            let q = simd.add_f32s(rint_clamped(simd, y, bounds.wide_lo, bounds.wide_hi), z);
            simd.min_f32s(simd.max_f32s(q, bounds.zero), bounds.levels)
        }
    }
}
