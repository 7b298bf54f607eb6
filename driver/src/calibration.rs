//! Calibration inputs for the AWQ searches.
//!
//! From a file (`--calibration-data`): a `.npz` with one array per model input, keyed by input name
//! (a `.npy` for a single-input model), samples stacked on the first axis, as ModelOpt's CLI takes
//! them. An array of the input's rank is cut into runs of the model's batch size (1 when the batch
//! is dynamic); an array of rank + 1 holds one sample per entry of its first axis.
//!
//! Without a file: seeded random samples of a realistic shape. Symbolic dimensions are set from
//! `--calibration-shapes name:1x128,...`, else the first to 1 and the others to 128 (a sequence
//! length), except that a float input `[rows, hidden]` whose only symbolic dimension is the first
//! gets 128 rows (one token per row would leave the searches two or eight tokens). Float inputs are standard normal; integer inputs are ids inside the embedding table
//! they index (the row count of the Gather table fed by the input), `*mask*` inputs are ones and
//! `position_ids` count up along the sequence.

use crate::model::{dtype_name, Model};
use crate::npy::{read_arrays, Array, DType};
use crate::onnx::{tensor_proto::DataType, tensor_shape_proto::dimension::Value, type_proto, ValueInfoProto};
use crate::runtime::{Input, InputData};
use crate::synth::Rng;
use crate::{Error, Result};
use std::collections::HashMap;
use std::path::PathBuf;

/// How to get calibration inputs.
#[derive(Clone, Debug)]
pub struct CalibrationOptions {
    /// `.npz`/`.npy` file.
    pub data: Option<PathBuf>,
    /// Preloaded samples (each a set of named model inputs, e.g. one `CalibrationDataReader.get_next()`
    /// dict), used exactly as a `.npz` whose arrays stack these samples on a new first axis; takes
    /// precedence over `data`.
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

/// Preloaded samples: each sample goes through the `.npz` path as arrays with a leading axis of 1.
fn from_memory(specs: &[InputSpec], samples: &[Vec<Input>]) -> Result<Vec<Vec<Input>>> {
    if samples.is_empty() {
        return Err(Error::Usage("the calibration data holds no samples".into()));
    }
    let mut out = Vec::with_capacity(samples.len());
    for (i, sample) in samples.iter().enumerate() {
        let arrays: Vec<(String, Array)> = sample
            .iter()
            .map(|x| {
                let (dtype, data): (DType, Vec<u8>) = match &x.data {
                    InputData::F32(v) => (DType::F32, bytemuck::cast_slice(v).to_vec()),
                    InputData::I64(v) => (DType::I64, bytemuck::cast_slice(v).to_vec()),
                    InputData::I32(v) => (DType::I32, bytemuck::cast_slice(v).to_vec()),
                    InputData::F16(v) => (DType::F16, v.iter().flat_map(|h| h.to_le_bytes()).collect()),
                    InputData::Bool(v) => (DType::Bool, v.iter().map(|&b| b as u8).collect()),
                };
                let shape = std::iter::once(1).chain(x.shape.iter().copied()).collect();
                (x.name.clone(), Array { dtype, shape, data })
            })
            .collect();
        out.extend(from_arrays(specs, &arrays, false, &format!("calibration sample {i}"))?);
    }
    Ok(out)
}

fn from_file(specs: &[InputSpec], path: &std::path::Path) -> Result<Vec<Vec<Input>>> {
    let arrays = read_arrays(path).map_err(|e| Error::Usage(format!("--calibration-data: {e}")))?;
    // A .npy (one unnamed array) feeds a single-input model whatever its file name.
    let npy = path.extension().is_some_and(|e| e.eq_ignore_ascii_case("npy"));
    from_arrays(specs, &arrays, npy, &format!("--calibration-data {}", path.display()))
}

/// Cuts named arrays into samples; `label` names their source in errors.
fn from_arrays(specs: &[InputSpec], arrays: &[(String, Array)], npy: bool, label: &str) -> Result<Vec<Vec<Input>>> {
    let single = npy && specs.len() == 1 && arrays.len() == 1;
    let mut per_input: Vec<Vec<Input>> = Vec::new();
    for s in specs {
        let a = match arrays.iter().find(|(n, _)| n == &s.name) {
            Some((_, a)) => a,
            None if single => &arrays[0].1,
            None => {
                let have: Vec<&str> = arrays.iter().map(|(n, _)| n.as_str()).collect();
                return Err(Error::Usage(format!(
                    "{label}: no array named '{}' (the model's inputs are {:?}; {label} has {have:?})",
                    s.name,
                    specs.iter().map(|s| s.name.as_str()).collect::<Vec<_>>()
                )));
            }
        };
        let rank = s.dims.len();
        let (samples, sample_shape): (usize, Vec<usize>) = if a.shape.len() == rank + 1 {
            (a.shape[0], a.shape[1..].to_vec())
        } else if a.shape.len() == rank && rank > 0 {
            let batch = s.dims[0].unwrap_or(1);
            if a.shape[0] % batch != 0 {
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
        let inputs = (0..samples)
            .map(|i| {
                Ok(Input {
                    name: s.name.clone(),
                    shape: sample_shape.clone(),
                    data: convert(s, a, sample_shape.clone(), i * per..(i + 1) * per)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        per_input.push(inputs);
    }
    let count = per_input.iter().map(Vec::len).min().unwrap_or(0);
    if count == 0 || per_input.iter().any(|v| v.len() != count) {
        return Err(Error::Usage(format!(
            "{label}: every input needs the same number of samples (got {:?})",
            per_input.iter().map(Vec::len).collect::<Vec<_>>()
        )));
    }
    Ok((0..count).map(|i| per_input.iter().map(|v| v[i].clone()).collect()).collect())
}
