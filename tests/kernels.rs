//! Every kernel on every SIMD tier this CPU has, against the scalar reference, bit for bit
//! (`to_bits`), over random slabs: all column counts 0..=3*16+1 (so every vector body and masked
//! tail of every tier), 0..=5 rows, every start offset within a vector, and values drawn to hit ties
//! at .5, -0.0, subnormals, huge and tiny magnitudes, and all-zero columns.

use nibble::kernels::*;
use nibble::{reference, Bits, FloatFormat, Tier};
use proptest::prelude::*;

const FORMATS: [FloatFormat; 3] = [FloatFormat::F32, FloatFormat::F16, FloatFormat::BF16];
const WIDTHS: [Bits; 2] = [Bits::Four, Bits::Eight];

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

/// One element: a mix of ordinary values, exact ties, signed zeros, subnormals and extremes.
fn element() -> impl Strategy<Value = f32> {
    prop_oneof![
        4 => -8.0f32..8.0,
        2 => (-40i32..40).prop_map(|k| k as f32 * 0.5),
        1 => Just(0.0f32),
        1 => Just(-0.0f32),
        1 => (1u32..0x0080_0000).prop_map(|b| f32::from_bits(b) * if b % 2 == 0 { 1.0 } else { -1.0 }),
        1 => -1.0e30f32..1.0e30,
        1 => -1.0e-30f32..1.0e-30,
        1 => -70000.0f32..70000.0,
        1 => -1.0e-4f32..1.0e-4,
    ]
}

/// A slab `rows x cols` placed at `offset` inside a larger buffer, with values representable in
/// `format`; some columns forced to all zeros.
#[derive(Debug, Clone)]
struct Slab {
    buf: Vec<f32>,
    offset: usize,
    rows: usize,
    cols: usize,
}

impl Slab {
    fn w(&self) -> &[f32] {
        &self.buf[self.offset..self.offset + self.rows * self.cols]
    }
}

fn slab(format: FloatFormat, max_rows: usize) -> impl Strategy<Value = Slab> {
    (0usize..=49, 0usize..=max_rows, 0usize..16).prop_flat_map(move |(cols, rows, offset)| {
        let n = offset + rows * cols;
        (proptest::collection::vec(element(), n), proptest::collection::vec(any::<bool>(), cols.max(1))).prop_map(
            move |(mut buf, zero_cols)| {
                for (i, x) in buf.iter_mut().enumerate() {
                    *x = format.round(*x);
                    if i >= offset && cols > 0 && zero_cols[(i - offset) % cols] && (i - offset) % 7 == 0 {
                        *x = 0.0;
                    }
                }
                Slab { buf, offset, rows, cols }
            },
        )
    })
}

fn alpha() -> impl Strategy<Value = f64> {
    prop_oneof![Just(1.0), (10u32..=20).prop_map(|k| k as f64 * 0.05), 0.01f64..1.5]
}

fn finite(v: &[f32]) -> bool {
    v.iter().all(|x| x.is_finite())
}

/// The scales (and zero points) of the slab `w` (`cols` columns) with clip ratio `a`, as the
/// pipeline computes them (non-finite minima and maxima taken as 0).
fn slab_scales(
    format: FloatFormat,
    width: Bits,
    w: &[f32],
    cols: usize,
    a: f64,
    zp: bool,
) -> (Vec<f32>, Option<Vec<f32>>) {
    if zp {
        let (lo, hi) = reference::block_minmax(w, cols, false);
        let lo: Vec<f32> = lo.iter().map(|&x| if x.is_finite() { x } else { 0.0 }).collect();
        let hi: Vec<f32> = hi.iter().map(|&x| if x.is_finite() { x } else { 0.0 }).collect();
        let (s, z) = reference::scales_zero_point(format, width, &lo, &hi, a);
        (s, Some(z))
    } else {
        (reference::scales_symmetric(format, width, &reference::block_absmax(w, cols), a), None)
    }
}

/// f16 values (exact for values of the format).
fn f16s(v: &[f32]) -> Vec<half::f16> {
    v.iter().map(|&x| half::f16::from_f32(x)).collect()
}

/// Which sub-path `quantize_packed_f16_with(tier, native, ..)` takes on this CPU (for messages).
fn f16_path(tier: Tier, native: bool) -> &'static str {
    match native && tier == Tier::Avx512 && native_f16_available() {
        true => "native AVX512-FP16",
        false => "f32 lanes",
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn block_absmax_matches_reference(s in slab(FloatFormat::F32, 5)) {
        let want = reference::block_absmax(s.w(), s.cols);
        for tier in Tier::available() {
            let mut got = vec![1.0; s.cols];
            block_absmax_with(tier, s.w(), s.cols, &mut got).unwrap();
            prop_assert_eq!(bits(&got), bits(&want), "{:?}", tier);
        }
    }

    #[test]
    fn block_minmax_matches_reference(s in slab(FloatFormat::F32, 5), include_zero: bool) {
        let (lo, hi) = reference::block_minmax(s.w(), s.cols, include_zero);
        for tier in Tier::available() {
            let (mut a, mut b) = (vec![1.0; s.cols], vec![1.0; s.cols]);
            block_minmax_with(tier, s.w(), s.cols, include_zero, &mut a, &mut b).unwrap();
            prop_assert_eq!(bits(&a), bits(&lo), "min {:?}", tier);
            prop_assert_eq!(bits(&b), bits(&hi), "max {:?}", tier);
        }
    }

    #[test]
    fn scales_match_reference(s in slab(FloatFormat::F32, 4), a in alpha(), fi in 0usize..3, bi in 0usize..2) {
        let (format, width) = (FORMATS[fi], WIDTHS[bi]);
        let rows: Vec<f32> = s.w().iter().map(|&x| format.round(x)).collect();
        prop_assume!(finite(&rows));
        let amax = reference::block_absmax(&rows, s.cols);
        let (lo, hi) = reference::block_minmax(&rows, s.cols, true);
        let want = reference::scales_symmetric(format, width, &amax, a);
        let (want_s, want_z) = reference::scales_zero_point(format, width, &lo, &hi, a);
        for tier in Tier::available() {
            let mut got = vec![0.0; s.cols];
            scales_symmetric_with(tier, format, width, &amax, a, &mut got).unwrap();
            prop_assert_eq!(bits(&got), bits(&want), "symmetric {:?} {:?}", tier, format);
            let (mut gs, mut gz) = (vec![0.0; s.cols], vec![0.0; s.cols]);
            scales_zero_point_with(tier, format, width, &lo, &hi, a, &mut gs, &mut gz).unwrap();
            prop_assert_eq!(bits(&gs), bits(&want_s), "zp scale {:?} {:?}", tier, format);
            prop_assert_eq!(bits(&gz), bits(&want_z), "zp {:?} {:?}", tier, format);
        }
    }

    /// Wide rows (64..=300 columns), so the x86 tiers' auto-vectorized f32 bodies run their
    /// unrolled main loops (32 or 64 lanes a step), not only their tails.
    #[test]
    fn quantize_wide_rows_match_reference(
        cols in 64usize..=300,
        rows in 1usize..=3,
        seed in proptest::collection::vec(element(), 1..=900),
        bi in 0usize..2,
        zp: bool,
    ) {
        let width = WIDTHS[bi];
        let w: Vec<f32> = (0..rows * cols).map(|i| seed[i % seed.len()] * (1.0 + (i % 13) as f32 * 0.01)).collect();
        prop_assume!(finite(&w));
        let (scale, zero) = if zp {
            let (lo, hi) = reference::block_minmax(&w, cols, false);
            let (s, z) = reference::scales_zero_point(FloatFormat::F32, width, &lo, &hi, 1.0);
            (s, Some(z))
        } else {
            (reference::scales_symmetric(FloatFormat::F32, width, &reference::block_absmax(&w, cols), 1.0), None)
        };
        let zref = zero.as_deref();
        let want_q = reference::quantize(FloatFormat::F32, width, &w, cols, &scale, zref);
        for tier in Tier::available() {
            let mut q = vec![0xAAu8; w.len()];
            quantize_with(tier, FloatFormat::F32, width, &w, cols, &scale, zref, &mut q).unwrap();
            prop_assert_eq!(&q, &want_q, "quantize {:?}", tier);
            if cols % 2 == 0 && width == Bits::Four {
                let mut packed = vec![0x33u8; w.len() / 2];
                quantize_packed_with(tier, FloatFormat::F32, &w, cols, &scale, zref, &mut packed).unwrap();
                prop_assert_eq!(&packed, &reference::pack(&want_q), "quantize_packed {:?}", tier);
            }
        }
    }

    #[test]
    fn quantize_dequantize_qdq_match_reference(
        fi in 0usize..3,
        bi in 0usize..2,
        s0 in slab(FloatFormat::F32, 5),
        a in alpha(),
        zp: bool,
    ) {
        let (format, width) = (FORMATS[fi], WIDTHS[bi]);
        let w: Vec<f32> = s0.w().iter().map(|&x| format.round(x)).collect();
        prop_assume!(finite(&w));
        let cols = s0.cols;
        // Realistic scales from the slab itself, and (alpha < 1) clipped ones.
        let (scale, zero) = slab_scales(format, width, &w, cols, a, zp);
        let zref = zero.as_deref();
        let want_q = reference::quantize(format, width, &w, cols, &scale, zref);
        let want_dq = reference::dequantize(format, &want_q, cols, &scale, zref);
        let want_err: Vec<f32> = w.iter().zip(&want_dq).map(|(x, d)| x - d).collect();
        for tier in Tier::available() {
            let mut q = vec![0xAAu8; w.len()];
            quantize_with(tier, format, width, &w, cols, &scale, zref, &mut q).unwrap();
            prop_assert_eq!(&q, &want_q, "quantize {:?} {:?}", tier, format);
            if cols % 2 == 0 && width == Bits::Four {
                let mut packed = vec![0x33u8; w.len() / 2];
                quantize_packed_with(tier, format, &w, cols, &scale, zref, &mut packed).unwrap();
                prop_assert_eq!(&packed, &reference::pack(&want_q), "quantize_packed {:?} {:?}", tier, format);
                if format == FloatFormat::F16 {
                    for native in [false, true] {
                        let mut packed = vec![0x33u8; w.len() / 2];
                        quantize_packed_f16_with(tier, native, &f16s(&w), cols, &scale, zref, &mut packed).unwrap();
                        let path = f16_path(tier, native);
                        prop_assert_eq!(&packed, &reference::pack(&want_q), "quantize_packed f16 {:?} {}", tier, path);
                    }
                }
            }
            let mut dq = vec![0.0; w.len()];
            dequantize_with(tier, format, &q, cols, &scale, zref, &mut dq).unwrap();
            prop_assert_eq!(bits(&dq), bits(&want_dq), "dequantize {:?} {:?}", tier, format);
            let mut fused = vec![0.0; w.len()];
            qdq_error_with(tier, format, width, &w, cols, &scale, zref, QdqOutput::Dequantized, &mut fused).unwrap();
            prop_assert_eq!(bits(&fused), bits(&want_dq), "qdq {:?} {:?}", tier, format);
            qdq_error_with(tier, format, width, &w, cols, &scale, zref, QdqOutput::Error, &mut fused).unwrap();
            prop_assert_eq!(bits(&fused), bits(&want_err), "qdq error {:?} {:?}", tier, format);
        }
    }

    #[test]
    fn pack_matches_reference(codes in proptest::collection::vec(any::<u8>(), 0..300), offset in 0usize..64) {
        let offset = offset.min(codes.len());
        let codes = &codes[offset..];
        let want = reference::pack(codes);
        for tier in Tier::available() {
            let mut out = vec![0x55; codes.len().div_ceil(2)];
            pack_nibbles_with(tier, codes, &mut out).unwrap();
            prop_assert_eq!(&out, &want, "{:?}", tier);
        }
        let signed: Vec<i8> = codes.iter().map(|&b| ((b << 4) as i8) >> 4).collect();
        prop_assert_eq!(unpack_nibbles(&want, codes.len(), true).unwrap(), signed);
    }

    #[test]
    fn block_dot_matches_reference(fi in 0usize..3, rows in 0usize..200, cols in 0usize..150, t in 1usize..10, seed: u64) {
        let format = FORMATS[fi];
        let mut s = seed | 1;
        let mut next = || { s ^= s << 13; s ^= s >> 7; s ^= s << 17; format.round(((s >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 4.0) };
        let x: Vec<f32> = (0..t * rows).map(|_| next()).collect();
        let w: Vec<f32> = (0..rows * cols).map(|_| next()).collect();
        let want = reference::block_dot(format, &x, &w, [rows, cols], t);
        for tier in Tier::available() {
            let mut got = vec![0.0; t * cols];
            block_dot_with(tier, format, &x, &w, [rows, cols], &mut got).unwrap();
            prop_assert_eq!(bits(&got), bits(&want), "{:?} {:?} rows {}", tier, format, rows);
        }
    }

    #[test]
    fn awq_elementwise_match_reference(
        fi in 0usize..3,
        s0 in slab(FloatFormat::F32, 5),
        s1 in slab(FloatFormat::F32, 5),
        seed in proptest::collection::vec(element(), 6 + 49),
    ) {
        let format = FORMATS[fi];
        let cols = s0.cols;
        let rows = if cols == 0 { 0 } else { s0.rows };
        let w: Vec<f32> = s0.w().iter().map(|&x| format.round(x)).collect();
        // Per-row factors and per-column divisors (zeros and huge values included).
        let s = &seed[..rows];
        let d = &seed[6..6 + cols];
        let (want_scaled, want_finite) = reference::scale_rows(format, &w, s, cols);
        let other: Vec<f32> = s1.buf.iter().chain(&w).take(w.len()).copied().collect();
        let want_err = reference::unscaled_error(&other, &w, s, cols);
        let want_div = if cols > 0 { reference::divide_columns(&w, d) } else { vec![] };
        for tier in Tier::available() {
            let mut got = vec![f32::NAN; w.len()];
            let finite = scale_rows_with(tier, format, &w, s, cols, &mut got).unwrap();
            prop_assert_eq!(bits(&got), bits(&want_scaled), "scale_rows {:?} {:?}", tier, format);
            prop_assert_eq!(finite, want_finite, "scale_rows finite {:?} {:?}", tier, format);
            let mut got = other.clone();
            unscaled_error_with(tier, &mut got, &w, s, cols).unwrap();
            prop_assert_eq!(bits(&got), bits(&want_err), "unscaled_error {:?}", tier);
            if cols > 0 {
                let mut got = vec![f32::NAN; w.len()];
                divide_columns_with(tier, &w, d, &mut got).unwrap();
                prop_assert_eq!(bits(&got), bits(&want_div), "divide_columns {:?}", tier);
            }
        }
    }

    #[test]
    fn qdq_unscaled_error_matches_reference(
        fi in 0usize..3,
        bi in 0usize..2,
        s0 in slab(FloatFormat::F32, 5),
        t in proptest::collection::vec(element(), 5),
        a in alpha(),
        zp: bool,
    ) {
        let (format, width) = (FORMATS[fi], WIDTHS[bi]);
        let w: Vec<f32> = s0.w().iter().map(|&x| format.round(x)).collect();
        let cols = s0.cols;
        let rows = if cols == 0 { 0 } else { s0.rows };
        let t: Vec<f32> = t[..rows].iter().map(|&x| format.round(x)).collect();
        // The scales of the scaled slab, as AWQ-lite computes them (finite slabs only, as there).
        let (x, x_finite) = reference::scale_rows(format, &w, &t, cols);
        prop_assume!(x_finite);
        let (scale, zero) = slab_scales(format, width, &x, cols, a, zp);
        let zref = zero.as_deref();
        let want = reference::qdq_unscaled_error(format, width, &w, cols, &t, &scale, zref);
        for tier in Tier::available() {
            let mut got = vec![f32::NAN; w.len()];
            qdq_unscaled_error_with(tier, format, width, &w, cols, &t, &scale, zref, &mut got).unwrap();
            prop_assert_eq!(bits(&got), bits(&want), "qdq_unscaled_error {:?} {:?} {:?}", tier, format, width);
        }
    }

    #[test]
    fn sum_f64_matches_reference(
        a in proptest::collection::vec(element(), 0..300),
        b in proptest::collection::vec(element(), 300),
    ) {
        let b = &b[..a.len()];
        let forms: [fn(f64, f64) -> f64; 3] = [|p, q| p * q, |p, _| p * p, |p, q| (p - q) * (p - q)];
        for (i, f) in forms.into_iter().enumerate() {
            let want = reference::sum_f64(&a, b, f);
            for tier in Tier::available() {
                let got = sum_f64_with(tier, &a, b, f).unwrap();
                prop_assert_eq!(got.to_bits(), want.to_bits(), "sum_f64 form {} {:?}", i, tier);
            }
        }
    }

    #[test]
    fn rounding_matches_half(raw in proptest::collection::vec(any::<u32>(), 0..70), fi in 0usize..3) {
        let format = FORMATS[fi];
        let mut values: Vec<f32> = raw.iter().map(|&b| f32::from_bits(b)).filter(|x| !x.is_nan()).collect();
        let want: Vec<f32> = values.iter().map(|&x| format.round(x)).collect();
        for tier in Tier::available() {
            let mut got = values.clone();
            round_to_format_with(tier, format, &mut got).unwrap();
            prop_assert_eq!(bits(&got), bits(&want), "{:?} {:?}", tier, format);
        }
        values.clear();
    }
}

/// The rounding boundaries that random bit patterns rarely hit.
#[test]
fn rounding_edges_match_half() {
    let mut edges = vec![
        65504.0f32,
        65519.99,
        65520.0,
        65536.0,
        f32::MAX,
        f32::INFINITY,
        6.1035156e-5,
        5.9604645e-8,
        2.9802322e-8,
        2.9802326e-8,
        1.0e-5,
        1.0,
        1.5,
        2049.0,
        3.3895314e38,
        3.3961776e38,
    ];
    edges.extend((0..2000).map(|i| f32::from_bits(0x3870_0000 + i * 0x1000)));
    edges.extend((0..1216).map(|i| f32::from_bits(0x3380_0000 + i * 0x0010_0000)));
    let all: Vec<f32> = edges
        .iter()
        .flat_map(|&x| [x, -x, f32::from_bits(x.to_bits() + 1), f32::from_bits(x.to_bits().saturating_sub(1))])
        .filter(|x| !x.is_nan())
        .collect();
    for format in FORMATS {
        let want: Vec<f32> = all.iter().map(|&x| format.round(x)).collect();
        for tier in Tier::available() {
            let mut got = all.clone();
            round_to_format_with(tier, format, &mut got).unwrap();
            assert_eq!(bits(&got), bits(&want), "{tier:?} {format:?}");
        }
    }
}

/// A NaN or infinity anywhere in a column makes that column's statistics non-finite on every tier.
#[test]
fn non_finite_values_show_in_statistics() {
    for bad in [f32::NAN, -f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
        for cols in [1usize, 7, 16, 17, 33] {
            for row in 0..3 {
                let mut w = vec![0.5f32; 3 * cols];
                let col = cols / 2;
                w[row * cols + col] = bad;
                for tier in Tier::available() {
                    let mut amax = vec![0.0; cols];
                    block_absmax_with(tier, &w, cols, &mut amax).unwrap();
                    assert!(!amax[col].is_finite(), "{tier:?} {bad} absmax");
                    assert!(amax.iter().enumerate().all(|(c, a)| c == col || *a == 0.5));
                    let (mut lo, mut hi) = (vec![0.0; cols], vec![0.0; cols]);
                    block_minmax_with(tier, &w, cols, false, &mut lo, &mut hi).unwrap();
                    assert!(!lo[col].is_finite() || !hi[col].is_finite(), "{tier:?} {bad} minmax");
                }
            }
        }
    }
}

/// Wrong lengths are errors naming the buffer, not panics.
#[test]
fn length_mismatches_are_errors() {
    let w = vec![1.0f32; 10];
    let mut out = vec![0.0f32; 3];
    assert!(matches!(block_absmax(&w, 3, &mut out), Err(nibble::Error::LengthMismatch { .. })));
    let mut out4 = vec![0.0f32; 4];
    assert!(block_absmax(&w[..8], 2, &mut out4).is_err());
    let mut codes = vec![0u8; 9];
    assert!(quantize(FloatFormat::F32, Bits::Four, &w, 5, &[1.0; 5], None, &mut codes).is_err());
    let mut packed = vec![0u8; 4];
    assert!(pack_nibbles(&[1, 2, 3, 4, 5, 6, 7, 8, 9], &mut packed).is_err());
    let mut ten = vec![0.0f32; 10];
    assert!(scale_rows(FloatFormat::F32, &w, &[1.0; 3], 5, &mut ten).is_err());
    assert!(scale_rows(FloatFormat::F32, &w, &[1.0; 2], 5, &mut out).is_err());
    assert!(unscaled_error(&mut ten, &w, &[1.0; 5], 5).is_err());
    assert!(divide_columns(&w, &[1.0; 3], &mut ten).is_err());
    assert!(sum_f64(&w, &w[1..], |p, q| p * q).is_err());
}

/// Widening every f16 bit pattern (and every bf16 one) gives `half`'s exact conversion on every tier,
/// at every length (vector bodies and tails) and output offset (the AVX-512 body starts at the
/// first 64-byte aligned output element).
#[test]
fn widen_matches_half_for_every_bit_pattern() {
    let all: Vec<u16> = (0..=u16::MAX).collect();
    let f16s: Vec<half::f16> = all.iter().map(|&b| half::f16::from_bits(b)).collect();
    let bf16s: Vec<half::bf16> = all.iter().map(|&b| half::bf16::from_bits(b)).collect();
    let same = |a: f32, b: f32| a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan());
    for tier in Tier::available() {
        for len in [0usize, 1, 15, 16, 17, 33, all.len()] {
            for off in [0usize, 1, 7, 15] {
                let mut buf = vec![0.0f32; off + len];
                let out = &mut buf[off..];
                widen_f16_with(tier, &f16s[..len], out).unwrap();
                assert!(out.iter().zip(&f16s).all(|(&o, h)| same(o, h.to_f32())), "f16 {tier:?} len {len} off {off}");
            }
        }
    }
    let mut out = vec![0.0f32; all.len()];
    widen_bf16(&bf16s, &mut out).unwrap();
    assert!(out.iter().zip(&bf16s).all(|(&o, h)| same(o, h.to_f32())), "bf16");
}

/// `x` moved by `d` steps of `format` (its bit pattern plus `d`; `x` finite and nonzero).
fn nudge(format: FloatFormat, x: f32, d: i32) -> f32 {
    match format {
        FloatFormat::F32 => f32::from_bits(x.to_bits().wrapping_add_signed(d)),
        FloatFormat::F16 => {
            half::f16::from_bits(half::f16::from_f32(x).to_bits().wrapping_add_signed(d as i16)).to_f32()
        }
        FloatFormat::BF16 => {
            half::bf16::from_bits(half::bf16::from_f32(x).to_bits().wrapping_add_signed(d as i16)).to_f32()
        }
    }
}

/// Quotients `x / s` built next to the boundaries of the roundings, where a reciprocal product can
/// round the other way than the division (the bf16 fast path of `kernels::code` must then take the
/// division): `x = (k + 0.5) s` for k in -9..=9, nudged by -3..=3 steps of the format (format and
/// plain f32 scales), and `x / s` within -3..=3 f32 steps of the midpoint between k + 0.5 and its
/// neighbour in the format towards the odd integer (`s` an f32 chosen for `x`). One column per pair; every format, width, tier, symmetric and zero
/// point, bit for bit against the reference. The data must include pairs whose codes a plain
/// reciprocal product gets wrong, or this test could not fail.
#[test]
fn quotients_at_rounding_boundaries_match_reference() {
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    let mut rand = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        (seed >> 40) as f32 / (1u64 << 24) as f32
    };
    for format in FORMATS {
        let mut pairs: Vec<(f32, f32)> = Vec::new();
        for k in -9i32..=9 {
            for d in -3..=3 {
                for plain_scale in [false, true, false, true] {
                    let s = 0.001 + rand() * 0.2;
                    let s = if plain_scale { s } else { format.round(s) };
                    pairs.push((nudge(format, format.round((k as f32 + 0.5) * s), d), s));
                }
                // The midpoint m between k + 0.5 and its neighbour on the side of the odd integer
                // (where a quotient rounding to the neighbour instead of k + 0.5 changes the code).
                let y = k as f32 + 0.5;
                let odd = if k % 2 == 0 { k as f32 + 1.0 } else { k as f32 };
                let m = (y + nudge(format, y, if (odd > y) == (y > 0.0) { 1 } else { -1 })) / 2.0;
                for _ in 0..4 {
                    let x = format.round((0.05 + rand()) * if k < 0 { -1.0 } else { 1.0 });
                    pairs.push((x, f32::from_bits((x / m).to_bits().wrapping_add_signed(d))));
                }
            }
        }
        let pairs: Vec<(f32, f32)> = pairs.into_iter().filter(|(x, s)| x.is_finite() && *s != 0.0).collect();
        let naive_wrong = pairs
            .iter()
            .filter(|&&(x, s)| format.round(x / s).round_ties_even() != format.round(x * (1.0 / s)).round_ties_even())
            .count();
        assert!(naive_wrong >= 5, "{format:?}: {naive_wrong} pairs where a reciprocal product rounds differently");
        // One row of 16 columns (a full vector on every tier) per pair: the pair in column i % 16,
        // ordinary quotients (`x / 1.0`) in the others, so a lane alone decides its vector's path.
        let cols = 16;
        for (i, &(x, s)) in pairs.iter().enumerate() {
            let w: Vec<f32> = (0..cols).map(|j| if j == i % cols { x } else { format.round(0.3 * j as f32) }).collect();
            let scale: Vec<f32> = (0..cols).map(|j| if j == i % cols { s } else { 1.0 }).collect();
            let w = &w[..];
            for width in WIDTHS {
                let zp: Vec<f32> = (0..cols).map(|j| ((j * 7) as f32) % (width.levels() + 1.0)).collect();
                for zref in [None, Some(&zp[..])] {
                    let want_q = reference::quantize(format, width, w, cols, &scale, zref);
                    let want_dq = reference::dequantize(format, &want_q, cols, &scale, zref);
                    for tier in Tier::available() {
                        let mut q = vec![0xAAu8; w.len()];
                        quantize_with(tier, format, width, w, cols, &scale, zref, &mut q).unwrap();
                        assert_eq!(q, want_q, "quantize {tier:?} {format:?} {width:?} zp {}", zref.is_some());
                        if width == Bits::Four {
                            let mut packed = vec![0x33u8; w.len() / 2];
                            quantize_packed_with(tier, format, w, cols, &scale, zref, &mut packed).unwrap();
                            assert_eq!(packed, reference::pack(&want_q), "quantize_packed {tier:?} {format:?}");
                            if format == FloatFormat::F16 {
                                for native in [false, true] {
                                    quantize_packed_f16_with(tier, native, &f16s(w), cols, &scale, zref, &mut packed)
                                        .unwrap();
                                    let path = f16_path(tier, native);
                                    assert_eq!(packed, reference::pack(&want_q), "quantize_packed f16 {tier:?} {path}");
                                }
                            }
                        }
                        let mut dq = vec![0.0; w.len()];
                        qdq_error_with(tier, format, width, w, cols, &scale, zref, QdqOutput::Dequantized, &mut dq)
                            .unwrap();
                        assert_eq!(bits(&dq), bits(&want_dq), "qdq {tier:?} {format:?} {width:?}");
                    }
                }
            }
        }
    }
}

/// Every f16 bit pattern (NaN, infinities, subnormals, both zeros) as a weight, against f16 scales
/// from the smallest subnormal to the largest finite value (the clip minimum 1e-5 and its
/// fifteenth, quotients that overflow or underflow f16, negative scales, zero and infinity), plus
/// random ones, through [`check_every_f16_weight`]. 40 columns: one vector of 32 f16 lanes and a
/// tail.
#[test]
fn f16_codes_for_every_f16_weight_match_reference() {
    let mut scales: Vec<f32> = [
        0x0001u16, 0x0002, 0x0003, 0x01ff, 0x03ff, 0x0400, 0x0401, 0x000b, 0x00a8, 0x3c00, 0x3c01, 0x3bff, 0x3800,
        0x4000, 0x4700, 0x2c00, 0x7bff, 0x70e4, 0x7c00, 0x0000, 0x8000, 0xbc00, 0xa1b2, 0xfc00,
    ]
    .iter()
    .map(|&b| half::f16::from_bits(b).to_f32())
    .collect();
    scales.push(FloatFormat::F16.constant(1e-5));
    scales.push(FloatFormat::F16.round(FloatFormat::F16.constant(1e-5) / 15.0));
    let mut seed = 0x2545_f491_4f6c_dd1du64;
    while scales.len() < 40 {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        // Positive finite f16 values of every exponent.
        scales.push(half::f16::from_bits((seed % 0x7bff) as u16 + 1).to_f32());
    }
    check_every_f16_weight(&scales);
}

/// Every f16 bit pattern as a weight against the scales that test the native sub-path's
/// reciprocal (`kernels::code`, "f16: the reciprocal") hardest, through [`check_every_f16_weight`]:
/// significands whose products `fl(x * fl(1 / s))` land nearest the f16 rounding midpoints (found
/// by a scan of all 2^20 significand pairs, at several exponents and signs), odd significands
/// (3, 5, ..., 15 and 2047) whose reciprocals are inexact and whose quotients hit half-integers
/// and f16 values exactly, powers of two (exact reciprocals), subnormal scales, the largest and
/// zero and infinite scales, and `f16(x / (k + 0.5))` for random `x` and `k` in 0..16 (quotients
/// near the ties of `rint`). 72 columns (two vectors of 32 f16 lanes and a tail), then each scale
/// again beside a neutral scale 1 (`x * 1` is never near a midpoint): one lane near a midpoint
/// sends its whole vector to the division, which would hide a wrong product in the other lanes.
#[test]
fn f16_codes_for_every_f16_weight_at_midpoint_scales_match_reference() {
    let mut scales: Vec<f32> = [
        0x3f7bu16, 0x2ee3, 0x4f0d, 0x1ea7, 0xbecf, 0x3323, 0x0fc5, 0x5fc1, 0x4200, 0x4500, 0x4700, 0x4880, 0x4980,
        0xca80, 0x4b80, 0x3a00, 0x2e00, 0x3bff, 0x0001, 0x0400, 0x3800, 0x3c00, 0x4c00, 0x7800, 0x0003, 0x0155, 0x03ff,
        0x8007, 0x7bff, 0xfbff, 0x0000, 0x8000, 0x7c00, 0xfc00,
    ]
    .iter()
    .map(|&b| half::f16::from_bits(b).to_f32())
    .collect();
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    while scales.len() < 72 {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        // x a positive normal f16 below 256, k + 0.5 in 0.5..16.
        let x = half::f16::from_bits((seed % 0x5800) as u16 + 0x0400).to_f32();
        let k = ((seed >> 32) % 16) as f32;
        let s = FloatFormat::F16.round(x / (k + 0.5));
        if s.is_finite() && s != 0.0 {
            scales.push(s);
        }
    }
    check_every_f16_weight(&scales);
    for &s in &scales {
        check_every_f16_weight(&[s, 1.0]);
    }
}

/// Every f16 bit pattern (one row each) against `scales` (one column each), symmetric and with
/// every zero point 0..=15 in every column, through `quantize_packed_f16_with` on every tier and
/// both sub-paths: against the scalar reference bit for bit wherever the quotient `x / s` is not
/// NaN (the reference and the kernels give NaN different codes; the pipeline never divides 0 / 0
/// or by a NaN), and the native sub-path against the f32 lanes of the AVX-512 tier everywhere, NaN
/// quotients included. Prints which path ran.
fn check_every_f16_weight(scales: &[f32]) {
    let native = native_f16_available();
    eprintln!(
        "f16 codes: native AVX512-FP16 sub-path {}",
        if native { "available: tested on the avx512 tier" } else { "unavailable on this CPU: f32 lanes only" }
    );
    let cols = scales.len();
    let w: Vec<f32> =
        (0..=u16::MAX).flat_map(|b| std::iter::repeat_n(half::f16::from_bits(b).to_f32(), cols)).collect();
    let w16 = f16s(&w);
    assert!(w16.iter().zip(&w).all(|(h, x)| h.to_f32().to_bits() == x.to_bits() || x.is_nan()));
    // Bytes whose two quotients are both not NaN.
    let defined: Vec<bool> = w
        .chunks_exact(2)
        .enumerate()
        .map(|(i, x)| (0..2).all(|h| !(x[h] / scales[(2 * i + h) % cols]).is_nan()))
        .collect();
    let nan_bytes = defined.iter().filter(|&&d| !d).count();
    assert!(nan_bytes > 0 && nan_bytes < defined.len() / 10, "{nan_bytes} bytes with a NaN quotient");
    for k in 0..=16 {
        // k = 16: symmetric; else zero point (c * 5 + k) % 16 in column c.
        let zp: Vec<f32> = (0..cols).map(|c| ((c * 5 + k) % 16) as f32).collect();
        let zref = (k < 16).then_some(&zp[..]);
        let want = reference::pack(&reference::quantize(FloatFormat::F16, Bits::Four, &w, cols, scales, zref));
        let mut lanes_avx512 = None;
        for tier in Tier::available() {
            for native in [false, true] {
                let mut packed = vec![0x33u8; w.len() / 2];
                quantize_packed_f16_with(tier, native, &w16, cols, scales, zref, &mut packed).unwrap();
                let path = f16_path(tier, native);
                let bad = (0..want.len()).find(|&i| defined[i] && packed[i] != want[i]);
                if let Some(i) = bad {
                    let (row, col) = (2 * i / cols, 2 * i % cols);
                    panic!(
                        "{tier:?} {path} zp {}: byte {i} (x {:#06x}, scales {} {}) {:#04x} vs reference {:#04x}",
                        zref.is_some(),
                        row,
                        scales[col],
                        scales[col + 1],
                        packed[i],
                        want[i]
                    );
                }
                if tier == Tier::Avx512 {
                    match lanes_avx512.take() {
                        None => lanes_avx512 = Some(packed),
                        Some(lanes) => {
                            assert!(lanes == packed, "{path} differs from the f32 lanes zp {}", zref.is_some())
                        }
                    }
                }
            }
        }
    }
}

/// The fact behind the remark at the end of `kernels::code`'s "f16: the reciprocal": for every
/// pair of f16 significands (x and s in [1, 2), so x / s in (1/2, 2), both binades; every pair of
/// f16 values whose quotient is in f16's normal range is one of these times a power of two),
/// `rnd_f16(fl(x * fl(1 / s)))` equals `rnd_f16(x / s)` (the f64 quotient, correctly rounded,
/// then rounded to f16: no double-rounding error, 53 >= 2 * 11 + 2). So for f16 operands the
/// native sub-path's fallback to the division never changes a result; it is there for the proof.
#[test]
fn f16_reciprocal_product_rounds_like_the_division() {
    let mut differ = 0;
    for xs in 1024u16..2048 {
        for ss in 1024u16..2048 {
            let (x, s) = (f32::from(xs) / 1024.0, f32::from(ss) / 1024.0);
            let product = half::f16::from_f32(x * (1.0 / s));
            let division = half::f16::from_f64(f64::from(x) / f64::from(s));
            differ += usize::from(product.to_bits() != division.to_bits());
        }
    }
    assert_eq!(differ, 0, "pairs whose product rounds otherwise than the division");
}

/// The native f16 sub-path is taken exactly when the CPU has AVX512-FP16 (and AVX-512): prints
/// which path the f16 tests above ran.
#[test]
fn f16_native_sub_path_follows_the_cpu() {
    #[cfg(target_arch = "x86_64")]
    let has = std::arch::is_x86_feature_detected!("avx512fp16") && Tier::Avx512.is_available();
    #[cfg(not(target_arch = "x86_64"))]
    let has = false;
    assert_eq!(native_f16_available(), has);
    eprintln!("f16 codes on the avx512 tier: {}", f16_path(Tier::Avx512, true));
}
