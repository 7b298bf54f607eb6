//! The nibble driver: ONNX model I/O, graph rewriting and the pipeline behind the `nibble` CLI.

pub mod npy;
