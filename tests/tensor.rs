//! `nibble::tensor` (ModelOpt's `find_scales`, `rtn`, `dq_tensor`, `quant_tensor` on whole arrays)
//! against ModelOpt's own outputs (`tests/data/golden/q_*.npz`, `q8_*.npz`) bit for bit, and against
//! the scalar reference (`nibble::reference`, itself checked against the goldens in tests/golden.rs)
//! on random tensors of rank 1 to 4, every axis, block size, dtype, alpha and bit width.
//!
//! The goldens of blocks that lie on one side of zero (`q_allpos_b32_zp`, `q_allneg_b32_zp`) encode
//! ModelOpt's saturating zero-point range, which nibble corrects (README, Differences item 12): those
//! two cases are compared with the reference only, and shown to differ from the golden.

use half::{bf16, f16};
use nibble::reference;
use nibble::tensor::{self, Blocking, Dequantized, TensorScales};
use nibble::{Bits, BlockSize, Error, FloatFormat, WeightData};
use nibble_driver::calibrate::npy::{read_arrays, Array, DType};
use proptest::prelude::*;
use std::collections::HashMap;
use std::path::PathBuf;

fn golden(name: &str) -> HashMap<String, Array> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(format!("tests/data/golden/{name}.npz"));
    read_arrays(&path).unwrap().into_iter().collect()
}

fn golden_names(prefix: &str) -> Vec<String> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/golden");
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| e.unwrap().file_name().into_string().unwrap().strip_suffix(".npz").map(str::to_string))
        .filter(|n| n.starts_with(prefix))
        .collect();
    v.sort();
    v
}

fn bits_of(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

/// A weight held in its own dtype.
enum Owned {
    F32(Vec<f32>),
    F16(Vec<f16>),
    BF16(Vec<bf16>),
}

impl Owned {
    fn new(format: FloatFormat, values: &[f32]) -> Owned {
        match format {
            FloatFormat::F32 => Owned::F32(values.to_vec()),
            FloatFormat::F16 => Owned::F16(values.iter().map(|&x| f16::from_f32(x)).collect()),
            FloatFormat::BF16 => Owned::BF16(values.iter().map(|&x| bf16::from_f32(x)).collect()),
        }
    }

    fn data(&self) -> WeightData<'_> {
        match self {
            Owned::F32(v) => WeightData::F32(v),
            Owned::F16(v) => WeightData::F16(v),
            Owned::BF16(v) => WeightData::BF16(v),
        }
    }
}

/// `dq_tensor` into a fresh f32 vector of `format`'s values.
fn dequantize(
    format: FloatFormat,
    codes: &[u8],
    signed: bool,
    b: Blocking,
    s: &TensorScales,
) -> Result<Vec<f32>, Error> {
    let n = b.elements();
    let zp = s.zero_point.as_deref();
    match format {
        FloatFormat::F32 => {
            let mut out = vec![0.0f32; n];
            tensor::dq_tensor(codes, signed, b, &s.scale, zp, Dequantized::F32(&mut out))?;
            Ok(out)
        }
        FloatFormat::F16 => {
            let mut out = vec![f16::ZERO; n];
            tensor::dq_tensor(codes, signed, b, &s.scale, zp, Dequantized::F16(&mut out))?;
            Ok(out.iter().map(|x| x.to_f32()).collect())
        }
        FloatFormat::BF16 => {
            let mut out = vec![bf16::ZERO; n];
            tensor::dq_tensor(codes, signed, b, &s.scale, zp, Dequantized::BF16(&mut out))?;
            Ok(out.iter().map(|x| x.to_f32()).collect())
        }
    }
}

/// Everything the module computes for one tensor: `find_scales`, `quant_tensor`, `rtn` with the
/// scales found, and `dq_tensor` of the codes.
struct Outputs {
    scales: TensorScales,
    codes: Vec<u8>,
    dq: Vec<f32>,
}

fn run_all(format: FloatFormat, w: &[f32], b: Blocking, alpha: f64, zp: bool, bits: Bits) -> Result<Outputs, Error> {
    let owned = Owned::new(format, w);
    let scales = tensor::find_scales(owned.data(), b, alpha, zp, bits)?;
    let mut codes = vec![0u8; b.elements()];
    let again = tensor::quant_tensor(owned.data(), b, alpha, zp, bits, &mut codes)?;
    assert_eq!(bits_of(&again.scale), bits_of(&scales.scale), "quant_tensor and find_scales disagree");
    let mut codes_rtn = vec![0u8; b.elements()];
    tensor::rtn(owned.data(), b, &scales.scale, scales.zero_point.as_deref(), bits, &mut codes_rtn)?;
    assert_eq!(codes_rtn, codes, "rtn and quant_tensor disagree");
    let dq = dequantize(format, &codes, !zp, b, &scales)?;
    Ok(Outputs { scales, codes, dq })
}

#[test]
fn matches_modelopt_goldens_bit_for_bit() {
    let mut names = golden_names("q_");
    names.extend(golden_names("q8_"));
    assert!(names.len() >= 30, "golden cases missing: {names:?}");
    let mut checked = 0;
    for name in names {
        let a = golden(&name);
        let w = &a["in_w"];
        let format = match w.dtype {
            DType::F32 => FloatFormat::F32,
            DType::F16 => FloatFormat::F16,
            d => panic!("{name}: weight dtype {d:?}"),
        };
        let values = w.as_f32().unwrap();
        let get = |k: &str, default: f64| a.get(k).map_or(default, |v| v.to_f64()[0]);
        let axis = get("in_quantize_axis", 0.0) as usize;
        let block = get("in_block_size", -1.0) as i64;
        let zp = get("in_use_zero_point", 0.0) != 0.0;
        let alpha = get("in_alpha", 1.0);
        let bits = if name.starts_with("q8_") { Bits::Eight } else { Bits::Four };
        let block = if block == -1 { BlockSize::PerChannel } else { BlockSize::Blocked(block as usize) };
        let b = Blocking::new(&w.shape, axis, block).unwrap();
        let result = run_all(format, &values, b, alpha, zp, bits);
        if values.iter().any(|x| !x.is_finite()) {
            // ModelOpt returns NaN scales and garbage codes (or raises with a zero point): refused.
            assert!(matches!(result, Err(Error::NonFinite { .. })), "{name}: {:?}", result.err());
            continue;
        }
        let out = result.unwrap();
        let one_sided = name == "q_allpos_b32_zp" || name == "q_allneg_b32_zp";
        // The reference (2-D, numpy's layout).
        let s = reference::find_scales(format, bits, &values, [w.shape[0], w.shape[1]], b.block, axis, alpha, zp);
        assert_eq!(bits_of(&out.scales.scale), bits_of(&s.scale), "{name}: scales vs reference");
        assert_eq!(out.scales.zero_point, s.zero_point, "{name}: zero points vs reference");
        let q = reference::rtn(format, bits, &values, [w.shape[0], w.shape[1]], &s, b.block, axis);
        assert_eq!(out.codes, q, "{name}: codes vs reference");
        let golden_q = &a["out_q"].data;
        let golden_scale = bits_of(&a["out_scale"].as_f32().unwrap());
        assert_eq!(a["out_scale"].shape.iter().product::<usize>(), out.scales.scale.len(), "{name}: scale size");
        if one_sided {
            assert_ne!(&out.codes, golden_q, "{name}: ModelOpt's saturating range should differ");
            continue;
        }
        assert_eq!(bits_of(&out.scales.scale), golden_scale, "{name}: scales vs ModelOpt");
        if zp {
            let want: Vec<f32> = a["out_zp"].to_f64().iter().map(|&z| z as f32).collect();
            assert_eq!(out.scales.zero_point.as_deref(), Some(&want[..]), "{name}: zero points vs ModelOpt");
        }
        if bits == Bits::Four || !zp {
            // ModelOpt's INT8 zero-point codes wrap through int8 (README, Differences item 11).
            assert_eq!(&out.codes, golden_q, "{name}: codes vs ModelOpt");
        }
        for key in ["out_dq", "out_dq_quant_tensor"] {
            if let Some(want) = a.get(key) {
                if bits == Bits::Four || !zp {
                    assert_eq!(bits_of(&out.dq), bits_of(&want.as_f32().unwrap()), "{name}: {key} vs ModelOpt");
                }
            }
        }
        checked += 1;
    }
    assert!(checked >= 28, "only {checked} golden cases compared");
}

/// The reference applied slice by slice: each outer index of `[outer, len, inner]` is a 2-D
/// `[len, inner]` tensor along axis 0 (or, for `inner == 1`, the rows of `[outer, len]` along axis 1).
fn reference_outputs(format: FloatFormat, w: &[f32], b: Blocking, alpha: f64, zp: bool, bits: Bits) -> Outputs {
    let nb = b.blocks();
    let mut scale = vec![0.0f32; b.scale_len()];
    let mut zps = vec![0.0f32; b.scale_len()];
    let mut codes = vec![0u8; b.elements()];
    let mut dq = vec![0.0f32; b.elements()];
    for o in 0..b.outer {
        let slice = &w[o * b.len * b.inner..(o + 1) * b.len * b.inner];
        let shape = [b.len, b.inner];
        let s = reference::find_scales(format, bits, slice, shape, b.block, 0, alpha, zp);
        let q = reference::rtn(format, bits, slice, shape, &s, b.block, 0);
        let d = reference::dq_tensor(format, &q, shape, &s, b.block, 0);
        scale[o * nb * b.inner..(o + 1) * nb * b.inner].copy_from_slice(&s.scale);
        if let Some(z) = &s.zero_point {
            zps[o * nb * b.inner..(o + 1) * nb * b.inner].copy_from_slice(z);
        }
        codes[o * b.len * b.inner..(o + 1) * b.len * b.inner].copy_from_slice(&q);
        dq[o * b.len * b.inner..(o + 1) * b.len * b.inner].copy_from_slice(&d);
    }
    Outputs { scales: TensorScales { scale, zero_point: zp.then_some(zps) }, codes, dq }
}

fn format_strategy() -> impl Strategy<Value = FloatFormat> {
    prop_oneof![Just(FloatFormat::F32), Just(FloatFormat::F16), Just(FloatFormat::BF16)]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

    #[test]
    fn any_rank_axis_block_and_dtype_matches_the_reference(
        dims in prop::collection::vec(1usize..24, 1..=4),
        axis_pick in 0usize..4,
        block in prop_oneof![Just(-1i64), 1i64..40],
        format in format_strategy(),
        zp in any::<bool>(),
        eight in any::<bool>(),
        alpha_pick in 0usize..4,
        seed in any::<u64>(),
    ) {
        let axis = axis_pick % dims.len();
        let bits = if eight { Bits::Eight } else { Bits::Four };
        let alpha = [1.0, 0.75, 0.5, 0.95][alpha_pick];
        let block = if block == -1 { BlockSize::PerChannel } else { BlockSize::Blocked(block as usize) };
        let b = Blocking::new(&dims, axis, block).unwrap();
        // Values rounded to the dtype, with exact ties, zeros and one-sided blocks mixed in.
        let mut state = seed | 1;
        let w: Vec<f32> = (0..b.elements())
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                let u = (state >> 40) as f32 / (1u64 << 24) as f32;
                let v = match state % 7 {
                    0 => 0.0,
                    1 => ((state >> 8) % 17) as f32 * 0.5 - 4.0,
                    2 => u * 3.0 + 0.25,
                    _ => (u - 0.5) * 6.0,
                };
                format.round(v)
            })
            .collect();
        let got = run_all(format, &w, b, alpha, zp, bits).unwrap();
        let want = reference_outputs(format, &w, b, alpha, zp, bits);
        prop_assert_eq!(bits_of(&got.scales.scale), bits_of(&want.scales.scale));
        prop_assert_eq!(&got.scales.zero_point, &want.scales.zero_point);
        prop_assert_eq!(&got.codes, &want.codes);
        prop_assert_eq!(bits_of(&got.dq), bits_of(&want.dq));
    }
}

#[test]
fn dq_tensor_reads_codes_as_given() {
    // Signed codes with a zero point and unsigned codes without one take the per-element formula:
    // (q - zp) * s with q = -3 and zp = 2, and q = 200 * s for a uint8 code.
    let b = Blocking::new(&[2, 1], 0, BlockSize::Blocked(2)).unwrap();
    let s = TensorScales { scale: vec![0.5], zero_point: Some(vec![2.0]) };
    let got = dequantize(FloatFormat::F32, &[(-3i8) as u8, 4], true, b, &s).unwrap();
    assert_eq!(got, vec![-2.5, 1.0]);
    let s = TensorScales { scale: vec![0.5], zero_point: None };
    let got = dequantize(FloatFormat::F16, &[200, 4], false, b, &s).unwrap();
    assert_eq!(got, vec![100.0, 2.0]);
}

#[test]
fn bad_arguments_are_errors() {
    assert!(matches!(Blocking::new(&[4, 4], 2, BlockSize::Blocked(2)), Err(Error::BadAxis { axis: 2 })));
    assert!(matches!(Blocking::new(&[4, 4], 0, BlockSize::Blocked(0)), Err(Error::BadBlockSize { .. })));
    let b = Blocking::new(&[4, 4], 0, BlockSize::Blocked(2)).unwrap();
    let w = vec![1.0f32; 15];
    assert!(matches!(
        tensor::find_scales(WeightData::F32(&w), b, 1.0, false, Bits::Four),
        Err(Error::LengthMismatch { .. })
    ));
    let w = vec![1.0f32; 16];
    let mut codes = vec![0u8; 16];
    assert!(matches!(
        tensor::rtn(WeightData::F32(&w), b, &[1.0; 7], None, Bits::Four, &mut codes),
        Err(Error::LengthMismatch { .. })
    ));
    let mut w = vec![1.0f32; 16];
    w[9] = f32::NAN;
    let err = tensor::rtn(WeightData::F32(&w), b, &[1.0; 8], None, Bits::Four, &mut codes).unwrap_err();
    assert_eq!(err, Error::NonFinite { block: 1, column: 1, start: 2, end: 4 });
}

#[test]
fn sixteen_bit_dq_tensor_over_slabs_larger_than_the_staging_chunk() {
    // float16/bfloat16 outputs are staged as f32 a chunk of whole rows (about 8192 values) at a
    // time: slabs of 16 x 700 (chunks of 11 rows + 5) with a last block of 5 rows, and rows of
    // 9000 (one row per chunk), with and without zero points, on the SIMD kernel and, for signed
    // codes read with a zero point (one code negative), on the per-element formula.
    for (dims, block) in [(vec![37usize, 700], 16usize), (vec![3, 9000], 2)] {
        let b = Blocking::new(&dims, 0, BlockSize::Blocked(block)).unwrap();
        let w: Vec<f32> = (0..b.elements()).map(|i| ((i * 7919) % 1001) as f32 / 125.0 - 4.0).collect();
        for format in [FloatFormat::F16, FloatFormat::BF16] {
            let w: Vec<f32> = w.iter().map(|&x| format.round(x)).collect();
            for (zp, bits) in [(false, Bits::Four), (true, Bits::Four), (false, Bits::Eight)] {
                let got = run_all(format, &w, b, 1.0, zp, bits).unwrap();
                let want = reference_outputs(format, &w, b, 1.0, zp, bits);
                assert_eq!(got.codes, want.codes, "{dims:?} {format:?} zp {zp}");
                assert_eq!(bits_of(&got.dq), bits_of(&want.dq), "{dims:?} {format:?} zp {zp}");
            }
            // Signed codes with a zero point: (q - zp) * s element by element.
            let s = TensorScales {
                scale: (0..b.scale_len()).map(|i| format.round(0.01 + (i % 13) as f32 * 0.003)).collect(),
                zero_point: Some((0..b.scale_len()).map(|i| (i % 16) as f32).collect()),
            };
            let mut codes: Vec<u8> = (0..b.elements()).map(|i| (i % 16) as u8).collect();
            codes[b.elements() - 1] = (-3i8) as u8;
            let got = dequantize(format, &codes, true, b, &s).unwrap();
            let inner = b.inner;
            for (k, (&q, &g)) in codes.iter().zip(&got).enumerate() {
                // Axis 0 of a 2-D weight: scale row k / inner / block, column k % inner.
                let at = (k / inner / block) * inner + k % inner;
                let (s, z) = (s.scale[at], s.zero_point.as_ref().unwrap()[at]);
                let want = format.round(format.round(q as i8 as f32 - z) * s);
                assert_eq!(g.to_bits(), want.to_bits(), "{dims:?} {format:?} element {k}");
            }
        }
    }
}
