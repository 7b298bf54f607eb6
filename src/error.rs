//! The kernel crate's errors: one variant per way a call can be wrong.

use crate::{FloatFormat, Tier};

/// What went wrong in a kernel call.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// The block size cannot be used.
    #[error("block size {block_size} is not supported: use an even block size >= 2 (16, 32, 64, 128 are usual), or -1 for per-channel")]
    BadBlockSize {
        /// The block size asked for.
        block_size: i64,
    },
    /// The quantization axis is not 0 or 1.
    #[error("quantize axis {axis} is not supported: use 0 (MatMul weights, blocks along K) or 1 (Gather tables, transB=1 Gemm weights)")]
    BadAxis {
        /// The axis asked for.
        axis: usize,
    },
    /// Two buffers that must agree in length do not.
    #[error("{what}: expected {expected} elements, got {actual}")]
    LengthMismatch {
        /// Which buffer.
        what: &'static str,
        /// Its required length.
        expected: usize,
        /// Its actual length.
        actual: usize,
    },
    /// A forced tier is not supported by this CPU.
    #[error("SIMD tier {} is not available on this CPU", .0.name())]
    TierUnavailable(Tier),
    /// A block holds NaN or infinity.
    #[error("non-finite value (NaN or Inf) in block {block} (elements {start}..{end} along the quantized axis) of column {column}")]
    NonFinite {
        /// Block index along the quantized axis.
        block: usize,
        /// Index across the other axis.
        column: usize,
        /// First element of the block along the quantized axis.
        start: usize,
        /// One past the block's last element.
        end: usize,
    },
    /// A block's dequantized values, `(q - zp) * s` or `q * s`, would exceed the largest finite
    /// value of the weight's dtype (a float16 block holding values near +-65504, whose quantization
    /// step rounds outward).
    #[error("block {block} (elements {start}..{end} along the quantized axis) of column {column} would dequantize to values beyond the largest finite {} ({}): scale the weight down (or keep it in float32), or leave the node unquantized with --exclude", .format.name(), .format.max_finite_text())]
    DequantizedOverflow {
        /// Block index along the quantized axis.
        block: usize,
        /// Index across the other axis.
        column: usize,
        /// First element of the block along the quantized axis.
        start: usize,
        /// One past the block's last element.
        end: usize,
        /// The weight's dtype.
        format: FloatFormat,
    },
    /// Every AWQ-lite alpha scales the (finite) weight beyond its dtype's range.
    #[error("every AWQ-lite scale makes the scaled weight w * s overflow {}: quantize this node without AWQ-lite (--method rtn_dq or awq_clip), or leave it unquantized with --exclude", .format.name())]
    ScaledWeightOverflow {
        /// The weight's dtype.
        format: FloatFormat,
    },
    /// An AWQ pre-quant scale given to [`Hessian::scale_inputs`](crate::gptq::Hessian::scale_inputs)
    /// is zero or not finite.
    #[error("input scale {index} is zero or not finite: pre-quant scales must be finite and non-zero")]
    BadInputScale {
        /// The input channel.
        index: usize,
    },
    /// The Hessian holds NaN or infinity (a non-finite calibration activation).
    #[error("the Hessian is not finite at input channel {index}: the calibration activations hold NaN or Inf; check the calibration data")]
    HessianNotFinite {
        /// The first input channel with a non-finite entry.
        index: usize,
    },
    /// The dampened Hessian is not positive definite (Cholesky failed).
    #[error("the dampened Hessian is not positive definite (Cholesky pivot {index}): raise the dampening (--percdamp, e.g. 0.1)")]
    NotPositiveDefinite {
        /// The failing pivot.
        index: usize,
    },
    /// The Hessian's K does not match the weight.
    #[error("the Hessian is for K = {hessian_k} input channels but the weight has {weight_len} elements, not a multiple of it")]
    HessianShape {
        /// K of the Hessian.
        hessian_k: usize,
        /// Elements of the weight.
        weight_len: usize,
    },
    /// A GPTQ parameter is out of range.
    #[error("GPTQ parameter {what}: {why}")]
    BadGptqParam {
        /// Which parameter.
        what: &'static str,
        /// What is wrong and the valid range.
        why: &'static str,
    },
}

/// `Result` with [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
