//! Issue 22 item 3: `nibble compare --methods ...` on an onnxruntime-genai folder, with the outputs
//! kept as folders (`--output-dir`), a reference folder (`--reference LABEL=DIR`) measured the
//! same way, and the size-versus-perplexity chart (`--plot FILE.svg`). The table's rows are the
//! methods x block sizes; its bytes are the kept folders' model file and external data on disk;
//! its perplexities are those `nibble compare FLOAT QUANTIZED --perplexity-text` prints; the SVG
//! is well-formed and its points and labels are the table's numbers. Every kept output runs in ONNX
//! Runtime with default session options and with optimizations disabled.

mod common;

use common::{decoder_logits, nibble, nibble_ok, snapshot, text, tmp};
use nibble_driver::calibrate::text::text_windows;
use std::path::{Path, PathBuf};

/// A genai example folder (`nibble example --kind genai`) and a text file in `root`.
fn setup(root: &Path) -> (PathBuf, PathBuf) {
    let dir = root.join("genai");
    nibble_ok(&["example", "--kind", "genai", dir.to_str().unwrap()]);
    let t = root.join("text.txt");
    std::fs::write(&t, text(3000)).unwrap();
    (dir, t)
}

/// The perplexity options every run here shares.
const PPL: [&str; 4] = ["--perplexity-seq-len", "64", "--perplexity-windows", "3"];

/// Bytes on disk of a folder's `model.onnx` and `model.onnx.data`.
fn model_bytes(dir: &Path) -> u64 {
    ["model.onnx", "model.onnx.data"].iter().map(|f| std::fs::metadata(dir.join(f)).unwrap().len()).sum()
}

/// A table row: name, block, options, bytes, perplexity (the last column).
#[derive(Debug)]
struct Row {
    name: String,
    block: String,
    options: String,
    bytes: u64,
    perplexity: f64,
}

fn rows(table: &str) -> Vec<Row> {
    let mut lines = table.lines();
    let header: Vec<&str> = lines.next().unwrap().split_whitespace().collect();
    assert_eq!(header[..4], ["method", "block", "options", "bytes"], "{table}");
    assert_eq!(header.last(), Some(&"perplexity"), "{table}");
    lines
        .take_while(|l| !l.starts_with("bytes:"))
        .map(|l| {
            let c: Vec<&str> = l.split_whitespace().collect();
            assert_eq!(c.len(), 10, "{l}");
            Row {
                name: c[0].into(),
                block: c[1].into(),
                options: c[2].into(),
                bytes: c[3].parse().unwrap(),
                perplexity: c[9].parse().unwrap(),
            }
        })
        .collect()
}

/// The perplexity `nibble compare FLOAT QUANTIZED --perplexity-text` prints for QUANTIZED.
fn compare_perplexity(float: &Path, quantized: &Path, text: &Path) -> f64 {
    let mut args = vec!["compare", float.to_str().unwrap(), quantized.to_str().unwrap()];
    args.extend(["--perplexity-text", text.to_str().unwrap(), "--json"]);
    args.extend(PPL);
    let json: serde_json::Value = serde_json::from_str(&nibble_ok(&args)).unwrap();
    json["perplexity"]["quantized"]["perplexity"].as_f64().unwrap()
}

/// A least-squares line through `(x, y)`: `(slope, intercept)`.
fn fit(points: &[(f64, f64)]) -> (f64, f64) {
    let n = points.len() as f64;
    let (mx, my) = (points.iter().map(|p| p.0).sum::<f64>() / n, points.iter().map(|p| p.1).sum::<f64>() / n);
    let sxy: f64 = points.iter().map(|p| (p.0 - mx) * (p.1 - my)).sum();
    let sxx: f64 = points.iter().map(|p| (p.0 - mx).powi(2)).sum();
    let slope = sxy / sxx;
    (slope, my - slope * mx)
}

#[test]
fn sweep_on_a_folder_prints_the_table_keeps_folders_and_draws_it() {
    let d = tmp();
    let (dir, text) = setup(d.path());
    let reference = d.path().join("builder-like");
    nibble_ok(&[
        "quantize",
        dir.to_str().unwrap(),
        "-o",
        reference.to_str().unwrap(),
        "--format",
        "matmulnbits",
        "--block-size",
        "32",
        "--zero-point",
    ]);
    let input_before = snapshot(&dir);
    let (out, svg) = (d.path().join("outs"), d.path().join("sweep.svg"));
    let mut args = vec!["compare", dir.to_str().unwrap(), "--methods", "rtn_dq,gptq", "--block-sizes", "32,64"];
    args.extend(["--perplexity-text", text.to_str().unwrap()]);
    args.extend(PPL);
    args.extend(["--calibration-text", text.to_str().unwrap(), "--calibration-seq-len", "64"]);
    args.extend(["--calibration-samples", "4", "--output-dir", out.to_str().unwrap()]);
    let r = format!("builder-int4={}", reference.display());
    args.extend(["--reference", &r, "--plot", svg.to_str().unwrap()]);
    let table = nibble_ok(&args);
    assert_eq!(snapshot(&dir), input_before, "the input folder changed");
    assert!(table.contains("perplexity: default ONNX Runtime session"), "{table}");
    assert!(table.contains(&format!("reference builder-int4: {}", reference.display())), "{table}");

    // Rows: the float model, methods x block sizes in order, then the reference.
    let rows = rows(&table);
    let names: Vec<(&str, &str, &str)> =
        rows.iter().map(|r| (r.name.as_str(), r.block.as_str(), r.options.as_str())).collect();
    assert_eq!(
        names,
        [
            ("float", "-", "-"),
            ("rtn_dq", "32", "dq"),
            ("rtn_dq", "64", "dq"),
            ("gptq", "32", "dq"),
            ("gptq", "64", "dq"),
            ("builder-int4", "-", "reference")
        ],
        "{table}"
    );
    let float = &rows[0];
    assert_eq!(float.bytes, model_bytes(&dir), "{table}");
    let tokenizer = dir.join("tokenizer.json");
    let windows = text_windows(&text, &tokenizer, 3, 64).unwrap();
    let float_logits = decoder_logits(&dir.join("model.onnx"), &windows)[1].clone();
    for row in &rows[1..5] {
        let kept = out.join(format!("{}_b{}", row.name, row.block));
        assert!(kept.join("genai_config.json").is_file() && kept.join("tokenizer.json").is_file(), "{kept:?}");
        assert_eq!(row.bytes, model_bytes(&kept), "{row:?}");
        assert!(row.bytes < float.bytes / 2, "{row:?}");
        assert!(row.perplexity.is_finite() && row.perplexity > 1.0 && row.perplexity != float.perplexity, "{row:?}");
        let want = compare_perplexity(&dir, &kept, &text);
        assert!((row.perplexity - want).abs() <= 1e-4 * want, "{row:?}: compare says {want}");
        for (mode, got) in ["default", "no optimization"].iter().zip(decoder_logits(&kept.join("model.onnx"), &windows))
        {
            let e = common::rel_err(&got, &float_logits);
            assert!(e > 0.0 && e < 0.6, "{row:?} ({mode} session): relative error {e}");
        }
    }
    assert!(rows[2].bytes < rows[1].bytes, "bigger blocks must give smaller outputs: {table}");
    let refrow = &rows[5];
    assert_eq!(refrow.bytes, model_bytes(&reference), "{table}");
    let want = compare_perplexity(&dir, &reference, &text);
    assert!((refrow.perplexity - want).abs() <= 1e-4 * want, "{refrow:?}: compare says {want}");

    // The chart: one filled circle per row (blue) and per reference (orange), each with its label
    // beside it; x linear in the table's bytes, y linear in its perplexity (higher drawn higher).
    let body = std::fs::read_to_string(&svg).unwrap();
    let doc = roxmltree::Document::parse(&body).expect("well-formed SVG");
    assert_eq!(doc.root_element().tag_name().name(), "svg");
    let circles: Vec<(f64, f64, String)> = doc
        .descendants()
        .filter(|n| n.tag_name().name() == "circle")
        .map(|n| {
            let v = |a: &str| n.attribute(a).unwrap().parse::<f64>().unwrap();
            (v("cx"), v("cy"), n.attribute("fill").unwrap_or_default().to_string())
        })
        .collect();
    let texts: Vec<(f64, f64, String)> = doc
        .descendants()
        .filter(|n| n.tag_name().name() == "text")
        .map(|n| {
            let v = |a: &str| n.attribute(a).unwrap().parse::<f64>().unwrap();
            (v("x"), v("y"), n.text().unwrap_or_default().trim().to_string())
        })
        .collect();
    assert_eq!(circles.iter().filter(|c| c.2 == "#0000FF").count(), 4, "{circles:?}");
    assert_eq!(circles.iter().filter(|c| c.2 == "#FF8000").count(), 1, "{circles:?}");
    let mut points = vec![];
    for row in &rows[1..] {
        let label = match row.block.as_str() {
            "-" => row.name.clone(),
            b => format!("{} b{b}", row.name),
        };
        let t = texts.iter().find(|t| t.2 == label).unwrap_or_else(|| panic!("no label '{label}' in {texts:?}"));
        let color = if row.options == "reference" { "#FF8000" } else { "#0000FF" };
        // The label sits 6 px right of and 14 px above its point.
        let c = circles
            .iter()
            .find(|c| c.2 == color && (c.0 + 6.0 - t.0).abs() < 0.5 && (c.1 - 14.0 - t.1).abs() < 0.5)
            .unwrap_or_else(|| panic!("no {color} point under label '{label}' at {t:?}: {circles:?}"));
        points.push((row.bytes as f64, row.perplexity, c.0, c.1));
    }
    let (sx, ix) = fit(&points.iter().map(|p| (p.0, p.2)).collect::<Vec<_>>());
    let (sy, iy) = fit(&points.iter().map(|p| (p.1, p.3)).collect::<Vec<_>>());
    assert!(sx > 0.0 && sy < 0.0, "x grows with bytes, y upwards with perplexity: {sx} {sy}");
    for p in &points {
        assert!((sx * p.0 + ix - p.2).abs() <= 1.0, "x of {p:?} is off the table's bytes");
        assert!((sy * p.1 + iy - p.3).abs() <= 1.0, "y of {p:?} is off the table's perplexity");
    }
}

/// Bad sweep options: usage errors exit 2; a missing reference, an output already kept, or a chart
/// in a missing folder exit 1 naming it; nothing is written.
#[test]
fn sweep_options_are_checked_before_any_work() {
    let d = tmp();
    let (dir, text) = setup(d.path());
    let before = snapshot(d.path());
    let base = |extra: &[&str]| {
        let mut a = vec!["compare".to_string(), dir.display().to_string(), "--methods".into(), "rtn_dq".into()];
        a.extend(extra.iter().map(|s| s.to_string()));
        a
    };
    let run = |args: Vec<String>| nibble(&args.iter().map(String::as_str).collect::<Vec<_>>());
    let t = text.to_str().unwrap();
    for extra in [vec!["--plot", "s.svg"], vec!["--reference", "no-equals-sign"], vec!["--reference", "=path"]] {
        let o = run(base(&extra));
        assert_eq!(o.status.code(), Some(2), "{extra:?}: {}", String::from_utf8_lossy(&o.stderr));
    }
    let o = nibble(&["compare", dir.to_str().unwrap(), "--plot", "s.svg", "--perplexity-text", t]);
    assert_eq!(o.status.code(), Some(2), "--plot needs --methods");
    let missing = d.path().join("nothing-here");
    let r = format!("x={}", missing.display());
    let o = run(base(&["--reference", &r]));
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains("--reference x=") && err.contains("no such file or folder"), "{err}");
    let svg = d.path().join("no/such/folder/s.svg");
    let o = run(base(&["--perplexity-text", t, "--plot", svg.to_str().unwrap()]));
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("does not exist"));
    let inner = dir.join("sweeps/out");
    let o = run(base(&["--output-dir", inner.to_str().unwrap()]));
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains("inside the input folder"), "{err}");
    assert!(!dir.join("sweeps").exists(), "the input folder was modified");
    assert_eq!(snapshot(d.path()), before, "something was written");
    let outs = d.path().join("outs");
    std::fs::create_dir_all(outs.join("rtn_dq_b128")).unwrap();
    let o = run(base(&["--output-dir", outs.to_str().unwrap()]));
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains("rtn_dq_b128") && err.contains("already exists"), "{err}");
    assert_eq!(std::fs::read_dir(&outs).unwrap().count(), 1, "an output was written");
}
