//! The quantization methods: from a planned weight (and, for AWQ, captured activations) to
//! quantized tensors ([`nibble::QuantizedWeight`]: codes, scales, zero points). No graph edits here:
//! [`crate::emit`] writes the results into the model.
//!
//! - [`rtn`]: round to nearest (ModelOpt's `rtn`/`rtn_dq`).
//! - [`awq`]: AWQ-lite, AWQ-clip, AWQ-full (calibrated in ONNX Runtime through [`crate::calibrate`]).

pub mod awq;
pub mod rtn;
