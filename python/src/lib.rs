//! `nibble._nibble`: the Python extension module behind the `nibble` package (PyO3, abi3).
//!
//! Thin by design: every function builds the driver's options, runs the driver on a worker thread
//! (so that Ctrl-C reaches Python while Rust works) and turns the driver's results and errors into
//! plain Python data and exceptions. numpy and onnx are handled in the Python layer
//! (`python/nibble/__init__.py`); this module only sees paths, strings, numbers and bytes, except
//! `nibble.int4`'s flat numpy arrays (module [`int4`]).

mod int4;

use nibble_driver::runtime::{Input, InputData};
use nibble_driver::{quantize_file as driver_quantize_file, Error, Options, Summary};
use pyo3::exceptions::{
    PyFileExistsError, PyFileNotFoundError, PyIsADirectoryError, PyKeyboardInterrupt, PyOSError, PyPermissionError,
    PyRuntimeError, PyValueError,
};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict, PyList};
use std::collections::HashMap;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::Duration;

/// The driver items used below its crate root: after the driver's re-layout into stage folders
/// (branch `refactor`) these five lines read `cli::compare`, `cli::inspect::inspect`,
/// `graph::model::{dtype_name, Model}`, `graph::opset` and `plan::{...}` (unchanged).
mod driver {
    pub use nibble_driver::cli::compare;
    pub use nibble_driver::cli::inspect::inspect;
    pub use nibble_driver::graph::model::{dtype_name, Model};
    pub use nibble_driver::graph::opset;
    pub use nibble_driver::plan::{compile_patterns, plan, Decision};
}

/// Maps a driver error to the Python exception of its kind, keeping nibble's message: files ->
/// `OSError` (or its `FileNotFoundError`/`PermissionError`/`FileExistsError`/`IsADirectoryError`
/// subclasses), ONNX Runtime -> `RuntimeError`, everything else (bad model, bad options, bad
/// calibration data) -> `ValueError`.
fn to_py(e: Error) -> PyErr {
    let msg = e.to_string();
    let io = |source: &std::io::Error| match source.kind() {
        std::io::ErrorKind::NotFound => PyFileNotFoundError::new_err(msg.clone()),
        std::io::ErrorKind::PermissionDenied => PyPermissionError::new_err(msg.clone()),
        _ => PyOSError::new_err(msg.clone()),
    };
    match &e {
        Error::Read { cause, .. } | Error::Write { cause, .. } => io(cause),
        Error::Output { why, .. } if why.starts_with("already exists") => PyFileExistsError::new_err(msg),
        Error::Output { why, .. } if why.starts_with("is a directory") => PyIsADirectoryError::new_err(msg),
        Error::Output { .. } => PyOSError::new_err(msg),
        Error::Runtime(_) => PyRuntimeError::new_err(msg),
        _ => PyValueError::new_err(msg),
    }
}

/// Parses a clap value name (`"rtn_dq"`, `"matmulnbits"`, `"auto"`, ...) into the option's enum,
/// whatever the field's type: the CLI's spellings are the API's.
fn parse_enum<T: clap::ValueEnum>(option: &str, value: &str) -> PyResult<T> {
    T::from_str(value, true).map_err(|_| {
        let names: Vec<String> = T::value_variants()
            .iter()
            .filter_map(|v| v.to_possible_value())
            .map(|p| p.get_name().to_string())
            .collect();
        PyValueError::new_err(format!("{option}={value:?}: use one of {}", names.join(", ")))
    })
}

/// Runs `work` on a worker thread while this thread waits without the GIL, checking for signals
/// every 50 ms. On Ctrl-C (`KeyboardInterrupt`), `cancel` is set, the driver's temporary files are
/// removed and the exception is raised at once; the worker then discards whatever it writes
/// (see [`quantize_file`]).
fn interruptible<T: Send + 'static>(
    py: Python<'_>,
    cancel: &Arc<AtomicBool>,
    work: impl FnOnce() -> T + Send + 'static,
) -> PyResult<T> {
    let (tx, rx) = mpsc::channel();
    std::thread::Builder::new()
        .name("nibble".into())
        .spawn(move || {
            let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(work));
            let _ = tx.send(result);
        })
        .map_err(|e| PyRuntimeError::new_err(format!("cannot start a worker thread: {e}")))?;
    let mut rx = Some(rx);
    loop {
        // The receiver moves into the GIL-free closure and back (it is Send, not Sync).
        let (received, back) = py.detach({
            let rx = rx.take().expect("receiver");
            move || (rx.recv_timeout(Duration::from_millis(50)), rx)
        });
        rx = Some(back);
        match received {
            Ok(Ok(value)) => return Ok(value),
            Ok(Err(panic)) => {
                let why = panic
                    .downcast_ref::<String>()
                    .map(String::as_str)
                    .or_else(|| panic.downcast_ref::<&str>().copied())
                    .unwrap_or("unknown cause");
                return Err(PyRuntimeError::new_err(format!(
                    "nibble: internal error (a bug, please report it): {why}"
                )));
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                return Err(PyRuntimeError::new_err("nibble: the worker thread stopped without a result"))
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {
                if let Err(e) = py.check_signals() {
                    if e.is_instance_of::<PyKeyboardInterrupt>(py) {
                        cancel.store(true, Ordering::SeqCst);
                        nibble_driver::cleanup::remove_all();
                    }
                    return Err(e);
                }
            }
        }
    }
}

/// `OUT.onnx_data`: where the driver puts external data for `OUT.onnx`.
fn data_path(out: &Path) -> PathBuf {
    let mut name = out.file_name().map(|n| n.to_os_string()).unwrap_or_default();
    name.push("_data");
    out.with_file_name(name)
}

/// One calibration array from Python: name, numpy dtype name, shape, C-order little-endian bytes.
type RawArray<'py> = (String, String, Vec<usize>, Bound<'py, PyBytes>);

fn to_input(sample: usize, (name, dtype, shape, bytes): &RawArray<'_>) -> PyResult<Input> {
    let b = bytes.as_bytes();
    let n: usize = shape.iter().product();
    let size = match dtype.as_str() {
        "float64" | "int64" | "uint64" => 8,
        "float32" | "int32" | "uint32" => 4,
        "float16" | "int16" | "uint16" => 2,
        "int8" | "uint8" | "bool" => 1,
        d => {
            return Err(PyValueError::new_err(format!(
                "calibration sample {sample}, input '{name}': dtype {d} is not supported (use float32, float16, int64, int32 or bool)"
            )))
        }
    };
    if b.len() != n * size {
        return Err(PyValueError::new_err(format!(
            "calibration sample {sample}, input '{name}': {} bytes for shape {shape:?} of {dtype}",
            b.len()
        )));
    }
    macro_rules! chunks {
        ($t:ty) => {
            b.chunks_exact(size).map(|c| <$t>::from_le_bytes(c.try_into().expect("element size")))
        };
    }
    // Integers other than int32/int64 widen to int64 and float64 narrows to float32, as the
    // driver's .npz reader does (npy::Array::to_f64, as_i64).
    let data = match dtype.as_str() {
        "float32" => InputData::F32(chunks!(f32).collect()),
        "float64" => InputData::F32(chunks!(f64).map(|v| v as f32).collect()),
        "float16" => InputData::F16(chunks!(u16).map(half::f16::from_bits).collect()),
        "int64" => InputData::I64(chunks!(i64).collect()),
        "uint64" => InputData::I64(chunks!(u64).map(|v| v as i64).collect()),
        "int32" => InputData::I32(chunks!(i32).collect()),
        "uint32" => InputData::I64(chunks!(u32).map(i64::from).collect()),
        "int16" => InputData::I64(chunks!(i16).map(i64::from).collect()),
        "uint16" => InputData::I64(chunks!(u16).map(i64::from).collect()),
        "int8" => InputData::I64(b.iter().map(|&v| v as i8 as i64).collect()),
        "uint8" => InputData::I64(b.iter().map(|&v| v as i64).collect()),
        _ => InputData::Bool(b.iter().map(|&v| v != 0).collect()),
    };
    Ok(Input { name: name.clone(), shape: shape.clone(), data })
}

fn summary_dict<'py>(py: Python<'py>, s: &Summary, output: &Path) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("output", output)?;
    d.set_item("quantized", s.quantized)?;
    d.set_item("int8", s.int8)?;
    d.set_item("candidates", s.candidates)?;
    d.set_item("weight_bytes_before", s.weight_bytes_before)?;
    d.set_item("weight_bytes_after", s.weight_bytes_after)?;
    d.set_item("model_bytes_before", s.model_bytes_before)?;
    d.set_item("model_bytes_after", s.model_bytes_after)?;
    d.set_item("opset_raised", s.opset_raised)?;
    d.set_item("float_copies", s.float_copies)?;
    d.set_item("float_copy_bytes", s.float_copy_bytes)?;
    d.set_item("seconds", s.seconds)?;
    if let Some(plan) = &s.budget {
        d.set_item("target_bits", plan.target_bits)?;
        d.set_item("achieved_bits", plan.achieved_bits)?;
        d.set_item("bits_range", (plan.range.0, plan.range.1))?;
        d.set_item("budget_table", plan.table())?;
    }
    Ok(d)
}

/// Quantizes the model at `input` into `output` (see `nibble.quantize_file` for the documentation;
/// `calibration_inputs` are the samples the Python layer read from a reader or list of dicts).
#[pyfunction]
#[pyo3(signature = (
    input, output, *, method="rtn_dq", block_size=128, zero_point=false, exclude=None, external_data="auto",
    force=false, fsync=false, skip_nonfinite=false, format="dq", accuracy_level=0, gather_axis=None,
    gather_block_size=32, int8_layers=None, mixed_precision=false, calibration_data=None, calibration_inputs=None,
    calibration_shapes=None, calibration_samples=None, calibration_seed=0, calibration_text=None, tokenizer=None,
    calibration_seq_len=512, alpha_step=0.1, clip_alpha_step=0.05,
    clip_alpha_min=0.5, fuse=true, per_subgraph=false, calibration_memory_mb=1024, segment_mb=None, carry_memory_mb=1024, verbose=false, scale_search=false,
    scale_search_clip_min=1.0,
    percdamp=0.01, gptq_batch=128, act_order=false, sequential=false, head_bits=4, target_bits=None,
    segments=None
))]
#[allow(clippy::too_many_arguments)]
fn quantize_file<'py>(
    py: Python<'py>,
    input: PathBuf,
    output: PathBuf,
    method: &str,
    block_size: i64,
    zero_point: bool,
    exclude: Option<Vec<String>>,
    external_data: &str,
    force: bool,
    fsync: bool,
    skip_nonfinite: bool,
    format: &str,
    accuracy_level: i64,
    gather_axis: Option<usize>,
    gather_block_size: i64,
    int8_layers: Option<String>,
    mixed_precision: bool,
    calibration_data: Option<PathBuf>,
    calibration_inputs: Option<Vec<Vec<RawArray<'py>>>>,
    calibration_shapes: Option<HashMap<String, Vec<usize>>>,
    calibration_samples: Option<usize>,
    calibration_seed: u64,
    calibration_text: Option<PathBuf>,
    tokenizer: Option<PathBuf>,
    calibration_seq_len: usize,
    alpha_step: f64,
    clip_alpha_step: f64,
    clip_alpha_min: f64,
    fuse: bool,
    per_subgraph: bool,
    calibration_memory_mb: usize,
    segment_mb: Option<Bound<'py, PyAny>>,
    carry_memory_mb: u64,
    verbose: bool,
    scale_search: bool,
    scale_search_clip_min: f64,
    percdamp: f64,
    gptq_batch: usize,
    act_order: bool,
    sequential: bool,
    head_bits: u32,
    target_bits: Option<f64>,
    segments: Option<(usize, usize)>,
) -> PyResult<Bound<'py, PyDict>> {
    // The same checks and defaults as the CLI's (driver/src/cli.rs), so equal options give equal bytes.
    for (name, v) in [("alpha_step", alpha_step), ("clip_alpha_step", clip_alpha_step)] {
        if !(v > 0.0 && v <= 1.0) {
            return Err(PyValueError::new_err(format!("{name} {v}: use a step in (0, 1]")));
        }
    }
    if !(clip_alpha_min > 0.0 && clip_alpha_min <= 1.0) {
        return Err(PyValueError::new_err(format!("clip_alpha_min {clip_alpha_min}: use a ratio in (0, 1]")));
    }
    let mut opts = Options {
        method: parse_enum("method", method)?,
        block_size,
        zero_point,
        exclude: match exclude {
            None => vec!["/lm_head".to_string()],
            Some(patterns) => patterns.into_iter().filter(|p| !p.is_empty()).collect(),
        },
        external_data: parse_enum("external_data", external_data)?,
        force,
        fsync,
        skip_nonfinite,
        format: parse_enum("format", format)?,
        accuracy_level,
        gather_axis,
        gather_block_size,
        int8_layers,
        mixed_precision,
        scale_search,
        scale_search_clip_min,
        head_bits: nibble::Bits::from_count(head_bits)
            .ok_or_else(|| PyValueError::new_err(format!("head_bits {head_bits}: use 4 or 8")))?,
        target_bits,
        ..Options::default()
    };
    opts.gptq.percdamp = percdamp;
    opts.gptq.lazy_batch = gptq_batch;
    opts.gptq.act_order = act_order;
    opts.gptq.sequential = sequential;
    opts.awq.alpha_step = alpha_step;
    opts.awq.clip_alpha_step = clip_alpha_step;
    opts.awq.clip_alpha_min = clip_alpha_min;
    opts.awq.fuse = fuse;
    opts.awq.per_subgraph = per_subgraph;
    opts.awq.memory_budget = calibration_memory_mb.max(1) << 20;
    (opts.awq.segment_bytes, opts.awq.segment_auto) = segment_arg(&segment_mb)?;
    opts.awq.carry_memory = carry_memory_mb << 20;
    opts.awq.verbose = verbose;
    opts.awq.calibration.data = calibration_data;
    opts.awq.calibration.shapes = calibration_shapes.unwrap_or_default();
    opts.awq.calibration.samples = calibration_samples.unwrap_or(8).max(1);
    if let Some(text) = &calibration_text {
        use nibble_driver::calibrate::text;
        let tokenizer_path = text::find_tokenizer(tokenizer.as_deref(), &input).map_err(to_py)?;
        let samples = calibration_samples.unwrap_or(text::DEFAULT_SAMPLES);
        opts.awq.calibration.tokens =
            Some(text::text_windows(text, &tokenizer_path, samples, calibration_seq_len).map_err(to_py)?);
    }
    opts.awq.calibration.seed = calibration_seed;
    // ModelOpt's call with no reader calibrates on random inputs: kept, with the warning the
    // driver prints for token-id models (random ids give a much worse model than text).
    opts.awq.calibration.random = true;
    opts.awq.calibration.inputs = calibration_inputs
        .map(|samples| {
            samples
                .iter()
                .enumerate()
                .map(|(i, arrays)| arrays.iter().map(|a| to_input(i, a)).collect::<PyResult<Vec<_>>>())
                .collect::<PyResult<Vec<_>>>()
        })
        .transpose()?;

    let cancel = Arc::new(AtomicBool::new(false));
    let (worker_input, worker_output) = (input.clone(), output.clone());
    if let Some(range) = segments {
        // A shard (nibble quantize --segments A..B): a folder at `output`.
        nibble_driver::shard::check_shardable(&opts, range).map_err(to_py)?;
        let result = interruptible(py, &cancel, move || {
            nibble_driver::shard::quantize_shard(&worker_input, &worker_output, &opts, range)
        })?;
        let s = result.map_err(to_py)?;
        let d = PyDict::new(py);
        d.set_item("output", &output)?;
        d.set_item("segments", s.layout.len())?;
        d.set_item("range", s.range)?;
        d.set_item("first_nodes", s.layout.first_nodes.clone())?;
        d.set_item("segment_weights", s.layout.weights.clone())?;
        d.set_item("weights", s.weights)?;
        d.set_item("bytes", s.bytes)?;
        d.set_item("seconds", s.seconds)?;
        return Ok(d);
    }
    if input.is_dir() {
        let result = interruptible(py, &cancel, move || {
            nibble_driver::folder::quantize_folder(&worker_input, &worker_output, &opts)
        })?;
        let f = result.map_err(to_py)?;
        let d = PyDict::new(py);
        d.set_item("output", &output)?;
        d.set_item("layout", f.layout.name())?;
        let models =
            f.models.iter().map(|(file, s)| summary_dict(py, s, &output.join(file))).collect::<PyResult<Vec<_>>>()?;
        d.set_item("models", models)?;
        d.set_item("copied", f.copied)?;
        d.set_item("left_float", f.left_float)?;
        d.set_item("seconds", f.seconds)?;
        return Ok(d);
    }
    write_model(py, &output, move || driver_quantize_file(&worker_input, &worker_output, &opts))
}

/// Runs `work`, which writes the model `output`, interruptibly (Ctrl-C raises
/// `KeyboardInterrupt`); a model finished after the interrupt is removed. Returns its summary.
fn write_model<'py>(
    py: Python<'py>,
    output: &Path,
    work: impl FnOnce() -> nibble_driver::Result<Summary> + Send + 'static,
) -> PyResult<Bound<'py, PyDict>> {
    let cancel = Arc::new(AtomicBool::new(false));
    let worker_cancel = Arc::clone(&cancel);
    let worker_output = output.to_path_buf();
    let result = interruptible(py, &cancel, move || {
        let result = work();
        if result.is_ok() && worker_cancel.load(Ordering::SeqCst) {
            // Interrupted while the last steps ran: what was written is not wanted.
            let _ = std::fs::remove_file(&worker_output);
            let _ = std::fs::remove_file(data_path(&worker_output));
        }
        result
    })?;
    let summary = result.map_err(to_py)?;
    summary_dict(py, &summary, output)
}

/// The segments of the model at `input` at `segment_mb` (see `nibble.segments`).
#[pyfunction]
#[pyo3(signature = (input, segment_mb, *, exclude=None))]
fn segments<'py>(
    py: Python<'py>,
    input: PathBuf,
    segment_mb: u64,
    exclude: Option<Vec<String>>,
) -> PyResult<Bound<'py, PyDict>> {
    let mut opts = Options {
        exclude: match exclude {
            None => vec!["/lm_head".to_string()],
            Some(patterns) => patterns.into_iter().filter(|p| !p.is_empty()).collect(),
        },
        ..Options::default()
    };
    opts.awq.segment_bytes = (segment_mb > 0).then_some(segment_mb << 20);
    let layout = py.detach(|| nibble_driver::shard::segments_of(&input, &opts)).map_err(to_py)?;
    let d = PyDict::new(py);
    d.set_item("count", layout.len())?;
    d.set_item("first_nodes", layout.first_nodes.clone())?;
    d.set_item("weights", layout.weights.clone())?;
    d.set_item("whole", layout.whole.clone())?;
    d.set_item("table", layout.table())?;
    Ok(d)
}

/// Assembles shards into the model a single run writes (see `nibble.merge`).
#[pyfunction]
#[pyo3(signature = (shards, output, *, model=None, force=false, fsync=false))]
fn merge<'py>(
    py: Python<'py>,
    shards: Vec<PathBuf>,
    output: PathBuf,
    model: Option<PathBuf>,
    force: bool,
    fsync: bool,
) -> PyResult<Bound<'py, PyDict>> {
    let worker_output = output.clone();
    write_model(py, &output, move || {
        nibble_driver::shard::merge(&shards, &worker_output, model.as_deref(), force, fsync)
    })
}

/// The `nibble` command line: `argv[0]` is the program name. Returns the exit code (0 done, 1
/// error, 2 usage error); prints exactly what the `nibble` binary prints.
#[pyfunction]
fn main(py: Python<'_>, argv: Vec<OsString>) -> i32 {
    py.detach(|| nibble_driver::cli::main_with_args(argv))
}

/// What `quantize` would do with each MatMul/Gemm weight (see `nibble.inspect`).
#[pyfunction]
#[pyo3(signature = (path, exclude=None))]
fn inspect<'py>(py: Python<'py>, path: PathBuf, exclude: Option<Vec<String>>) -> PyResult<Bound<'py, PyDict>> {
    use driver::{compile_patterns, dtype_name, opset, plan, Decision, Model};
    let exclude = exclude.unwrap_or_else(|| vec!["/lm_head".to_string()]);
    let cancel = Arc::new(AtomicBool::new(false));
    let report = interruptible(py, &cancel, move || -> nibble_driver::Result<_> {
        let text = driver::inspect(&path, &exclude)?;
        let model = Model::load(&path)?;
        let candidates = plan(&model, &compile_patterns(&exclude)?)?;
        let mut copy = model.proto.clone();
        let upgrade = match opset::upgrade(&mut copy) {
            Ok(Some(_)) => Some(opset::TARGET),
            Ok(None) => None,
            Err(_) => None,
        };
        let dtypes: Vec<String> = candidates.iter().map(|c| dtype_name(c.dtype).to_lowercase()).collect();
        Ok((text, model.proto.ir_version.unwrap_or(0), opset::default_opset(&model.proto), upgrade, candidates, dtypes))
    })?
    .map_err(to_py)?;
    let (text, ir_version, version, upgrade, candidates, dtypes) = report;
    let d = PyDict::new(py);
    d.set_item("ir_version", ir_version)?;
    d.set_item("opset", version)?;
    d.set_item("opset_after", upgrade.unwrap_or(version))?;
    let weights = PyList::empty(py);
    for (c, dtype) in candidates.iter().zip(dtypes) {
        let w = PyDict::new(py);
        w.set_item("node", &c.node)?;
        w.set_item("weight", &c.weight)?;
        w.set_item("op", &c.op)?;
        w.set_item("shape", &c.dims)?;
        w.set_item("dtype", dtype)?;
        w.set_item("bytes", c.bytes)?;
        let (decision, detail) = match &c.decision {
            Decision::Quantize { axis } => ("quantize", format!("blocks along axis {axis}")),
            Decision::Excluded { pattern } => ("excluded", pattern.clone()),
            Decision::Skipped { reason } => ("skipped", reason.clone()),
            Decision::Unsupported { reason } => ("error", reason.clone()),
        };
        w.set_item("decision", decision)?;
        w.set_item("detail", detail)?;
        weights.append(w)?;
    }
    d.set_item("weights", weights)?;
    d.set_item("report", text)?;
    Ok(d)
}

/// `--segment-mb auto|N` as (segment bytes, auto): "auto" (or None) the default; 0 the whole
/// graph; N segments of N MiB.
fn segment_arg(segment_mb: &Option<Bound<'_, PyAny>>) -> PyResult<(Option<u64>, bool)> {
    match segment_mb {
        None => Ok((None, true)),
        Some(v) if v.extract::<String>().is_ok_and(|s| s == "auto") => Ok((None, true)),
        Some(v) => match v.extract::<u64>() {
            Ok(mb) => Ok(((mb > 0).then_some(mb << 20), false)),
            Err(_) => Err(PyValueError::new_err(format!(
                "segment_mb {v}: give \"auto\" or a number of MiB (0: the whole graph)"
            ))),
        },
    }
}

/// Runs both models in ONNX Runtime on the same inputs (see `nibble.compare`).
#[pyfunction]
#[pyo3(signature = (original, quantized, seed=0, calibration_data=None, per_layer=false, segment_mb=None, carry_memory_mb=1024))]
#[allow(clippy::too_many_arguments)]
fn compare<'py>(
    py: Python<'py>,
    original: PathBuf,
    quantized: PathBuf,
    seed: u64,
    calibration_data: Option<PathBuf>,
    per_layer: bool,
    segment_mb: Option<Bound<'py, PyAny>>,
    carry_memory_mb: u64,
) -> PyResult<Bound<'py, PyDict>> {
    use driver::compare as c;
    let (segment_bytes, segment_auto) = segment_arg(&segment_mb)?;
    let run = c::RunOptions { segment_bytes, segment_auto, carry_memory: carry_memory_mb << 20 };
    let cancel = Arc::new(AtomicBool::new(false));
    let (outputs, layers) = interruptible(py, &cancel, move || -> nibble_driver::Result<_> {
        let run = run.resolved(&original)?;
        let samples = c::samples(&original, calibration_data.as_deref(), seed)?;
        let outputs = c::compare_samples(&original, &quantized, &samples, &run)?;
        let layers = if per_layer { c::compare_layers_with(&original, &quantized, &samples, &run)? } else { vec![] };
        Ok((outputs, layers))
    })?
    .map_err(to_py)?;
    let d = PyDict::new(py);
    let list = PyList::empty(py);
    for r in &outputs {
        let o = PyDict::new(py);
        o.set_item("output", &r.name)?;
        o.set_item("relative_error", r.relative_error)?;
        o.set_item("max_abs_error", r.max_abs_error)?;
        o.set_item("cosine", r.cosine)?;
        o.set_item("top1_agreement", r.top1_agreement)?;
        o.set_item("weight_only_relative_error", r.weight_only_relative_error)?;
        list.append(o)?;
    }
    d.set_item("outputs", list)?;
    let list = PyList::empty(py);
    for l in &layers {
        let o = PyDict::new(py);
        o.set_item("node", &l.node)?;
        o.set_item("output", &l.output)?;
        o.set_item("relative_error", l.relative_error)?;
        list.append(o)?;
    }
    d.set_item("layers", list)?;
    Ok(d)
}

/// The ONNX Runtime shared library nibble would load (`ORT_DYLIB_PATH`, `.ort/` folders, the
/// `onnxruntime` package), or `RuntimeError` naming what to install.
#[pyfunction]
fn ort_library(py: Python<'_>) -> PyResult<PathBuf> {
    py.detach(|| nibble_driver::runtime::find_library(None)).map_err(to_py)
}

/// The SIMD tier the kernels use on this CPU (e.g. "avx512", "avx2", "scalar").
#[pyfunction]
fn simd_tier() -> &'static str {
    nibble::Tier::best().name()
}

#[pymodule]
fn _nibble(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(quantize_file, m)?)?;
    m.add_function(wrap_pyfunction!(main, m)?)?;
    m.add_function(wrap_pyfunction!(merge, m)?)?;
    m.add_function(wrap_pyfunction!(segments, m)?)?;
    m.add_function(wrap_pyfunction!(inspect, m)?)?;
    m.add_function(wrap_pyfunction!(compare, m)?)?;
    m.add_function(wrap_pyfunction!(ort_library, m)?)?;
    m.add_function(wrap_pyfunction!(simd_tier, m)?)?;
    m.add_function(wrap_pyfunction!(int4::int4_quantize, m)?)?;
    m.add_function(wrap_pyfunction!(int4::int4_rtn, m)?)?;
    m.add_function(wrap_pyfunction!(int4::int4_dq_tensor, m)?)?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
