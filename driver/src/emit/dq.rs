//! The DequantizeLinear forms (opset 21), ModelOpt's output graph.
//!
//! Per quantized weight `W` in the DQ form ([`Form::Dq`]: `rtn_dq` and the AWQ methods): initializers
//! `W_i4` (INT4, or UINT4 with a zero point; INT8/UINT8 for INT8 layers; the original dims),
//! `W_scale` (the weight's dtype; `[ceil(K/B), N]`, 1-D `[N]` per channel), `W_zp` (zero point
//! only); node `W_DequantizeLinear` with attributes `axis` and `block_size` writing
//! `W_DequantizeLinear_Output`, which every former consumer of `W` reads. The QDQ form
//! ([`Form::Qdq`], `rtn`) keeps `W` and inserts `W_QuantizeLinear` -> `W_DequantizeLinear` with valid
//! blocked attributes on both (ModelOpt writes none, which ONNX Runtime rejects).
//!
//! Only graph edits: the numbers come in as [`QuantizedWeight`]s.

use crate::graph::build::{attr_i, tensor, value_info};
use crate::graph::floats::{encode_floats, onnx_type};
use crate::graph::model::Model;
use crate::graph::onnx::{tensor_proto::DataType, NodeProto, TensorProto, ValueInfoProto};
use crate::graph::read::{subgraph_inputs, Source};
use crate::plan::{Candidate, Decision};
use nibble::{Bits, BlockSize, QuantizedWeight};

/// Which DequantizeLinear form to write.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Form {
    /// Codes stored as initializers, dequantized by one DequantizeLinear (`rtn_dq`, AWQ).
    Dq,
    /// The float weight kept, QuantizeLinear -> DequantizeLinear on it (`rtn`).
    Qdq,
}

/// Replaces every chosen weight of the top-level graph by its quantized form; `quantized[i]` is
/// `chosen[i]`'s, blocked as `block_of` says. Returns the bytes of the added codes, scales and zero points.
pub fn rewrite(
    model: &mut Model,
    chosen: &[&Candidate],
    quantized: Vec<QuantizedWeight>,
    block_of: impl Fn(&Candidate) -> BlockSize,
    form: Form,
) -> u64 {
    let replacements: Vec<Replacement> =
        chosen.iter().zip(quantized).map(|(c, q)| replacement(c, q, block_of(c), form)).collect();
    let bytes = replacements.iter().map(|r| r.bytes).sum();
    let sources: Vec<(String, Source)> = chosen.iter().map(|c| (c.weight.clone(), c.source.clone())).collect();
    apply(model, replacements, &sources);
    bytes
}

/// The nodes and tensors replacing one weight.
struct Replacement {
    weight: String,
    nodes: Vec<NodeProto>,
    initializers: Vec<TensorProto>,
    value_info: Vec<ValueInfoProto>,
    dq_output: String,
    keep_original: bool,
    bytes: u64,
}

fn replacement(c: &Candidate, q: QuantizedWeight, block: BlockSize, form: Form) -> Replacement {
    let Decision::Quantize { axis } = c.decision else { unreachable!() };
    let format = c.format().expect("float weight");
    let w = &c.weight;
    let code_type = match (c.bits, q.zero_point.is_some()) {
        (Bits::Four, false) => DataType::Int4,
        (Bits::Four, true) => DataType::Uint4,
        (Bits::Eight, false) => DataType::Int8,
        (Bits::Eight, true) => DataType::Uint8,
    } as i32;
    let scale_dims: Vec<i64> = match block {
        BlockSize::PerChannel => vec![q.scale.len() as i64],
        BlockSize::Blocked(_) => q.scale_shape.iter().map(|&d| d as i64).collect(),
    };
    let mut attrs = vec![];
    match block {
        BlockSize::PerChannel => attrs.push(attr_i("axis", 1 - axis as i64)),
        BlockSize::Blocked(b) => {
            attrs.push(attr_i("axis", axis as i64));
            attrs.push(attr_i("block_size", b as i64));
        }
    }
    let scale_name = format!("{w}_scale");
    let zp_name = format!("{w}_zp");
    let dq_out = format!("{w}_DequantizeLinear_Output");
    let mut initializers =
        vec![tensor(scale_name.clone(), scale_dims.clone(), onnx_type(format), encode_floats(format, &q.scale))];
    let zp_bytes = match &q.zero_point {
        Some(z) if c.bits == Bits::Four => Some(nibble::reference::pack(z)),
        Some(z) => Some(z.clone()),
        None if form == Form::Qdq => Some(vec![0u8; c.bits.bytes_for(q.scale.len())]),
        None => None,
    };
    if let Some(zb) = zp_bytes {
        initializers.push(tensor(zp_name.clone(), scale_dims.clone(), code_type, zb));
    }
    let mut dq_inputs = vec![String::new(), scale_name.clone()];
    if initializers.len() == 2 {
        dq_inputs.push(zp_name.clone());
    }
    let mut nodes = vec![];
    let mut value_infos = vec![];
    match form {
        Form::Dq => {
            let codes = format!("{w}_i4");
            initializers.insert(0, tensor(codes.clone(), c.dims.clone(), code_type, q.packed));
            dq_inputs[0] = codes;
        }
        Form::Qdq => {
            let q_out = format!("{w}_QuantizeLinear_Output");
            let mut q_inputs = vec![w.clone(), scale_name.clone()];
            q_inputs.push(zp_name.clone());
            nodes.push(NodeProto {
                name: Some(format!("{w}_QuantizeLinear")),
                op_type: Some("QuantizeLinear".into()),
                input: q_inputs,
                output: vec![q_out.clone()],
                attribute: attrs.clone(),
                ..Default::default()
            });
            value_infos.push(value_info(q_out.clone(), code_type, &c.dims));
            dq_inputs[0] = q_out;
        }
    }
    nodes.push(NodeProto {
        name: Some(format!("{w}_DequantizeLinear")),
        op_type: Some("DequantizeLinear".into()),
        input: dq_inputs,
        output: vec![dq_out.clone()],
        attribute: attrs,
        ..Default::default()
    });
    value_infos.push(value_info(dq_out.clone(), onnx_type(format), &c.dims));
    let bytes = initializers.iter().map(|t| t.raw_data.as_ref().map_or(0, |r| r.len() as u64)).sum();
    Replacement {
        weight: w.clone(),
        nodes,
        initializers,
        value_info: value_infos,
        dq_output: dq_out,
        keep_original: form == Form::Qdq,
        bytes,
    }
}

/// Applies the replacements to the top-level graph.
fn apply(model: &mut Model, replacements: Vec<Replacement>, sources: &[(String, Source)]) {
    let g = model.proto.graph.as_mut().expect("graph");
    let by_weight: std::collections::HashMap<&str, &Replacement> =
        replacements.iter().map(|r| (r.weight.as_str(), r)).collect();
    // Names still needed elsewhere (graph outputs, subgraphs) keep their original tensor.
    let mut outer_refs = std::collections::HashSet::new();
    for o in &g.output {
        outer_refs.insert(o.name.clone().unwrap_or_default());
    }
    outer_refs.extend(subgraph_inputs(g));
    let removed_constant_nodes: std::collections::HashSet<usize> = sources
        .iter()
        .filter(|(w, _)| !by_weight[w.as_str()].keep_original && !outer_refs.contains(w))
        .filter_map(|(_, s)| if let Source::ConstantNode(i) = s { Some(*i) } else { None })
        .collect();
    let removed_initializers: std::collections::HashSet<String> = sources
        .iter()
        .filter(|(w, s)| {
            matches!(s, Source::Initializer(_)) && !by_weight[w.as_str()].keep_original && !outer_refs.contains(w)
        })
        .map(|(w, _)| w.clone())
        .collect();
    let old_nodes = std::mem::take(&mut g.node);
    let mut inserted = std::collections::HashSet::new();
    for (i, mut node) in old_nodes.into_iter().enumerate() {
        if removed_constant_nodes.contains(&i) {
            continue;
        }
        for input in node.input.iter_mut() {
            if let Some(r) = by_weight.get(input.as_str()) {
                if inserted.insert(r.weight.clone()) {
                    g.node.extend(r.nodes.iter().cloned());
                }
                *input = r.dq_output.clone();
            }
        }
        g.node.push(node);
    }
    g.initializer.retain(|t| !removed_initializers.contains(t.name.as_deref().unwrap_or("")));
    // Older exports also list initializers as graph inputs: drop those entries with them.
    g.input.retain(|v| !removed_initializers.contains(v.name.as_deref().unwrap_or("")));
    for r in replacements {
        g.initializer.extend(r.initializers);
        g.value_info.extend(r.value_info);
    }
}
