//! ONNX Runtime through the `ort` crate, loaded at run time (`load-dynamic`) from the shared library
//! that the PyPI `onnxruntime` wheel ships (`onnxruntime/capi/libonnxruntime.so.*`). Nothing is
//! downloaded. Lookup order: `--ort-lib`, `$ORT_DYLIB_PATH`, `.ort/onnxruntime/capi/` in the current
//! folder or any parent (where the README's `pip install --target .ort onnxruntime` puts it) or next to
//! the executable's ancestors, then Python's installed `onnxruntime` package (found with
//! `importlib.util.find_spec`, which needs no numpy). One environment per process, ever.

use crate::error::{Error, Result};
use ort::session::{builder::GraphOptimizationLevel, Session};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

const INSTALL_HINT: &str = "install it with `pip install --no-deps --target .ort onnxruntime` in the repository \
(or anywhere, then pass --ort-lib PATH/onnxruntime/capi/libonnxruntime.so.<version> or set ORT_DYLIB_PATH)";

fn newest_lib_in(capi: &Path) -> Option<PathBuf> {
    let mut libs: Vec<PathBuf> = std::fs::read_dir(capi)
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with("libonnxruntime.so.")))
        .collect();
    libs.sort();
    libs.pop()
}

fn search_ancestors(start: &Path) -> Option<PathBuf> {
    start.ancestors().find_map(|dir| newest_lib_in(&dir.join(".ort/onnxruntime/capi")))
}

fn from_python() -> Option<PathBuf> {
    let out = std::process::Command::new("python3")
        .args(["-c", "import importlib.util as u, os; s = u.find_spec('onnxruntime'); print(os.path.dirname(s.origin) if s else '')"])
        .stderr(std::process::Stdio::null())
        .output()
        .ok()?;
    let dir = String::from_utf8(out.stdout).ok()?;
    let dir = dir.trim();
    (!dir.is_empty()).then(|| newest_lib_in(&Path::new(dir).join("capi"))).flatten()
}

/// Finds the ONNX Runtime shared library.
pub fn find_library(explicit: Option<&Path>) -> Result<PathBuf> {
    if let Some(p) = explicit {
        return if p.is_file() {
            Ok(p.to_path_buf())
        } else {
            Err(Error::Runtime(format!("--ort-lib {} is not a file; {INSTALL_HINT}", p.display())))
        };
    }
    if let Some(p) = std::env::var_os("ORT_DYLIB_PATH").filter(|p| !p.is_empty()) {
        let p = PathBuf::from(p);
        return if p.is_file() {
            Ok(p)
        } else {
            Err(Error::Runtime(format!("ORT_DYLIB_PATH={} is not a file; {INSTALL_HINT}", p.display())))
        };
    }
    let cwd = std::env::current_dir().ok();
    let exe = std::env::current_exe().ok();
    cwd.as_deref()
        .and_then(search_ancestors)
        .or_else(|| exe.as_deref().and_then(search_ancestors))
        .or_else(from_python)
        .ok_or_else(|| Error::Runtime(format!("the ONNX Runtime library was not found; {INSTALL_HINT}")))
}

static ENVIRONMENT: OnceLock<std::result::Result<ort::environment::Environment, String>> = OnceLock::new();

/// The process's ONNX Runtime environment, created on first use from `lib` (or the lookup order).
pub fn environment(lib: Option<&Path>) -> Result<&'static ort::environment::Environment> {
    ENVIRONMENT
        .get_or_init(|| {
            let path = find_library(lib).map_err(|e| e.to_string())?;
            ort::init_from(&path)
                .map_err(|e| format!("cannot load {}: {e}", path.display()))?
                .with_name("nibble")
                .build()
                .map_err(|e| format!("cannot start ONNX Runtime from {}: {e}", path.display()))
        })
        .as_ref()
        .map_err(|e| Error::Runtime(e.trim_start_matches("ONNX Runtime: ").to_string()))
}

/// How a session is built.
#[derive(Clone, Copy, Debug, Default)]
pub struct SessionOptions {
    /// Disable all graph optimizations (the plainest execution of the graph as written).
    pub no_optimization: bool,
    /// ONNX Runtime's own defaults, as a user's session has them: DQ(INT4)+MatMul fused into
    /// MatMulNBits running with int8 activations (`session.qdq_matmulnbits_accuracy_level` 4).
    /// Without it the fused node computes in fp32 (level 1): the weight-only error.
    pub ort_defaults: bool,
}

/// The session option that sets the accuracy level of the MatMulNBits nodes ONNX Runtime fuses
/// from DequantizeLinear(INT4) + MatMul (its default is 4: int8 activations).
pub const FUSED_ACCURACY_OPTION: &str = "session.qdq_matmulnbits_accuracy_level";

/// The session option that lets ONNX Runtime's intra-op threads spin between operators.
const SPINNING_OPTION: &str = "session.intra_op.allow_spinning";

/// Opens a model file in ONNX Runtime. Unless `opts.ort_defaults`, MatMulNBits fused from
/// DQ+MatMul computes in fp32 (`accuracy_level` 1) so that results compare tightly with the unfused
/// graph. The intra-op threads do not spin while they wait: on the 48M-parameter model's AWQ
/// calibration spinning burned about 20% more CPU for no measured gain in wall time (BENCHMARKS.md,
/// "AWQ-lite: one product fewer"); the results are the same bits.
pub fn open(model: &Path, opts: SessionOptions) -> Result<Session> {
    let env = environment(None)?;
    let err = |e: ort::Error| Error::Runtime(format!("{}: {e}", model.display()));
    let mut b = Session::builder(env).map_err(err)?;
    b = b.with_config_entry(SPINNING_OPTION, "0").map_err(|e| err(e.into()))?;
    if !opts.ort_defaults {
        b = b.with_config_entry(FUSED_ACCURACY_OPTION, "1").map_err(|e| err(e.into()))?;
    }
    if opts.no_optimization {
        b = b.with_optimization_level(GraphOptimizationLevel::Disable).map_err(|e| err(e.into()))?;
    }
    b.commit_from_file(model).map_err(err)
}

/// A named f32 tensor.
#[derive(Clone, Debug, PartialEq)]
pub struct NamedTensor {
    /// Input or output name.
    pub name: String,
    /// Dimensions.
    pub shape: Vec<usize>,
    /// Row-major values.
    pub data: Vec<f32>,
}

/// Input values of any supported element type.
#[derive(Clone, Debug, PartialEq)]
pub enum InputData {
    /// float32.
    F32(Vec<f32>),
    /// int64 (token ids, positions).
    I64(Vec<i64>),
    /// int32.
    I32(Vec<i32>),
    /// float16.
    F16(Vec<half::f16>),
    /// bool.
    Bool(Vec<bool>),
}

/// A named input.
#[derive(Clone, Debug, PartialEq)]
pub struct Input {
    /// Input name.
    pub name: String,
    /// Dimensions.
    pub shape: Vec<usize>,
    /// Values.
    pub data: InputData,
}

/// Runs a session on f32 inputs and returns every output as f32.
pub fn run_f32(session: &mut Session, inputs: &[NamedTensor]) -> Result<Vec<NamedTensor>> {
    let inputs: Vec<Input> = inputs
        .iter()
        .map(|t| Input { name: t.name.clone(), shape: t.shape.clone(), data: InputData::F32(t.data.clone()) })
        .collect();
    run(session, &inputs)
}

/// Runs a session and returns every float output as f32 (f16 outputs are widened).
///
/// The input tensors live until the outputs are copied: ONNX Runtime may return an input's own
/// buffer as an output (a graph input that is also a graph output).
pub fn run(session: &mut Session, inputs: &[Input]) -> Result<Vec<NamedTensor>> {
    run_values(session, inputs)?.into_iter().map(Input::into_float).collect()
}

impl Input {
    /// A float32 or float16 tensor as float32 (float16 widened); any other type is an error
    /// naming the tensor.
    pub fn into_float(self) -> Result<NamedTensor> {
        let data = match self.data {
            InputData::F32(d) => d,
            InputData::F16(d) => d.iter().map(|v| v.to_f32()).collect(),
            _ => return Err(Error::Runtime(format!("'{}' is neither float32 nor float16", self.name))),
        };
        Ok(NamedTensor { name: self.name, shape: self.shape, data })
    }
}

/// Runs a session and returns every output with its own element type (float32, float16, int64,
/// int32 or bool; any other type is an error naming the output), in the session's output order.
pub fn run_values(session: &mut Session, inputs: &[Input]) -> Result<Vec<Input>> {
    let err = |e: ort::Error| Error::Runtime(e.to_string());
    let mut tensors: Vec<(String, ort::value::DynValue)> = Vec::with_capacity(inputs.len());
    for t in inputs {
        let v: ort::value::DynValue = match &t.data {
            InputData::F32(d) => ort::value::Tensor::from_array((t.shape.clone(), d.clone())).map_err(err)?.into_dyn(),
            InputData::I64(d) => ort::value::Tensor::from_array((t.shape.clone(), d.clone())).map_err(err)?.into_dyn(),
            InputData::I32(d) => ort::value::Tensor::from_array((t.shape.clone(), d.clone())).map_err(err)?.into_dyn(),
            InputData::F16(d) => ort::value::Tensor::from_array((t.shape.clone(), d.clone())).map_err(err)?.into_dyn(),
            InputData::Bool(d) => ort::value::Tensor::from_array((t.shape.clone(), d.clone())).map_err(err)?.into_dyn(),
        };
        tensors.push((t.name.clone(), v));
    }
    let values: Vec<(String, ort::session::SessionInputValue<'_>)> =
        tensors.iter().map(|(n, v)| (n.clone(), ort::session::SessionInputValue::from(v))).collect();
    let names: Vec<String> = session.outputs().iter().map(|o| o.name().to_string()).collect();
    let outputs = session.run(values).map_err(err)?;
    names
        .into_iter()
        .map(|name| {
            let value = &outputs[name.as_str()];
            fn take<T: ort::value::PrimitiveTensorElementType + Clone + std::fmt::Debug>(
                v: &ort::value::DynValue,
            ) -> Option<(Vec<usize>, Vec<T>)> {
                v.try_extract_tensor::<T>().ok().map(|(s, d)| (s.iter().map(|&x| x as usize).collect(), d.to_vec()))
            }
            let (shape, data) = if let Some((s, d)) = take::<f32>(value) {
                (s, InputData::F32(d))
            } else if let Some((s, d)) = take::<half::f16>(value) {
                (s, InputData::F16(d))
            } else if let Some((s, d)) = take::<i64>(value) {
                (s, InputData::I64(d))
            } else if let Some((s, d)) = take::<i32>(value) {
                (s, InputData::I32(d))
            } else if let Some((s, d)) = take::<bool>(value) {
                (s, InputData::Bool(d))
            } else {
                return Err(Error::Runtime(format!(
                    "output '{name}' is not a float32, float16, int64, int32 or bool tensor"
                )));
            };
            Ok(Input { name, shape, data })
        })
        .collect()
}
