//! The quantization methods: from a planned weight (and, for AWQ and GPTQ, captured activations)
//! to quantized tensors ([`nibble::QuantizedWeight`]: codes, scales, zero points). No graph edits
//! here: [`crate::emit`] writes the results into the model.
//!
//! - [`rtn`]: round to nearest (ModelOpt's `rtn`/`rtn_dq`), optionally with the data-free scale
//!   search.
//! - [`awq`]: AWQ-lite, AWQ-clip, AWQ-full (calibrated in ONNX Runtime through [`crate::calibrate`]).
//! - [`finished`]: quantized weights finished before the output asks for them, held or spilled.
//! - [`gptq`]: GPTQ and AWQ-lite + GPTQ (the same calibration waves as AWQ).
//! - [`sensitivity`]: each weight's measured output error at 4 and 8 bits (`--target-bits`).

pub mod awq;
pub mod finished;
pub mod gptq;
pub mod rtn;
pub mod sensitivity;

use nibble::{FloatFormat, WeightData};

/// Weight values (float32 values of `format`) held in the weight's own dtype, for the kernels.
pub(crate) enum OwnedWeight {
    F32(Vec<f32>),
    F16(Vec<half::f16>),
    BF16(Vec<half::bf16>),
}

impl OwnedWeight {
    /// `v` must hold values of `format` (exactly representable).
    pub(crate) fn new(format: FloatFormat, v: Vec<f32>) -> OwnedWeight {
        match format {
            FloatFormat::F32 => OwnedWeight::F32(v),
            FloatFormat::F16 => OwnedWeight::F16(v.iter().map(|&x| half::f16::from_f32(x)).collect()),
            FloatFormat::BF16 => OwnedWeight::BF16(v.iter().map(|&x| half::bf16::from_f32(x)).collect()),
        }
    }

    /// The kernels' view.
    pub(crate) fn data(&self) -> WeightData<'_> {
        match self {
            OwnedWeight::F32(v) => WeightData::F32(v),
            OwnedWeight::F16(v) => WeightData::F16(v),
            OwnedWeight::BF16(v) => WeightData::BF16(v),
        }
    }
}
