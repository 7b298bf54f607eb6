//! `nibble inspect`: the model's opset and every MatMul/Gemm weight with what `quantize` would do.

use crate::error::Result;
use crate::graph::model::{dtype_name, Model};
use crate::graph::opset;
use crate::plan::{compile_patterns, plan, Decision};
use std::fmt::Write;
use std::path::Path;

/// The report as text.
pub fn inspect(path: &Path, exclude: &[String]) -> Result<String> {
    let model = Model::load(path)?;
    let patterns = compile_patterns(exclude)?;
    let candidates = plan(&model, &patterns);
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
        let _ = writeln!(
            s,
            "{:<48} {:<6} {:<14} {:<9} {:>12}  {decision}\n  {}",
            c.node,
            c.op,
            format!("{:?}", c.dims),
            dtype_name(c.dtype).to_lowercase(),
            c.bytes,
            c.weight
        );
    }
    let _ = writeln!(s, "{quantized} of {} weights would be quantized ({total} bytes)", candidates.len());
    Ok(s)
}
