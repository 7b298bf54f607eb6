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
//! Activations are captured from the float model (not the already-quantized one).

use crate::calibrate::capture::Capture;
use crate::calibrate::inputs::calibration_inputs;
use crate::calibrate::runtime::Input;
use crate::error::{Error, Result};
use crate::graph::model::Model;
use crate::methods::awq::{
    group_k, groups, plan_waves, say, tokens_per_sample, weight_kn, AwqOptions, AwqResult, Group,
};
use crate::plan::{Candidate, Decision};
use nibble::gptq::{gptq_quantize_factored, GptqFactor, GptqParams, Hessian, ScaleRule};
use nibble::scale_search::ScaleGrid;
use nibble::{BlockSize, QuantizedWeight};
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
}

impl Default for GptqOptions {
    fn default() -> Self {
        GptqOptions { percdamp: 0.01, lazy_batch: 128, act_order: false, scale_search: false }
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
            ScaleRule::Search { grid: ScaleGrid::default(), hessian_weighted: false }
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
    memory_budget: usize,
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
        memory_budget: cal.memory_budget,
        verbose: cal.verbose,
        plain,
    })
}

/// Quantizes every grouped weight with GPTQ (with `awq`'s pre-quant scales for awq_gptq), reading
/// the weights from `model` (where the scales may already be folded into producers).
pub fn quantize(
    cal: &Calibration,
    model: &Model,
    chosen: &[&Candidate],
    block: BlockSize,
    zero_point: bool,
    opts: &GptqOptions,
    awq: Option<&AwqResult>,
) -> Result<HashMap<String, QuantizedWeight>> {
    opts.check()?;
    let mut out = HashMap::new();
    if cal.groups.is_empty() {
        return Ok(out);
    }
    let started = std::time::Instant::now();
    let by_name: HashMap<&str, &Candidate> =
        chosen.iter().filter(|c| c.op != "Gather").map(|c| (c.base.as_str(), *c)).collect();
    let k_of = |gr: &Group| group_k(&by_name, gr);
    let tokens = tokens_per_sample(&cal.samples[0]) * cal.samples.len();
    let waves = plan_waves(&cal.groups, tokens, &k_of, cal.memory_budget);
    let progress = indicatif::ProgressBar::new(cal.groups.iter().map(|g| g.weights.len() as u64).sum()).with_style(
        indicatif::ProgressStyle::with_template("{msg:>12} [{bar:30}] {pos}/{len} weights, {elapsed}")
            .expect("template"),
    );
    progress.set_message("GPTQ");
    let mut calibration_time = std::time::Duration::ZERO;
    let mut hessian_time = std::time::Duration::ZERO;
    for wave in waves {
        let names: Vec<String> = wave.iter().map(|g| g.activation.clone()).collect();
        let t0 = std::time::Instant::now();
        let captured = cal.capture.run(&names, &cal.samples)?;
        calibration_time += t0.elapsed();
        for (gi, gr) in wave.iter().enumerate() {
            let t1 = std::time::Instant::now();
            let k = k_of(gr);
            let mut h = Hessian::new(k);
            for sample in &captured {
                let t = &sample[gi];
                if t.shape.last() != Some(&k) {
                    return Err(Error::Runtime(format!(
                        "activation '{}' has shape {:?}; its last dimension should be K = {k} of weight '{}'",
                        gr.activation, t.shape, gr.weights[0]
                    )));
                }
                h.add_batch(&t.data).map_err(|e| Error::kernel(&gr.weights[0], e))?;
            }
            hessian_time += t1.elapsed();
            // One factor per distinct pre-quant scale (siblings share one unless unfused).
            let mut factors: Vec<(Option<Vec<f32>>, GptqFactor)> = vec![];
            for w in &gr.weights {
                let c = by_name[w.as_str()];
                let s = awq.and_then(|a| a.weights.get(w)).and_then(|a| a.scale.clone());
                let fi = match factors.iter().position(|(fs, _)| *fs == s) {
                    Some(i) => i,
                    None => {
                        let hs = match &s {
                            Some(s) => {
                                let s64: Vec<f64> = s.iter().map(|&v| v as f64).collect();
                                h.scale_inputs(&s64).map_err(|e| Error::kernel(w, e))?
                            }
                            None => h.clone(),
                        };
                        let f = GptqFactor::new(&hs, opts.percdamp, opts.act_order).map_err(|e| Error::kernel(w, e))?;
                        factors.push((s.clone(), f));
                        factors.len() - 1
                    }
                };
                let q = quantize_weight(model, c, block, zero_point, opts, &factors[fi].1, s.as_deref())?;
                if cal.verbose {
                    let dead = factors[fi].1.dead.iter().filter(|&&d| d).count();
                    let pqs = if s.is_some() { " on W * s (awq_lite scale)" } else { "" };
                    say(
                        &progress,
                        format!("{w}: gptq K = {k}{pqs}, {} dead input channels, {:?} blocks", dead, c.block(block)),
                    );
                }
                out.insert(w.clone(), q);
                progress.inc(1);
            }
        }
    }
    progress.finish_and_clear();
    if cal.verbose {
        let total = started.elapsed();
        eprintln!(
            "nibble: GPTQ: calibration (ONNX Runtime, {} samples) {:.2} s, Hessians {:.2} s, factors and quantization {:.2} s",
            cal.samples.len(),
            calibration_time.as_secs_f64(),
            hessian_time.as_secs_f64(),
            (total - calibration_time - hessian_time).as_secs_f64()
        );
    }
    Ok(out)
}

/// GPTQ on one weight's `[K, N]` view (times the pre-quant scale `s`, rows, if given), in the
/// weight's dtype; a `transB=1` weight's result is returned in its stored (axis 1) layout.
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
    let (kn, [k, n]) = weight_kn(model, c)?;
    let kn = match s {
        Some(s) => nibble::awq::lite::scale_rows(format, &kn, s, n),
        None => kn,
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
    let q = gptq_quantize_factored(data.data(), factor, &params).map_err(|e| Error::kernel(&c.weight, e))?;
    match c.decision {
        Decision::Quantize { axis: 1 } => q.to_axis1(c.bits, [k, n]).map_err(|e| Error::kernel(&c.weight, e)),
        _ => Ok(q),
    }
}
