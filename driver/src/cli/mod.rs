//! The `nibble` command line: argument parsing, the four commands (quantize, inspect, compare,
//! example) and their printed output. [`main_with_args`] is the whole program; the `nibble` binary
//! (and the Python package) only call it.

pub mod compare;
pub mod example;
pub mod inspect;

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
        /// The input model (.onnx, with its external data next to it).
        model: PathBuf,
        /// Output model; default MODEL_int4.onnx next to the input.
        #[arg(short, long)]
        output: Option<PathBuf>,
        /// Algorithm.
        #[arg(long, value_enum, default_value = "rtn_dq")]
        method: Method,
        /// Block size along K (even, >= 2), or -1 for per-channel.
        #[arg(long, default_value_t = 128, allow_negative_numbers = true)]
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
        /// Output form: DequantizeLinear (ModelOpt's) or ONNX Runtime's MatMulNBits.
        #[arg(long, value_enum, default_value = "dq")]
        format: crate::pipeline::Format,
        /// MatMulNBits accuracy_level (0 unset, 1 fp32, 2 fp16, 3 bf16, 4 int8 activations).
        #[arg(long, default_value_t = 0)]
        accuracy_level: i64,
        /// Also quantize Gather (embedding) tables, blocked along this axis (0 or 1).
        #[arg(long)]
        gather_axis: Option<usize>,
        /// Block size of the Gather tables.
        #[arg(long, default_value_t = 32)]
        gather_block_size: i64,
        /// Keep these layers at INT8 per channel (ModelOpt's layers_8bit): comma-separated node
        /// names or dot/slash-separated parts of them, e.g. layers.0,/model/layers.5/mlp/down_proj/MatMul.
        #[arg(long, value_name = "PATTERNS")]
        int8_layers: Option<String>,
        /// Keep ModelOpt's default choice of sensitive layers at INT8 (enable_mixed_quant): the first and
        /// last eighth and every third of the qkv/v_proj and down_proj MatMuls.
        #[arg(long)]
        mixed_precision: bool,
        /// Choose each block's scale by a data-free search (ModelOpt's 15-level and ONNX Runtime's
        /// 16-level grids, clip ratios 0.5..1; lowest weight error) instead of ModelOpt's formula
        /// (rtn_dq, rtn, gptq, awq_gptq).
        #[arg(long)]
        scale_search: bool,
        #[command(flatten)]
        awq: AwqArgs,
        #[command(flatten)]
        gptq: GptqArgs,
    },
    /// List the model's opset and each MatMul/Gemm weight with what quantize would do.
    Inspect {
        /// The model.
        model: PathBuf,
        /// As for quantize.
        #[arg(long = "exclude", value_name = "REGEX")]
        exclude: Vec<String>,
    },
    /// Run ORIGINAL and QUANTIZED in ONNX Runtime on the same seeded inputs and report the error
    /// of every output.
    Compare {
        /// The float model.
        original: PathBuf,
        /// Its quantized form.
        quantized: PathBuf,
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
    },
    /// Write a synthetic transformer-like model (seeded random weights) for trying nibble out.
    Example {
        /// Output model.
        output: PathBuf,
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
}

/// Options of the AWQ methods.
#[derive(clap::Args)]
#[command(next_help_heading = "AWQ (awq_lite, awq_clip, awq_full)")]
struct AwqArgs {
    /// Calibration inputs: .npz with one array per model input (samples stacked on the first
    /// axis), or .npy for a single-input model. Default: seeded random inputs.
    #[arg(long, value_name = "FILE")]
    calibration_data: Option<PathBuf>,
    /// Sizes of symbolic input dimensions for random calibration, e.g. input_ids:1x128.
    #[arg(long, value_name = "NAME:DIMS,...")]
    calibration_shapes: Option<String>,
    /// Number of random calibration samples (without --calibration-data).
    #[arg(long, default_value_t = 8)]
    calibration_samples: usize,
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
    /// Activation memory held at once during calibration, in MiB.
    #[arg(long, default_value_t = 1024)]
    calibration_memory_mb: usize,
    /// Print each weight's AWQ choice.
    #[arg(short, long)]
    verbose: bool,
}

impl AwqArgs {
    fn options(&self) -> anyhow::Result<crate::methods::awq::AwqOptions> {
        use crate::calibrate::{parse_shapes, CalibrationOptions};
        let shapes = self.calibration_shapes.as_deref().map(parse_shapes).transpose()?.unwrap_or_default();
        for (name, v) in [("--alpha-step", self.alpha_step), ("--clip-alpha-step", self.clip_alpha_step)] {
            if !(v > 0.0 && v <= 1.0) {
                anyhow::bail!("{name} {v}: use a step in (0, 1]");
            }
        }
        if !(self.clip_alpha_min > 0.0 && self.clip_alpha_min <= 1.0) {
            anyhow::bail!("--clip-alpha-min {}: use a ratio in (0, 1]", self.clip_alpha_min);
        }
        Ok(crate::methods::awq::AwqOptions {
            method: crate::methods::awq::AwqMethod::Lite,
            alpha_step: self.alpha_step,
            clip_alpha_step: self.clip_alpha_step,
            clip_alpha_min: self.clip_alpha_min,
            fuse: !self.no_fuse_siblings,
            calibration: CalibrationOptions {
                data: self.calibration_data.clone(),
                inputs: None,
                shapes,
                samples: self.calibration_samples.max(1),
                seed: self.calibration_seed,
            },
            memory_budget: self.calibration_memory_mb.max(1) << 20,
            per_subgraph: self.per_subgraph,
            verbose: self.verbose,
        })
    }
}

fn mb(bytes: u64) -> String {
    format!("{:.1} MB", bytes as f64 / 1e6)
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
            scale_search,
            awq,
            gptq,
        } => {
            let output = output.unwrap_or_else(|| default_output(&model));
            let exclude = if no_default_exclude {
                vec![]
            } else if exclude.is_empty() {
                vec!["/lm_head".to_string()]
            } else {
                exclude.into_iter().filter(|p| !p.is_empty()).collect()
            };
            let opts = Options {
                method,
                block_size,
                zero_point,
                exclude,
                external_data,
                force,
                awq: awq.options()?,
                gptq: crate::methods::gptq::GptqOptions {
                    percdamp: gptq.percdamp,
                    lazy_batch: gptq.gptq_batch,
                    act_order: gptq.act_order,
                    scale_search,
                },
                scale_search,
                skip_nonfinite,
                format,
                accuracy_level,
                gather_axis,
                gather_block_size,
                int8_layers,
                mixed_precision,
                fsync,
            };
            let s = quantize_file(&model, &output, &opts)?;
            let int8 = if s.int8 > 0 { format!(" ({} at INT8)", s.int8) } else { String::new() };
            println!(
                "quantized {} of {} weights{int8} ({} -> {}); model {} -> {}{}; {:.2} s ({} tier) -> {}",
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
        Command::Inspect { model, exclude } => {
            let exclude = if exclude.is_empty() { vec!["/lm_head".to_string()] } else { exclude };
            print!("{}", inspect::inspect(&model, &exclude)?);
        }
        Command::Compare { original, quantized, seed, calibration_data, per_layer, json } => {
            let reports = match &calibration_data {
                Some(data) => compare::compare_with_data(&original, &quantized, data)?,
                None => compare::compare(&original, &quantized, seed)?,
            };
            let layers = if per_layer {
                let samples = compare::samples(&original, calibration_data.as_deref(), seed)?;
                compare::compare_layers(&original, &quantized, &samples)?
            } else {
                vec![]
            };
            if json {
                let items: Vec<String> = reports
                    .iter()
                    .map(|r| {
                        format!(
                            "{{\"output\":{:?},\"relative_error\":{},\"max_abs_error\":{},\"cosine\":{},\"top1_agreement\":{}}}",
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
                    println!("{{\"outputs\":[{}],\"layers\":[{}]}}", items.join(","), l.join(","));
                } else {
                    println!("[{}]", items.join(","));
                }
            } else {
                println!("{:<24} {:>12} {:>12} {:>10} {:>8}", "output", "rel. error", "max |diff|", "cosine", "top-1");
                for r in reports {
                    let top1 = r.top1_agreement.map_or("-".to_string(), |v| format!("{:.1}%", v * 100.0));
                    println!(
                        "{:<24} {:>12.3e} {:>12.3e} {:>10.6} {:>8}",
                        r.name, r.relative_error, r.max_abs_error, r.cosine, top1
                    );
                }
                if per_layer {
                    println!("\n{:<56} {:>12}", "quantized layer (worst first)", "rel. error");
                    for l in &layers {
                        println!("{:<56} {:>12.3e}", l.node, l.relative_error);
                    }
                }
            }
        }
        Command::Example { output, hidden, intermediate, layers, vocab, dtype, opset, external_data, force } => {
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
        std::process::exit(130);
    });
    let code = match run(cli) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("nibble: error: {e:#}");
            1
        }
    };
    let _ = std::io::stdout().flush();
    code
}
