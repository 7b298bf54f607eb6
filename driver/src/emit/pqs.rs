//! Pre-quant scales in the graph: the activation of an AWQ-scaled weight must be divided by `s`.
//!
//! As ModelOpt writes it:
//! - activation that is a graph input, or no sibling fusion: one Mul per weight, `W_PQS`, with
//!   initializer `W_awq_scale = 1/s` (`[1, K]`) and output `W_PQS_Tensor`;
//! - otherwise, when the producing node is a scaling op with an initializer (Mul,
//!   SimplifiedLayerNormalization, SkipSimplifiedLayerNormalization, MatMul, Gemm) and every consumer
//!   of the activation is one of the quantized nodes: the producer's scaling initializer is divided
//!   by `s` (no new node);
//! - otherwise one shared Mul `<act>_pre_quant_scale_mul` with initializer
//!   `<parent_out>_pre_quant_scale = 1/s` (`[1, K]`) and output `<parent_out>_pre_quant_scale_out`,
//!   read by the quantized consumers only.
//!
//! Where ModelOpt folds wrongly, nibble folds correctly or falls back to the Mul: only the
//! producer's first output is folded; a MatMul producer has only its B divided (along its last
//! axis), a Gemm producer its B along the output axis (axis 0 with `transB=1`) and its bias C; a
//! SkipSimplifiedLayerNormalization only its gamma (its bias is added before normalizing); a scalar
//! Mul constant becomes a `[K]` vector; any other shape is not folded. A producer whose own weight is
//! quantized is divided before that weight is quantized (ModelOpt loses the division there).

use crate::error::Result;
use crate::graph::build::ModelNames;
use crate::graph::floats::{decode_floats, encode_floats};
use crate::graph::model::Model;
use crate::graph::onnx::{GraphProto, NodeProto, TensorProto};
use crate::graph::readers::{Def, Index, NodeAt};
use crate::methods::awq::{AwqResult, Group};
use bytes::Bytes;
use nibble::FloatFormat;
use std::collections::HashSet;

fn format_of(t: &TensorProto) -> Option<FloatFormat> {
    match t.data_type? {
        1 => Some(FloatFormat::F32),
        10 => Some(FloatFormat::F16),
        16 => Some(FloatFormat::BF16),
        _ => None,
    }
}

/// A division of a producer's initializer to apply.
struct Fold {
    initializer: String,
    /// Divide along axis 0 (Gemm B with transB=1) instead of the last axis.
    rows: bool,
}

/// Which initializers of `parent` to divide, or `None` if it cannot be folded.
fn fold_plan(parent: &NodeProto, g: &GraphProto, k: usize) -> Option<Vec<Fold>> {
    let init = |name: &str| g.initializer.iter().find(|t| t.name.as_deref() == Some(name));
    let last_is_k = |t: &TensorProto| t.dims.last() == Some(&(k as i64));
    let scalar = |t: &TensorProto| t.dims.iter().product::<i64>() == 1;
    let op = parent.op_type.as_deref().unwrap_or("");
    let input = |i: usize| parent.input.get(i).and_then(|n| init(n)).filter(|t| format_of(t).is_some());
    let folds: Vec<Fold> = match op {
        "Mul" => {
            let c: Vec<&TensorProto> = (0..2).filter_map(input).collect();
            if c.len() != 1 || !(last_is_k(c[0]) || scalar(c[0])) {
                return None;
            }
            vec![Fold { initializer: c[0].name.clone()?, rows: false }]
        }
        "SimplifiedLayerNormalization" => {
            vec![Fold { initializer: input(1).filter(|t| last_is_k(t))?.name.clone()?, rows: false }]
        }
        "SkipSimplifiedLayerNormalization" => {
            vec![Fold { initializer: input(2).filter(|t| last_is_k(t))?.name.clone()?, rows: false }]
        }
        "MatMul" => vec![Fold {
            initializer: input(1).filter(|t| t.dims.len() == 2 && last_is_k(t))?.name.clone()?,
            rows: false,
        }],
        "Gemm" => {
            let trans_b = parent.attribute.iter().any(|a| a.name.as_deref() == Some("transB") && a.i == Some(1));
            let b = input(1)?;
            let ok = if trans_b { b.dims.first() == Some(&(k as i64)) } else { last_is_k(b) };
            if !ok {
                return None;
            }
            let mut f = vec![Fold { initializer: b.name.clone()?, rows: trans_b }];
            match parent.input.get(2).filter(|n| !n.is_empty()) {
                None => {}
                Some(c) => {
                    let c = init(c).filter(|t| format_of(t).is_some() && (last_is_k(t) || scalar(t)))?;
                    f.push(Fold { initializer: c.name.clone()?, rows: false });
                }
            }
            f
        }
        _ => return None,
    };
    Some(folds)
}

/// Divides an initializer by `s` (last axis, or axis 0 with `rows`).
fn divide(model: &Model, t: &mut TensorProto, s: &[f32], rows: bool) -> Result<()> {
    let format = format_of(t).expect("float initializer");
    let v = decode_floats(format, &model.tensor_bytes(t)?);
    let k = s.len();
    let out: Vec<f32> = if v.len() == 1 && k > 1 {
        t.dims = vec![k as i64];
        s.iter().map(|&sk| format.round(v[0] / sk)).collect()
    } else if rows {
        let cols = v.len() / k;
        v.iter().enumerate().map(|(e, &x)| format.round(x / s[e / cols])).collect()
    } else {
        v.iter().enumerate().map(|(e, &x)| format.round(x / s[e % k])).collect()
    };
    t.raw_data = Some(Bytes::from(encode_floats(format, &out)));
    t.float_data.clear();
    t.int32_data.clear();
    t.external_data.clear();
    t.data_location = None;
    Ok(())
}

/// `1/s` as a `[1, K]` initializer of `format`.
fn inverse(name: String, s: &[f32], format: FloatFormat) -> TensorProto {
    let inv: Vec<f32> = s.iter().map(|&v| format.round(1.0 / v)).collect();
    crate::graph::build::init(&name, &[1, s.len()], &inv, format)
}

/// Mul nodes and initializers to add after the DQ rewrite.
#[derive(Default)]
pub struct Insertions {
    /// New Mul nodes.
    pub nodes: Vec<NodeProto>,
    /// Their scale initializers.
    pub initializers: Vec<TensorProto>,
    /// `(node index, new first input)`: quantized consumers reading a Mul output.
    pub rewire: Vec<(usize, String)>,
}

/// Folds what can be folded into producers' initializers (in place, before quantization) and
/// returns the Mul nodes for the rest.
pub fn apply(
    model: &mut Model,
    awq: &AwqResult,
    format_of_weight: &dyn Fn(&str) -> FloatFormat,
    fuse: bool,
    names: &mut ModelNames,
) -> Result<Insertions> {
    let mut ins = Insertions::default();
    let g = model.proto.graph.clone().expect("graph");
    let idx = Index::build(&g);
    let inputs: HashSet<&str> = g.input.iter().filter_map(|v| v.name.as_deref()).collect();
    // An initializer of the main graph read by its producer alone (in the whole model) can be divided.
    let read_once = |name: &str| {
        idx.constants.iter().position(|k| k.graph.is_empty() && k.name == name).is_some_and(|k| {
            let d = Def::Constant(k);
            !idx.outputs.contains(&d) && idx.readers(&d).iter().map(|u| &u.at).collect::<HashSet<_>>().len() == 1
        })
    };
    for Group { activation, weights, nodes } in &awq.groups {
        let scales: Vec<&Vec<f32>> =
            weights.iter().filter_map(|w| awq.weights.get(w).and_then(|a| a.scale.as_ref())).collect();
        if scales.len() != weights.len() {
            continue; // awq_clip: no pre-quant scale
        }
        let format = format_of_weight(&weights[0]);
        let producer = g.node.iter().find(|n| n.output.iter().any(|o| o == activation));
        // Siblings with different scales (not fused: see awq::search) need one Mul each.
        let per_weight = !fuse
            || inputs.contains(activation.as_str())
            || producer.is_none()
            || scales.iter().any(|s| *s != scales[0]);
        if per_weight {
            for ((w, &n), s) in weights.iter().zip(nodes).zip(&scales) {
                let scale = names.tensor(&format!("{w}_awq_scale"));
                let out = names.tensor(&format!("{w}_PQS_Tensor"));
                ins.initializers.push(inverse(scale.clone(), s, format));
                ins.nodes.push(crate::graph::build::node(
                    "Mul",
                    &names.node(&format!("{w}_PQS")),
                    &[activation, &scale],
                    &[&out],
                    vec![],
                ));
                ins.rewire.push((n, out));
            }
            continue;
        }
        let parent = producer.expect("checked");
        let s = scales[0];
        // Every reader of the activation, bodies included, must be one of the quantized nodes.
        let parent_at =
            NodeAt { graph: vec![], node: g.node.iter().position(|n| std::ptr::eq(n, parent)).expect("in g") };
        let act_def = Def::Node(parent_at, 0);
        let consumers: HashSet<&NodeAt> = idx.readers(&act_def).iter().map(|u| &u.at).collect();
        let all_quantized = consumers.len() == nodes.len()
            && consumers.iter().all(|a| a.graph.is_empty())
            && !idx.outputs.contains(&act_def);
        let first_output = parent.output.first() == Some(activation);
        let plan = (all_quantized && first_output)
            .then(|| fold_plan(parent, &g, s.len()))
            .flatten()
            .filter(|folds| folds.iter().all(|f| read_once(&f.initializer)));
        match plan {
            Some(folds) => {
                let graph = model.proto.graph.take().expect("graph");
                let mut graph = graph;
                let result = folds.iter().try_for_each(|f| {
                    let t = graph
                        .initializer
                        .iter_mut()
                        .find(|t| t.name.as_deref() == Some(f.initializer.as_str()))
                        .expect("planned");
                    divide(model, t, s, f.rows)
                });
                model.proto.graph = Some(graph);
                result?;
            }
            None => {
                let parent_out = parent.output.first().cloned().unwrap_or_default();
                let scale = names.tensor(&format!("{parent_out}_pre_quant_scale"));
                let out = names.tensor(&format!("{parent_out}_pre_quant_scale_out"));
                ins.initializers.push(inverse(scale.clone(), s, format));
                ins.nodes.push(crate::graph::build::node(
                    "Mul",
                    &names.node(&format!("{activation}_pre_quant_scale_mul")),
                    &[activation, &scale],
                    &[&out],
                    vec![],
                ));
                for &n in nodes {
                    ins.rewire.push((n, out.clone()));
                }
            }
        }
    }
    Ok(ins)
}

/// Inserts each Mul right after the node producing its input (at the start for graph inputs).
pub fn insert_after_producers(g: &mut GraphProto, nodes: Vec<NodeProto>) {
    for n in nodes {
        let act = n.input.first().cloned().unwrap_or_default();
        let at = g.node.iter().position(|p| p.output.contains(&act)).map_or(0, |i| i + 1);
        g.node.insert(at, n);
    }
}
