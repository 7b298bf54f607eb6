//! GPTQ: post-training weight quantization with second-order error feedback.
//!
//! Frantar, Ashkboos, Hoefler, Alistarh (2022), "GPTQ: Accurate Post-Training Quantization for
//! Generative Pre-trained Transformers" (arXiv:2210.17323), Algorithm 1, for a weight
//! `W: [K, N]` with `y = x @ W` (rows of `W` are input channels; the paper's "columns"):
//!
//! ```text
//! H = 2 X^T X / T                                      (hessian: accumulated over row batches)
//! dead inputs: H[i,i] = 1, W[i,:] = 0;  act order: process rows by decreasing H[i,i]
//! U = chol(H + percdamp * mean(diag H) * I)^-1, upper  (factor: H^-1 = U^T U)
//! for each row i (processing order), in lazy batches of `lazy_batch` rows:
//!     s, zp = scales of i's block (static groups: fixed per block of `block_size` rows along K)
//!     q_i   = quantize(W[i,:]; s, zp),   dq_i = rnd((q_i - zp) * s)
//!     e_i   = (W[i,:] - dq_i) / U[i,i]
//!     W[j,:] -= U[i,j] e_i   for later rows j in the batch; at the batch's end, one GEMM
//!     W[rest,:] -= U[batch, rest]^T E[batch,:]  (the paper's lazy batch updates)
//! ```
//!
//! The output is exactly [`quantize_weight`](crate::quantize_weight())'s form (packed codes in
//! the weight's row-major order, scales `[ceil(K/B), N]` as values of the weight's dtype, zero
//! points), so the DequantizeLinear and MatMulNBits writers take it unchanged.
//!
//! Stages, one per file: [`hessian`] (accumulation), [`factor`] (dead inputs, order, dampening,
//! inverse Cholesky factor with faer), [`quantize`] (the row loop with error feedback).
//!
//! Choices:
//! - Arithmetic: the weight is widened to float64 for the error feedback (the Hessian factor is
//!   float64), so rounding order does not change codes; scales and the dequantized values used
//!   for the error are the ones ONNX Runtime computes: scales rounded to the weight's dtype
//!   before any code is chosen, `dq = rnd((q - zp) * s)` in float32 rounded to the dtype.
//! - Block scales ([`GroupScales`]): by default each block's scale is chosen on the
//!   error-updated weights when the block starts (standard GPTQ groups); with act order the
//!   scales are computed upfront on the original weights (GPTQ's `static_groups`), since a
//!   block's rows are then reached out of order. Measured on generated 256 x 96 layers with
//!   outlier channels (`tests/gptq.rs`, `block_start_scales_beat_upfront`, 4 seeds x block 32
//!   and 128): block-start scales give the lower total layer error, by only 0.07%
//!   (8.697e4 vs 8.703e4; upfront was lower in 2 of the 8 cases), so the choice matters little;
//!   act order itself lowers the error by 1-3% on the same layers.
//! - Scale rule, measured on the same layers (`gptq_scale_rules_measured`): the data-free
//!   search inside GPTQ lowers the layer error by 27-33% below ModelOpt's formula symmetric and
//!   by 1-8% with a zero point; weighting the search by the Hessian diagonal is worse than the
//!   formula (0.5-2x higher error: the error feedback already serves the heavy channels), so use
//!   `hessian_weighted: false` with GPTQ.
//! - Columns are independent given `H`: the weight is cut into column stripes processed in
//!   parallel (rayon), each with its own float64 copy and GEMMs (`matrixmultiply::dgemm`).
//! - Weights fed by the same activation (q/k/v; gate/up) share one [`Hessian`]; build the
//!   [`GptqFactor`] once and call [`gptq_quantize_factored`] for each of them to factor it once.

pub mod factor;
pub mod hessian;
pub mod quantize;

pub use factor::GptqFactor;
pub use hessian::Hessian;
pub use quantize::{gptq_quantize, gptq_quantize_factored, gptq_quantize_factored_with};

use crate::scale_search::ScaleGrid;
use crate::{Bits, BlockSize};

/// How each block's scale (and zero point) is chosen from the block's weights.
#[derive(Clone, Debug, PartialEq, Default)]
pub enum ScaleRule {
    /// ModelOpt's formula: `amax / 7` (15 levels), or `(max - min) / 15` with a zero point.
    #[default]
    Formula,
    /// The data-free search of [`crate::scale_search`] over this grid, on the block's current
    /// (error-updated) weights; `hessian_weighted` weights each row's error by `H[i,i]`.
    Search {
        /// The candidates.
        grid: ScaleGrid,
        /// Weight each row's squared error by the Hessian diagonal.
        hessian_weighted: bool,
    },
}

/// When block scales are chosen.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum GroupScales {
    /// On the error-updated weights when the block's first row is reached (standard GPTQ
    /// groups). With act order this falls back to [`GroupScales::Upfront`].
    #[default]
    BlockStart,
    /// On the original weights before any update (GPTQ's `static_groups`).
    Upfront,
}

/// GPTQ settings.
#[derive(Clone, Debug, PartialEq)]
pub struct GptqParams {
    /// The group size along K (static groups: one scale per block of the output layout), or per
    /// channel.
    pub block_size: BlockSize,
    /// INT4/UINT4 or INT8/UINT8 codes.
    pub bits: Bits,
    /// Unsigned codes with a zero point per block instead of symmetric signed codes.
    pub zero_point: bool,
    /// Dampening: `percdamp * mean(diag(H))` added to the diagonal (default 0.01).
    pub percdamp: f64,
    /// Rows per lazy batch (default 128).
    pub lazy_batch: usize,
    /// Process input channels by decreasing Hessian diagonal (the block layout is unchanged).
    pub act_order: bool,
    /// How block scales are computed.
    pub scale_rule: ScaleRule,
    /// When block scales are computed.
    pub group_scales: GroupScales,
}

impl GptqParams {
    /// Symmetric INT4, percdamp 0.01, lazy batches of 128, no act order, ModelOpt's scale formula
    /// at block start.
    pub fn new(block_size: BlockSize) -> GptqParams {
        GptqParams {
            block_size,
            bits: Bits::Four,
            zero_point: false,
            percdamp: 0.01,
            lazy_batch: 128,
            act_order: false,
            scale_rule: ScaleRule::Formula,
            group_scales: GroupScales::BlockStart,
        }
    }
}
