//! Activation-aware weight quantization (AWQ), as ModelOpt's ONNX INT4 path does it:
//! - [`stats`]: activation and weight statistics and the AWQ-lite scale formula;
//! - [`lite`]: the AWQ-lite search of one pre-quantization scale per input channel;
//! - [`clip`]: the AWQ-clip search of one clip ratio per (column, block);
//! - [`subgraph`]: AWQ-lite with one scale per activation, searched on the siblings' combined loss;
//! - [`matmul`]: the float32 matrix products the losses need.

pub mod clip;
pub mod lite;
pub mod matmul;
pub mod stats;
pub mod subgraph;

pub use clip::{clip_search, subsample, ClipSearch};
pub use lite::{lite_search, lite_search_in, lite_search_with, LiteScratch, LiteSearch, LossForm};
pub use stats::*;
pub use subgraph::{subgraph_search, SubgraphSearch};
