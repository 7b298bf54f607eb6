//! Arbitrary bytes as an ONNX model: decode, plan (with and without INT8 layers), check the opset
//! upgrade, build the bf16 float32 twin, quantize every planned weight and lay it out for
//! MatMulNBits. Errors are fine; panics are not. Nothing touches the filesystem.
#![no_main]

use libfuzzer_sys::fuzz_target;
use nibble_driver::graph::model::Model;
use nibble_driver::plan::{compile_patterns, plan};

fuzz_target!(|data: &[u8]| {
    let Ok(model) = Model::from_bytes(bytes::Bytes::copy_from_slice(data)) else { return };
    let patterns = compile_patterns(&["/lm_head".to_string()]).expect("valid pattern");
    let Ok(candidates) = plan(&model, &patterns) else { return };
    let mut copy = model.proto.clone();
    let _ = nibble_driver::graph::opset::upgrade(&mut copy);
    if nibble_driver::calibrate::twin::needs_twin(&model.proto) {
        let _ = nibble_driver::calibrate::twin::f32_twin(&model);
    }
    let mut mixed = candidates.clone();
    let _ = nibble_driver::plan::mixed::apply(&model, &mut mixed, None);
    let _ = nibble_driver::plan::mixed::apply(&model, &mut mixed, Some("layers.0,model"));
    for c in candidates.iter().chain(&mixed).filter(|c| c.quantized()) {
        // Bound the work: the fuzzer's inputs are small, but dims are free-form.
        if c.bytes > 1 << 20 {
            continue;
        }
        for block in [nibble::BlockSize::Blocked(32), nibble::BlockSize::PerChannel] {
            for zero_point in [false, true] {
                let q = nibble_driver::methods::rtn::quantize_candidate(&model, c, block, zero_point);
                // The MatMulNBits layout of a blocked (or INT8, one block per column) weight.
                if let (Ok(q), nibble::BlockSize::Blocked(_)) = (q, block) {
                    if c.op != "Gather" {
                        let k = match c.decision {
                            nibble_driver::plan::Decision::Quantize { axis: 1 } => c.dims[1] as usize,
                            _ => c.dims[0] as usize,
                        };
                        let (_, node_block) = nibble_driver::emit::matmulnbits::node_layout(c, k, 32);
                        let _ = nibble_driver::emit::matmulnbits::tensors(c, &q, node_block);
                    }
                }
            }
        }
    }
});
