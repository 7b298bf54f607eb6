//! `nibble compare MODEL --methods M,... --block-sizes B,...`: quantizes MODEL (a model file, or
//! an onnxruntime-genai / Optimum folder, quantized as `nibble quantize` does it through
//! [`crate::folder::quantize_folder`]) with every method x block size, compares each result with
//! MODEL as `nibble compare` does (and, with perplexity tokens, measures its perplexity, see
//! [`super::perplexity`]), measures the `--reference` models the same way, and returns one row
//! per pair and per reference: bytes on disk, time to quantize, error, perplexity.
//!
//! The outputs go to `--output-dir` when given (kept: `METHOD_bBLOCK.onnx`, or a folder
//! `METHOD_bBLOCK` for a folder input), else to a temporary folder removed afterwards, one output
//! on disk at a time.

use super::compare::{compare, compare_with_data, OutputReport};
use super::perplexity::{perplexity, Perplexity, Tokens};
use super::plot::SizePoint;
use crate::calibrate::inputs::CalibrationOptions;
use crate::error::{Error, Result};
use crate::graph::model::Model;
use crate::pipeline::{quantize_file, Format, Method, Options};
use std::path::{Path, PathBuf};

/// A model measured beside the sweep (`--reference LABEL=PATH`), e.g. the folder
/// onnxruntime-genai's builder quantized.
#[derive(Clone, Debug)]
pub struct Reference {
    /// Its name in the table and on the chart.
    pub label: String,
    /// A model file or a model folder.
    pub path: PathBuf,
}

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
    /// Keep every output in this folder (created if missing; outputs already there are refused).
    pub output_dir: Option<PathBuf>,
    /// Models measured beside the sweep.
    pub references: Vec<Reference>,
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
    /// Bytes on disk of the quantized model (file and external data).
    pub bytes: u64,
    /// Wall time of the quantization, in seconds.
    pub seconds: f64,
    /// Weights quantized.
    pub quantized: usize,
    /// Compare report of every graph output (quantized vs float).
    pub outputs: Vec<OutputReport>,
    /// Perplexity of the quantized model.
    pub perplexity: Option<Perplexity>,
    /// Where the output was kept (`--output-dir`).
    pub kept: Option<PathBuf>,
}

/// A reference model, measured as the rows are.
#[derive(Clone, Debug)]
pub struct ReferenceRow {
    /// The reference.
    pub reference: Reference,
    /// Bytes on disk of its model file and external data.
    pub bytes: u64,
    /// Compare report of every graph output (reference vs float).
    pub outputs: Vec<OutputReport>,
    /// Its perplexity.
    pub perplexity: Option<Perplexity>,
}

/// The sweep's result.
#[derive(Clone, Debug)]
pub struct Sweep {
    /// Bytes of the float model (with its external data).
    pub float_bytes: u64,
    /// Perplexity of the float model.
    pub float_perplexity: Option<Perplexity>,
    /// The quantize options every row shares (`--format`, `--zero-point`), as [`options_label`].
    pub options: String,
    /// One row per method x block size, methods outer.
    pub rows: Vec<SweepRow>,
    /// One row per reference, in the order given.
    pub references: Vec<ReferenceRow>,
}

/// The quantize options a sweep shares, in the table's `options` column: the format, and `zp`
/// with zero points (e.g. `dq`, `matmulnbits,zp`).
pub fn options_label(o: &Options) -> String {
    let format = match o.format {
        Format::Dq => "dq",
        Format::MatMulNBits => "matmulnbits",
    };
    if o.zero_point {
        format!("{format},zp")
    } else {
        format.to_string()
    }
}

/// A method's command-line name (`rtn_dq`, `awq_clip`, ...).
pub fn method_name(m: Method) -> String {
    clap::ValueEnum::to_possible_value(&m).map_or_else(|| format!("{m:?}"), |v| v.get_name().to_string())
}

/// A row's output name: `METHOD_bBLOCK` (a folder for a folder input, else with `.onnx`).
fn output_name(method: Method, block_size: i64, folder: bool) -> String {
    let stem = format!("{}_b{block_size}", method_name(method));
    if folder {
        stem
    } else {
        format!("{stem}.onnx")
    }
}

/// Runs the sweep. Errors: no methods or block sizes, a reference label given twice or a
/// reference path that does not exist, an output already in `--output-dir`, any
/// quantize/compare/perplexity error (the temporary folder is removed in every case).
pub fn sweep(model: &Path, opts: &SweepOptions) -> Result<Sweep> {
    if opts.methods.is_empty() || opts.block_sizes.is_empty() {
        return Err(Error::Usage("--methods and --block-sizes each need at least one value".into()));
    }
    for (i, r) in opts.references.iter().enumerate() {
        if opts.references[..i].iter().any(|o| o.label == r.label) {
            return Err(Error::Usage(format!(
                "--reference: label '{}' is given twice; give each reference its own",
                r.label
            )));
        }
        if !r.path.exists() {
            return Err(Error::Usage(format!(
                "--reference {}={}: no such file or folder; give a model file or a model folder",
                r.label,
                r.path.display()
            )));
        }
    }
    let folder = model.is_dir();
    if let Some(dir) = &opts.output_dir {
        if dir.exists() && !dir.is_dir() {
            return Err(Error::Output { path: dir.clone(), why: "is a file; --output-dir takes a folder".into() });
        }
        if folder && inside(dir, model) {
            return Err(Error::Output {
                path: dir.clone(),
                why: "is inside the input folder, which nibble never modifies; choose a folder outside it".into(),
            });
        }
        for &method in &opts.methods {
            for &b in &opts.block_sizes {
                let out = dir.join(output_name(method, b, folder));
                if out.exists() {
                    return Err(Error::Output {
                        path: out,
                        why: "already exists; remove it or choose another --output-dir".into(),
                    });
                }
            }
        }
        std::fs::create_dir_all(dir).map_err(|cause| Error::Write { path: dir.clone(), cause })?;
        return sweep_in(model, opts, dir, true);
    }
    let dir = tempfile::Builder::new()
        .prefix(".nibble-sweep-")
        .tempdir()
        .map_err(|e| Error::Usage(format!("cannot create a temporary folder for the sweep: {e}")))?;
    crate::cleanup::register(dir.path());
    let result = sweep_in(model, opts, dir.path(), false);
    crate::cleanup::unregister(dir.path());
    drop(dir);
    result
}

/// Whether `path` (which may not exist yet) is `folder` or lies inside it, by canonical paths of
/// its nearest existing ancestor.
fn inside(path: &Path, folder: &Path) -> bool {
    let Ok(folder) = folder.canonicalize() else { return false };
    let mut rest = Vec::new();
    let mut at = path;
    loop {
        if let Ok(real) = at.canonicalize() {
            return rest.iter().rev().fold(real, |p: PathBuf, c| p.join(c)).starts_with(&folder);
        }
        match (at.file_name(), at.parent()) {
            (Some(name), Some(parent)) => {
                rest.push(name.to_os_string());
                at = if parent.as_os_str().is_empty() { Path::new(".") } else { parent };
            }
            _ => return false,
        }
    }
}

/// Errors and perplexity of the model at `path` (a file) against the float model `model`.
fn measure(model: &Path, path: &Path, opts: &SweepOptions) -> Result<(Vec<OutputReport>, Option<Perplexity>)> {
    let outputs = match &opts.calibration_data {
        Some(data) => compare_with_data(model, path, data)?,
        None => compare(model, path, opts.seed)?,
    };
    let perplexity = opts.tokens.as_ref().map(|t| perplexity(path, t, opts.logits.as_deref())).transpose()?;
    Ok((outputs, perplexity))
}

fn sweep_in(input: &Path, opts: &SweepOptions, dir: &Path, keep: bool) -> Result<Sweep> {
    let folder = input.is_dir();
    let model = crate::folder::model_file(input)?;
    let float_bytes = Model::load(&model)?.bytes_on_disk();
    let float_perplexity = opts.tokens.as_ref().map(|t| perplexity(&model, t, opts.logits.as_deref())).transpose()?;
    let mut rows = Vec::new();
    for &method in &opts.methods {
        for &block_size in &opts.block_sizes {
            let out = dir.join(output_name(method, block_size, folder));
            let mut o = opts.base.clone();
            o.method = method;
            o.block_size = block_size;
            o.force = !keep;
            if o.awq.calibration.data.is_none() {
                o.awq.calibration = CalibrationOptions { data: opts.calibration_data.clone(), ..o.awq.calibration };
            }
            let (s, quantized_file) = match folder {
                true => {
                    let f = crate::folder::quantize_folder(input, &out, &o)?;
                    let (file, s) = f.models.into_iter().next().expect("model_file found one decoder");
                    (s, out.join(file))
                }
                false => (quantize_file(&model, &out, &o)?, out.clone()),
            };
            let (outputs, perplexity) = measure(&model, &quantized_file, opts)?;
            rows.push(SweepRow {
                method,
                block_size,
                bytes: s.model_bytes_after,
                seconds: s.seconds,
                quantized: s.quantized,
                outputs,
                perplexity,
                kept: keep.then(|| out.clone()),
            });
            if !keep {
                // One output on disk at a time.
                match folder {
                    true => drop(std::fs::remove_dir_all(&out)),
                    false => {
                        let _ = std::fs::remove_file(&out);
                        let _ = std::fs::remove_file(crate::graph::model::external_data_path(&out));
                    }
                }
            }
        }
    }
    let mut references = Vec::new();
    for r in &opts.references {
        let file = crate::folder::model_file(&r.path)?;
        let bytes = Model::load(&file)?.bytes_on_disk();
        let (outputs, perplexity) = measure(&model, &file, opts)?;
        references.push(ReferenceRow { reference: r.clone(), bytes, outputs, perplexity });
    }
    Ok(Sweep { float_bytes, float_perplexity, options: options_label(&opts.base), rows, references })
}

/// The chart's points: every row (`METHOD bBLOCK`) and every reference (its label), with their
/// bytes and perplexity. Errors when the sweep measured no perplexity.
pub fn size_points(s: &Sweep) -> Result<Vec<SizePoint>> {
    let need = || Error::Usage("--plot draws perplexity: give --perplexity-text or --perplexity".into());
    let rows = s.rows.iter().map(|r| {
        let p = r.perplexity.as_ref().ok_or_else(need)?;
        Ok(SizePoint {
            label: format!("{} b{}", method_name(r.method), r.block_size),
            bytes: r.bytes,
            perplexity: p.perplexity,
            reference: false,
        })
    });
    let refs = s.references.iter().map(|r| {
        let p = r.perplexity.as_ref().ok_or_else(need)?;
        Ok(SizePoint { label: r.reference.label.clone(), bytes: r.bytes, perplexity: p.perplexity, reference: true })
    });
    rows.chain(refs).collect()
}

/// One line of the table.
#[allow(clippy::too_many_arguments)]
fn line(
    name: &str,
    block: &str,
    options: &str,
    bytes: u64,
    ratio: f64,
    seconds: Option<f64>,
    o: Option<&OutputReport>,
    p: Option<&Perplexity>,
) -> String {
    format!(
        "{:<14} {:>6} {:<16} {:>12} {:>7.3} {:>9} {:>11} {:>10} {:>7}{}\n",
        name,
        block,
        options,
        bytes,
        ratio,
        seconds.map_or("-".into(), |t| format!("{t:.2}")),
        o.map_or("-".into(), |o| format!("{:.3e}", o.relative_error)),
        o.map_or("-".into(), |o| format!("{:.6}", o.cosine)),
        o.and_then(|o| o.top1_agreement).map_or("-".into(), |v| format!("{:.1}%", v * 100.0)),
        p.map_or(String::new(), |p| format!(" {:>11.4}", p.perplexity))
    )
}

/// The table: the float model, one row per method x block size, one per reference; error
/// columns from the first graph output; then where the outputs and references are and the
/// session the perplexity was measured in.
pub fn table(s: &Sweep) -> String {
    let mut t = String::new();
    let first = s.rows.first().and_then(|r| r.outputs.first()).map_or("", |o| o.name.as_str());
    let ppl = s.float_perplexity.is_some();
    t += &format!(
        "{:<14} {:>6} {:<16} {:>12} {:>7} {:>9} {:>11} {:>10} {:>7}{}\n",
        "method",
        "block",
        "options",
        "bytes",
        "ratio",
        "time (s)",
        "rel. error",
        "cosine",
        "top-1",
        if ppl { format!(" {:>11}", "perplexity") } else { String::new() }
    );
    let ratio = |b: u64| b as f64 / s.float_bytes.max(1) as f64;
    if let Some(p) = &s.float_perplexity {
        t += &line("float", "-", "-", s.float_bytes, 1.0, None, None, Some(p));
    }
    for r in &s.rows {
        let block = r.block_size.to_string();
        let (o, p) = (r.outputs.first(), r.perplexity.as_ref());
        t += &line(&method_name(r.method), &block, &s.options, r.bytes, ratio(r.bytes), Some(r.seconds), o, p);
    }
    for r in &s.references {
        let (o, p) = (r.outputs.first(), r.perplexity.as_ref());
        t += &line(&r.reference.label, "-", "reference", r.bytes, ratio(r.bytes), None, o, p);
    }
    t += &format!(
        "bytes: model file and external data on disk; errors of output '{first}' (all outputs in --json), as `nibble compare` measures them{}\n",
        if ppl { format!("; perplexity: {}", super::perplexity::SESSION) } else { String::new() }
    );
    for r in &s.references {
        t += &format!("reference {}: {}\n", r.reference.label, r.reference.path.display());
    }
    if let Some(dir) = s.rows.first().and_then(|r| r.kept.as_ref()).and_then(|p| p.parent()) {
        t += &format!("outputs kept in {}\n", dir.display());
    }
    t
}

fn outputs_json(outputs: &[OutputReport]) -> String {
    use super::perplexity::json_number as n;
    let items: Vec<String> = outputs
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
    format!("[{}]", items.join(","))
}

/// The sweep as JSON.
pub fn json(s: &Sweep) -> String {
    use super::perplexity::{json as pj, json_number as n};
    let ratio = |b: u64| n(b as f64 / s.float_bytes.max(1) as f64);
    let rows: Vec<String> = s
        .rows
        .iter()
        .map(|r| {
            format!(
                "{{\"method\":{:?},\"block_size\":{},\"options\":{:?},\"bytes\":{},\"ratio\":{},\"seconds\":{},\"quantized\":{},\"outputs\":{},\"perplexity\":{},\"output_path\":{}}}",
                method_name(r.method),
                r.block_size,
                s.options,
                r.bytes,
                ratio(r.bytes),
                n(r.seconds),
                r.quantized,
                outputs_json(&r.outputs),
                r.perplexity.as_ref().map_or("null".into(), pj),
                r.kept.as_ref().map_or("null".into(), |p| format!("{:?}", p.display().to_string()))
            )
        })
        .collect();
    let refs: Vec<String> = s
        .references
        .iter()
        .map(|r| {
            format!(
                "{{\"label\":{:?},\"path\":{:?},\"bytes\":{},\"ratio\":{},\"outputs\":{},\"perplexity\":{}}}",
                r.reference.label,
                r.reference.path.display().to_string(),
                r.bytes,
                ratio(r.bytes),
                outputs_json(&r.outputs),
                r.perplexity.as_ref().map_or("null".into(), pj)
            )
        })
        .collect();
    format!(
        "{{\"float_bytes\":{},\"float_perplexity\":{},\"perplexity_session\":{:?},\"rows\":[{}],\"references\":[{}]}}",
        s.float_bytes,
        s.float_perplexity.as_ref().map_or("null".into(), pj),
        super::perplexity::SESSION,
        rows.join(","),
        refs.join(",")
    )
}
