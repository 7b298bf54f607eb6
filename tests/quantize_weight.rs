//! `quantize_weight` and `fake_quantize_with` on whole tensors wide enough to be split into column
//! stripes (uneven last stripe, odd widths kept whole) equal the scalar reference's `find_scales` +
//! `rtn` + packing (+ `dq_tensor`), bit for bit, on every tier: f32/f16/bf16, 4 and 8 bits,
//! symmetric and zero point, axis 0 and 1, blocked and per channel.

use nibble::quantize_weight::{fake_quantize_with, quantize_weight_with};
use nibble::{reference, Bits, BlockSize, FloatFormat, QuantParams, Tier, WeightData};
use proptest::prelude::*;

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    #[test]
    fn whole_tensors_match_reference(
        shape_i in 0usize..6,
        block_i in 0usize..3,
        fi in 0usize..3,
        eight: bool,
        zero_point: bool,
        axis in 0usize..2,
        seed: u64,
    ) {
        let [r, c] = [[256, 1040], [200, 2050], [130, 517], [128, 1030], [64, 4100], [40, 33]][shape_i];
        let block_size = [BlockSize::Blocked(32), BlockSize::Blocked(128), BlockSize::PerChannel][block_i];
        let format = [FloatFormat::F32, FloatFormat::F16, FloatFormat::BF16][fi];
        let width = if eight { Bits::Eight } else { Bits::Four };
        // Deterministic values with some exact ties and an all-zero column.
        let mut state = seed | 1;
        let w: Vec<f32> = (0..r * c)
            .map(|e| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                let v = ((state >> 11) as f64 / (1u64 << 53) as f64 * 8.0 - 4.0) as f32;
                let v = if e % 97 == 0 { (v * 2.0).round() * 0.5 } else { v };
                format.round(if e % c == 5 { 0.0 } else { v })
            })
            .collect();
        let h16: Vec<half::f16> = w.iter().map(|&x| half::f16::from_f32(x)).collect();
        let hb: Vec<half::bf16> = w.iter().map(|&x| half::bf16::from_f32(x)).collect();
        let data = match format {
            FloatFormat::F32 => WeightData::F32(&w),
            FloatFormat::F16 => WeightData::F16(&h16),
            FloatFormat::BF16 => WeightData::BF16(&hb),
        };
        let params = QuantParams { block_size, axis, zero_point, alpha: 1.0, bits: width };
        let len = if axis == 0 { r } else { c };
        let block = block_size.resolve(len);
        let s = reference::find_scales(format, width, &w, [r, c], block, axis, 1.0, zero_point);
        let q = reference::rtn(format, width, &w, [r, c], &s, block, axis);
        let want_codes = if eight { q.clone() } else { reference::pack(&q) };
        for tier in Tier::available() {
            let got = quantize_weight_with(tier, data, [r, c], &params).unwrap();
            prop_assert!(got.packed == want_codes, "codes {:?} {:?} {:?} {:?}", tier, [r, c], block_size, format);
            prop_assert_eq!(bits(&got.scale), bits(&s.scale), "scales {:?}", tier);
            let want_zp: Option<Vec<u8>> = s.zero_point.as_ref().map(|z| z.iter().map(|&v| v as u8).collect());
            prop_assert_eq!(&got.zero_point, &want_zp, "zero points {:?}", tier);
            if axis == 0 {
                let dq = fake_quantize_with(tier, format, &w, [r, c], &params, None).unwrap();
                let want = reference::dq_tensor(format, &q, [r, c], &s, block, 0);
                prop_assert!(bits(&dq) == bits(&want), "fake quantize {:?}", tier);
            }
        }
    }
}

/// A NaN beyond the first column stripe is reported at its own column, block and rows, for f32 and
/// for f16/bf16 weights read in place by the fused stripe pass.
#[test]
fn non_finite_is_located_in_wide_tensors() {
    let (r, c) = (256usize, 1040usize);
    let mut w = vec![0.25f32; r * c];
    w[200 * c + 700] = f32::NAN;
    let h16: Vec<half::f16> = w.iter().map(|&x| half::f16::from_f32(x)).collect();
    let hb: Vec<half::bf16> = w.iter().map(|&x| half::bf16::from_f32(x)).collect();
    assert!(h16[200 * c + 700].is_nan() && hb[200 * c + 700].is_nan());
    for data in [WeightData::F32(&w), WeightData::F16(&h16), WeightData::BF16(&hb)] {
        for tier in Tier::available() {
            for zero_point in [false, true] {
                let params = QuantParams { zero_point, ..QuantParams::rtn(BlockSize::Blocked(128)) };
                let err = quantize_weight_with(tier, data, [r, c], &params).unwrap_err();
                assert_eq!(
                    err,
                    nibble::Error::NonFinite { block: 1, column: 700, start: 128, end: 256 },
                    "{:?} {tier:?} zero point {zero_point}",
                    data.format()
                );
            }
        }
    }
}

/// `to_axis1` of an axis-0 quantization of `W` equals the axis-1 quantization of `W^T`.
#[test]
fn to_axis1_equals_axis1_of_the_transpose() {
    let (k, n) = (96usize, 37usize);
    let w: Vec<f32> = (0..k * n).map(|e| ((e * 7919) % 1013) as f32 / 500.0 - 1.0).collect();
    let t: Vec<f32> = (0..k * n).map(|e| w[(e % k) * n + e / k]).collect();
    for (bits, zero_point) in [(Bits::Four, false), (Bits::Four, true), (Bits::Eight, false)] {
        let p0 = QuantParams { zero_point, bits, ..QuantParams::rtn(BlockSize::Blocked(32)) };
        let q0 = nibble::quantize_weight(WeightData::F32(&w), [k, n], &p0).unwrap();
        let p1 = QuantParams { axis: 1, ..p0 };
        let q1 = nibble::quantize_weight(WeightData::F32(&t), [n, k], &p1).unwrap();
        assert_eq!(q0.to_axis1(bits, [k, n]).unwrap(), q1, "{bits:?} zero point {zero_point}");
    }
}
