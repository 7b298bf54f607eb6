//! Decoder LLM folders with a KV cache (issue 18): `nibble example --kind genai|optimum|optimum-merged`,
//! the feed plan (empty past; `use_cache_branch` false; a masked window-long buffer for a
//! window-sized GroupQueryAttention cache), calibration refused on random token ids unless asked for,
//! `--calibration-shapes` names, `inspect`'s feed listing, `compare` with and without
//! `--perplexity`, and `--format matmulnbits`'s default accuracy level. Every model runs in ONNX Runtime with the tests' session (fused MatMulNBits at
//! fp32) and with all optimizations disabled.

mod common;

use common::*;
use nibble_driver::calibrate::feed;
use nibble_driver::calibrate::inputs::input_specs;
use nibble_driver::calibrate::runtime::{open, run, Input, InputData, SessionOptions};
use nibble_driver::cli::decoder_example::{write_folder, DecoderConfig, DecoderKind};
use nibble_driver::graph::model::Model;
use nibble_driver::graph::onnx::GraphProto;
use std::collections::{HashMap, HashSet};
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
    let (logits, presents) = decode_with(model, ids, no_optimization, 0, false).unwrap();
    (logits, presents)
}

/// Logits and the present outputs' (name, shape).
type Decoded = (Vec<f32>, Vec<(String, Vec<usize>)>);

/// [`decode`] with a KV-cache buffer of `cache` zeros (the attention mask still covers only the
/// `ids`: an empty past) and `use_cache_branch` (when the model has it) set to `use_cache`;
/// ONNX Runtime's error when it refuses to run.
fn decode_with(
    model: &Path,
    ids: &[i64],
    no_optimization: bool,
    cache: usize,
    use_cache: bool,
) -> Result<Decoded, String> {
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
                "use_cache_branch" => (vec![1], InputData::Bool(vec![use_cache])),
                // past_key_values.N.key/value: [1, heads, cache, head_size]; head size 32 in all examples.
                _ => {
                    let heads = s.dims[1].unwrap();
                    (vec![1, heads, cache, 32], InputData::F32(vec![0.0; heads * cache * 32]))
                }
            };
            Input { name: s.name.clone(), shape, data }
        })
        .collect();
    let mut session = open(model, SessionOptions { no_optimization, ..Default::default() })
        .unwrap_or_else(|e| panic!("{}: {e}", model.display()));
    let out = run(&mut session, &inputs).map_err(|e| e.to_string())?;
    let logits = out.iter().find(|o| o.name == "logits").unwrap();
    assert_eq!(logits.shape[..2], [1, t]);
    let presents =
        out.iter().filter(|o| o.name.starts_with("present")).map(|o| (o.name.clone(), o.shape.clone())).collect();
    Ok((logits.data.clone(), presents))
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

/// English-like text of `words` words (calibration text).
fn sentences(words: usize) -> String {
    let vocab = ["the", "river", "runs", "past", "old", "garden", "walls", "and", "people", "read", "books", "there"];
    (0..words).map(|i| vocab[(i * 7 + i / 3) % vocab.len()]).collect::<Vec<_>>().join(" ")
}

/// The If's then and else branches and the main graph of a merged decoder.
fn if_branches(path: &Path) -> (GraphProto, GraphProto, GraphProto) {
    let m = Model::load(path).unwrap();
    let g = m.proto.graph.clone().unwrap();
    let the_if = g.node.iter().find(|n| n.op_type.as_deref() == Some("If")).expect("an If");
    let branch =
        |name: &str| the_if.attribute.iter().find(|a| a.name.as_deref() == Some(name)).unwrap().g.clone().unwrap();
    (branch("then_branch"), branch("else_branch"), g)
}

/// How many products of `branch` read a quantized weight: MatMulNBits, or a MatMul whose B a
/// DequantizeLinear (of the main graph or the branch) writes.
fn quantized_products(main: &GraphProto, branch: &GraphProto) -> usize {
    let dq: HashSet<&String> = main
        .node
        .iter()
        .chain(&branch.node)
        .filter(|n| n.op_type.as_deref() == Some("DequantizeLinear"))
        .flat_map(|n| n.output.iter())
        .collect();
    branch
        .node
        .iter()
        .filter(|n| match n.op_type.as_deref() {
            Some("MatMulNBits") => true,
            Some("MatMul") => n.input.get(1).is_some_and(|b| dq.contains(b)),
            _ => false,
        })
        .count()
}

#[test]
fn merged_decoder_is_fed_use_cache_branch_false_and_both_branches_are_quantized() {
    let d = tmp();
    let dir = d.path().join("merged");
    nibble_ok(&["example", "--kind", "optimum-merged", dir.to_str().unwrap()]);
    let model = dir.join("decoder_model_merged.onnx");
    let mut files: Vec<String> =
        std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    files.sort();
    assert_eq!(files, ["config.json", "decoder_model_merged.onnx", "tokenizer.json", "tokenizer_config.json"]);
    // A merged decoder: one If on use_cache_branch; each branch's 15 MatMuls read the shared
    // main-graph weights; the then branch concatenates the cache, the else branch does not read it.
    let (then_g, else_g, main) = if_branches(&model);
    assert_eq!(main.node.len(), 1);
    assert_eq!(main.node[0].input, ["use_cache_branch"]);
    let weights: HashSet<&str> = main.initializer.iter().filter_map(|t| t.name.as_deref()).collect();
    for b in [&then_g, &else_g] {
        let reading = b
            .node
            .iter()
            .filter(|n| n.op_type.as_deref() == Some("MatMul") && weights.contains(n.input[1].as_str()))
            .count();
        assert_eq!(reading, 15);
    }
    let reads_cache = |g: &GraphProto| g.node.iter().any(|n| n.input.iter().any(|i| i.starts_with("past_key_values")));
    assert!(reads_cache(&then_g) && !reads_cache(&else_g));
    // The float model: both branches agree on an empty past, in both session modes.
    let (float, _) = decode_with(&model, &IDS, false, 0, false).unwrap();
    for (no_opt, use_cache) in [(true, false), (false, true), (true, true)] {
        let (other, _) = decode_with(&model, &IDS, no_opt, 0, use_cache).unwrap();
        assert!(rel_err(&other, &float) < 1e-4, "no_opt={no_opt} use_cache={use_cache}");
    }
    // The feed plan: use_cache_branch false, an empty past.
    let m = Model::load(&model).unwrap();
    let plan = feed::plan(&m, &input_specs(&m).unwrap(), &HashMap::new()).unwrap();
    let sample = plan.sample(&IDS, |s| panic!("'{}' must not be random", s.name));
    let flag = sample.iter().find(|i| i.name == "use_cache_branch").unwrap();
    assert_eq!(flag.shape, [1]);
    assert!(matches!(&flag.data, InputData::Bool(v) if v == &[false]));
    let caches: Vec<&Input> = sample.iter().filter(|i| i.name.starts_with("past_key_values")).collect();
    assert_eq!(caches.len(), 4);
    assert!(caches.iter().all(|i| i.shape == [1, 4, 0, 32]));
    let text = nibble_ok(&["inspect", model.to_str().unwrap()]);
    assert!(text.contains("use_cache_branch [1]: false (no past)"), "{text}");
    // Quantized as a folder, with no data (rtn_dq) and calibrated on text (gptq, awq_clip).
    let txt = d.path().join("calib.txt");
    std::fs::write(&txt, sentences(400)).unwrap();
    let calibrated = |method: &'static str| {
        vec![
            "--method",
            method,
            "--calibration-text",
            txt.to_str().unwrap(),
            "--calibration-samples",
            "2",
            "--calibration-seq-len",
            "16",
        ]
    };
    for (i, extra) in [vec![], calibrated("gptq"), calibrated("awq_clip")].iter().enumerate() {
        let out = d.path().join(format!("q{i}"));
        let mut args = vec!["quantize", dir.to_str().unwrap(), "-o", out.to_str().unwrap(), "--block-size", "32"];
        args.extend(extra.iter().copied());
        let stdout = nibble_ok(&args);
        assert!(stdout.contains("quantized 14 of 15"), "{extra:?}: {stdout}");
        let q = out.join("decoder_model_merged.onnx");
        let (qt, qe, qm) = if_branches(&q);
        assert_eq!((quantized_products(&qm, &qt), quantized_products(&qm, &qe)), (14, 14), "{extra:?}");
        for no_opt in [false, true] {
            for use_cache in [false, true] {
                let (l, _) = decode_with(&q, &IDS, no_opt, 0, use_cache).unwrap();
                let e = rel_err(&l, &float);
                assert!(e > 0.0 && e < 0.6, "{extra:?} no_opt={no_opt} use_cache={use_cache}: error {e}");
            }
        }
    }
}

#[test]
fn sliding_window_attention_is_fed_a_masked_buffer_of_the_window() {
    let d = tmp();
    let folder = |name: &str, window: i64| {
        let dir = d.path().join(name);
        let cfg = DecoderConfig { local_window: window, ..Default::default() };
        write_folder(&dir, DecoderKind::Genai, &cfg, false).unwrap();
        dir.join("model.onnx")
    };
    let model = folder("window", 16);
    // Same seed, same weights, no window.
    let plain = folder("plain", -1);
    let cfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(model.with_file_name("genai_config.json")).unwrap()).unwrap();
    assert_eq!(cfg["model"]["decoder"]["sliding_window"]["window_size"], 16);
    // ONNX Runtime refuses an empty past here; a window-long buffer of zeros that the mask leaves
    // out gives the logits of the model without a window (9 tokens < 16: the window drops nothing).
    let refused = decode_with(&model, &IDS, false, 0, false).unwrap_err();
    assert!(refused.contains("local_window_size"), "{refused}");
    let (reference, _) = decode_with(&plain, &IDS, false, 0, false).unwrap();
    for no_opt in [false, true] {
        let (l, _) = decode_with(&model, &IDS, no_opt, 16, false).unwrap();
        assert!(rel_err(&l, &reference) < 1e-4, "no_opt={no_opt}: {}", rel_err(&l, &reference));
    }
    // The feed plan: a buffer of max(16, T) zeros, the mask over the T tokens only.
    let m = Model::load(&model).unwrap();
    let plan = feed::plan(&m, &input_specs(&m).unwrap(), &HashMap::new()).unwrap();
    for (t, buffer) in [(9usize, 16usize), (24, 24)] {
        let ids: Vec<i64> = (0..t as i64).map(|i| 257 + i).collect();
        let sample = plan.sample(&ids, |s| panic!("'{}' must not be random", s.name));
        let caches: Vec<&Input> = sample.iter().filter(|i| i.name.starts_with("past_key_values")).collect();
        assert_eq!(caches.len(), 4);
        assert!(caches.iter().all(|i| i.shape == [1, 2, buffer, 32]), "T={t}");
        assert_eq!(sample.iter().find(|i| i.name == "attention_mask").unwrap().shape, [1, t]);
    }
    let text = nibble_ok(&["inspect", model.to_str().unwrap()]);
    assert!(text.contains("zeros [batch, 2, max(16, 0 + T), 32] (sliding window 16"), "{text}");
    // Calibrated methods run the model on it; the output runs in both session modes, and compare
    // (plain and with perplexity) feeds it the same way.
    let npz_path = d.path().join("tokens.npz");
    token_npz(&npz_path, 2, 24);
    for method in ["gptq", "awq_clip"] {
        let out = d.path().join(format!("{method}.onnx"));
        let args = [
            "quantize",
            model.to_str().unwrap(),
            "-o",
            out.to_str().unwrap(),
            "--method",
            method,
            "--block-size",
            "32",
            "--calibration-data",
            npz_path.to_str().unwrap(),
        ];
        nibble_ok(&args);
        for no_opt in [false, true] {
            let (q, _) = decode_with(&out, &IDS, no_opt, 16, false).unwrap();
            let e = rel_err(&q, &reference);
            assert!(e > 0.0 && e < 0.6, "{method} no_opt={no_opt}: error {e}");
        }
        let text = nibble_ok(&["compare", model.to_str().unwrap(), out.to_str().unwrap(), "--json"]);
        let v: serde_json::Value = serde_json::from_str(text.trim()).unwrap_or_else(|e| panic!("{e}: {text}"));
        let logits = v.as_array().unwrap().iter().find(|o| o["output"] == "logits").expect("logits compared");
        let e = logits["relative_error"].as_f64().unwrap();
        assert!(e > 0.0 && e < 0.6, "{method}: {text}");
        let text = nibble_ok(&[
            "compare",
            model.to_str().unwrap(),
            out.to_str().unwrap(),
            "--perplexity",
            npz_path.to_str().unwrap(),
            "--json",
        ]);
        let v: serde_json::Value = serde_json::from_str(text.trim()).unwrap_or_else(|e| panic!("{e}: {text}"));
        let p = v["perplexity"]["quantized"]["perplexity"].as_f64().unwrap();
        assert!(p > 1.0 && p.is_finite(), "{text}");
    }
}

#[test]
fn plain_compare_feeds_kv_graphs_through_the_feed_plan() {
    let d = tmp();
    for kind in KINDS {
        let model = example(d.path(), kind);
        let out = d.path().join(format!("{kind}_q.onnx"));
        nibble_ok(&["quantize", model.to_str().unwrap(), "-o", out.to_str().unwrap(), "--block-size", "32"]);
        // Random shapes would give the genai cache a head size of 16 (its dim is named), which
        // GroupQueryAttention refuses; the feed plan reads 32 from the graph.
        let text = nibble_ok(&["compare", model.to_str().unwrap(), out.to_str().unwrap(), "--json"]);
        let v: serde_json::Value = serde_json::from_str(text.trim()).unwrap_or_else(|e| panic!("{e}: {text}"));
        let outputs = v.as_array().unwrap();
        let names: Vec<&str> = outputs.iter().map(|o| o["output"].as_str().unwrap()).collect();
        assert_eq!(names.len(), 5, "{kind}: logits and 4 presents: {names:?}");
        let logits = outputs.iter().find(|o| o["output"] == "logits").unwrap();
        let e = logits["relative_error"].as_f64().unwrap();
        assert!(e > 0.0 && e < 0.6, "{kind}: {text}");
        assert!(logits["top1_agreement"].as_f64().unwrap() > 0.5, "{kind}: {text}");
        // The table form too.
        let table = nibble_ok(&["compare", model.to_str().unwrap(), out.to_str().unwrap()]);
        assert!(table.contains("logits"), "{table}");
    }
}
