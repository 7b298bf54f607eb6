//! AWQ in the pipeline: calibrate, capture activations, search, and decide the pre-quant scales.
//!
//! For every quantized weight `W: [K, N]` fed by activation `a` (the MatMul/Gemm's first input):
//! - `awq_lite`: a scale `s[K]`; the weight is quantized as `W * s[:, None]` and the activation
//!   is divided by `s` (a Mul before the node, or folded into the node producing `a`);
//! - `awq_clip`: a clip ratio per (column, block), used when computing the block scales;
//! - `awq_full`: both: the clip search runs on `W * s[:, None]`.
//!
//! Weights that share one activation ("siblings", e.g. q/k/v projections) get the arithmetic mean
//! of their scales so that one division of `a` serves them all (`fuse`, on by default).
//! Activations are captured in waves whose size is bounded by a memory budget, so memory does not
//! grow with the model's depth.

use crate::calibrate::capture::Capture;
use crate::calibrate::inputs::{calibration_inputs, CalibrationOptions};
use crate::calibrate::runtime::{Input, NamedTensor};
use crate::calibrate::segmented::Segmented;
use crate::error::{Error, Result};
use crate::graph::floats::decode_floats;
use crate::graph::model::Model;
use crate::graph::read::{attr_int, constants};
use crate::plan::{Candidate, Decision};
use nibble::awq::{self, clip_search, lite_search_in, LiteScratch, LiteSearch, LossForm};
use nibble::{Bits, BlockSize, FloatFormat, QuantParams, QuantizedWeight, Tier};
use rayon::prelude::*;
use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;

/// Which AWQ variant.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AwqMethod {
    /// Scale search only.
    Lite,
    /// Clip search only.
    Clip,
    /// Scale search, then clip search on the scaled weight.
    Full,
}

/// AWQ settings (ModelOpt's kwargs).
#[derive(Clone, Debug)]
pub struct AwqOptions {
    /// The variant.
    pub method: AwqMethod,
    /// `awqlite_alpha_step`.
    pub alpha_step: f64,
    /// `awqclip_alpha_step`.
    pub clip_alpha_step: f64,
    /// `awqclip_alpha_min`.
    pub clip_alpha_min: f64,
    /// Mean scale for siblings and folding into the parent (`awqlite_fuse_nodes`).
    pub fuse: bool,
    /// Calibration inputs.
    pub calibration: CalibrationOptions,
    /// Bytes of activations held at once (per wave, all samples).
    pub memory_budget: usize,
    /// Calibrate by segments of about this many bytes of weights, one ONNX Runtime session each
    /// ([`crate::calibrate::segmented`]); `None`: each wave runs in a session of the whole graph
    /// up to its activations.
    pub segment_bytes: Option<u64>,
    /// `--segment-mb auto`: with no `segment_bytes`, calibrate by segments when the model is large
    /// against the memory available ([`crate::calibrate::memory::auto_segment_bytes`], resolved by
    /// the pipeline); `false`: the whole graph (`--segment-mb 0`).
    pub segment_auto: bool,
    /// Bytes of tensors carried between calibration steps (segments, `--sequential`) held in memory,
    /// all samples together; the rest is spilled to a temporary file ([`crate::calibrate::carry`]).
    pub carry_memory: u64,
    /// A shard (`--segments A..B`, [`crate::shard`]): search only the weights of segments `A..=B`
    /// (0-based, inclusive), run the waves of the segments before them forward only (the same
    /// sessions as a whole run, so the carried tensors are the same) and skip those after.
    pub segments: Option<(usize, usize)>,
    /// One scale per activation, searched on the siblings' combined loss (ModelOpt's
    /// `awqlite_run_per_subgraph`; awq_lite only).
    pub per_subgraph: bool,
    /// Print each node's choice.
    pub verbose: bool,
}

impl Default for AwqOptions {
    fn default() -> Self {
        AwqOptions {
            method: AwqMethod::Lite,
            alpha_step: 0.1,
            clip_alpha_step: 0.05,
            clip_alpha_min: 0.5,
            fuse: true,
            calibration: CalibrationOptions::default(),
            memory_budget: 1 << 30,
            segment_bytes: None,
            segment_auto: true,
            carry_memory: crate::calibrate::sequential::DEFAULT_CARRY_MEMORY,
            segments: None,
            per_subgraph: false,
            verbose: false,
        }
    }
}

/// The AWQ outcome for one weight.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct WeightAwq {
    /// Pre-quant scale `s[K]` (values of the weight format).
    pub scale: Option<Vec<f32>>,
    /// Clip ratio per block and column of the `[K, N]` view, `[nb][N]`.
    pub alphas: Option<Vec<f32>>,
    /// The float64 scale of a per-subgraph search (the weight is then scaled and quantized in
    /// float64, as ModelOpt does).
    pub scale64: Option<Vec<f64>>,
}

/// Weights sharing one activation.
#[derive(Clone, Debug, PartialEq)]
pub struct Group {
    /// The activation tensor.
    pub activation: String,
    /// The quantized weights it feeds (with AWQ).
    pub weights: Vec<String>,
    /// Their consuming nodes (indices into the top-level node list).
    pub nodes: Vec<usize>,
}

/// The outcome of the searches.
#[derive(Clone, Debug, Default)]
pub struct AwqResult {
    /// Per weight.
    pub weights: HashMap<String, WeightAwq>,
    /// Per activation, in graph order.
    pub groups: Vec<Group>,
    /// Weights quantized without AWQ, with the reason.
    pub plain: Vec<(String, String)>,
}

/// A planned weight's `[K, N]` values as f32 ([`weight_kn`]): the model's own bytes when the weight
/// is stored as f32 in that layout at an aligned address (no copy), else a decoded copy.
pub enum WeightKn {
    /// f32 little-endian bytes of the model (its mapping), 4-byte aligned.
    Mapped(bytes::Bytes),
    /// Decoded (f16/bf16), transposed (`transB=1`) or unaligned values.
    Decoded(Vec<f32>),
}

impl std::ops::Deref for WeightKn {
    type Target = [f32];
    fn deref(&self) -> &[f32] {
        match self {
            WeightKn::Mapped(b) => bytemuck::try_cast_slice(b).expect("checked when made"),
            WeightKn::Decoded(v) => v,
        }
    }
}

impl WeightKn {
    /// The values as an owned vector (a copy when mapped).
    pub fn into_vec(self) -> Vec<f32> {
        match self {
            WeightKn::Mapped(_) => self.to_vec(),
            WeightKn::Decoded(v) => v,
        }
    }
}

/// The `[K, N]` view of a planned weight as f32 values of its format.
pub fn weight_kn(model: &Model, c: &Candidate) -> Result<(WeightKn, [usize; 2])> {
    let format = c.format().expect("float weight");
    let bytes = c.data(model)?;
    let (r, cols) = (c.dims[0] as usize, c.dims[1] as usize);
    match c.decision {
        Decision::Quantize { axis: 1 } => {
            let v = decode_floats(format, &bytes);
            let mut t = vec![0.0f32; v.len()];
            for i in 0..r {
                for j in 0..cols {
                    t[j * r + i] = v[i * cols + j];
                }
            }
            Ok((WeightKn::Decoded(t), [cols, r]))
        }
        _ if format == FloatFormat::F32
            && cfg!(target_endian = "little")
            && bytemuck::try_cast_slice::<u8, f32>(&bytes).is_ok() =>
        {
            Ok((WeightKn::Mapped(bytes), [r, cols]))
        }
        _ => Ok((WeightKn::Decoded(decode_floats(format, &bytes)), [r, cols])),
    }
}

/// Groups the planned weights by activation; weights that cannot take AWQ go to `plain`.
pub(crate) fn groups(model: &Model, chosen: &[&Candidate]) -> (Vec<Group>, Vec<(String, String)>) {
    let g = model.proto.graph.as_ref().expect("graph");
    let consts = constants(model);
    let mut groups: Vec<Group> = Vec::new();
    let mut plain = Vec::new();
    for c in chosen.iter().filter(|c| c.op != "Gather") {
        // The quantized readers: AWQ scales the weight they alone read (others read the original).
        let uses: Vec<&crate::graph::readers::Use> = c.quantized_uses().collect();
        let users: Vec<usize> = uses.iter().map(|u| u.at.node).collect();
        let reason = if uses.iter().any(|u| !u.at.graph.is_empty()) {
            Some("read inside an If/Loop/Scan body, whose activations calibration cannot capture".to_string())
        } else if users.len() != 1 {
            Some(format!("used by {} nodes", users.len()))
        } else {
            let n = &g.node[users[0]];
            let act = n.input.first().cloned().unwrap_or_default();
            if n.op_type.as_deref() == Some("Gemm") && attr_int(n, "transA") == Some(1) {
                Some("Gemm with transA=1".to_string())
            } else if act.is_empty() || consts.contains_key(&act) {
                Some("its activation is a constant".to_string())
            } else {
                match groups.iter_mut().find(|gr| gr.activation == act) {
                    Some(gr) => {
                        gr.weights.push(c.base.clone());
                        gr.nodes.push(users[0]);
                    }
                    None => {
                        groups.push(Group { activation: act, weights: vec![c.base.clone()], nodes: vec![users[0]] })
                    }
                }
                None
            }
        };
        if let Some(r) = reason {
            plain.push((c.base.clone(), r));
        }
    }
    (groups, plain)
}

/// Tokens per sample, estimated from the inputs (for sizing the waves).
pub(crate) fn tokens_per_sample(sample: &[crate::calibrate::runtime::Input]) -> usize {
    use crate::calibrate::runtime::InputData;
    sample
        .iter()
        .map(|i| match i.data {
            InputData::F32(_) | InputData::F16(_) => i.shape[..i.shape.len().saturating_sub(1)].iter().product(),
            _ => i.shape.iter().product(),
        })
        .max()
        .unwrap_or(1)
        .max(1)
}

/// Cuts the groups (in graph order) into waves whose activations (`tokens` rows of K float32 per
/// group, all samples) fit in `budget` bytes; a group larger than the budget gets a wave alone.
pub(crate) fn plan_waves<'g>(
    groups: impl IntoIterator<Item = &'g Group>,
    tokens: usize,
    k_of: &dyn Fn(&Group) -> usize,
    budget: usize,
) -> Vec<Vec<&'g Group>> {
    let mut waves: Vec<Vec<&Group>> = vec![];
    let mut used = usize::MAX;
    for gr in groups {
        let bytes = tokens * k_of(gr) * 4;
        if used.saturating_add(bytes) > budget {
            waves.push(vec![]);
            used = 0;
        }
        waves.last_mut().expect("pushed").push(gr);
        used += bytes;
    }
    waves
}

/// How the activations of each wave are captured: in a session of the whole graph up to them, or
/// segment by segment.
pub(crate) enum Activations<'c> {
    /// [`Capture::run`] per wave.
    Whole(&'c Capture),
    /// [`Segmented::run`] per wave, with each wave's segment.
    Segments(Box<Segmented<'c>>, Vec<usize>),
}

/// What a calibration does with one wave ([`AwqOptions::segments`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Role {
    /// Capture and search (every wave without `segments`).
    Search,
    /// Capture only: a wave before the shard's segments, run for the tensors it carries on.
    Forward,
    /// Not run: after the shard's segments.
    Skip,
}

impl Activations<'_> {
    /// What to do with wave `i` in a shard of `segments` (a graph run whole is segment 0).
    pub(crate) fn role(&self, i: usize, segments: Option<(usize, usize)>) -> Role {
        let Some((first, last)) = segments else { return Role::Search };
        let s = match self {
            Activations::Whole(_) => 0,
            Activations::Segments(_, segment) => segment[i],
        };
        match s {
            s if s < first => Role::Forward,
            s if s > last => Role::Skip,
            _ => Role::Search,
        }
    }

    /// Captures wave `i`'s activations `names` on every sample.
    pub(crate) fn run(
        &mut self,
        i: usize,
        names: &[String],
        samples: &[Vec<Input>],
    ) -> Result<Vec<Vec<crate::calibrate::runtime::NamedTensor>>> {
        match self {
            Activations::Whole(capture) => capture.run(names, samples),
            Activations::Segments(s, segment) => s.run(segment[i], names, samples),
        }
    }
}

/// The waves of a calibration (activations of `tokens` rows of K float32 per group, all samples,
/// within `opts.memory_budget` bytes per wave) and how they are captured: with
/// `opts.segment_bytes`, the groups sorted by their activation's producer and each wave inside one
/// segment; the whole graph when it does not cut (said once, with the reason).
pub(crate) fn calibration_waves<'g, 'c>(
    capture: &'c Capture,
    groups: &'g [Group],
    samples: usize,
    tokens: usize,
    k_of: &dyn Fn(&Group) -> usize,
    opts: &AwqOptions,
) -> Result<(Vec<Vec<&'g Group>>, Activations<'c>)> {
    let whole = |why: Option<String>| {
        if let Some(why) = why {
            eprintln!("nibble: note: calibration runs the whole graph in one session: {why}");
        }
        (plan_waves(groups, tokens, k_of, opts.memory_budget), Activations::Whole(capture))
    };
    let Some(target) = opts.segment_bytes else { return Ok(whole(None)) };
    let names: Vec<String> = groups.iter().map(|g| g.activation.clone()).collect();
    let seg = match Segmented::new(capture, samples, &names, target)? {
        Ok(seg) => seg.with_carry_limit(opts.carry_memory),
        Err(why) => return Ok(whole(Some(why))),
    };
    let mut order: Vec<&Group> = groups.iter().collect();
    order.sort_by_key(|g| seg.producer(&g.activation));
    let (mut waves, mut segment_of) = (vec![], vec![]);
    let of = |g: &Group| seg.segments().of(seg.producer(&g.activation));
    for chunk in order.chunk_by(|a, b| of(a) == of(b)) {
        for wave in plan_waves(chunk.iter().copied(), tokens, k_of, opts.memory_budget) {
            segment_of.push(of(wave[0]));
            waves.push(wave);
        }
    }
    if opts.verbose {
        let s = seg.segments();
        eprintln!(
            "nibble: calibration in {} segments of about {} MB of weights (tensors crossing the cuts: {:?})",
            s.len(),
            target >> 20,
            s.crossing
        );
    }
    Ok((waves, Activations::Segments(Box::new(seg), segment_of)))
}

/// The K of a group's weights (rows of the `[K, N]` view).
pub(crate) fn group_k(by_name: &HashMap<&str, &Candidate>, gr: &Group) -> usize {
    let c = by_name[gr.weights[0].as_str()];
    match c.decision {
        Decision::Quantize { axis: 1 } => c.dims[1] as usize,
        _ => c.dims[0] as usize,
    }
}

/// A group's activation: every sample's rows `[T, K]` one after another (`tensors`: the group's
/// captured tensor of each sample, in sample order, freed as they are copied).
fn group_activation(tensors: Vec<NamedTensor>, gr: &Group, k: usize) -> Result<Vec<f32>> {
    let mut x: Vec<f32> = Vec::with_capacity(tensors.iter().map(|t| t.data.len()).sum());
    for t in tensors {
        if t.shape.last() != Some(&k) {
            return Err(Error::Runtime(format!(
                "activation '{}' has shape {:?}; its last dimension should be K = {k} of weight '{}'",
                gr.activation, t.shape, gr.weights[0]
            )));
        }
        x.extend_from_slice(&t.data);
    }
    Ok(x)
}

/// Every group's activation of a wave (`captured[sample][group]`), the groups in parallel.
fn group_activations(captured: Vec<Vec<NamedTensor>>, wave: &[&Group], ks: &[usize]) -> Vec<Result<Vec<f32>>> {
    let mut per_group: Vec<Vec<NamedTensor>> = wave.iter().map(|_| Vec::with_capacity(captured.len())).collect();
    for sample in captured {
        // The capture returns one tensor per requested name, that is per group (as the indexing
        // this replaced required).
        assert_eq!(sample.len(), per_group.len(), "one captured tensor per group of the wave");
        for (group, t) in per_group.iter_mut().zip(sample) {
            group.push(t);
        }
    }
    per_group.into_par_iter().zip(wave.par_iter().zip(ks)).map(|(ts, (gr, &k))| group_activation(ts, gr, k)).collect()
}

/// The activation `x` as weight `w` of `format` sees it: rounded to its dtype (float32: `x` itself).
fn rounded_activation<'x>(format: FloatFormat, x: &'x [f32], w: &str) -> Result<Cow<'x, [f32]>> {
    if format == FloatFormat::F32 {
        return Ok(Cow::Borrowed(x));
    }
    let mut v = x.to_vec();
    nibble::kernels::round_to_format(format, &mut v).map_err(|e| Error::kernel(w, e))?;
    Ok(Cow::Owned(v))
}

/// The AWQ-lite searches of a wave's weights, in the wave's order, up to the first group whose
/// activation is an error (`xs[g]` is group `g`'s activation).
///
/// Weights are searched as many at a time as rayon has threads, each with its alphas in parallel:
/// while one weight is in a serial part (its statistics, reference product or Gram matrix, its last
/// alpha), the other keeps the second core busy. Each thread (lane) takes the next weight when its
/// search ends, so at most one search per thread is in flight: besides the scratch buffers, the
/// memory is one weight's `[K, N]` view, rounded activation and reference `[T, N]` or Gram
/// matrix `[K, K]` per thread. Each search is the same computation as alone (results are
/// bit-identical whichever thread runs it).
#[allow(clippy::too_many_arguments)]
fn lite_searches(
    model: &Model,
    wave: &[&Group],
    xs: &[Result<Vec<f32>>],
    by_name: &HashMap<&str, &Candidate>,
    block: BlockSize,
    zero_point: bool,
    alphas: &[f64],
    scratch: &LiteScratch,
    tier: Tier,
) -> Vec<Result<LiteSearch>> {
    let tasks: Vec<(&[f32], &str)> = wave
        .iter()
        .zip(xs)
        .map_while(|(gr, x)| x.as_ref().ok().map(|x| (gr, x.as_slice())))
        .flat_map(|(gr, x)| gr.weights.iter().map(move |w| (x, w.as_str())))
        .collect();
    let search = |(x, w): (&[f32], &str)| -> Result<LiteSearch> {
        let c = by_name[w];
        let format = c.format().expect("float weight");
        let xq = rounded_activation(format, x, w)?;
        let (wkn, shape) = weight_kn(model, c)?;
        let params = QuantParams { block_size: c.block(block), axis: 0, zero_point, alpha: 1.0, bits: c.bits };
        lite_search_in(scratch, tier, format, &xq, &wkn, shape, &params, alphas, LossForm::Auto)
            .map_err(|e| Error::kernel(w, e))
    };
    // Largest weight first (every activation of a wave has the same tokens, so K x N orders the
    // multiply-adds), so that the last searches to end are small ones and neither thread waits long
    // for the other at the end. The stable sort keeps the wave's order between equal sizes.
    let mut order: Vec<usize> = (0..tasks.len()).collect();
    order.sort_by_key(|&i| {
        std::cmp::Reverse(by_name[tasks[i].1].dims.iter().map(|&d| d.max(1) as u128).product::<u128>())
    });
    let done: Vec<OnceLock<Result<LiteSearch>>> = tasks.iter().map(|_| OnceLock::new()).collect();
    let next = AtomicUsize::new(0);
    let lanes = rayon::current_num_threads().min(tasks.len());
    (0..lanes).into_par_iter().for_each(|_| {
        while let Some(&i) = order.get(next.fetch_add(1, Ordering::Relaxed)) {
            let _ = done[i].set(search(tasks[i]));
        }
    });
    done.into_iter().map(|r| r.into_inner().expect("every search ran")).collect()
}

/// Runs calibration and the searches for the planned weights.
pub fn search(
    model: &Model,
    chosen: &[&Candidate],
    block: BlockSize,
    zero_point: bool,
    opts: &AwqOptions,
) -> Result<AwqResult> {
    if opts.per_subgraph && opts.method != AwqMethod::Lite {
        return Err(Error::Usage("--per-subgraph works with --method awq_lite only (as in ModelOpt)".into()));
    }
    if opts.per_subgraph && chosen.iter().any(|c| c.bits == Bits::Eight) {
        return Err(Error::Usage(
            "--per-subgraph cannot be combined with INT8 layers (--int8-layers, --mixed-precision), as in ModelOpt"
                .into(),
        ));
    }
    let (groups, plain) = groups(model, chosen);
    let mut result = AwqResult { groups: groups.clone(), plain, ..Default::default() };
    if groups.is_empty() {
        return Ok(result);
    }
    let started = std::time::Instant::now();
    let samples = calibration_inputs(model, &opts.calibration)?;
    let capture = Capture::new(model)?;
    let mut calibration_time = started.elapsed();
    let by_name: HashMap<&str, &Candidate> =
        chosen.iter().filter(|c| c.op != "Gather").map(|c| (c.base.as_str(), *c)).collect();
    let k_of = |gr: &Group| group_k(&by_name, gr);
    let tokens = tokens_per_sample(&samples[0]) * samples.len();
    let (waves, mut activations) = calibration_waves(&capture, &groups, samples.len(), tokens, &k_of, opts)?;
    let progress = indicatif::ProgressBar::new(chosen.len() as u64).with_style(
        indicatif::ProgressStyle::with_template("{msg:>12} [{bar:30}] {pos}/{len} weights, {elapsed}")
            .expect("template"),
    );
    progress.set_message("AWQ search");
    let tier = Tier::best();
    let lite_alphas = awq::lite_alphas(opts.alpha_step);
    let clip_alphas = awq::clip_alphas(opts.clip_alpha_min, opts.clip_alpha_step);
    let lite_scratch = LiteScratch::default();
    for (i, wave) in waves.into_iter().enumerate() {
        let names: Vec<String> = wave.iter().map(|g| g.activation.clone()).collect();
        let wave_start = std::time::Instant::now();
        let role = activations.role(i, opts.segments);
        if role == Role::Skip {
            continue;
        }
        let captured = activations.run(i, &names, &samples)?;
        if role == Role::Forward {
            continue;
        }
        calibration_time += wave_start.elapsed();
        let ks: Vec<usize> = wave.iter().map(|gr| k_of(gr)).collect();
        let xs = group_activations(captured, &wave, &ks);
        let mut lite = if opts.method != AwqMethod::Clip && !opts.per_subgraph {
            lite_searches(model, &wave, &xs, &by_name, block, zero_point, &lite_alphas, &lite_scratch, tier)
        } else {
            vec![]
        }
        .into_iter();
        for (gr, x) in wave.iter().zip(xs) {
            let k = k_of(gr);
            let x = x?;
            if opts.per_subgraph {
                let format = by_name[gr.weights[0].as_str()].format().expect("float weight");
                let xq: Vec<f32> = x.iter().map(|&v| format.round(v)).collect();
                let views: Vec<(WeightKn, [usize; 2])> =
                    gr.weights.iter().map(|w| weight_kn(model, by_name[w.as_str()])).collect::<Result<_>>()?;
                let ws: Vec<(&[f32], usize)> = views.iter().map(|(v, s)| (&v[..], s[1])).collect();
                let params = QuantParams { block_size: block, axis: 0, zero_point, alpha: 1.0, bits: Bits::Four };
                debug_assert!(gr.weights.iter().all(|w| by_name[w.as_str()].bits == Bits::Four));
                let s = awq::subgraph_search(format, &xq, k, &ws, &params, &lite_alphas)
                    .map_err(|e| Error::kernel(&gr.weights[0], e))?;
                if opts.verbose {
                    say(
                        &progress,
                        format!(
                            "{}: awq_lite per subgraph alpha {:.2} (loss {:.4e})",
                            gr.activation, s.alphas[s.best], s.losses[s.best]
                        ),
                    );
                }
                let cast: Vec<f32> = s.best_scale.iter().map(|&v| format.constant(v)).collect();
                for w in &gr.weights {
                    let out =
                        WeightAwq { scale: Some(cast.clone()), alphas: None, scale64: Some(s.best_scale.clone()) };
                    result.weights.insert(w.clone(), out);
                    progress.inc(1);
                }
                continue;
            }
            let mut scales: Vec<Vec<f32>> = vec![];
            for w in &gr.weights {
                let c = by_name[w.as_str()];
                let format = c.format().expect("float weight");
                let params = QuantParams { block_size: c.block(block), axis: 0, zero_point, alpha: 1.0, bits: c.bits };
                let kernel_err = |e| Error::kernel(w, e);
                let mut out = WeightAwq::default();
                if opts.method != AwqMethod::Clip {
                    let s = lite.next().expect("one search per weight")?;
                    if opts.verbose {
                        say(
                            &progress,
                            format!(
                                "{w}: awq_lite alpha {:.2} (loss {:.4e}, alpha 0 {:.4e})",
                                s.alphas[s.best], s.losses[s.best], s.losses[0]
                            ),
                        );
                        if !s.skipped.is_empty() {
                            let list: Vec<String> = s.skipped.iter().map(|&i| format!("{:.2}", s.alphas[i])).collect();
                            say(
                                &progress,
                                format!(
                                    "{w}: awq_lite skipped alpha {} (w * s overflows {})",
                                    list.join(", "),
                                    format.name()
                                ),
                            );
                        }
                    }
                    scales.push(s.best_scale.clone());
                    out.scale = Some(s.best_scale);
                }
                if opts.method != AwqMethod::Lite {
                    let xq = rounded_activation(format, &x, w)?;
                    let (wkn, shape) = weight_kn(model, c)?;
                    let scaled = out.scale.as_ref().map(|s| awq::lite::scale_rows(format, &wkn, s, shape[1]));
                    let clip_input = scaled.as_deref().unwrap_or(&wkn);
                    let c =
                        clip_search(tier, format, &xq, clip_input, shape, &params, &clip_alphas).map_err(kernel_err)?;
                    if opts.verbose {
                        let mean =
                            c.best_alpha.iter().map(|&a| a as f64).sum::<f64>() / c.best_alpha.len().max(1) as f64;
                        say(&progress, format!("{w}: awq_clip mean clip ratio {mean:.3}"));
                    }
                    out.alphas = Some(c.best_alpha);
                }
                result.weights.insert(w.clone(), out);
                progress.inc(1);
            }
            if opts.fuse && opts.method != AwqMethod::Clip && gr.weights.len() > 1 {
                let format = by_name[gr.weights[0].as_str()].format().expect("float weight");
                let refs: Vec<&[f32]> = scales.iter().map(|v| v.as_slice()).collect();
                let mean = awq::mean_scales(format, &refs);
                // A sibling whose `w * mean` overflows its dtype (a float16 weight times a scale
                // another sibling chose) keeps the group unfused: each weight its own scale.
                let mut overflow = Vec::new();
                for w in &gr.weights {
                    let c = by_name[w.as_str()];
                    let f = c.format().expect("float weight");
                    if f != FloatFormat::F16 {
                        continue; // float32 and bfloat16 reach 3.4e38: only float16 overflows here
                    }
                    let (wkn, shape) = weight_kn(model, c)?;
                    if awq::lite::scale_rows(f, &wkn, &mean, shape[1]).iter().any(|v| !v.is_finite()) {
                        overflow.push(w.as_str());
                    }
                }
                if overflow.is_empty() {
                    for w in &gr.weights {
                        result.weights.get_mut(w).expect("searched").scale = Some(mean.clone());
                    }
                } else if opts.verbose {
                    say(
                        &progress,
                        format!(
                            "{}: siblings keep their own scales (the mean scale makes w * s overflow {} for {})",
                            gr.activation,
                            format.name(),
                            overflow.join(", ")
                        ),
                    );
                }
            }
        }
    }
    progress.finish_and_clear();
    if opts.verbose {
        let total = started.elapsed();
        eprintln!(
            "nibble: AWQ: calibration (ONNX Runtime, {} samples) {:.2} s, searches {:.2} s",
            samples.len(),
            calibration_time.as_secs_f64(),
            (total - calibration_time).as_secs_f64()
        );
    }
    Ok(result)
}

/// Quantizes a weight with its AWQ outcome: rows of the `[K, N]` view multiplied by the
/// pre-quant scale, and the clip ratios per block.
pub fn quantize_candidate_awq(
    model: &Model,
    c: &Candidate,
    block: BlockSize,
    zero_point: bool,
    awq: &WeightAwq,
) -> Result<QuantizedWeight> {
    let Decision::Quantize { axis } = c.decision else { unreachable!("only planned weights") };
    let format = c.format().expect("float weight");
    if let Some(s) = &awq.scale64 {
        return quantize_scaled_f64(model, c, block, zero_point, s, axis);
    }
    let shape = [c.dims[0] as usize, c.dims[1] as usize];
    let v = match (&awq.scale, axis) {
        // One pass from the model's values (f32: its mapping) to `rnd(w * s[k])`, row k scaled by s[k].
        (Some(s), 0) => {
            let (w, [_, n]) = weight_kn(model, c)?;
            let mut v = Vec::new();
            let _finite = nibble::awq::lite::scale_rows_into(format, &w, s, n, &mut v);
            v
        }
        // A transB=1 weight stored [N, K]: K runs along each row. Each product is rounded to the
        // format once, after the loop (the same value as rounding each).
        (Some(s), _) => {
            let mut v = decode_floats(format, &c.data(model)?);
            v.chunks_exact_mut(shape[1].max(1)).for_each(|row| row.iter_mut().zip(s).for_each(|(x, &sk)| *x *= sk));
            if format != FloatFormat::F32 {
                nibble::kernels::round_to_format(format, &mut v).map_err(|e| Error::kernel(&c.weight, e))?;
            }
            v
        }
        (None, _) => decode_floats(format, &c.data(model)?),
    };
    let params = QuantParams { block_size: c.block(block), axis, zero_point, alpha: 1.0, bits: c.bits };
    let data = super::OwnedWeight::new(format, v);
    nibble::quantize_weight::quantize_weight_alphas_with(
        nibble::Tier::best(),
        data.data(),
        shape,
        &params,
        awq.alphas.as_deref(),
    )
    .map_err(|e| Error::kernel(&c.weight, e))
}

/// A per-subgraph AWQ weight: `W * s` and its quantization in float64 (ModelOpt's promotion), the
/// scales cast to the weight dtype; back in the stored layout for `transB=1` weights.
fn quantize_scaled_f64(
    model: &Model,
    c: &Candidate,
    block: BlockSize,
    zero_point: bool,
    s: &[f64],
    axis: usize,
) -> Result<QuantizedWeight> {
    let format = c.format().expect("float weight");
    let (kn, [k, n]) = weight_kn(model, c)?;
    let scaled: Vec<f64> = kn.iter().enumerate().map(|(e, &v)| v as f64 * s[e / n]).collect();
    let params = QuantParams { block_size: c.block(block), axis: 0, zero_point, alpha: 1.0, bits: c.bits };
    let q = nibble::awq::subgraph::quantize_f64(format, &scaled, [k, n], &params);
    if axis == 0 {
        return Ok(q);
    }
    // Stored [N, K]: transpose codes, scales and zero points back.
    let codes: Vec<i8> = match c.bits {
        Bits::Four => {
            nibble::kernels::unpack_nibbles(&q.packed, k * n, false).map_err(|e| Error::kernel(&c.weight, e))?
        }
        Bits::Eight => q.packed.iter().map(|&b| b as i8).collect(),
    };
    let mut t = vec![0u8; k * n];
    for r in 0..k {
        for col in 0..n {
            t[col * k + r] = codes[r * n + col] as u8;
        }
    }
    let nb = q.scale_shape[0];
    let tr = |v: &[f32]| -> Vec<f32> { (0..n * nb).map(|e| v[(e % nb) * n + e / nb]).collect() };
    Ok(QuantizedWeight {
        packed: match c.bits {
            Bits::Four => nibble::reference::pack(&t),
            Bits::Eight => t,
        },
        scale: tr(&q.scale),
        scale_shape: [n, nb],
        zero_point: q.zero_point.map(|z| (0..n * nb).map(|e| z[(e % nb) * n + e / nb]).collect()),
        block: q.block,
    })
}

/// Prints a `-v` line above the progress bar (`ProgressBar::println` prints nothing when stderr is
/// not a terminal, which hid every `-v` line from logs and tests).
pub(crate) fn say(progress: &indicatif::ProgressBar, line: String) {
    progress.suspend(|| eprintln!("{line}"));
}
