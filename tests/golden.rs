//! ModelOpt's own outputs (`tests/data/golden/q_*.npz`, `pack_*.npz`, produced by ModelOpt 0.47.0
//! `find_scales` / `rtn` / `dq_tensor` / packing on CPU; `q8_*.npz`, the same functions with
//! `num_bits=8` as its INT8 mixed-precision layers use them, written by scripts/gen_int8_golden.py)
//! reproduced bit for bit: first by the scalar reference, then by `quantize_weight` on every SIMD
//! tier this CPU has.
//!
//! One deliberate divergence: with a zero point, nibble's range contains zero. ModelOpt's goldens
//! for blocks whose values are all positive or all negative (`q_allpos_b32_zp`, `q_allneg_b32_zp`)
//! encode its saturating range; those blocks are checked against the corrected numbers instead
//! (and shown to differ from the golden), every other block still bit for bit.

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

/// Index of element `(i, j)`'s block in the scale layout (`[nb, C]` for axis 0, `[R, nb]` for 1).
fn block_of(c: &Case, i: usize, j: usize) -> usize {
    let nb_cols = if c.axis == 0 { c.shape[1] } else { c.shape[1].div_ceil(c.block) };
    if c.axis == 0 {
        (i / c.block) * nb_cols + j
    } else {
        i * nb_cols + j / c.block
    }
}

/// Per scale: whether the block (its padding zeros included) lies strictly on one side of zero,
/// the only blocks where nibble's zero-point range differs from ModelOpt's.
fn one_sided(c: &Case) -> Vec<bool> {
    let [r, cols] = c.shape;
    let n_scales = if c.axis == 0 { r.div_ceil(c.block) * cols } else { r * cols.div_ceil(c.block) };
    let mut lo = vec![f32::INFINITY; n_scales];
    let mut hi = vec![f32::NEG_INFINITY; n_scales];
    for i in 0..r {
        for j in 0..cols {
            let b = block_of(c, i, j);
            lo[b] = lo[b].min(c.w[i * cols + j]);
            hi[b] = hi[b].max(c.w[i * cols + j]);
        }
    }
    let len = if c.axis == 0 { r } else { cols };
    let padded = len % c.block != 0;
    (0..n_scales)
        .map(|b| {
            // A padded (last) block also holds zeros.
            let last = if c.axis == 0 {
                b / cols == r.div_ceil(c.block) - 1
            } else {
                b % cols.div_ceil(c.block) == cols.div_ceil(c.block) - 1
            };
            c.zero_point && !(padded && last) && (lo[b] > 0.0 || hi[b] < 0.0)
        })
        .collect()
}

/// `(got, want)` restricted to the elements whose block is not one-sided.
fn straddling<T: Copy>(c: &Case, sided: &[bool], per_scale: bool, got: &[T], want: &[T]) -> (Vec<T>, Vec<T>) {
    let keep = |e: usize| {
        let b = if per_scale { e } else { block_of(c, e / c.shape[1], e % c.shape[1]) };
        !sided[b]
    };
    let g = got.iter().enumerate().filter(|(e, _)| keep(*e)).map(|(_, &v)| v).collect();
    let w = want.iter().enumerate().filter(|(e, _)| keep(*e)).map(|(_, &v)| v).collect();
    (g, w)
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
        let sided = one_sided(&c);
        let (g, w) = straddling(&c, &sided, true, &bits(&s.scale), &bits(&out_scale));
        assert_eq!(g, w, "{name}: scales");
        if c.zero_point {
            let want: Vec<i64> = c.arrays["out_zp"].to_f64().iter().map(|&z| z as i64).collect();
            let got: Vec<i64> = s.zero_point.as_ref().unwrap().iter().map(|&z| z as i64).collect();
            let (g, w) = straddling(&c, &sided, true, &got, &want);
            assert_eq!(g, w, "{name}: zero points");
        }
        let q = reference::rtn(c.format, nibble::Bits::Four, &c.w, c.shape, &s, c.block, c.axis);
        let want_q: Vec<u8> = c.arrays["out_q"].data.clone();
        let (g, w) = straddling(&c, &sided, false, &q, &want_q);
        assert_eq!(g, w, "{name}: codes");
        let dq = reference::dq_tensor(c.format, &q, c.shape, &s, c.block, c.axis);
        let (g, w) = straddling(&c, &sided, false, &bits(&dq), &bits(&c.arrays["out_dq"].as_f32().unwrap()));
        assert_eq!(g, w, "{name}: dequantized");
        if !sided.contains(&true) {
            assert_eq!(reference::pack(&q), c.arrays["out_packed"].data, "{name}: packed");
        }
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
            let sided = one_sided(&c);
            let (g, w) = straddling(&c, &sided, true, &bits(&qw.scale), &bits(&out_scale));
            assert_eq!(g, w, "{name} on {tier:?}: scales");
            let codes = unpack_nibbles(&qw.packed, c.w.len(), !c.zero_point).unwrap();
            let want_codes: Vec<i8> = c.arrays["out_q"].data.iter().map(|&b| b as i8).collect();
            let (g, w) = straddling(&c, &sided, false, &codes, &want_codes);
            assert_eq!(g, w, "{name} on {tier:?}: codes");
            if !sided.contains(&true) {
                assert_eq!(qw.packed, c.arrays["out_packed"].data, "{name} on {tier:?}: packed codes");
            }
            if c.zero_point {
                let want: Vec<u8> = c.arrays["out_zp"].to_f64().iter().map(|&z| z as u8).collect();
                let (g, w) = straddling(&c, &sided, true, qw.zero_point.as_ref().unwrap(), &want);
                assert_eq!(g, w, "{name} on {tier:?}: zero points");
                // The one-sided blocks are the reference's corrected numbers.
                let s =
                    reference::find_scales(c.format, nibble::Bits::Four, &c.w, c.shape, c.block, c.axis, c.alpha, true);
                assert_eq!(bits(&qw.scale), bits(&s.scale), "{name} on {tier:?}: scales vs reference");
                let z: Vec<u8> = s.zero_point.unwrap().iter().map(|&v| v as u8).collect();
                assert_eq!(qw.zero_point.as_ref().unwrap(), &z, "{name} on {tier:?}: zero points vs reference");
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

/// ModelOpt's goldens for all-positive and all-negative blocks encode its saturating zero-point
/// range; nibble's range contains zero. Checked explicitly: the golden is ModelOpt's formula on the
/// block's own min and max (zp 0 with min > 0, or zp 15 with max < 0, so codes saturate and the
/// dequantized block is off by more than half a step), nibble's is the same formula on
/// `[min(min, 0), max(max, 0)]` (zp 0 and `s = max / 15`, or zp 15 and `s = -min / 15`), every
/// element within half a step; and a weight made of a one-sided case beside a straddling golden
/// case differs from the goldens only in the one-sided columns.
#[test]
fn one_sided_blocks_take_a_range_that_contains_zero() {
    for (name, positive) in [("q_allpos_b32_zp", true), ("q_allneg_b32_zp", false)] {
        let c = case(name);
        assert!(c.zero_point && c.axis == 0);
        let sided = one_sided(&c);
        assert!(sided.iter().all(|&x| x), "{name}: every block is one-sided");
        let [r, n] = c.shape;
        let golden_s = c.arrays["out_scale"].as_f32().unwrap();
        let golden_z: Vec<f32> = c.arrays["out_zp"].to_f64().iter().map(|&z| z as f32).collect();
        let golden_dq = c.arrays["out_dq"].as_f32().unwrap();
        for tier in Tier::available() {
            let params = QuantParams {
                block_size: BlockSize::Blocked(c.block),
                axis: 0,
                zero_point: true,
                alpha: 1.0,
                bits: nibble::Bits::Four,
            };
            let qw = quantize_weight_with(tier, WeightData::F32(&c.w), c.shape, &params).unwrap();
            let codes = unpack_nibbles(&qw.packed, r * n, false).unwrap();
            for b in 0..r.div_ceil(c.block) {
                for j in 0..n {
                    let rows = b * c.block..((b + 1) * c.block).min(r);
                    let vals: Vec<f32> = rows.clone().map(|i| c.w[i * n + j]).collect();
                    let lo = vals.iter().copied().fold(f32::INFINITY, f32::min);
                    let hi = vals.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                    let si = b * n + j;
                    // The golden: ModelOpt's own range.
                    let gs = (hi - lo).max(1e-5) / 15.0;
                    assert_eq!(golden_s[si].to_bits(), gs.to_bits(), "{name}: golden scale is (max - min) / 15");
                    assert_eq!(golden_z[si], if positive { 0.0 } else { 15.0 }, "{name}: golden zero point");
                    // nibble: the range [min(min, 0), max(max, 0)].
                    let s = if positive { hi / 15.0 } else { -lo / 15.0 };
                    let z = if positive { 0u8 } else { 15 };
                    assert_eq!(qw.scale[si].to_bits(), s.to_bits(), "{name} on {tier:?}: block {b} column {j} scale");
                    assert_eq!(qw.zero_point.as_ref().unwrap()[si], z, "{name} on {tier:?}: zero point");
                    let mut golden_worst = 0.0f32;
                    for i in rows {
                        let dq = (codes[i * n + j] as f32 - z as f32) * s;
                        let x = c.w[i * n + j];
                        assert!((dq - x).abs() <= s * 0.5 * (1.0 + 1e-6), "{name} on {tier:?}: ({i}, {j}) {x} -> {dq}");
                        golden_worst = golden_worst.max((golden_dq[i * n + j] - x).abs());
                    }
                    assert!(golden_worst > golden_s[si] * 0.5, "{name}: the golden saturates block {b} column {j}");
                }
            }
        }
    }
    // Beside a straddling golden case of the same K and block: only the one-sided columns differ.
    let straddle = case("q_zeros_tiny_b32_zp");
    let pos = case("q_allpos_b32_zp");
    assert_eq!(straddle.shape[0], pos.shape[0]);
    let (r, n1, n2) = (pos.shape[0], straddle.shape[1], pos.shape[1]);
    let w: Vec<f32> = (0..r)
        .flat_map(|i| straddle.w[i * n1..(i + 1) * n1].iter().chain(&pos.w[i * n2..(i + 1) * n2]))
        .copied()
        .collect();
    let params = QuantParams {
        block_size: BlockSize::Blocked(32),
        axis: 0,
        zero_point: true,
        alpha: 1.0,
        bits: nibble::Bits::Four,
    };
    for tier in Tier::available() {
        let qw = quantize_weight_with(tier, WeightData::F32(&w), [r, n1 + n2], &params).unwrap();
        let codes = unpack_nibbles(&qw.packed, r * (n1 + n2), false).unwrap();
        let gs = [straddle.arrays["out_scale"].as_f32().unwrap(), pos.arrays["out_scale"].as_f32().unwrap()];
        let gq = [&straddle.arrays["out_q"].data, &pos.arrays["out_q"].data];
        let sided_straddle = one_sided(&straddle);
        let (mut same, mut differ) = (0, 0);
        for b in 0..r / 32 {
            for j in 0..n1 + n2 {
                let (k, jj, nn) = if j < n1 { (0, j, n1) } else { (1, j - n1, n2) };
                let scale_equal = qw.scale[b * (n1 + n2) + j].to_bits() == gs[k][b * nn + jj].to_bits();
                let codes_equal = (b * 32..(b + 1) * 32).all(|i| codes[i * (n1 + n2) + j] as u8 == gq[k][i * nn + jj]);
                let expect_equal = k == 0 && !sided_straddle[b * nn + jj];
                if expect_equal {
                    assert!(
                        scale_equal && codes_equal,
                        "{tier:?}: straddling block {b} column {j} must equal ModelOpt"
                    );
                    same += 1;
                } else if k == 1 {
                    assert!(!scale_equal, "{tier:?}: one-sided block {b} column {j} must differ from ModelOpt");
                    differ += 1;
                }
            }
        }
        assert!(same > 0 && differ > 0, "{tier:?}: {same} equal, {differ} different blocks");
    }
}
