//! Arbitrary bytes as an ONNX model: decode, plan, check the opset upgrade, and quantize every
//! planned weight. Errors are fine; panics are not. Nothing touches the filesystem.
#![no_main]

use libfuzzer_sys::fuzz_target;
use nibble_driver::model::Model;
use nibble_driver::plan::{compile_patterns, plan};

fuzz_target!(|data: &[u8]| {
    let Ok(model) = Model::from_bytes(bytes::Bytes::copy_from_slice(data)) else { return };
    let patterns = compile_patterns(&["/lm_head".to_string()]).expect("valid pattern");
    let candidates = plan(&model, &patterns);
    let mut copy = model.proto.clone();
    let _ = nibble_driver::opset::upgrade(&mut copy);
    for c in candidates.iter().filter(|c| c.quantized()) {
        // Bound the work: the fuzzer's inputs are small, but dims are free-form.
        if c.bytes > 1 << 20 {
            continue;
        }
        for block in [nibble::BlockSize::Blocked(32), nibble::BlockSize::PerChannel] {
            let _ = nibble_driver::quantize::quantize_candidate(&model, c, block, false);
            let _ = nibble_driver::quantize::quantize_candidate(&model, c, block, true);
        }
    }
});
