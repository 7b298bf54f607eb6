//! The nibble driver: ONNX models in, 4-bit models out, behind the `nibble` CLI.
//!
//! The code is laid out as the stages of the data's trip, each depending only on the ones before it:
//!
//! - [`graph`]: the ONNX model (prost types, load/save, builders, readers, opset upgrade);
//! - [`plan`]: which weights are quantized, and how (exclusions, INT8 layers, Gather tables);
//! - [`calibrate`]: ONNX Runtime, calibration inputs, activation capture;
//! - [`methods`]: RTN and AWQ, from weights (and activations) to quantized tensors;
//! - [`emit`]: one writer per output form (DQ/QDQ, MatMulNBits, pre-quant scales);
//! - [`pipeline`]: `quantize_file`, the stages in order;
//! - [`shard`]: `--segments A..B` shards and `nibble merge`, around the pipeline's stages;
//! - [`folder`]: onnxruntime-genai and Optimum model folders in and out, around `quantize_file`;
//! - [`recipe`]: the measured defaults for what the user leaves unset (method under `--target-bits`,
//!   the output form of an onnxruntime-genai folder);
//! - [`cli`]: the `nibble` command (quantize, inspect, compare, example).
//!
//! Beside them: [`error`] (every failure, naming the file, node or tensor), [`cleanup`] (temporary
//! outputs removed on Ctrl-C), [`rng`] (seeded values for synthetic models and inputs).

pub mod calibrate;
pub mod cleanup;
pub mod cli;
pub mod emit;
pub mod error;
pub mod folder;
pub mod graph;
pub mod methods;
pub mod pipeline;
pub mod plan;
pub mod recipe;
pub mod rng;
pub mod shard;

pub use calibrate::runtime;
pub use error::{Error, Result};
pub use pipeline::{default_output, quantize_file, Format, Method, Options, Summary};
