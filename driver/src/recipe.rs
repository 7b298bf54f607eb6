//! The defaults a user gets for what they leave unset, chosen from measurements (issue 22): the
//! method and its options under `--target-bits`, and the output form of an onnxruntime-genai folder.
//!
//! - `--target-bits B` without `--method`: with calibration data (a `.npz`/`.npy` file, text, or
//!   preloaded samples) `gptq --zero-point --act-order`, the best measured on both real LLMs of
//!   BENCHMARKS.md ("onnxruntime-genai folders", default ONNX Runtime session); without it (random
//!   inputs, or random token ids with `--calibration-random`) the best data-free choice,
//!   `rtn_dq --zero-point`, since GPTQ on random token ids was measured much worse than rounding
//!   ([`crate::calibrate::inputs::RANDOM_TOKENS_EFFECT`]). An explicit `--method` always wins and
//!   keeps its own options.
//! - An onnxruntime-genai folder (`genai_config.json`) without `--format`: `--format matmulnbits`
//!   with `accuracy_level` 4, as the builder writes its INT4 models (a tied head in the
//!   DequantizeLinear form decodes about 30x slower in onnxruntime-genai). A plain `.onnx` file and
//!   an Optimum folder keep ModelOpt's DequantizeLinear form.

use crate::calibrate::CalibrationOptions;
use crate::folder::{detect, Layout};
use crate::pipeline::{Format, Method, Options};
use std::path::Path;

/// What the user set explicitly (a `None`/`false` field is left to [`fill`]).
#[derive(Clone, Copy, Debug, Default)]
pub struct Given {
    /// `--method` was given.
    pub method: bool,
    /// `--format` was given.
    pub format: bool,
    /// `--accuracy-level` was given.
    pub accuracy_level: bool,
}

/// Whether the calibration options hold real data (a file, text tokens or preloaded samples),
/// not random inputs.
pub fn has_data(c: &CalibrationOptions) -> bool {
    c.data.is_some() || c.tokens.is_some() || c.inputs.is_some()
}

/// Fills in the options the user left unset (see the module docs) and returns one line per choice
/// made, saying what was chosen and why (empty when nothing was left to choose). `model` is the
/// input file or folder; a folder that is not a model folder is left for the pipeline to report.
pub fn fill(opts: &mut Options, model: &Path, given: Given) -> Vec<String> {
    let mut notes = Vec::new();
    if opts.target_bits.is_some() && !given.method {
        if has_data(&opts.awq.calibration) {
            opts.method = Method::Gptq;
            opts.zero_point = true;
            opts.gptq.act_order = true;
            notes.push(
                "--target-bits without --method: gptq --zero-point --act-order (the best measured on two real LLMs at the \
                 same size; give --method to choose another)"
                    .to_string(),
            );
        } else {
            opts.method = Method::RtnDq;
            opts.zero_point = true;
            notes.push(
                "--target-bits without --method and without calibration data: rtn_dq --zero-point, the best data-free \
                 choice measured (GPTQ on random inputs is much worse); give --calibration-text or --calibration-data \
                 for gptq --zero-point --act-order"
                    .to_string(),
            );
        }
    }
    if !given.format && model.is_dir() && detect(model).is_ok_and(|f| f.layout == Layout::Genai) {
        opts.format = Format::MatMulNBits;
        if !given.accuracy_level {
            opts.accuracy_level = 4;
        }
        notes.push(
            "onnxruntime-genai folder: --format matmulnbits (accuracy_level as given, else 4), as its builder writes \
             and decodes fast; give --format dq for ModelOpt's DequantizeLinear form"
                .to_string(),
        );
    }
    notes
}
