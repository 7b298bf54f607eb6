//! Writes the hand-made models `scripts/check-identical.sh` quantizes besides `nibble example`'s:
//! weights behind a Gather (embedding table), a Gemm with `transB=1` and a bias, a Gemm whose
//! weight is a Constant node, and a MatMul named `/lm_head`, in float32 and float16.
//!
//! Usage: `cargo run --release --example check_models -- OUT_DIR`

use nibble::FloatFormat;
use nibble_driver::graph::build::{attr_i, init, io, model, node};
use nibble_driver::graph::floats::onnx_type;
use nibble_driver::graph::model::{save, ExternalData};
use nibble_driver::graph::onnx::{attribute_proto::AttributeType, tensor_proto::DataType, AttributeProto, GraphProto};
use nibble_driver::rng::Rng;
use std::path::PathBuf;

const H: usize = 64;
const VOCAB: usize = 100;

fn main() -> nibble_driver::Result<()> {
    let dir = PathBuf::from(std::env::args().nth(1).expect("usage: check_models OUT_DIR"));
    for (name, f) in [("gemm_f32.onnx", FloatFormat::F32), ("gemm_f16.onnx", FloatFormat::F16)] {
        let mut rng = Rng::new(3);
        let mut w = |name: &str, dims: [usize; 2]| {
            let scale = 1.0 / (dims[0] as f32).sqrt();
            init(name, &dims, &rng.normals(dims[0] * dims[1], scale), f)
        };
        let (embed, w1, w2, w4) = (w("embed", [VOCAB, H]), w("W1", [H, H]), w("W2", [48, H]), w("W4", [H, VOCAB]));
        let w3 = AttributeProto {
            name: Some("value".into()),
            t: Some(w("W3", [48, H])),
            r#type: Some(AttributeType::Tensor as i32),
            ..Default::default()
        };
        let mut w3_node = node("Constant", "/w3/Constant", &[], &["W3"], vec![]);
        w3_node.attribute.push(w3);
        let graph = GraphProto {
            name: Some("check_models".into()),
            node: vec![
                node("Gather", "/embed/Gather", &["embed", "ids"], &["h"], vec![]),
                node("MatMul", "/layer/in/MatMul", &["h", "W1"], &["a"], vec![]),
                node("Gemm", "/layer/proj/Gemm", &["a", "W2", "b2"], &["b"], vec![attr_i("transB", 1)]),
                w3_node,
                node("Gemm", "/layer/out/Gemm", &["b", "W3"], &["c"], vec![]),
                node("MatMul", "/lm_head/MatMul", &["c", "W4"], &["logits"], vec![]),
            ],
            initializer: vec![embed, w1, w2, init("b2", &[48], &[0.1; 48], f), w4],
            input: vec![io("ids", DataType::Int64 as i32, &[None])],
            output: vec![io("logits", onnx_type(f), &[None, Some(VOCAB)])],
            ..Default::default()
        };
        save(model(graph, 17), &dir.join(name), ExternalData::Never)?;
    }
    Ok(())
}
