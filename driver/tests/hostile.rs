//! Hostile input and interruption: an interrupted run leaves nothing behind, impossible declared
//! sizes are refused before allocation, NaN/Inf weights can be skipped, and every input the
//! fuzzers once crashed on (fuzz/regressions/) is handled without a panic.

mod common;

use common::*;
use nibble::FloatFormat;
use nibble_driver::cli::example::{transformer, TransformerConfig};
use nibble_driver::graph::build::{init, io, model, node};
use nibble_driver::graph::model::{ExternalData, Model};
use nibble_driver::graph::onnx::GraphProto;
use nibble_driver::rng::Rng;
use std::path::Path;
use std::time::{Duration, Instant};

fn calibration_dirs() -> Vec<String> {
    std::fs::read_dir(std::env::temp_dir())
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("nibble-calibration-"))
        .collect()
}

#[test]
fn sigint_half_way_leaves_no_output_and_no_temporary_file() {
    let d = tmp();
    let cfg = TransformerConfig {
        hidden: 384,
        intermediate: 1024,
        layers: 6,
        vocab: 2000,
        format: FloatFormat::F32,
        opset: 17,
        seed: 3,
    };
    let src = write(transformer(&cfg), &d.path().join("m.onnx"), ExternalData::Always);
    let out_dir = d.path().join("out");
    std::fs::create_dir(&out_dir).unwrap();
    let out = out_dir.join("q.onnx");
    let before_tmp = calibration_dirs();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_nibble"))
        .args([
            "quantize",
            src.to_str().unwrap(),
            "-o",
            out.to_str().unwrap(),
            "--method",
            "awq_full",
            "--calibration-samples",
            "8",
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Interrupt once calibration has started (its temporary folder exists), or after 3 s.
    let start = Instant::now();
    while calibration_dirs().len() <= before_tmp.len() && start.elapsed() < Duration::from_secs(3) {
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(300));
    assert!(child.try_wait().unwrap().is_none(), "the run finished before it could be interrupted");
    let killed = std::process::Command::new("kill").args(["-INT", &child.id().to_string()]).status().unwrap();
    assert!(killed.success());
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(130));
    assert!(std::fs::read_dir(&out_dir).unwrap().next().is_none(), "files left in the output folder");
    let leaked: Vec<String> = calibration_dirs().into_iter().filter(|n| !before_tmp.contains(n)).collect();
    assert!(leaked.is_empty(), "calibration folders left: {leaked:?}");
}

#[test]
fn impossible_declared_sizes_are_refused_before_allocation() {
    let d = tmp();
    let mut w = init("W", &[4, 4], &[0.5; 16], FloatFormat::F32);
    w.dims = vec![1_000_000, 1_000_000]; // 10^12 elements, 16 values present
    let g = GraphProto {
        node: vec![node("MatMul", "/mm/MatMul", &["x", "W"], &["y"], vec![])],
        initializer: vec![w],
        input: vec![io("x", 1, &[None, Some(1_000_000)])],
        output: vec![io("y", 1, &[None, Some(1_000_000)])],
        ..Default::default()
    };
    let src = write(model(g, 17), &d.path().join("m.onnx"), ExternalData::Never);
    let before = snapshot(d.path());
    let o = nibble(&["quantize", src.to_str().unwrap(), "-o", d.path().join("q.onnx").to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1));
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(e.contains("'W'") && e.contains("raw_data has 64 bytes"), "{e}");
    assert_eq!(snapshot(d.path()), before);
}

#[test]
fn skip_nonfinite_leaves_the_weight_unquantized() {
    let d = tmp();
    let mut rng = Rng::new(4);
    let mut bad = rng.normals(64 * 16, 0.1);
    bad[100] = f32::NAN;
    let g = GraphProto {
        node: vec![
            node("MatMul", "/a/MatMul", &["x", "Wa"], &["h"], vec![]),
            node("MatMul", "/b/MatMul", &["h", "Wb"], &["y"], vec![]),
        ],
        initializer: vec![
            init("Wa", &[64, 16], &bad, FloatFormat::F32),
            init("Wb", &[16, 8], &rng.normals(128, 0.1), FloatFormat::F32),
        ],
        input: vec![io("x", 1, &[None, Some(64)])],
        output: vec![io("y", 1, &[None, Some(8)])],
        ..Default::default()
    };
    let src = write(model(g, 17), &d.path().join("m.onnx"), ExternalData::Never);
    let out = d.path().join("q.onnx");
    let o = nibble(&[
        "quantize",
        src.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
        "--block-size",
        "16",
        "--skip-nonfinite",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(String::from_utf8_lossy(&o.stderr).contains("'Wa' holds NaN or Inf"));
    let g = Model::load(&out).unwrap().proto.graph.unwrap();
    let names: Vec<&str> = g.initializer.iter().filter_map(|t| t.name.as_deref()).collect();
    assert!(names.contains(&"Wa") && names.contains(&"Wb_i4") && !names.contains(&"Wa_i4"), "{names:?}");
}

/// Replays every saved fuzz input through the same code as the fuzz targets.
#[test]
fn fuzz_regressions_do_not_panic() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/regressions");
    let mut replayed = 0;
    for target in ["model", "npz"] {
        let Ok(entries) = std::fs::read_dir(root.join(target)) else { continue };
        for e in entries {
            let data = std::fs::read(e.unwrap().path()).unwrap();
            match target {
                "model" => {
                    if let Ok(m) = Model::from_bytes(bytes::Bytes::from(data)) {
                        let p = nibble_driver::plan::compile_patterns(&["/lm_head".into()]).unwrap();
                        let planned = nibble_driver::plan::plan(&m, &p).unwrap_or_default();
                        for c in planned.iter().filter(|c| c.quantized() && c.bytes <= 1 << 20) {
                            let _ = nibble_driver::methods::rtn::quantize_candidate(
                                &m,
                                c,
                                nibble::BlockSize::Blocked(32),
                                true,
                            );
                        }
                    }
                }
                _ => {
                    let _ = nibble_driver::calibrate::npy::parse_npz("r.npz", &data);
                    let _ = nibble_driver::calibrate::npy::parse_npy("r.npy", &data);
                }
            }
            replayed += 1;
        }
    }
    assert!(replayed >= 2, "regression inputs missing ({replayed})");
}
