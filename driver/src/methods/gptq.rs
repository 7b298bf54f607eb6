//! GPTQ in the pipeline (Frantar et al. 2022, "GPTQ: Accurate Post-Training Quantization for
//! Generative Pre-trained Transformers", arXiv:2210.17323), on the calibration waves of AWQ.
//!
//! For every activation `a` feeding quantized weights `W: [K, N]` (`y = a @ W`; a `transB=1` Gemm
//! weight is taken as its `[K, N]` view and written back as axis 1):
//! ```text
//! H = 2 X^T X / T     accumulated over the captured samples of every wave (X: [T, K], float32)
//! U = chol(H + percdamp * mean(diag H) * I)^-1         once per activation (shared by siblings)
//! Q = gptq(W, U)      per weight: column-by-column error feedback, static block scales
//! ```
//! `awq_gptq` first searches AWQ-lite's pre-quant scale `s[K]` (the awq_lite graph: `a / s`, a Mul
//! or folded into the producer), then quantizes `W * s` with the Hessian of `X / s`:
//! `H_s[i, j] = H[i, j] / (s_i s_j)`.
//!
//! Activations are captured from the float model, or with `--sequential` step by step from the
//! model whose earlier steps are already quantized ([`crate::calibrate::sequential`]).

use crate::calibrate::capture::Capture;
use crate::calibrate::inputs::calibration_inputs;
use crate::calibrate::runtime::Input;
use crate::calibrate::runtime::NamedTensor;
use crate::calibrate::sequential::Sequential;
use crate::error::{Error, Result};
use crate::graph::floats::{encode_floats, onnx_type};
use crate::graph::model::Model;
use crate::graph::onnx::GraphProto;
use crate::graph::read::ancestors;
use crate::methods::awq::{
    calibration_waves, group_k, groups, plan_waves, say, tokens_per_sample, weight_kn, AwqOptions, AwqResult, Group,
    Role,
};
use crate::methods::finished::Finished;
use crate::plan::{Candidate, Decision};
use nibble::gptq::{gptq_quantize_factored, GptqFactor, GptqParams, Hessian, ScaleRule};
use nibble::scale_search::ScaleGrid;
use nibble::FloatFormat;
use nibble::{BlockSize, QuantizedWeight};
use rayon::prelude::*;
use std::collections::HashMap;

/// GPTQ settings.
#[derive(Clone, Debug, PartialEq)]
pub struct GptqOptions {
    /// Dampening as a fraction of the mean Hessian diagonal (`--percdamp`, 0.01).
    pub percdamp: f64,
    /// Rows per lazy batch update (`--gptq-batch`, 128).
    pub lazy_batch: usize,
    /// Process input channels by decreasing Hessian diagonal (`--act-order`).
    pub act_order: bool,
    /// Block scales by the data-free search ([`nibble::scale_search`]) instead of ModelOpt's
    /// formula (`--scale-search`).
    pub scale_search: bool,
    /// The smallest clip ratio of the scale search (1: no clipping).
    pub scale_search_clip_min: f64,
    /// Capture each step's activations from the model holding the quantized values of every
    /// earlier step (`--sequential`) instead of from the float model.
    pub sequential: bool,
}

impl Default for GptqOptions {
    fn default() -> Self {
        GptqOptions {
            percdamp: 0.01,
            lazy_batch: 128,
            act_order: false,
            scale_search: false,
            scale_search_clip_min: 1.0,
            sequential: false,
        }
    }
}

impl GptqOptions {
    /// Refuses a negative or non-finite `percdamp` and a lazy batch of 0.
    pub fn check(&self) -> Result<()> {
        if !(self.percdamp.is_finite() && self.percdamp >= 0.0) {
            return Err(Error::Usage(format!(
                "--percdamp {}: use a non-negative fraction of the mean Hessian diagonal (default 0.01)",
                self.percdamp
            )));
        }
        if self.lazy_batch == 0 {
            return Err(Error::Usage("--gptq-batch 0: use at least 1 row per lazy batch (default 128)".into()));
        }
        Ok(())
    }

    /// The block scale rule.
    pub fn scale_rule(&self) -> ScaleRule {
        if self.scale_search {
            ScaleRule::Search { grid: ScaleGrid::clipped_to(self.scale_search_clip_min), hessian_weighted: false }
        } else {
            ScaleRule::Formula
        }
    }
}

/// The calibration of the float model, prepared before any pre-quant scale is folded into it.
pub struct Calibration {
    capture: Capture,
    samples: Vec<Vec<Input>>,
    groups: Vec<Group>,
    /// The calibration settings (memory budget, segments, verbosity).
    options: AwqOptions,
    verbose: bool,
    /// Weights quantized without GPTQ (round to nearest), with the reason.
    pub plain: Vec<(String, String)>,
}

/// Groups the planned weights by activation and prepares ONNX Runtime on the float model (with
/// AWQ's calibration inputs, memory budget and verbosity).
pub fn prepare(model: &Model, chosen: &[&Candidate], cal: &AwqOptions) -> Result<Calibration> {
    let (groups, mut plain) = groups(model, chosen);
    for c in chosen.iter().filter(|c| c.op == "Gather") {
        plain.push((c.base.clone(), "a Gather table (no activation)".into()));
    }
    let samples = if groups.is_empty() { vec![] } else { calibration_inputs(model, &cal.calibration)? };
    Ok(Calibration {
        capture: Capture::new(model)?,
        samples,
        groups,
        options: cal.clone(),
        verbose: cal.verbose,
        plain,
    })
}

/// Quantizes every grouped weight with GPTQ (with `awq`'s pre-quant scales for awq_gptq), reading
/// the weights from `model` (where the scales may already be folded into producers). The groups of
/// a wave are quantized in parallel; each finished weight is spilled at once to a temporary file
/// ([`Finished::spilled`]) and read back when the output form takes it. With `opts.sequential`, the
/// groups are captured step by step ([`sequential_steps`]), each from the model holding the
/// quantized values of every earlier step.
pub fn quantize(
    cal: &Calibration,
    model: &Model,
    chosen: &[&Candidate],
    block: BlockSize,
    zero_point: bool,
    opts: &GptqOptions,
    awq: Option<&AwqResult>,
) -> Result<Finished> {
    opts.check()?;
    if cal.groups.is_empty() {
        return Ok(Finished::in_memory());
    }
    // Every finished weight goes to a temporary file (packed, as stored) as soon as it is final,
    // whether the graph is calibrated whole or by segments: held until the output form asks for
    // it, it would grow with the model's depth (about half a byte per parameter at 4 bits).
    let mut out = Finished::spilled()?;
    let started = std::time::Instant::now();
    let by_name: HashMap<&str, &Candidate> =
        chosen.iter().filter(|c| c.op != "Gather").map(|c| (c.base.as_str(), *c)).collect();
    let k_of = |gr: &Group| group_k(&by_name, gr);
    let tokens = tokens_per_sample(&cal.samples[0]) * cal.samples.len();
    let base = cal.capture.base().graph.as_ref().expect("graph");
    let (waves, mut activations): (Vec<Vec<&Group>>, _) = match opts.sequential {
        true => (
            sequential_steps(base, &cal.groups)
                .into_iter()
                .flat_map(|step| plan_waves(step, tokens, &k_of, cal.options.memory_budget))
                .collect(),
            None,
        ),
        false => {
            let (waves, a) =
                calibration_waves(&cal.capture, &cal.groups, cal.samples.len(), tokens, &k_of, &cal.options)?;
            (waves, Some(a))
        }
    };
    let mut sequential = match opts.sequential {
        true => {
            let names: Vec<String> = cal.groups.iter().map(|g| g.activation.clone()).collect();
            Some(
                Sequential::new(&cal.capture, cal.samples.len())?
                    .only_for(&names)
                    .with_carry_limit(cal.options.carry_memory),
            )
        }
        false => None,
    };
    let progress = indicatif::ProgressBar::new(cal.groups.iter().map(|g| g.weights.len() as u64).sum()).with_style(
        indicatif::ProgressStyle::with_template("{msg:>12} [{bar:30}] {pos}/{len} weights, {elapsed}")
            .expect("template"),
    );
    progress.set_message("GPTQ");
    let mut calibration_time = std::time::Duration::ZERO;
    let mut hessian_time = std::time::Duration::ZERO;
    let mut factor_time = std::time::Duration::ZERO;
    let mut gptq_time = std::time::Duration::ZERO;
    let job = Job { model, by_name: &by_name, block, zero_point, opts, awq, verbose: cal.verbose, progress: &progress };
    for (i, wave) in waves.iter().enumerate() {
        let names: Vec<String> = wave.iter().map(|g| g.activation.clone()).collect();
        let t0 = std::time::Instant::now();
        let captured = match (&mut sequential, &mut activations) {
            (Some(seq), _) => seq.step(&names, &cal.samples).map_err(|e| {
                Error::Runtime(format!(
                    "{e} (sequential calibration; run without --sequential to calibrate on the float model)"
                ))
            })?,
            (None, Some(a)) => match a.role(i, cal.options.segments) {
                Role::Skip => continue,
                Role::Forward => {
                    a.run(i, &names, &cal.samples)?;
                    continue;
                }
                Role::Search => a.run(i, &names, &cal.samples)?,
            },
            (None, None) => unreachable!("one way of capturing"),
        };
        calibration_time += t0.elapsed();
        // The groups of a wave run in parallel, in batches whose working sets fit the memory
        // budget (a group larger than it runs alone).
        let mut done = Vec::with_capacity(wave.len());
        for batch in working_set_batches(wave, &|gr| working_set_bytes(&by_name, gr), cal.options.memory_budget) {
            done.extend(
                batch
                    .into_par_iter()
                    .map(|gi| job.group(wave[gi], captured.iter().map(|sample| &sample[gi])))
                    .collect::<Result<Vec<_>>>()?,
            );
        }
        drop(captured);
        for (gr, (weights, secs)) in wave.iter().zip(done) {
            hessian_time += secs[0];
            factor_time += secs[1];
            gptq_time += secs[2];
            for (j, (w, q, values)) in weights.into_iter().enumerate() {
                if let (Some(seq), Some(values)) = (&mut sequential, values) {
                    let c = by_name[w.as_str()];
                    let format = c.format().expect("float weight");
                    let dtype = cal.capture.weight_type(format);
                    let stored = if dtype == onnx_type(format) { format } else { FloatFormat::F32 };
                    let dims: Vec<usize> = c.dims.iter().map(|&d| d as usize).collect();
                    seq.replace(gr.nodes[j], 1, &dims, dtype, &encode_floats(stored, &values))?;
                }
                out.insert(w, q)?;
            }
        }
    }
    progress.finish_and_clear();
    if cal.verbose {
        let total = started.elapsed();
        let steps = match opts.sequential {
            true => format!(", {} sequential steps", waves.len()),
            false => String::new(),
        };
        eprintln!(
            "nibble: GPTQ: calibration (ONNX Runtime, {} samples{steps}) {:.2} s, Hessians {:.2} s, factors {:.2} s, \
             quantization {:.2} s (these three summed over the groups run at once), total {:.2} s",
            cal.samples.len(),
            calibration_time.as_secs_f64(),
            hessian_time.as_secs_f64(),
            factor_time.as_secs_f64(),
            gptq_time.as_secs_f64(),
            total.as_secs_f64()
        );
    }
    Ok(out)
}

/// The steps of sequential calibration: the groups in the order of their consumers in the graph,
/// cut so that no group depends (through the graph) on a weight of its own step. Within a
/// transformer layer this gives q/k/v, then o, then gate/up, then down (GPTQ's "true sequential").
pub fn sequential_steps<'g>(graph: &GraphProto, groups: &'g [Group]) -> Vec<Vec<&'g Group>> {
    let mut order: Vec<&Group> = groups.iter().collect();
    order.sort_by_key(|g| g.nodes.iter().min().copied().unwrap_or(usize::MAX));
    let mut steps: Vec<Vec<&Group>> = vec![];
    let mut consumers: Vec<usize> = vec![];
    for gr in order {
        let anc = ancestors(graph, [gr.activation.as_str()]);
        if steps.is_empty() || consumers.iter().any(|&n| anc[n]) {
            steps.push(vec![]);
            consumers.clear();
        }
        consumers.extend(&gr.nodes);
        steps.last_mut().expect("pushed").push(gr);
    }
    steps
}

/// A weight's name, its quantization in the stored layout, and (sequential calibration) the
/// values it holds in the quantized model, in the stored layout.
type Quantized = (String, QuantizedWeight, Option<Vec<f32>>);

/// What every group of a run shares.
struct Job<'a> {
    model: &'a Model,
    by_name: &'a HashMap<&'a str, &'a Candidate>,
    block: BlockSize,
    zero_point: bool,
    opts: &'a GptqOptions,
    awq: Option<&'a AwqResult>,
    verbose: bool,
    progress: &'a indicatif::ProgressBar,
}

impl Job<'_> {
    /// The Hessian of one activation (from every sample's captured tensor), its factors (one per
    /// distinct pre-quant scale) and GPTQ on each of its weights: the weights in the group's order,
    /// and the time spent on the Hessian, the factors and the quantization.
    fn group<'t>(
        &self,
        gr: &Group,
        captured: impl Iterator<Item = &'t NamedTensor>,
    ) -> Result<(Vec<Quantized>, [std::time::Duration; 3])> {
        let t1 = std::time::Instant::now();
        let k = group_k(self.by_name, gr);
        let h = group_hessian(gr, k, captured)?;
        let hessian_time = t1.elapsed();
        // One factor per distinct pre-quant scale (siblings share one unless unfused), made when
        // its first weight comes; the last one consumes the Hessian (no copy), and each is freed
        // after its last weight: at most two K x K float64 buffers per distinct scale alive.
        let scales: Vec<Option<Vec<f32>>> =
            gr.weights.iter().map(|w| self.awq.and_then(|a| a.weights.get(w)).and_then(|a| a.scale.clone())).collect();
        let mut distinct: Vec<&Option<Vec<f32>>> = vec![];
        for s in &scales {
            if !distinct.contains(&s) {
                distinct.push(s);
            }
        }
        let mut h = Some(h);
        let (mut factor_time, mut gptq_time) = (std::time::Duration::ZERO, std::time::Duration::ZERO);
        let mut factors: Vec<(Option<Vec<f32>>, Option<GptqFactor>)> = vec![];
        let mut out = vec![];
        for (wi, w) in gr.weights.iter().enumerate() {
            let c = self.by_name[w.as_str()];
            let s = scales[wi].clone();
            let fi = match factors.iter().position(|(fs, _)| *fs == s) {
                Some(i) => i,
                None => {
                    let last = factors.len() + 1 == distinct.len();
                    let h = match last {
                        true => h.take().expect("the Hessian is consumed by the last factor only"),
                        false => h.as_ref().expect("the Hessian is kept until the last factor").clone(),
                    };
                    let hs = match &s {
                        Some(s) => {
                            let s64: Vec<f64> = s.iter().map(|&v| v as f64).collect();
                            h.into_scaled_inputs(&s64).map_err(|e| Error::kernel(w, e))?
                        }
                        None => h,
                    };
                    let t = std::time::Instant::now();
                    let f = GptqFactor::from_hessian(hs, self.opts.percdamp, self.opts.act_order)
                        .map_err(|e| Error::kernel(w, e))?;
                    factor_time += t.elapsed();
                    factors.push((s.clone(), Some(f)));
                    factors.len() - 1
                }
            };
            let factor = factors[fi].1.as_ref().expect("a factor is freed after its last weight");
            let t = std::time::Instant::now();
            let kn = quantize_weight(self.model, c, self.block, self.zero_point, self.opts, factor, s.as_deref())?;
            gptq_time += t.elapsed();
            let values = match self.opts.sequential {
                true => Some(dequantized(c, &kn, s.as_deref())?),
                false => None,
            };
            let q = match c.decision {
                Decision::Quantize { axis: 1 } => kn
                    .to_axis1(c.bits, [c.dims[1] as usize, c.dims[0] as usize])
                    .map_err(|e| Error::kernel(&c.weight, e))?,
                _ => kn,
            };
            if self.verbose {
                let dead = factor.dead.iter().filter(|&&d| d).count();
                let pqs = if s.is_some() { " on W * s (awq_lite scale)" } else { "" };
                say(
                    self.progress,
                    format!("{w}: gptq K = {k}{pqs}, {} dead input channels, {:?} blocks", dead, c.block(self.block)),
                );
            }
            if !scales[wi + 1..].contains(&s) {
                factors[fi].1 = None;
            }
            out.push((w.clone(), q, values));
            self.progress.inc(1);
        }
        Ok((out, [hessian_time, factor_time, gptq_time]))
    }
}

/// The largest working memory of one group, in bytes, for `K` input channels and `N` the widest
/// weight's output channels: the Hessian's accumulator (`K^2` float64 sums and `K^2` float32
/// partial sums, 12 K^2), the factorization (two `K x K` float64 buffers at a time, 16 K^2:
/// [`GptqFactor::from_hessian`]), and the quantization (`U`, 8 K^2, with the weight widened to
/// float64 and read as float32, 12 K N).
pub(crate) fn working_set_bytes(by_name: &HashMap<&str, &Candidate>, gr: &Group) -> usize {
    let k = group_k(by_name, gr);
    let n = gr
        .weights
        .iter()
        .map(|w| by_name[w.as_str()].dims.iter().product::<i64>() as usize / k.max(1))
        .max()
        .unwrap_or(0);
    (16 * k * k).max(8 * k * k + 12 * k * n)
}

/// The groups of a wave (indices, in order) cut into consecutive batches run in parallel, each
/// summing to at most `budget` bytes of working memory (`bytes` of a group); a group larger than
/// the budget forms a batch of its own.
pub(crate) fn working_set_batches<G>(wave: &[G], bytes: &dyn Fn(&G) -> usize, budget: usize) -> Vec<Vec<usize>> {
    let mut batches: Vec<Vec<usize>> = vec![];
    let mut used = 0usize;
    for (i, g) in wave.iter().enumerate() {
        let b = bytes(g);
        match batches.last_mut() {
            Some(last) if used.saturating_add(b) <= budget => {
                last.push(i);
                used += b;
            }
            _ => {
                batches.push(vec![i]);
                used = b;
            }
        }
    }
    batches
}

/// The Gram matrix `X^T X` of one group's activation, `K` its weights' input channels, from every
/// sample's captured tensor (its last dimension must be `K`).
pub(crate) fn group_hessian<'t>(
    gr: &Group,
    k: usize,
    captured: impl Iterator<Item = &'t NamedTensor>,
) -> Result<Hessian> {
    let mut h = Hessian::new(k);
    for t in captured {
        if t.shape.last() != Some(&k) {
            return Err(Error::Runtime(format!(
                "activation '{}' has shape {:?}; its last dimension should be K = {k} of weight '{}'",
                gr.activation, t.shape, gr.weights[0]
            )));
        }
        h.add_batch(&t.data).map_err(|e| Error::kernel(&gr.weights[0], e))?;
    }
    Ok(h)
}

/// The values a quantized weight holds in the model, in the layout its consumer reads (the stored
/// layout), as the float graph without the pre-quant scale's `x / s` sees them: `dq(Q)[i, :] / s_i`
/// from the quantization `kn` of the `[K, N]` view.
fn dequantized(c: &Candidate, kn: &QuantizedWeight, s: Option<&[f32]>) -> Result<Vec<f32>> {
    let format = c.format().expect("float weight");
    let (r, cols) = (c.dims[0] as usize, c.dims[1] as usize);
    let axis1 = matches!(c.decision, Decision::Quantize { axis: 1 });
    let [k, n] = if axis1 { [cols, r] } else { [r, cols] };
    let mut v = kn.dequantize_axis0(format, c.bits, [k, n]).map_err(|e| Error::kernel(&c.weight, e))?;
    if let Some(s) = s {
        for (i, row) in v.chunks_mut(n).enumerate() {
            row.iter_mut().for_each(|x| *x /= s[i]);
        }
    }
    if axis1 {
        let mut t = vec![0.0f32; v.len()];
        for i in 0..k {
            for j in 0..n {
                t[j * k + i] = v[i * n + j];
            }
        }
        v = t;
    }
    Ok(v)
}

/// GPTQ on one weight's `[K, N]` view (times the pre-quant scale `s`, rows, if given), in the
/// weight's dtype; the result quantizes the `[K, N]` view along axis 0.
fn quantize_weight(
    model: &Model,
    c: &Candidate,
    block: BlockSize,
    zero_point: bool,
    opts: &GptqOptions,
    factor: &GptqFactor,
    s: Option<&[f32]>,
) -> Result<QuantizedWeight> {
    let format = c.format().expect("float weight");
    let (kn, [_, n]) = weight_kn(model, c)?;
    let kn = match s {
        Some(s) => nibble::awq::lite::scale_rows(format, &kn, s, n),
        None => kn.into_vec(),
    };
    let data = super::OwnedWeight::new(format, kn);
    let params = GptqParams {
        block_size: c.block(block),
        bits: c.bits,
        zero_point,
        percdamp: opts.percdamp,
        lazy_batch: opts.lazy_batch,
        act_order: opts.act_order,
        scale_rule: opts.scale_rule(),
        ..GptqParams::new(c.block(block))
    };
    gptq_quantize_factored(data.data(), factor, &params).map_err(|e| Error::kernel(&c.weight, e))
}

#[cfg(test)]
mod tests {
    use super::working_set_batches;

    /// Consecutive groups share a batch while their working sets fit the budget; a group larger
    /// than the budget runs alone; every group is in exactly one batch, in order.
    #[test]
    fn working_set_batches_fit_the_budget() {
        let bytes = |b: &usize| *b;
        assert_eq!(working_set_batches(&[3, 3, 3, 1], &bytes, 7), vec![vec![0, 1], vec![2, 3]]);
        assert_eq!(working_set_batches(&[2, 9, 2, 2], &bytes, 5), vec![vec![0], vec![1], vec![2, 3]]);
        assert_eq!(working_set_batches(&[1, 1, 1], &bytes, 100), vec![vec![0, 1, 2]]);
        assert_eq!(working_set_batches::<usize>(&[], &bytes, 100), Vec::<Vec<usize>>::new());
    }
}
