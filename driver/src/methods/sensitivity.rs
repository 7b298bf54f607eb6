//! Measured sensitivity of each planned weight to 4-bit and 8-bit quantization, for
//! `--target-bits` ([`crate::plan::budget`]).
//!
//! For a weight `W: [K, N]` (`y = x @ W`; a `transB=1` Gemm weight as its `[K, N]` view) whose
//! activation the calibration captures (inputs `X: [T, K]` over every calibration sample):
//! ```text
//! G    = X^T X                                   (the GPTQ Hessian up to 2 / T: nibble::gptq::Hessian)
//! e(b) = ||X (W - Q_b(W))||^2 / ||X W||^2 = tr(dW^T G dW) / tr(W^T G W),   dW = W - Q_b(W)
//! ```
//! the relative output error that quantizing this weight alone adds (HAWQ-V3's second-order
//! estimate, Yao et al. 2021, arXiv:2011.10680, with the layer's exact Gram matrix instead of a
//! Hessian trace). `Q_4` is round to nearest with the run's block size (and zero point if asked),
//! `Q_8` round to nearest with one block per output channel (what an INT8 layer is in both output
//! forms: DequantizeLinear with `axis`, and MatMulNBits `bits = 8` with one block per column).
//! Round to nearest is the estimate for every method: GPTQ and AWQ lower the 4-bit error of every
//! layer, so the ranking is what matters.
//!
//! A weight whose activation cannot be captured (read inside an If/Loop body, by several nodes, or
//! with a constant activation) is measured on the weight alone: `e(b) = ||dW||^2 / ||W||^2`, and
//! says so.
//!
//! Bytes are those the output form writes (codes, scales and zero points), as the caller counts
//! them ([`crate::emit::stored_bytes`]).

use crate::calibrate::capture::Capture;
use crate::calibrate::inputs::calibration_inputs;
use crate::error::{Error, Result};
use crate::graph::model::Model;
use crate::methods::awq::{calibration_waves, group_k, groups, tokens_per_sample, weight_kn, AwqOptions};
use crate::methods::gptq::group_hessian;
use crate::methods::OwnedWeight;
use crate::plan::budget::Sensitivity;
use crate::plan::Candidate;
use nibble::gptq::Hessian;
use nibble::{Bits, BlockSize, QuantParams};
use rayon::prelude::*;
use std::collections::HashMap;

/// `W - Q_b(W)` of the `[K, N]` view `w` (values of `format`), round to nearest along K.
fn rounding_error(
    c: &Candidate,
    w: &[f32],
    [k, n]: [usize; 2],
    bits: Bits,
    block: BlockSize,
    zero_point: bool,
) -> Result<Vec<f32>> {
    let format = c.format().expect("float weight");
    let owned = OwnedWeight::new(format, w.to_vec());
    let block_size = match bits {
        Bits::Four => block,
        Bits::Eight => BlockSize::PerChannel,
    };
    let params = QuantParams { block_size, axis: 0, zero_point, alpha: 1.0, bits };
    let q = nibble::quantize_weight(owned.data(), [k, n], &params).map_err(|e| Error::kernel(&c.weight, e))?;
    let dq = q.dequantize_axis0(format, bits, [k, n]).map_err(|e| Error::kernel(&c.weight, e))?;
    Ok(w.iter().zip(&dq).map(|(a, b)| a - b).collect())
}

/// The relative errors `(e4, e8)` of one weight, with the Gram matrix of its inputs (or, `None`,
/// on the weight alone).
fn errors(
    model: &Model,
    c: &Candidate,
    gram: Option<&Hessian>,
    block: BlockSize,
    zero_point: bool,
) -> Result<(f64, f64)> {
    let (w, kn) = weight_kn(model, c)?;
    let energy = |m: &[f32]| -> Result<f64> {
        match gram {
            Some(h) => h.output_energy(m).map_err(|e| Error::kernel(&c.weight, e)),
            None => Ok(m.iter().map(|&v| (v as f64) * (v as f64)).sum()),
        }
    };
    let total = energy(&w)?;
    let mut out = [0.0f64; 2];
    for (slot, bits) in out.iter_mut().zip([Bits::Four, Bits::Eight]) {
        let dw = rounding_error(c, &w, kn, bits, block, zero_point)?;
        let e = energy(&dw)?;
        *slot = if total > 0.0 { e / total } else { 0.0 };
    }
    Ok((out[0], out[1]))
}

/// Measures every chosen MatMul/Gemm weight: captures each activation on the calibration samples
/// of `cal` (in waves within its memory budget), accumulates its Gram matrix and computes `e4` and
/// `e8`; `bytes(c, bits)` counts what each choice writes. In the order of `chosen`.
///
/// # Errors
/// Calibration errors (inputs, ONNX Runtime), and kernel errors naming the weight (NaN or Inf).
pub fn measure(
    model: &Model,
    chosen: &[&Candidate],
    block: BlockSize,
    zero_point: bool,
    cal: &AwqOptions,
    bytes: &dyn Fn(&Candidate, Bits) -> u64,
) -> Result<Vec<Sensitivity>> {
    let (grouped, plain) = groups(model, chosen);
    let by_name: HashMap<&str, &Candidate> = chosen.iter().map(|c| (c.base.as_str(), *c)).collect();
    let mut errs: HashMap<String, (f64, f64)> = HashMap::new();
    if !grouped.is_empty() {
        let samples = calibration_inputs(model, &cal.calibration)?;
        let capture = Capture::new(model)?;
        let tokens = tokens_per_sample(&samples[0]) * samples.len();
        let k_of = |gr: &crate::methods::awq::Group| group_k(&by_name, gr);
        let (waves, mut activations) = calibration_waves(&capture, &grouped, samples.len(), tokens, &k_of, cal)?;
        for (i, wave) in waves.into_iter().enumerate() {
            let names: Vec<String> = wave.iter().map(|g| g.activation.clone()).collect();
            let captured = activations.run(i, &names, &samples)?;
            let done = wave
                .par_iter()
                .enumerate()
                .map(|(gi, gr)| -> Result<Vec<(String, (f64, f64))>> {
                    let h = group_hessian(gr, group_k(&by_name, gr), captured.iter().map(|s| &s[gi]))?;
                    gr.weights
                        .iter()
                        .map(|w| Ok((w.clone(), errors(model, by_name[w.as_str()], Some(&h), block, zero_point)?)))
                        .collect()
                })
                .collect::<Result<Vec<_>>>()?;
            errs.extend(done.into_iter().flatten());
        }
    }
    let why: HashMap<&str, &str> = plain.iter().map(|(w, r)| (w.as_str(), r.as_str())).collect();
    chosen
        .iter()
        .map(|c| {
            let (e, weight_only) = match errs.get(&c.base) {
                Some(&e) => (e, None),
                None => {
                    let reason = why.get(c.base.as_str()).copied().unwrap_or("no captured activation");
                    (errors(model, c, None, block, zero_point)?, Some(reason.to_string()))
                }
            };
            Ok(Sensitivity {
                weight: c.base.clone(),
                node: c.node.clone(),
                dims: [c.dims[0] as usize, c.dims[1] as usize],
                e4: e.0,
                e8: e.1,
                bytes4: bytes(c, Bits::Four),
                bytes8: bytes(c, Bits::Eight),
                weight_only,
            })
        })
        .collect()
}
