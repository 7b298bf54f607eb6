//! The `nibble` command line: argument parsing, the commands (quantize, merge, inspect, compare,
//! example) and their printed output. [`main_with_args`] is the whole program; the `nibble` binary
//! (and the Python package) only call it.

pub mod compare;
pub mod decoder_example;
pub mod example;
pub mod inspect;
pub mod merge;
pub mod perplexity;
pub mod plot;
pub mod sweep;

use crate::graph::model::ExternalData;
use crate::pipeline::{default_output, quantize_file, Method, Options};
use clap::{Parser, Subcommand};
use example::{transformer, TransformerConfig};
use std::ffi::OsString;
use std::io::Write;
use std::path::PathBuf;

/// Quantize the weights of ONNX models to 4 bits (INT4/UINT4, block-wise) on a CPU,
/// bit-exact with NVIDIA ModelOpt's modelopt.onnx.quantization.int4.
#[derive(Parser)]
#[command(name = "nibble", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Quantize MatMul/Gemm weights of MODEL and write the result.
    Quantize {
        /// The input model (.onnx, with its external data next to it), or a model folder
        /// (onnxruntime-genai's with genai_config.json, or an Optimum export with config.json).
        model: PathBuf,
        /// Output model; default MODEL_int4.onnx next to the input. For a folder: the output
        /// folder (default FOLDER_int4), every other file copied, weights in MODEL.onnx.data.
        #[arg(short, long)]
        output: Option<PathBuf>,
        /// Algorithm [default: rtn_dq; with --target-bits: gptq --zero-point --act-order when calibration
        /// data is given, else rtn_dq --zero-point].
        #[arg(long, value_enum)]
        method: Option<Method>,
        /// Block size along K (even, >= 2), or -1 for per-channel.
        #[arg(long, default_value_t = 128, allow_negative_numbers = true, value_parser = block_size_arg)]
        block_size: i64,
        /// UINT4 with a zero point per block instead of symmetric INT4.
        #[arg(long)]
        zero_point: bool,
        /// Leave nodes whose name matches this regular expression (anchored at the start) unquantized;
        /// repeatable. Default: /lm_head. Give --exclude '' ... to replace the default.
        #[arg(long = "exclude", value_name = "REGEX")]
        exclude: Vec<String>,
        /// Quantize every weight, including /lm_head.
        #[arg(long, conflicts_with = "exclude")]
        no_default_exclude: bool,
        /// Where tensor data goes: OUT.onnx_data when needed (auto), always, or never.
        #[arg(long, value_enum, default_value = "auto")]
        external_data: ExternalData,
        /// Overwrite an existing output.
        #[arg(long)]
        force: bool,
        /// Flush the output to disk before renaming it into place, so it also survives a power loss
        /// (slower: waits for the disk).
        #[arg(long)]
        fsync: bool,
        /// Leave weights that hold NaN or Inf unquantized (with a warning) instead of stopping.
        #[arg(long)]
        skip_nonfinite: bool,
        /// Output form: DequantizeLinear (ModelOpt's) or ONNX Runtime's MatMulNBits [default: dq;
        /// matmulnbits for an onnxruntime-genai folder].
        #[arg(long, value_enum)]
        format: Option<crate::pipeline::Format>,
        /// MatMulNBits accuracy_level (0 unset, 1 fp32, 2 fp16, 3 bf16, 4 int8 activations).
        /// Default 4, as onnxruntime-genai's builder writes (ONNX Runtime's fastest CPU kernel).
        #[arg(long, value_parser = clap::value_parser!(i64).range(0..=4))]
        accuracy_level: Option<i64>,
        /// Also quantize Gather (embedding) tables, blocked along this axis (0 or 1).
        #[arg(long)]
        gather_axis: Option<usize>,
        /// Block size of the Gather tables.
        #[arg(long, default_value_t = 32, allow_negative_numbers = true, value_parser = block_size_arg)]
        gather_block_size: i64,
        /// Keep these layers at INT8 per channel (ModelOpt's layers_8bit): comma-separated node
        /// names or dot/slash-separated parts of them, e.g. layers.0,/model/layers.5/mlp/down_proj/MatMul.
        #[arg(long, value_name = "PATTERNS")]
        int8_layers: Option<String>,
        /// Keep ModelOpt's default choice of sensitive layers at INT8 (enable_mixed_quant): the first and
        /// last eighth and every third of the qkv/v_proj and down_proj MatMuls.
        #[arg(long)]
        mixed_precision: bool,
        /// Code width of the quantized LM head (lm_head, quantized with --no-default-exclude) and of its
        /// tied embedding: 4, or 8 (MatMulNBits bits=8, 8-bit GatherBlockQuantized), blocked by --block-size.
        #[arg(long, default_value = "4", value_parser = ["4", "8"])]
        head_bits: String,
        /// Choose each block's scale by a data-free search (ModelOpt's 15-level and ONNX Runtime's
        /// 16-level grids; lowest weight error) instead of ModelOpt's formula (rtn_dq, rtn, gptq,
        /// awq_gptq).
        #[arg(long)]
        scale_search: bool,
        /// The scale search also tries clip ratios from this one up to 1 in steps of 0.05 (1: no
        /// clipping). Clipping helped an encoder and hurt a causal LM (README, "Which method").
        #[arg(long, value_name = "RATIO", default_value_t = 1.0, requires = "scale_search")]
        scale_search_clip_min: f64,
        /// Mean bits per parameter over the quantized weights (codes, scales and zero points
        /// counted), e.g. 5: each weight gets 4 or 8 bits by its output error measured on the
        /// calibration data (HAWQ-V3 knapsack: most error removed within the budget). -v prints the table.
        #[arg(long, value_name = "BITS", value_parser = target_bits_arg, conflicts_with_all = ["int8_layers", "mixed_precision"])]
        target_bits: Option<f64>,
        /// Draw the sensitivities --target-bits measured and the choice into this SVG file.
        #[arg(long, value_name = "FILE.svg", requires = "target_bits")]
        plot_sensitivity: Option<PathBuf>,
        /// Write a shard: quantize only the weights of segments A..B (0-based, inclusive) of the
        /// --segment-mb cuts into the folder -o, for `nibble merge` (the quantize log lists the segments).
        #[arg(long, value_name = "A..B", value_parser = merge::segments_arg, conflicts_with_all = ["target_bits", "sequential"])]
        segments: Option<(usize, usize)>,
        #[command(flatten)]
        awq: AwqArgs,
        #[command(flatten)]
        gptq: GptqArgs,
    },
    /// Assemble shards (quantize --segments A..B) into the model a single run writes.
    Merge {
        /// The shard folders: together they must hold every segment exactly once.
        #[arg(required = true)]
        shards: Vec<PathBuf>,
        /// Output model.
        #[arg(short, long)]
        output: PathBuf,
        /// The input model, when it is no longer at the path the shards name (it must be the same file).
        #[arg(long)]
        model: Option<PathBuf>,
        /// Overwrite an existing output.
        #[arg(long)]
        force: bool,
        /// Flush the output to disk before renaming it into place.
        #[arg(long)]
        fsync: bool,
    },
    /// List the model's opset and each MatMul/Gemm weight with what quantize would do.
    Inspect {
        /// The model.
        model: PathBuf,
        /// As for quantize.
        #[arg(long = "exclude", value_name = "REGEX")]
        exclude: Vec<String>,
        /// Print the --target-bits plan (measured on the calibration inputs, as quantize takes
        /// them) instead of the weight list; nothing is written.
        #[arg(long, value_name = "BITS", value_parser = target_bits_arg)]
        target_bits: Option<f64>,
        /// As for quantize (with --target-bits).
        #[arg(long, default_value_t = 128, allow_negative_numbers = true, value_parser = block_size_arg, requires = "target_bits")]
        block_size: i64,
        /// As for quantize (with --target-bits).
        #[arg(long, requires = "target_bits")]
        zero_point: bool,
        /// As for quantize (with --target-bits): without it, the options quantize would choose
        /// (gptq --zero-point --act-order with calibration data, else rtn_dq --zero-point). The
        /// sensitivities are measured by rounding whatever the method.
        #[arg(long, value_enum, requires = "target_bits")]
        method: Option<Method>,
        /// As for quantize (with --target-bits): the output form whose bytes are counted [default:
        /// as quantize chooses].
        #[arg(long, value_enum, requires = "target_bits")]
        format: Option<crate::pipeline::Format>,
        /// Draw the sensitivities and the choice into this SVG file.
        #[arg(long, value_name = "FILE.svg", requires = "target_bits")]
        plot_sensitivity: Option<PathBuf>,
        #[command(flatten)]
        awq: AwqArgs,
    },
    /// Run ORIGINAL and QUANTIZED in ONNX Runtime on the same seeded inputs and report the error
    /// of every output; or, with --methods, quantize ORIGINAL with each method x block size and
    /// print one table of size, time and error.
    Compare {
        /// The float model.
        original: PathBuf,
        /// Its quantized form (not with --methods).
        #[arg(required_unless_present = "methods", conflicts_with = "methods")]
        quantized: Option<PathBuf>,
        /// Input seed (random inputs).
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Inputs from a .npz/.npy file (as for calibration) instead of random ones.
        #[arg(long, value_name = "FILE")]
        calibration_data: Option<PathBuf>,
        /// Also the relative error of every quantized MatMul's output, worst first.
        #[arg(long)]
        per_layer: bool,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
        /// Run each model by segments: cut the original where fewest tensors cross (after each
        /// decoder layer, as calibration cuts it) into segments of at least this many MiB of
        /// weights, and the quantized model at the same tensors; each segment runs in its own ONNX
        /// Runtime session holding only its weights, the crossing tensors of every sample carried to
        /// the next; 0 runs each model whole; auto: whole when the original is small against the
        /// memory available, else segments (quantize's rule).
        #[arg(long, default_value = "auto", value_parser = parse_segment_mb)]
        segment_mb: SegmentMb,
        /// Tensors carried between segments (all samples) held in memory, in MiB; above it they are
        /// spilled to a temporary file and read back for the next segment.
        #[arg(long, default_value_t = 1024)]
        carry_memory_mb: u64,
        #[command(flatten)]
        extra: CompareExtra,
    },
    /// Write a synthetic transformer-like model (seeded random weights) for trying nibble out; with
    /// --kind genai/optimum/optimum-merged a decoder LLM folder with a KV cache, config and tokenizer.
    Example {
        /// Output model (a folder for --kind genai/optimum/optimum-merged).
        output: PathBuf,
        /// A decoder folder as onnxruntime-genai's builder (genai) or Optimum (optimum; its merged
        /// decoder with an If on use_cache_branch: optimum-merged) writes it, instead of the single
        /// transformer-like model.
        #[arg(long, value_enum)]
        kind: Option<decoder_example::DecoderKind>,
        /// Hidden size.
        #[arg(long, default_value_t = 256)]
        hidden: usize,
        /// MLP size.
        #[arg(long, default_value_t = 704)]
        intermediate: usize,
        /// Decoder layers.
        #[arg(long, default_value_t = 4)]
        layers: usize,
        /// lm_head output size.
        #[arg(long, default_value_t = 1000)]
        vocab: usize,
        /// Weight type: f32, f16 or bf16.
        #[arg(long, default_value = "f32")]
        dtype: String,
        /// Default-domain opset.
        #[arg(long, default_value_t = 17)]
        opset: i64,
        /// Where tensor data goes.
        #[arg(long, value_enum, default_value = "auto")]
        external_data: ExternalData,
        /// Overwrite an existing output.
        #[arg(long)]
        force: bool,
    },
}

/// Perplexity and the method sweep of `compare`.
#[derive(clap::Args)]
struct CompareExtra {
    /// Causal LMs: mean next-token NLL and perplexity of both models on `input_ids` [S, T] (int)
    /// from this .npz, in a default ONNX Runtime session.
    #[arg(long, value_name = "TOKENS.npz", group = "perplexity_tokens")]
    perplexity: Option<PathBuf>,
    /// Causal LMs: perplexity of both models on --perplexity-windows windows of
    /// --perplexity-seq-len tokens of this UTF-8 text (or .jsonl with a "text" field), tokenized
    /// with --tokenizer.
    #[arg(long, value_name = "FILE", conflicts_with = "perplexity", group = "perplexity_tokens")]
    perplexity_text: Option<PathBuf>,
    /// The Hugging Face tokenizer.json for --perplexity-text and --calibration-text; default:
    /// tokenizer.json in ORIGINAL's folder or beside it.
    #[arg(long, value_name = "PATH")]
    tokenizer: Option<PathBuf>,
    /// Tokens per --perplexity-text window.
    #[arg(long, default_value_t = 512, value_name = "T")]
    perplexity_seq_len: usize,
    /// Windows of --perplexity-text, spread evenly over the text.
    #[arg(long, default_value_t = 4, value_name = "N")]
    perplexity_windows: usize,
    /// The logits output for --perplexity/--perplexity-text (default: the first output whose last
    /// dimension is the vocabulary).
    #[arg(long, value_name = "NAME")]
    logits: Option<String>,
    /// Sweep: quantize ORIGINAL with each of these methods (comma-separated) x --block-sizes into a
    /// temporary folder and print one table.
    #[arg(long, value_enum, value_delimiter = ',', value_name = "METHODS", conflicts_with = "per_layer")]
    methods: Option<Vec<Method>>,
    /// Sweep: block sizes (comma-separated; -1 per channel).
    #[arg(
        long,
        value_delimiter = ',',
        value_name = "SIZES",
        default_value = "128",
        allow_negative_numbers = true,
        value_parser = block_size_arg
    )]
    block_sizes: Vec<i64>,
    /// Sweep: output form of every row, as for quantize.
    #[arg(long, value_enum, default_value = "dq", requires = "methods")]
    format: crate::pipeline::Format,
    /// Sweep: UINT4 with zero points, as for quantize.
    #[arg(long, requires = "methods")]
    zero_point: bool,
    /// Sweep: calibrate the methods that take data (awq_*, gptq) on this UTF-8 text (or .jsonl with
    /// a "text" field), tokenized with --tokenizer, as quantize does.
    #[arg(long, value_name = "FILE", requires = "methods", conflicts_with = "calibration_data")]
    calibration_text: Option<PathBuf>,
    /// Sweep: calibration samples (windows of --calibration-text, default 16; random ones, default 8).
    #[arg(long, requires = "methods")]
    calibration_samples: Option<usize>,
    /// Sweep: tokens per --calibration-text window.
    #[arg(long, default_value_t = crate::calibrate::text::DEFAULT_SEQ_LEN, value_name = "T", requires = "calibration_text")]
    calibration_seq_len: usize,
    /// Sweep: calibrate a model fed by token ids on random ids when no data is given.
    #[arg(long, requires = "methods")]
    calibration_random: bool,
    /// Sweep: keep every output in this folder (METHOD_bBLOCK.onnx, or a folder METHOD_bBLOCK for a
    /// folder input; created if missing) instead of a temporary folder.
    #[arg(long, value_name = "DIR", requires = "methods")]
    output_dir: Option<PathBuf>,
    /// Sweep: also measure this model file or folder (e.g. the one onnxruntime-genai's builder
    /// quantized) as a row of the table and a labelled point of --plot; repeatable.
    #[arg(long, value_name = "LABEL=PATH", requires = "methods", value_parser = reference_arg)]
    reference: Vec<sweep::Reference>,
    /// Sweep: draw bytes on disk versus perplexity of every row and reference into this SVG file
    /// (needs --perplexity-text or --perplexity).
    #[arg(long, value_name = "FILE.svg", requires_all = ["methods", "perplexity_tokens"])]
    plot: Option<PathBuf>,
}

/// A `--reference LABEL=PATH` value.
fn reference_arg(text: &str) -> Result<sweep::Reference, String> {
    match text.split_once('=') {
        Some((label, path)) if !label.trim().is_empty() && !path.is_empty() => {
            Ok(sweep::Reference { label: label.trim().to_string(), path: PathBuf::from(path) })
        }
        _ => Err(format!("'{text}' is not LABEL=PATH, e.g. builder-int4=path/to/folder")),
    }
}

/// The MatMulNBits `accuracy_level` when none is given: 4 for `--format matmulnbits` (as
/// onnxruntime-genai's builder writes), else 0 (unset).
fn default_accuracy_level(format: crate::pipeline::Format) -> i64 {
    match format {
        crate::pipeline::Format::MatMulNBits => 4,
        _ => 0,
    }
}

/// Options of the GPTQ methods.
#[derive(clap::Args)]
#[command(next_help_heading = "GPTQ (gptq, awq_gptq; calibration options as for AWQ)")]
struct GptqArgs {
    /// Dampening added to the Hessian diagonal, as a fraction of its mean.
    #[arg(long, default_value_t = 0.01, allow_negative_numbers = true)]
    percdamp: f64,
    /// Rows (input channels) per lazy batch update.
    #[arg(long, default_value_t = 128)]
    gptq_batch: usize,
    /// Quantize input channels by decreasing Hessian diagonal (block scales fixed upfront).
    #[arg(long)]
    act_order: bool,
    /// Calibrate step by step: each group of layers sees the activations produced by the layers
    /// already quantized before it (every node still runs once; costs a session per step).
    #[arg(long)]
    sequential: bool,
}

/// Options of the AWQ methods.
#[derive(clap::Args)]
#[command(next_help_heading = "AWQ (awq_lite, awq_clip, awq_full)")]
struct AwqArgs {
    /// Calibration inputs: .npz with one array per model input (samples stacked on the first
    /// axis), or .npy for a single-input model. Default: seeded random inputs.
    #[arg(long, value_name = "FILE")]
    calibration_data: Option<PathBuf>,
    /// Sizes of symbolic input dimensions for random calibration: whole inputs (input_ids:1x128)
    /// or symbolic dimensions by name (sequence_length=64,past_sequence_length=0); an unknown
    /// name is an error that lists the model's inputs and dimensions.
    #[arg(long, value_name = "NAME:DIMS|DIM=N,...")]
    calibration_shapes: Option<String>,
    /// Calibrate a model fed by token ids on random ids when no data is given (otherwise refused:
    /// random tokens give a much worse model than text; see README).
    #[arg(long)]
    calibration_random: bool,
    /// Calibration from text: a UTF-8 file (or .jsonl with a "text" field per line), tokenized
    /// with --tokenizer and cut into --calibration-samples windows of --calibration-seq-len tokens.
    #[arg(long, value_name = "FILE", conflicts_with = "calibration_data")]
    calibration_text: Option<PathBuf>,
    /// The Hugging Face tokenizer.json for --calibration-text; default: tokenizer.json in the model
    /// folder or beside the model file.
    #[arg(long, value_name = "PATH")]
    tokenizer: Option<PathBuf>,
    /// Number of calibration samples: random ones (default 8) or windows of --calibration-text
    /// (default 16).
    #[arg(long)]
    calibration_samples: Option<usize>,
    /// Tokens per --calibration-text window (16 x 512 tokens by default: more rows than the widest
    /// MatMul input of a small LLM, which GPTQ's Hessian needs).
    #[arg(long, default_value_t = crate::calibrate::text::DEFAULT_SEQ_LEN, value_name = "T")]
    calibration_seq_len: usize,
    /// Seed of the random calibration samples.
    #[arg(long, default_value_t = 0)]
    calibration_seed: u64,
    /// awq_lite alpha grid step (ModelOpt's awqlite_alpha_step).
    #[arg(long, default_value_t = 0.1)]
    alpha_step: f64,
    /// awq_clip ratio grid step (awqclip_alpha_step).
    #[arg(long, default_value_t = 0.05)]
    clip_alpha_step: f64,
    /// Smallest awq_clip ratio (awqclip_alpha_min).
    #[arg(long, default_value_t = 0.5)]
    clip_alpha_min: f64,
    /// Keep one pre-quant scale per weight: no mean over weights sharing an activation and no
    /// folding into the producing node (awqlite_fuse_nodes=False).
    #[arg(long)]
    no_fuse_siblings: bool,
    /// awq_lite: one scale per activation, searched on the combined loss of the weights sharing it
    /// (ModelOpt's awqlite_run_per_subgraph).
    #[arg(long)]
    per_subgraph: bool,
    /// Activation memory held at once during calibration, in MiB. GPTQ also runs at once only the
    /// groups (weights sharing an activation) whose working sets fit in it (about max(16 K^2,
    /// 8 K^2 + 12 K N) bytes each: Hessian, factorization, quantization); a larger one runs alone.
    #[arg(long, default_value_t = 1024)]
    calibration_memory_mb: usize,
    /// Calibrate by segments: cut the graph where fewest tensors cross (after each decoder layer)
    /// into segments of at least this many MiB of weights, each run in its own ONNX Runtime
    /// session holding only its weights, the crossing tensors carried from one to the next; 0 runs
    /// each wave in a session of the whole graph up to its activations; auto: the whole graph
    /// when the model is small against the memory available, else segments.
    #[arg(long, default_value = "auto", value_parser = parse_segment_mb)]
    segment_mb: SegmentMb,
    /// Tensors carried between calibration steps (segments, --sequential: the residual stream,
    /// masks, positions of every sample) held in memory, in MiB; above it they are spilled to a
    /// temporary file and read back for the next step.
    #[arg(long, default_value_t = 1024)]
    carry_memory_mb: u64,
    /// Print each weight's AWQ choice.
    #[arg(short, long)]
    verbose: bool,
}

/// `--segment-mb auto|N`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum SegmentMb {
    Auto,
    Mb(u64),
}

fn parse_segment_mb(s: &str) -> Result<SegmentMb, String> {
    match s {
        "auto" => Ok(SegmentMb::Auto),
        _ => s
            .parse()
            .map(SegmentMb::Mb)
            .map_err(|_| format!("'{s}': give auto or a number of MiB (0: the whole graph)")),
    }
}

impl AwqArgs {
    /// The AWQ/calibration options; `model` (file or folder) locates the default tokenizer.
    fn options(&self, model: &std::path::Path) -> anyhow::Result<crate::methods::awq::AwqOptions> {
        use crate::calibrate::{parse_shapes, CalibrationOptions};
        let shape_args = self.calibration_shapes.as_deref().map(parse_shapes).transpose()?.unwrap_or_default();
        for (name, v) in [("--alpha-step", self.alpha_step), ("--clip-alpha-step", self.clip_alpha_step)] {
            if !(v > 0.0 && v <= 1.0) {
                anyhow::bail!("{name} {v}: use a step in (0, 1]");
            }
        }
        if !(self.clip_alpha_min > 0.0 && self.clip_alpha_min <= 1.0) {
            anyhow::bail!("--clip-alpha-min {}: use a ratio in (0, 1]", self.clip_alpha_min);
        }
        let tokens = match &self.calibration_text {
            Some(text) => {
                let tokenizer = crate::calibrate::text::find_tokenizer(self.tokenizer.as_deref(), model)?;
                let samples = self.calibration_samples.unwrap_or(crate::calibrate::text::DEFAULT_SAMPLES);
                Some(crate::calibrate::text::text_windows(text, &tokenizer, samples, self.calibration_seq_len)?)
            }
            None => None,
        };
        Ok(crate::methods::awq::AwqOptions {
            method: crate::methods::awq::AwqMethod::Lite,
            alpha_step: self.alpha_step,
            clip_alpha_step: self.clip_alpha_step,
            clip_alpha_min: self.clip_alpha_min,
            fuse: !self.no_fuse_siblings,
            calibration: CalibrationOptions {
                data: self.calibration_data.clone(),
                inputs: None,
                tokens,
                shapes: shape_args.shapes,
                dims: shape_args.dims,
                samples: self.calibration_samples.unwrap_or(8).max(1),
                random: self.calibration_random,
                seed: self.calibration_seed,
            },
            memory_budget: self.calibration_memory_mb.max(1) << 20,
            segment_bytes: match self.segment_mb {
                SegmentMb::Mb(mb) if mb > 0 => Some(mb << 20),
                _ => None,
            },
            segment_auto: self.segment_mb == SegmentMb::Auto,
            carry_memory: self.carry_memory_mb << 20,
            segments: None,
            per_subgraph: self.per_subgraph,
            verbose: self.verbose,
        })
    }
}

/// `,"perplexity":{"session":..,"original":{..},"quantized":{..}}` (empty without --perplexity).
fn perplexity_json(p: &Option<[perplexity::Perplexity; 2]>) -> String {
    p.as_ref().map_or(String::new(), |[o, q]| {
        format!(
            ",\"perplexity\":{{\"session\":{:?},\"original\":{},\"quantized\":{}}}",
            perplexity::SESSION,
            perplexity::json(o),
            perplexity::json(q)
        )
    })
}

/// The perplexity lines of the compare report.
fn perplexity_text([o, q]: &[perplexity::Perplexity; 2]) -> String {
    format!(
        "\n{:<24} {:>12} {:>12}   ({} predictions of '{}'; {})\n{:<24} {:>12.6} {:>12.4}\n{:<24} {:>12.6} {:>12.4}\n",
        "model",
        "mean NLL",
        "perplexity",
        o.predictions,
        o.logits,
        perplexity::SESSION,
        "original",
        o.nll,
        o.perplexity,
        "quantized",
        q.nll,
        q.perplexity
    )
}

/// A block size on the command line: even and >= 2, or -1 (per channel). Checked while parsing so
/// that a value no model could take is a usage error (exit 2), as every other malformed option is.
fn block_size_arg(text: &str) -> Result<i64, String> {
    let value: i64 = text.trim().parse().map_err(|_| format!("'{text}' is not a whole number"))?;
    nibble::BlockSize::from_i64(value).map(|_| value).map_err(|e| e.to_string())
}

/// A `--target-bits` value: a finite positive number (the model decides the range it can take).
fn target_bits_arg(text: &str) -> Result<f64, String> {
    match text.trim().parse::<f64>() {
        Ok(v) if v.is_finite() && v > 0.0 => Ok(v),
        _ => Err(format!("'{text}' is not a positive number of bits per parameter such as 5")),
    }
}

fn mb(bytes: u64) -> String {
    format!("{:.1} MB", bytes as f64 / 1e6)
}

/// The one-line report of a quantized model, and the notes on weights left float.
/// Prints the `--target-bits` plan (one line, or the table with `-v`) and writes its chart.
fn print_budget(s: &crate::pipeline::Summary, verbose: bool, svg: Option<&std::path::Path>) -> anyhow::Result<()> {
    if let Some(plan) = &s.budget {
        let table = plan.table();
        match verbose {
            true => print!("{table}"),
            false => println!("{}", table.lines().next().unwrap_or_default()),
        }
        if let Some(m) = &plan.missed {
            eprintln!("nibble: warning: --target-bits not reached within 1%: {m}");
        }
        if let Some(svg) = svg {
            plot::write_sensitivity_svg(plan, svg)?;
        }
    }
    Ok(())
}

fn print_summary(s: &crate::pipeline::Summary, output: &std::path::Path) {
    for (weight, node, reason) in &s.skipped {
        eprintln!("nibble: note: weight '{weight}' (read by '{node}') is left float: {reason}");
    }
    let int8 = if s.int8 > 0 { format!(" ({} at INT8)", s.int8) } else { String::new() };
    let copies = if s.float_copies > 0 {
        format!("; float copies kept for other readers: {} ({} bytes)", s.float_copies, s.float_copy_bytes)
    } else {
        String::new()
    };
    println!(
        "quantized {} of {} weights{int8} ({} -> {}); model {} -> {}{}{copies}; {:.2} s ({} tier) -> {}",
        s.quantized,
        s.candidates,
        mb(s.weight_bytes_before),
        mb(s.weight_bytes_after),
        mb(s.model_bytes_before),
        mb(s.model_bytes_after),
        if s.opset_raised { "; opset raised to 21" } else { "" },
        s.seconds,
        nibble::Tier::best().name(),
        output.display()
    );
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Quantize {
            model,
            output,
            method,
            block_size,
            zero_point,
            exclude,
            no_default_exclude,
            external_data,
            force,
            fsync,
            skip_nonfinite,
            format,
            accuracy_level,
            gather_axis,
            gather_block_size,
            int8_layers,
            mixed_precision,
            head_bits,
            scale_search,
            scale_search_clip_min,
            target_bits,
            plot_sensitivity,
            segments,
            awq,
            gptq,
        } => {
            let folder_input = model.is_dir();
            let shard_output = match segments {
                Some(_) => Some(merge::shard_output(folder_input, output.as_deref())?),
                None => None,
            };
            let output = output.unwrap_or_else(|| match folder_input {
                true => crate::folder::default_output(&model),
                false => default_output(&model),
            });
            let exclude = if no_default_exclude {
                vec![]
            } else if exclude.is_empty() {
                vec!["/lm_head".to_string()]
            } else {
                exclude.into_iter().filter(|p| !p.is_empty()).collect()
            };
            let given = crate::recipe::Given {
                method: method.is_some(),
                format: format.is_some(),
                accuracy_level: accuracy_level.is_some(),
            };
            let format = format.unwrap_or(crate::pipeline::Format::Dq);
            let mut opts = Options {
                method: method.unwrap_or(Method::RtnDq),
                block_size,
                zero_point,
                exclude,
                external_data,
                external_data_name: None,
                force,
                awq: awq.options(&model)?,
                gptq: crate::methods::gptq::GptqOptions {
                    percdamp: gptq.percdamp,
                    lazy_batch: gptq.gptq_batch,
                    act_order: gptq.act_order,
                    scale_search,
                    scale_search_clip_min,
                    sequential: gptq.sequential,
                },
                scale_search,
                scale_search_clip_min,
                skip_nonfinite,
                format,
                accuracy_level: accuracy_level.unwrap_or(default_accuracy_level(format)),
                gather_axis,
                gather_block_size,
                int8_layers,
                mixed_precision,
                fsync,
                target_bits,
                head_bits: if head_bits == "8" { nibble::Bits::Eight } else { nibble::Bits::Four },
                in_memory: false,
            };
            if let Some(svg) = &plot_sensitivity {
                plot::check_path(svg)?;
            }
            for note in crate::recipe::fill(&mut opts, &model, given) {
                println!("default: {note}");
            }
            let verbose = opts.awq.verbose;
            if folder_input {
                let f = crate::folder::quantize_folder(&model, &output, &opts)?;
                for (file, s) in &f.models {
                    print_budget(s, verbose, plot_sensitivity.as_deref())?;
                    print_summary(s, &output.join(file));
                }
                for file in &f.left_float {
                    println!("left float and copied: {} (not the decoder)", file.display());
                }
                println!(
                    "{} folder: {} other files copied unchanged; {:.2} s -> {}",
                    f.layout.name(),
                    f.copied.len(),
                    f.seconds,
                    output.display()
                );
                return Ok(());
            }
            if let (Some(range), Some(shard)) = (segments, &shard_output) {
                return merge::quantize_shard(&model, shard, &opts, range);
            }
            let s = quantize_file(&model, &output, &opts)?;
            print_budget(&s, verbose, plot_sensitivity.as_deref())?;
            print_summary(&s, &output);
        }
        Command::Inspect {
            model,
            exclude,
            target_bits,
            block_size,
            zero_point,
            method,
            format,
            plot_sensitivity,
            awq,
        } => {
            let exclude = if exclude.is_empty() { vec!["/lm_head".to_string()] } else { exclude };
            match target_bits {
                Some(t) => {
                    let mut opts = Options {
                        method: method.unwrap_or(Method::RtnDq),
                        block_size,
                        zero_point,
                        format: format.unwrap_or(crate::pipeline::Format::Dq),
                        exclude,
                        awq: awq.options(&model)?,
                        target_bits: Some(t),
                        ..Options::default()
                    };
                    // The plan quantize would make with the same options (inspect has no --method).
                    let given = crate::recipe::Given {
                        method: method.is_some(),
                        format: format.is_some(),
                        accuracy_level: false,
                    };
                    for note in crate::recipe::fill(&mut opts, &model, given) {
                        eprintln!("nibble: note: default: {note}");
                    }
                    if let Some(svg) = &plot_sensitivity {
                        plot::check_path(svg)?;
                    }
                    let plan = crate::pipeline::plan_target_bits(&model, &opts)?;
                    print!("{}", plan.table());
                    if let Some(svg) = &plot_sensitivity {
                        plot::write_sensitivity_svg(&plan, svg)?;
                    }
                }
                None if matches!(awq.segment_mb, SegmentMb::Mb(mb) if mb > 0) => {
                    // The segments --segments A..B ranges over (0-based), as quantize would cut them.
                    let opts = Options { exclude, awq: awq.options(&model)?, ..Options::default() };
                    print!("{}", crate::shard::segments_of(&model, &opts)?.table());
                }
                None => print!("{}", inspect::inspect(&model, &exclude)?),
            }
        }
        Command::Merge { shards, output, model, force, fsync } => {
            merge::merge(&shards, &output, model.as_deref(), force, fsync)?;
        }
        Command::Compare {
            original,
            quantized,
            seed,
            calibration_data,
            per_layer,
            json,
            segment_mb,
            carry_memory_mb,
            extra,
        } => {
            let mut tokens = extra.perplexity.as_deref().map(perplexity::read_tokens).transpose()?;
            if let Some(text) = &extra.perplexity_text {
                let tokenizer = crate::calibrate::text::find_tokenizer(extra.tokenizer.as_deref(), &original)?;
                let windows = crate::calibrate::text::text_windows(
                    text,
                    &tokenizer,
                    extra.perplexity_windows,
                    extra.perplexity_seq_len.max(2),
                )?;
                tokens = Some(perplexity::Tokens {
                    sequences: windows.len(),
                    length: windows[0].len(),
                    ids: windows.concat(),
                });
            }
            if let Some(methods) = extra.methods {
                if let Some(svg) = &extra.plot {
                    plot::check_path(svg)?;
                }
                let mut base = Options {
                    format: extra.format,
                    zero_point: extra.zero_point,
                    accuracy_level: default_accuracy_level(extra.format),
                    ..Options::default()
                };
                let calibration = &mut base.awq.calibration;
                calibration.random = extra.calibration_random;
                if let Some(text) = &extra.calibration_text {
                    use crate::calibrate::text::{find_tokenizer, text_windows, DEFAULT_SAMPLES};
                    let tokenizer = find_tokenizer(extra.tokenizer.as_deref(), &original)?;
                    let samples = extra.calibration_samples.unwrap_or(DEFAULT_SAMPLES);
                    calibration.tokens = Some(text_windows(text, &tokenizer, samples, extra.calibration_seq_len)?);
                }
                if let Some(n) = extra.calibration_samples {
                    calibration.samples = n.max(1);
                }
                let opts = sweep::SweepOptions {
                    methods,
                    block_sizes: extra.block_sizes,
                    calibration_data,
                    seed,
                    tokens,
                    logits: extra.logits,
                    output_dir: extra.output_dir,
                    references: extra.reference,
                    base,
                };
                let s = sweep::sweep(&original, &opts)?;
                if json {
                    println!("{}", sweep::json(&s));
                } else {
                    print!("{}", sweep::table(&s));
                }
                if let Some(svg) = &extra.plot {
                    let float = s.float_perplexity.as_ref().map(|p| p.perplexity);
                    plot::write_size_perplexity_svg(&sweep::size_points(&s)?, float, svg)?;
                }
                return Ok(());
            }
            let original = crate::folder::model_file(&original)?;
            let quantized = quantized.map(|q| crate::folder::model_file(&q)).transpose()?;
            let quantized = quantized.expect("clap requires QUANTIZED without --methods");
            let run = compare::RunOptions {
                segment_bytes: match segment_mb {
                    SegmentMb::Mb(mb) if mb > 0 => Some(mb << 20),
                    _ => None,
                },
                segment_auto: segment_mb == SegmentMb::Auto,
                carry_memory: carry_memory_mb << 20,
            }
            .resolved(&original)?;
            if let Some(note) = compare::cut_note(&original, &quantized, &run)? {
                eprintln!("nibble: note: {note}");
            }
            let ppl = match &tokens {
                Some(t) => Some(compare::perplexities(&original, &quantized, t, extra.logits.as_deref(), &run)?),
                None => None,
            };
            let samples = match (&calibration_data, &tokens) {
                (Some(data), _) => compare::samples(&original, Some(data), seed)?,
                // The outputs are compared on the perplexity's sequences (a decoder is fed through
                // its feed plan).
                (None, Some(t)) => {
                    let sequences: Vec<Vec<i64>> = t.ids.chunks(t.length).map(<[i64]>::to_vec).collect();
                    compare::token_samples(&original, &sequences)?
                }
                (None, None) => compare::samples(&original, None, seed)?,
            };
            let reports = compare::compare_samples(&original, &quantized, &samples, &run)?;
            let layers = if per_layer {
                let samples = compare::samples(&original, calibration_data.as_deref(), seed)?;
                compare::compare_layers_with(&original, &quantized, &samples, &run)?
            } else {
                vec![]
            };
            if json {
                let items: Vec<String> = reports
                    .iter()
                    .map(|r| {
                        let weight_only = r
                            .weight_only_relative_error
                            .map_or(String::new(), |v| format!(",\"weight_only_relative_error\":{v}"));
                        format!(
                            "{{\"output\":{:?},\"relative_error\":{},\"max_abs_error\":{},\"cosine\":{},\"top1_agreement\":{}{weight_only}}}",
                            r.name,
                            r.relative_error,
                            r.max_abs_error,
                            r.cosine,
                            r.top1_agreement.map_or("null".to_string(), |v| v.to_string())
                        )
                    })
                    .collect();
                if per_layer {
                    let l: Vec<String> = layers
                        .iter()
                        .map(|l| {
                            format!(
                                "{{\"node\":{:?},\"output\":{:?},\"relative_error\":{}}}",
                                l.node, l.output, l.relative_error
                            )
                        })
                        .collect();
                    println!(
                        "{{\"outputs\":[{}],\"layers\":[{}]{}}}",
                        items.join(","),
                        l.join(","),
                        perplexity_json(&ppl)
                    );
                } else if ppl.is_some() {
                    println!("{{\"outputs\":[{}]{}}}", items.join(","), perplexity_json(&ppl));
                } else {
                    println!("[{}]", items.join(","));
                }
            } else {
                println!("{:<24} {:>12} {:>12} {:>10} {:>8}", "output", "rel. error", "max |diff|", "cosine", "top-1");
                for r in &reports {
                    let top1 = r.top1_agreement.map_or("-".to_string(), |v| format!("{:.1}%", v * 100.0));
                    println!(
                        "{:<24} {:>12.3e} {:>12.3e} {:>10.6} {:>8}",
                        r.name, r.relative_error, r.max_abs_error, r.cosine, top1
                    );
                }
                let gaps: Vec<&compare::OutputReport> =
                    reports.iter().filter(|r| r.weight_only_relative_error.is_some()).collect();
                if !gaps.is_empty() {
                    let option = crate::calibrate::runtime::FUSED_ACCURACY_OPTION;
                    println!(
                        "\nThe errors above are a default ONNX Runtime session's: it fuses DequantizeLinear+MatMul into MatMulNBits\nwith int8 activations ({option}=4). The weights alone ({option}=1, fp32 activations) give:"
                    );
                    for r in gaps {
                        println!("{:<24} {:>12.3e}", r.name, r.weight_only_relative_error.unwrap_or(0.0));
                    }
                    println!(
                        "To get that in deployment, set the session option {option}=1, or quantize with --format matmulnbits --accuracy-level 1."
                    );
                }
                if let Some(p) = &ppl {
                    print!("{}", perplexity_text(p));
                }
                if per_layer {
                    println!("\n{:<56} {:>12}", "quantized layer (worst first)", "rel. error");
                    for l in &layers {
                        println!("{:<56} {:>12.3e}", l.node, l.relative_error);
                    }
                }
            }
        }
        Command::Example { output, kind: Some(kind), force, .. } => {
            let files =
                decoder_example::write_folder(&output, kind, &decoder_example::DecoderConfig::default(), force)?;
            println!("wrote {}: {}", output.display(), files.join(", "));
        }
        Command::Example {
            output,
            kind: None,
            hidden,
            intermediate,
            layers,
            vocab,
            dtype,
            opset,
            external_data,
            force,
        } => {
            let format = match dtype.as_str() {
                "f32" | "float32" => nibble::FloatFormat::F32,
                "f16" | "float16" => nibble::FloatFormat::F16,
                "bf16" | "bfloat16" => nibble::FloatFormat::BF16,
                d => anyhow::bail!("--dtype {d}: use f32, f16 or bf16"),
            };
            if output.exists() && !force {
                anyhow::bail!("output {}: already exists; pass --force to overwrite it", output.display());
            }
            let cfg = TransformerConfig { hidden, intermediate, layers, vocab, format, opset, seed: 1 };
            let written = crate::graph::model::save(transformer(&cfg), &output, external_data)?;
            println!("wrote {} ({} parameters in MatMul weights, {})", output.display(), cfg.parameters(), mb(written));
        }
    }
    Ok(())
}

/// Runs the `nibble` command line on `args` (`args[0]` is the program name) and returns the exit
/// code: 0 done (also after `--help`/`--version`), 1 error (printed as `nibble: error: ...`), 2 usage
/// error (printed by clap). Ctrl-C/SIGTERM remove temporary outputs and exit the process with 130.
pub fn main_with_args(args: Vec<OsString>) -> i32 {
    let cli = match Cli::try_parse_from(args) {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return e.exit_code();
        }
    };
    // Ctrl-C / SIGTERM: remove temporary outputs, exit 130. (A second call in one process keeps
    // the first handler, which does the same.)
    let _ = ctrlc::set_handler(|| {
        crate::cleanup::remove_all();
        eprintln!("nibble: interrupted; no output written");
        crate::cleanup::exit_now(130);
    });
    let code = match run(cli) {
        Ok(()) => 0,
        Err(e) => match e.downcast_ref::<clap::Error>() {
            // Usage errors found after parsing (merge::usage): clap's format and exit code 2.
            Some(usage) => {
                let _ = usage.print();
                usage.exit_code()
            }
            None => {
                eprintln!("nibble: error: {e:#}");
                1
            }
        },
    };
    let _ = std::io::stdout().flush();
    code
}
