//! `nibble inspect`: the model's opset and every MatMul/Gemm weight (If/Loop/Scan bodies included,
//! and weights reached through constant chains) with what `quantize` would do, and under each
//! weight every node that reads it with what that reader gets: the quantized weight, or the
//! original float tensor (kept for it) and why. Weights left float say why.

use crate::error::Result;
use crate::graph::model::{dtype_name, Model};
use crate::graph::opset;
use crate::graph::read::node_label;
use crate::graph::readers::{node_at, node_label_at};
use crate::plan::{compile_patterns, plan, Decision, Reads};
use std::fmt::Write;
use std::path::Path;

/// The report as text.
pub fn inspect(path: &Path, exclude: &[String]) -> Result<String> {
    let model = Model::load(path)?;
    let patterns = compile_patterns(exclude)?;
    let candidates = plan(&model, &patterns)?;
    let root = model.proto.graph.as_ref().expect("graph");
    let mut s = String::new();
    let version = opset::default_opset(&model.proto);
    let mut copy = model.proto.clone();
    let upgrade = match opset::upgrade(&mut copy) {
        Ok(Some(r)) => format!("quantizing raises it to {}, converting {} node(s)", opset::TARGET, r.converted),
        Ok(None) => "no upgrade needed".to_string(),
        Err(e) => format!("cannot be upgraded: {e}"),
    };
    let _ = writeln!(s, "model: {}", path.display());
    let _ =
        writeln!(s, "ir_version {}, default-domain opset {version} ({upgrade})", model.proto.ir_version.unwrap_or(0));
    let _ = writeln!(s, "{:<48} {:<6} {:<14} {:<9} {:>12}  decision", "node / weight", "op", "shape", "dtype", "bytes");
    let mut total = 0usize;
    let mut quantized = 0usize;
    for c in &candidates {
        let decision = match &c.decision {
            Decision::Quantize { axis } => {
                quantized += 1;
                total += c.bytes;
                format!("quantize (blocks along axis {axis})")
            }
            Decision::Excluded { pattern } => format!("excluded by '{pattern}'"),
            Decision::Skipped { reason } => format!("skipped: {reason}"),
            Decision::Unsupported { reason } => format!("error: {reason} cannot be quantized (--exclude the node)"),
        };
        let first = c.quantized_uses().next().or_else(|| c.readers.iter().find_map(|r| r.at.as_ref()));
        let label = first.map_or_else(|| c.node.clone(), |u| node_label_at(root, &u.at));
        let source = match &c.folded {
            Some((chain, _)) => {
                let steps: Vec<String> = chain
                    .nodes
                    .iter()
                    .map(|at| {
                        let n = node_at(root, at);
                        format!("{} '{}'", n.op_type.as_deref().unwrap_or(""), node_label(n))
                    })
                    .collect();
                let constant = chain_constant_name(root, c);
                format!(" (folded from '{constant}' through {})", steps.join(", "))
            }
            None if c.base != c.weight => format!(" (its own quantized copy, named {}_*)", c.base),
            None => String::new(),
        };
        let _ = writeln!(
            s,
            "{:<48} {:<6} {:<14} {:<9} {:>12}  {decision}\n  {}{source}",
            label,
            c.op,
            format!("{:?}", c.dims),
            dtype_name(c.dtype).to_lowercase(),
            c.bytes,
            c.weight
        );
        let mut shown: Vec<(String, String)> = vec![];
        for r in &c.readers {
            let key = (r.label.clone(), format!("{:?}", r.reads));
            if shown.contains(&key) {
                continue; // the same node reading it through several inputs
            }
            shown.push(key);
            let layout = match (r.op.as_str(), r.at.as_ref()) {
                ("MatMul" | "Gemm", Some(u)) if u.input == 1 && !r.of_source => {
                    let trans = crate::graph::read::attr_int(node_at(root, &u.at), "transB") == Some(1);
                    format!(", blocks along axis {}", if r.op == "Gemm" && trans { 1 } else { 0 })
                }
                _ => String::new(),
            };
            let what = match (&r.reads, c.quantized()) {
                (Reads::Quantized, true) => "reads the quantized weight".to_string(),
                (Reads::Quantized, false) => "float (the weight stays float)".to_string(),
                (Reads::Original(why), true) => format!("float: {why} (a float copy is kept)"),
                (Reads::Original(why), false) => format!("float: {why}"),
                (Reads::Tied, true) => "reads the head's quantized bytes (tied embedding)".to_string(),
                (Reads::Tied, false) => "float (the head stays float)".to_string(),
            };
            let op = if r.op.is_empty() { String::new() } else { format!(" ({}{layout})", r.op) };
            let _ = writeln!(s, "    reader {}{op}: {what}", r.label);
        }
    }
    for (function, node, op) in crate::plan::function_matmuls(&model) {
        let _ = writeln!(s, "{op} '{node}' in model-local function '{function}': stays float (function bodies are not quantized; export with functions inlined)");
    }
    let _ = writeln!(s, "{quantized} of {} weights would be quantized ({total} bytes)", candidates.len());
    s.push_str(&feed_report(&model));
    Ok(s)
}

/// How calibration and `compare` (with or without `--perplexity`) feed each model input (the feed plan).
fn feed_report(model: &Model) -> String {
    use crate::calibrate::inputs::{feed_plan, shape_text, CalibrationOptions};
    let mut s = String::from("inputs (how calibration and compare feed them):\n");
    match feed_plan(model, &CalibrationOptions::default()) {
        Ok(plan) => {
            for (spec, feed) in &plan.inputs {
                let _ = writeln!(s, "  {}{}: {}", spec.name, shape_text(spec), feed.describe(plan.past));
            }
            if plan.has_tokens() {
                let _ = writeln!(
                    s,
                    "  (token ids: awq/gptq methods need --calibration-data, or --calibration-random to accept random ids)"
                );
            }
        }
        Err(e) => {
            let _ = writeln!(s, "  cannot plan the inputs: {e}");
        }
    }
    s
}

/// The name of the constant a folded chain starts from.
fn chain_constant_name(root: &crate::graph::onnx::GraphProto, c: &crate::plan::Candidate) -> String {
    let Some((chain, _)) = &c.folded else { return c.weight.clone() };
    let first = node_at(root, &chain.nodes[0]);
    first.input.first().cloned().unwrap_or_default()
}
