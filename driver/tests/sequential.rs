//! Sequential calibration (`--sequential`) against a straightforward implementation: after weights
//! are replaced step by step, each step's activations must equal those captured in one full run of
//! a copy of the model whose initializers hold the replaced values. The model carries a float
//! tensor (a residual) and an int64 tensor (a shape) across steps, so the step-to-step hand-over is
//! exercised for more than one element type.

mod common;

use common::*;
use nibble::FloatFormat;
use nibble_driver::calibrate::capture::Capture;
use nibble_driver::calibrate::sequential::Sequential;
use nibble_driver::graph::build::{init, io, model, node};
use nibble_driver::graph::floats::{encode_floats, onnx_type};
use nibble_driver::graph::model::{ExternalData, Model};
use nibble_driver::graph::onnx::{GraphProto, ModelProto};
use nibble_driver::rng::Rng;
use nibble_driver::runtime::{Input, InputData, NamedTensor};

const H: usize = 48;

/// x -> MatMul W1 -> Relu -> Reshape(Shape(x)) = r1 -> MatMul W2 -> + r1 -> Reshape(Shape(x)) = s
///   -> MatMul W3 -> y. Node indices: W1's consumer 0, W2's 4, W3's 7.
fn chain(w: &[Vec<f32>; 3]) -> ModelProto {
    let g = GraphProto {
        node: vec![
            node("MatMul", "m1", &["x", "W1"], &["a1"], vec![]),
            node("Relu", "relu", &["a1"], &["b1"], vec![]),
            node("Shape", "shape", &["x"], &["shp"], vec![]),
            node("Reshape", "reshape1", &["b1", "shp"], &["r1"], vec![]),
            node("MatMul", "m2", &["r1", "W2"], &["h2"], vec![]),
            node("Add", "residual", &["h2", "r1"], &["t"], vec![]),
            node("Reshape", "reshape2", &["t", "shp"], &["s"], vec![]),
            node("MatMul", "m3", &["s", "W3"], &["y"], vec![]),
        ],
        initializer: (0..3).map(|i| init(&format!("W{}", i + 1), &[H, H], &w[i], FloatFormat::F32)).collect(),
        input: vec![io("x", 1, &[None, Some(H)])],
        output: vec![io("y", 1, &[None, Some(H)])],
        ..Default::default()
    };
    model(g, 17)
}

fn capture(dir: &std::path::Path, name: &str, w: &[Vec<f32>; 3]) -> (Model, Capture) {
    let path = write(chain(w), &dir.join(name), ExternalData::Never);
    let m = Model::load(&path).unwrap();
    let c = Capture::new(&m).unwrap();
    (m, c)
}

fn bits(t: &[NamedTensor]) -> Vec<Vec<u32>> {
    t.iter().map(|t| t.data.iter().map(|v| v.to_bits()).collect()).collect()
}

#[test]
fn each_step_sees_the_weights_replaced_before_it() {
    let d = tmp();
    let mut rng = Rng::new(3);
    let float: [Vec<f32>; 3] = std::array::from_fn(|_| rng.normals(H * H, 0.2));
    // The "quantized" values: visibly different from the float weights.
    let replaced: [Vec<f32>; 3] = std::array::from_fn(|i| float[i].iter().map(|v| (v * 4.0).round() / 4.0).collect());
    let samples: Vec<Vec<Input>> = (0..3)
        .map(|s| {
            let rows = 5 + s;
            vec![Input { name: "x".into(), shape: vec![rows, H], data: InputData::F32(rng.normals(rows * H, 1.0)) }]
        })
        .collect();
    let (_m, cap) = capture(d.path(), "float.onnx", &float);
    let mut seq = Sequential::new(&cap, samples.len()).unwrap();
    let f32_type = onnx_type(FloatFormat::F32);
    let bytes = |v: &[f32]| encode_floats(FloatFormat::F32, v);

    // Step 1: the graph input itself.
    let got = seq.step(&["x".to_string()], &samples).unwrap();
    for (g, s) in got.iter().zip(&samples) {
        let InputData::F32(x) = &s[0].data else { unreachable!() };
        assert_eq!(&g[0].data, x);
    }
    seq.replace(0, 1, &[H, H], f32_type, &bytes(&replaced[0])).unwrap();

    // Step 2: r1 must be computed with W1 replaced.
    let got = seq.step(&["r1".to_string()], &samples).unwrap();
    let (_m2, want) = capture(d.path(), "w1.onnx", &[replaced[0].clone(), float[1].clone(), float[2].clone()]);
    let want = want.run(&["r1".to_string()], &samples).unwrap();
    let (_m3, float_cap) = capture(d.path(), "float2.onnx", &float);
    let float_r1 = float_cap.run(&["r1".to_string()], &samples).unwrap();
    for s in 0..samples.len() {
        assert_eq!(bits(&got[s]), bits(&want[s]), "step 2, sample {s}");
        assert_ne!(bits(&got[s]), bits(&float_r1[s]), "step 2 must differ from the float model");
    }
    seq.replace(4, 1, &[H, H], f32_type, &bytes(&replaced[1])).unwrap();

    // Step 3: s needs W1 and W2 replaced, the carried residual r1 (float) and shape (int64).
    let got = seq.step(&["s".to_string()], &samples).unwrap();
    let (_m4, want) = capture(d.path(), "w12.onnx", &[replaced[0].clone(), replaced[1].clone(), float[2].clone()]);
    let want = want.run(&["s".to_string()], &samples).unwrap();
    for s in 0..samples.len() {
        assert_eq!(bits(&got[s]), bits(&want[s]), "step 3, sample {s}");
        assert_eq!(got[s][0].shape, vec![5 + s, H]);
    }

    // A node that already ran cannot take a replacement.
    let err = seq.replace(4, 1, &[H, H], f32_type, &bytes(&replaced[1])).unwrap_err().to_string();
    assert!(err.contains("already ran"), "{err}");
}

/// x -> Gemm(transB=1, Wa: [N, K]) -> Relu -> MatMul Wb -> y.
fn gemm_chain(wa: &[f32], wb: &[f32]) -> ModelProto {
    use nibble_driver::graph::build::attr_i;
    let g = GraphProto {
        node: vec![
            node("Gemm", "/a/Gemm", &["x", "Wa"], &["a"], vec![attr_i("transB", 1)]),
            node("Relu", "/a/Relu", &["a"], &["r"], vec![]),
            node("MatMul", "/b/MatMul", &["r", "Wb"], &["y"], vec![]),
        ],
        initializer: vec![init("Wa", &[H, H], wa, FloatFormat::F32), init("Wb", &[H, H], wb, FloatFormat::F32)],
        input: vec![io("x", 1, &[None, Some(H)])],
        output: vec![io("y", 1, &[None, Some(H)])],
        ..Default::default()
    };
    model(g, 17)
}

/// The float values of an INT4 DQ weight of the quantized model: `q * s` (straightforward).
fn dequantize_int4(m: &Model, w: &str, axis: usize, block: usize) -> Vec<f32> {
    let g = m.proto.graph.as_ref().unwrap();
    let t = |n: String| g.initializer.iter().find(|t| t.name.as_deref() == Some(n.as_str())).unwrap();
    let codes = t(format!("{w}_i4"));
    let scales = floats(m, t(format!("{w}_scale")));
    let raw = codes.raw_data.as_ref().unwrap();
    let (r, c) = (codes.dims[0] as usize, codes.dims[1] as usize);
    (0..r * c)
        .map(|e| {
            let nib = (raw[e / 2] >> (4 * (e % 2))) & 0xf;
            let q = ((nib << 4) as i8 >> 4) as f32;
            let (i, j) = (e / c, e % c);
            let s = if axis == 0 { scales[(i / block) * c + j] } else { scales[i * c.div_ceil(block) + j / block] };
            q * s
        })
        .collect()
}

/// With `--sequential`, the second layer's GPTQ equals plain GPTQ on the model whose first layer
/// (a `transB=1` Gemm, stored `[N, K]`) already holds its dequantized values: the hand-over of a
/// transposed weight to later steps is the quantized model's weight, exactly.
#[test]
fn sequential_equals_plain_gptq_on_the_model_with_earlier_layers_dequantized() {
    let d = tmp();
    let mut rng = Rng::new(11);
    let (wa, wb) = (rng.normals(H * H, 0.3), rng.normals(H * H, 0.3));
    let src = write(gemm_chain(&wa, &wb), &d.path().join("m.onnx"), ExternalData::Never);
    let x: Vec<u8> = rng.normals(6 * 64 * H, 1.0).iter().flat_map(|v| v.to_le_bytes()).collect();
    let calib = d.path().join("calib.npz");
    npz(&calib, &[("x", npy("<f4", false, &format!("(6, 64, {H})"), &x))]);
    let run = |src: &std::path::Path, out: &str, extra: &[&str]| {
        let out = d.path().join(out);
        let mut args = vec!["quantize", src.to_str().unwrap(), "-o", out.to_str().unwrap(), "--method", "gptq"];
        args.extend(["--block-size", "16", "--calibration-data", calib.to_str().unwrap()]);
        args.extend(if extra.is_empty() { &["--no-default-exclude"][..] } else { extra });
        nibble_ok(&args);
        Model::load(&out).unwrap()
    };
    let seq = run(&src, "seq.onnx", &["--sequential", "--no-default-exclude"]);
    let plain = run(&src, "plain.onnx", &[]);
    // The straightforward way: put the first layer's dequantized values into the float model and
    // quantize only the second layer, calibrated on that model.
    let wa_dq = dequantize_int4(&seq, "Wa", 1, 16);
    let src2 = write(gemm_chain(&wa_dq, &wb), &d.path().join("m2.onnx"), ExternalData::Never);
    let by_hand = run(&src2, "by_hand.onnx", &["--exclude", "/a/"]);
    let codes = |m: &Model, w: &str| {
        let g = m.proto.graph.as_ref().unwrap();
        g.initializer.iter().find(|t| t.name.as_deref() == Some(w)).unwrap().raw_data.clone().unwrap()
    };
    assert_eq!(codes(&seq, "Wa_i4"), codes(&plain, "Wa_i4"), "the first layer sees the float input either way");
    assert_eq!(codes(&seq, "Wb_i4"), codes(&by_hand, "Wb_i4"), "second layer: --sequential vs by hand");
    assert_ne!(codes(&seq, "Wb_i4"), codes(&plain, "Wb_i4"), "second layer must see the quantized first layer");
}
