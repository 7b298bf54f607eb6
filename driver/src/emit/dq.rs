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

use super::Emitted;
use crate::error::Result;
use crate::graph::build::{attr_i, tensor, value_info, ModelNames};
use crate::graph::edit::Edits;
use crate::graph::floats::{encode_floats, onnx_type};
use crate::graph::model::Model;
use crate::graph::onnx::{tensor_proto::DataType, NodeProto, TensorProto, ValueInfoProto};
use crate::graph::readers::{graph_at_mut, Index};
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

/// Replaces every chosen weight by its quantized form, in whichever graph it lives (bodies
/// included); the `i`-th of `quantized` is `chosen[i]`'s, blocked as `block_of` says, and each new
/// initializer goes through `store` as soon as it is built. Only the quantized
/// readers are rewired; the original stays for every other reader (see
/// [`super::remove_originals`]). Names are ModelOpt's where `names` says they are free.
pub fn rewrite(
    model: &mut Model,
    chosen: &[&Candidate],
    quantized: super::Quantized<'_>,
    store: super::Store<'_>,
    block_of: impl Fn(&Candidate) -> BlockSize,
    form: Form,
    names: &mut ModelNames,
) -> Result<Emitted> {
    let root = model.proto.graph.as_ref().expect("graph");
    let idx = Index::build(root);
    let mut edits = Edits::default();
    let mut out = super::remove_originals(root, &idx, chosen, form == Form::Qdq, &mut edits);
    let mut replacements: Vec<Replacement> = Vec::with_capacity(chosen.len());
    for c in chosen {
        let mut r = replacement(c, super::next_quantized(quantized, c)?, block_of(c), form, names);
        for t in r.initializers.iter_mut() {
            store(c, t)?;
        }
        replacements.push(r);
    }
    out.bytes = replacements.iter().map(|r| r.bytes).sum();
    let root = model.proto.graph.as_mut().expect("graph");
    for (c, mut r) in chosen.iter().zip(replacements) {
        for u in c.quantized_uses() {
            graph_at_mut(root, &u.at.graph).node[u.at.node].input[u.input] = r.dq_output.clone();
        }
        if !c.tied.is_empty() {
            let table = tied_table(c, &mut r, names);
            for t in &c.tied {
                graph_at_mut(root, &t.gather.at.graph).node[t.gather.at.node].input[0] = table.clone();
            }
        }
        let e = edits.graph(&c.place);
        e.before.entry(super::anchor(c)).or_default().extend(r.nodes);
        e.initializers.extend(r.initializers);
        e.value_info.extend(r.value_info);
    }
    edits.apply(root);
    Ok(out)
}

/// The `[N, K]` table tied embedding Gathers of head `c` read: its DequantizeLinear output when the
/// weight is stored `[N, K]` (`transB=1`), else a `Transpose` of it (added to `r`).
fn tied_table(c: &Candidate, r: &mut Replacement, names: &mut ModelNames) -> String {
    let Decision::Quantize { axis } = c.decision else { unreachable!() };
    if axis == 1 {
        return r.dq_output.clone();
    }
    let out = names.tensor(&format!("{}_rows", r.dq_output));
    r.nodes.push(crate::graph::build::node(
        "Transpose",
        &names.node(&format!("{}_Transpose", c.base)),
        &[&r.dq_output],
        &[&out],
        vec![crate::graph::build::attr_ints("perm", &[1, 0])],
    ));
    let format = c.format().expect("float weight");
    r.value_info.push(value_info(out.clone(), onnx_type(format), &[c.dims[1], c.dims[0]]));
    out
}

/// The nodes and tensors replacing one weight.
struct Replacement {
    nodes: Vec<NodeProto>,
    initializers: Vec<TensorProto>,
    value_info: Vec<ValueInfoProto>,
    dq_output: String,
    bytes: u64,
}

fn replacement(c: &Candidate, q: QuantizedWeight, block: BlockSize, form: Form, names: &mut ModelNames) -> Replacement {
    let Decision::Quantize { axis } = c.decision else { unreachable!() };
    let format = c.format().expect("float weight");
    let w = &c.base;
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
    let codes = (form == Form::Dq).then(|| names.tensor(&format!("{w}_i4")));
    let scale_name = names.tensor(&format!("{w}_scale"));
    let zp_bytes = match &q.zero_point {
        Some(z) if c.bits == Bits::Four => Some(nibble::reference::pack(z)),
        Some(z) => Some(z.clone()),
        None if form == Form::Qdq => Some(vec![0u8; c.bits.bytes_for(q.scale.len())]),
        None => None,
    };
    let zp_name = zp_bytes.as_ref().map(|_| names.tensor(&format!("{w}_zp")));
    let mut initializers =
        vec![tensor(scale_name.clone(), scale_dims.clone(), onnx_type(format), encode_floats(format, &q.scale))];
    if let (Some(zb), Some(zp)) = (zp_bytes, &zp_name) {
        initializers.push(tensor(zp.clone(), scale_dims.clone(), code_type, zb));
    }
    let mut dq_inputs = vec![String::new(), scale_name.clone()];
    if let Some(zp) = &zp_name {
        dq_inputs.push(zp.clone());
    }
    let mut nodes = vec![];
    let mut value_infos = vec![];
    match (form, codes) {
        (Form::Dq, Some(codes)) => {
            initializers.insert(0, tensor(codes.clone(), c.dims.clone(), code_type, q.packed));
            dq_inputs[0] = codes;
        }
        _ => {
            let q_node = names.node(&format!("{w}_QuantizeLinear"));
            let q_out = names.tensor(&format!("{w}_QuantizeLinear_Output"));
            let q_inputs = vec![c.weight.clone(), scale_name.clone(), zp_name.clone().expect("QDQ has a zero point")];
            nodes.push(NodeProto {
                name: Some(q_node),
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
    let dq_node = names.node(&format!("{w}_DequantizeLinear"));
    let dq_out = names.tensor(&format!("{w}_DequantizeLinear_Output"));
    nodes.push(NodeProto {
        name: Some(dq_node),
        op_type: Some("DequantizeLinear".into()),
        input: dq_inputs,
        output: vec![dq_out.clone()],
        attribute: attrs,
        ..Default::default()
    });
    value_infos.push(value_info(dq_out.clone(), onnx_type(format), &c.dims));
    let bytes = initializers.iter().map(|t| t.raw_data.as_ref().map_or(0, |r| r.len() as u64)).sum();
    Replacement { nodes, initializers, value_info: value_infos, dq_output: dq_out, bytes }
}
