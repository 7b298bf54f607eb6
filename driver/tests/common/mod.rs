//! Helpers shared by the driver's integration tests: temporary folders, running the `nibble`
//! binary, building reference models with dequantized weights, and running models in ONNX Runtime.

#![allow(dead_code)]

use nibble::{reference, FloatFormat};
use nibble_driver::graph::build::init;
use nibble_driver::graph::model::{save, ExternalData, Model};
use nibble_driver::graph::onnx::{ModelProto, TensorProto};
use nibble_driver::rng::Rng;
use nibble_driver::runtime::{open, run_f32, NamedTensor, SessionOptions};
use std::path::{Path, PathBuf};
use std::process::Output;

pub fn tmp() -> tempfile::TempDir {
    tempfile::tempdir().unwrap()
}

pub fn nibble(args: &[&str]) -> Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_nibble")).args(args).output().unwrap()
}

pub fn nibble_ok(args: &[&str]) -> String {
    let out = nibble(args);
    assert!(
        out.status.success(),
        "nibble {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub fn write(model: ModelProto, path: &Path, external: ExternalData) -> PathBuf {
    save(model, path, external).unwrap();
    path.to_path_buf()
}

pub fn format_of(t: &TensorProto) -> FloatFormat {
    match t.data_type.unwrap() {
        1 => FloatFormat::F32,
        10 => FloatFormat::F16,
        16 => FloatFormat::BF16,
        d => panic!("not a float tensor: {d}"),
    }
}

pub fn floats(model: &Model, t: &TensorProto) -> Vec<f32> {
    let b = model.tensor_bytes(t).unwrap();
    match format_of(t) {
        FloatFormat::F32 => b.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect(),
        FloatFormat::F16 => b.chunks_exact(2).map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
        FloatFormat::BF16 => b.chunks_exact(2).map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
    }
}

/// The model with each named weight replaced by the scalar reference's dequantized values
/// (what the quantized model must compute), saved at `out`.
pub fn dequantized_reference(
    src: &Path,
    weights: &[(&str, usize)],
    block: i64,
    zero_point: bool,
    out: &Path,
) -> PathBuf {
    dequantized_reference_mixed(src, weights, block, zero_point, &[], out)
}

/// [`dequantized_reference`] with the weights named in `int8` quantized to INT8 per channel.
pub fn dequantized_reference_mixed(
    src: &Path,
    weights: &[(&str, usize)],
    block: i64,
    zero_point: bool,
    int8: &[&str],
    out: &Path,
) -> PathBuf {
    let mut model = Model::load(src).unwrap();
    model.inline_external_data().unwrap();
    let g = model.proto.graph.clone().unwrap();
    let mut g2 = g.clone();
    for t in g2.initializer.iter_mut() {
        let name = t.name.clone().unwrap();
        let Some(&(_, axis)) = weights.iter().find(|(w, _)| *w == name) else { continue };
        let format = format_of(t);
        let w = floats(&model, t);
        let shape = [t.dims[0] as usize, t.dims[1] as usize];
        let eight = int8.contains(&name.as_str());
        let bits = if eight { nibble::Bits::Eight } else { nibble::Bits::Four };
        let b = if block == -1 || eight { shape[axis] } else { block as usize };
        let s = reference::find_scales(format, bits, &w, shape, b, axis, 1.0, zero_point);
        let q = reference::rtn(format, bits, &w, shape, &s, b, axis);
        let dq = reference::dq_tensor(format, &q, shape, &s, b, axis);
        *t = init(&name, &shape, &dq, format);
    }
    model.proto.graph = Some(g2);
    write(model.proto, out, ExternalData::Never)
}

pub fn random_input(name: &str, shape: &[usize], seed: u64) -> NamedTensor {
    let mut rng = Rng::new(seed);
    NamedTensor { name: name.into(), shape: shape.to_vec(), data: rng.normals(shape.iter().product(), 1.0) }
}

pub fn run(path: &Path, inputs: &[NamedTensor]) -> Vec<NamedTensor> {
    let mut s = open(path, SessionOptions::default()).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    run_f32(&mut s, inputs).unwrap()
}

/// max |a - b| / max |b|.
pub fn rel_err(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    let scale = b.iter().fold(0.0f32, |m, x| m.max(x.abs())).max(1e-30);
    a.iter().zip(b).fold(0.0f32, |m, (x, y)| m.max((x - y).abs())) / scale
}

/// Snapshot of every file in a folder (name -> bytes), to prove nothing changed.
pub fn snapshot(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut v: Vec<(String, Vec<u8>)> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            (e.file_name().to_string_lossy().into_owned(), std::fs::read(e.path()).unwrap_or_default())
        })
        .collect();
    v.sort();
    v
}

/// A version-1 `.npy` with numpy's header layout (padded to 64 bytes, ending in a newline).
pub fn npy(descr: &str, fortran: bool, shape: &str, data: &[u8]) -> Vec<u8> {
    let order = if fortran { "True" } else { "False" };
    let mut header = format!("{{'descr': '{descr}', 'fortran_order': {order}, 'shape': {shape}, }}");
    while (10 + header.len() + 1) % 64 != 0 {
        header.push(' ');
    }
    header.push('\n');
    let mut out = b"\x93NUMPY\x01\x00".to_vec();
    out.extend((header.len() as u16).to_le_bytes());
    out.extend(header.as_bytes());
    out.extend(data);
    out
}

/// A stored (uncompressed) `.npz` of `(array name, .npy bytes)` members.
pub fn npz(path: &Path, members: &[(&str, Vec<u8>)]) {
    let mut zip = zip::ZipWriter::new(std::fs::File::create(path).unwrap());
    let opts = zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
    for (name, bytes) in members {
        zip.start_file(format!("{name}.npy"), opts).unwrap();
        std::io::Write::write_all(&mut zip, bytes).unwrap();
    }
    zip.finish().unwrap();
}

/// Deterministic English-like text of about `words` words (text calibration and perplexity).
pub fn text(words: usize) -> String {
    let vocab = [
        "the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog", "while", "seven", "wizards", "quietly",
        "judge", "boxing", "matches", "near", "old", "river", "banks,", "and", "then.", "It", "rains", "today",
    ];
    let mut state = 12345u64;
    (0..words)
        .map(|_| {
            state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            vocab[(state >> 33) as usize % vocab.len()]
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// The `logits` output of the decoder `model` on the token windows `tokens` (fed through its feed
/// plan), in a default session and with optimizations disabled.
pub fn decoder_logits(model: &Path, tokens: &[Vec<i64>]) -> [Vec<f32>; 2] {
    use nibble_driver::calibrate::inputs::{calibration_inputs, CalibrationOptions};
    let opts = CalibrationOptions { tokens: Some(tokens.to_vec()), ..Default::default() };
    let samples = calibration_inputs(&Model::load(model).unwrap(), &opts).unwrap();
    [
        SessionOptions { no_optimization: false, ort_defaults: true },
        SessionOptions { no_optimization: true, ort_defaults: false },
    ]
    .map(|o| {
        let mut s = open(model, o).unwrap_or_else(|e| panic!("{}: {e}", model.display()));
        samples
            .iter()
            .flat_map(|x| {
                nibble_driver::runtime::run(&mut s, x).unwrap().into_iter().find(|t| t.name == "logits").unwrap().data
            })
            .collect()
    })
}

/// Waits (up to `timeout`) until `ready()` holds, checks that `child` still runs, sends it SIGINT
/// (Ctrl-C) and checks that it exits with 130, nibble's exit status for an interrupted run.
/// `what` names the run in the failure messages.
pub fn interrupt_when(
    child: &mut std::process::Child,
    ready: impl Fn() -> bool,
    timeout: std::time::Duration,
    what: &str,
) {
    let start = std::time::Instant::now();
    while !ready() && start.elapsed() < timeout {
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    assert!(ready(), "{what}: the awaited state never came within {timeout:?}");
    assert!(child.try_wait().unwrap().is_none(), "{what}: the run finished before it could be interrupted");
    let killed = std::process::Command::new("kill").args(["-INT", &child.id().to_string()]).status().unwrap();
    assert!(killed.success(), "{what}: kill -INT failed");
    let st = child.wait().unwrap();
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(st.code(), Some(130), "{what}: exit status after SIGINT: signal {:?}", st.signal());
}

/// The names of the files left in `dir`, leaving out `.ses`: ONNX Runtime's own (its telemetry
/// library's session file, written to `$TMPDIR` when the first session opens, telemetry on or
/// off), not a file of nibble's.
pub fn files_left(dir: &Path) -> Vec<std::ffi::OsString> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .filter(|name| name.to_str() != Some(".ses"))
        .collect()
}
