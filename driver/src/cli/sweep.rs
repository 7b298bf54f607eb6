//! `nibble compare MODEL --methods M,... --block-sizes B,...`: quantizes MODEL with every method x
//! block size (through [`crate::pipeline::quantize_file`], into a temporary folder removed
//! afterwards, one output on disk at a time), compares each result with MODEL as `nibble compare`
//! does (and, with `--perplexity`, measures its perplexity, see [`super::perplexity`]), and
//! returns one row per pair: output size, time to quantize, error.

use super::compare::{compare, compare_with_data, OutputReport};
use super::perplexity::{perplexity, Perplexity, Tokens};
use crate::calibrate::inputs::CalibrationOptions;
use crate::error::{Error, Result};
use crate::pipeline::{quantize_file, Method, Options};
use std::path::{Path, PathBuf};

/// What to sweep.
#[derive(Clone, Debug)]
pub struct SweepOptions {
    /// Methods, in order.
    pub methods: Vec<Method>,
    /// Block sizes along K (-1: per channel), in order.
    pub block_sizes: Vec<i64>,
    /// Calibration file: the AWQ methods' calibration data and the compare inputs.
    pub calibration_data: Option<PathBuf>,
    /// Seed of the random compare inputs (without `calibration_data`).
    pub seed: u64,
    /// Token sequences for perplexity.
    pub tokens: Option<Tokens>,
    /// Name of the logits output (default: found as [`perplexity`] does).
    pub logits: Option<String>,
    /// Everything else of quantize (method and block size are overwritten per row).
    pub base: Options,
}

/// One method x block size.
#[derive(Clone, Debug)]
pub struct SweepRow {
    /// Method.
    pub method: Method,
    /// Block size.
    pub block_size: i64,
    /// Bytes of the quantized model (with its external data).
    pub bytes: u64,
    /// Wall time of `quantize_file`, in seconds.
    pub seconds: f64,
    /// Weights quantized.
    pub quantized: usize,
    /// Compare report of every graph output (quantized vs float).
    pub outputs: Vec<OutputReport>,
    /// Perplexity of the quantized model.
    pub perplexity: Option<Perplexity>,
}

/// The sweep's result.
#[derive(Clone, Debug)]
pub struct Sweep {
    /// Bytes of the float model (with its external data).
    pub float_bytes: u64,
    /// Perplexity of the float model.
    pub float_perplexity: Option<Perplexity>,
    /// One row per method x block size, methods outer.
    pub rows: Vec<SweepRow>,
}

/// A method's command-line name (`rtn_dq`, `awq_clip`, ...).
pub fn method_name(m: Method) -> String {
    clap::ValueEnum::to_possible_value(&m).map_or_else(|| format!("{m:?}"), |v| v.get_name().to_string())
}

/// Runs the sweep. Errors: no methods or block sizes, any quantize/compare error (the temporary
/// folder is removed in every case).
pub fn sweep(model: &Path, opts: &SweepOptions) -> Result<Sweep> {
    if opts.methods.is_empty() || opts.block_sizes.is_empty() {
        return Err(Error::Usage("--methods and --block-sizes each need at least one value".into()));
    }
    let dir = tempfile::Builder::new()
        .prefix(".nibble-sweep-")
        .tempdir()
        .map_err(|e| Error::Usage(format!("cannot create a temporary folder for the sweep: {e}")))?;
    crate::cleanup::register(dir.path());
    let result = sweep_in(model, opts, dir.path());
    crate::cleanup::unregister(dir.path());
    drop(dir);
    result
}

fn sweep_in(model: &Path, opts: &SweepOptions, dir: &Path) -> Result<Sweep> {
    let float_perplexity = opts.tokens.as_ref().map(|t| perplexity(model, t, opts.logits.as_deref())).transpose()?;
    let mut float_bytes = 0;
    let mut rows = Vec::new();
    for &method in &opts.methods {
        for &block_size in &opts.block_sizes {
            let out = dir.join(format!("{}_b{block_size}.onnx", method_name(method)));
            let mut o = opts.base.clone();
            o.method = method;
            o.block_size = block_size;
            o.force = true;
            if o.awq.calibration.data.is_none() {
                o.awq.calibration = CalibrationOptions { data: opts.calibration_data.clone(), ..o.awq.calibration };
            }
            let s = quantize_file(model, &out, &o)?;
            float_bytes = s.model_bytes_before;
            let outputs = match &opts.calibration_data {
                Some(data) => compare_with_data(model, &out, data)?,
                None => compare(model, &out, opts.seed)?,
            };
            let perplexity = opts.tokens.as_ref().map(|t| perplexity(&out, t, opts.logits.as_deref())).transpose()?;
            rows.push(SweepRow {
                method,
                block_size,
                bytes: s.model_bytes_after,
                seconds: s.seconds,
                quantized: s.quantized,
                outputs,
                perplexity,
            });
            // One output on disk at a time.
            let _ = std::fs::remove_file(&out);
            let _ = std::fs::remove_file(crate::graph::model::external_data_path(&out));
        }
    }
    Ok(Sweep { float_bytes, float_perplexity, rows })
}

/// The table: one row per method x block size; error columns from the first graph output.
pub fn table(s: &Sweep) -> String {
    let mut t = String::new();
    let first = s.rows.first().and_then(|r| r.outputs.first()).map_or("", |o| o.name.as_str());
    let ppl = s.float_perplexity.is_some();
    t += &format!(
        "{:<10} {:>6} {:>12} {:>7} {:>9} {:>11} {:>10} {:>7}{}\n",
        "method",
        "block",
        "bytes",
        "ratio",
        "time (s)",
        "rel. error",
        "cosine",
        "top-1",
        if ppl { format!(" {:>11}", "perplexity") } else { String::new() }
    );
    if let Some(p) = &s.float_perplexity {
        t += &format!(
            "{:<10} {:>6} {:>12} {:>7} {:>9} {:>11} {:>10} {:>7} {:>11.4}\n",
            "float", "-", s.float_bytes, "1.000", "-", "-", "-", "-", p.perplexity
        );
    }
    for r in &s.rows {
        let o = r.outputs.first();
        t += &format!(
            "{:<10} {:>6} {:>12} {:>7.3} {:>9.2} {:>11.3e} {:>10.6} {:>7}{}\n",
            method_name(r.method),
            r.block_size,
            r.bytes,
            r.bytes as f64 / s.float_bytes.max(1) as f64,
            r.seconds,
            o.map_or(f64::NAN, |o| o.relative_error),
            o.map_or(f64::NAN, |o| o.cosine),
            o.and_then(|o| o.top1_agreement).map_or("-".into(), |v| format!("{:.1}%", v * 100.0)),
            r.perplexity.as_ref().map_or(String::new(), |p| format!(" {:>11.4}", p.perplexity))
        );
    }
    t += &format!(
        "errors of output '{first}' (all outputs in --json), as `nibble compare` measures them{}\n",
        if ppl { format!("; perplexity: {}", super::perplexity::SESSION) } else { String::new() }
    );
    t
}

/// The sweep as JSON.
pub fn json(s: &Sweep) -> String {
    use super::perplexity::{json as pj, json_number as n};
    let rows: Vec<String> = s
        .rows
        .iter()
        .map(|r| {
            let outs: Vec<String> = r
                .outputs
                .iter()
                .map(|o| {
                    format!(
                        "{{\"output\":{:?},\"relative_error\":{},\"max_abs_error\":{},\"cosine\":{},\"top1_agreement\":{}}}",
                        o.name,
                        n(o.relative_error),
                        n(o.max_abs_error),
                        n(o.cosine),
                        o.top1_agreement.map_or("null".into(), n)
                    )
                })
                .collect();
            format!(
                "{{\"method\":{:?},\"block_size\":{},\"bytes\":{},\"ratio\":{},\"seconds\":{},\"quantized\":{},\"outputs\":[{}],\"perplexity\":{}}}",
                method_name(r.method),
                r.block_size,
                r.bytes,
                n(r.bytes as f64 / s.float_bytes.max(1) as f64),
                n(r.seconds),
                r.quantized,
                outs.join(","),
                r.perplexity.as_ref().map_or("null".into(), pj)
            )
        })
        .collect();
    format!(
        "{{\"float_bytes\":{},\"float_perplexity\":{},\"perplexity_session\":{:?},\"rows\":[{}]}}",
        s.float_bytes,
        s.float_perplexity.as_ref().map_or("null".into(), pj),
        super::perplexity::SESSION,
        rows.join(",")
    )
}
