//! Float tensor bytes: the ONNX data type of a float format, and little-endian bytes <-> f32 values
//! (f32, f16, bf16; exact when decoding, round-to-nearest-even when encoding narrower formats).

use super::onnx::tensor_proto::DataType;
use nibble::FloatFormat;

/// ONNX data type of a float format (`FLOAT`, `FLOAT16`, `BFLOAT16`).
pub fn onnx_type(format: FloatFormat) -> i32 {
    match format {
        FloatFormat::F32 => DataType::Float as i32,
        FloatFormat::F16 => DataType::Float16 as i32,
        FloatFormat::BF16 => DataType::Bfloat16 as i32,
    }
}

/// Tensor bytes of `format` as f32 values (exact). Trailing bytes that do not fill an element are ignored.
pub fn decode_floats(format: FloatFormat, bytes: &[u8]) -> Vec<f32> {
    match format {
        FloatFormat::F32 => bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect(),
        FloatFormat::F16 => bytes.chunks_exact(2).map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
        FloatFormat::BF16 => bytes.chunks_exact(2).map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
    }
}

/// f32 values as tensor bytes of `format` (narrower formats round to nearest even).
pub fn encode_floats(format: FloatFormat, values: &[f32]) -> Vec<u8> {
    match format {
        FloatFormat::F32 => values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        FloatFormat::F16 => values.iter().flat_map(|&v| half::f16::from_f32(v).to_le_bytes()).collect(),
        FloatFormat::BF16 => values.iter().flat_map(|&v| half::bf16::from_f32(v).to_le_bytes()).collect(),
    }
}
