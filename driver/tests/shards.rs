//! Shards (issue 19 item 5): `nibble quantize IN -o SHARD --segment-mb N --segments A..B` writes the
//! search results of segments A..B, and `nibble merge` assembles shards into the model a single
//! `nibble quantize IN -o OUT --segment-mb N` writes, byte for byte (the .onnx and its external
//! data), for rtn_dq, awq_lite, awq_clip and gptq; the merged models run in ONNX Runtime with its
//! default session and with optimizations disabled. Bad input (overlapping or missing segments,
//! shards of other models or options, a range past the last segment, options that cannot be sharded)
//! exits 1 (2 for usage) and writes nothing.

mod common;

use common::*;
use nibble_driver::cli::decoder_example::{write_folder, DecoderConfig, DecoderKind};
use nibble_driver::graph::model::ExternalData;
use nibble_driver::runtime::{open, run_f32, SessionOptions};
use nibble_driver::shard::{merge, quantize_shard};
use nibble_driver::{quantize_file, Method, Options};
use std::path::{Path, PathBuf};

/// `nibble example --kind genai`'s decoder with 4 layers.
fn genai(dir: &Path) -> PathBuf {
    let out = dir.join("genai");
    write_folder(&out, DecoderKind::Genai, &DecoderConfig { layers: 4, ..Default::default() }, false).unwrap();
    out.join("model.onnx")
}

/// Three ranges covering segments `0..count` (0-based, inclusive), each non-empty.
fn thirds(count: usize) -> Vec<(usize, usize)> {
    assert!(count >= 3, "{count} segments: too few to test three shards");
    let (a, b) = (count / 3, 2 * count / 3);
    vec![(0, a - 1), (a, b - 1), (b, count - 1)]
}

fn files(dir: &Path) -> Vec<(String, Vec<u8>)> {
    snapshot(dir).into_iter().filter(|(name, _)| name.starts_with("out")).collect()
}

/// On the onnxruntime-genai decoder (segments of 1 byte: a cut at every candidate position), the
/// merged shards are the single segmented run, byte for byte, for every shardable method; the
/// merged model runs in both session modes; the input is never modified.
#[test]
fn merged_shards_are_the_single_run_byte_for_byte_on_the_genai_decoder() {
    let d = tmp();
    let src = genai(d.path());
    let before = snapshot(src.parent().unwrap());
    let tokens: Vec<Vec<i64>> = (0..2).map(|s| (0..24).map(|t| (t * 7 + s * 13) % 500).collect()).collect();
    for (i, method) in [Method::RtnDq, Method::AwqLite, Method::AwqClip, Method::Gptq].into_iter().enumerate() {
        // The LM head quantized too (its activation widens the cut window; rtn_dq ties the
        // embedding Gather to it).
        let mut opts = Options { method, exclude: vec![], ..Default::default() };
        opts.awq.calibration.random = true;
        opts.awq.calibration.samples = 2;
        opts.awq.segment_bytes = Some(1);
        // External data, so that the data files are compared too (the decoder is small).
        opts.external_data = ExternalData::Always;
        let single = d.path().join(format!("single{i}"));
        let merged = d.path().join(format!("merged{i}"));
        for dir in [&single, &merged] {
            std::fs::create_dir(dir).unwrap();
        }
        quantize_file(&src, &single.join("out.onnx"), &opts).unwrap();
        let count = quantize_shard(&src, &d.path().join(format!("probe{i}")), &opts, (0, 0)).unwrap().layout.len();
        let shards: Vec<PathBuf> = thirds(count)
            .into_iter()
            .map(|r| {
                let shard = d.path().join(format!("s{i}_{}_{}", r.0, r.1));
                let s = quantize_shard(&src, &shard, &opts, r).unwrap();
                assert_eq!(s.range, r);
                shard
            })
            .collect();
        merge(&shards, &merged.join("out.onnx"), None, false, false).unwrap();
        let (a, b) = (files(&single), files(&merged));
        assert_eq!(a.len(), 2, "{method:?}: {:?}", a.iter().map(|f| &f.0).collect::<Vec<_>>());
        assert!(a == b, "{method:?}: the merged shards are not the single run's model");
        let [x, y] = decoder_logits(&merged.join("out.onnx"), &tokens);
        assert!(!x.is_empty() && x.iter().chain(&y).all(|v| v.is_finite()), "{method:?}");
    }
    assert!(snapshot(src.parent().unwrap()) == before, "the input folder changed");
}

/// The same through the command line on `nibble example`'s transformer (three segments at
/// --segment-mb 3): 2 and 3 shards, merged, equal the single run; both session modes run it.
#[test]
fn the_command_line_merges_shards_of_the_transformer_example() {
    let d = tmp();
    let src = d.path().join("t.onnx");
    nibble_ok(&["example", src.to_str().unwrap(), "--layers", "4"]);
    let x = [random_input("input", &[1, 16, 256], 3)];
    for (method, ranges) in [("rtn_dq", &["0..0", "1..1", "2..2"][..]), ("gptq", &["0..1", "2"][..])] {
        let common = ["--method", method, "--segment-mb", "3"];
        let single = d.path().join(format!("single_{method}.onnx"));
        let mut args = vec!["quantize", src.to_str().unwrap(), "-o", single.to_str().unwrap()];
        args.extend(common);
        nibble_ok(&args);
        let mut shards = vec![];
        for r in ranges {
            let shard = d.path().join(format!("{method}_{r}"));
            let mut args = vec!["quantize", src.to_str().unwrap(), "-o", shard.to_str().unwrap(), "--segments", r];
            args.extend(common);
            let out = nibble(&args);
            let log = String::from_utf8_lossy(&out.stderr);
            assert!(out.status.success(), "{method} {r}: {log}");
            // The log lists the segments, their first nodes and weights.
            assert!(log.contains("segment 2: from node '") && !log.contains("segment 3:"), "{log}");
            shards.push(shard);
        }
        let merged = d.path().join(format!("merged_{method}.onnx"));
        let mut args = vec!["merge"];
        args.extend(shards.iter().map(|s| s.to_str().unwrap()));
        args.extend(["-o", merged.to_str().unwrap()]);
        nibble_ok(&args);
        assert!(std::fs::read(&merged).unwrap() == std::fs::read(&single).unwrap(), "{method}");
        for session in [SessionOptions::default(), SessionOptions { no_optimization: true, ort_defaults: false }] {
            let mut s = open(&merged, session).unwrap();
            let y = run_f32(&mut s, &x).unwrap();
            assert!(y[0].data.iter().all(|v| v.is_finite()) && !y[0].data.is_empty(), "{method}");
        }
    }
}

fn fails(args: &[&str], code: i32, says: &[&str]) {
    let out = nibble(args);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(code), "{args:?}: {err}");
    for s in says {
        assert!(err.contains(s), "{args:?}: {err}");
    }
}

#[test]
fn bad_shards_and_ranges_are_refused_and_nothing_is_written() {
    let d = tmp();
    let src = d.path().join("t.onnx");
    let other = d.path().join("u.onnx");
    nibble_ok(&["example", src.to_str().unwrap(), "--layers", "4"]);
    nibble_ok(&["example", other.to_str().unwrap(), "--layers", "4", "--vocab", "900"]);
    let shard = |model: &Path, name: &str, r: &str, extra: &[&str]| {
        let out = d.path().join(name);
        let mut args = vec!["quantize", model.to_str().unwrap(), "-o", out.to_str().unwrap(), "--segment-mb", "3"];
        args.extend(["--segments", r]);
        args.extend(extra);
        nibble_ok(&args);
        out.to_str().unwrap().to_string()
    };
    let s0 = shard(&src, "s0", "0..0", &[]);
    let s01 = shard(&src, "s01", "0..1", &[]);
    let s12 = shard(&src, "s12", "1..2", &[]);
    let s2 = shard(&src, "s2", "2..2", &[]);
    let s12_zp = shard(&src, "s12zp", "1..2", &["--zero-point"]);
    let u12 = shard(&other, "u12", "1..2", &[]);
    let before = snapshot(d.path());
    let out = d.path().join("m.onnx");
    let o = out.to_str().unwrap();
    fails(&["merge", &s01, &s12, "-o", o], 1, &["segment 1 (from node '", "is also in shard", "s01"]);
    fails(&["merge", &s0, &s2, "-o", o], 1, &["segment 1 (from node '", "is in no shard", "--segments 1..1"]);
    fails(&["merge", &s0, &s12_zp, "-o", o], 1, &["another option", "zero_point"]);
    fails(&["merge", &s0, &u12, "-o", o], 1, &["another input model", "u.onnx"]);
    fails(&["merge", &s0, &s12, "-o", o, "--model", other.to_str().unwrap()], 1, &["another model than"]);
    fails(&["merge", d.path().join("t.onnx").to_str().unwrap(), "-o", o], 1, &["not", "manifest.json"]);
    // A range past the last segment (three at --segment-mb 3), and options that cannot be sharded.
    let q = |extra: &[&str]| {
        let mut a = vec!["quantize", src.to_str().unwrap(), "-o", o];
        a.extend(extra);
        a.into_iter().map(String::from).collect::<Vec<_>>()
    };
    let run = |extra: &[&str], code: i32, says: &[&str]| {
        let args = q(extra);
        fails(&args.iter().map(String::as_str).collect::<Vec<_>>(), code, says);
    };
    run(&["--segment-mb", "3", "--segments", "2..3"], 1, &["has 3 segments", "0..2"]);
    run(&["--segments", "0..1"], 2, &["--segment-mb"]);
    run(&["--segment-mb", "3", "--segments", "1..0"], 2, &["first segment comes after the last"]);
    run(&["--segment-mb", "3", "--segments", "0", "--target-bits", "5"], 2, &["--target-bits"]);
    run(&["--segment-mb", "3", "--segments", "0", "--method", "gptq", "--sequential"], 2, &["--sequential"]);
    run(&["--segment-mb", "3", "--segments", "0", "--method", "awq_gptq"], 2, &["awq_gptq"]);
    assert!(snapshot(d.path()) == before, "something was written or changed");
    // An existing shard is not replaced without --force.
    fails(&["quantize", src.to_str().unwrap(), "-o", &s0, "--segment-mb", "3", "--segments", "0"], 1, &["--force"]);
}

/// Ctrl-C while a shard calibrates leaves no shard folder, no temporary folder beside it and no
/// temporary calibration files; the input is untouched.
#[test]
fn sigint_while_writing_a_shard_leaves_nothing_behind() {
    use std::time::Duration;
    let d = tmp();
    let input_dir = d.path().join("in");
    let (out_dir, temp) = (d.path().join("out"), d.path().join("temp"));
    for dir in [&input_dir, &out_dir, &temp] {
        std::fs::create_dir(dir).unwrap();
    }
    let src = input_dir.join("t.onnx");
    nibble_ok(&["example", src.to_str().unwrap(), "--layers", "4"]);
    let before = snapshot(&input_dir);
    let shard = out_dir.join("s12");
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_nibble"))
        .args(["quantize", src.to_str().unwrap(), "-o", shard.to_str().unwrap(), "--method", "awq_clip"])
        .args(["--segment-mb", "3", "--segments", "1..2", "--calibration-memory-mb", "1"])
        .env("TMPDIR", &temp)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // Interrupt once the segmented calibration has started (its carried-weights file exists).
    let started = || {
        std::fs::read_dir(&temp).unwrap().any(|e| {
            let p = e.unwrap().path();
            p.file_name().unwrap().to_string_lossy().starts_with("nibble-calibration-")
                && p.join("sequential_weights.bin").exists()
        })
    };
    interrupt_when(&mut child, started, Duration::from_secs(120), "shard 1..2");
    for dir in [&out_dir, &temp] {
        let left = files_left(dir);
        assert!(left.is_empty(), "files left in {}: {left:?}", dir.display());
    }
    assert_eq!(snapshot(&input_dir), before, "the input changed");
}
