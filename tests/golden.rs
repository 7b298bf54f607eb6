//! ModelOpt's own outputs (`tests/data/golden/q_*.npz`, `pack_*.npz`, produced by ModelOpt 0.47.0
//! `find_scales` / `rtn` / `dq_tensor` / packing on CPU; `q8_*.npz`, the same functions with
//! `num_bits=8` as its INT8 mixed-precision layers use them, written by scripts/gen_int8_golden.py)
//! reproduced bit for bit: first by the scalar reference, then by `quantize_weight` on every SIMD
//! tier this CPU has.

use nibble::kernels::unpack_nibbles;
use nibble::quantize_weight::quantize_weight_with;
use nibble::{reference, BlockSize, Error, FloatFormat, QuantParams, Tier, WeightData};
use nibble_driver::calibrate::npy::{read_arrays, Array, DType};
use std::collections::HashMap;
use std::path::PathBuf;

fn golden_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/golden")
}

fn load(case: &str) -> HashMap<String, Array> {
    read_arrays(&golden_dir().join(format!("{case}.npz"))).unwrap().into_iter().collect()
}

fn cases(prefix: &str) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(golden_dir())
        .unwrap()
        .filter_map(|e| {
            let name = e.unwrap().file_name().into_string().unwrap();
            name.strip_suffix(".npz").filter(|n| n.starts_with(prefix)).map(str::to_string)
        })
        .collect();
    v.sort();
    v
}

fn scalar(a: &Array) -> f64 {
    a.to_f64()[0]
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

struct Case {
    format: FloatFormat,
    w: Vec<f32>,
    w16: Option<Vec<u16>>,
    shape: [usize; 2],
    block: usize,
    axis: usize,
    alpha: f64,
    zero_point: bool,
    arrays: HashMap<String, Array>,
}

fn case(name: &str) -> Case {
    let arrays = load(name);
    let w = &arrays["in_w"];
    let format = match w.dtype {
        DType::F32 => FloatFormat::F32,
        DType::F16 => FloatFormat::F16,
        d => panic!("{name}: unexpected weight dtype {d:?}"),
    };
    Case {
        format,
        w: w.as_f32().unwrap(),
        w16: (format == FloatFormat::F16).then(|| w.as_u16().unwrap()),
        shape: [w.shape[0], w.shape[1]],
        block: scalar(&arrays["in_block_size"]) as usize,
        axis: arrays.get("in_quantize_axis").map_or(0, |a| scalar(a) as usize),
        alpha: arrays.get("in_alpha").map_or(1.0, scalar),
        zero_point: arrays.get("in_use_zero_point").is_some_and(|a| scalar(a) != 0.0),
        arrays,
    }
}

fn is_nonfinite_case(c: &Case) -> bool {
    c.w.iter().any(|x| !x.is_finite())
}

#[test]
fn reference_matches_modelopt_q_cases() {
    let names = cases("q_");
    assert!(names.len() >= 25, "golden cases missing: {names:?}");
    let mut checked = 0;
    for name in names {
        let c = case(&name);
        if is_nonfinite_case(&c) {
            continue;
        }
        let s =
            reference::find_scales(c.format, nibble::Bits::Four, &c.w, c.shape, c.block, c.axis, c.alpha, c.zero_point);
        let out_scale = c.arrays["out_scale"].as_f32().unwrap();
        assert_eq!(s.shape.to_vec(), c.arrays["out_scale"].shape, "{name}: scale shape");
        assert_eq!(bits(&s.scale), bits(&out_scale), "{name}: scales");
        if c.zero_point {
            let want: Vec<i64> = c.arrays["out_zp"].to_f64().iter().map(|&z| z as i64).collect();
            let got: Vec<i64> = s.zero_point.as_ref().unwrap().iter().map(|&z| z as i64).collect();
            assert_eq!(got, want, "{name}: zero points");
        }
        let q = reference::rtn(c.format, nibble::Bits::Four, &c.w, c.shape, &s, c.block, c.axis);
        let want_q: Vec<u8> = c.arrays["out_q"].data.clone();
        assert_eq!(q, want_q, "{name}: codes");
        let dq = reference::dq_tensor(c.format, &q, c.shape, &s, c.block, c.axis);
        assert_eq!(bits(&dq), bits(&c.arrays["out_dq"].as_f32().unwrap()), "{name}: dequantized");
        assert_eq!(reference::pack(&q), c.arrays["out_packed"].data, "{name}: packed");
        checked += 1;
    }
    assert!(checked >= 24, "only {checked} cases checked");
}

#[test]
fn every_tier_matches_modelopt_q_cases() {
    for tier in Tier::available() {
        for name in cases("q_") {
            let c = case(&name);
            let data = match &c.w16 {
                Some(h) => WeightData::F16(bytemuck::cast_slice(h)),
                None => WeightData::F32(&c.w),
            };
            let params = QuantParams {
                block_size: BlockSize::Blocked(c.block),
                axis: c.axis,
                zero_point: c.zero_point,
                alpha: c.alpha,
                bits: nibble::Bits::Four,
            };
            let result = quantize_weight_with(tier, data, c.shape, &params);
            if is_nonfinite_case(&c) {
                assert!(
                    matches!(result, Err(Error::NonFinite { .. })),
                    "{name} on {tier:?}: NaN/Inf must be refused, got {result:?}"
                );
                continue;
            }
            let qw = result.unwrap();
            let out_scale = c.arrays["out_scale"].as_f32().unwrap();
            assert_eq!(bits(&qw.scale), bits(&out_scale), "{name} on {tier:?}: scales");
            assert_eq!(qw.packed, c.arrays["out_packed"].data, "{name} on {tier:?}: packed codes");
            if c.zero_point {
                let want: Vec<u8> = c.arrays["out_zp"].to_f64().iter().map(|&z| z as u8).collect();
                assert_eq!(qw.zero_point.as_ref().unwrap(), &want, "{name} on {tier:?}: zero points");
            } else {
                assert!(qw.zero_point.is_none());
            }
        }
    }
}

#[test]
fn per_channel_equals_one_block_of_k() {
    let c = case("q_fp32_256x64_perchannel");
    for tier in Tier::available() {
        let mut params = QuantParams::rtn(BlockSize::PerChannel);
        let a = quantize_weight_with(tier, WeightData::F32(&c.w), c.shape, &params).unwrap();
        params.block_size = BlockSize::Blocked(256);
        let b = quantize_weight_with(tier, WeightData::F32(&c.w), c.shape, &params).unwrap();
        assert_eq!(a.packed, b.packed);
        assert_eq!(bits(&a.scale), bits(&b.scale));
        assert_eq!(a.packed, c.arrays["out_packed"].data);
    }
}

/// INT8 (ModelOpt's mixed-precision layers): scales, zero points, codes and dequantized values,
/// per channel and blocked, f32 and f16, by the reference and on every tier.
#[test]
fn int8_cases_match_modelopt() {
    let names = cases("q8_");
    assert!(names.len() >= 6, "INT8 golden cases missing: {names:?}");
    for name in names {
        let c = case(&name);
        assert_eq!(scalar(&c.arrays["in_num_bits"]), 8.0);
        let width = nibble::Bits::Eight;
        let s = reference::find_scales(c.format, width, &c.w, c.shape, c.block, 0, 1.0, c.zero_point);
        assert_eq!(bits(&s.scale), bits(&c.arrays["out_scale"].as_f32().unwrap()), "{name}: scales");
        let want_zp: Option<Vec<u8>> =
            c.zero_point.then(|| c.arrays["out_zp"].to_f64().iter().map(|&z| z as u8).collect());
        if let Some(want) = &want_zp {
            let got: Vec<u8> = s.zero_point.as_ref().unwrap().iter().map(|&z| z as u8).collect();
            assert_eq!(&got, want, "{name}: zero points");
        }
        let q = reference::rtn(c.format, width, &c.w, c.shape, &s, c.block, 0);
        assert_eq!(q, c.arrays["out_q"].data, "{name}: codes");
        let dq = reference::dq_tensor(c.format, &q, c.shape, &s, c.block, 0);
        assert_eq!(bits(&dq), bits(&c.arrays["out_dq"].as_f32().unwrap()), "{name}: dequantized");
        let data = match &c.w16 {
            Some(h) => WeightData::F16(bytemuck::cast_slice(h)),
            None => WeightData::F32(&c.w),
        };
        let mut blocks = vec![BlockSize::Blocked(c.block)];
        if c.block == c.shape[0] {
            blocks.push(BlockSize::PerChannel);
        }
        for tier in Tier::available() {
            for &block_size in &blocks {
                let params = QuantParams { block_size, axis: 0, zero_point: c.zero_point, alpha: 1.0, bits: width };
                let qw = quantize_weight_with(tier, data, c.shape, &params).unwrap();
                assert_eq!(qw.packed, c.arrays["out_q"].data, "{name} on {tier:?} {block_size:?}: codes, one per byte");
                assert_eq!(bits(&qw.scale), bits(&s.scale), "{name} on {tier:?}: scales");
                assert_eq!(qw.zero_point, want_zp, "{name} on {tier:?}: zero points");
            }
        }
    }
}

#[test]
fn packing_matches_modelopt() {
    for name in ["pack_int4_signed", "pack_uint4"] {
        let a = load(name);
        let values = &a["in_values"].data;
        assert_eq!(reference::pack(values), a["out_packed"].data, "{name}: reference");
        for tier in Tier::available() {
            let mut out = vec![0u8; values.len().div_ceil(2)];
            nibble::kernels::pack_nibbles_with(tier, values, &mut out).unwrap();
            assert_eq!(out, a["out_packed"].data, "{name} on {tier:?}");
        }
    }
    let a = load("pack_onnx_roundtrip");
    let values: Vec<i8> = a["in_values"].data.iter().map(|&b| b as i8).collect();
    let packed = reference::pack(&a["in_values"].data);
    let back = unpack_nibbles(&packed, values.len(), true).unwrap();
    let want: Vec<i8> = a["out_onnx_to_array"].data.iter().map(|&b| b as i8).collect();
    assert_eq!(back, want);
    assert_eq!(back, values);
}

/// Per channel with an odd element count (99 x 75): every byte written, equal to the reference.
#[test]
fn per_channel_odd_element_count() {
    let c = case("q_fp32_99x75_b32");
    let s = reference::find_scales(c.format, nibble::Bits::Four, &c.w, c.shape, 99, 0, 1.0, false);
    let want = reference::pack(&reference::rtn(c.format, nibble::Bits::Four, &c.w, c.shape, &s, 99, 0));
    for tier in Tier::available() {
        let q = quantize_weight_with(tier, WeightData::F32(&c.w), c.shape, &QuantParams::rtn(BlockSize::PerChannel))
            .unwrap();
        assert_eq!(q.packed, want, "{tier:?}");
        assert_eq!(bits(&q.scale), bits(&s.scale));
    }
}
