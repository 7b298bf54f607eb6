//! The zero-point range contains zero, and a float16 range that overflows is handled, on every tier
//! bit for bit against the scalar reference (issue 12, faults 1 and 5):
//! - blocks whose values are all positive, all negative, constant, zero or subnormal;
//! - `rnd(hi - lo)` overflowing float16: the scale comes from the f64 range, and is identical to
//!   the numpy formula whenever the float16 difference does not overflow (random pairs);
//! - dequantized values that cannot be represented are refused, naming the block and column;
//! - AWQ-lite skips the alphas whose `w * s` overflows float16, and the per-subgraph float64 path
//!   takes the same zero-including range.

use nibble::awq::{lite_search, subgraph::quantize_f64};
use nibble::kernels::{scales_zero_point_with, unpack_nibbles};
use nibble::quantize_weight::{fake_quantize_with, quantize_weight_with};
use nibble::{reference, Bits, BlockSize, Error, FloatFormat, QuantParams, Tier, WeightData};
use proptest::prelude::*;

const FORMATS: [FloatFormat; 3] = [FloatFormat::F32, FloatFormat::F16, FloatFormat::BF16];

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

fn xorshift(seed: u64) -> impl FnMut() -> f64 {
    let mut s = seed | 1;
    move || {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        (s >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// A column kind: how the values of one column are drawn.
fn column(kind: usize, i: usize, u: f64) -> f64 {
    match kind {
        0 => u * 8.0 - 4.0,     // straddles zero
        1 => 1.5 + u,           // all positive
        2 => -1.5 - u,          // all negative
        3 => 0.25,              // constant positive
        4 => -3.0,              // constant negative
        5 => 0.0,               // zero
        6 => (u - 0.5) * 1e-40, // subnormal (f32)
        7 => 1e-7 * (1.0 + u),  // tiny positive
        8 => {
            if i.is_multiple_of(2) {
                0.0
            } else {
                2.0 + u
            }
        } // zero and positive
        _ => 60000.0 * (2.0 * u - 1.0), // near the float16 range
    }
}

fn data<'a>(
    format: FloatFormat,
    w: &'a [f32],
    h: &'a mut Vec<half::f16>,
    b: &'a mut Vec<half::bf16>,
) -> WeightData<'a> {
    match format {
        FloatFormat::F32 => WeightData::F32(w),
        FloatFormat::F16 => {
            *h = w.iter().map(|&x| half::f16::from_f32(x)).collect();
            WeightData::F16(h)
        }
        FloatFormat::BF16 => {
            *b = w.iter().map(|&x| half::bf16::from_f32(x)).collect();
            WeightData::BF16(b)
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// Scales and zero points of one-sided, constant, zero and subnormal blocks (min and max as
    /// they are, not widened to zero beforehand) on every tier equal the reference's, bit for bit.
    #[test]
    fn scales_of_one_sided_blocks_match_reference(
        fi in 0usize..3,
        eight: bool,
        alpha in prop_oneof![Just(1.0f64), (10u32..=20).prop_map(|k| k as f64 * 0.05)],
        kinds in proptest::collection::vec(0usize..10, 0..40),
        rows in 1usize..6,
        seed: u64,
    ) {
        let format = FORMATS[fi];
        let width = if eight { Bits::Eight } else { Bits::Four };
        let cols = kinds.len();
        let mut u = xorshift(seed);
        let w: Vec<f32> = (0..rows * cols).map(|e| format.round(column(kinds[e % cols], e / cols.max(1), u()) as f32)).collect();
        let (lo, hi) = reference::block_minmax(&w, cols, false);
        let (want_s, want_z) = reference::scales_zero_point(format, width, &lo, &hi, alpha);
        for tier in Tier::available() {
            let (mut s, mut z) = (vec![0.0; cols], vec![0.0; cols]);
            scales_zero_point_with(tier, format, width, &lo, &hi, alpha, &mut s, &mut z).unwrap();
            prop_assert_eq!(bits(&s), bits(&want_s), "scales {:?} {:?}", tier, format);
            prop_assert_eq!(bits(&z), bits(&want_z), "zero points {:?} {:?}", tier, format);
        }
        // The range contains zero: one-sided columns get zp 0 (positive) or about `levels` (negative).
        for c in 0..cols {
            let a = format.constant(alpha);
            if lo[c] > 0.0 && want_s[c] > format.constant(1e-5) {
                prop_assert_eq!(want_z[c], 0.0);
                // The step spans [0, max], not [min, max].
                prop_assert!(want_s[c] * width.levels() >= format.round(hi[c] * a) * 0.99, "{} {}", want_s[c], hi[c]);
            }
            if hi[c] < 0.0 && want_s[c] > format.constant(1e-5) {
                prop_assert!(want_s[c] * width.levels() >= -format.round(lo[c] * a) * 0.99, "{} {}", want_s[c], lo[c]);
            }
            // (-lo / s rounds to levels, or one below it after the dtype's rounding of s.)
            if hi[c] < 0.0 && want_s[c] > format.constant(1e-5) {
                prop_assert!(want_z[c] >= width.levels() - 1.0, "zp {} for a negative column", want_z[c]);
            }
        }
    }

    /// Whole tensors with such columns: `quantize_weight` (axis 0 and 1, 4 and 8 bits) and
    /// `fake_quantize_with` on every tier equal the reference's `find_scales` + `rtn` + `dq_tensor`.
    #[test]
    fn whole_tensors_with_one_sided_blocks_match_reference(
        fi in 0usize..3,
        eight: bool,
        axis in 0usize..2,
        block_i in 0usize..3,
        seed: u64,
    ) {
        let format = FORMATS[fi];
        let width = if eight { Bits::Eight } else { Bits::Four };
        let (r, c) = (70usize, 36usize);
        let mut u = xorshift(seed);
        // Kinds run along the blocked axis's "other" index, so each block is one kind.
        let w: Vec<f32> = (0..r * c)
            .map(|e| {
                let (i, j) = (e / c, e % c);
                let (along, other) = if axis == 0 { (i, j) } else { (j, i) };
                format.round(column(other % 9, along, u()) as f32)
            })
            .collect();
        let block_size = [BlockSize::Blocked(16), BlockSize::Blocked(32), BlockSize::PerChannel][block_i];
        let block = block_size.resolve(if axis == 0 { r } else { c });
        let s = reference::find_scales(format, width, &w, [r, c], block, axis, 1.0, true);
        let q = reference::rtn(format, width, &w, [r, c], &s, block, axis);
        let want = if eight { q.clone() } else { reference::pack(&q) };
        let (mut h, mut b) = (Vec::new(), Vec::new());
        let d = data(format, &w, &mut h, &mut b);
        let params = QuantParams { block_size, axis, zero_point: true, alpha: 1.0, bits: width };
        for tier in Tier::available() {
            let got = quantize_weight_with(tier, d, [r, c], &params).unwrap();
            prop_assert_eq!(&got.packed, &want, "codes {:?} {:?}", tier, format);
            prop_assert_eq!(bits(&got.scale), bits(&s.scale), "scales {:?}", tier);
            let z: Vec<u8> = s.zero_point.as_ref().unwrap().iter().map(|&v| v as u8).collect();
            prop_assert_eq!(got.zero_point.as_ref().unwrap(), &z, "zero points {:?}", tier);
            if axis == 0 {
                let dq = fake_quantize_with(tier, format, &w, [r, c], &params, None).unwrap();
                prop_assert_eq!(bits(&dq), bits(&reference::dq_tensor(format, &q, [r, c], &s, block, 0)));
                // The weight a quantized model computes with, from the stored codes.
                let back = got.dequantize_axis0(format, width, [r, c]).unwrap();
                prop_assert_eq!(bits(&back), bits(&dq), "dequantize_axis0 with zero points {:?}", tier);
                let sym = QuantParams { zero_point: false, ..params };
                let got = quantize_weight_with(tier, d, [r, c], &sym).unwrap();
                let back = got.dequantize_axis0(format, width, [r, c]).unwrap();
                let dq = fake_quantize_with(tier, format, &w, [r, c], &sym, None).unwrap();
                prop_assert_eq!(bits(&back), bits(&dq), "dequantize_axis0 symmetric {:?}", tier);
            }
        }
    }
}

/// No one-sided, constant or zero block saturates any more: every element dequantizes to within
/// half a step (plus the dtype's rounding), where ModelOpt's range put whole blocks at one code.
#[test]
fn one_sided_and_constant_blocks_do_not_saturate() {
    for format in FORMATS {
        let (r, c) = (64usize, 9usize);
        let mut u = xorshift(7);
        let w: Vec<f32> = (0..r * c).map(|e| format.round(column(e % c, e / c, u()) as f32)).collect();
        let s = reference::find_scales(format, Bits::Four, &w, [r, c], 32, 0, 1.0, true);
        let q = reference::rtn(format, Bits::Four, &w, [r, c], &s, 32, 0);
        let dq = reference::dq_tensor(format, &q, [r, c], &s, 32, 0);
        for (e, (&x, &d)) in w.iter().zip(&dq).enumerate() {
            let step = s.scale[(e / c / 32) * c + e % c];
            let tol = step * 0.5 + format.round(x).abs() * 1e-2 + 1e-30;
            assert!((x - d).abs() <= tol, "{format:?} ({}, {}): {x} -> {d} (step {step})", e / c, e % c);
        }
        // Constant columns are reproduced (0.25 and -3.0 are multiples of their step).
        for e in (0..r * c).filter(|e| e % c == 3 || e % c == 4 || e % c == 5) {
            assert_eq!(dq[e], w[e], "{format:?} constant column {}", e % c);
        }
    }
}

/// The numpy formula on the zero-including range, in the dtype after every step (ModelOpt's
/// `find_scales` with `min(min, 0)`, `max(max, 0)`).
fn numpy_scale(format: FloatFormat, lo: f32, hi: f32) -> (f32, f32) {
    let (lo, hi) = (lo.min(0.0), hi.max(0.0));
    let range = format.round(hi - lo).max(format.constant(1e-5));
    let s = format.round(range / 15.0);
    let z = (-(format.round(lo / s).round_ties_even())).clamp(0.0, 15.0) + 0.0;
    (s, z)
}

/// Over many random float16 pairs, the scale and zero point are numpy's formula exactly whenever
/// `rnd(hi - lo)` does not overflow; when it does, the scale is finite (the f64 range rounded
/// once), the zero point in range, and both ends dequantize finitely or are refused.
#[test]
fn float16_range_overflow_changes_only_overflowing_pairs() {
    let mut u = xorshift(5);
    let f16 = FloatFormat::F16;
    let n = 200_000;
    let mut lo = Vec::with_capacity(n);
    let mut hi = Vec::with_capacity(n);
    for i in 0..n {
        // Half the pairs anywhere in the range, half near its ends (where the difference overflows).
        let mag = if i % 2 == 0 { 65504.0 * u() } else { 30000.0 + 35504.0 * u() };
        let a = f16.round((mag * (2.0 * u() - 1.0)) as f32);
        let b = f16.round((65504.0 * (2.0 * u() - 1.0)) as f32);
        lo.push(a.min(b));
        hi.push(a.max(b));
    }
    let (want_s, want_z) = reference::scales_zero_point(f16, Bits::Four, &lo, &hi, 1.0);
    let mut overflowing = 0;
    for i in 0..n {
        let (s, z) = numpy_scale(f16, lo[i], hi[i]);
        if s.is_finite() {
            assert_eq!(want_s[i].to_bits(), s.to_bits(), "pair {} {}", lo[i], hi[i]);
            assert_eq!(want_z[i], z, "pair {} {}", lo[i], hi[i]);
        } else {
            overflowing += 1;
            let exact = (hi[i].max(0.0) as f64 - lo[i].min(0.0) as f64) / 15.0;
            assert_eq!(want_s[i], half::f16::from_f64(exact).to_f32(), "pair {} {}", lo[i], hi[i]);
            assert!((0.0..=15.0).contains(&want_z[i]));
        }
    }
    assert!(overflowing > 1000, "only {overflowing} overflowing pairs drawn");
    for tier in Tier::available() {
        let (mut s, mut z) = (vec![0.0; n], vec![0.0; n]);
        scales_zero_point_with(tier, f16, Bits::Four, &lo, &hi, 1.0, &mut s, &mut z).unwrap();
        assert_eq!(bits(&s), bits(&want_s), "{tier:?}");
        assert_eq!(bits(&z), bits(&want_z), "{tier:?}");
    }
}

/// c10's block: +40000 and -40000 in one float16 block. numpy's range is inf (NaN output); nibble's
/// scale is finite and every value dequantizes finitely. A block whose dequantized values cannot be
/// represented (+-65504: the step rounds outward) is refused with its block and column.
#[test]
fn float16_wide_block_is_quantized_or_refused() {
    let (r, c) = (64usize, 4usize);
    let mut w = vec![0.5f32; r * c];
    w[3 * c] = 40000.0;
    w[9 * c] = -40000.0;
    w[40 * c + 2] = 65504.0;
    w[41 * c + 2] = -65504.0;
    let h: Vec<half::f16> = w.iter().map(|&x| half::f16::from_f32(x)).collect();
    let params =
        QuantParams { block_size: BlockSize::Blocked(32), axis: 0, zero_point: true, alpha: 1.0, bits: Bits::Four };
    for tier in Tier::available() {
        let err = quantize_weight_with(tier, WeightData::F16(&h), [r, c], &params).unwrap_err();
        assert_eq!(
            err,
            Error::DequantizedOverflow { block: 1, column: 2, start: 32, end: 64, format: FloatFormat::F16 },
            "{tier:?}"
        );
        assert!(err.to_string().contains("block 1 (elements 32..64") && err.to_string().contains("65504"), "{err}");
        // Without the +-65504 block: finite.
        let q = quantize_weight_with(tier, WeightData::F16(&h[..32 * c]), [32, c], &params).unwrap();
        assert!(q.scale.iter().all(|s| s.is_finite()), "{tier:?}: {:?}", q.scale);
        let s = reference::find_scales(FloatFormat::F16, Bits::Four, &w[..32 * c], [32, c], 32, 0, 1.0, true);
        assert_eq!(bits(&q.scale), bits(&s.scale));
        let codes = reference::rtn(FloatFormat::F16, Bits::Four, &w[..32 * c], [32, c], &s, 32, 0);
        let dq = reference::dq_tensor(FloatFormat::F16, &codes, [32, c], &s, 32, 0);
        assert!(dq.iter().all(|v| v.is_finite()));
        assert!((dq[3 * c] - 40000.0).abs() <= s.scale[0] && (dq[9 * c] + 40000.0).abs() <= s.scale[0], "{dq:?}");
        let got = unpack_nibbles(&q.packed, 32 * c, false).unwrap();
        assert_eq!(got.iter().map(|&v| v as u8).collect::<Vec<_>>(), codes);
    }
}

/// The float64 per-subgraph quantization takes the same zero-including range: an all-positive
/// block gets zp 0 and `s = max / 15`.
#[test]
fn float64_subgraph_path_contains_zero() {
    let (k, n) = (32usize, 2usize);
    let w: Vec<f64> = (0..k * n)
        .map(|e| if e % n == 0 { 1.5 + (e / n) as f64 * 0.01 } else { -2.0 - (e / n) as f64 * 0.01 })
        .collect();
    let params =
        QuantParams { block_size: BlockSize::Blocked(32), axis: 0, zero_point: true, alpha: 1.0, bits: Bits::Four };
    let q = quantize_f64(FloatFormat::F32, &w, [k, n], &params);
    assert_eq!(q.zero_point.as_deref(), Some(&[0u8, 15][..]));
    assert_eq!(q.scale[0], ((1.5 + 31.0 * 0.01) / 15.0) as f32);
    assert_eq!(q.scale[1], ((2.0 + 31.0 * 0.01) / 15.0) as f32);
    let codes = unpack_nibbles(&q.packed, k * n, false).unwrap();
    for (e, &v) in w.iter().enumerate() {
        let dq = (codes[e] as f64 - [0.0, 15.0][e % n]) * q.scale[e % n] as f64;
        assert!((dq - v).abs() <= q.scale[e % n] as f64 * 0.5 + 1e-6, "{e}: {v} -> {dq}");
    }
}

/// AWQ-lite on a finite float16 weight whose `w * s` overflows for the larger alphas (one huge
/// input channel): those alphas are skipped (loss +inf, listed), the search completes, and the
/// chosen scale gives a finite scaled weight. A NaN weight is still an error.
#[test]
fn awq_lite_skips_alphas_whose_scaled_weight_overflows() {
    let f16 = FloatFormat::F16;
    let (t, k, n) = (32usize, 64usize, 16usize);
    let mut u = xorshift(3);
    let mut w: Vec<f32> = (0..k * n).map(|_| f16.round(((u() - 0.5) * 2000.0) as f32)).collect();
    for j in 0..n {
        w[7 * n + j] = if j % 2 == 0 { 1500.0 } else { -1500.0 };
    }
    let x: Vec<f32> = (0..t * k)
        .map(|e| f16.round(if e % k == 7 { ((u() - 0.5) * 50.0) as f32 } else { ((u() - 0.5) * 0.004) as f32 }))
        .collect();
    let alphas = nibble::awq::lite_alphas(0.1);
    for zero_point in [false, true] {
        let params =
            QuantParams { block_size: BlockSize::Blocked(32), axis: 0, zero_point, alpha: 1.0, bits: Bits::Four };
        let s = lite_search(Tier::best(), f16, &x, &w, [k, n], &params, &alphas).unwrap();
        assert!(!s.skipped.is_empty(), "zero point {zero_point}: no alpha overflowed; losses {:?}", s.losses);
        assert!(s.skipped.iter().all(|&i| s.losses[i] == f64::INFINITY));
        assert!(!s.skipped.contains(&s.best) && s.losses[s.best].is_finite(), "{:?}", s.losses);
        let scaled = nibble::awq::lite::scale_rows(f16, &w, &s.best_scale, n);
        assert!(scaled.iter().all(|v| v.is_finite()));
    }
    // A grid of only overflowing alphas: refused, not a NaN-weight message.
    let params = QuantParams::rtn(BlockSize::Blocked(32));
    let err = lite_search(Tier::best(), f16, &x, &w, [k, n], &params, &[1.0]).unwrap_err();
    assert_eq!(err, Error::ScaledWeightOverflow { format: f16 });
    assert!(err.to_string().contains("overflow float16"), "{err}");
    let mut bad = w.clone();
    bad[5] = f32::NAN;
    let params = QuantParams::rtn(BlockSize::Blocked(32));
    let err = lite_search(Tier::best(), f16, &x, &bad, [k, n], &params, &alphas).unwrap_err();
    assert!(matches!(err, Error::NonFinite { .. }), "{err:?}");
}
