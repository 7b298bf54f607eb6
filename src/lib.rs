//! # nibble: block-wise 4-bit weight quantization kernels
//!
//! The arithmetic of NVIDIA ModelOpt's `modelopt.onnx.quantization.int4`, reproduced bit for bit and
//! vectorized. A weight is row-major `[K, N]` (`y = x @ W`); blocks of `B` rows run along K:
//!
//! ```text
//! symmetric:   s  = max(rnd(rnd(amax(|w_blk|) * alpha) / 7), 1e-5)      q = clip(rint(rnd(w / s)), -8, 7)
//! zero point:  s  = rnd(max(rnd(max - min), 1e-5) / 15)                  zp = clip(-rint(rnd(min / s)), 0, 15)
//!              q  = clip(rint(rnd(w / s)) + zp, 0, 15)
//! dequantize:  dq = rnd(q * s)    or    rnd((q - zp) * s)
//! ```
//!
//! `rnd` rounds to the weight's own dtype (f32, f16 or bf16; see [`float`]), `rint` rounds half to
//! even. A K that is not a multiple of B is zero-padded for the statistics (the zeros take part in
//! the min/max of the last block) and the padding is dropped again from `q`.
//!
//! Layout of the crate:
//! - [`kernels`]: one operation per file, each generic over [`pulp::Simd`] and dispatched at run time
//!   over the [`Tier`]s (AVX-512, AVX2, NEON, scalar);
//! - [`reference`]: the scalar oracle, written step by step like the numpy code it mirrors; every
//!   kernel tier is tested against it bit for bit, and it is tested against ModelOpt's own outputs;
//! - [`gptq`]: GPTQ (Hessian accumulation, inverse-Hessian factor, error-feedback quantization);
//! - [`scale_search`]: the data-free per-block scale search;
//! - [`quantize_weight`]: a whole tensor (any dtype, axis 0 or 1, any block size) through the kernels,
//!   in parallel over blocks;
//! - [`tensor`]: ModelOpt's `find_scales`, `rtn`, `dq_tensor`, `quant_tensor` on a tensor of any rank
//!   along any axis (the numpy functions `nibble.int4` exposes).

pub mod awq;
pub mod bits;
pub mod error;
pub mod float;
pub mod gptq;
pub mod kernels;
pub mod quantize_weight;
pub mod reference;
pub mod scale_search;
mod simd;
pub mod tensor;
pub mod tier;

pub use bits::Bits;
pub use error::{Error, Result};
pub use float::FloatFormat;
pub use quantize_weight::{quantize_weight, BlockSize, QuantParams, QuantizedWeight, WeightData};
pub use tier::Tier;
