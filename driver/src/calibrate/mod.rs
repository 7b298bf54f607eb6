//! Calibration: running the model in ONNX Runtime on sample inputs and capturing the activations
//! the AWQ searches need.
//!
//! - [`runtime`]: finding, loading and running ONNX Runtime (the library from the PyPI wheel).
//! - [`feed`]: how each model input is fed (token ids, mask, positions, empty KV cache, ...).
//! - [`inputs`]: the calibration samples: from a `.npz`/`.npy` file ([`npy`]), in memory, or seeded random.
//! - [`capture`]: a copy of the model whose graph outputs are the activations asked for, run in waves.
//! - [`text`]: token windows from a text file and a Hugging Face tokenizer.json (calibration, perplexity).
//! - [`memory`]: `--segment-mb auto`, whole graph or segments from the model's size and the memory available.
//! - [`segments`], [`segmented`]: calibration by segments, one ONNX Runtime session per segment.
//! - [`forward`]: a model's graph outputs computed segment by segment (`nibble compare`).
//! - [`carry`]: the tensors carried between steps, spilled to a temporary file above a limit.
//! - [`sequential`]: capture step by step, each step seeing the weights quantized before it.
//! - [`twin`]: the float32 twin of a bfloat16 model, which ONNX Runtime's CPU provider can run.

pub mod capture;
pub mod carry;
pub mod feed;
pub mod forward;
pub mod inputs;
pub mod memory;
pub mod npy;
pub mod runtime;
pub mod segmented;
pub mod segments;
pub mod sequential;
pub mod spec;
pub mod text;
pub mod twin;

pub use inputs::{calibration_inputs, parse_shapes, CalibrationOptions, ShapeArgs};
