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
//! From token sequences ([`CalibrationOptions::tokens`], or a decoder's `.npz` holding only
//! `input_ids`): each sequence one sample, the other inputs filled by the feed plan
//! ([`crate::calibrate::feed`]: mask, positions, empty KV cache, ...).
//!
//! Without any: seeded random samples of a realistic shape; a model fed by token ids is refused
//! unless [`CalibrationOptions::random`] is set (random ids make a much worse model than text). Symbolic dimensions are set from
//! `--calibration-shapes name:1x128,dim=N,...`, else the first to 1 and the others to 128 (a sequence
//! length), except that a float input `[rows, hidden]` whose only symbolic dimension is the first
//! gets 128 rows (one token per row would leave the searches two or eight tokens). Float inputs are standard normal; integer inputs are ids inside the embedding table
//! they index (the row count of the Gather table fed by the input), `*mask*` inputs are ones and
//! `position_ids` count up along the sequence.

use crate::calibrate::feed::{self, Feed, FeedPlan};
use crate::calibrate::npy::{read_arrays, Array, DType};
use crate::calibrate::runtime::{Input, InputData};
pub use crate::calibrate::spec::{input_specs, shape_text, vocabulary, InputSpec};
use crate::error::{Error, Result};
use crate::graph::model::{dtype_name, Model};
use crate::graph::onnx::tensor_proto::DataType;
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
    /// Token sequences (e.g. tokenized text): each sequence becomes one calibration sample of a
    /// model fed by token ids, its other inputs (mask, positions, empty KV cache) filled in by the
    /// feed plan ([`crate::calibrate::feed`]). Takes precedence over `data`; not with `inputs`.
    pub tokens: Option<Vec<Vec<i64>>>,
    /// Values for symbolic dimensions per input.
    pub shapes: HashMap<String, Vec<usize>>,
    /// Values of symbolic dimensions by name (`past_sequence_length=0`, `sequence_length=64`), for
    /// every input that has the dimension; an input's entry in `shapes` wins.
    pub dims: HashMap<String, usize>,
    /// Random samples when there is no file.
    pub samples: usize,
    /// Calibrate a model fed by token ids on random ids when no data is given (opt-in, warned:
    /// a calibrated method on random tokens gives a much worse model than on text). Without it such
    /// a model and no data is an error.
    pub random: bool,
    /// Seed of the random samples.
    pub seed: u64,
}

impl Default for CalibrationOptions {
    fn default() -> Self {
        CalibrationOptions {
            data: None,
            inputs: None,
            tokens: None,
            shapes: HashMap::new(),
            dims: HashMap::new(),
            samples: 8,
            random: false,
            seed: 0,
        }
    }
}

/// What `--calibration-shapes` gives: per-input shapes (`name:1x128`) and symbolic dimension
/// values (`past_sequence_length=0`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ShapeArgs {
    /// Shapes by input name.
    pub shapes: HashMap<String, Vec<usize>>,
    /// Values by symbolic dimension name.
    pub dims: HashMap<String, usize>,
}

/// Parses `name:1x128,other:1x128x64,past_sequence_length=0`: `NAME:DIMxDIM...` sets a whole
/// input's shape, `DIM=N` a symbolic dimension wherever it occurs. Names are checked against the
/// model later ([`check_shape_names`]).
pub fn parse_shapes(text: &str) -> Result<ShapeArgs> {
    let mut out = ShapeArgs::default();
    for item in text.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        if let Some((dim, value)) = item.split_once('=') {
            let value = value.trim().parse::<usize>().map_err(|_| {
                Error::Usage(format!(
                    "--calibration-shapes: '{item}': DIM=N needs a number, e.g. past_sequence_length=0"
                ))
            })?;
            out.dims.insert(dim.trim().to_string(), value);
            continue;
        }
        let (name, dims) = item.rsplit_once(':').ok_or_else(|| {
            Error::Usage(format!(
                "--calibration-shapes: '{item}' is neither NAME:DIMxDIM... (e.g. input_ids:1x128) nor DIM=N (e.g. sequence_length=64)"
            ))
        })?;
        let dims =
            dims.split('x').map(|d| d.trim().parse::<usize>()).collect::<std::result::Result<Vec<_>, _>>().map_err(
                |_| Error::Usage(format!("--calibration-shapes: '{item}': dimensions must be numbers like 1x128")),
            )?;
        out.shapes.insert(name.to_string(), dims);
    }
    Ok(out)
}

/// Checks that every input name in `shapes` and every dimension name in `dims` is one of the
/// model's; the error lists the model's inputs and symbolic dimensions.
pub fn check_shape_names(
    specs: &[InputSpec],
    shapes: &HashMap<String, Vec<usize>>,
    dims: &HashMap<String, usize>,
) -> Result<()> {
    let mut symbols: Vec<&str> = specs.iter().flat_map(|s| s.symbols.iter().flatten().map(String::as_str)).collect();
    symbols.sort_unstable();
    symbols.dedup();
    let inputs: Vec<String> = specs.iter().map(|s| format!("{}{}", s.name, shape_text(s))).collect();
    let listing =
        || format!("the model's inputs are {}; its symbolic dimensions are {}", inputs.join(", "), symbols.join(", "));
    let mut names: Vec<&String> = shapes.keys().collect();
    names.sort();
    for name in names {
        let Some(spec) = specs.iter().find(|s| &s.name == name) else {
            return Err(Error::Usage(format!("--calibration-shapes: no model input named '{name}'; {}", listing())));
        };
        if shapes[name].len() != spec.dims.len() {
            return Err(Error::Usage(format!(
                "--calibration-shapes: input '{name}' has rank {}, the shape given has {} dimensions; {}",
                spec.dims.len(),
                shapes[name].len(),
                listing()
            )));
        }
    }
    let mut names: Vec<&String> = dims.keys().collect();
    names.sort();
    for name in names {
        if !symbols.contains(&name.as_str()) {
            return Err(Error::Usage(format!(
                "--calibration-shapes: no symbolic dimension named '{name}'; {}",
                listing()
            )));
        }
    }
    Ok(())
}

/// Why random token ids are refused (measured on a 60-layer builder model, issue 18).
pub const RANDOM_TOKENS_EFFECT: &str = "calibrating on random token ids gives a much worse model than on text \
(GPTQ on random ids: perplexity 77.4; on text: 40.3; plain rounding with a zero point: 43.0)";

/// The calibration samples: each a full set of model inputs.
///
/// Errors: an unknown name in `shapes`/`dims`; a model fed by token ids with no data, tokens or
/// samples and `random` unset; data that does not fit the model's inputs.
pub fn calibration_inputs(model: &Model, opts: &CalibrationOptions) -> Result<Vec<Vec<Input>>> {
    let specs = input_specs(model)?;
    check_shape_names(&specs, &opts.shapes, &opts.dims)?;
    match (&opts.inputs, &opts.tokens, &opts.data) {
        (Some(samples), _, _) => from_memory(&specs, samples),
        (None, Some(tokens), _) => from_tokens(model, &specs, tokens, opts),
        (None, None, Some(path)) => match file_tokens(model, &specs, path, opts)? {
            Some(tokens) => from_tokens(model, &specs, &tokens, opts),
            None => from_file(&specs, path),
        },
        (None, None, None) => random(model, &specs, opts),
    }
}

/// The token sequences of a decoder's `.npz` that holds only the token ids (`input_ids` as
/// `[samples, T]` or `[samples, 1, T]`): the other inputs then come from the feed plan. `None` when
/// the model is not such a decoder or the file has an array for every input.
fn file_tokens(
    model: &Model,
    specs: &[InputSpec],
    path: &std::path::Path,
    opts: &CalibrationOptions,
) -> Result<Option<Vec<Vec<i64>>>> {
    let plan = feed::plan(model, specs, &opts.dims)?;
    let Some((ids, _)) = plan.inputs.iter().find(|(_, f)| *f == Feed::Tokens) else { return Ok(None) };
    if !plan.is_decoder() {
        return Ok(None);
    }
    let arrays = read_arrays(path).map_err(|e| Error::Usage(format!("--calibration-data: {e}")))?;
    if specs.iter().all(|s| arrays.iter().any(|(n, _)| n == &s.name)) {
        return Ok(None);
    }
    let Some((_, a)) = arrays.iter().find(|(n, _)| n == &ids.name) else { return Ok(None) };
    let values = a.as_i64().ok_or_else(|| {
        Error::Usage(format!("--calibration-data {}: '{}' must hold integer token ids", path.display(), ids.name))
    })?;
    let t = *a.shape.last().unwrap_or(&0);
    if !(a.shape.len() == 2 || a.shape.len() == 3 && a.shape[1] == 1) || t == 0 {
        return Err(Error::Usage(format!(
            "--calibration-data {}: '{}' has shape {:?}; give token ids as [samples, T]",
            path.display(),
            ids.name,
            a.shape
        )));
    }
    Ok(Some(values.chunks_exact(t).map(<[i64]>::to_vec).collect()))
}

/// The feed plan of the model's inputs under `opts`' dimension values.
pub fn feed_plan(model: &Model, opts: &CalibrationOptions) -> Result<FeedPlan> {
    let specs = input_specs(model)?;
    check_shape_names(&specs, &opts.shapes, &opts.dims)?;
    feed::plan(model, &specs, &opts.dims)
}

/// Each token sequence through the feed plan.
fn from_tokens(
    model: &Model,
    specs: &[InputSpec],
    tokens: &[Vec<i64>],
    opts: &CalibrationOptions,
) -> Result<Vec<Vec<Input>>> {
    let plan = feed::plan(model, specs, &opts.dims)?;
    let Some((ids, _)) = plan.inputs.iter().find(|(_, f)| *f == Feed::Tokens) else {
        return Err(Error::Usage(format!(
            "calibration tokens given, but no model input takes token ids (the inputs are {:?}); give --calibration-data instead",
            specs.iter().map(|s| s.name.as_str()).collect::<Vec<_>>()
        )));
    };
    if tokens.is_empty() || tokens.iter().any(Vec::is_empty) {
        return Err(Error::Usage("calibration tokens: every sample needs at least one token".into()));
    }
    if let Some(vocab) = vocabulary(model, &ids.name) {
        if let Some(bad) = tokens.iter().flatten().find(|&&t| t < 0 || t as usize >= vocab) {
            return Err(Error::Usage(format!(
                "calibration token {bad} is outside the embedding of input '{}' ({vocab} rows); use the model's own tokenizer",
                ids.name
            )));
        }
    }
    let mut rng = Rng::new(opts.seed.wrapping_add(0x5eed));
    Ok(tokens.iter().map(|seq| plan.sample(seq, |s| random_input(model, s, opts, &mut rng))).collect())
}

fn random(model: &Model, specs: &[InputSpec], opts: &CalibrationOptions) -> Result<Vec<Vec<Input>>> {
    let mut plan = feed::plan(model, specs, &opts.dims)?;
    // An input whose whole shape is given is filled as before (random of that shape).
    for (s, f) in plan.inputs.iter_mut() {
        if opts.shapes.contains_key(&s.name) && *f != Feed::Tokens {
            *f = Feed::Random;
        }
    }
    let ids = plan.inputs.iter().find(|(_, f)| *f == Feed::Tokens).map(|(s, _)| s.clone());
    if let Some(ids) = &ids {
        if !opts.random {
            return Err(Error::Usage(format!(
                "model input '{}' takes token ids and no calibration data was given: {RANDOM_TOKENS_EFFECT}. \
                 Give text (--calibration-text FILE) or token arrays (--calibration-data FILE.npz with '{}' [samples, T]), \
                 or pass --calibration-random to calibrate on random ids anyway",
                ids.name, ids.name
            )));
        }
        eprintln!(
            "nibble: warning: no calibration data: input '{}' gets random token ids; {RANDOM_TOKENS_EFFECT}; give text or token arrays",
            ids.name
        );
    }
    let mut rng = Rng::new(opts.seed.wrapping_add(0x5eed));
    let Some(ids) = ids else {
        // No token ids: every input random as before (a mask or positions without ids has no length).
        return Ok((0..opts.samples.max(1))
            .map(|_| specs.iter().map(|s| random_input(model, s, opts, &mut rng)).collect())
            .collect());
    };
    let shape = opts.shapes.get(&ids.name).cloned().unwrap_or_else(|| resolve(&ids, &opts.dims));
    let len = *shape.last().unwrap_or(&1);
    let vocab = vocabulary(model, &ids.name).unwrap_or(100).max(1);
    Ok((0..opts.samples.max(1))
        .map(|_| {
            let tokens: Vec<i64> =
                (0..len).map(|_| ((rng.uniform() * vocab as f32) as usize).min(vocab - 1) as i64).collect();
            let mut sample = plan.sample(&tokens, |s| random_input(model, s, opts, &mut rng));
            // A given tokens shape (e.g. batch 4) is kept: the ids are drawn for the whole shape.
            if let Some(input) = sample.iter_mut().find(|i| i.name == ids.name).filter(|_| shape[0] != 1) {
                let n: usize = shape.iter().product();
                let ids: Vec<i64> =
                    (0..n).map(|_| ((rng.uniform() * vocab as f32) as usize).min(vocab - 1) as i64).collect();
                *input = Input { name: input.name.clone(), shape: shape.clone(), data: InputData::I64(ids) };
            }
            sample
        })
        .collect())
}

/// The shape of `s` with its symbolic dims set: by name from `dims`, else batch (first) 1 and the
/// others 128, except that a float input `[rows, hidden]` whose only symbolic dim is its first gets
/// 128 rows of tokens.
fn resolve(s: &InputSpec, dims: &HashMap<String, usize>) -> Vec<usize> {
    let float = matches!(DataType::try_from(s.elem_type), Ok(DataType::Float | DataType::Float16));
    let rows_only = s.dims.len() == 2 && s.dims[0].is_none() && s.dims[1].is_some();
    s.dims
        .iter()
        .enumerate()
        .map(|(i, d)| {
            d.or_else(|| s.symbols.get(i).cloned().flatten().and_then(|n| dims.get(&n).copied()))
                .unwrap_or(if i == 0 && !(float && rows_only) { 1 } else { 128 })
        })
        .collect()
}

/// A seeded random value for input `s` (its shape from `opts.shapes` or [`resolve`]).
fn random_input(model: &Model, s: &InputSpec, opts: &CalibrationOptions, rng: &mut Rng) -> Input {
    let shape = opts.shapes.get(&s.name).cloned().unwrap_or_else(|| resolve(s, &opts.dims));
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
        Ok(DataType::Float16) => InputData::F16(rng.normals(n, 1.0).into_iter().map(half::f16::from_f32).collect()),
        Ok(DataType::Int64) => InputData::I64(ints(rng)),
        Ok(DataType::Int32) => InputData::I32(ints(rng).into_iter().map(|v| v as i32).collect()),
        Ok(DataType::Bool) => InputData::Bool(vec![true; n]),
        _ => InputData::F32(rng.normals(n, 1.0)),
    };
    Input { name: s.name.clone(), shape, data }
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
