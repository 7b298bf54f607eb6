//! The float32 twin of a bfloat16 model, for running it in ONNX Runtime on a CPU.
//!
//! ONNX Runtime's CPU provider has no bfloat16 MatMul (nor most other bfloat16 kernels), so a bf16
//! model cannot be calibrated or compared there as it is. Its twin computes the same graph in
//! float32: every bf16 initializer and `Constant` value widened to f32 (exact), every `Cast` to
//! bf16 turned into a `Cast` to f32, and every bf16 graph input, output and value type declared
//! f32 (also inside If/Loop/Scan bodies). Activations then differ from a true bf16 run only by the
//! bf16 rounding of intermediate results, which the AWQ searches apply to what they read anyway.
//! The twin is used for calibration (AWQ) and by `nibble compare`; the written model stays bf16.

use crate::error::Result;
use crate::graph::model::Model;
use crate::graph::onnx::{
    tensor_proto::{DataLocation, DataType},
    type_proto, GraphProto, ModelProto, TensorProto, TypeProto, ValueInfoProto,
};
use bytes::Bytes;
use nibble::FloatFormat;

const BF16: i32 = DataType::Bfloat16 as i32;
const F32: i32 = DataType::Float as i32;

/// Whether the model uses bfloat16 anywhere the twin would change.
pub fn needs_twin(proto: &ModelProto) -> bool {
    proto.graph.as_ref().is_some_and(graph_has_bf16)
}

fn type_is_bf16(t: &Option<TypeProto>) -> bool {
    matches!(
        t.as_ref().and_then(|t| t.value.as_ref()),
        Some(type_proto::Value::TensorType(tt)) if tt.elem_type == Some(BF16)
    )
}

fn graph_has_bf16(g: &GraphProto) -> bool {
    g.initializer.iter().any(|t| t.data_type == Some(BF16))
        || g.input.iter().chain(&g.output).chain(&g.value_info).any(|v| type_is_bf16(&v.r#type))
        || g.node.iter().any(|n| {
            n.attribute.iter().any(|a| {
                a.t.as_ref().is_some_and(|t| t.data_type == Some(BF16))
                    || (n.op_type.as_deref() == Some("Cast")
                        && a.name.as_deref() == Some("to")
                        && a.i == Some(BF16 as i64))
                    || a.g.iter().chain(&a.graphs).any(graph_has_bf16)
            })
        })
}

/// bf16 bytes (little endian) widened to f32 bytes.
fn widen(bytes: &[u8]) -> Vec<u8> {
    use crate::graph::floats::{decode_floats, encode_floats};
    encode_floats(FloatFormat::F32, &decode_floats(FloatFormat::BF16, bytes))
}

/// The tensor as f32 with inline data, if it is bf16 (`data` its bytes, external data resolved).
fn widen_tensor(t: &TensorProto, data: &[u8]) -> TensorProto {
    TensorProto {
        data_type: Some(F32),
        raw_data: Some(Bytes::from(widen(data))),
        int32_data: vec![],
        external_data: vec![],
        data_location: Some(DataLocation::Default as i32),
        ..t.clone()
    }
}

/// Raw bytes of a bf16 tensor held inline (`raw_data`, or `int32_data` holding one value each).
fn inline_bf16_bytes(t: &TensorProto) -> Vec<u8> {
    match &t.raw_data {
        Some(r) => r.to_vec(),
        None => t.int32_data.iter().flat_map(|&v| (v as u16).to_le_bytes()).collect(),
    }
}

fn retype(v: &mut ValueInfoProto) {
    if let Some(type_proto::Value::TensorType(tt)) = v.r#type.as_mut().and_then(|t| t.value.as_mut()) {
        if tt.elem_type == Some(BF16) {
            tt.elem_type = Some(F32);
        }
    }
}

/// Converts a (sub)graph in place; `top` initializers were already widened by the caller.
fn convert_graph(g: &mut GraphProto, top: bool) {
    if !top {
        for t in g.initializer.iter_mut().filter(|t| t.data_type == Some(BF16)) {
            *t = widen_tensor(t, &inline_bf16_bytes(t));
        }
    }
    for v in g.input.iter_mut().chain(g.output.iter_mut()).chain(g.value_info.iter_mut()) {
        retype(v);
    }
    for n in g.node.iter_mut() {
        let is_cast = n.op_type.as_deref() == Some("Cast");
        for a in n.attribute.iter_mut() {
            if let Some(t) = a.t.as_mut().filter(|t| t.data_type == Some(BF16)) {
                *t = widen_tensor(t, &inline_bf16_bytes(t));
            }
            if is_cast && a.name.as_deref() == Some("to") && a.i == Some(BF16 as i64) {
                a.i = Some(F32 as i64);
            }
            for sub in a.g.iter_mut().chain(a.graphs.iter_mut()) {
                convert_graph(sub, false);
            }
        }
    }
}

/// The float32 twin of `model` (see the module docs), every tensor held inline: bf16 ones widened
/// into memory, the others pointing at their bytes in the model's mapped files.
pub fn f32_twin(model: &Model) -> Result<ModelProto> {
    let mut proto = model.proto.clone();
    if let Some(g) = proto.graph.as_mut() {
        for t in g.initializer.iter_mut() {
            let external = !t.external_data.is_empty();
            if t.data_type == Some(BF16) {
                let data = if t.raw_data.is_some() || external {
                    model.tensor_bytes(t)?.to_vec()
                } else {
                    inline_bf16_bytes(t)
                };
                *t = widen_tensor(t, &data);
            } else if external {
                t.raw_data = Some(model.tensor_bytes(t)?);
                t.external_data.clear();
                t.data_location = Some(DataLocation::Default as i32);
            }
        }
        convert_graph(g, true);
    }
    Ok(proto)
}
