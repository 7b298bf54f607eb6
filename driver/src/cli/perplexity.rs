//! `nibble compare ORIGINAL QUANTIZED --perplexity TOKENS.npz`: the mean next-token negative
//! log-likelihood (NLL) and perplexity of a causal language model on given token sequences.
//!
//! `TOKENS.npz` holds `input_ids`, int64 (or any integer type) `[S, T]`: S sequences of T >= 2
//! tokens (a `.npy` holding that one array also works). Each sequence runs alone (batch 1); the
//! model's other inputs are filled as calibration fills them: `*mask*` inputs ones, `position*`
//! inputs `0..T`. From the logits `[1, T, V]` (the first output whose last dimension is the
//! vocabulary, i.e. the rows of the embedding table `input_ids` indexes, or the output named by
//! `--logits`):
//!
//! `NLL = mean over s, t in 0..T-1 of (logsumexp(logits[s, t, :]) - logits[s, t, ids[s, t + 1]])`,
//! computed in f64, and `perplexity = exp(NLL)`.
//!
//! Both models run in a default ONNX Runtime session ([`SESSION`]), as a user gets it: ONNX
//! Runtime fuses DequantizeLinear(INT4) + MatMul into MatMulNBits and runs it at its default
//! accuracy level (int8 activations, `session.qdq_matmulnbits_accuracy_level` 4).
//!
//! By segments ([`perplexity_with`], `--segment-mb`): one default session per segment, the logits
//! computed only by the last and scored one sequence at a time (a 32000-token vocabulary over 1024
//! tokens is 131 MB of float32 logits a sequence).

use crate::calibrate::capture::Capture;
use crate::calibrate::feed::{self, Feed};
use crate::calibrate::forward::Forward;
use crate::calibrate::inputs::{input_specs, vocabulary};
use crate::calibrate::runtime::{environment, run, Input, InputData, NamedTensor, SessionOptions};
use crate::error::{Error, Result};
use crate::graph::model::Model;
use crate::graph::onnx::tensor_proto::DataType;
use std::path::Path;

/// The session options every perplexity is measured with.
pub const SESSION: &str = "default ONNX Runtime session (all graph optimizations, no config entries)";

/// Token sequences: `ids` holds `sequences` rows of `length` tokens.
#[derive(Clone, Debug, PartialEq)]
pub struct Tokens {
    /// Row-major `[sequences, length]` token ids.
    pub ids: Vec<i64>,
    /// S.
    pub sequences: usize,
    /// T.
    pub length: usize,
}

/// Reads `input_ids` `[S, T]` from a `.npz` (or the one array of a `.npy`).
///
/// Errors: a missing array, a float array, a rank other than 2, T < 2, or a negative id.
pub fn read_tokens(path: &Path) -> Result<Tokens> {
    let bad = |why: String| Error::Usage(format!("--perplexity {}: {why}", path.display()));
    let arrays = crate::calibrate::npy::read_arrays(path).map_err(|e| bad(e.to_string()))?;
    let npy = path.extension().is_some_and(|e| e.eq_ignore_ascii_case("npy"));
    let array = match arrays.iter().find(|(n, _)| n == "input_ids") {
        Some((_, a)) => a,
        None if npy && arrays.len() == 1 => &arrays[0].1,
        None => {
            let have: Vec<&str> = arrays.iter().map(|(n, _)| n.as_str()).collect();
            return Err(bad(format!(
                "no array named 'input_ids' (the file has {have:?}); save the tokens as input_ids"
            )));
        }
    };
    let ids = array
        .as_i64()
        .ok_or_else(|| bad(format!("input_ids is {}; token ids must be integers", array.dtype.name())))?;
    let [sequences, length] = array.shape[..] else {
        return Err(bad(format!("input_ids has shape {:?}; give [sequences, tokens]", array.shape)));
    };
    if sequences == 0 || length < 2 {
        return Err(bad(format!(
            "input_ids has shape {:?}; give at least one sequence of 2 or more tokens",
            array.shape
        )));
    }
    if let Some(v) = ids.iter().find(|&&v| v < 0) {
        return Err(bad(format!("input_ids holds the negative id {v}")));
    }
    Ok(Tokens { ids, sequences, length })
}

/// Sum of `logsumexp(row t) - row t [next[t]]` over the rows of `logits` `[T', V]` (f32, computed
/// in f64), for `T' = next.len()`: the summed next-token NLL when `next[t]` is the token after
/// position t.
pub fn nll_sum(logits: &[f32], vocab: usize, next: &[i64]) -> f64 {
    next.iter()
        .zip(logits.chunks_exact(vocab))
        .map(|(&target, row)| {
            let max = row.iter().fold(f64::NEG_INFINITY, |m, &x| m.max(x as f64));
            let lse = max + row.iter().map(|&x| (x as f64 - max).exp()).sum::<f64>().ln();
            lse - row[target as usize] as f64
        })
        .sum()
}

/// One model's perplexity.
#[derive(Clone, Debug, PartialEq)]
pub struct Perplexity {
    /// The logits output used.
    pub logits: String,
    /// Tokens predicted: `S * (T - 1)`.
    pub predictions: usize,
    /// Mean next-token NLL, in nats.
    pub nll: f64,
    /// `exp(nll)`.
    pub perplexity: f64,
}

/// The integer input that carries the token ids: `input_ids`, else the only integer input that is
/// neither a mask nor positions.
fn ids_input(model: &Model) -> Result<String> {
    let specs = input_specs(model)?;
    if specs.iter().any(|s| s.name == "input_ids") {
        return Ok("input_ids".into());
    }
    let int = |e: i32| e == DataType::Int64 as i32 || e == DataType::Int32 as i32;
    let ids: Vec<&str> = specs
        .iter()
        .filter(|s| int(s.elem_type))
        .map(|s| s.name.as_str())
        .filter(|n| !n.to_lowercase().contains("mask") && !n.to_lowercase().contains("position"))
        .collect();
    match ids[..] {
        [one] => Ok(one.to_string()),
        _ => Err(Error::Usage(format!(
            "{}: --perplexity needs a model input named input_ids (the integer inputs are {ids:?})",
            model.path.display()
        ))),
    }
}

/// The inputs of one sequence: the ids, `*mask*` ones, `position*` `0..T`.
fn sequence_inputs(model: &Model, ids_name: &str, ids: &[i64]) -> Result<Vec<Input>> {
    let t = ids.len();
    input_specs(model)?
        .into_iter()
        .map(|s| {
            let shape: Vec<usize> = match s.dims.len() {
                1 => vec![t],
                2 => vec![1, t],
                r => {
                    return Err(Error::Usage(format!(
                        "{}: input '{}' has rank {r}; --perplexity feeds [batch, tokens] inputs",
                        model.path.display(),
                        s.name
                    )))
                }
            };
            let lower = s.name.to_lowercase();
            let values: Vec<i64> = if s.name == ids_name {
                ids.to_vec()
            } else if lower.contains("mask") {
                vec![1; t]
            } else if lower.contains("position") {
                (0..t as i64).collect()
            } else {
                return Err(Error::Usage(format!(
                    "{}: input '{}' is not input_ids, a mask or positions; --perplexity cannot fill it",
                    model.path.display(),
                    s.name
                )));
            };
            let data = match DataType::try_from(s.elem_type) {
                Ok(DataType::Int64) => InputData::I64(values),
                Ok(DataType::Int32) => InputData::I32(values.into_iter().map(|v| v as i32).collect()),
                Ok(DataType::Bool) => InputData::Bool(values.into_iter().map(|v| v != 0).collect()),
                Ok(DataType::Float) => InputData::F32(values.into_iter().map(|v| v as f32).collect()),
                _ => {
                    return Err(Error::Usage(format!(
                        "{}: input '{}' has element type {}; --perplexity feeds integer ids",
                        model.path.display(),
                        s.name,
                        crate::graph::model::dtype_name(s.elem_type)
                    )))
                }
            };
            Ok(Input { name: s.name, shape, data })
        })
        .collect()
}

/// Runs `model` (in a default session, [`SESSION`]) on every sequence of `tokens` and returns the
/// mean next-token NLL and perplexity. `logits` names the output; default: the first output whose
/// last dimension is the vocabulary (the embedding table's rows; without one, the first output of
/// shape `[1, T, V > 1]`).
///
/// Errors: the model cannot be opened or run, no logits output, a token id outside the vocabulary.
pub fn perplexity(model_path: &Path, tokens: &Tokens, logits: Option<&str>) -> Result<Perplexity> {
    perplexity_with(model_path, tokens, logits, None, 0)
}

/// The graph outputs that may be the logits: `logits` if given, else the float outputs declared of
/// rank 3 (or without a shape) whose last dimension is the vocabulary or not fixed; every output
/// when none is.
fn logits_candidates(model: &Model, logits: Option<&str>, vocab: Option<usize>) -> Result<Vec<String>> {
    use crate::graph::onnx::{tensor_shape_proto::dimension::Value, type_proto};
    let g = model.proto.graph.as_ref().expect("graph");
    let all: Vec<String> = g.output.iter().filter_map(|o| o.name.clone()).collect();
    if let Some(name) = logits {
        if !all.iter().any(|o| o == name) {
            return Err(Error::Usage(format!(
                "--logits {name}: {} has no such float output (it has {all:?})",
                model.path.display()
            )));
        }
        return Ok(vec![name.to_string()]);
    }
    let fits = |o: &&crate::graph::onnx::ValueInfoProto| {
        let Some(type_proto::Value::TensorType(t)) = o.r#type.as_ref().and_then(|t| t.value.as_ref()) else {
            return true;
        };
        let float = [DataType::Float, DataType::Float16, DataType::Bfloat16].map(|d| d as i32);
        let Some(shape) = &t.shape else { return t.elem_type.is_none_or(|e| float.contains(&e)) };
        let last = match shape.dim.last().and_then(|d| d.value.as_ref()) {
            Some(Value::DimValue(v)) => Some(*v as usize),
            _ => None,
        };
        t.elem_type.is_none_or(|e| float.contains(&e))
            && shape.dim.len() == 3
            && last.is_none_or(|l| vocab.is_none_or(|v| v == l) && l > 1)
    };
    let chosen: Vec<String> = g.output.iter().filter(fits).filter_map(|o| o.name.clone()).collect();
    Ok(if chosen.is_empty() { all } else { chosen })
}

/// [`perplexity`], run by the segments of `cut` (each in its own default session, the crossing
/// tensors of every sequence carried, up to `carry` bytes in memory and the rest spilled to a
/// temporary file; [`crate::calibrate::forward`]) when given: only the last segment computes the
/// logits, and each sequence's NLL is summed as soon as its logits are out, so no more than one
/// sequence's logits are held. A graph that does not match the cut runs whole, said on stderr.
pub fn perplexity_with(
    model_path: &Path,
    tokens: &Tokens,
    logits: Option<&str>,
    cut: Option<&crate::calibrate::forward::SegmentMap>,
    carry: u64,
) -> Result<Perplexity> {
    let model = Model::load(model_path)?;
    let ids_name = ids_input(&model)?;
    let vocab = vocabulary(&model, &ids_name);
    let outside = |v: usize| tokens.ids.iter().copied().find(|&id| id as usize >= v);
    if let Some(bad) = vocab.and_then(outside) {
        return Err(Error::Usage(format!(
            "--perplexity: token id {bad} is outside the vocabulary of {} of {}; give token ids of the model's own tokenizer (its tokenizer.json, or --tokenizer FILE with --perplexity-text)",
            vocab.unwrap_or(0),
            model_path.display()
        )));
    }
    let t = tokens.length;
    // A decoder with a KV cache (or other inputs tied to the ids) is fed by the feed plan with an
    // empty past; a model with only ids/mask/positions as before.
    let plan = feed::plan(&model, &input_specs(&model)?, &std::collections::HashMap::new())?;
    let by_plan = plan.is_decoder()
        && plan.inputs.iter().all(|(s, f)| *f != Feed::Random && (*f != Feed::Tokens || s.name == ids_name));
    let inputs = tokens
        .ids
        .chunks_exact(t)
        .map(|seq| match by_plan {
            // No input is Random (checked above), so the filler is never called.
            true => {
                Ok(plan.sample(seq, |s| Input { name: s.name.clone(), shape: vec![0], data: InputData::I64(vec![]) }))
            }
            false => sequence_inputs(&model, &ids_name, seq),
        })
        .collect::<Result<Vec<_>>>()?;
    let (mut sum, mut chosen) = (0f64, None::<String>);
    let mut score = |seq: &[i64], outputs: Vec<NamedTensor>| -> Result<()> {
        let names: Vec<&str> = outputs.iter().map(|o| o.name.as_str()).collect();
        let out = match logits {
            Some(name) => outputs.iter().find(|o| o.name == name).ok_or_else(|| {
                Error::Usage(format!("--logits {name}: {} has no such float output (it has {names:?})", model_path.display()))
            })?,
            None => outputs
                .iter()
                .find(|o| match vocab {
                    Some(v) => o.shape.last() == Some(&v),
                    None => o.shape.len() == 3 && o.shape[..2] == [1, t] && o.shape[2] > 1,
                })
                .ok_or_else(|| {
                    Error::Usage(format!(
                        "{}: no output of shape [1, {t}, vocabulary{}] (outputs {names:?}); name the logits with --logits",
                        model_path.display(),
                        vocab.map_or(String::new(), |v| format!(" = {v}"))
                    ))
                })?,
        };
        let v = *out.shape.last().unwrap_or(&0);
        if v < 2 || out.data.len() != t * v {
            return Err(Error::Usage(format!(
                "{}: output '{}' has shape {:?} for {t} tokens; --perplexity needs logits [1, {t}, vocabulary]",
                model_path.display(),
                out.name,
                out.shape
            )));
        }
        if let Some(&bad) = seq.iter().find(|&&id| id as usize >= v) {
            return Err(Error::Usage(format!(
                "--perplexity: token id {bad} is outside the vocabulary of {v} of {}",
                model_path.display()
            )));
        }
        sum += nll_sum(&out.data[..(t - 1) * v], v, &seq[1..]);
        chosen = Some(out.name.clone());
        Ok(())
    };
    let segmented = match cut {
        Some(map) => {
            let capture = Capture::new(&model)?;
            let outputs = logits_candidates(&model, logits, vocab)?;
            match Forward::segmented(&capture, &outputs, map) {
                Ok(forward) => {
                    let opts = SessionOptions { ort_defaults: true, ..Default::default() };
                    let seqs: Vec<&[i64]> = tokens.ids.chunks_exact(t).collect();
                    forward.run(&inputs, opts, carry, |_, s, outs| {
                        let outs = outs.into_iter().filter_map(|o| o.into_float().ok()).collect();
                        score(seqs[s], outs)
                    })?;
                    true
                }
                Err(why) => {
                    eprintln!(
                        "nibble: note: perplexity of {} runs whole, not by segments: {why}",
                        model_path.display()
                    );
                    false
                }
            }
        }
        None => false,
    };
    if !segmented {
        let env = environment(None)?;
        let err = |e: ort::Error| Error::Runtime(format!("{}: {e}", model_path.display()));
        let mut session =
            ort::session::Session::builder(env).map_err(err)?.commit_from_file(model_path).map_err(err)?;
        for (seq, inputs) in tokens.ids.chunks_exact(t).zip(&inputs) {
            score(seq, run(&mut session, inputs)?)?;
        }
    }
    let predictions = tokens.sequences * (t - 1);
    let nll = sum / predictions as f64;
    Ok(Perplexity { logits: chosen.unwrap_or_default(), predictions, nll, perplexity: nll.exp() })
}

/// A number as JSON (`null` when not finite).
pub fn json_number(v: f64) -> String {
    if v.is_finite() {
        v.to_string()
    } else {
        "null".into()
    }
}

/// `{"logits":..,"predictions":..,"nll":..,"perplexity":..}`.
pub fn json(p: &Perplexity) -> String {
    format!(
        "{{\"logits\":{:?},\"predictions\":{},\"nll\":{},\"perplexity\":{}}}",
        p.logits,
        p.predictions,
        json_number(p.nll),
        json_number(p.perplexity)
    )
}
