//! The default-domain opset of the output: INT4 DequantizeLinear with `block_size` needs opset 21.
//!
//! Raising the number alone is only valid when no operator in the graph changed incompatibly
//! between the model's opset and 21. Those changes (from ONNX's operator changelog) are listed in
//! [`BREAKING`]; a model that uses one is refused with an error naming the node until a converter
//! for it exists. Every other operator revision in 14..=21 only added types or optional
//! attributes/inputs with defaults that keep the old behaviour.

use crate::onnx::{GraphProto, ModelProto, OperatorSetIdProto};
use crate::{Error, Result};

/// The opset the DQ form needs.
pub const TARGET: i64 = 21;

/// `(operator, version that changed it)`: models below that version using the operator cannot
/// simply be relabelled.
pub const BREAKING: &[(&str, i64)] = &[
    // opset 18: `axes` moved from attribute to input.
    ("ReduceMax", 18),
    ("ReduceMin", 18),
    ("ReduceMean", 18),
    ("ReduceProd", 18),
    ("ReduceL1", 18),
    ("ReduceL2", 18),
    ("ReduceLogSum", 18),
    ("ReduceLogSumExp", 18),
    ("ReduceSumSquare", 18),
    // opset 18: Split got `num_outputs`; the old form stays valid. Kept out of this list.
    // opset 16: RoiAlign's default coordinate_transformation_mode became half_pixel.
    ("RoiAlign", 16),
    // opset 20: GridSample's modes renamed (bilinear -> linear, bicubic -> cubic).
    ("GridSample", 20),
    // opset 20: DFT's `axis` attribute became an input.
    ("DFT", 20),
    // opset 21: GroupNormalization's scale and bias became per channel.
    ("GroupNormalization", 21),
    // opset 14: BatchNormalization dropped the training-mode outputs (4 and 5).
    ("BatchNormalization", 14),
];

/// The default-domain opset of a model (1 when not imported).
pub fn default_opset(model: &ModelProto) -> i64 {
    model
        .opset_import
        .iter()
        .find(|o| matches!(o.domain.as_deref(), None | Some("") | Some("ai.onnx")))
        .and_then(|o| o.version)
        .unwrap_or(1)
}

fn check_graph(g: &GraphProto, version: i64) -> Result<()> {
    for n in &g.node {
        let default_domain = matches!(n.domain.as_deref(), None | Some("") | Some("ai.onnx"));
        let op = n.op_type.as_deref().unwrap_or("");
        if default_domain {
            if let Some(&(_, changed)) = BREAKING.iter().find(|(name, _)| *name == op) {
                if version < changed {
                    return Err(Error::OpsetUpgrade {
                        node: n.name.clone().unwrap_or_default(),
                        op: op.to_string(),
                        version,
                    });
                }
            }
        }
        for a in &n.attribute {
            for sub in a.g.iter().chain(&a.graphs) {
                check_graph(sub, version)?;
            }
        }
    }
    Ok(())
}

/// Whether upgrading `model` to opset 21 is needed, and an error if it cannot be done.
pub fn check_upgrade(model: &ModelProto) -> Result<bool> {
    let version = default_opset(model);
    if version >= TARGET {
        return Ok(false);
    }
    if version < 13 {
        return Err(Error::OpsetTooOld { version });
    }
    if let Some(g) = &model.graph {
        check_graph(g, version)?;
    }
    for f in &model.functions {
        let g = GraphProto { node: f.node.clone(), ..Default::default() };
        check_graph(&g, version)?;
    }
    Ok(true)
}

/// Sets the default-domain opset to at least 21 (after [`check_upgrade`]).
pub fn raise(model: &mut ModelProto) {
    match model.opset_import.iter_mut().find(|o| matches!(o.domain.as_deref(), None | Some("") | Some("ai.onnx"))) {
        Some(o) => o.version = Some(o.version.unwrap_or(1).max(TARGET)),
        None => model.opset_import.push(OperatorSetIdProto { domain: Some(String::new()), version: Some(TARGET) }),
    }
}
