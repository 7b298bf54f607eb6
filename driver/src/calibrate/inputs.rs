//! Calibration inputs for the AWQ searches.
//!
//! From a file (`--calibration-data`): a `.npz` with one array per model input, keyed by input name
//! (a `.npy` for a single-input model), samples stacked on the first axis, as ModelOpt's CLI takes
//! them. An array of the input's rank is cut into runs of the model's batch size (1 when the batch
//! is dynamic); an array of rank + 1 holds one sample per entry of its first axis.
//!
//! In memory ([`CalibrationOptions::inputs`]): each sample a full set of inputs, used as the entry of
//! a `[samples, ...]` array of an `.npz` would be (same name matching, conversions and checks).
//!
//! Without either: seeded random samples of a realistic shape. Symbolic dimensions are set from
//! `--calibration-shapes name:1x128,...`, else the first to 1 and the others to 128 (a sequence
//! length), except that a float input `[rows, hidden]` whose only symbolic dimension is the first
//! gets 128 rows (one token per row would leave the searches two or eight tokens). Float inputs are standard normal; integer inputs are ids inside the embedding table
//! they index (the row count of the Gather table fed by the input), `*mask*` inputs are ones and
//! `position_ids` count up along the sequence.

use crate::calibrate::npy::{read_arrays, Array, DType};
use crate::calibrate::runtime::{Input, InputData};
use crate::error::{Error, Result};
use crate::graph::model::{dtype_name, Model};
use crate::graph::onnx::{tensor_proto::DataType, tensor_shape_proto::dimension::Value, type_proto, ValueInfoProto};
use crate::rng::Rng;
use std::collections::HashMap;
use std::path::PathBuf;

/// How to get calibration inputs.
#[derive(Clone, Debug)]
pub struct CalibrationOptions {
    /// `.npz`/`.npy` file.
    pub data: Option<PathBuf>,
    /// Preloaded samples, each a full set of model inputs by name (e.g. from a Python
    /// `CalibrationDataReader`). When set they are the calibration samples, used exactly as the
    /// entries along the first axis of same-named `[samples, ...]` arrays of an `.npz` (converted to
    /// the input's element type and checked against its fixed dimensions); `data` is not read.
    pub inputs: Option<Vec<Vec<Input>>>,
    /// Values for symbolic dimensions per input.
    pub shapes: HashMap<String, Vec<usize>>,
    /// Random samples when there is no file.
    pub samples: usize,
    /// Seed of the random samples.
    pub seed: u64,
}

impl Default for CalibrationOptions {
    fn default() -> Self {
        CalibrationOptions { data: None, inputs: None, shapes: HashMap::new(), samples: 8, seed: 0 }
    }
}

/// Parses `name:1x128,other:1x128x64`.
pub fn parse_shapes(text: &str) -> Result<HashMap<String, Vec<usize>>> {
    let mut out = HashMap::new();
    for item in text.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let (name, dims) = item.rsplit_once(':').ok_or_else(|| {
            Error::Usage(format!("--calibration-shapes: '{item}' is not NAME:DIMxDIM..., e.g. input_ids:1x128"))
        })?;
        let dims =
            dims.split('x').map(|d| d.trim().parse::<usize>()).collect::<std::result::Result<Vec<_>, _>>().map_err(
                |_| Error::Usage(format!("--calibration-shapes: '{item}': dimensions must be numbers like 1x128")),
            )?;
        out.insert(name.to_string(), dims);
    }
    Ok(out)
}

/// A model input: name, element type, dims (`None` = symbolic).
#[derive(Clone, Debug)]
pub struct InputSpec {
    /// Name.
    pub name: String,
    /// ONNX element type.
    pub elem_type: i32,
    /// Dimensions.
    pub dims: Vec<Option<usize>>,
}

/// The graph inputs that are not initializers.
pub fn input_specs(model: &Model) -> Result<Vec<InputSpec>> {
    let g = model.proto.graph.as_ref().expect("graph");
    let inits: std::collections::HashSet<&str> = g.initializer.iter().filter_map(|t| t.name.as_deref()).collect();
    g.input.iter().filter(|v| !inits.contains(v.name.as_deref().unwrap_or(""))).map(spec).collect()
}

fn spec(vi: &ValueInfoProto) -> Result<InputSpec> {
    let name = vi.name.clone().unwrap_or_default();
    let Some(type_proto::Value::TensorType(t)) = vi.r#type.as_ref().and_then(|t| t.value.as_ref()) else {
        return Err(Error::Usage(format!("model input '{name}' is not a tensor; calibration needs tensor inputs")));
    };
    let dims = t
        .shape
        .as_ref()
        .map(|s| {
            s.dim.iter().map(|d| match d.value {
                Some(Value::DimValue(v)) if v > 0 => Some(v as usize),
                _ => None,
            })
        })
        .map(|d| d.collect())
        .unwrap_or_default();
    // A bfloat16 input is fed as float32: calibration runs the model's float32 twin (crate::twin).
    let elem_type = match t.elem_type.unwrap_or(0) {
        e if e == DataType::Bfloat16 as i32 => DataType::Float as i32,
        e => e,
    };
    Ok(InputSpec { name, elem_type, dims })
}

/// Rows of the embedding table that `input` indexes through a Gather, if any.
fn vocabulary(model: &Model, input: &str) -> Option<usize> {
    let g = model.proto.graph.as_ref()?;
    let node = g
        .node
        .iter()
        .find(|n| n.op_type.as_deref() == Some("Gather") && n.input.get(1).map(String::as_str) == Some(input))?;
    let table = g.initializer.iter().find(|t| t.name.as_deref() == node.input.first().map(String::as_str))?;
    table.dims.first().map(|&d| d as usize)
}

/// The calibration samples: each a full set of model inputs.
pub fn calibration_inputs(model: &Model, opts: &CalibrationOptions) -> Result<Vec<Vec<Input>>> {
    let specs = input_specs(model)?;
    match (&opts.inputs, &opts.data) {
        (Some(samples), _) => from_memory(&specs, samples),
        (None, Some(path)) => from_file(&specs, path),
        (None, None) => Ok(random(model, &specs, opts)),
    }
}

fn random(model: &Model, specs: &[InputSpec], opts: &CalibrationOptions) -> Vec<Vec<Input>> {
    let mut rng = Rng::new(opts.seed.wrapping_add(0x5eed));
    (0..opts.samples.max(1))
        .map(|_| {
            specs
                .iter()
                .map(|s| {
                    let shape: Vec<usize> = match opts.shapes.get(&s.name) {
                        Some(d) => d.clone(),
                        None => {
                            // Symbolic dims: batch 1, sequence 128; a float input whose only symbolic
                            // dim is its first ([rows, hidden]) gets 128 rows of tokens.
                            let float =
                                matches!(DataType::try_from(s.elem_type), Ok(DataType::Float | DataType::Float16));
                            let rows_only = s.dims.len() == 2 && s.dims[0].is_none() && s.dims[1].is_some();
                            s.dims
                                .iter()
                                .enumerate()
                                .map(|(i, d)| d.unwrap_or(if i == 0 && !(float && rows_only) { 1 } else { 128 }))
                                .collect()
                        }
                    };
                    let n: usize = shape.iter().product();
                    let lower = s.name.to_lowercase();
                    let seq = *shape.last().unwrap_or(&1);
                    let ints = |rng: &mut Rng| -> Vec<i64> {
                        if lower.contains("mask") {
                            vec![1; n]
                        } else if lower.contains("position") {
                            (0..n).map(|i| (i % seq.max(1)) as i64).collect()
                        } else {
                            let vocab = vocabulary(model, &s.name).unwrap_or(100).max(1);
                            (0..n).map(|_| ((rng.uniform() * vocab as f32) as usize).min(vocab - 1) as i64).collect()
                        }
                    };
                    let data = match DataType::try_from(s.elem_type) {
                        Ok(DataType::Float16) => {
                            InputData::F16(rng.normals(n, 1.0).into_iter().map(half::f16::from_f32).collect())
                        }
                        Ok(DataType::Int64) => InputData::I64(ints(&mut rng)),
                        Ok(DataType::Int32) => InputData::I32(ints(&mut rng).into_iter().map(|v| v as i32).collect()),
                        Ok(DataType::Bool) => InputData::Bool(vec![true; n]),
                        _ => InputData::F32(rng.normals(n, 1.0)),
                    };
                    Input { name: s.name.clone(), shape, data }
                })
                .collect()
        })
        .collect()
}

fn convert(spec: &InputSpec, a: &Array, shape: Vec<usize>, range: std::ops::Range<usize>) -> Result<InputData> {
    let mismatch = || {
        Error::Usage(format!(
            "calibration array '{}' is {}, but the model input is {}; convert the array",
            spec.name,
            a.dtype.name(),
            dtype_name(spec.elem_type).to_lowercase()
        ))
    };
    let _ = shape;
    Ok(match (DataType::try_from(spec.elem_type), a.dtype) {
        (Ok(DataType::Float), DType::F32 | DType::F64 | DType::F16) => {
            InputData::F32(a.to_f64()[range].iter().map(|&v| v as f32).collect())
        }
        (Ok(DataType::Float16), DType::F16 | DType::F32) => {
            InputData::F16(a.to_f64()[range].iter().map(|&v| half::f16::from_f64(v)).collect())
        }
        (Ok(DataType::Int64), d) if d != DType::F16 && d != DType::F32 && d != DType::F64 => {
            InputData::I64(a.as_i64().ok_or_else(mismatch)?[range].to_vec())
        }
        (Ok(DataType::Int32), d) if d != DType::F16 && d != DType::F32 && d != DType::F64 => {
            InputData::I32(a.as_i64().ok_or_else(mismatch)?[range].iter().map(|&v| v as i32).collect())
        }
        (Ok(DataType::Bool), DType::Bool) => InputData::Bool(a.data[range].iter().map(|&b| b != 0).collect()),
        _ => return Err(mismatch()),
    })
}

fn from_file(specs: &[InputSpec], path: &std::path::Path) -> Result<Vec<Vec<Input>>> {
    let arrays = read_arrays(path).map_err(|e| Error::Usage(format!("--calibration-data: {e}")))?;
    // A .npy (one unnamed array) feeds a single-input model whatever its file name.
    let npy = path.extension().is_some_and(|e| e.eq_ignore_ascii_case("npy"));
    let single = npy && specs.len() == 1 && arrays.len() == 1;
    let mut per_input: Vec<Vec<Input>> = Vec::new();
    for s in specs {
        let a = match arrays.iter().find(|(n, _)| n == &s.name) {
            Some((_, a)) => a,
            None if single => &arrays[0].1,
            None => {
                let have: Vec<&str> = arrays.iter().map(|(n, _)| n.as_str()).collect();
                return Err(Error::Usage(format!(
                    "--calibration-data {}: no array named '{}' (the model's inputs are {:?}; the file has {have:?})",
                    path.display(),
                    s.name,
                    specs.iter().map(|s| s.name.as_str()).collect::<Vec<_>>()
                )));
            }
        };
        per_input.push(samples_of(s, a)?);
    }
    let count = per_input.iter().map(Vec::len).min().unwrap_or(0);
    if count == 0 || per_input.iter().any(|v| v.len() != count) {
        return Err(Error::Usage(format!(
            "--calibration-data {}: every input needs the same number of samples (got {:?})",
            path.display(),
            per_input.iter().map(Vec::len).collect::<Vec<_>>()
        )));
    }
    Ok((0..count).map(|i| per_input.iter().map(|v| v[i].clone()).collect()).collect())
}

/// The samples in array `a` for model input `s`: one per entry of the first axis of a rank + 1
/// array, or runs of the batch size of a rank array.
fn samples_of(s: &InputSpec, a: &Array) -> Result<Vec<Input>> {
    let rank = s.dims.len();
    let (samples, sample_shape): (usize, Vec<usize>) = if a.shape.len() == rank + 1 {
        (a.shape[0], a.shape[1..].to_vec())
    } else if a.shape.len() == rank && rank > 0 {
        let batch = s.dims[0].unwrap_or(1);
        if !a.shape[0].is_multiple_of(batch) {
            return Err(Error::Usage(format!(
                "calibration array '{}' has {} rows, not a multiple of the model's batch size {batch}",
                s.name, a.shape[0]
            )));
        }
        let mut shape = a.shape.clone();
        shape[0] = batch;
        (a.shape[0] / batch, shape)
    } else {
        return Err(Error::Usage(format!(
            "calibration array '{}' has shape {:?}; the model input has rank {rank} (give [samples, ...] or [rows, ...])",
            s.name, a.shape
        )));
    };
    for (i, (d, &want)) in sample_shape.iter().zip(&s.dims).enumerate() {
        if let Some(w) = want {
            if *d != w {
                return Err(Error::Usage(format!(
                    "calibration array '{}' has size {d} in dimension {i} of a sample, the model expects {w}",
                    s.name
                )));
            }
        }
    }
    let per = sample_shape.iter().product::<usize>();
    (0..samples)
        .map(|i| {
            Ok(Input {
                name: s.name.clone(),
                shape: sample_shape.clone(),
                data: convert(s, a, sample_shape.clone(), i * per..(i + 1) * per)?,
            })
        })
        .collect::<Result<Vec<_>>>()
}

/// Preloaded samples: each input of each sample taken as the one entry of a `[1, ...]` array.
fn from_memory(specs: &[InputSpec], samples: &[Vec<Input>]) -> Result<Vec<Vec<Input>>> {
    if samples.is_empty() {
        return Err(Error::Usage("calibration inputs: no samples given".into()));
    }
    samples
        .iter()
        .map(|sample| {
            specs
                .iter()
                .map(|s| {
                    let Some(input) = sample.iter().find(|i| i.name == s.name) else {
                        let have: Vec<&str> = sample.iter().map(|i| i.name.as_str()).collect();
                        return Err(Error::Usage(format!(
                            "calibration inputs: no array named '{}' (the model's inputs are {:?}; the sample has {have:?})",
                            s.name,
                            specs.iter().map(|s| s.name.as_str()).collect::<Vec<_>>()
                        )));
                    };
                    let mut a = array_of(&input.data);
                    let values = a.len();
                    a.shape = std::iter::once(1).chain(input.shape.iter().copied()).collect();
                    if a.len() != values {
                        return Err(Error::Usage(format!(
                            "calibration input '{}': shape {:?} does not hold its {values} values",
                            s.name, input.shape
                        )));
                    }
                    Ok(samples_of(s, &a)?.remove(0))
                })
                .collect()
        })
        .collect()
}

/// In-memory input values as a 1-D array of the same dtype (little-endian, as an `.npy` holds them).
fn array_of(data: &InputData) -> Array {
    fn le<const N: usize, T: Copy>(v: &[T], f: impl Fn(T) -> [u8; N]) -> Vec<u8> {
        v.iter().flat_map(|&x| f(x)).collect()
    }
    let (dtype, data) = match data {
        InputData::F32(v) => (DType::F32, le(v, f32::to_le_bytes)),
        InputData::F16(v) => (DType::F16, le(v, half::f16::to_le_bytes)),
        InputData::I64(v) => (DType::I64, le(v, i64::to_le_bytes)),
        InputData::I32(v) => (DType::I32, le(v, i32::to_le_bytes)),
        InputData::Bool(v) => (DType::Bool, v.iter().map(|&b| b as u8).collect()),
    };
    Array { dtype, shape: vec![data.len() / dtype.size()], data }
}
