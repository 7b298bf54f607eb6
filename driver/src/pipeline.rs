//! The `quantize` pipeline, one stage after the other: load the model ([`crate::graph`]), plan which
//! weights to quantize and how ([`crate::plan`]), calibrate and search (AWQ methods:
//! [`crate::calibrate`], [`crate::methods::awq`]), quantize every chosen weight (in parallel across
//! weights, and across blocks inside each: [`crate::methods`]), write the output form
//! ([`crate::emit`]), raise the opset, save atomically.

use crate::emit::dq::Form;
use crate::emit::matmulnbits;
use crate::emit::pqs::{self, Insertions};
use crate::emit::Emitted;
use crate::error::{Error, Result};
use crate::graph::build::ModelNames;
use crate::graph::floats::decode_floats;
use crate::graph::model::{dtype_name, external_data_path, ExternalData, Model};
use crate::graph::onnx::TensorProto;
use crate::graph::opset;
use crate::graph::stream::{self, DataSink};
use crate::methods::awq::{AwqMethod, AwqOptions, AwqResult};
use crate::methods::finished::Finished;
use crate::methods::gptq::GptqOptions;
use crate::plan::budget::BudgetPlan;
use crate::plan::{compile_patterns, plan, Candidate, Decision};
use nibble::scale_search::ScaleGrid;
use nibble::{Bits, BlockSize, FloatFormat, QuantizedWeight};
use rayon::prelude::*;
use regex::Regex;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Quantization algorithm.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Method {
    /// Round to nearest, DequantizeLinear only (ModelOpt `rtn_dq`).
    #[value(name = "rtn_dq")]
    RtnDq,
    /// Round to nearest, QuantizeLinear -> DequantizeLinear on the float weight (ModelOpt `rtn`).
    #[value(name = "rtn")]
    Rtn,
    /// Activation-aware pre-quant scales, calibrated in ONNX Runtime (ModelOpt `awq_lite`).
    #[value(name = "awq_lite")]
    AwqLite,
    /// Activation-aware clip ratios per block (ModelOpt `awq_clip`).
    #[value(name = "awq_clip")]
    AwqClip,
    /// awq_lite, then awq_clip on the scaled weights (ModelOpt `awq_full`).
    #[value(name = "awq_full")]
    AwqFull,
    /// GPTQ (Frantar et al. 2022): error feedback through the inverse Hessian of the calibrated
    /// activations, static block scales.
    #[value(name = "gptq")]
    Gptq,
    /// awq_lite's pre-quant scales, then GPTQ on the scaled weights.
    #[value(name = "awq_gptq")]
    AwqGptq,
}

impl Method {
    /// The AWQ variant, for AWQ methods.
    pub fn awq(self) -> Option<AwqMethod> {
        match self {
            Method::RtnDq | Method::Rtn | Method::Gptq => None,
            Method::AwqLite | Method::AwqGptq => Some(AwqMethod::Lite),
            Method::AwqClip => Some(AwqMethod::Clip),
            Method::AwqFull => Some(AwqMethod::Full),
        }
    }

    /// Whether GPTQ quantizes the weights.
    pub fn gptq(self) -> bool {
        matches!(self, Method::Gptq | Method::AwqGptq)
    }
}

/// What `quantize` was asked to do.
#[derive(Clone, Debug)]
pub struct Options {
    /// The algorithm.
    pub method: Method,
    /// Block size along K; -1 for per-channel.
    pub block_size: i64,
    /// UINT4 with zero points.
    pub zero_point: bool,
    /// Node-name patterns to leave unquantized.
    pub exclude: Vec<String>,
    /// Where tensor data goes.
    pub external_data: ExternalData,
    /// File name of the external data, in the output's folder (default: `OUT.onnx_data`; folders
    /// use `OUT.onnx.data`, as onnxruntime-genai's model builder names it).
    pub external_data_name: Option<String>,
    /// Overwrite an existing output.
    pub force: bool,
    /// AWQ settings (AWQ methods only) and the calibration of every calibrated method.
    pub awq: AwqOptions,
    /// GPTQ settings (gptq, awq_gptq); its `scale_search` is set from [`Options::scale_search`].
    pub gptq: GptqOptions,
    /// Block scales by the data-free search (rtn_dq, rtn, gptq, awq_gptq).
    pub scale_search: bool,
    /// The smallest clip ratio of the scale search, in (0, 1]; 1 (the default) searches the two
    /// grids without clipping.
    pub scale_search_clip_min: f64,
    /// Leave weights holding NaN or Inf unquantized (with a warning) instead of failing.
    pub skip_nonfinite: bool,
    /// Output form.
    pub format: Format,
    /// MatMulNBits `accuracy_level` (0: unset, 1: fp32, 2: fp16, 3: bf16, 4: int8 activations).
    pub accuracy_level: i64,
    /// Quantize Gather (embedding) tables, blocked along this axis (ModelOpt's
    /// `gather_quantize_axis`; off by default).
    pub gather_axis: Option<usize>,
    /// Block size of the Gather tables (ModelOpt's `gather_block_size`).
    pub gather_block_size: i64,
    /// Node patterns kept at INT8 per channel (ModelOpt's `layers_8bit`; see [`crate::plan::mixed`]).
    pub int8_layers: Option<String>,
    /// ModelOpt's default INT8 layer choice (`enable_mixed_quant`), when `int8_layers` is unset.
    pub mixed_precision: bool,
    /// Flush the output to disk (fsync) before renaming it into place.
    pub fsync: bool,
    /// Mean bits per parameter over the quantized weights (codes, scales, zero points): 4 or 8
    /// bits per weight chosen by measured sensitivity ([`crate::plan::budget`]).
    pub target_bits: Option<f64>,
    /// Code width of the quantized LM head (a MatMul/Gemm named like `lm_head`, or one with tied
    /// embedding Gathers) and so of its tied embedding: 4 or 8 bits, blocked like every weight
    /// (see [`crate::plan::tied`]).
    pub head_bits: Bits,
    /// Hold every quantized weight in memory and write them all at the end instead of streaming
    /// them to the output as they are finished: the path before streaming, kept to prove that the
    /// streamed output is the same (memory grows with the model; the output does not change).
    pub in_memory: bool,
}

/// The operator the quantized weights feed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// INT4 initializers and DequantizeLinear (ModelOpt's form; opset 21).
    Dq,
    /// ONNX Runtime's com.microsoft MatMulNBits (fastest on ONNX Runtime CPUs).
    #[value(name = "matmulnbits")]
    MatMulNBits,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            method: Method::RtnDq,
            block_size: 128,
            zero_point: false,
            exclude: vec!["/lm_head".into()],
            external_data: ExternalData::Auto,
            external_data_name: None,
            force: false,
            awq: Default::default(),
            gptq: Default::default(),
            scale_search: false,
            scale_search_clip_min: 1.0,
            skip_nonfinite: false,
            format: Format::Dq,
            accuracy_level: 0,
            gather_axis: None,
            gather_block_size: 32,
            int8_layers: None,
            mixed_precision: false,
            fsync: false,
            target_bits: None,
            head_bits: Bits::Four,
            in_memory: false,
        }
    }
}

/// What `quantize` did.
#[derive(Clone, Debug)]
pub struct Summary {
    /// Weights quantized.
    pub quantized: usize,
    /// Of which kept at INT8.
    pub int8: usize,
    /// MatMul/Gemm weights found.
    pub candidates: usize,
    /// Bytes of the quantized weights before.
    pub weight_bytes_before: u64,
    /// Bytes of their replacements (codes, scales, zero points).
    pub weight_bytes_after: u64,
    /// Model + external data size of the input.
    pub model_bytes_before: u64,
    /// Bytes written.
    pub model_bytes_after: u64,
    /// Whether the opset was raised to 21.
    pub opset_raised: bool,
    /// Original float weights kept for readers that do not read the quantized form (excluded
    /// nodes, other operators, Gathers, graph outputs).
    pub float_copies: usize,
    /// Their bytes.
    pub float_copy_bytes: u64,
    /// Weights left float for a reason other than `--exclude`: `(weight, first reader, reason)`.
    pub skipped: Vec<(String, String, String)>,
    /// The `--target-bits` plan: what was measured and chosen.
    pub budget: Option<BudgetPlan>,
    /// Wall time.
    pub seconds: f64,
}

fn same_file(a: &Path, b: &Path) -> bool {
    match (a.canonicalize(), b.canonicalize()) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    }
}

/// The external data file of the output `out`: `opts.external_data_name` in `out`'s folder, or
/// `OUT.onnx_data`.
pub fn output_data_path(out: &Path, opts: &Options) -> PathBuf {
    match &opts.external_data_name {
        Some(name) => out.with_file_name(name),
        None => external_data_path(out),
    }
}

/// Refuses output paths that would overwrite the input or its data (`data`: the output's external
/// data file), or an existing file without `force`.
pub fn check_output(model: &Model, out: &Path, data: &Path, force: bool) -> Result<()> {
    let err = |why: String| Error::Output { path: out.to_path_buf(), why };
    let data = data.to_path_buf();
    if same_file(out, &model.path) || same_file(&data, &model.path) {
        return Err(err("is the input model; write the quantized model to another path".into()));
    }
    for ext in model.external_files() {
        if same_file(out, &ext) || same_file(&data, &ext) {
            return Err(err(format!(
                "(or its {}) is the input's external data file; choose another output name",
                data.display()
            )));
        }
    }
    if out.is_dir() {
        return Err(err("is a directory; give a file name such as model_int4.onnx".into()));
    }
    if out.exists() && !force {
        return Err(err("already exists; pass --force to overwrite it".into()));
    }
    match out.parent().filter(|p| !p.as_os_str().is_empty()) {
        Some(dir) if dir.exists() && !dir.is_dir() => Err(err(format!("{} is not a folder", dir.display()))),
        Some(dir) if !dir.is_dir() => Err(err(format!("folder {} does not exist", dir.display()))),
        _ => Ok(()),
    }
}

/// Marks weights holding NaN or Inf as skipped, with a warning naming each.
fn skip_nonfinite(model: &Model, candidates: &mut [Candidate]) -> Result<()> {
    for c in candidates.iter_mut().filter(|c| c.quantized()) {
        let Some(format) = c.format() else { continue };
        let bad = decode_floats(format, &c.data(model)?).iter().position(|v| !v.is_finite());
        if let Some(e) = bad {
            eprintln!(
                "nibble: warning: weight '{}' holds NaN or Inf (element {e}); left unquantized (--skip-nonfinite)",
                c.weight
            );
            c.decision = Decision::Skipped { reason: "holds NaN or Inf".into() };
        }
    }
    Ok(())
}

/// Quantizes the model at `input` into `output`: load -> plan -> calibrate and search (AWQ) ->
/// quantize -> emit -> save. Errors name the file, node or tensor; no output is left on error.
pub fn quantize_file(input: &Path, output: &Path, opts: &Options) -> Result<Summary> {
    write_model(input, output, opts, &mut search_weights)
}

/// The calibrate-and-search stage of a run: [`search_weights`] in a whole run; reading the shards'
/// results in `nibble merge` ([`crate::shard::merge`]).
pub(crate) type SearchStage<'s> =
    dyn FnMut(&mut Model, &[&Candidate], BlockSize, &Options, &mut ModelNames) -> Result<Searched> + 's;

/// [`quantize_file`] with the calibrate-and-search stage `search`: every other stage (plan,
/// quantize, emit, the streamed and atomic output) is the same.
pub(crate) fn write_model(
    input: &Path,
    output: &Path,
    opts: &Options,
    search: &mut SearchStage<'_>,
) -> Result<Summary> {
    let start = Instant::now();
    let block = BlockSize::from_i64(opts.block_size).map_err(|e| Error::Usage(format!("--block-size: {e}")))?;
    let patterns = compile_patterns(&opts.exclude)?;
    let mut model = Model::load(input)?;
    let opts = &auto_segments(opts, &model);
    let data_path = output_data_path(output, opts);
    check_output(&model, output, &data_path, opts.force)?;
    let model_bytes_before = model.bytes_on_disk();
    let (mut candidates, gather_block) = choose_weights(&model, &patterns, block, opts)?;
    check_method_options(opts)?;
    let budget = match opts.target_bits {
        Some(target) => Some(plan_budget(&model, &mut candidates, block, opts, target)?),
        None => None,
    };
    let chosen: Vec<&Candidate> = candidates.iter().filter(|c| c.quantized()).collect();
    let block_of = |c: &Candidate| if c.op == "Gather" { gather_block } else { c.block(block) };
    let opset_raised = !chosen.is_empty() && opts.format == Format::Dq && opset::check_upgrade(&model.proto)?;
    let mut names = ModelNames::of(model.proto.graph.as_ref().expect("graph"));
    let weights = weight_initializers(&model, &chosen);
    let searched = search(&mut model, &chosen, block, opts, &mut names)?;
    let weight_bytes_before = chosen.iter().map(|c| c.bytes as u64).sum();
    model.inline_external_data()?;
    // Streamed output: the tensors that stay as they are go first to the output's data file (copied
    // from the input's mapping by the writer thread while the weights are quantized), then each
    // quantized weight's tensors as soon as they are built.
    let mut sink = DataSink::create(&data_path)?;
    let root = model.proto.graph.as_ref().expect("graph");
    let unchanged = |i: usize| root.initializer[i].name.as_ref().is_some_and(|n| !weights.contains(n));
    stream::put_unchanged(&mut sink, root, &unchanged, opts.external_data)?;
    let reader = model.reader();
    let blocks = (block, &block_of as &(dyn Fn(&Candidate) -> BlockSize + Sync));
    let mut quantized = quantize_stream(&reader, &chosen, searched.gptq, searched.awq.as_ref(), blocks, opts);
    let emitted = if opts.in_memory {
        let all = quantized.by_ref().collect::<Result<Vec<_>>>()?;
        let mut keep = |_: &Candidate, _: &mut TensorProto| Ok(());
        let stages = (&mut all.into_iter().map(Ok) as crate::emit::Quantized<'_>, &mut keep as crate::emit::Store<'_>);
        emit(&mut model, &chosen, stages, &block_of, searched.insertions, opts, &mut names)?
    } else {
        let mut store = |c: &Candidate, t: &mut TensorProto| if c.place.is_empty() { sink.put(t) } else { Ok(()) };
        emit(&mut model, &chosen, (&mut quantized, &mut store), &block_of, searched.insertions, opts, &mut names)?
    };
    drop(quantized);
    drop(reader);
    let proto = std::mem::take(&mut model.proto);
    drop(model);
    let model_bytes_after = stream::finish(proto, sink, output, &data_path, opts.external_data, opts.fsync)?;
    Ok(Summary {
        quantized: chosen.len(),
        int8: chosen.iter().filter(|c| c.bits == Bits::Eight).count(),
        candidates: candidates.len(),
        weight_bytes_before,
        weight_bytes_after: emitted.bytes,
        model_bytes_before,
        model_bytes_after,
        opset_raised,
        float_copies: emitted.copies,
        float_copy_bytes: emitted.copy_bytes,
        skipped: candidates
            .iter()
            .filter_map(|c| match &c.decision {
                Decision::Skipped { reason } => Some((c.weight.clone(), c.node.clone(), reason.clone())),
                _ => None,
            })
            .collect(),
        budget,
        seconds: start.elapsed().as_secs_f64(),
    })
}

/// The names of the main graph's initializers that hold a weight to quantize (or the constant its
/// folded chain starts from): the ones emitting may replace, remove or keep beside a quantized form.
/// A candidate left float (excluded, like the LM head by default, or skipped) is not one of them:
/// emitting does not touch it, so it is written ahead with the other unchanged tensors.
fn weight_initializers(model: &Model, chosen: &[&Candidate]) -> std::collections::HashSet<String> {
    let root = model.proto.graph.as_ref().expect("graph");
    let source = |c: &Candidate| match c.source {
        crate::graph::read::Source::Initializer(i) if c.graph.is_empty() => root.initializer.get(i)?.name.clone(),
        _ => None,
    };
    chosen.iter().flat_map(|c| [Some(c.weight.clone()), source(c)]).flatten().collect()
}

/// `opts` with `--segment-mb auto` resolved for `model`: calibration (AWQ, GPTQ, `--target-bits`)
/// by segments when the model's weights are large against the memory available
/// ([`crate::calibrate::memory::auto_segment_bytes`]), said once on stderr; else unchanged.
fn auto_segments<'o>(opts: &'o Options, model: &Model) -> std::borrow::Cow<'o, Options> {
    use crate::calibrate::memory::{auto_segment_bytes, available_memory, WHOLE_GRAPH_FACTOR};
    let calibrates = opts.method.gptq() || opts.method.awq().is_some() || opts.target_bits.is_some();
    if !calibrates || !opts.awq.segment_auto || opts.awq.segment_bytes.is_some() {
        return std::borrow::Cow::Borrowed(opts);
    }
    let g = model.proto.graph.as_ref().expect("graph");
    let weights: u64 = g.initializer.iter().map(|t| crate::graph::model::byte_size(t).unwrap_or(0) as u64).sum();
    let available = available_memory();
    let Some(target) = auto_segment_bytes(weights, available) else { return std::borrow::Cow::Borrowed(opts) };
    eprintln!(
        "nibble: note: calibrating by segments of about {} MB of weights (--segment-mb auto: {} MB of weights \
         would need about {} MB calibrated whole, more than half of the {} MB available; --segment-mb 0 \
         forces the whole graph)",
        target >> 20,
        weights >> 20,
        (WHOLE_GRAPH_FACTOR * weights) >> 20,
        available.unwrap_or(0) >> 20
    );
    let mut opts = opts.clone();
    opts.awq.segment_bytes = Some(target);
    std::borrow::Cow::Owned(opts)
}

/// The `--target-bits` plan of the model at `input` without writing anything (`nibble inspect
/// --target-bits`): plan, measure, choose.
pub fn plan_target_bits(input: &Path, opts: &Options) -> Result<BudgetPlan> {
    let block = BlockSize::from_i64(opts.block_size).map_err(|e| Error::Usage(format!("--block-size: {e}")))?;
    let patterns = compile_patterns(&opts.exclude)?;
    let model = Model::load(input)?;
    let opts = &auto_segments(opts, &model);
    let (mut candidates, _) = choose_weights(&model, &patterns, block, opts)?;
    let target = opts.target_bits.ok_or_else(|| Error::Usage("give --target-bits".into()))?;
    plan_budget(&model, &mut candidates, block, opts, target)
}

/// The budget stage (`--target-bits`): measures every quantized weight's sensitivity on the
/// calibration data ([`crate::methods::sensitivity`]), chooses 4 or 8 bits per weight
/// ([`crate::plan::budget`]) and writes the choice into `candidates`.
fn plan_budget(
    model: &Model,
    candidates: &mut [Candidate],
    block: BlockSize,
    opts: &Options,
    target: f64,
) -> Result<BudgetPlan> {
    let refuse = |why: &str| Err(Error::Usage(format!("--target-bits {target}: {why}")));
    if opts.method == Method::Rtn {
        return refuse("--method rtn keeps each float weight next to its QuantizeLinear -> DequantizeLinear, so the file holds no 4- or 8-bit codes to budget; use --method rtn_dq (the same numbers, DequantizeLinear only)");
    }
    if opts.int8_layers.is_some() || opts.mixed_precision {
        return refuse("--int8-layers and --mixed-precision choose INT8 layers by name; --target-bits chooses them by measurement: give one of them");
    }
    if opts.gather_axis.is_some() {
        return refuse("--gather-axis: separate Gather (embedding) tables are not budgeted (they are written 4-bit only); leave --gather-axis out (a tied embedding is budgeted with its LM head under --no-default-exclude), or quantize the tables without --target-bits");
    }
    if opts.awq.per_subgraph {
        return refuse("--per-subgraph searches one scale for INT4 siblings only; leave it out with --target-bits");
    }
    let chosen: Vec<&Candidate> = candidates.iter().filter(|c| c.quantized()).collect();
    let nbits = opts.format == Format::MatMulNBits;
    let bytes = |c: &Candidate, bits: Bits| crate::emit::stored_bytes(c, bits, block, opts.zero_point, nbits);
    let measured = crate::methods::sensitivity::measure(model, &chosen, block, opts.zero_point, &opts.awq, &bytes)?;
    let plan = crate::plan::budget::choose(measured, target)?;
    crate::plan::budget::apply(&plan, candidates);
    Ok(plan)
}

/// Refuses option combinations the methods do not take.
pub(crate) fn check_method_options(opts: &Options) -> Result<()> {
    if opts.method.gptq() {
        opts.gptq.check()?;
    }
    if opts.scale_search && opts.method.awq().is_some() && !opts.method.gptq() {
        return Err(Error::Usage("--scale-search works with --method rtn_dq, rtn, gptq or awq_gptq".into()));
    }
    if opts.method == Method::AwqGptq && opts.awq.per_subgraph {
        return Err(Error::Usage("--per-subgraph works with --method awq_lite only (as in ModelOpt)".into()));
    }
    let r = opts.scale_search_clip_min;
    if !(r > 0.0 && r <= 1.0) {
        return Err(Error::Usage(format!("--scale-search-clip-min {r}: use a ratio in (0, 1]")));
    }
    if opts.gptq.sequential && !opts.method.gptq() {
        return Err(Error::Usage("--sequential works with --method gptq or awq_gptq".into()));
    }
    Ok(())
}

/// What the calibrate-and-search stage leaves for the quantize stage.
pub(crate) struct Searched {
    /// Quantized weights finished before the quantize stage, by weight name: GPTQ's (gptq,
    /// awq_gptq), or a merge's shards'.
    pub(crate) gptq: Finished,
    /// AWQ's scales and clip ratios (AWQ methods).
    pub(crate) awq: Option<AwqResult>,
    /// The pre-quant scale nodes still to insert.
    pub(crate) insertions: Insertions,
}

/// The calibrate-and-search stage: GPTQ's calibration of the float model and its quantized weights
/// (gptq, awq_gptq), the AWQ searches and their pre-quant scales folded into `model` (AWQ methods).
/// GPTQ's results are spilled to a temporary file until the output form takes them.
fn search_weights(
    model: &mut Model,
    chosen: &[&Candidate],
    block: BlockSize,
    opts: &Options,
    names: &mut ModelNames,
) -> Result<Searched> {
    // GPTQ calibrates the float model: prepared before awq_gptq folds pre-quant scales into it.
    let calibration = match opts.method.gptq() && !chosen.is_empty() {
        true => Some(crate::methods::gptq::prepare(model, chosen, &opts.awq)?),
        false => None,
    };
    let (awq, insertions) = awq_search(model, chosen, block, opts, names)?;
    let gptq = match &calibration {
        Some(cal) => {
            for (w, why) in &cal.plain {
                eprintln!("nibble: weight '{w}' is quantized without GPTQ (round to nearest): {why}");
            }
            let gptq_opts = GptqOptions {
                scale_search: opts.scale_search,
                scale_search_clip_min: opts.scale_search_clip_min,
                ..opts.gptq.clone()
            };
            crate::methods::gptq::quantize(cal, model, chosen, block, opts.zero_point, &gptq_opts, awq.as_ref())?
        }
        None => Finished::in_memory(),
    };
    Ok(Searched { gptq, awq, insertions })
}

/// The quantize stage, run as the output form asks for the weights, in the order of `chosen`: each
/// weight quantized by its method (GPTQ's result, AWQ's scales and clip ratios, or round to
/// nearest), `rayon::current_num_threads()` weights at a time in parallel (and across blocks inside
/// each), so that only that many quantized weights are held at once whatever the model's size.
fn quantize_stream<'a>(
    model: &'a Model,
    chosen: &'a [&'a Candidate],
    mut gptq: Finished,
    awq: Option<&'a AwqResult>,
    (block, block_of): (BlockSize, &'a (dyn Fn(&Candidate) -> BlockSize + Sync + 'a)),
    opts: &'a Options,
) -> impl Iterator<Item = Result<QuantizedWeight>> + 'a {
    let grid = opts.scale_search.then(|| ScaleGrid::clipped_to(opts.scale_search_clip_min));
    let per = rayon::current_num_threads().max(1);
    chosen.chunks(per).flat_map(move |chunk| {
        let done: Vec<Result<Option<QuantizedWeight>>> = chunk.iter().map(|c| gptq.take(&c.base)).collect();
        let grid = grid.as_ref();
        done.into_par_iter()
            .zip(chunk.par_iter())
            .map(|(done, c)| match done? {
                Some(q) => Ok(q),
                None => match awq.filter(|_| c.op != "Gather").and_then(|a| a.weights.get(&c.base)) {
                    Some(a) => crate::methods::awq::quantize_candidate_awq(model, c, block, opts.zero_point, a),
                    None => crate::methods::rtn::quantize_candidate_with(model, c, block_of(c), opts.zero_point, grid),
                },
            })
            .collect::<Vec<_>>()
    })
}

/// The plan stage: every candidate weight with its decision (INT8 layers, Gather tables, skipped
/// non-finite weights), and the Gather tables' block size. Refuses unsupported weights and block
/// sizes the output form cannot hold.
pub(crate) fn choose_weights(
    model: &Model,
    patterns: &[(String, Regex)],
    block: BlockSize,
    opts: &Options,
) -> Result<(Vec<Candidate>, BlockSize)> {
    let mut candidates = plan(model, patterns)?;
    for (function, node, op) in crate::plan::function_matmuls(model) {
        eprintln!(
            "nibble: warning: {op} '{node}' in model-local function '{function}' stays float: nibble does not quantize inside function bodies (export with functions inlined to quantize it)"
        );
    }
    if opts.int8_layers.is_some() || opts.mixed_precision {
        crate::plan::mixed::apply(model, &mut candidates, opts.int8_layers.as_deref())?;
        if !candidates.iter().any(|c| c.bits == Bits::Eight) {
            let why = match &opts.int8_layers {
                Some(p) => format!("no quantized MatMul/Gemm node name contains the tokens of '{p}'"),
                None => "no MatMul is named /model/layers.N/(self_)attn/(qkv|v)_proj/MatMul or /model/layers.N/mlp/down_proj/MatMul (give --int8-layers)".into(),
            };
            eprintln!("nibble: warning: every layer stays INT4: {why}");
        }
    }
    let gather_block = match opts.gather_axis {
        Some(axis) => {
            if axis > 1 {
                return Err(Error::Usage(format!("--gather-axis {axis}: use 0 or 1")));
            }
            let b = BlockSize::from_i64(opts.gather_block_size)
                .map_err(|e| Error::Usage(format!("--gather-block-size: {e}")))?;
            // A tied table is shared with its head only where that is exact: the head quantized by
            // plain RTN in the DQ form, blocked along the same axis with the same block size.
            let shared = |c: &Candidate| {
                c.decision == Decision::Quantize { axis }
                    && c.bits == Bits::Four
                    && b == block
                    && opts.method.awq().is_none()
                    && opts.format == Format::Dq
            };
            crate::plan::plan_gather(model, patterns, axis, &mut candidates, &shared)?;
            b
        }
        None => block,
    };
    if opts.skip_nonfinite {
        skip_nonfinite(model, &mut candidates)?;
    }
    tie_head(model, patterns, block, opts, &mut candidates);
    if let Some(c) = candidates.iter().find(|c| matches!(c.decision, Decision::Unsupported { .. })) {
        return Err(Error::UnsupportedDtype {
            tensor: c.weight.clone(),
            node: c.node.clone(),
            dtype: dtype_name(c.dtype),
        });
    }
    if opts.format == Format::MatMulNBits {
        matmulnbits::check_block("--block-size", opts.block_size)?;
        if opts.gather_axis.is_some() {
            matmulnbits::check_block("--gather-block-size", opts.gather_block_size)?;
        }
    }
    Ok((candidates, gather_block))
}

/// The LM head's bits (`--head-bits`) and its tied embedding Gathers ([`crate::plan::tied`]), each
/// tie and each Gather left float said on stderr.
fn tie_head(model: &Model, patterns: &[(String, Regex)], block: BlockSize, opts: &Options, cs: &mut Vec<Candidate>) {
    crate::plan::tied::set_head_bits(cs, opts.head_bits);
    let not_the_table = if opts.method == Method::Rtn {
        Some("the QDQ form (--method rtn) keeps the float weight")
    } else if matches!(opts.method, Method::AwqLite | Method::AwqFull | Method::AwqGptq) {
        Some("AWQ's pre-quant scales are folded into the head's quantized weight, which is then not the table (use rtn_dq, gptq or awq_clip to share it)")
    } else {
        None
    };
    let rules = crate::plan::tied::TieRules {
        matmulnbits: opts.format == Format::MatMulNBits,
        block,
        not_the_table,
        gather_axis: opts.gather_axis,
    };
    for note in crate::plan::tied::tie(model, patterns, cs, &rules) {
        match note.strip_prefix("warning: ") {
            Some(w) => eprintln!("nibble: warning: {w}"),
            None => eprintln!("nibble: note: {note}"),
        }
    }
    let heads = crate::plan::tied::set_head_bits(cs, opts.head_bits);
    if heads == 0 && opts.head_bits != Bits::Four {
        eprintln!(
            "nibble: warning: --head-bits {}: no LM head is quantized (lm_head is excluded by default: pass --no-default-exclude)",
            opts.head_bits.count()
        );
    }
}

/// The AWQ stage (AWQ methods only): calibrates and searches on the original weights, then folds
/// the pre-quant scales into producers (before their own weights are quantized) and returns the
/// Mul nodes for the rest.
fn awq_search(
    model: &mut Model,
    chosen: &[&Candidate],
    block: BlockSize,
    opts: &Options,
    names: &mut ModelNames,
) -> Result<(Option<AwqResult>, Insertions)> {
    let Some(method) = opts.method.awq().filter(|_| !chosen.is_empty()) else {
        return Ok((None, Insertions::default()));
    };
    let awq_opts = AwqOptions { method, ..opts.awq.clone() };
    let result = crate::methods::awq::search(model, chosen, block, opts.zero_point, &awq_opts)?;
    for (w, why) in &result.plain {
        eprintln!("nibble: weight '{w}' is quantized without AWQ: {why}");
    }
    let insertions = fold_scales(model, chosen, &result, opts, names)?;
    Ok((Some(result), insertions))
}

/// AWQ's pre-quant scales folded into the producers of `model` (before their own weights are
/// quantized); returns the Mul nodes for the rest ([`pqs::apply`]).
pub(crate) fn fold_scales(
    model: &mut Model,
    chosen: &[&Candidate],
    result: &AwqResult,
    opts: &Options,
    names: &mut ModelNames,
) -> Result<Insertions> {
    let formats: HashMap<String, FloatFormat> = chosen
        .iter()
        .filter(|c| c.op != "Gather")
        .map(|c| (c.base.clone(), c.format().expect("float weight")))
        .collect();
    pqs::apply(model, result, &|w| formats[w], opts.awq.fuse, names)
}

/// The emit stage: the output form's nodes and tensors, the pre-quant scale Muls, and the opset
/// upgrade the DQ form needs. Returns the bytes of the quantized weights' replacements.
fn emit(
    model: &mut Model,
    chosen: &[&Candidate],
    (quantized, store): (crate::emit::Quantized<'_>, crate::emit::Store<'_>),
    block_of: &dyn Fn(&Candidate) -> BlockSize,
    mut insertions: Insertions,
    opts: &Options,
    names: &mut ModelNames,
) -> Result<Emitted> {
    if let Some(g) = model.proto.graph.as_mut() {
        for (n, input) in &insertions.rewire {
            g.node[*n].input[0] = input.clone();
        }
    }
    let emitted = match opts.format {
        Format::MatMulNBits => {
            let nbits_block = matmulnbits::check_block("--block-size", opts.block_size)?;
            let nbits_gather_block = match opts.gather_axis {
                Some(_) => matmulnbits::check_block("--gather-block-size", opts.gather_block_size)?,
                None => nbits_block,
            };
            let layout = (nbits_block, nbits_gather_block);
            matmulnbits::rewrite(model, chosen, quantized, store, layout, opts.accuracy_level, names)?
        }
        Format::Dq => {
            let form = if opts.method == Method::Rtn { Form::Qdq } else { Form::Dq };
            crate::emit::dq::rewrite(model, chosen, quantized, store, block_of, form, names)?
        }
    };
    if let Some(g) = model.proto.graph.as_mut() {
        g.initializer.extend(std::mem::take(&mut insertions.initializers));
        pqs::insert_after_producers(g, std::mem::take(&mut insertions.nodes));
    }
    if !chosen.is_empty() && opts.format == Format::Dq {
        opset::upgrade(&mut model.proto)?;
        model.proto.ir_version = Some(model.proto.ir_version.unwrap_or(0).max(10));
    }
    Ok(emitted)
}

/// The path the CLI suggests when no `-o` is given: `MODEL_int4.onnx`.
pub fn default_output(input: &Path) -> PathBuf {
    let stem = input.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| "model".into());
    input.with_file_name(format!("{stem}_int4.onnx"))
}
