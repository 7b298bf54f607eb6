//! Streamed output (issue 19 item 1): the streamed path writes the same model as the path that
//! holds every quantized weight in memory (byte for byte for a single `.onnx` file, the same tensors
//! when external data only lays them out in another order), the protobuf written field by field is
//! prost's encoding, and a disk that fills or a Ctrl-C while streaming leaves no output behind and
//! the input untouched.

mod common;

use common::*;
use nibble::FloatFormat;
use nibble_driver::cli::example::{transformer, TransformerConfig};
use nibble_driver::graph::build::{init, io, node};
use nibble_driver::graph::model::{save, ExternalData, Model};
use nibble_driver::graph::onnx::{
    FunctionProto, GraphProto, ModelProto, OperatorSetIdProto, StringStringEntryProto, TensorProto, ValueInfoProto,
};
use nibble_driver::runtime::{open, run_f32, NamedTensor, SessionOptions};
use nibble_driver::{quantize_file, Format, Method, Options};
use std::path::{Path, PathBuf};
use std::time::Duration;

const HIDDEN: usize = 128;

/// A small transformer-like fp16 model whose weights live in an external data file (read through
/// the memory map, as large models are).
fn small_model(dir: &Path) -> PathBuf {
    let cfg = TransformerConfig {
        hidden: HIDDEN,
        intermediate: 256,
        layers: 2,
        vocab: 300,
        format: FloatFormat::F16,
        opset: 17,
        seed: 11,
    };
    write(transformer(&cfg), &dir.join("m.onnx"), ExternalData::Always)
}

fn options(method: Method, format: Format, external_data: ExternalData, in_memory: bool) -> Options {
    let mut o = Options { method, format, external_data, in_memory, force: true, ..Default::default() };
    o.awq.calibration.samples = 4;
    o
}

/// The model at `path` with every top-level initializer's data read back inline: what ONNX
/// Runtime sees, whatever the file layout.
fn inlined(path: &Path) -> ModelProto {
    let mut m = Model::load(path).unwrap();
    m.inline_external_data().unwrap();
    m.proto
}

/// The bytes and the number of the top-level tensors the model at `path` keeps in external data.
fn referenced(path: &Path) -> (u64, u64) {
    let m = Model::load(path).unwrap();
    let lengths: Vec<u64> = m
        .proto
        .graph
        .as_ref()
        .unwrap()
        .initializer
        .iter()
        .filter_map(|t| {
            let length = t.external_data.iter().find(|e| e.key.as_deref() == Some("length"))?;
            length.value.as_ref()?.parse().ok()
        })
        .collect();
    (lengths.iter().sum(), lengths.len() as u64)
}

/// The outputs of the model at `path` on a random input in ONNX Runtime, with default session
/// options and with graph optimizations disabled; every value finite.
fn outputs(path: &Path) -> Vec<Vec<NamedTensor>> {
    let y = outputs_of(path, &[random_input("input", &[1, 5, HIDDEN], 7)]);
    assert!(y.iter().flatten().all(|t| t.data.iter().all(|v| v.is_finite())), "{}: non-finite output", path.display());
    y
}

/// The outputs of the model at `path` on `inputs`, with default session options and with graph
/// optimizations disabled.
fn outputs_of(path: &Path, inputs: &[NamedTensor]) -> Vec<Vec<NamedTensor>> {
    let sessions = [SessionOptions::default(), SessionOptions { no_optimization: true, ..Default::default() }];
    sessions
        .into_iter()
        .map(|so| run_f32(&mut open(path, so).unwrap_or_else(|e| panic!("{}: {e}", path.display())), inputs).unwrap())
        .collect()
}

#[test]
fn streamed_output_equals_the_in_memory_output() {
    let d = tmp();
    let src = small_model(d.path());
    let input_before = snapshot(d.path());
    let cases = [
        (Method::RtnDq, Format::Dq),
        (Method::RtnDq, Format::MatMulNBits),
        (Method::Rtn, Format::Dq),
        (Method::AwqLite, Format::Dq),
        (Method::AwqClip, Format::Dq),
        (Method::AwqClip, Format::MatMulNBits),
        (Method::Gptq, Format::Dq),
    ];
    for (method, format) in cases {
        for external in [ExternalData::Never, ExternalData::Auto, ExternalData::Always] {
            let label = format!("{method:?} {format:?} external {external:?}");
            let out = |tag: &str| {
                let dir = d.path().join(format!("{method:?}-{format:?}-{external:?}-{tag}"));
                std::fs::create_dir_all(&dir).unwrap();
                dir.join("q.onnx")
            };
            let (held, streamed) = (out("held"), out("streamed"));
            let a = quantize_file(&src, &held, &options(method, format, external, true)).unwrap();
            let b = quantize_file(&src, &streamed, &options(method, format, external, false)).unwrap();
            assert!(a.quantized > 0, "{label}: nothing quantized");
            assert_eq!((a.quantized, a.weight_bytes_after), (b.quantized, b.weight_bytes_after), "{label}");
            let data = |p: &Path| p.with_file_name("q.onnx_data");
            match external {
                // One .onnx file: the same bytes.
                ExternalData::Never | ExternalData::Auto => {
                    assert_eq!(
                        std::fs::read(&held).unwrap(),
                        std::fs::read(&streamed).unwrap(),
                        "{label}: bytes differ"
                    );
                    assert!(!data(&streamed).exists(), "{label}: data file next to an inline model");
                }
                // External data: the same graph and tensors; the data file holds the same bytes,
                // laid out in another order.
                ExternalData::Always => {
                    assert_eq!(inlined(&held), inlined(&streamed), "{label}: tensors or graph differ");
                    let (x, y) = (std::fs::read(data(&held)).unwrap(), std::fs::read(data(&streamed)).unwrap());
                    let sorted = |v: &[u8]| {
                        let mut v = v.to_vec();
                        v.sort_unstable();
                        v
                    };
                    assert_eq!(x.len(), y.len(), "{label}: data file sizes differ");
                    assert_eq!(sorted(&x), sorted(&y), "{label}: data files hold other bytes");
                    // Tensors written ahead (the unchanged ones) are each written once and all
                    // referenced: nothing in the file but tensors and their alignment padding.
                    let (bytes, count) = referenced(&streamed);
                    assert!(
                        y.len() as u64 <= bytes + 63 * count,
                        "{label}: {} bytes unreferenced",
                        y.len() as u64 - bytes
                    );
                }
            }
            assert_eq!(outputs(&held), outputs(&streamed), "{label}: ONNX Runtime computes other outputs");
            // No temporary file is left next to either output.
            for p in [&held, &streamed] {
                let left: Vec<String> = std::fs::read_dir(p.parent().unwrap())
                    .unwrap()
                    .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                    .filter(|n| n.contains("nibble-tmp"))
                    .collect();
                assert!(left.is_empty(), "{label}: temporary files left: {left:?}");
            }
        }
    }
    let now: Vec<_> = snapshot(d.path()).into_iter().filter(|(n, _)| n.starts_with("m.onnx")).collect();
    assert_eq!(now, input_before, "the input changed");
}

#[test]
fn the_protobuf_is_written_field_by_field_as_prost_encodes_it() {
    let d = tmp();
    let entry = |k: &str, v: &str| StringStringEntryProto { key: Some(k.into()), value: Some(v.into()) };
    let big: Vec<f32> = (0..4096).map(|i| i as f32 * 0.25).collect();
    let graph = GraphProto {
        node: vec![
            node("MatMul", "/mm/MatMul", &["x", "W"], &["h"], vec![]),
            node("Add", "/add", &["h", "b"], &["y"], vec![]),
        ],
        name: Some("g".into()),
        initializer: vec![
            TensorProto {
                doc_string: Some("fields after raw_data".into()),
                metadata_props: vec![entry("tensor", "meta")],
                ..init("W", &[64, 64], &big, FloatFormat::F32)
            },
            init("b", &[64], &[0.5; 64], FloatFormat::F32),
        ],
        doc_string: Some("graph doc".into()),
        input: vec![io("x", 1, &[None, Some(64)])],
        output: vec![io("y", 1, &[None, Some(64)])],
        value_info: vec![ValueInfoProto { name: Some("h".into()), ..Default::default() }],
        metadata_props: vec![entry("graph", "meta")],
        ..Default::default()
    };
    let proto = ModelProto {
        ir_version: Some(8),
        opset_import: vec![OperatorSetIdProto { domain: Some(String::new()), version: Some(17) }],
        producer_name: Some("test".into()),
        producer_version: Some("1".into()),
        domain: Some("d".into()),
        model_version: Some(3),
        doc_string: Some("model doc".into()),
        graph: Some(graph),
        metadata_props: vec![entry("k", "v")],
        functions: vec![FunctionProto { name: Some("f".into()), domain: Some("local".into()), ..Default::default() }],
        ..Default::default()
    };
    let path = d.path().join("m.onnx");
    save(proto.clone(), &path, ExternalData::Never).unwrap();
    assert_eq!(std::fs::read(&path).unwrap(), prost::Message::encode_to_vec(&proto));
    // With external data, the tensors read back are the same.
    let ext = d.path().join("e.onnx");
    save(proto.clone(), &ext, ExternalData::Always).unwrap();
    assert!(ext.with_file_name("e.onnx_data").exists());
    assert_eq!(inlined(&ext), proto);
    let run = |p: &Path| {
        outputs_of(
            p,
            &[NamedTensor { name: "x".into(), shape: vec![2, 64], data: (0..128).map(|i| i as f32).collect() }],
        )
    };
    assert_eq!(run(&path), run(&ext));
}

/// A model big enough that writing its output takes a while (about 20 M parameters, f32).
fn large_model(dir: &Path) -> PathBuf {
    let cfg = TransformerConfig {
        hidden: 512,
        intermediate: 1536,
        layers: 6,
        vocab: 1000,
        format: FloatFormat::F32,
        opset: 17,
        seed: 5,
    };
    write(transformer(&cfg), &dir.join("m.onnx"), ExternalData::Always)
}

#[test]
fn a_disk_that_fills_while_streaming_leaves_no_output_and_the_input_untouched() {
    let d = tmp();
    let input_dir = d.path().join("in");
    std::fs::create_dir(&input_dir).unwrap();
    let src = small_model(&input_dir);
    let before = snapshot(&input_dir);
    for external in ["always", "never"] {
        let out_dir = d.path().join(format!("out-{external}"));
        std::fs::create_dir(&out_dir).unwrap();
        let out = out_dir.join("q.onnx");
        // Files over 16 KiB cannot be written (RLIMIT_FSIZE; SIGXFSZ ignored so that the write
        // fails with EFBIG, as on a full disk, instead of killing the process).
        let o = std::process::Command::new("sh")
            .args(["-c", "trap '' XFSZ; ulimit -f 16; exec \"$0\" \"$@\""])
            .arg(env!("CARGO_BIN_EXE_nibble"))
            .args(["quantize", src.to_str().unwrap(), "-o", out.to_str().unwrap(), "--external-data", external])
            .output()
            .unwrap();
        let e = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "--external-data {external}: {e}");
        assert!(e.contains("cannot write") && e.contains("q.onnx") && e.contains("too large"), "{e}");
        let left: Vec<_> = std::fs::read_dir(&out_dir).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert!(left.is_empty(), "--external-data {external}: files left: {left:?}");
        assert_eq!(snapshot(&input_dir), before, "the input changed");
    }
}

#[test]
fn sigint_while_streaming_removes_the_temporary_files() {
    let d = tmp();
    let input_dir = d.path().join("in");
    std::fs::create_dir(&input_dir).unwrap();
    let src = large_model(&input_dir);
    let before = snapshot(&input_dir);
    let out_dir = d.path().join("out");
    std::fs::create_dir(&out_dir).unwrap();
    let out = out_dir.join("q.onnx");
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_nibble"))
        .args(["quantize", src.to_str().unwrap(), "-o", out.to_str().unwrap(), "--external-data", "always"])
        .arg("--scale-search")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // Interrupt once the streamed data file exists (the quantized weights are being written).
    let streaming = || {
        std::fs::read_dir(&out_dir).unwrap().any(|e| e.unwrap().file_name().to_string_lossy().contains("nibble-tmp"))
    };
    interrupt_when(&mut child, streaming, Duration::from_secs(60), "streamed output");
    let left: Vec<_> = std::fs::read_dir(&out_dir).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert!(left.is_empty(), "files left in the output folder: {left:?}");
    assert_eq!(snapshot(&input_dir), before, "the input changed");
}

/// Interrupted during a segmented calibration, with the carried tensors held in memory and with
/// every one spilled to the calibration folder (`--carry-memory-mb 0`): no temporary file and no
/// output left.
#[test]
fn sigint_during_segmented_calibration_removes_the_temporary_files() {
    let d = tmp();
    let input_dir = d.path().join("in");
    std::fs::create_dir(&input_dir).unwrap();
    let src = large_model(&input_dir);
    let before = snapshot(&input_dir);
    // In memory: wait for the carrying's replaced-weights file (created when the segmented
    // calibration starts); spilled: for a spill file of carried tensors.
    for (carry, marker) in [("1024", "sequential_weights.bin"), ("0", "carried_")] {
        let (out_dir, temp) = (d.path().join(format!("out{carry}")), d.path().join(format!("temp{carry}")));
        std::fs::create_dir(&out_dir).unwrap();
        std::fs::create_dir(&temp).unwrap();
        let out = out_dir.join("q.onnx");
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_nibble"))
            .args(["quantize", src.to_str().unwrap(), "-o", out.to_str().unwrap(), "--method", "awq_clip"])
            .args(["--segment-mb", "1", "--calibration-memory-mb", "1", "--carry-memory-mb", carry])
            .env("TMPDIR", &temp)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        // Interrupt once the segmented calibration has started (the marker exists in the
        // calibration folder).
        let segmented = || {
            std::fs::read_dir(&temp).unwrap().any(|e| {
                let p = e.unwrap().path();
                p.file_name().unwrap().to_string_lossy().starts_with("nibble-calibration-")
                    && std::fs::read_dir(&p).is_ok_and(|mut files| {
                        files.any(|f| f.is_ok_and(|f| f.file_name().to_string_lossy().starts_with(marker)))
                    })
            })
        };
        interrupt_when(&mut child, segmented, Duration::from_secs(120), &format!("--carry-memory-mb {carry}"));
        for dir in [&out_dir, &temp] {
            let left = files_left(dir);
            assert!(left.is_empty(), "--carry-memory-mb {carry}: files left in {}: {left:?}", dir.display());
        }
    }
    assert_eq!(snapshot(&input_dir), before, "the input changed");
}

/// GPTQ calibrated on the whole graph (`--segment-mb 0`) writes each finished weight to a temporary
/// file as soon as it is final instead of holding it until the output form takes it (held, the
/// finished weights grow with the model's depth): the file holds weights while the run goes on, and
/// a Ctrl-C then leaves no temporary file and no output.
#[test]
fn gptq_on_the_whole_graph_spills_its_finished_weights() {
    let d = tmp();
    let input_dir = d.path().join("in");
    std::fs::create_dir(&input_dir).unwrap();
    let src = large_model(&input_dir);
    let before = snapshot(&input_dir);
    let (out_dir, temp) = (d.path().join("out"), d.path().join("temp"));
    std::fs::create_dir(&out_dir).unwrap();
    std::fs::create_dir(&temp).unwrap();
    let out = out_dir.join("q.onnx");
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_nibble"))
        .args(["quantize", src.to_str().unwrap(), "-o", out.to_str().unwrap(), "--method", "gptq"])
        .args(["--segment-mb", "0", "--calibration-memory-mb", "1"])
        .env("TMPDIR", &temp)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let spilled = || {
        std::fs::read_dir(&temp).unwrap().any(|e| {
            let e = e.unwrap();
            e.file_name().to_string_lossy().starts_with("nibble-finished-") && e.metadata().is_ok_and(|m| m.len() > 0)
        })
    };
    interrupt_when(&mut child, spilled, Duration::from_secs(120), "gptq --segment-mb 0");
    for dir in [&out_dir, &temp] {
        let left = files_left(dir);
        assert!(left.is_empty(), "files left in {}: {left:?}", dir.display());
    }
    assert_eq!(snapshot(&input_dir), before, "the input changed");
}

/// The tensors that do not change (here an embedding table read by a Gather, and the LM head's
/// weight, a candidate excluded by default) are written to the data file ahead of the quantized
/// weights, once, and referenced there: the model is the one the in-memory path writes, and the
/// data file holds nothing unreferenced. Both are over 1 MiB, so the writer thread writes them
/// behind the quantized weight's tensors (which come after them in the file).
#[test]
fn unchanged_tensors_written_ahead_are_referenced_once() {
    let d = tmp();
    let (h, vocab) = (64, 4200);
    let values = |n: usize| (0..n).map(|i| ((i * 37 % 101) as f32 - 50.0) / 64.0).collect::<Vec<f32>>();
    let graph = GraphProto {
        name: Some("ahead".into()),
        node: vec![
            node("Gather", "/embed/Gather", &["embed", "ids"], &["h"], vec![]),
            node("MatMul", "/layer/MatMul", &["h", "W"], &["y"], vec![]),
            node("MatMul", "/lm_head/MatMul", &["y", "head"], &["logits"], vec![]),
        ],
        initializer: vec![
            init("embed", &[vocab, h], &values(vocab * h), FloatFormat::F32),
            init("W", &[h, h], &values(h * h), FloatFormat::F32),
            init("head", &[h, vocab], &values(h * vocab), FloatFormat::F32),
        ],
        input: vec![io("ids", 7, &[None])],
        output: vec![io("logits", 1, &[None, Some(vocab)])],
        ..Default::default()
    };
    let src = d.path().join("g.onnx");
    save(nibble_driver::graph::build::model(graph, 17), &src, ExternalData::Always).unwrap();
    let (held, streamed) = (d.path().join("held.onnx"), d.path().join("streamed.onnx"));
    quantize_file(&src, &held, &options(Method::RtnDq, Format::Dq, ExternalData::Always, true)).unwrap();
    let summary =
        quantize_file(&src, &streamed, &options(Method::RtnDq, Format::Dq, ExternalData::Always, false)).unwrap();
    assert_eq!(summary.quantized, 1, "only /layer/MatMul is quantized");
    assert_eq!(inlined(&held), inlined(&streamed), "tensors or graph differ");
    let size = std::fs::metadata(streamed.with_file_name("streamed.onnx_data")).unwrap().len();
    let (bytes, count) = referenced(&streamed);
    assert!(bytes >= (2 * vocab * h * 4) as u64, "the table or the head is not in the data file");
    assert!(size <= bytes + 63 * count, "{} bytes unreferenced", size - bytes);
    // The table and the head were placed first, ahead of the quantized weight's tensors.
    let m = Model::load(&streamed).unwrap();
    let offset = |name: &str| {
        let t = m.proto.graph.as_ref().unwrap().initializer.iter().find(|t| t.name.as_deref() == Some(name));
        let e = t.unwrap_or_else(|| panic!("{name}")).external_data.iter().find(|e| e.key.as_deref() == Some("offset"));
        e.and_then(|e| e.value.as_deref()?.parse::<u64>().ok()).unwrap_or_else(|| panic!("{name} is not external"))
    };
    let table = (vocab * h * 4) as u64;
    assert_eq!((offset("embed"), offset("head")), (0, table), "the table and the head are not first");
    let codes = m.proto.graph.as_ref().unwrap().initializer.iter().filter(|t| !t.external_data.is_empty());
    for t in codes.filter(|t| !matches!(t.name.as_deref(), Some("embed" | "head"))) {
        assert!(offset(t.name.as_deref().unwrap()) >= 2 * table, "{:?} before the unchanged tensors", t.name);
    }
}
