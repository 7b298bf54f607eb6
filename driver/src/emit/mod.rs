//! Writing quantized weights into the graph, one file per output form. Only graph edits: the numbers
//! come from [`crate::methods`].
//!
//! - [`dq`]: DequantizeLinear (`rtn_dq`, AWQ; ModelOpt's form) and QuantizeLinear -> DequantizeLinear (`rtn`).
//! - [`matmulnbits`]: ONNX Runtime's MatMulNBits, and GatherBlockQuantized for embedding tables.
//! - [`pqs`]: AWQ's pre-quant scales: folded into producing nodes, or `Mul` nodes before the consumers.

pub mod dq;
pub mod matmulnbits;
pub mod pqs;
