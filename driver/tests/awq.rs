//! AWQ end to end: a model with every kind of producer for the quantized weights' activations,
//! calibrated on inputs with outlier channels (where AWQ matters), quantized with awq_lite,
//! awq_clip and awq_full in f32 and f16, run in ONNX Runtime on held-out inputs, and compared with
//! RTN at the same block size.

mod common;

use common::*;
use nibble::FloatFormat;
use nibble_driver::graph::build::{attr_f, attr_i, init, io, model, node};
use nibble_driver::graph::floats::onnx_type;
use nibble_driver::graph::model::{ExternalData, Model};
use nibble_driver::graph::onnx::{tensor_proto::DataType, GraphProto, ModelProto};
use nibble_driver::rng::Rng;
use nibble_driver::runtime::{open, run, Input, InputData, SessionOptions};
use std::path::Path;

const H: usize = 64;

/// x (graph input) -> [W_in] -> RMSNorm as Mul(gamma) -> [q, k, v] (siblings) -> ...
///   SimplifiedLayerNormalization -> [up] -> [down] (parent: a MatMul whose weight is quantized)
///   -> LayerNormalization -> Gemm transB=1 [head].
fn awq_model(format: FloatFormat) -> ModelProto {
    let mut rng = Rng::new(42);
    let f = format;
    let mut w = |name: &str, k: usize, n: usize| init(name, &[k, n], &rng.normals(k * n, 1.0 / (k as f32).sqrt()), f);
    let mut inits =
        vec![w("W_in", H, H), w("Wq", H, H), w("Wk", H, H), w("Wv", H, H), w("W_up", H, 2 * H), w("W_down", 2 * H, H)];
    let mut rng2 = Rng::new(7);
    inits.push(init("W_head", &[32, H], &rng2.normals(32 * H, 0.15), f)); // Gemm transB=1: [N, K]
    inits.push(init("b_head", &[32], &rng2.normals(32, 0.1), f));
    let gamma: Vec<f32> = (0..H).map(|i| 0.5 + (i % 7) as f32 * 0.25).collect();
    inits.push(init("gamma", &[H], &gamma, f));
    inits.push(init("sln_scale", &[H], &gamma, f));
    inits.push(init("ln_scale", &[H], &vec![1.0; H], f));
    inits.push(init("ln_bias", &[H], &vec![0.0; H], f));
    inits.push(init("eps", &[], &[1e-5], f));
    let mut nodes = vec![];
    let mut x = "x".to_string();
    if f != FloatFormat::F32 {
        nodes.push(node("Cast", "/cast_in", &["x"], &["xc"], vec![attr_i("to", onnx_type(f) as i64)]));
        x = "xc".into();
    }
    nodes.extend([
        node("MatMul", "/in/MatMul", &[&x, "W_in"], &["h0"], vec![]),
        // RMSNorm decomposed, ending in Mul(normed, gamma): a foldable producer.
        node("Mul", "/rms/Sq", &["h0", "h0"], &["sq"], vec![]),
        node(
            "ReduceMean",
            "/rms/Mean",
            &["sq"],
            &["ms"],
            vec![nibble_driver::graph::build::attr_ints("axes", &[-1]), attr_i("keepdims", 1)],
        ),
        node("Add", "/rms/Add", &["ms", "eps"], &["mse"], vec![]),
        node("Sqrt", "/rms/Sqrt", &["mse"], &["rms"], vec![]),
        node("Div", "/rms/Div", &["h0", "rms"], &["normed"], vec![]),
        node("Mul", "/rms/Mul", &["normed", "gamma"], &["h1"], vec![]),
        node("MatMul", "/attn/q_proj/MatMul", &["h1", "Wq"], &["q"], vec![]),
        node("MatMul", "/attn/k_proj/MatMul", &["h1", "Wk"], &["k"], vec![]),
        node("MatMul", "/attn/v_proj/MatMul", &["h1", "Wv"], &["v"], vec![]),
        node("Add", "/attn/sum1", &["q", "k"], &["qk"], vec![]),
        node("Add", "/attn/sum2", &["qk", "v"], &["h2"], vec![]),
        node(
            "SimplifiedLayerNormalization",
            "/sln",
            &["h2", "sln_scale"],
            &["h3"],
            vec![attr_i("axis", -1), attr_f("epsilon", 1e-5)],
        ),
        node("MatMul", "/mlp/up_proj/MatMul", &["h3", "W_up"], &["up"], vec![]),
        node("MatMul", "/mlp/down_proj/MatMul", &["up", "W_down"], &["h4"], vec![]),
        node("LayerNormalization", "/ln", &["h4", "ln_scale", "ln_bias"], &["h5"], vec![attr_i("axis", -1)]),
        node(
            "Gemm",
            "/head/Gemm",
            &["h5", "W_head", "b_head"],
            &[if f == FloatFormat::F32 { "y" } else { "y16" }],
            vec![attr_i("transB", 1)],
        ),
    ]);
    if f != FloatFormat::F32 {
        nodes.push(node("Cast", "/cast_out", &["y16"], &["y"], vec![attr_i("to", 1)]));
    }
    let g = GraphProto {
        node: nodes,
        initializer: inits,
        input: vec![io("x", 1, &[None, Some(H)])],
        output: vec![io("y", 1, &[None, Some(32)])],
        ..Default::default()
    };
    model(g, 17)
}

/// Rows of x with a few strong outlier channels.
fn outlier_inputs(rows: usize, seed: u64) -> Vec<f32> {
    let mut rng = Rng::new(seed);
    let gain: Vec<f32> = (0..H).map(|k| if k % 13 == 0 { 12.0 } else { 0.5 + (k % 5) as f32 * 0.2 }).collect();
    (0..rows * H).map(|e| rng.normal() * gain[e % H]).collect()
}

fn write_npz(path: &Path, samples: usize, rows: usize) {
    let data: Vec<u8> = outlier_inputs(samples * rows, 1).iter().flat_map(|v| v.to_le_bytes()).collect();
    let npy = npy("<f4", false, &format!("({samples}, {rows}, {H})"), &data);
    let file = std::fs::File::create(path).unwrap();
    let mut zip = zip::ZipWriter::new(file);
    zip.start_file(
        "x.npy",
        zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored),
    )
    .unwrap();
    std::io::Write::write_all(&mut zip, &npy).unwrap();
    zip.finish().unwrap();
}

fn output(path: &Path, x: &[f32]) -> Vec<f32> {
    let mut s = open(path, SessionOptions::default()).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let input = Input { name: "x".into(), shape: vec![x.len() / H, H], data: InputData::F32(x.to_vec()) };
    run(&mut s, &[input]).unwrap().remove(0).data
}

fn err(a: &[f32], b: &[f32]) -> f64 {
    let num: f64 = a.iter().zip(b).map(|(p, q)| ((p - q) as f64).powi(2)).sum();
    let den: f64 = b.iter().map(|q| (*q as f64).powi(2)).sum();
    (num / den).sqrt()
}

fn quantize(src: &Path, out: &Path, method: &str, calib: &Path, extra: &[&str]) -> Model {
    let mut args = vec![
        "quantize",
        src.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
        "--method",
        method,
        "--block-size",
        "32",
        "--force",
    ];
    args.extend_from_slice(&["--calibration-data", calib.to_str().unwrap()]);
    args.extend_from_slice(extra);
    nibble_ok(&args);
    Model::load(out).unwrap()
}

/// RTN at the AWQ tests' block size, the baseline AWQ must beat.
fn quantize_rtn(src: &Path, out: &Path, extra: &[&str]) {
    let mut args = vec!["quantize", src.to_str().unwrap(), "-o", out.to_str().unwrap(), "--block-size", "32"];
    args.extend_from_slice(extra);
    nibble_ok(&args);
}

fn has_node(m: &Model, name: &str) -> bool {
    m.proto.graph.as_ref().unwrap().node.iter().any(|n| n.name.as_deref() == Some(name))
}

fn has_init(m: &Model, name: &str) -> bool {
    m.proto.graph.as_ref().unwrap().initializer.iter().any(|t| t.name.as_deref() == Some(name))
}

#[test]
fn awq_methods_beat_rtn_and_write_modelopt_graphs() {
    for format in [FloatFormat::F32, FloatFormat::F16] {
        let d = tmp();
        let src = write(awq_model(format), &d.path().join("m.onnx"), ExternalData::Never);
        let calib = d.path().join("calib.npz");
        write_npz(&calib, 4, 64);
        let held_out = outlier_inputs(256, 99);
        let reference = output(&src, &held_out);
        let rtn = d.path().join("rtn.onnx");
        quantize_rtn(&src, &rtn, &["--no-default-exclude"]);
        let rtn_err = err(&output(&rtn, &held_out), &reference);
        for method in ["awq_lite", "awq_clip", "awq_full"] {
            let out = d.path().join(format!("{method}.onnx"));
            let q = quantize(&src, &out, method, &calib, &["--no-default-exclude"]);
            let e = err(&output(&out, &held_out), &reference);
            eprintln!("{format:?} {method}: relative error {e:.4} (rtn {rtn_err:.4})");
            assert!(e < rtn_err, "{format:?} {method}: {e} not below RTN's {rtn_err}");
            if method == "awq_clip" {
                assert!(!has_node(&q, "W_in_PQS"), "awq_clip has no pre-quant scale");
                continue;
            }
            if format == FloatFormat::F32 {
                // Graph input activation: a Mul per weight.
                assert!(has_node(&q, "W_in_PQS") && has_init(&q, "W_in_awq_scale"));
            } else {
                // The f16 model casts its input first: a Cast producer is not folded, one shared Mul.
                assert!(has_node(&q, "xc_pre_quant_scale_mul") && has_init(&q, "xc_pre_quant_scale"));
            }
            // Mul(normed, gamma) producer: folded (gamma divided), no Mul.
            assert!(!has_node(&q, "h1_pre_quant_scale_mul"));
            // SimplifiedLayerNormalization producer: folded.
            assert!(!has_node(&q, "h3_pre_quant_scale_mul"));
            // MatMul producer whose own weight is quantized: folded into W_up before quantizing it.
            assert!(!has_node(&q, "up_pre_quant_scale_mul"));
            // LayerNormalization is not a folding target: one shared Mul.
            assert!(has_node(&q, "h5_pre_quant_scale_mul") && has_init(&q, "h5_pre_quant_scale"));
            for w in ["W_in", "Wq", "Wk", "Wv", "W_up", "W_down", "W_head"] {
                assert!(has_init(&q, &format!("{w}_i4")), "{w}");
            }
        }
        // Without fusion: every weight gets its own Mul, siblings their own scales.
        let out = d.path().join("nofuse.onnx");
        let q = quantize(&src, &out, "awq_lite", &calib, &["--no-fuse-siblings"]);
        for w in ["Wq", "Wk", "Wv", "W_up", "W_down"] {
            assert!(has_node(&q, &format!("{w}_PQS")), "{w}");
        }
        assert!(err(&output(&out, &held_out), &reference) < 1.0);
    }
}

#[test]
fn awq_lite_per_subgraph() {
    let d = tmp();
    let src = write(awq_model(FloatFormat::F32), &d.path().join("m.onnx"), ExternalData::Never);
    let calib = d.path().join("calib.npz");
    write_npz(&calib, 4, 64);
    let held_out = outlier_inputs(256, 99);
    let reference = output(&src, &held_out);
    let rtn = d.path().join("rtn.onnx");
    quantize_rtn(&src, &rtn, &["--no-default-exclude"]);
    let out = d.path().join("sub.onnx");
    let q = quantize(&src, &out, "awq_lite", &calib, &["--no-default-exclude", "--per-subgraph"]);
    assert!(has_init(&q, "Wq_i4") && !has_node(&q, "h1_pre_quant_scale_mul"));
    let (e, r) = (err(&output(&out, &held_out), &reference), err(&output(&rtn, &held_out), &reference));
    assert!(e < r, "per-subgraph {e} not below RTN {r}");
    let o = nibble(&[
        "quantize",
        src.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
        "--method",
        "awq_full",
        "--per-subgraph",
        "--force",
    ]);
    assert_eq!(o.status.code(), Some(1));
}

#[test]
fn awq_with_zero_point_and_random_calibration() {
    let d = tmp();
    // External data: calibration links the data file rather than copying it.
    let src = write(awq_model(FloatFormat::F32), &d.path().join("m.onnx"), ExternalData::Always);
    let before = snapshot(d.path());
    let out = d.path().join("q.onnx");
    nibble_ok(&[
        "quantize",
        src.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
        "--method",
        "awq_full",
        "--zero-point",
        "--block-size",
        "32",
        "--calibration-samples",
        "2",
        "--calibration-shapes",
        "x:16x64",
    ]);
    let q = Model::load(&out).unwrap();
    assert!(has_init(&q, "Wq_zp"));
    let after = snapshot(d.path());
    for (name, bytes) in &before {
        assert_eq!(after.iter().find(|(n, _)| n == name).map(|(_, b)| b), Some(bytes), "{name} changed");
    }
    let x = outlier_inputs(32, 5);
    let e = err(&output(&out, &x), &output(&src, &x));
    assert!(e > 0.0 && e < 0.3, "{e}");
}

#[test]
fn calibration_errors_name_the_input() {
    let d = tmp();
    let src = write(awq_model(FloatFormat::F32), &d.path().join("m.onnx"), ExternalData::Never);
    let bad = d.path().join("bad.npz");
    // An array under the wrong name.
    let file = std::fs::File::create(&bad).unwrap();
    let mut zip = zip::ZipWriter::new(file);
    zip.start_file("not_x.npy", zip::write::SimpleFileOptions::default()).unwrap();
    let header = "{'descr': '<f4', 'fortran_order': False, 'shape': (1, 2, 64), }";
    let mut npy = b"\x93NUMPY\x01\x00".to_vec();
    npy.extend((header.len() as u16 + 1).to_le_bytes());
    npy.extend(header.as_bytes());
    npy.push(b'\n');
    npy.extend(vec![0u8; 2 * 64 * 4]);
    std::io::Write::write_all(&mut zip, &npy).unwrap();
    zip.finish().unwrap();
    let o = nibble(&[
        "quantize",
        src.to_str().unwrap(),
        "-o",
        d.path().join("q.onnx").to_str().unwrap(),
        "--method",
        "awq_lite",
        "--calibration-data",
        bad.to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(1));
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(e.contains("no array named 'x'") && e.contains("not_x"), "{e}");
    assert!(!d.path().join("q.onnx").exists());
}

/// The float32 twin of a model (what ONNX Runtime's CPU provider can run for a bf16 model), saved
/// next to it and run on `x`.
fn twin_output(path: &Path, x: &[f32]) -> Vec<f32> {
    let m = Model::load(path).unwrap();
    assert!(nibble_driver::calibrate::twin::needs_twin(&m.proto), "{}: no bf16", path.display());
    let twin = nibble_driver::calibrate::twin::f32_twin(&m).unwrap();
    assert!(!nibble_driver::calibrate::twin::needs_twin(&twin), "the twin is all f32");
    let t = path.with_extension("twin.onnx");
    nibble_driver::graph::model::save(twin, &t, ExternalData::Never).unwrap();
    output(&t, x)
}

/// bfloat16 weights: ONNX Runtime's CPU provider cannot run the model, so calibration runs its
/// float32 twin; every AWQ method quantizes it, and (run through the twin) beats RTN.
#[test]
fn awq_on_bf16_models_calibrates_through_the_f32_twin() {
    let d = tmp();
    let src = write(awq_model(FloatFormat::BF16), &d.path().join("m.onnx"), ExternalData::Always);
    let calib = d.path().join("calib.npz");
    write_npz(&calib, 4, 64);
    let held_out = outlier_inputs(256, 99);
    assert!(open(&src, SessionOptions::default()).is_err(), "ORT's CPU provider runs bf16 MatMul now?");
    let reference = twin_output(&src, &held_out);
    let rtn = d.path().join("rtn.onnx");
    quantize_rtn(&src, &rtn, &["--no-default-exclude"]);
    let rtn_err = err(&twin_output(&rtn, &held_out), &reference);
    for method in ["awq_lite", "awq_clip", "awq_full"] {
        let out = d.path().join(format!("{method}.onnx"));
        let q = quantize(&src, &out, method, &calib, &["--no-default-exclude"]);
        let scale = q.proto.graph.as_ref().unwrap().initializer.iter().find(|t| t.name.as_deref() == Some("Wq_scale"));
        assert_eq!(scale.unwrap().data_type, Some(DataType::Bfloat16 as i32), "the written model stays bf16");
        let e = err(&twin_output(&out, &held_out), &reference);
        eprintln!("bf16 {method}: relative error {e:.4} (rtn {rtn_err:.4})");
        assert!(e < rtn_err, "bf16 {method}: {e} not below RTN's {rtn_err}");
    }
}

/// bf16 in the other commands: `--format matmulnbits` writes bf16 MatMulNBits (valid for ONNX
/// Runtime, which only lacks a CPU kernel for it) whose float32 twin computes what the DQ form's
/// twin computes; `nibble compare` runs bf16 models through their twins.
#[test]
fn bf16_matmulnbits_and_compare() {
    let d = tmp();
    let src = write(awq_model(FloatFormat::BF16), &d.path().join("m.onnx"), ExternalData::Never);
    let calib = d.path().join("calib.npz");
    write_npz(&calib, 2, 32);
    let held_out = outlier_inputs(64, 5);
    for method in ["rtn_dq", "awq_lite"] {
        let dq = d.path().join("dq.onnx");
        let nb = d.path().join("nb.onnx");
        quantize(&src, &dq, method, &calib, &[]);
        quantize(&src, &nb, method, &calib, &["--format", "matmulnbits", "--accuracy-level", "0"]);
        let Err(why) = open(&nb, SessionOptions::default()) else {
            panic!("ORT's CPU provider runs bf16 MatMulNBits now?")
        };
        let why = why.to_string();
        assert!(why.contains("implementation"), "{method}: not a missing-kernel error: {why}");
        let e = err(&twin_output(&nb, &held_out), &twin_output(&dq, &held_out));
        assert!(e < 1e-5, "{method}: bf16 MatMulNBits twin differs from the DQ twin by {e}");
    }
    let same = nibble_driver::cli::compare::compare(&src, &src, 3).unwrap();
    assert_eq!(same[0].relative_error, 0.0);
    let q = nibble_driver::cli::compare::compare(&src, &d.path().join("dq.onnx"), 3).unwrap();
    assert!(q[0].relative_error > 1e-3 && q[0].relative_error < 0.5, "{:?}", q[0]);
}

/// A model whose graph input and output are bfloat16 (no Casts): random calibration and a
/// calibration file of float32 arrays both feed its float32 twin; the quantized model stays bf16.
#[test]
fn bf16_inputs_and_outputs() {
    let mut rng = Rng::new(3);
    let f = FloatFormat::BF16;
    let g = GraphProto {
        node: vec![
            node("MatMul", "/a/MatMul", &["x", "W1"], &["h"], vec![]),
            node("Relu", "/relu", &["h"], &["r"], vec![]),
            node("MatMul", "/b/MatMul", &["r", "W2"], &["y"], vec![]),
        ],
        initializer: vec![
            init("W1", &[H, 96], &rng.normals(H * 96, 0.15), f),
            init("W2", &[96, 32], &rng.normals(96 * 32, 0.1), f),
        ],
        input: vec![io("x", DataType::Bfloat16 as i32, &[None, Some(H)])],
        output: vec![io("y", DataType::Bfloat16 as i32, &[None, Some(32)])],
        ..Default::default()
    };
    let d = tmp();
    let src = write(model(g, 17), &d.path().join("m.onnx"), ExternalData::Never);
    let calib = d.path().join("calib.npz");
    write_npz(&calib, 2, 16);
    let rtn = d.path().join("rtn.onnx");
    quantize_rtn(&src, &rtn, &[]);
    // Held-out inputs from each calibration's own distribution: plain normals for the random
    // calibration, outlier channels for the file.
    for (name, held_out) in [("random", Rng::new(9).normals(32 * H, 1.0)), ("file", outlier_inputs(32, 8))] {
        let reference = twin_output(&src, &held_out);
        let rtn_err = err(&twin_output(&rtn, &held_out), &reference);
        let out = d.path().join(format!("{name}.onnx"));
        let mut args = vec!["quantize", src.to_str().unwrap(), "-o", out.to_str().unwrap(), "--method", "awq_full"];
        args.extend_from_slice(&["--block-size", "32"]);
        if name == "file" {
            args.extend_from_slice(&["--calibration-data", calib.to_str().unwrap()]);
        } else {
            args.extend_from_slice(&["--calibration-samples", "2"]);
        }
        let text = nibble_ok(&args);
        assert!(text.contains("quantized 2 of 2"), "{text}");
        let q = Model::load(&out).unwrap();
        let y = q.proto.graph.as_ref().unwrap().output[0].clone();
        assert!(format!("{y:?}").contains(&format!("elem_type: Some({})", DataType::Bfloat16 as i32)));
        let e = err(&twin_output(&out, &held_out), &reference);
        eprintln!("bf16 I/O, {name} calibration: awq_full {e:.4}, rtn {rtn_err:.4}");
        assert!(e > 0.0 && e < 2.0 * rtn_err, "{name}: {e} vs RTN's {rtn_err}");
    }
}

/// Preloaded in-memory samples (`CalibrationOptions::inputs`, what the Python package passes from a
/// `CalibrationDataReader`) give the same output, byte for byte, as the `.npz` holding the same
/// arrays, for every AWQ method, in f32 and f16 (whose float32 samples are converted to float16).
#[test]
fn in_memory_calibration_samples_match_the_npz() {
    use nibble_driver::calibrate::CalibrationOptions;
    use nibble_driver::{quantize_file, Method, Options};
    let (samples, rows) = (4, 64);
    for format in [FloatFormat::F32, FloatFormat::F16] {
        let d = tmp();
        let src = write(awq_model(format), &d.path().join("m.onnx"), ExternalData::Never);
        let calib = d.path().join("calib.npz");
        write_npz(&calib, samples, rows);
        let x = outlier_inputs(samples * rows, 1);
        let in_memory: Vec<Vec<Input>> = x
            .chunks(rows * H)
            .map(|s| vec![Input { name: "x".into(), shape: vec![rows, H], data: InputData::F32(s.to_vec()) }])
            .collect();
        for method in [Method::AwqLite, Method::AwqClip, Method::AwqFull] {
            let run = |name: &str, calibration: CalibrationOptions| {
                let out = d.path().join(name);
                let mut opts = Options { method, exclude: vec![], force: true, ..Default::default() };
                opts.awq.calibration = calibration;
                quantize_file(&src, &out, &opts).unwrap();
                std::fs::read(&out).unwrap()
            };
            let from_file = run("file.onnx", CalibrationOptions { data: Some(calib.clone()), ..Default::default() });
            let from_memory =
                run("memory.onnx", CalibrationOptions { inputs: Some(in_memory.clone()), ..Default::default() });
            let random = run("random.onnx", CalibrationOptions::default());
            assert!(from_file == from_memory, "{format:?} {method:?}: in-memory samples give another model");
            assert!(from_file != random, "{format:?} {method:?}: the calibration data must matter");
        }
    }
    // A sample without the model's input is refused, naming it.
    let d = tmp();
    let src = write(awq_model(FloatFormat::F32), &d.path().join("m.onnx"), ExternalData::Never);
    let mut opts = Options { method: Method::AwqLite, ..Default::default() };
    opts.awq.calibration.inputs =
        Some(vec![vec![Input { name: "y".into(), shape: vec![1, H], data: InputData::F32(vec![0.0; H]) }]]);
    let e = quantize_file(&src, &d.path().join("q.onnx"), &opts).unwrap_err().to_string();
    assert!(e.contains("no array named 'x'") && e.contains("\"y\""), "{e}");
    assert!(!d.path().join("q.onnx").exists());
}
