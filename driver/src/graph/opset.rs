//! Upgrading the default-domain opset to 21, which INT4 DequantizeLinear with `block_size` needs.
//!
//! Relabelling the opset is only valid for operators whose schema did not change incompatibly
//! between the model's opset and 21. From ONNX's operator changelog, versions 14 to 21:
//!
//! | operator | version | change | conversion here |
//! |---|---|---|---|
//! | ReduceMax, ReduceMin, ReduceMean, ReduceProd, ReduceL1, ReduceL2, ReduceLogSum, ReduceLogSumExp, ReduceSumSquare | 18 | `axes` attribute became the second input | a Constant node with the axes feeds the new input |
//! | BatchNormalization | 14 | training-mode outputs 2-5 removed | extra outputs must be unused; they are dropped |
//! | RoiAlign | 16 | default `coordinate_transformation_mode` became `half_pixel` | the old default `output_half_pixel` is written explicitly |
//! | GridSample | 20 | modes renamed `bilinear` -> `linear`, `bicubic` -> `cubic` | renamed |
//! | DFT | 20 | `axis` attribute (default 1) became the third input (default -2) | a Constant node with the axis feeds the new input |
//! | GroupNormalization | 21 | `scale` and `bias` per group became per channel | each is expanded to `[C]` by nodes (`Expand` of the per-group value to `[G, C/G]`, then `Reshape`) |
//!
//! Every other revision in that range only widened type constraints or added attributes or inputs
//! whose defaults keep the old behaviour (checked, among others: Split 18 `num_outputs`, Pad 18/19
//! `axes` and `wrap`, Resize 18/19, ScatterElements/ScatterND 16/18 `reduction`, Shape 15
//! `start`/`end`, Reshape 14 `allowzero`, Cast/CastLike 19 `saturate` (float8 only), AveragePool 19
//! `dilations`, LpPool 18 `ceil_mode`, GRU/LSTM/RNN 14 `layout`, ReduceMax/ReduceMin 20 bool types,
//! If/Loop/Scan/Identity/Constant/ConstantOfShape/Flatten/Squeeze/Unsqueeze/Transpose/Size and
//! QuantizeLinear/DequantizeLinear 19/21 types). Subgraphs (If/Loop/Scan bodies) and model-local
//! functions are converted too; other domains (`com.microsoft`, ...) are kept as they are.

use super::build::{attr_i, constant_i64, node, Names};
use super::onnx::{
    attribute_proto::AttributeType, AttributeProto, GraphProto, ModelProto, NodeProto, OperatorSetIdProto,
};
use super::read::is_default_domain;
use super::read::{attr, node_label, take_attr};
use crate::error::{Error, Result};
use bytes::Bytes;
use std::collections::HashSet;

/// The opset the DQ form needs.
pub const TARGET: i64 = 21;
/// The oldest opset this pass upgrades from.
pub const OLDEST: i64 = 13;

const REDUCE_18: &[&str] = &[
    "ReduceMax",
    "ReduceMin",
    "ReduceMean",
    "ReduceProd",
    "ReduceL1",
    "ReduceL2",
    "ReduceLogSum",
    "ReduceLogSumExp",
    "ReduceSumSquare",
];

/// The default-domain opset of a model (1 when not imported).
pub fn default_opset(model: &ModelProto) -> i64 {
    opset_of(&model.opset_import)
}

fn opset_of(imports: &[OperatorSetIdProto]) -> i64 {
    imports.iter().find(|o| is_default_domain(o.domain.as_deref())).and_then(|o| o.version).unwrap_or(1)
}

fn set_opset(imports: &mut Vec<OperatorSetIdProto>) {
    match imports.iter_mut().find(|o| is_default_domain(o.domain.as_deref())) {
        Some(o) => o.version = Some(o.version.unwrap_or(1).max(TARGET)),
        None => imports.push(OperatorSetIdProto { domain: Some(String::new()), version: Some(TARGET) }),
    }
}

/// What the upgrade changed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Report {
    /// The model's default-domain opset before.
    pub from: i64,
    /// Nodes rewritten (not counting added Constant/shape nodes).
    pub converted: usize,
}

/// Converts one node list from `version` to 21; returns the number of nodes rewritten.
fn convert_nodes(nodes: &mut Vec<NodeProto>, version: i64, names: &mut Names, used: &HashSet<String>) -> Result<usize> {
    let mut out = Vec::with_capacity(nodes.len());
    let mut converted = 0;
    for mut n in std::mem::take(nodes) {
        // Subgraphs first, each with its own name set.
        for a in n.attribute.iter_mut() {
            for g in a.g.iter_mut().chain(a.graphs.iter_mut()) {
                converted += convert_graph(g, version)?;
            }
        }
        if !is_default_domain(n.domain.as_deref()) {
            out.push(n);
            continue;
        }
        let op = n.op_type.clone().unwrap_or_default();
        let label = node_label(&n);
        if version < 18 && REDUCE_18.contains(&op.as_str()) {
            if let Some(axes) = take_attr(&mut n, "axes") {
                let name = names.fresh(&format!("{label}_axes"));
                out.push(constant_i64(&name, &[axes.ints.len() as i64], &axes.ints));
                n.input.truncate(1);
                n.input.push(name);
                converted += 1;
            }
        } else if version < 14 && op == "BatchNormalization" && n.output.len() > 1 {
            if let Some(o) = n.output[1..].iter().find(|o| !o.is_empty() && used.contains(*o)) {
                return Err(Error::OpsetUpgrade {
                    node: label,
                    op,
                    version,
                    why: format!("its training-mode output '{o}' is used, and BatchNormalization-14 no longer has it"),
                });
            }
            n.output.truncate(1);
            converted += 1;
        } else if version < 16 && op == "RoiAlign" && attr(&n, "coordinate_transformation_mode").is_none() {
            n.attribute.push(AttributeProto {
                name: Some("coordinate_transformation_mode".into()),
                s: Some(Bytes::from_static(b"output_half_pixel")),
                r#type: Some(AttributeType::String as i32),
                ..Default::default()
            });
            converted += 1;
        } else if version < 20 && op == "GridSample" {
            if let Some(a) = n.attribute.iter_mut().find(|a| a.name.as_deref() == Some("mode")) {
                let renamed: Option<&'static [u8]> = match a.s.as_deref() {
                    Some(b"bilinear") => Some(b"linear"),
                    Some(b"bicubic") => Some(b"cubic"),
                    _ => None,
                };
                if let Some(r) = renamed {
                    a.s = Some(Bytes::from_static(r));
                    converted += 1;
                }
            }
        } else if version < 20 && op == "DFT" {
            let axis = take_attr(&mut n, "axis").and_then(|a| a.i).unwrap_or(1);
            let name = names.fresh(&format!("{label}_axis"));
            out.push(constant_i64(&name, &[], &[axis]));
            n.input.resize(2, String::new());
            n.input.push(name);
            converted += 1;
        } else if version < 21 && op == "GroupNormalization" {
            let groups = attr(&n, "num_groups").and_then(|a| a.i).ok_or_else(|| Error::OpsetUpgrade {
                node: label.clone(),
                op: op.clone(),
                version,
                why: "it has no num_groups attribute".into(),
            })?;
            if n.input.len() < 3 {
                return Err(Error::OpsetUpgrade { node: label, op, version, why: "it lacks scale or bias".into() });
            }
            // C / G from the input's shape at run time: per_group[G] -> [G, 1] -> Expand [G, C/G] -> [C].
            let mut p = |s: &str| names.fresh(&format!("{label}_{s}"));
            let (shape, c, g, cg, target, flat) =
                (p("shape"), p("channels"), p("groups"), p("per_group"), p("expand_shape"), p("flat"));
            let (idx, unsq_axes) = (p("channel_index"), p("unsqueeze_axes"));
            out.push(node("Shape", &format!("{shape}_Shape"), &[&n.input[0]], &[&shape], vec![]));
            out.push(constant_i64(&idx, &[1], &[1]));
            out.push(node("Gather", &format!("{c}_Gather"), &[&shape, &idx], &[&c], vec![]));
            out.push(constant_i64(&g, &[1], &[groups]));
            out.push(node("Div", &format!("{cg}_Div"), &[&c, &g], &[&cg], vec![]));
            out.push(node("Concat", &format!("{target}_Concat"), &[&g, &cg], &[&target], vec![attr_i("axis", 0)]));
            out.push(constant_i64(&flat, &[1], &[-1]));
            out.push(constant_i64(&unsq_axes, &[1], &[1]));
            for slot in [1, 2] {
                let src = n.input[slot].clone();
                let u = names.fresh(&format!("{label}_in{slot}_col"));
                let e = names.fresh(&format!("{label}_in{slot}_expanded"));
                let r = names.fresh(&format!("{label}_in{slot}_per_channel"));
                out.push(node("Unsqueeze", &format!("{u}_Unsqueeze"), &[&src, &unsq_axes], &[&u], vec![]));
                out.push(node("Expand", &format!("{e}_Expand"), &[&u, &target], &[&e], vec![]));
                out.push(node("Reshape", &format!("{r}_Reshape"), &[&e, &flat], &[&r], vec![]));
                n.input[slot] = r;
            }
            converted += 1;
        }
        out.push(n);
    }
    *nodes = out;
    Ok(converted)
}

fn used_names(nodes: &[NodeProto], outputs: impl Iterator<Item = String>) -> HashSet<String> {
    fn walk(nodes: &[NodeProto], used: &mut HashSet<String>) {
        for n in nodes {
            used.extend(n.input.iter().cloned());
            for a in &n.attribute {
                for g in a.g.iter().chain(&a.graphs) {
                    walk(&g.node, used);
                    used.extend(g.output.iter().filter_map(|o| o.name.clone()));
                }
            }
        }
    }
    let mut used: HashSet<String> = outputs.collect();
    walk(nodes, &mut used);
    used
}

fn convert_graph(g: &mut GraphProto, version: i64) -> Result<usize> {
    let extra = g
        .initializer
        .iter()
        .filter_map(|t| t.name.clone())
        .chain(g.input.iter().filter_map(|v| v.name.clone()))
        .chain(g.output.iter().filter_map(|v| v.name.clone()))
        // Names in the bodies too: a name added in one scope must not shadow or repeat another's.
        .chain(super::build::ModelNames::tensors_of(g));
    let mut names = Names::of(&g.node, extra);
    let used = used_names(&g.node, g.output.iter().filter_map(|o| o.name.clone()));
    convert_nodes(&mut g.node, version, &mut names, &used)
}

/// Checks that `model` can be upgraded, without changing it: `Ok(false)` when already at >= 21.
pub fn check_upgrade(model: &ModelProto) -> Result<bool> {
    let mut copy = ModelProto {
        opset_import: model.opset_import.clone(),
        graph: model.graph.as_ref().map(|g| GraphProto {
            node: g.node.clone(),
            output: g.output.clone(),
            ..Default::default()
        }),
        functions: model.functions.clone(),
        ..Default::default()
    };
    Ok(upgrade(&mut copy)?.is_some())
}

/// Upgrades the model's default-domain opset to 21, converting what changed; `None` when it is
/// already at 21 or later. Opset < 13, and operators that cannot be converted, are errors.
pub fn upgrade(model: &mut ModelProto) -> Result<Option<Report>> {
    let from = default_opset(model);
    if from >= TARGET {
        return Ok(None);
    }
    if from < OLDEST {
        return Err(Error::OpsetTooOld { version: from });
    }
    let mut converted = 0;
    if let Some(g) = model.graph.as_mut() {
        converted += convert_graph(g, from)?;
    }
    for f in model.functions.iter_mut() {
        let version = if f.opset_import.is_empty() { from } else { opset_of(&f.opset_import) };
        if version < TARGET {
            if version < OLDEST {
                return Err(Error::OpsetTooOld { version });
            }
            let mut names = Names::of(&f.node, f.input.iter().cloned().chain(f.output.iter().cloned()));
            let used = used_names(&f.node, f.output.iter().cloned());
            converted += convert_nodes(&mut f.node, version, &mut names, &used)?;
            if !f.opset_import.is_empty() {
                set_opset(&mut f.opset_import);
            }
        }
    }
    set_opset(&mut model.opset_import);
    Ok(Some(Report { from, converted }))
}
