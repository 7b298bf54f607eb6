//! Model folders in and out (`nibble quantize IN_DIR -o OUT_DIR`): onnxruntime-genai and Optimum
//! layouts, every other file copied byte for byte, the model's weights in `<model>.onnx.data`, the
//! output run in ONNX Runtime with default session options and with optimizations disabled, and the
//! errors (nothing written, input unchanged).

mod common;

use common::{nibble, nibble_ok, tmp};
use nibble_driver::cli::example::{transformer, TransformerConfig};
use nibble_driver::graph::model::{save_with_data, ExternalData, Model};
use nibble_driver::runtime::{open, run_f32, NamedTensor, SessionOptions};
use std::path::{Path, PathBuf};

const HIDDEN: usize = 64;

fn config() -> TransformerConfig {
    TransformerConfig { hidden: HIDDEN, intermediate: 128, layers: 2, vocab: 96, ..Default::default() }
}

/// Writes the example transformer to `dir/name` with its weights in `dir/data`.
fn write_model(dir: &Path, name: &str, data: &str, seed: u64) {
    let proto = transformer(&TransformerConfig { seed, ..config() });
    save_with_data(proto, &dir.join(name), &dir.join(data), ExternalData::Always, false).unwrap();
}

/// Every file under `dir` (relative path, bytes), sorted.
fn tree(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        for e in std::fs::read_dir(dir.join(&rel)).unwrap() {
            let p = rel.join(e.unwrap().file_name());
            if dir.join(&p).is_dir() {
                stack.push(p);
            } else {
                out.push((p.clone(), std::fs::read(dir.join(&p)).unwrap()));
            }
        }
    }
    out.sort();
    out
}

/// An onnxruntime-genai-shaped folder: genai_config.json naming model.onnx, weights in
/// model.onnx.data, tokenizer files, a chat template and a subfolder.
fn genai_folder(root: &Path) -> PathBuf {
    let dir = root.join("genai");
    std::fs::create_dir_all(dir.join("extra")).unwrap();
    write_model(&dir, "model.onnx", "model.onnx.data", 1);
    std::fs::write(
        dir.join("genai_config.json"),
        r#"{"model": {"type": "llama", "decoder": {"filename": "model.onnx", "inputs": {"input_ids": "input"}, "outputs": {"logits": "logits"}}, "vocab_size": 96}}"#,
    )
    .unwrap();
    std::fs::write(dir.join("tokenizer.json"), "{\"version\": \"1.0\", \"model\": {\"type\": \"BPE\"}}\n").unwrap();
    std::fs::write(dir.join("tokenizer_config.json"), "{\"bos_token\": \"<s>\"}").unwrap();
    std::fs::write(dir.join("chat_template.jinja"), "{% for m in messages %}{{ m.content }}{% endfor %}").unwrap();
    std::fs::write(dir.join("extra").join("notes.bin"), [0u8, 1, 2, 255, 254]).unwrap();
    dir
}

/// An Optimum-shaped folder: config.json, decoder_model_merged.onnx (the decoder) and
/// decoder_model.onnx (left float), each with its own external data.
fn optimum_folder(root: &Path) -> PathBuf {
    let dir = root.join("optimum");
    std::fs::create_dir_all(&dir).unwrap();
    write_model(&dir, "decoder_model_merged.onnx", "decoder_model_merged.onnx_data", 2);
    write_model(&dir, "decoder_model.onnx", "decoder_model.onnx_data", 3);
    std::fs::write(dir.join("config.json"), "{\"model_type\": \"llama\", \"hidden_size\": 64}").unwrap();
    std::fs::write(dir.join("generation_config.json"), "{\"do_sample\": false}").unwrap();
    std::fs::write(dir.join("tokenizer.json"), "{\"version\": \"1.0\"}").unwrap();
    dir
}

fn input() -> NamedTensor {
    common::random_input("input", &[1, 5, HIDDEN], 7)
}

/// The model's logits in a session with ONNX Runtime's default options, and with optimizations
/// disabled.
fn logits_both(path: &Path) -> [Vec<f32>; 2] {
    [
        SessionOptions { no_optimization: false, ort_defaults: true },
        SessionOptions { no_optimization: true, ort_defaults: false },
    ]
    .map(|opts| {
        let mut s = open(path, opts).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        run_f32(&mut s, &[input()]).unwrap().remove(0).data
    })
}

/// The quantized model runs in both session modes with a small, non-zero error against the float
/// model, and holds quantized weights (in either output form).
fn check_quantized(original: &Path, quantized: &Path) {
    let reference = logits_both(original)[1].clone();
    for (mode, got) in ["default", "no optimization"].iter().zip(logits_both(quantized)) {
        let e = common::rel_err(&got, &reference);
        assert!(e > 0.0 && e < 0.2, "{} ({mode} session): relative error {e}", quantized.display());
    }
    let model = Model::load(quantized).unwrap();
    let g = model.proto.graph.as_ref().unwrap();
    // DequantizeLinear (ModelOpt's form) or MatMulNBits (a genai folder's default form).
    let q = g.node.iter().filter(|n| matches!(n.op_type.as_deref(), Some("DequantizeLinear" | "MatMulNBits"))).count();
    assert!(q >= 8, "{}: {q} DequantizeLinear/MatMulNBits nodes", quantized.display());
}

/// Every file of `input` but `skipped` is in `output` with the same bytes.
fn assert_copied(input: &Path, output: &Path, skipped: &[&str]) {
    for (rel, bytes) in tree(input) {
        if skipped.iter().any(|s| rel == Path::new(s)) {
            continue;
        }
        let got = std::fs::read(output.join(&rel)).unwrap_or_else(|e| panic!("{}: {e}", rel.display()));
        assert!(got == bytes, "{} differs from the input's", rel.display());
    }
}

#[test]
fn genai_folder_in_and_out() {
    let t = tmp();
    let input = genai_folder(t.path());
    let before = tree(&input);
    let out = t.path().join("genai_int4");
    // ModelOpt's DequantizeLinear form (a genai folder's default is MatMulNBits: driver/tests/defaults.rs).
    let args =
        ["quantize", input.to_str().unwrap(), "-o", out.to_str().unwrap(), "--block-size", "32", "--format", "dq"];
    let stdout = nibble_ok(&args);
    assert!(stdout.contains("onnxruntime-genai folder"), "{stdout}");
    assert_eq!(tree(&input), before, "the input folder changed");
    assert_copied(&input, &out, &["model.onnx", "model.onnx.data"]);
    // Same files, no others (no model.onnx_data, no temporary files).
    let names = |d: &Path| tree(d).into_iter().map(|(p, _)| p).collect::<Vec<_>>();
    assert_eq!(names(&out), names(&input));
    // The weights are in model.onnx.data, referenced by that name.
    let model = Model::load(&out.join("model.onnx")).unwrap();
    let files = model.external_files();
    assert_eq!(files.len(), 1, "{files:?}");
    assert_eq!(files[0].file_name().unwrap(), "model.onnx.data");
    assert!(std::fs::metadata(out.join("model.onnx.data")).unwrap().len() > 10_000);
    check_quantized(&input.join("model.onnx"), &out.join("model.onnx"));
    // Nothing of the temporary folder is left next to the output.
    let leftovers: Vec<_> = std::fs::read_dir(t.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains("nibble"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

#[test]
fn optimum_folder_quantizes_the_merged_decoder() {
    let t = tmp();
    let input = optimum_folder(t.path());
    let out = t.path().join("out");
    let stdout = nibble_ok(&["quantize", input.to_str().unwrap(), "-o", out.to_str().unwrap(), "--block-size", "32"]);
    assert!(stdout.contains("left float and copied: decoder_model.onnx"), "{stdout}");
    assert_copied(&input, &out, &["decoder_model_merged.onnx", "decoder_model_merged.onnx_data"]);
    assert!(!out.join("decoder_model_merged.onnx_data").exists());
    assert!(out.join("decoder_model_merged.onnx.data").is_file());
    check_quantized(&input.join("decoder_model_merged.onnx"), &out.join("decoder_model_merged.onnx"));
    // The unquantized decoder still runs from its copied data file, with the input's outputs.
    assert_eq!(logits_both(&out.join("decoder_model.onnx")), logits_both(&input.join("decoder_model.onnx")));
}

#[test]
fn existing_output_needs_force_and_is_replaced() {
    let t = tmp();
    let input = genai_folder(t.path());
    let out = t.path().join("out");
    std::fs::create_dir(&out).unwrap();
    std::fs::write(out.join("stale.txt"), "old").unwrap();
    let r = nibble(&["quantize", input.to_str().unwrap(), "-o", out.to_str().unwrap()]);
    assert_eq!(r.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&r.stderr).contains("--force"), "{}", String::from_utf8_lossy(&r.stderr));
    assert!(out.join("stale.txt").exists());
    nibble_ok(&["quantize", input.to_str().unwrap(), "-o", out.to_str().unwrap(), "--force", "--block-size", "32"]);
    assert!(!out.join("stale.txt").exists(), "the old folder's files must go");
    check_quantized(&input.join("model.onnx"), &out.join("model.onnx"));
}

/// Runs `nibble quantize IN -o OUT` expecting exit 1 with `message` in stderr, no output and the
/// input unchanged.
fn refused(input: &Path, out: &Path, message: &str) {
    let before = tree(input);
    let out_existed = out.exists();
    let r = nibble(&["quantize", input.to_str().unwrap(), "-o", out.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&r.stderr);
    assert_eq!(r.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains(message), "wanted '{message}' in: {stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert_eq!(tree(input), before, "the input folder changed");
    if !out_existed {
        assert!(!out.exists(), "{} was written", out.display());
    }
}

#[test]
fn folder_errors_name_the_fix() {
    let t = tmp();
    let out = t.path().join("out");
    // Neither genai_config.json nor config.json.
    let plain = t.path().join("plain");
    std::fs::create_dir(&plain).unwrap();
    write_model(&plain, "model.onnx", "model.onnx.data", 1);
    refused(&plain, &out, "neither genai_config.json");
    // genai_config.json names a missing file.
    let missing = genai_folder(&t.path().join("m"));
    std::fs::write(missing.join("genai_config.json"), r#"{"model": {"decoder": {"filename": "decoder.onnx"}}}"#)
        .unwrap();
    refused(&missing, &out, "names 'decoder.onnx', which is not in");
    // genai_config.json without the file name, and not JSON at all.
    std::fs::write(missing.join("genai_config.json"), r#"{"model": {"decoder": {}}}"#).unwrap();
    refused(&missing, &out, "model.decoder.filename");
    std::fs::write(missing.join("genai_config.json"), "{not json").unwrap();
    refused(&missing, &out, "is not valid JSON");
    // A file name leaving the folder.
    std::fs::write(missing.join("genai_config.json"), r#"{"model": {"decoder": {"filename": "../model.onnx"}}}"#)
        .unwrap();
    refused(&missing, &out, "is not a file name inside the folder");
    // Optimum: no .onnx file; several and no decoder.
    let empty = t.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    std::fs::write(empty.join("config.json"), "{}").unwrap();
    refused(&empty, &out, "no .onnx file");
    write_model(&empty, "encoder.onnx", "encoder.onnx.data", 1);
    write_model(&empty, "vision.onnx", "vision.onnx.data", 2);
    refused(&empty, &out, "several .onnx files (encoder.onnx, vision.onnx)");
    // The output is the input, inside it, or a file.
    let input = genai_folder(t.path());
    refused(&input, &input, "is the input folder");
    refused(&input, &input.join("sub"), "inside the input folder");
    let file = t.path().join("file.onnx");
    std::fs::write(&file, "x").unwrap();
    let r = nibble(&["quantize", input.to_str().unwrap(), "-o", file.to_str().unwrap(), "--force"]);
    assert_eq!(r.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&r.stderr).contains("is a file"));
    assert_eq!(std::fs::read(&file).unwrap(), b"x");
    // A model that fails to quantize leaves no output folder and no temporary folder.
    let broken = genai_folder(&t.path().join("b"));
    std::fs::write(broken.join("model.onnx.data"), [0u8; 16]).unwrap();
    refused(&broken, &out, "model.onnx.data");
    let leftovers: Vec<_> = std::fs::read_dir(t.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains("nibble"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}
