//! GPTQ end to end: a model whose activations have outlier channels, calibrated on such inputs,
//! quantized with gptq, awq_gptq and rtn_dq --scale-search (DQ and MatMulNBits forms, f32 and
//! f16, zero point, an INT8 layer, a Gemm transB=1 weight), run in ONNX Runtime with its graph
//! optimizations on (MatMulNBits accuracy_level 1, as `runtime::open` sets it) and disabled, and
//! compared on held-out inputs with rtn_dq, awq_clip and awq_lite at block 128.

mod common;

use common::*;
use nibble::FloatFormat;
use nibble_driver::graph::build::{attr_i, init, io, model, node};
use nibble_driver::graph::floats::onnx_type;
use nibble_driver::graph::model::{ExternalData, Model};
use nibble_driver::graph::onnx::{GraphProto, ModelProto};
use nibble_driver::rng::Rng;
use nibble_driver::runtime::{open, run, Input, InputData, SessionOptions};
use std::path::Path;

const H: usize = 256;
const OUT: usize = 64;

/// x -> [W_in] -> Mul(gamma) -> [q, k, v] (siblings) -> sum -> [up] -> Relu -> [down]
///   -> Gemm transB=1 [head] -> y.
fn gptq_model(format: FloatFormat) -> ModelProto {
    let mut rng = Rng::new(42);
    let f = format;
    let mut w = |name: &str, k: usize, n: usize| init(name, &[k, n], &rng.normals(k * n, 1.0 / (k as f32).sqrt()), f);
    let mut inits =
        vec![w("W_in", H, H), w("Wq", H, H), w("Wk", H, H), w("Wv", H, H), w("W_up", H, 2 * H), w("W_down", 2 * H, H)];
    let mut rng2 = Rng::new(7);
    inits.push(init("W_head", &[OUT, H], &rng2.normals(OUT * H, 1.0 / (H as f32).sqrt()), f)); // transB=1: [N, K]
    inits.push(init("b_head", &[OUT], &rng2.normals(OUT, 0.1), f));
    let gamma: Vec<f32> = (0..H).map(|i| if i % 17 == 0 { 6.0 } else { 0.5 + (i % 7) as f32 * 0.25 }).collect();
    inits.push(init("gamma", &[H], &gamma, f));
    let mut nodes = vec![];
    let mut x = "x".to_string();
    if f != FloatFormat::F32 {
        nodes.push(node("Cast", "/cast_in", &["x"], &["xc"], vec![attr_i("to", onnx_type(f) as i64)]));
        x = "xc".into();
    }
    nodes.extend([
        node("MatMul", "/in/MatMul", &[&x, "W_in"], &["h0"], vec![]),
        node("Mul", "/norm/Mul", &["h0", "gamma"], &["h1"], vec![]),
        node("MatMul", "/attn/q_proj/MatMul", &["h1", "Wq"], &["q"], vec![]),
        node("MatMul", "/attn/k_proj/MatMul", &["h1", "Wk"], &["k"], vec![]),
        node("MatMul", "/attn/v_proj/MatMul", &["h1", "Wv"], &["v"], vec![]),
        node("Add", "/attn/sum1", &["q", "k"], &["qk"], vec![]),
        node("Add", "/attn/sum2", &["qk", "v"], &["h2"], vec![]),
        node("MatMul", "/mlp/up_proj/MatMul", &["h2", "W_up"], &["up"], vec![]),
        node("Relu", "/mlp/act", &["up"], &["act"], vec![]),
        node("MatMul", "/mlp/down_proj/MatMul", &["act", "W_down"], &["h3"], vec![]),
        node(
            "Gemm",
            "/head/Gemm",
            &["h3", "W_head", "b_head"],
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
        output: vec![io("y", 1, &[None, Some(OUT)])],
        ..Default::default()
    };
    model(g, 17)
}

/// Rows of x with a few strong outlier channels and correlated channels (where the Hessian's
/// off-diagonal terms, which GPTQ uses, matter).
fn outlier_inputs(rows: usize, seed: u64) -> Vec<f32> {
    let mut rng = Rng::new(seed);
    let gain: Vec<f32> = (0..H).map(|k| if k % 13 == 0 { 10.0 } else { 0.5 + (k % 5) as f32 * 0.2 }).collect();
    let mut x = Vec::with_capacity(rows * H);
    for _ in 0..rows {
        let common: Vec<f32> = (0..8).map(|_| rng.normal()).collect();
        for (k, g) in gain.iter().enumerate() {
            x.push((rng.normal() + 1.5 * common[k % 8]) * g);
        }
    }
    x
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

/// The model's output on `x`, in a session with optimizations on or disabled; `ort_defaults`:
/// ONNX Runtime's own defaults (fused MatMulNBits with int8 activations).
fn output_with(path: &Path, x: &[f32], no_optimization: bool, ort_defaults: bool) -> Vec<f32> {
    let opts = SessionOptions { no_optimization, ort_defaults };
    let mut s = open(path, opts).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let input = Input { name: "x".into(), shape: vec![x.len() / H, H], data: InputData::F32(x.to_vec()) };
    run(&mut s, &[input]).unwrap().remove(0).data
}

/// The relative output error with optimizations on (fp32 activations in the fused node) and
/// disabled (which must agree closely); the optimized one. A session with ONNX Runtime's own
/// defaults (int8 activations) must run the model too, with a finite error.
fn checked_err(path: &Path, x: &[f32], reference: &[f32]) -> f64 {
    let a = err(&output_with(path, x, false, false), reference);
    let b = err(&output_with(path, x, true, false), reference);
    let c = err(&output_with(path, x, false, true), reference);
    assert!(a.is_finite() && b.is_finite() && c.is_finite(), "{}: {a} / {b} / {c}", path.display());
    assert!((a - b).abs() <= 0.02 * b.max(1e-6), "{}: session modes disagree: {a} vs {b}", path.display());
    a
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
        "--force",
        "--no-default-exclude",
        "--calibration-data",
        calib.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    nibble_ok(&args);
    Model::load(out).unwrap()
}

fn init_named<'a>(m: &'a Model, name: &str) -> Option<&'a nibble_driver::graph::onnx::TensorProto> {
    m.proto.graph.as_ref().unwrap().initializer.iter().find(|t| t.name.as_deref() == Some(name))
}

fn has_op(m: &Model, op: &str) -> bool {
    m.proto.graph.as_ref().unwrap().node.iter().any(|n| n.op_type.as_deref() == Some(op))
}

struct Fixture {
    _dir: tempfile::TempDir,
    dir: std::path::PathBuf,
    src: std::path::PathBuf,
    calib: std::path::PathBuf,
    held_out: Vec<f32>,
    reference: Vec<f32>,
}

fn fixture(format: FloatFormat) -> Fixture {
    let d = tmp();
    let dir = d.path().to_path_buf();
    let src = write(gptq_model(format), &dir.join("m.onnx"), ExternalData::Never);
    let calib = dir.join("calib.npz");
    write_npz(&calib, 8, 128);
    let held_out = outlier_inputs(512, 99);
    let reference = output_with(&src, &held_out, true, false);
    Fixture { _dir: d, dir, src, calib, held_out, reference }
}

#[test]
fn gptq_beats_rtn_and_awq_at_block_128() {
    for format in [FloatFormat::F32, FloatFormat::F16] {
        let fx = fixture(format);
        let mut errs = vec![];
        for (name, method, extra) in [
            ("rtn_dq", "rtn_dq", vec![]),
            ("rtn_dq --scale-search", "rtn_dq", vec!["--scale-search"]),
            ("rtn_dq --scale-search clip 0.5", "rtn_dq", vec!["--scale-search", "--scale-search-clip-min", "0.5"]),
            ("awq_clip", "awq_clip", vec![]),
            ("awq_lite", "awq_lite", vec![]),
            ("gptq", "gptq", vec![]),
            ("gptq --act-order", "gptq", vec!["--act-order"]),
            ("gptq --scale-search", "gptq", vec!["--scale-search"]),
            ("awq_gptq", "awq_gptq", vec![]),
            ("awq_gptq --scale-search", "awq_gptq", vec!["--scale-search"]),
        ] {
            let out = fx.dir.join(format!("{}.onnx", name.replace([' ', '-'], "_")));
            let mut args = vec!["--block-size", "128"];
            args.extend(extra);
            let q = quantize(&fx.src, &out, method, &fx.calib, &args);
            for w in ["W_in", "Wq", "Wk", "Wv", "W_up", "W_down", "W_head"] {
                assert!(init_named(&q, &format!("{w}_i4")).is_some(), "{name}: {w}");
            }
            let e = checked_err(&out, &fx.held_out, &fx.reference);
            eprintln!("{format:?} block 128 {name}: relative output error {e:.5}");
            errs.push((name, e));
        }
        let e = |n: &str| errs.iter().find(|(m, _)| *m == n).unwrap().1;
        assert!(e("gptq") < e("rtn_dq"), "{format:?}: gptq {} vs rtn_dq {}", e("gptq"), e("rtn_dq"));
        assert!(e("gptq") < e("awq_clip"), "{format:?}: gptq {} vs awq_clip {}", e("gptq"), e("awq_clip"));
        assert!(e("rtn_dq --scale-search") < e("rtn_dq"), "{format:?}: scale search not below rtn_dq");
        // Clip ratios lower the weight error further: they change the result.
        assert!(e("rtn_dq --scale-search clip 0.5") < e("rtn_dq"), "{format:?}: clipped search not below rtn_dq");
        assert_ne!(e("rtn_dq --scale-search clip 0.5"), e("rtn_dq --scale-search"), "{format:?}: clip ratios unused");
        assert!(e("awq_gptq") < e("rtn_dq"), "{format:?}: awq_gptq not below rtn_dq");
        assert!(e("gptq --scale-search") < e("rtn_dq --scale-search"), "{format:?}: gptq search not below rtn search");
    }
}

#[test]
fn gptq_forms_zero_point_int8_and_negative_scales_run_in_onnx_runtime() {
    for format in [FloatFormat::F32, FloatFormat::F16] {
        let fx = fixture(format);
        for method in ["gptq", "awq_gptq", "rtn_dq"] {
            for form in ["dq", "matmulnbits"] {
                for zp in [false, true] {
                    let name = format!("{method}_{form}_{zp}");
                    let out = fx.dir.join(format!("{name}.onnx"));
                    let mut args =
                        vec!["--block-size", "32", "--format", form, "--accuracy-level", "0", "--scale-search"];
                    if zp {
                        args.push("--zero-point");
                    }
                    if method != "rtn_dq" {
                        // An INT8 layer (per channel) and GPTQ's options.
                        args.extend(["--int8-layers", "/mlp/down_proj/MatMul", "--gptq-batch", "16"]);
                    }
                    let q = quantize(&fx.src, &out, method, &fx.calib, &args);
                    let e = checked_err(&out, &fx.held_out, &fx.reference);
                    eprintln!("{format:?} block 32 {name} --scale-search: relative output error {e:.5}");
                    assert!(e < 0.2, "{name}: {e}");
                    if form == "matmulnbits" {
                        assert!(has_op(&q, "MatMulNBits"), "{name}");
                        continue;
                    }
                    // The symmetric 16-level grid gives negative scales (extreme / -8).
                    if !zp {
                        let t = init_named(&q, "Wq_scale").expect("Wq_scale");
                        assert!(floats(&q, t).iter().any(|&s| s < 0.0), "{name}: no negative scale searched");
                    }
                    if method != "rtn_dq" {
                        let t = init_named(&q, "W_down_i4").expect("W_down codes");
                        assert!(matches!(t.data_type, Some(2 | 3)), "{name}: INT8 layer is {:?}", t.data_type);
                    }
                }
            }
        }
        // The QDQ `rtn` form with searched (negative) scales.
        let out = fx.dir.join("rtn_qdq.onnx");
        let mut args = vec!["quantize", fx.src.to_str().unwrap(), "-o", out.to_str().unwrap()];
        args.extend(["--method", "rtn", "--scale-search", "--block-size", "32", "--no-default-exclude"]);
        nibble_ok(&args);
        let e = checked_err(&out, &fx.held_out, &fx.reference);
        assert!(e < 0.2, "rtn --scale-search: {e}");
        // nibble compare on a searched model.
        let cmp = nibble_ok(&["compare", fx.src.to_str().unwrap(), out.to_str().unwrap()]);
        assert!(cmp.contains('y'), "{cmp}");
    }
}

#[test]
fn bad_gptq_options_fail_clearly() {
    let fx = fixture(FloatFormat::F32);
    let out = fx.dir.join("bad.onnx");
    for (opt, val, needle) in
        [("--percdamp", "-0.1", "--percdamp"), ("--gptq-batch", "0", "--gptq-batch"), ("--percdamp", "x", "--percdamp")]
    {
        let r = nibble(&[
            "quantize",
            fx.src.to_str().unwrap(),
            "-o",
            out.to_str().unwrap(),
            "--method",
            "gptq",
            "--calibration-data",
            fx.calib.to_str().unwrap(),
            opt,
            val,
        ]);
        let stderr = String::from_utf8_lossy(&r.stderr);
        let code = r.status.code().unwrap();
        assert!(code == 1 || code == 2, "{opt} {val}: exit {code}");
        assert!(stderr.contains(needle), "{opt} {val}: {stderr}");
        assert!(!stderr.contains("panicked"), "{stderr}");
        assert!(!out.exists(), "{opt} {val}: output written");
    }
    // --scale-search with an AWQ-only method.
    let r = nibble(&[
        "quantize",
        fx.src.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
        "--method",
        "awq_lite",
        "--scale-search",
    ]);
    assert_eq!(r.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&r.stderr).contains("--scale-search"));
    // A clip ratio outside (0, 1], and a clip ratio without the search.
    let src = fx.src.to_str().unwrap();
    let r = nibble(&["quantize", src, "-o", out.to_str().unwrap(), "--scale-search", "--scale-search-clip-min", "0"]);
    assert_eq!(r.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&r.stderr).contains("--scale-search-clip-min 0: use a ratio in (0, 1]"));
    let r = nibble(&["quantize", src, "-o", out.to_str().unwrap(), "--scale-search-clip-min", "0.5"]);
    assert_eq!(r.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&r.stderr).contains("--scale-search"));
    assert!(!out.exists());
    // --sequential with a method that has no sequential calibration.
    let r = nibble(&["quantize", fx.src.to_str().unwrap(), "-o", out.to_str().unwrap(), "--sequential"]);
    assert_eq!(r.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&r.stderr).contains("--sequential works with --method gptq"));
    assert!(!out.exists());
}

/// `--sequential`: the first layer (fed by the graph input) sees the same activations as without
/// it, so its codes are identical; every later layer is fitted to the activations of the quantized
/// layers before it, so its codes change; the outputs run in ONNX Runtime, about as accurate as
/// (here: never more than 15% worse than) calibrating on the float model.
#[test]
fn sequential_calibration_fits_each_layer_to_the_quantized_layers_before_it() {
    for format in [FloatFormat::F32, FloatFormat::F16] {
        let fx = fixture(format);
        for method in ["gptq", "awq_gptq"] {
            let plain_out = fx.dir.join(format!("{method}_plain.onnx"));
            let seq_out = fx.dir.join(format!("{method}_seq.onnx"));
            let plain = quantize(&fx.src, &plain_out, method, &fx.calib, &["--block-size", "32"]);
            let seq = quantize(&fx.src, &seq_out, method, &fx.calib, &["--block-size", "32", "--sequential"]);
            let codes = |m: &Model, w: &str| init_named(m, &format!("{w}_i4")).unwrap().raw_data.clone().unwrap();
            assert_eq!(codes(&plain, "W_in"), codes(&seq, "W_in"), "{format:?} {method}: first layer");
            for w in ["Wq", "W_up", "W_down", "W_head"] {
                assert_ne!(
                    codes(&plain, w),
                    codes(&seq, w),
                    "{format:?} {method}: {w} did not see the quantized input"
                );
            }
            let (e_plain, e_seq) = (
                checked_err(&plain_out, &fx.held_out, &fx.reference),
                checked_err(&seq_out, &fx.held_out, &fx.reference),
            );
            eprintln!("{format:?} block 32 {method}: relative output error {e_plain:.5}, --sequential {e_seq:.5}");
            assert!(e_seq <= 1.15 * e_plain, "{format:?} {method}: --sequential {e_seq} vs {e_plain}");
        }
    }
}
