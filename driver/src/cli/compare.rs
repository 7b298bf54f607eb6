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
//!
//! By segments (`--segment-mb`, [`RunOptions`]; issue 19): each model runs segment by segment
//! ([`crate::calibrate::forward`]), each segment in its own ONNX Runtime session holding only its
//! weights, so a model larger than memory can be compared. The original is cut as calibration cuts
//! it (at the inputs of the quantized MatMuls) and the quantized model at the same crossing tensors
//! (quantization keeps the activations' names); a graph that does not cut, or a quantized graph
//! that does not match the cut, runs whole, said once with the reason.

use crate::calibrate::capture::Capture;
use crate::calibrate::forward::Forward;
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

/// How `compare` runs the models: whole, or by segments (`--segment-mb`, `--carry-memory-mb`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RunOptions {
    /// Segments of at least this many bytes of weights; `None`: the whole graph, unless
    /// `segment_auto`.
    pub segment_bytes: Option<u64>,
    /// `--segment-mb auto`: segments when the original's weights are large against the memory
    /// available ([`crate::calibrate::memory::auto_segment_bytes`], quantize's rule).
    pub segment_auto: bool,
    /// Bytes of carried tensors (all samples) held in memory before they are spilled to a temporary
    /// file.
    pub carry_memory: u64,
}

impl Default for RunOptions {
    /// `--segment-mb auto --carry-memory-mb 1024`.
    fn default() -> RunOptions {
        RunOptions {
            segment_bytes: None,
            segment_auto: true,
            carry_memory: crate::calibrate::sequential::DEFAULT_CARRY_MEMORY,
        }
    }
}

impl RunOptions {
    /// `auto` resolved for the model at `original` (said once on stderr when it chooses segments):
    /// `segment_bytes` set or not, `segment_auto` false.
    pub fn resolved(&self, original: &Path) -> Result<RunOptions> {
        use crate::calibrate::memory::{auto_segment_bytes, available_memory, WHOLE_GRAPH_FACTOR};
        if !self.segment_auto || self.segment_bytes.is_some() {
            return Ok(RunOptions { segment_auto: false, ..self.clone() });
        }
        let model = Model::load(original)?;
        let g = model.proto.graph.as_ref().expect("graph");
        let weights: u64 = g.initializer.iter().map(|t| crate::graph::model::byte_size(t).unwrap_or(0) as u64).sum();
        let available = available_memory();
        let segment_bytes = auto_segment_bytes(weights, available);
        if let Some(target) = segment_bytes {
            eprintln!(
                "nibble: note: comparing by segments of about {} MB of weights (--segment-mb auto: {} MB of weights \
                 would need about {} MB run whole, more than half of the {} MB available; --segment-mb 0 forces \
                 the whole graph)",
                target >> 20,
                weights >> 20,
                (WHOLE_GRAPH_FACTOR * weights) >> 20,
                available.unwrap_or(0) >> 20
            );
        }
        Ok(RunOptions { segment_bytes, segment_auto: false, carry_memory: self.carry_memory })
    }
}

/// The inputs of the MatMul/Gemm/MatMulNBits nodes reading a quantized weight in `quantized`: the
/// activations calibration captures, named alike in the original.
fn quantized_activations(quantized: &crate::graph::onnx::GraphProto) -> Vec<String> {
    let mut acts: Vec<String> = vec![];
    for n in quantized.node.iter().filter(|n| quantized_layer(n)) {
        if let Some(a) = n.input.first().filter(|a| !acts.contains(a)) {
            acts.push(a.clone());
        }
    }
    acts
}

/// The cut both models run by: the original's segments of at least `target` bytes of weights,
/// between the first and the last quantized MatMul's input. `Err`: why the models run whole.
pub fn segment_map(
    original: &Model,
    quantized: &Model,
    target: u64,
) -> std::result::Result<crate::calibrate::forward::SegmentMap, String> {
    let acts = quantized_activations(quantized.proto.graph.as_ref().expect("graph"));
    if acts.is_empty() {
        return Err(format!("{} has no quantized MatMul to cut at", quantized.path.display()));
    }
    crate::calibrate::forward::SegmentMap::cut(original.proto.graph.as_ref().expect("graph"), &acts, target)
}

/// The forward pass of `capture` (the model at `path`) for `outputs`: by the segments of `map`, or
/// whole (without a map, or, said on stderr, when the graph does not match the cut).
fn forward<'c>(
    capture: &'c Capture,
    path: &Path,
    outputs: &[String],
    map: Option<&crate::calibrate::forward::SegmentMap>,
) -> Forward<'c> {
    let Some(map) = map else { return Forward::whole(capture, outputs) };
    match Forward::segmented(capture, outputs, map) {
        Ok(f) => f,
        Err(why) => {
            eprintln!("nibble: note: {} runs whole, not by segments: {why}", path.display());
            Forward::whole(capture, outputs)
        }
    }
}

/// The cut of `run` (resolved) for the two models, or `None` (whole: no cut asked for, or the graph
/// does not cut; [`cut_note`] says why).
fn cut_of(original: &Model, quantized: &Model, run: &RunOptions) -> Option<crate::calibrate::forward::SegmentMap> {
    segment_map(original, quantized, run.segment_bytes?).ok()
}

/// The line that says how `compare` runs the two models with `run` (resolved): by how many
/// segments, or whole and why; `None` when the whole graph was asked for.
pub fn cut_note(original: &Path, quantized: &Path, run: &RunOptions) -> Result<Option<String>> {
    let Some(target) = run.segment_bytes else { return Ok(None) };
    Ok(Some(match segment_map(&Model::load(original)?, &Model::load(quantized)?, target) {
        Ok(map) => format!(
            "comparing by {} segments of at least {} MB of weights (the original's cut; the quantized model cut at the \
             same tensors)",
            map.len(),
            target >> 20
        ),
        Err(why) => format!("{} runs whole, not by segments: {why}", original.display()),
    }))
}

/// Per sample, `forward`'s outputs in `names` order concatenated over the samples (the shape of
/// the first sample's), as float32.
fn gather(
    forward: &Forward,
    names: &[String],
    samples: &[Vec<Input>],
    opts: SessionOptions,
    carry: u64,
) -> Result<Vec<NamedTensor>> {
    let mut acc: Vec<Option<NamedTensor>> = vec![None; names.len()];
    forward.run(samples, opts, carry, |_, s, outs| {
        for t in outs {
            let t = t.into_float().map_err(|e| Error::Runtime(format!("sample {s}: {e}")))?;
            let i = names.iter().position(|n| *n == t.name).expect("an output asked for");
            match &mut acc[i] {
                Some(a) => a.data.extend(t.data),
                slot => *slot = Some(t),
            }
        }
        Ok(())
    })?;
    Ok(acc.into_iter().flatten().collect())
}

/// Runs both models on the same seeded inputs and compares every output.
pub fn compare(original: &Path, quantized: &Path, seed: u64) -> Result<Vec<OutputReport>> {
    let inputs = random_inputs(&Model::load(original)?, seed)?;
    compare_samples(original, quantized, &[inputs], &RunOptions::default())
}

/// Runs both models on every sample of a calibration file (see [`crate::calibrate::inputs`]) and
/// compares the outputs over all samples.
pub fn compare_with_data(original: &Path, quantized: &Path, data: &Path) -> Result<Vec<OutputReport>> {
    let opts = crate::calibrate::inputs::CalibrationOptions { data: Some(data.to_path_buf()), ..Default::default() };
    let samples = crate::calibrate::inputs::calibration_inputs(&Model::load(original)?, &opts)?;
    compare_samples(original, quantized, &samples, &RunOptions::default())
}

/// Runs both models on token sequences (each one sample, its other inputs filled by the feed
/// plan, [`crate::calibrate::feed`]) and compares the outputs over all of them.
pub fn compare_with_tokens(original: &Path, quantized: &Path, tokens: &[Vec<i64>]) -> Result<Vec<OutputReport>> {
    compare_samples(original, quantized, &token_samples(original, tokens)?, &RunOptions::default())
}

/// One sample per token sequence, its other inputs filled by the feed plan of the model at
/// `original` ([`crate::calibrate::feed`]).
pub fn token_samples(original: &Path, tokens: &[Vec<i64>]) -> Result<Vec<Vec<Input>>> {
    let opts = crate::calibrate::inputs::CalibrationOptions { tokens: Some(tokens.to_vec()), ..Default::default() };
    crate::calibrate::inputs::calibration_inputs(&Model::load(original)?, &opts)
}

/// Runs both models (whole or by segments, `run`) on `samples` and compares every output over all
/// of them.
pub fn compare_samples(
    original: &Path,
    quantized: &Path,
    samples: &[Vec<Input>],
    run: &RunOptions,
) -> Result<Vec<OutputReport>> {
    let run = run.resolved(original)?;
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
    let map = cut_of(&om, &qm, &run);
    let carry = run.carry_memory;
    let o = {
        let capture = Capture::new(&om)?;
        gather(&forward(&capture, original, &names, map.as_ref()), &names, samples, SessionOptions::default(), carry)?
    };
    let quantized_capture = Capture::new(&qm)?;
    let qf = forward(&quantized_capture, quantized, &names, map.as_ref());
    let q = gather(&qf, &names, samples, defaults, carry)?;
    let weight_only = gather(&qf, &names, samples, SessionOptions::default(), carry)?;
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

/// The perplexities ([`crate::cli::perplexity`]) of both models on `tokens`, whole or by the
/// original's cut (`run`, resolved; a graph that does not cut is run whole, said on stderr).
pub fn perplexities(
    original: &Path,
    quantized: &Path,
    tokens: &crate::cli::perplexity::Tokens,
    logits: Option<&str>,
    run: &RunOptions,
) -> Result<[crate::cli::perplexity::Perplexity; 2]> {
    use crate::cli::perplexity::perplexity_with;
    let run = run.resolved(original)?;
    let map = match run.segment_bytes {
        Some(_) => cut_of(&Model::load(original)?, &Model::load(quantized)?, &run),
        None => None,
    };
    Ok([
        perplexity_with(original, tokens, logits, map.as_ref(), run.carry_memory)?,
        perplexity_with(quantized, tokens, logits, map.as_ref(), run.carry_memory)?,
    ])
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
        .filter(|n| quantized_layer(n))
        .filter_map(|n| Some((n.name.clone().unwrap_or_default(), n.output.first()?.clone())))
        .collect()
}

/// Whether `n` is a MatMulNBits, or a MatMul/Gemm reading a DequantizeLinear output as its weight.
fn quantized_layer(n: &crate::graph::onnx::NodeProto) -> bool {
    match n.op_type.as_deref() {
        Some("MatMulNBits") => true,
        Some("MatMul" | "Gemm") => n.input.get(1).is_some_and(|w| w.ends_with("_DequantizeLinear_Output")),
        _ => false,
    }
}

/// Per-layer relative errors, worst first: both models run with the quantized layers' outputs
/// as extra graph outputs (names are kept by quantization, so they exist in both).
pub fn compare_layers(original: &Path, quantized: &Path, samples: &[Vec<Input>]) -> Result<Vec<LayerReport>> {
    compare_layers_with(original, quantized, samples, &RunOptions::default())
}

/// [`compare_layers`], whole or by segments (`run`): by segments both models advance one segment
/// at a time, so only one segment's layer outputs (all samples) are held at once.
pub fn compare_layers_with(
    original: &Path,
    quantized: &Path,
    samples: &[Vec<Input>],
    run: &RunOptions,
) -> Result<Vec<LayerReport>> {
    let run = run.resolved(original)?;
    let (o_model, q_model) = (Model::load(original)?, Model::load(quantized)?);
    let layers = quantized_layers(&q_model);
    let names: Vec<String> = layers.iter().map(|(_, out)| out.clone()).collect();
    if names.is_empty() {
        return Ok(vec![]);
    }
    let map = cut_of(&o_model, &q_model, &run);
    let (oc, qc) = (Capture::new(&o_model)?, Capture::new(&q_model)?);
    let (mut of, mut qf) =
        (forward(&oc, original, &names, map.as_ref()), forward(&qc, quantized, &names, map.as_ref()));
    if of.len() != qf.len() {
        // One of them did not match the cut (said above): both whole.
        (of, qf) = (Forward::whole(&oc, &names), Forward::whole(&qc, &names));
    }
    let opts = SessionOptions::default();
    let (mut o_run, mut q_run) =
        (of.start(samples.len(), opts, run.carry_memory), qf.start(samples.len(), opts, run.carry_memory));
    // Per layer: sum of (q - o)^2 and of o^2 over all samples.
    let mut sums = vec![(0f64, 0f64); names.len()];
    let mut held: std::collections::HashMap<(usize, String), Vec<f32>> = std::collections::HashMap::new();
    let float = |s: usize, t: Input| t.into_float().map_err(|e| Error::Runtime(format!("sample {s}: {e}")));
    loop {
        let more = o_run.next(samples, |_, s, outs| {
            for t in outs {
                let t = float(s, t)?;
                held.insert((s, t.name), t.data);
            }
            Ok(())
        })?;
        q_run.next(samples, |_, s, outs| {
            for t in outs {
                let t = float(s, t)?;
                let o = held.remove(&(s, t.name.clone())).ok_or_else(|| {
                    Error::Runtime(format!(
                        "sample {s}: layer output '{}' of {} was not produced",
                        t.name,
                        original.display()
                    ))
                })?;
                let i = names.iter().position(|n| *n == t.name).expect("a layer output");
                for (&a, &b) in t.data.iter().zip(&o) {
                    sums[i].0 += (a as f64 - b as f64).powi(2);
                    sums[i].1 += (b as f64).powi(2);
                }
            }
            Ok(())
        })?;
        if !more {
            break;
        }
    }
    let mut reports: Vec<LayerReport> = layers
        .into_iter()
        .zip(sums)
        .map(|((node, output), (diff2, o2))| LayerReport {
            node,
            output,
            relative_error: if o2 > 0.0 { (diff2 / o2).sqrt() } else { diff2.sqrt() },
        })
        .collect();
    reports.sort_by(|a, b| b.relative_error.total_cmp(&a.relative_error));
    Ok(reports)
}

/// The samples `compare` uses: every sample of a calibration file, or one seeded random sample.
pub fn samples(original: &Path, data: Option<&Path>, seed: u64) -> Result<Vec<Vec<Input>>> {
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
