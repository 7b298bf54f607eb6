//! One test per failure: each gets a message naming the file, tensor or node and the fix, exit code
//! 1 (2 for command-line usage), no panic, no output file, and the input folder unchanged.

mod common;

use common::*;
use nibble::FloatFormat;
use nibble_driver::graph::build::{init, io, model, node};
use nibble_driver::graph::model::ExternalData;
use nibble_driver::graph::onnx::{GraphProto, ModelProto};
use nibble_driver::rng::Rng;
use prost::Message;
use std::path::Path;

fn one_matmul(values: Vec<f32>, k: usize, n: usize) -> ModelProto {
    let g = GraphProto {
        node: vec![node("MatMul", "/fc/MatMul", &["x", "fc.weight"], &["y"], vec![])],
        initializer: vec![init("fc.weight", &[k, n], &values, FloatFormat::F32)],
        input: vec![io("x", 1, &[None, Some(k)])],
        output: vec![io("y", 1, &[None, Some(n)])],
        ..Default::default()
    };
    model(g, 17)
}

fn good_model(dir: &Path, external: ExternalData) -> std::path::PathBuf {
    write(one_matmul(Rng::new(1).normals(64 * 16, 0.1), 64, 16), &dir.join("m.onnx"), external)
}

/// Runs `nibble quantize` expecting failure; checks code, message and that nothing was written.
fn fails(dir: &Path, model: &Path, extra: &[&str], code: i32, needles: &[&str]) -> String {
    let before = snapshot(dir);
    let out = dir.join("out.onnx");
    let mut args = vec!["quantize", model.to_str().unwrap(), "-o", out.to_str().unwrap()];
    args.extend_from_slice(extra);
    let o = nibble(&args);
    let stderr = String::from_utf8_lossy(&o.stderr).into_owned();
    assert_eq!(o.status.code(), Some(code), "{args:?}: {stderr}");
    for n in needles {
        assert!(stderr.contains(n), "{args:?}: message lacks {n:?}: {stderr}");
    }
    assert!(!stderr.contains("panicked"), "{stderr}");
    // Each cause is said once (a cause printed both in the message and as its source repeated it).
    let parts: Vec<&str> = stderr.trim_end().split(": ").filter(|p| p.len() > 6).collect();
    for (i, p) in parts.iter().enumerate() {
        assert!(!parts[i + 1..].contains(p), "{args:?}: cause repeated ('{p}'): {stderr}");
    }
    assert_eq!(snapshot(dir), before, "{args:?} changed the folder");
    stderr
}

#[test]
fn unreadable_file() {
    let d = tmp();
    let m = d.path().join("missing.onnx");
    let stderr = fails(d.path(), &m, &[], 1, &["cannot read", "missing.onnx"]);
    assert_eq!(stderr, format!("nibble: error: cannot read {}: No such file or directory (os error 2)\n", m.display()));
}

#[test]
fn bad_protobuf() {
    let d = tmp();
    let p = d.path().join("bad.onnx");
    std::fs::write(&p, b"\x08\x07this is not an onnx model \xff\xff\xff\xff").unwrap();
    fails(d.path(), &p, &[], 1, &["bad.onnx", "not a valid ONNX model"]);
    // A truncated real model.
    let good = good_model(d.path(), ExternalData::Never);
    let bytes = std::fs::read(&good).unwrap();
    std::fs::write(&p, &bytes[..bytes.len() / 2]).unwrap();
    fails(d.path(), &p, &[], 1, &["not a valid ONNX model"]);
}

#[test]
fn missing_external_data() {
    let d = tmp();
    let m = good_model(d.path(), ExternalData::Always);
    std::fs::remove_file(d.path().join("m.onnx_data")).unwrap();
    fails(d.path(), &m, &[], 1, &["fc.weight", "external data", "m.onnx_data"]);
}

#[test]
fn short_external_data() {
    let d = tmp();
    let m = good_model(d.path(), ExternalData::Always);
    let data = d.path().join("m.onnx_data");
    let bytes = std::fs::read(&data).unwrap();
    std::fs::write(&data, &bytes[..bytes.len() - 100]).unwrap();
    fails(d.path(), &m, &[], 1, &["fc.weight", "past the end", "truncated"]);
}

fn with_location(m: &Path, location: &str) {
    let mut proto = ModelProto::decode(std::fs::read(m).unwrap().as_slice()).unwrap();
    for t in proto.graph.as_mut().unwrap().initializer.iter_mut() {
        for e in t.external_data.iter_mut() {
            if e.key.as_deref() == Some("location") {
                e.value = Some(location.to_string());
            }
        }
    }
    std::fs::write(m, proto.encode_to_vec()).unwrap();
}

#[test]
fn external_data_outside_the_model_folder() {
    let d = tmp();
    let inner = d.path().join("model");
    std::fs::create_dir(&inner).unwrap();
    let m = good_model(&inner, ExternalData::Always);
    std::fs::copy(inner.join("m.onnx_data"), d.path().join("outside.bin")).unwrap();
    with_location(&m, "../outside.bin");
    fails(&inner, &m, &[], 1, &["fc.weight", "'../outside.bin'", "inside the model's folder"]);
    with_location(&m, "/etc/passwd");
    fails(&inner, &m, &[], 1, &["fc.weight", "/etc/passwd"]);
    #[cfg(unix)]
    {
        std::os::unix::fs::symlink(d.path().join("outside.bin"), inner.join("link.bin")).unwrap();
        with_location(&m, "link.bin");
        fails(&inner, &m, &[], 1, &["fc.weight", "outside the model's folder"]);
    }
}

#[test]
fn unsupported_dtype() {
    let d = tmp();
    let mut proto = one_matmul(vec![0.5; 32 * 8], 32, 8);
    let t = &mut proto.graph.as_mut().unwrap().initializer[0];
    t.data_type = Some(11); // DOUBLE
    t.raw_data = Some(bytes::Bytes::from(vec![0u8; 32 * 8 * 8]));
    let m = write(proto, &d.path().join("m.onnx"), ExternalData::Never);
    let stderr = fails(d.path(), &m, &[], 1, &["fc.weight", "/fc/MatMul", "DOUBLE", "--exclude"]);
    assert_eq!(
        stderr,
        "nibble: error: weight 'fc.weight' of node '/fc/MatMul' has data type DOUBLE; only float32, float16 and bfloat16 weights can be quantized (exclude the node with --exclude '/fc/MatMul')\n"
    );
}

#[test]
fn bad_block_sizes() {
    // A block size no model could take is a usage error (exit 2), for quantize and compare's sweep;
    // the input is untouched and nothing is written.
    let d = tmp();
    let m = good_model(d.path(), ExternalData::Never);
    for b in ["0", "1", "3", "33", "-2", "x"] {
        let stderr = fails(d.path(), &m, &["--block-size", b], 2, &["--block-size", b]);
        assert!(stderr.contains(&format!("invalid value '{b}' for '--block-size")), "{stderr}");
        if b != "x" {
            assert!(stderr.contains(&format!("block size {b} is not supported: ")), "{stderr}");
        }
        let stderr =
            fails(d.path(), &m, &["--gather-axis", "0", "--gather-block-size", b], 2, &["--gather-block-size"]);
        assert!(stderr.contains(&format!("invalid value '{b}'")), "{stderr}");
    }
    let o = nibble(&["compare", m.to_str().unwrap(), "--methods", "rtn_dq", "--block-sizes", "128,3"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("block size 3 is not supported"));
}

#[test]
fn non_finite_weights() {
    let d = tmp();
    for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
        let mut v = Rng::new(2).normals(64 * 16, 0.1);
        v[40 * 16 + 3] = bad; // row 40: block 1 of 32
        let m = write(one_matmul(v, 64, 16), &d.path().join("m.onnx"), ExternalData::Never);
        for zp in [false, true] {
            let extra: &[&str] = if zp { &["--block-size", "32", "--zero-point"] } else { &["--block-size", "32"] };
            fails(d.path(), &m, extra, 1, &["fc.weight", "NaN or Inf", "block 1", "rows 32..64", "column 3"]);
        }
    }
}

#[test]
fn output_that_is_the_input_or_exists() {
    let d = tmp();
    let m = good_model(d.path(), ExternalData::Always);
    let before = snapshot(d.path());
    let o = nibble(&["quantize", m.to_str().unwrap(), "-o", m.to_str().unwrap(), "--force"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("is the input model"));
    // OUT whose OUT.onnx_data would be the input's data file: "m.onnx_data" is the data of "m.onnx".
    let o = nibble(&["quantize", m.to_str().unwrap(), "-o", d.path().join("m.onnx").to_str().unwrap(), "--force"]);
    assert_eq!(o.status.code(), Some(1));
    assert_eq!(snapshot(d.path()), before);
    let out = d.path().join("q.onnx");
    std::fs::write(&out, b"keep me").unwrap();
    let o = nibble(&["quantize", m.to_str().unwrap(), "-o", out.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("--force"));
    assert_eq!(std::fs::read(&out).unwrap(), b"keep me");
    nibble_ok(&["quantize", m.to_str().unwrap(), "-o", out.to_str().unwrap(), "--force"]);
    assert_ne!(std::fs::read(&out).unwrap(), b"keep me");
}

#[test]
fn usage_errors_exit_2() {
    let o = nibble(&["quantize"]);
    assert_eq!(o.status.code(), Some(2));
    let o = nibble(&["quantize", "m.onnx", "--method", "bogus"]);
    assert_eq!(o.status.code(), Some(2));
    let d = tmp();
    let m = good_model(d.path(), ExternalData::Never);
    fails(d.path(), &m, &["--exclude", "(unclosed"], 1, &["invalid --exclude pattern", "(unclosed"]);
}
