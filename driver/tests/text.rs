//! Calibration and perplexity from text: the example folders' tokenizer round trip, the windows
//! cut from the tokens, text calibration with gptq and awq_clip on decoder folders (the output run
//! in ONNX Runtime with default session options and with optimizations disabled), and the errors.

mod common;

use common::{decoder_logits, nibble, nibble_ok, text, tmp};
use nibble_driver::calibrate::text::{lead_tokens, load_tokenizer, read_text, text_windows, tokenize, windows};
use nibble_driver::cli::decoder_example::{write_folder, DecoderConfig, DecoderKind};
use nibble_driver::graph::model::Model;
use std::path::{Path, PathBuf};

fn folder(root: &Path, kind: DecoderKind) -> PathBuf {
    let dir = root.join(format!("{kind:?}").to_lowercase());
    write_folder(&dir, kind, &DecoderConfig::default(), false).unwrap();
    dir
}

fn write_text(root: &Path, words: usize) -> PathBuf {
    let p = root.join("text.txt");
    std::fs::write(&p, text(words)).unwrap();
    p
}

#[test]
fn tokenizer_round_trip_on_the_example_folder() {
    let t = tmp();
    let dir = folder(t.path(), DecoderKind::Genai);
    let tok = load_tokenizer(&dir.join("tokenizer.json")).unwrap();
    let sample = "The quick brown fox, 42 times: naïve café!\nNew line.";
    let ids = tokenize(&tok, sample, Path::new("sample")).unwrap();
    assert!(ids.len() > 5 && ids.len() < sample.len() * 2, "{ids:?}");
    let back = tok.decode(&ids.iter().map(|&i| i as u32).collect::<Vec<_>>(), false).unwrap();
    assert_eq!(back, sample);
    // Every id fits the model's embedding table.
    let model = Model::load(&dir.join("model.onnx")).unwrap();
    let vocab = nibble_driver::calibrate::inputs::vocabulary(&model, "input_ids").unwrap();
    assert!(ids.iter().all(|&i| (i as usize) < vocab));
}

#[test]
fn windows_are_spread_and_do_not_overlap() {
    let tokens: Vec<i64> = (0..100).collect();
    let w = windows(&tokens, 3, 10, Path::new("t")).unwrap();
    assert_eq!(w, vec![(0..10).collect::<Vec<i64>>(), (45..55).collect(), (90..100).collect()]);
    assert_eq!(windows(&tokens, 1, 100, Path::new("t")).unwrap(), vec![tokens.clone()]);
    assert_eq!(windows(&tokens, 10, 10, Path::new("t")).unwrap().concat(), tokens);
    let e = windows(&tokens, 4, 30, Path::new("short.txt")).unwrap_err().to_string();
    assert!(e.contains("short.txt holds 100 tokens") && e.contains("at most 3"), "{e}");
    let e = windows(&tokens, 1, 101, Path::new("short.txt")).unwrap_err().to_string();
    assert!(e.contains("holds 100 tokens") && !e.contains("at most"), "{e}");
    assert!(windows(&tokens, 0, 10, Path::new("t")).is_err());
}

/// A tokenizer whose post-processor puts `<|endoftext|>` before every text (as Gemma's and Llama's
/// put `<bos>`): each window starts with it and holds T - 1 text tokens; the example's own
/// ByteLevel post-processor adds nothing.
#[test]
fn windows_start_with_the_tokenizers_leading_special_tokens() {
    let t = tmp();
    let dir = folder(t.path(), DecoderKind::Genai);
    let plain_path = dir.join("tokenizer.json");
    let plain = load_tokenizer(&plain_path).unwrap();
    assert_eq!(lead_tokens(&plain, &plain_path).unwrap(), Vec::<i64>::new());
    let eos = i64::from(plain.token_to_id("<|endoftext|>").unwrap());
    let mut json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&plain_path).unwrap()).unwrap();
    json["post_processor"] = serde_json::json!({
        "type": "TemplateProcessing",
        "single": [{"SpecialToken": {"id": "<|endoftext|>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
        "pair": [{"SpecialToken": {"id": "<|endoftext|>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                 {"Sequence": {"id": "B", "type_id": 0}}],
        "special_tokens": {"<|endoftext|>": {"id": "<|endoftext|>", "ids": [eos], "tokens": ["<|endoftext|>"]}}
    });
    let bos_path = t.path().join("bos-tokenizer.json");
    std::fs::write(&bos_path, json.to_string()).unwrap();
    assert_eq!(lead_tokens(&load_tokenizer(&bos_path).unwrap(), &bos_path).unwrap(), vec![eos]);
    let text = write_text(t.path(), 3000);
    let with_bos = text_windows(&text, &bos_path, 3, 32).unwrap();
    let without = text_windows(&text, &plain_path, 3, 32).unwrap();
    let ids = tokenize(&plain, &read_text(&text).unwrap(), &text).unwrap();
    let body = windows(&ids, 3, 31, &text).unwrap();
    for (w, b) in with_bos.iter().zip(&body) {
        assert_eq!(w.len(), 32);
        assert_eq!(w[0], eos);
        assert_eq!(&w[1..], b.as_slice());
    }
    assert!(without.iter().all(|w| w.len() == 32 && w[0] != eos));
    let e = text_windows(&text, &bos_path, 3, 1).unwrap_err().to_string();
    assert!(e.contains("no room for text") && e.contains("longer sequence length"), "{e}");
}

#[test]
fn jsonl_text_fields_are_joined() {
    let t = tmp();
    let p = t.path().join("c.jsonl");
    std::fs::write(&p, "{\"text\": \"first\"}\n\n{\"text\": \"second\", \"id\": 2}\n").unwrap();
    assert_eq!(read_text(&p).unwrap(), "first\n\nsecond");
    std::fs::write(&p, "{\"text\": \"first\"}\n{\"body\": 1}\n").unwrap();
    let e = read_text(&p).unwrap_err().to_string();
    assert!(e.contains("line 2 has no string field \"text\""), "{e}");
}

#[test]
fn text_calibration_quantizes_decoder_folders() {
    let t = tmp();
    let text = write_text(t.path(), 3000);
    for kind in [DecoderKind::Genai, DecoderKind::Optimum] {
        let dir = folder(t.path(), kind);
        let tokenizer = dir.join("tokenizer.json");
        let windows = text_windows(&text, &tokenizer, 2, 64).unwrap();
        let reference = decoder_logits(&dir.join("model.onnx"), &windows)[1].clone();
        for method in ["gptq", "awq_clip"] {
            let out = t.path().join(format!("{kind:?}_{method}"));
            let args = [
                "quantize",
                dir.to_str().unwrap(),
                "-o",
                out.to_str().unwrap(),
                "--method",
                method,
                "--block-size",
                "32",
                "--calibration-text",
                text.to_str().unwrap(),
                "--calibration-samples",
                "4",
                "--calibration-seq-len",
                "64",
            ];
            nibble_ok(&args);
            assert!(out.join("model.onnx.data").is_file());
            assert_eq!(std::fs::read(out.join("tokenizer.json")).unwrap(), std::fs::read(&tokenizer).unwrap());
            for (mode, got) in
                ["default", "no optimization"].iter().zip(decoder_logits(&out.join("model.onnx"), &windows))
            {
                let e = common::rel_err(&got, &reference);
                assert!(e > 0.0 && e < 0.5, "{kind:?} {method} ({mode} session): relative error {e}");
            }
        }
    }
}

#[test]
fn compare_reports_perplexity_from_text() {
    let t = tmp();
    let text = write_text(t.path(), 2000);
    let dir = folder(t.path(), DecoderKind::Genai);
    let out = t.path().join("q");
    nibble_ok(&["quantize", dir.to_str().unwrap(), "-o", out.to_str().unwrap(), "--block-size", "32"]);
    let args = [
        "compare",
        dir.to_str().unwrap(),
        out.to_str().unwrap(),
        "--perplexity-text",
        text.to_str().unwrap(),
        "--perplexity-seq-len",
        "64",
        "--perplexity-windows",
        "3",
        "--json",
    ];
    let json: serde_json::Value = serde_json::from_str(&nibble_ok(&args)).unwrap();
    let p = &json["perplexity"];
    assert!(p["session"].as_str().unwrap().contains("default ONNX Runtime session"));
    let (o, q) = (p["original"]["perplexity"].as_f64().unwrap(), p["quantized"]["perplexity"].as_f64().unwrap());
    assert!(o > 1.0 && q > 1.0 && o != q, "{o} {q}");
    assert_eq!(p["original"]["predictions"].as_u64(), Some(3 * 63));
}

/// `nibble ARGS` exits 1 with `message` in stderr and `out` not written.
fn refused(args: &[&str], out: &Path, message: &str) {
    let r = nibble(args);
    let stderr = String::from_utf8_lossy(&r.stderr);
    assert_eq!(r.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains(message), "wanted '{message}' in: {stderr}");
    assert!(!out.exists(), "{} was written", out.display());
}

/// `base` followed by `extra`.
fn with<'a>(base: &[&'a str], extra: &[&'a str]) -> Vec<&'a str> {
    base.iter().chain(extra).copied().collect()
}

#[test]
fn text_errors_name_the_fix() {
    let t = tmp();
    let dir = folder(t.path(), DecoderKind::Genai);
    let out = t.path().join("out");
    let short = write_text(t.path(), 20);
    let base =
        ["quantize", dir.to_str().unwrap(), "-o", out.to_str().unwrap(), "--method", "gptq", "--calibration-text"];
    refused(&with(&base, &[short.to_str().unwrap()]), &out, "tokens, fewer than 16 samples x 512 tokens");
    // A missing, a broken and an unfitting tokenizer.
    let missing = t.path().join("nope.json");
    refused(&with(&base, &[short.to_str().unwrap(), "--tokenizer", missing.to_str().unwrap()]), &out, "nope.json");
    let broken = t.path().join("broken.json");
    std::fs::write(&broken, "{\"model\": 3}").unwrap();
    refused(
        &with(&base, &[short.to_str().unwrap(), "--tokenizer", broken.to_str().unwrap()]),
        &out,
        "not a Hugging Face tokenizer.json",
    );
    // A model file whose folder has no tokenizer.json.
    let lone = t.path().join("lone");
    std::fs::create_dir(&lone).unwrap();
    std::fs::copy(dir.join("model.onnx"), lone.join("model.onnx")).unwrap();
    std::fs::copy(dir.join("model.onnx.data"), lone.join("model.onnx.data")).unwrap();
    let lone_out = t.path().join("lone_q.onnx");
    refused(
        &[
            "quantize",
            lone.join("model.onnx").to_str().unwrap(),
            "-o",
            lone_out.to_str().unwrap(),
            "--method",
            "gptq",
            "--calibration-text",
            short.to_str().unwrap(),
        ],
        &lone_out,
        "--tokenizer",
    );
    // Not UTF-8.
    let bin = t.path().join("bin.txt");
    std::fs::write(&bin, [0x66u8, 0x6f, 0xff, 0xfe]).unwrap();
    refused(&with(&base, &[bin.to_str().unwrap()]), &out, "not UTF-8 text (byte 2)");
    // Text shorter than one sample.
    refused(
        &with(&base, &[short.to_str().unwrap(), "--calibration-samples", "1", "--calibration-seq-len", "4096"]),
        &out,
        "fewer than 1 samples x 4096 tokens = 4096; give a longer text or a shorter sequence length",
    );
    // A tokenizer whose vocabulary does not fit the embedding (988 rows): the example's with every
    // id moved past the table. Calibration and perplexity refuse it and name the fix.
    let mut tok: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("tokenizer.json")).unwrap()).unwrap();
    for id in tok["model"]["vocab"].as_object_mut().unwrap().values_mut() {
        *id = (id.as_u64().unwrap() + 5000).into();
    }
    for added in tok["added_tokens"].as_array_mut().unwrap() {
        added["id"] = (added["id"].as_u64().unwrap() + 5000).into();
    }
    let wide = t.path().join("wide.json");
    std::fs::write(&wide, serde_json::to_vec(&tok).unwrap()).unwrap();
    let long = t.path().join("long.txt");
    std::fs::write(&long, text(3000)).unwrap();
    let fit = ["--calibration-samples", "2", "--calibration-seq-len", "32", "--tokenizer", wide.to_str().unwrap()];
    let args = with(&with(&base, &[long.to_str().unwrap()]), &fit);
    refused(&args, &out, "is outside the embedding of input 'input_ids' (988 rows); use the model's own tokenizer");
    let ppl = [
        "compare",
        dir.to_str().unwrap(),
        dir.to_str().unwrap(),
        "--perplexity-text",
        long.to_str().unwrap(),
        "--perplexity-seq-len",
        "32",
        "--perplexity-windows",
        "2",
        "--tokenizer",
        wide.to_str().unwrap(),
    ];
    refused(&ppl, &out, "is outside the vocabulary of 988");
    refused(&ppl, &out, "the model's own tokenizer");
}
