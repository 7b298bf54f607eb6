//! Decoder LLM folders with a KV cache (issue 18): `nibble example --kind genai|optimum`, the feed
//! plan (empty past), calibration refused on random token ids unless asked for, `--calibration-shapes`
//! names, `inspect`'s feed listing, `compare --perplexity`, and `--format matmulnbits`'s default
//! accuracy level. Every model runs in ONNX Runtime with the tests' session (fused MatMulNBits at
//! fp32) and with all optimizations disabled.

mod common;

use common::*;
use nibble_driver::calibrate::runtime::{open, run, Input, InputData, SessionOptions};
use nibble_driver::graph::model::Model;
use std::path::{Path, PathBuf};

const KINDS: [&str; 2] = ["genai", "optimum"];

fn example(dir: &Path, kind: &str) -> PathBuf {
    let folder = dir.join(kind);
    nibble_ok(&["example", "--kind", kind, folder.to_str().unwrap()]);
    folder.join("model.onnx")
}

/// One pass over `ids` with an empty past, fed as onnxruntime-genai/Optimum do; returns the logits
/// and the present outputs' shapes.
fn decode(model: &Path, ids: &[i64], no_optimization: bool) -> (Vec<f32>, Vec<(String, Vec<usize>)>) {
    let m = Model::load(model).unwrap();
    let specs = nibble_driver::calibrate::inputs::input_specs(&m).unwrap();
    let t = ids.len();
    let inputs: Vec<Input> = specs
        .iter()
        .map(|s| {
            let (shape, data) = match s.name.as_str() {
                "input_ids" => (vec![1, t], InputData::I64(ids.to_vec())),
                "attention_mask" => (vec![1, t], InputData::I64(vec![1; t])),
                "position_ids" => (vec![1, t], InputData::I64((0..t as i64).collect())),
                // past_key_values.N.key/value: [1, heads, 0, head_size]; head size 32 in both examples.
                _ => (vec![1, s.dims[1].unwrap(), 0, 32], InputData::F32(vec![])),
            };
            Input { name: s.name.clone(), shape, data }
        })
        .collect();
    let mut session = open(model, SessionOptions { no_optimization, ..Default::default() })
        .unwrap_or_else(|e| panic!("{}: {e}", model.display()));
    let out = run(&mut session, &inputs).unwrap();
    let logits = out.iter().find(|o| o.name == "logits").unwrap();
    assert_eq!(logits.shape[..2], [1, t]);
    let presents =
        out.iter().filter(|o| o.name.starts_with("present")).map(|o| (o.name.clone(), o.shape.clone())).collect();
    (logits.data.clone(), presents)
}

const IDS: [i64; 9] = [258, 631, 263, 258, 637, 266, 677, 300, 400];

/// A `.npz` with `input_ids` [samples, T] only (the feed plan fills the rest).
fn token_npz(path: &Path, samples: usize, t: usize) {
    let ids: Vec<i64> = (0..samples * t).map(|i| (257 + (i * 37) % 700) as i64).collect();
    let bytes: Vec<u8> = ids.iter().flat_map(|v| v.to_le_bytes()).collect();
    npz(path, &[("input_ids", npy("<i8", false, &format!("({samples}, {t})"), &bytes))]);
}

#[test]
fn example_folders_have_the_layouts_and_run() {
    let d = tmp();
    for kind in KINDS {
        let model = example(d.path(), kind);
        let dir = model.parent().unwrap();
        let mut files: Vec<String> =
            std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
        files.sort();
        let want: &[&str] = if kind == "genai" {
            &["genai_config.json", "model.onnx", "model.onnx.data", "tokenizer.json", "tokenizer_config.json"]
        } else {
            &["config.json", "model.onnx", "tokenizer.json", "tokenizer_config.json"]
        };
        assert_eq!(files, want, "{kind}");
        let m = Model::load(&model).unwrap();
        let g = m.proto.graph.as_ref().unwrap();
        let ops: Vec<&str> = g.node.iter().filter_map(|n| n.op_type.as_deref()).collect();
        if kind == "genai" {
            assert!(m.has_external_data());
            assert!(ops.contains(&"GroupQueryAttention") && ops.contains(&"SkipSimplifiedLayerNormalization"));
            let gqa = g.node.iter().find(|n| n.op_type.as_deref() == Some("GroupQueryAttention")).unwrap();
            let attr = |name: &str| gqa.attribute.iter().find(|a| a.name.as_deref() == Some(name)).unwrap().i.unwrap();
            assert!(attr("kv_num_heads") < attr("num_heads"));
            assert!(gqa.input[1].is_empty() && gqa.input[2].is_empty(), "packed QKV");
            let cfg: serde_json::Value =
                serde_json::from_slice(&std::fs::read(dir.join("genai_config.json")).unwrap()).unwrap();
            assert_eq!(cfg["model"]["decoder"]["filename"], "model.onnx");
            assert_eq!(cfg["model"]["decoder"]["head_size"], 32);
        } else {
            assert!(!ops.contains(&"GroupQueryAttention") && ops.contains(&"Softmax"));
            let names: Vec<&str> = g.input.iter().filter_map(|v| v.name.as_deref()).collect();
            assert!(names.contains(&"position_ids") && names.contains(&"past_key_values.1.value"), "{names:?}");
        }
        let (a, presents) = decode(&model, &IDS, false);
        let (b, _) = decode(&model, &IDS, true);
        assert!(a.iter().all(|v| v.is_finite()));
        assert!(rel_err(&a, &b) < 1e-4, "{kind}: {}", rel_err(&a, &b));
        assert_eq!(presents.len(), 4);
        assert!(presents.iter().all(|(_, s)| s[2] == IDS.len() && s[3] == 32), "{presents:?}");
        // The tokenizer's vocabulary fits the embedding: the logits' width is its size.
        let tok: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dir.join("tokenizer.json")).unwrap()).unwrap();
        let vocab = tok["model"]["vocab"].as_object().unwrap().len();
        assert_eq!(a.len(), IDS.len() * vocab);
    }
}

#[test]
fn calibrated_methods_quantize_decoders_with_random_opt_in_and_with_token_npz() {
    let d = tmp();
    let npz_path = d.path().join("tokens.npz");
    token_npz(&npz_path, 2, 16);
    for kind in KINDS {
        let model = example(d.path(), kind);
        let (float, _) = decode(&model, &IDS, false);
        let cases: [(&str, Vec<&str>); 5] = [
            ("rtn_dq", vec![]),
            (
                "awq_clip",
                vec![
                    "--calibration-random",
                    "--calibration-samples",
                    "2",
                    "--calibration-shapes",
                    "sequence_length=16",
                ],
            ),
            (
                "gptq",
                vec![
                    "--calibration-random",
                    "--calibration-samples",
                    "2",
                    "--calibration-shapes",
                    "sequence_length=16",
                ],
            ),
            ("awq_clip", vec!["--calibration-data", npz_path.to_str().unwrap()]),
            ("gptq", vec!["--calibration-data", npz_path.to_str().unwrap()]),
        ];
        for (i, (method, extra)) in cases.iter().enumerate() {
            let out = d.path().join(format!("{kind}_{i}_{method}.onnx"));
            let mut args = vec!["quantize", model.to_str().unwrap(), "-o", out.to_str().unwrap(), "--method", method];
            args.extend_from_slice(&["--block-size", "32"]);
            args.extend(extra.iter().copied());
            let o = nibble(&args);
            let stderr = String::from_utf8_lossy(&o.stderr);
            assert!(o.status.success(), "{kind} {method} {extra:?}: {stderr}");
            assert_eq!(stderr.contains("random token ids"), extra.contains(&"--calibration-random"), "{stderr}");
            let text = String::from_utf8_lossy(&o.stdout);
            let want = if kind == "genai" { "quantized 10 of 11" } else { "quantized 14 of 15" };
            assert!(text.contains(want), "{kind} {method}: {text}");
            for no_opt in [false, true] {
                let (q, _) = decode(&out, &IDS, no_opt);
                let e = rel_err(&q, &float);
                assert!(e > 0.0 && e < 0.6, "{kind} {method} {extra:?} no_opt={no_opt}: error {e}");
            }
        }
    }
}

#[test]
fn random_token_calibration_is_refused_without_opt_in() {
    let d = tmp();
    for kind in KINDS {
        let model = example(d.path(), kind);
        for method in ["awq_clip", "gptq", "awq_lite"] {
            let out = d.path().join(format!("{kind}_{method}.onnx"));
            let o = nibble(&["quantize", model.to_str().unwrap(), "-o", out.to_str().unwrap(), "--method", method]);
            let stderr = String::from_utf8_lossy(&o.stderr);
            assert_eq!(o.status.code(), Some(1), "{stderr}");
            for part in
                ["'input_ids' takes token ids", "--calibration-text", "--calibration-data", "--calibration-random"]
            {
                assert!(stderr.contains(part), "{part}: {stderr}");
            }
            assert!(!out.exists());
        }
    }
}

#[test]
fn calibration_shapes_names_are_checked() {
    let d = tmp();
    let model = example(d.path(), "genai");
    let before = snapshot(model.parent().unwrap());
    let out = d.path().join("q.onnx");
    for (shapes, culprit) in [
        ("kv_cache_dim=64", "no symbolic dimension named 'kv_cache_dim'"),
        ("input_idz:1x16", "no model input named 'input_idz'"),
        ("input_ids:1x2x16", "input 'input_ids' has rank 2"),
    ] {
        let o = nibble(&[
            "quantize",
            model.to_str().unwrap(),
            "-o",
            out.to_str().unwrap(),
            "--method",
            "awq_clip",
            "--calibration-random",
            "--calibration-shapes",
            shapes,
        ]);
        let stderr = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "{stderr}");
        assert!(stderr.contains(culprit), "{stderr}");
        // The listing names the inputs and the symbolic dimensions.
        assert!(stderr.contains("past_key_values.0.key [batch_size, 2, past_sequence_length, head_size]"), "{stderr}");
        assert!(stderr.contains("past_sequence_length, sequence_length, total_sequence_length"), "{stderr}");
        assert!(!out.exists());
    }
    let o = nibble(&["quantize", model.to_str().unwrap(), "-o", out.to_str().unwrap(), "--calibration-shapes", "nope"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("DIM=N"));
    assert_eq!(snapshot(model.parent().unwrap()), before, "the input folder is unchanged");
}

#[test]
fn inspect_shows_the_feed_and_reads_head_size_from_the_graph() {
    let d = tmp();
    for kind in KINDS {
        let model = example(d.path(), kind);
        // Without the folder's config the head size still comes from the graph (GQA's packed QKV
        // width; Optimum's fixed dims).
        let config = if kind == "genai" { "genai_config.json" } else { "config.json" };
        std::fs::remove_file(model.parent().unwrap().join(config)).unwrap();
        let text = nibble_ok(&["inspect", model.to_str().unwrap()]);
        let heads = if kind == "genai" { 2 } else { 4 };
        for want in [
            "input_ids [batch_size, sequence_length]: token ids".to_string(),
            "attention_mask [batch_size, ".to_string(),
            "ones over past + current tokens".to_string(),
            format!("past_key_values.1.value [batch_size, {heads}, past_sequence_length, "),
            format!("KV cache, past length 0: zeros [batch, {heads}, 0, 32]"),
        ] {
            assert!(text.contains(&want), "{kind}: {want}\n{text}");
        }
        assert_eq!(text.contains("position_ids [batch_size, sequence_length]: positions 0..0+T"), kind == "optimum");
    }
}

#[test]
fn perplexity_runs_on_kv_cache_graphs() {
    let d = tmp();
    let tokens = d.path().join("tokens.npz");
    token_npz(&tokens, 2, 24);
    for kind in KINDS {
        let model = example(d.path(), kind);
        let out = d.path().join(format!("{kind}_q.onnx"));
        nibble_ok(&["quantize", model.to_str().unwrap(), "-o", out.to_str().unwrap(), "--block-size", "32"]);
        let text = nibble_ok(&[
            "compare",
            model.to_str().unwrap(),
            out.to_str().unwrap(),
            "--calibration-data",
            tokens.to_str().unwrap(),
            "--perplexity",
            tokens.to_str().unwrap(),
            "--json",
        ]);
        let v: serde_json::Value = serde_json::from_str(text.trim()).unwrap_or_else(|e| panic!("{e}: {text}"));
        let (o, q) = (&v["perplexity"]["original"], &v["perplexity"]["quantized"]);
        let (po, pq) = (o["perplexity"].as_f64().unwrap(), q["perplexity"].as_f64().unwrap());
        assert!(po > 1.0 && po.is_finite() && pq > 1.0 && pq.is_finite(), "{text}");
        assert_ne!(po, pq, "quantization changes the perplexity");
        assert_eq!(o["predictions"], 2 * 23);
    }
}

#[test]
fn matmulnbits_defaults_to_accuracy_level_4() {
    let d = tmp();
    let model = example(d.path(), "genai");
    for (extra, want) in [(vec![], 4), (vec!["--accuracy-level", "0"], 0), (vec!["--accuracy-level", "1"], 1)] {
        let out = d.path().join(format!("nb{want}.onnx"));
        let mut args =
            vec!["quantize", model.to_str().unwrap(), "-o", out.to_str().unwrap(), "--format", "matmulnbits"];
        args.extend(extra);
        nibble_ok(&args);
        let m = Model::load(&out).unwrap();
        let levels: Vec<i64> = m
            .proto
            .graph
            .as_ref()
            .unwrap()
            .node
            .iter()
            .filter(|n| n.op_type.as_deref() == Some("MatMulNBits"))
            .map(|n| n.attribute.iter().find(|a| a.name.as_deref() == Some("accuracy_level")).unwrap().i.unwrap())
            .collect();
        assert_eq!(levels, vec![want; 10]);
        for no_opt in [false, true] {
            let (q, _) = decode(&out, &IDS, no_opt);
            assert!(q.iter().all(|v| v.is_finite()));
        }
    }
    let o = nibble(&["quantize", model.to_str().unwrap(), "--format", "matmulnbits", "--accuracy-level", "5"]);
    assert_eq!(o.status.code(), Some(2), "an accuracy level no runtime knows is a usage error");
}
