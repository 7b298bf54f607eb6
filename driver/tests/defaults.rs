//! The measured defaults ([`nibble_driver::recipe`]): `--target-bits` without `--method` quantizes
//! with `gptq --zero-point --act-order` when calibration data is given (text or `.npz`), and with
//! `rtn_dq --zero-point` without it; an explicit `--method` wins; an onnxruntime-genai folder is
//! written as MatMulNBits (accuracy level 4) unless `--format` is given, while a plain `.onnx` file
//! and an Optimum folder keep the DequantizeLinear form. Each default is checked to write the same
//! tensors as the explicit options it stands for (and different ones from the other choices), and
//! every output runs in ONNX Runtime with default session options and with optimizations disabled.

mod common;

use common::{decoder_logits, nibble_ok, npy, npz, rel_err, run, text, tmp};
use nibble_driver::cli::decoder_example::{write_folder, DecoderConfig, DecoderKind};
use nibble_driver::cli::example::{transformer, TransformerConfig};
use nibble_driver::graph::model::{ExternalData, Model};
use nibble_driver::runtime::{open, run_f32, SessionOptions};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// A decoder example folder of `kind` under `root`.
fn folder(root: &Path, kind: DecoderKind) -> PathBuf {
    let dir = root.join(format!("{kind:?}").to_lowercase());
    write_folder(&dir, kind, &DecoderConfig::default(), false).unwrap();
    dir
}

/// Every initializer of the model at `path` by name: element type and bytes (the order tensors
/// are laid out in the data file depends on which weight finished first, so files are not compared).
fn tensors(path: &Path) -> BTreeMap<String, (i32, Vec<u8>)> {
    let m = Model::load(path).unwrap();
    let g = m.proto.graph.as_ref().unwrap();
    g.initializer
        .iter()
        .map(|t| (t.name.clone().unwrap_or_default(), (t.data_type.unwrap_or(0), m.tensor_bytes(t).unwrap().to_vec())))
        .collect()
}

/// How many nodes of each quantized op type, and the MatMulNBits accuracy levels.
fn ops(path: &Path) -> (usize, usize, Vec<i64>) {
    let m = Model::load(path).unwrap();
    let g = m.proto.graph.as_ref().unwrap();
    let count = |op: &str| g.node.iter().filter(|n| n.op_type.as_deref() == Some(op)).count();
    let levels = g
        .node
        .iter()
        .filter(|n| n.op_type.as_deref() == Some("MatMulNBits"))
        .map(|n| {
            n.attribute.iter().find(|a| a.name.as_deref() == Some("accuracy_level")).and_then(|a| a.i).unwrap_or(0)
        })
        .collect();
    (count("DequantizeLinear"), count("MatMulNBits"), levels)
}

/// Token windows of the example folders' tokenizer range for the logits checks.
fn windows() -> Vec<Vec<i64>> {
    (0..2).map(|s| (0..24).map(|i| 257 + ((s * 24 + i) * 37) % 700).collect()).collect()
}

/// The decoder output of `dir`'s model.onnx in both session modes is close to the float model's
/// (`reference`) and not equal to it.
fn runs_in_both_modes(dir: &Path, reference: &[f32]) {
    for (mode, got) in ["default", "no optimization"].iter().zip(decoder_logits(&dir.join("model.onnx"), &windows())) {
        let e = rel_err(&got, reference);
        assert!(e > 0.0 && e < 0.5, "{} ({mode} session): relative error {e}", dir.display());
    }
}

/// A `--target-bits` value inside what the example folder allows at block 32 with zero points.
fn target(dir: &Path) -> String {
    use nibble_driver::pipeline::{plan_target_bits, Options};
    let mut opts = Options { block_size: 32, zero_point: true, target_bits: Some(6.0), ..Options::default() };
    opts.awq.calibration.random = true;
    opts.awq.calibration.samples = 2;
    let (lo, hi) = plan_target_bits(&dir.join("model.onnx"), &opts).unwrap().range;
    format!("{:.3}", lo + 0.4 * (hi - lo))
}

/// `quantize DIR -o OUT --block-size 32 ARGS`, returning stdout.
fn quantize(dir: &Path, out: &Path, args: &[&str]) -> String {
    let mut all = vec!["quantize", dir.to_str().unwrap(), "-o", out.to_str().unwrap(), "--block-size", "32"];
    all.extend_from_slice(args);
    nibble_ok(&all)
}

/// With text or `.npz` calibration, `--target-bits` alone is `gptq --zero-point --act-order` (the
/// same tensors as those options given explicitly; not those without `--act-order`, nor rtn_dq's),
/// says so, and an explicit `--method` wins with its own options.
#[test]
fn target_bits_with_data_defaults_to_gptq_zero_point_act_order() {
    let t = tmp();
    let dir = folder(t.path(), DecoderKind::Genai);
    let txt = t.path().join("calib.txt");
    std::fs::write(&txt, text(3000)).unwrap();
    let npz_path = t.path().join("calib.npz");
    let ids: Vec<i64> = (0..4 * 48).map(|i| 257 + (i * 53) % 700).collect();
    let bytes: Vec<u8> = ids.iter().flat_map(|v| v.to_le_bytes()).collect();
    npz(&npz_path, &[("input_ids", npy("<i8", false, "(4, 48)", &bytes))]);
    let tb = target(&dir);
    let reference = decoder_logits(&dir.join("model.onnx"), &windows())[1].clone();
    let text_calib =
        ["--calibration-text", txt.to_str().unwrap(), "--calibration-samples", "4", "--calibration-seq-len", "48"];
    let npz_calib = ["--calibration-data", npz_path.to_str().unwrap()];
    for (name, calib) in [("text", &text_calib[..]), ("npz", &npz_calib[..])] {
        let q = |label: &str, extra: &[&str]| {
            let out = t.path().join(format!("{name}_{label}"));
            let mut args = vec!["--target-bits", tb.as_str()];
            args.extend_from_slice(calib);
            args.extend_from_slice(extra);
            let stdout = quantize(&dir, &out, &args);
            runs_in_both_modes(&out, &reference);
            (tensors(&out.join("model.onnx")), stdout)
        };
        let (default, stdout) = q("default", &[]);
        assert!(stdout.contains("default: --target-bits without --method: gptq --zero-point --act-order"), "{stdout}");
        assert!(stdout.contains("bits/parameter achieved"), "{stdout}");
        let (explicit, stdout) = q("explicit", &["--method", "gptq", "--zero-point", "--act-order"]);
        assert!(!stdout.contains("--target-bits without --method"), "{stdout}");
        assert!(default == explicit, "{name}: the default is not gptq --zero-point --act-order");
        let (no_act_order, _) = q("gptq_zp", &["--method", "gptq", "--zero-point"]);
        assert!(default != no_act_order, "{name}: --act-order changed nothing; the check cannot tell");
        // An explicit method keeps its own options: rtn_dq without a zero point, symmetric INT4.
        let (rtn, stdout) = q("rtn_dq", &["--method", "rtn_dq"]);
        assert!(!stdout.contains("--target-bits without --method"), "{stdout}");
        assert!(!rtn.keys().any(|k| k.contains("zero_points")), "{name}: rtn_dq got zero points");
        assert!(default.keys().any(|k| k.contains("zero_points")), "{name}: the default has no zero points");
    }
}

/// Without calibration data (`--calibration-random` on a decoder; random float inputs on a plain
/// model) `--target-bits` alone is `rtn_dq --zero-point`, and says why.
#[test]
fn target_bits_without_data_falls_back_to_rtn_dq_zero_point() {
    let t = tmp();
    let dir = folder(t.path(), DecoderKind::Genai);
    let tb = target(&dir);
    let reference = decoder_logits(&dir.join("model.onnx"), &windows())[1].clone();
    let q = |label: &str, extra: &[&str]| {
        let out = t.path().join(label);
        let mut args = vec!["--target-bits", tb.as_str(), "--calibration-random", "--calibration-samples", "2"];
        args.extend_from_slice(extra);
        let stdout = quantize(&dir, &out, &args);
        runs_in_both_modes(&out, &reference);
        (tensors(&out.join("model.onnx")), stdout)
    };
    let (default, stdout) = q("default", &[]);
    assert!(stdout.contains("without calibration data: rtn_dq --zero-point"), "{stdout}");
    let (explicit, _) = q("explicit", &["--method", "rtn_dq", "--zero-point"]);
    assert!(default == explicit, "the data-free default is not rtn_dq --zero-point");
    let (symmetric, _) = q("symmetric", &["--method", "rtn_dq"]);
    assert!(default != symmetric);

    // A plain model with float inputs (random calibration by default): the same fallback.
    let src = t.path().join("m.onnx");
    common::write(transformer(&TransformerConfig::default()), &src, ExternalData::Never);
    let x = common::random_input("input", &[1, 16, 256], 3);
    let float = run(&src, std::slice::from_ref(&x)).remove(0).data;
    let file_q = |label: &str, extra: &[&str]| {
        let out = t.path().join(format!("{label}.onnx"));
        let mut args = vec!["quantize", src.to_str().unwrap(), "-o", out.to_str().unwrap(), "--target-bits", "5"];
        args.extend_from_slice(&["--calibration-samples", "2"]);
        args.extend_from_slice(extra);
        let stdout = nibble_ok(&args);
        for opts in [
            SessionOptions { ort_defaults: true, no_optimization: false },
            SessionOptions { ort_defaults: false, no_optimization: true },
        ] {
            let mut s = open(&out, opts).unwrap();
            let y = run_f32(&mut s, std::slice::from_ref(&x)).unwrap().remove(0).data;
            let e = rel_err(&y, &float);
            assert!(e > 0.0 && e < 0.5, "{label}: relative error {e}");
        }
        (tensors(&out), ops(&out), stdout)
    };
    let (default, form, stdout) = file_q("file_default", &[]);
    assert!(stdout.contains("without calibration data: rtn_dq --zero-point"), "{stdout}");
    // A plain .onnx keeps ModelOpt's form.
    assert!(form.0 > 0 && form.1 == 0, "{form:?}");
    let (explicit, _, _) = file_q("file_explicit", &["--method", "rtn_dq", "--zero-point"]);
    assert!(default == explicit);
}

/// An onnxruntime-genai folder without `--format` is written as MatMulNBits at accuracy level 4
/// (the builder's form), and says so; `--format dq` and `--accuracy-level` still apply; an Optimum
/// folder keeps the DequantizeLinear form.
#[test]
fn genai_folders_default_to_matmulnbits() {
    let t = tmp();
    let dir = folder(t.path(), DecoderKind::Genai);
    let reference = decoder_logits(&dir.join("model.onnx"), &windows())[1].clone();
    // label, extra arguments, (DequantizeLinear written, MatMulNBits written), accuracy level.
    type Case<'a> = (&'a str, &'a [&'a str], (bool, bool), Option<i64>);
    let cases: [Case; 4] = [
        ("default", &[], (false, true), Some(4)),
        ("dq", &["--format", "dq"], (true, false), None),
        ("level1", &["--accuracy-level", "1"], (false, true), Some(1)),
        ("nbits", &["--format", "matmulnbits"], (false, true), Some(4)),
    ];
    let mut written = BTreeMap::new();
    for (label, args, (dq, nbits), level) in cases {
        let out = t.path().join(label);
        let stdout = quantize(&dir, &out, args);
        assert_eq!(
            stdout.contains("default: onnxruntime-genai folder: --format matmulnbits"),
            args.is_empty() || label == "level1",
            "{label}: {stdout}"
        );
        let (n_dq, n_nbits, levels) = ops(&out.join("model.onnx"));
        assert_eq!((n_dq > 0, n_nbits > 0), (dq, nbits), "{label}: {n_dq} DequantizeLinear, {n_nbits} MatMulNBits");
        if let Some(l) = level {
            assert!(levels.iter().all(|&v| v == l), "{label}: accuracy levels {levels:?}");
        }
        runs_in_both_modes(&out, &reference);
        written.insert(label, tensors(&out.join("model.onnx")));
    }
    assert!(written["default"] == written["nbits"], "the default is not --format matmulnbits");

    let optimum = folder(t.path(), DecoderKind::Optimum);
    let out = t.path().join("optimum_q");
    let stdout = quantize(&optimum, &out, &[]);
    assert!(!stdout.contains("--format matmulnbits"), "{stdout}");
    let (n_dq, n_nbits, _) = ops(&out.join("model.onnx"));
    assert!(n_dq > 0 && n_nbits == 0, "Optimum: {n_dq} DequantizeLinear, {n_nbits} MatMulNBits");
    let float = decoder_logits(&optimum.join("model.onnx"), &windows())[1].clone();
    runs_in_both_modes(&out, &float);
}
