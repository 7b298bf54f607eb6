//! `nibble compare ORIGINAL QUANTIZED`: runs both models in ONNX Runtime on the same inputs and
//! reports, per graph output, the relative L2 error `||q - o|| / ||o||`, the largest absolute
//! difference, the cosine similarity, and (for outputs with a last axis wider than 1, such as
//! logits) how often the arg-max along the last axis agrees.
//!
//! The quantized model runs in a session with ONNX Runtime's defaults, as its users will run it:
//! DequantizeLinear(INT4) + MatMul is fused into MatMulNBits computing with int8 activations
//! (`session.qdq_matmulnbits_accuracy_level` 4), which can add much error on activations with
//! outlier channels. Where the weights alone (the same session at level 1, fp32 activations) give
//! an error more than 1% apart, that is reported too (`weight_only_relative_error`).
//!
//! Inputs: seeded random values for float inputs (normal) and integer inputs (ids in `0..10`),
//! symbolic dimensions set to 1 (the first) and 16 (the others).

use crate::calibrate::runtime::{Input, InputData, NamedTensor, SessionOptions};
use crate::error::{Error, Result};
use crate::graph::model::Model;
use crate::graph::onnx::{tensor_proto::DataType, tensor_shape_proto::dimension::Value, type_proto};
use crate::rng::Rng;
use std::path::Path;

/// Agreement of one output.
#[derive(Clone, Debug, PartialEq)]
pub struct OutputReport {
    /// Output name.
    pub name: String,
    /// `||q - o|| / ||o||`.
    pub relative_error: f64,
    /// `max |q - o|`.
    pub max_abs_error: f64,
    /// `q . o / (||q|| ||o||)`.
    pub cosine: f64,
    /// Fraction of rows whose arg-max along the last axis agrees (None for width-1 outputs).
    pub top1_agreement: Option<f64>,
    /// The relative error of the weights alone (fused MatMulNBits computing in fp32,
    /// `session.qdq_matmulnbits_accuracy_level=1`), when it differs by more than 1% from the
    /// default session's `relative_error`.
    pub weight_only_relative_error: Option<f64>,
}

/// Metrics of two equally shaped outputs.
pub fn metrics(name: &str, q: &NamedTensor, o: &NamedTensor) -> OutputReport {
    let (mut diff2, mut o2, mut q2, mut dot, mut maxabs) = (0f64, 0f64, 0f64, 0f64, 0f64);
    for (&a, &b) in q.data.iter().zip(&o.data) {
        let (a, b) = (a as f64, b as f64);
        diff2 += (a - b) * (a - b);
        o2 += b * b;
        q2 += a * a;
        dot += a * b;
        maxabs = maxabs.max((a - b).abs());
    }
    let width = *o.shape.last().unwrap_or(&1);
    let top1 = (width > 1 && !o.data.is_empty()).then(|| {
        let argmax = |v: &[f32]| {
            v.iter().enumerate().fold((0, f32::NEG_INFINITY), |m, (i, &x)| if x > m.1 { (i, x) } else { m }).0
        };
        let rows = o.data.len() / width;
        let same = q.data.chunks(width).zip(o.data.chunks(width)).filter(|(a, b)| argmax(a) == argmax(b)).count();
        same as f64 / rows as f64
    });
    OutputReport {
        name: name.to_string(),
        relative_error: if o2 > 0.0 { (diff2 / o2).sqrt() } else { diff2.sqrt() },
        max_abs_error: maxabs,
        cosine: if o2 > 0.0 && q2 > 0.0 { (dot / (o2.sqrt() * q2.sqrt())).clamp(-1.0, 1.0) } else { f64::NAN },
        top1_agreement: top1,
        weight_only_relative_error: None,
    }
}

/// Seeded inputs for every graph input of `model` (initializers excluded).
/// A decoder with a KV cache (or mask/positions tied to the ids) is fed by the feed plan
/// ([`crate::calibrate::feed`]): 16 seeded ids in `0..10`, empty past.
pub fn random_inputs(model: &Model, seed: u64) -> Result<Vec<Input>> {
    let specs = crate::calibrate::inputs::input_specs(model)?;
    let plan = crate::calibrate::feed::plan(model, &specs, &std::collections::HashMap::new())?;
    if plan.is_decoder() && plan.has_tokens() {
        let mut rng = Rng::new(seed);
        let ids: Vec<i64> = (0..16).map(|_| (rng.uniform() * 10.0) as i64).collect();
        let random = plan.inputs.iter().any(|(_, f)| *f == crate::calibrate::feed::Feed::Random);
        // random_plain gives every input a value (or fails), so the lookup always finds one.
        let fallback = if random { random_plain(model, seed)? } else { vec![] };
        return Ok(plan.sample(&ids, |s| {
            fallback.iter().find(|i| i.name == s.name).cloned().expect("every input has a random value")
        }));
    }
    random_plain(model, seed)
}

fn random_plain(model: &Model, seed: u64) -> Result<Vec<Input>> {
    let g = model.proto.graph.as_ref().expect("graph");
    let inits: std::collections::HashSet<&str> = g.initializer.iter().filter_map(|t| t.name.as_deref()).collect();
    let mut rng = Rng::new(seed);
    let mut out = Vec::new();
    for vi in g.input.iter().filter(|v| !inits.contains(v.name.as_deref().unwrap_or(""))) {
        let name = vi.name.clone().unwrap_or_default();
        let Some(type_proto::Value::TensorType(t)) = vi.r#type.as_ref().and_then(|t| t.value.as_ref()) else {
            return Err(Error::Usage(format!("input '{name}' is not a tensor; nibble compare needs tensor inputs")));
        };
        let shape: Vec<usize> = t
            .shape
            .as_ref()
            .map(|s| {
                s.dim
                    .iter()
                    .enumerate()
                    .map(|(i, d)| match d.value {
                        Some(Value::DimValue(v)) if v > 0 => v as usize,
                        _ if i == 0 => 1,
                        _ => 16,
                    })
                    .collect()
            })
            .unwrap_or_default();
        let n: usize = shape.iter().product();
        let data = match DataType::try_from(t.elem_type.unwrap_or(0)) {
            // bfloat16 inputs are fed as float32 to the model's float32 twin (crate::twin).
            Ok(DataType::Float | DataType::Bfloat16) => InputData::F32(rng.normals(n, 1.0)),
            Ok(DataType::Float16) => InputData::F16(rng.normals(n, 1.0).into_iter().map(half::f16::from_f32).collect()),
            Ok(DataType::Int64) => InputData::I64((0..n).map(|_| (rng.uniform() * 10.0) as i64).collect()),
            Ok(DataType::Int32) => InputData::I32((0..n).map(|_| (rng.uniform() * 10.0) as i32).collect()),
            _ => {
                return Err(Error::Usage(format!(
                "input '{name}' has element type {}; nibble compare feeds float32/16, bfloat16, int64 and int32 inputs",
                crate::graph::model::dtype_name(t.elem_type.unwrap_or(0))
            )))
            }
        };
        out.push(Input { name, shape, data });
    }
    Ok(out)
}

/// Runs both models on the same seeded inputs and compares every output.
pub fn compare(original: &Path, quantized: &Path, seed: u64) -> Result<Vec<OutputReport>> {
    let inputs = random_inputs(&Model::load(original)?, seed)?;
    compare_on(original, quantized, &[inputs])
}

/// Runs both models on every sample of a calibration file (see [`crate::calibrate::inputs`]) and
/// compares the outputs over all samples.
pub fn compare_with_data(original: &Path, quantized: &Path, data: &Path) -> Result<Vec<OutputReport>> {
    let opts = crate::calibrate::inputs::CalibrationOptions { data: Some(data.to_path_buf()), ..Default::default() };
    let samples = crate::calibrate::inputs::calibration_inputs(&Model::load(original)?, &opts)?;
    compare_on(original, quantized, &samples)
}

/// Runs both models on token sequences (each one sample, its other inputs filled by the feed
/// plan, [`crate::calibrate::feed`]) and compares the outputs over all of them.
pub fn compare_with_tokens(original: &Path, quantized: &Path, tokens: &[Vec<i64>]) -> Result<Vec<OutputReport>> {
    let opts = crate::calibrate::inputs::CalibrationOptions { tokens: Some(tokens.to_vec()), ..Default::default() };
    let samples = crate::calibrate::inputs::calibration_inputs(&Model::load(original)?, &opts)?;
    compare_on(original, quantized, &samples)
}

fn compare_on(
    original: &Path,
    quantized: &Path,
    samples: &[Vec<crate::calibrate::runtime::Input>],
) -> Result<Vec<OutputReport>> {
    let (om, qm) = (Model::load(original)?, Model::load(quantized)?);
    let names: Vec<String> =
        om.proto.graph.as_ref().expect("graph").output.iter().filter_map(|v| v.name.clone()).collect();
    let q_names: Vec<&str> =
        qm.proto.graph.as_ref().expect("graph").output.iter().filter_map(|v| v.name.as_deref()).collect();
    if let Some(missing) = names.iter().find(|n| !q_names.contains(&n.as_str())) {
        return Err(Error::Usage(format!(
            "output '{missing}' of {} is missing from {}",
            original.display(),
            quantized.display()
        )));
    }
    // Through Capture, so that bfloat16 models run as their float32 twins on a CPU. The quantized
    // model runs twice: in a session with ONNX Runtime's defaults (what a user gets), and with the
    // fused MatMulNBits computing in fp32 (the weights' own error).
    let defaults = SessionOptions { ort_defaults: true, ..Default::default() };
    let quantized_capture = crate::calibrate::capture::Capture::new(&qm)?;
    let runs = [
        crate::calibrate::capture::Capture::new(&om)?.run(&names, samples)?,
        quantized_capture.run_with(&names, samples, defaults)?,
        quantized_capture.run(&names, samples)?,
    ];
    let [o, q, weight_only] = runs.map(|per_sample| {
        let mut acc: Vec<NamedTensor> = Vec::new();
        for out in per_sample {
            if acc.is_empty() {
                acc = out;
            } else {
                for (t, more) in acc.iter_mut().zip(out) {
                    t.data.extend(more.data);
                }
            }
        }
        acc
    });
    o.iter()
        .map(|o| {
            let q = q.iter().find(|q| q.name == o.name).ok_or_else(|| {
                Error::Usage(format!(
                    "output '{}' of {} is missing from {}",
                    o.name,
                    original.display(),
                    quantized.display()
                ))
            })?;
            if q.shape != o.shape {
                return Err(Error::Usage(format!("output '{}' has shape {:?} vs {:?}", o.name, q.shape, o.shape)));
            }
            let mut r = metrics(&o.name, q, o);
            let w = weight_only.iter().find(|w| w.name == o.name).expect("same outputs");
            let wo = metrics(&o.name, w, o).relative_error;
            if (wo - r.relative_error).abs() > 0.01 * wo.max(r.relative_error) {
                r.weight_only_relative_error = Some(wo);
            }
            Ok(r)
        })
        .collect()
}

/// Relative error of one quantized layer's output.
#[derive(Clone, Debug, PartialEq)]
pub struct LayerReport {
    /// The node (in the quantized model).
    pub node: String,
    /// Its output tensor (the same name in both models).
    pub output: String,
    /// `||q - o|| / ||o||` over all samples.
    pub relative_error: f64,
}

/// The output of every MatMul/Gemm/MatMulNBits in `quantized` that reads a quantized weight, with
/// the node's name.
fn quantized_layers(quantized: &Model) -> Vec<(String, String)> {
    let g = quantized.proto.graph.as_ref().expect("graph");
    g.node
        .iter()
        .filter(|n| match n.op_type.as_deref() {
            Some("MatMulNBits") => true,
            Some("MatMul" | "Gemm") => n.input.get(1).is_some_and(|w| w.ends_with("_DequantizeLinear_Output")),
            _ => false,
        })
        .filter_map(|n| Some((n.name.clone().unwrap_or_default(), n.output.first()?.clone())))
        .collect()
}

/// Per-layer relative errors, worst first: both models run with the quantized layers' outputs
/// as extra graph outputs (names are kept by quantization, so they exist in both).
pub fn compare_layers(
    original: &Path,
    quantized: &Path,
    samples: &[Vec<crate::calibrate::runtime::Input>],
) -> Result<Vec<LayerReport>> {
    let (o_model, q_model) = (Model::load(original)?, Model::load(quantized)?);
    let layers = quantized_layers(&q_model);
    let names: Vec<String> = layers.iter().map(|(_, out)| out.clone()).collect();
    if names.is_empty() {
        return Ok(vec![]);
    }
    let o = crate::calibrate::capture::Capture::new(&o_model)?.run(&names, samples)?;
    let q = crate::calibrate::capture::Capture::new(&q_model)?.run(&names, samples)?;
    let mut reports: Vec<LayerReport> = layers
        .into_iter()
        .enumerate()
        .map(|(i, (node, output))| {
            let (mut diff2, mut o2) = (0f64, 0f64);
            for (os, qs) in o.iter().zip(&q) {
                for (&a, &b) in qs[i].data.iter().zip(&os[i].data) {
                    diff2 += (a as f64 - b as f64).powi(2);
                    o2 += (b as f64).powi(2);
                }
            }
            LayerReport { node, output, relative_error: if o2 > 0.0 { (diff2 / o2).sqrt() } else { diff2.sqrt() } }
        })
        .collect();
    reports.sort_by(|a, b| b.relative_error.total_cmp(&a.relative_error));
    Ok(reports)
}

/// The samples `compare` uses: every sample of a calibration file, or one seeded random sample.
pub fn samples(original: &Path, data: Option<&Path>, seed: u64) -> Result<Vec<Vec<crate::calibrate::runtime::Input>>> {
    let model = Model::load(original)?;
    match data {
        Some(d) => {
            let opts =
                crate::calibrate::inputs::CalibrationOptions { data: Some(d.to_path_buf()), ..Default::default() };
            crate::calibrate::inputs::calibration_inputs(&model, &opts)
        }
        None => Ok(vec![random_inputs(&model, seed)?]),
    }
}
