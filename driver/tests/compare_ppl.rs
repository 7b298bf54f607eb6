//! `nibble compare --perplexity` and the `--methods` sweep.
//!
//! The perplexity is checked against an independent computation: a tiny causal "LM"
//! (`Gather(E, input_ids) -> MatMul(W) -> logits`) whose logits the test computes in f64 and
//! whose NLL it takes as `-ln(softmax(logits)[next])` directly.

mod common;

use common::{dequantized_reference, floats, nibble, nibble_ok, npy, tmp, write};
use nibble::FloatFormat;
use nibble_driver::cli::example::{transformer, TransformerConfig};
use nibble_driver::cli::perplexity::{perplexity, read_tokens};
use nibble_driver::graph::build::{init, io, model, node};
use nibble_driver::graph::model::{ExternalData, Model};
use nibble_driver::graph::onnx::{tensor_proto::DataType, GraphProto};
use nibble_driver::rng::Rng;
use nibble_driver::{quantize_file, Options};
use std::path::Path;

const V: usize = 48;
const H: usize = 64;
const S: usize = 3;
const T: usize = 12;

/// `logits = Gather(E [V, H], input_ids [1, T]) @ W [H, V]`, plus an `attention_mask` input
/// the graph ignores (filled with ones by --perplexity).
fn tiny_lm(path: &Path) {
    let (e, w) = weights();
    let g = GraphProto {
        name: Some("tiny_lm".into()),
        node: vec![
            node("Gather", "/model/embed/Gather", &["E", "input_ids"], &["h"], vec![]),
            node("MatMul", "/model/proj/MatMul", &["h", "W"], &["logits"], vec![]),
            node("Identity", "/model/mask/Identity", &["attention_mask"], &["mask_out"], vec![]),
        ],
        initializer: vec![init("E", &[V, H], &e, FloatFormat::F32), init("W", &[H, V], &w, FloatFormat::F32)],
        input: vec![
            io("input_ids", DataType::Int64 as i32, &[Some(1), None]),
            io("attention_mask", DataType::Int64 as i32, &[Some(1), None]),
        ],
        output: vec![io("logits", DataType::Float as i32, &[Some(1), None, Some(V)])],
        ..Default::default()
    };
    write(model(g, 17), path, ExternalData::Never);
}

fn weights() -> (Vec<f32>, Vec<f32>) {
    let mut rng = Rng::new(7);
    (rng.normals(V * H, 1.0), rng.normals(H * V, 1.0))
}

/// Sequences the float model predicts well (so that quantization visibly hurts): a random first
/// token, then each token the float model's arg-max after the previous one.
fn tokens() -> Vec<i64> {
    let (e, w) = weights();
    let mut rng = Rng::new(11);
    let mut ids = Vec::new();
    for _ in 0..S {
        let mut id = ((rng.uniform() * V as f32) as usize).min(V - 1);
        for _ in 0..T {
            ids.push(id as i64);
            let logit = |v: usize| (0..H).map(|h| e[id * H + h] as f64 * w[h * V + v] as f64).sum::<f64>();
            id = (0..V).max_by(|&a, &b| logit(a).total_cmp(&logit(b))).unwrap();
        }
    }
    ids
}

fn write_tokens(path: &Path, ids: &[i64]) {
    let data: Vec<u8> = ids.iter().flat_map(|v| v.to_le_bytes()).collect();
    let bytes = npy("<i8", false, &format!("({S}, {T})"), &data);
    let mut zip = zip::ZipWriter::new(std::fs::File::create(path).unwrap());
    zip.start_file("input_ids.npy", zip::write::SimpleFileOptions::default()).unwrap();
    std::io::Write::write_all(&mut zip, &bytes).unwrap();
    zip.finish().unwrap();
}

/// Mean NLL computed independently from the model's E and W (f64 logits, plain softmax).
fn reference_nll(model_path: &Path, ids: &[i64]) -> f64 {
    let m = Model::load(model_path).unwrap();
    let g = m.proto.graph.as_ref().unwrap();
    let get = |n: &str| floats(&m, g.initializer.iter().find(|t| t.name.as_deref() == Some(n)).unwrap());
    let (e, w) = (get("E"), get("W"));
    let mut total = 0.0;
    for seq in ids.chunks(T) {
        for t in 0..T - 1 {
            let row = &e[seq[t] as usize * H..][..H];
            let logits: Vec<f64> =
                (0..V).map(|v| (0..H).map(|h| row[h] as f64 * w[h * V + v] as f64).sum::<f64>()).collect();
            let z: f64 = logits.iter().map(|l| l.exp()).sum();
            total += -(logits[seq[t + 1] as usize].exp() / z).ln();
        }
    }
    total / (S * (T - 1)) as f64
}

/// Value of the first `"key":number` at or after `from` in a JSON text.
fn number_after(json: &str, key: &str, from: usize) -> f64 {
    let at = json[from..].find(&format!("\"{key}\":")).unwrap_or_else(|| panic!("no {key} in {json}")) + from;
    let rest = &json[at + key.len() + 3..];
    let end = rest.find([',', '}', ']']).unwrap();
    rest[..end].parse().unwrap_or_else(|_| panic!("{key}: '{}' is not a number", &rest[..end]))
}

#[test]
fn perplexity_matches_an_independent_computation_and_sees_quantization() {
    let d = tmp();
    let (float, quant, tok) = (d.path().join("lm.onnx"), d.path().join("lm_q.onnx"), d.path().join("tok.npz"));
    tiny_lm(&float);
    let ids = tokens();
    write_tokens(&tok, &ids);
    let tokens = read_tokens(&tok).unwrap();
    assert_eq!((tokens.sequences, tokens.length), (S, T));

    let p = perplexity(&float, &tokens, None).unwrap();
    let want = reference_nll(&float, &ids);
    assert_eq!(p.logits, "logits");
    assert_eq!(p.predictions, S * (T - 1));
    assert!((p.nll - want).abs() < 1e-4 * want, "float NLL {} vs independent {want}", p.nll);
    assert!((p.perplexity - want.exp()).abs() < 1e-3 * want.exp());

    let opts = Options { block_size: 64, ..Default::default() };
    let s = quantize_file(&float, &quant, &opts).unwrap();
    assert_eq!(s.quantized, 1);
    let q = perplexity(&quant, &tokens, None).unwrap();
    // What the quantized model must compute: W replaced by the scalar reference's dequantized
    // values. The default session runs the fused MatMulNBits with int8 activations, so the match
    // is within 1%; quantization itself moves the NLL by far more.
    let reference = dequantized_reference(&float, &[("W", 0)], 64, false, &d.path().join("ref.onnx"));
    let want_q = reference_nll(&reference, &ids);
    eprintln!("float NLL {} (independent {want}), quantized {} (independent, dequantized W {want_q})", p.nll, q.nll);
    assert!((q.nll - want_q).abs() < 1e-2 * want_q, "quantized NLL {} vs independent {want_q}", q.nll);
    assert!((want_q - want).abs() > 5e-2 * want, "quantization barely moved the NLL: {want} -> {want_q}");
    assert!((q.nll - p.nll).abs() > 3e-2 * p.nll, "NLL {} -> {}", p.nll, q.nll);

    // The CLI: text report and JSON carry both perplexities and the session options.
    let (fs, qs, ts) = (float.to_str().unwrap(), quant.to_str().unwrap(), tok.to_str().unwrap());
    let text = nibble_ok(&["compare", fs, qs, "--perplexity", ts]);
    assert!(text.contains("perplexity") && text.contains("default ONNX Runtime session"), "{text}");
    assert!(text.contains(&format!("{:.4}", p.perplexity)), "{text}");
    let json = nibble_ok(&["compare", fs, qs, "--perplexity", ts, "--json", "--logits", "logits"]);
    let at = json.find("\"original\"").unwrap();
    assert!((number_after(&json, "perplexity", at) - p.perplexity).abs() < 1e-9 * p.perplexity, "{json}");
    let at = json.find("\"quantized\"").unwrap();
    assert!((number_after(&json, "nll", at) - q.nll).abs() < 1e-9 * q.nll, "{json}");
    assert!(json.contains("\"relative_error\""), "{json}");

    // Bad inputs: clear errors, exit 1.
    let out = nibble(&["compare", fs, qs, "--perplexity", ts, "--logits", "nope"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--logits nope"), "{out:?}");
    let mut big = ids.clone();
    big[5] = V as i64;
    let bad = d.path().join("bad.npz");
    write_tokens(&bad, &big);
    let out = nibble(&["compare", fs, qs, "--perplexity", bad.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("outside the vocabulary"), "{out:?}");
}

fn leftovers(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(".nibble-sweep"))
        .collect()
}

#[test]
fn sweep_prints_one_row_per_method_and_block_size_and_cleans_up() {
    let d = tmp();
    let scratch = d.path().join("scratch");
    std::fs::create_dir(&scratch).unwrap();
    let path = d.path().join("example.onnx");
    let cfg = TransformerConfig { hidden: 64, intermediate: 128, layers: 1, vocab: 64, ..Default::default() };
    write(transformer(&cfg), &path, ExternalData::Never);
    let before = std::fs::read(&path).unwrap();
    let run = |extra: &[&str]| {
        let mut args =
            vec!["compare", path.to_str().unwrap(), "--methods", "rtn_dq,awq_clip", "--block-sizes", "32,64"];
        args.extend(extra);
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_nibble")).args(&args).env("TMPDIR", &scratch).output();
        let out = out.unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap()
    };
    let text = run(&[]);
    for (m, b) in [("rtn_dq", 32), ("rtn_dq", 64), ("awq_clip", 32), ("awq_clip", 64)] {
        assert!(
            text.lines().any(|l| l.split_whitespace().take(2).eq([m, &b.to_string()])),
            "no row {m} {b} in\n{text}"
        );
    }
    let json = run(&["--json"]);
    let float_bytes = number_after(&json, "float_bytes", 0);
    let mut rows = Vec::new();
    let mut at = 0;
    while let Some(i) = json[at..].find("\"method\":") {
        at += i + 1;
        let bytes = number_after(&json, "bytes", at);
        let err = number_after(&json, "relative_error", at);
        let cos = number_after(&json, "cosine", at);
        assert!(err.is_finite() && err > 0.0 && err < 0.5, "relative error {err}\n{json}");
        assert!(cos > 0.8 && cos <= 1.0, "cosine {cos}\n{json}");
        assert!(bytes < float_bytes, "{bytes} >= {float_bytes}");
        rows.push(bytes);
    }
    assert_eq!(rows.len(), 4, "{json}");
    assert!(rows[1] < rows[0] && rows[3] < rows[2], "bigger blocks must give smaller outputs: {rows:?}");
    assert!(leftovers(&scratch).is_empty(), "temporary outputs left: {:?}", leftovers(&scratch));
    assert_eq!(std::fs::read(&path).unwrap(), before, "input modified");

    // Methods not in this build: a usage error naming the value.
    let out = nibble(&["compare", path.to_str().unwrap(), "--methods", "rtn_dq,nosuch"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("nosuch"), "{out:?}");
    // A quantized model and --methods together, or neither: usage errors.
    let out = nibble(&["compare", path.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    let p = path.to_str().unwrap();
    let out = nibble(&["compare", p, p, "--methods", "rtn_dq"]);
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn sweep_with_perplexity_reports_the_float_and_every_row() {
    let d = tmp();
    let scratch = d.path().join("scratch");
    std::fs::create_dir(&scratch).unwrap();
    let (float, tok) = (d.path().join("lm.onnx"), d.path().join("tok.npz"));
    tiny_lm(&float);
    let ids = tokens();
    write_tokens(&tok, &ids);
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_nibble"))
        .args(["compare", float.to_str().unwrap(), "--methods", "rtn_dq,rtn", "--block-sizes", "16,64"])
        .args(["--perplexity", tok.to_str().unwrap(), "--json"])
        .env("TMPDIR", &scratch)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let json = String::from_utf8(out.stdout).unwrap();
    let want = reference_nll(&float, &ids);
    let at = json.find("\"float_perplexity\"").unwrap();
    assert!((number_after(&json, "nll", at) - want).abs() < 1e-4 * want, "{json}");
    assert_eq!(json.matches("\"method\":").count(), 4, "{json}");
    let mut at = 0;
    while let Some(i) = json[at..].find("\"method\":") {
        at += i + 1;
        let p = json[at..].find("\"perplexity\":{").unwrap() + at;
        let nll = number_after(&json, "nll", p);
        assert!(nll.is_finite() && (nll - want).abs() > 1e-3 * want, "row NLL {nll} vs float {want}\n{json}");
    }
    assert!(leftovers(&scratch).is_empty());
}
