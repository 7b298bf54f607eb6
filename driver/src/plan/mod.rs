//! Which constants get quantized: every rank-2 float constant (initializer or Constant node) that is
//! the weight input (B) of a MatMul or Gemm not excluded by a `--exclude` pattern. Patterns are
//! regular expressions anchored at the start of the node name, like Python's `re.match` in
//! ModelOpt (default `/lm_head`).

//!
//! INT8 layers (ModelOpt's `layers_8bit`, `enable_mixed_quant`) are chosen in [`mixed`]; Gather
//! (embedding) tables by [`plan_gather`].

pub mod mixed;

use crate::error::{Error, Result};
use crate::graph::model::{byte_size, dtype_name, Model};
use crate::graph::onnx::{tensor_proto::DataType, TensorProto};
use crate::graph::read::{attr_int, constants, Source};
use nibble::{Bits, FloatFormat};
use regex::Regex;

/// What happens to one candidate weight.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Quantized with blocks along this axis of the stored tensor.
    Quantize {
        /// 0 for `[K, N]` weights, 1 for `transB=1` Gemm weights stored `[N, K]`.
        axis: usize,
    },
    /// Left as is because its node matched a pattern.
    Excluded {
        /// The pattern.
        pattern: String,
    },
    /// A float weight of a type that cannot be quantized: an error for `quantize`.
    Unsupported {
        /// Why.
        reason: String,
    },
    /// Left as is for another reason.
    Skipped {
        /// Why.
        reason: String,
    },
}

/// One weight input of a MatMul/Gemm.
#[derive(Clone, Debug)]
pub struct Candidate {
    /// The constant's name.
    pub weight: String,
    /// The first consuming node's name.
    pub node: String,
    /// Its operator.
    pub op: String,
    /// The tensor's dims.
    pub dims: Vec<i64>,
    /// The ONNX data type.
    pub dtype: i32,
    /// Size in bytes.
    pub bytes: usize,
    /// Where it lives.
    pub source: Source,
    /// What happens to it.
    pub decision: Decision,
    /// Code width: 4 bits, or 8 for a mixed-precision INT8 layer (per channel).
    pub bits: Bits,
}

impl Candidate {
    /// The element format, for float weights.
    pub fn format(&self) -> Option<FloatFormat> {
        match DataType::try_from(self.dtype).ok()? {
            DataType::Float => Some(FloatFormat::F32),
            DataType::Float16 => Some(FloatFormat::F16),
            DataType::Bfloat16 => Some(FloatFormat::BF16),
            _ => None,
        }
    }

    /// Its block size given the run's: one block per channel for an INT8 layer.
    pub fn block(&self, default: nibble::BlockSize) -> nibble::BlockSize {
        match self.bits {
            Bits::Four => default,
            Bits::Eight => nibble::BlockSize::PerChannel,
        }
    }

    /// Whether it will be quantized.
    pub fn quantized(&self) -> bool {
        matches!(self.decision, Decision::Quantize { .. })
    }
}

/// Compiles `--exclude` patterns, anchored at the start like `re.match`.
pub fn compile_patterns(patterns: &[String]) -> Result<Vec<(String, Regex)>> {
    patterns
        .iter()
        .map(|p| {
            Regex::new(&format!("^(?:{p})"))
                .map(|r| (p.clone(), r))
                .map_err(|e| Error::Usage(format!("invalid --exclude pattern '{p}': {e}")))
        })
        .collect()
}

impl Candidate {
    /// A 4-bit candidate: constant `t` (`weight`, found at `source`) read by node `node` of type `op`.
    fn four_bit(
        weight: &str,
        node: String,
        op: &str,
        t: &TensorProto,
        source: &Source,
        decision: Decision,
    ) -> Candidate {
        Candidate {
            weight: weight.to_string(),
            node,
            op: op.to_string(),
            dims: t.dims.clone(),
            dtype: t.data_type.unwrap_or(0),
            bytes: byte_size(t).unwrap_or(0),
            source: source.clone(),
            decision,
            bits: Bits::Four,
        }
    }
}

/// Lists every MatMul/Gemm weight and decides its fate.
pub fn plan(model: &Model, exclude: &[(String, Regex)]) -> Vec<Candidate> {
    let g = model.proto.graph.as_ref().expect("graph");
    let consts = constants(model);
    let mut out: Vec<Candidate> = Vec::new();
    for node in &g.node {
        let op = node.op_type.as_deref().unwrap_or("");
        if !matches!(op, "MatMul" | "Gemm") || !matches!(node.domain.as_deref(), None | Some("") | Some("ai.onnx")) {
            continue;
        }
        let Some(wname) = node.input.get(1) else {
            continue;
        };
        let Some((source, t)) = consts.get(wname) else {
            continue;
        };
        let name = node.name.clone().unwrap_or_default();
        let dtype = t.data_type.unwrap_or(0);
        let axis = if op == "Gemm" && attr_int(node, "transB") == Some(1) { 1 } else { 0 };
        let mut decision = if let Some((p, _)) = exclude.iter().find(|(_, r)| r.is_match(&name)) {
            Decision::Excluded { pattern: p.clone() }
        } else if t.dims.len() != 2 {
            Decision::Skipped { reason: format!("rank {} (only 2-D weights are quantized)", t.dims.len()) }
        } else if matches!(DataType::try_from(dtype), Ok(DataType::Double)) {
            Decision::Unsupported { reason: format!("data type {}", dtype_name(dtype)) }
        } else if !matches!(DataType::try_from(dtype), Ok(DataType::Float | DataType::Float16 | DataType::Bfloat16)) {
            Decision::Skipped {
                reason: format!(
                    "data type {} (only float32/float16/bfloat16 weights are quantized)",
                    dtype_name(dtype)
                ),
            }
        } else {
            Decision::Quantize { axis }
        };
        if let Some(prev) = out.iter_mut().find(|c| &c.weight == wname) {
            // A weight shared by several nodes: quantized if any consumer quantizes it, with one layout.
            match (&prev.decision, &decision) {
                (Decision::Quantize { axis: a }, Decision::Quantize { axis: b }) if a != b => {
                    prev.decision = Decision::Skipped {
                        reason: "used both transposed and not by different Gemm/MatMul nodes".into(),
                    };
                }
                (Decision::Quantize { .. }, _) | (Decision::Skipped { .. }, _) => {}
                (Decision::Excluded { .. }, Decision::Quantize { .. }) => {
                    prev.decision = decision.clone();
                    prev.node = name.clone();
                }
                _ => {}
            }
            continue;
        }
        if let Decision::Quantize { .. } = decision {
            if byte_size(t).is_none() {
                decision = Decision::Skipped { reason: "invalid dims".into() };
            }
        }
        out.push(Candidate::four_bit(wname, name, op, t, source, decision));
    }
    out
}

/// The embedding tables of Gather nodes (`--gather-axis`, ModelOpt's `gather_quantize_axis`): every
/// rank-2 float constant read as a Gather's data, blocked along `axis`, unless excluded or already a
/// MatMul/Gemm weight (a tied table keeps the MatMul layout).
pub fn plan_gather(model: &Model, exclude: &[(String, Regex)], axis: usize, taken: &[Candidate]) -> Vec<Candidate> {
    let g = model.proto.graph.as_ref().expect("graph");
    let consts = constants(model);
    let mut out: Vec<Candidate> = Vec::new();
    for node in &g.node {
        if node.op_type.as_deref() != Some("Gather")
            || !matches!(node.domain.as_deref(), None | Some("") | Some("ai.onnx"))
        {
            continue;
        }
        let Some(wname) = node.input.first() else { continue };
        let Some((source, t)) = consts.get(wname) else { continue };
        if out.iter().chain(taken).any(|c| &c.weight == wname) {
            continue;
        }
        let name = node.name.clone().unwrap_or_default();
        let dtype = t.data_type.unwrap_or(0);
        let decision = if let Some((p, _)) = exclude.iter().find(|(_, r)| r.is_match(&name)) {
            Decision::Excluded { pattern: p.clone() }
        } else if t.dims.len() != 2 {
            Decision::Skipped { reason: format!("rank {} (only 2-D tables are quantized)", t.dims.len()) }
        } else if !matches!(DataType::try_from(dtype), Ok(DataType::Float | DataType::Float16 | DataType::Bfloat16)) {
            Decision::Skipped { reason: format!("data type {}", dtype_name(dtype)) }
        } else if byte_size(t).is_none() {
            Decision::Skipped { reason: "invalid dims".into() }
        } else {
            Decision::Quantize { axis }
        };
        out.push(Candidate::four_bit(wname, name, "Gather", t, source, decision));
    }
    out
}
