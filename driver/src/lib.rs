//! The nibble driver: ONNX model I/O, graph rewriting and the pipeline behind the `nibble` CLI.

pub mod cleanup;
pub mod error;
pub mod model;
pub mod npy;
#[rustfmt::skip]
pub mod onnx;

pub use error::{Error, Result};
pub use quantize::{default_output, quantize_file, Format, Method, Options, Summary};
pub mod awq;
pub mod calibration;
pub mod capture;
pub mod cli;
pub mod compare;
pub mod inspect;
pub mod mixed;
pub mod nbits;
pub mod opset;
pub mod plan;
pub mod pqs;
pub mod quantize;
pub mod runtime;
pub mod synth;
pub mod twin;
