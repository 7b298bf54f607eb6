//! The ONNX model, and nothing about quantization: the prost types generated from ONNX's schema
//! ([`onnx`]), loading and saving with external data and an atomic output ([`model`]), builders of
//! nodes, tensors, attributes and names unique in the whole model ([`build`]), structural edits
//! applied bodies first ([`edit`]), readers of attributes, constants and subgraph references
//! ([`read`]), who reads every tensor of the whole model, bodies included ([`readers`]), constant
//! chains folded to one tensor ([`fold`]), the streamed output ([`stream`]), float tensor bytes ([`floats`]) and the opset upgrade to
//! 21 ([`opset`]).
//!
//! Every other stage builds and reads graphs through this module; it depends on no other stage.

pub mod build;
pub mod edit;
pub mod floats;
pub mod fold;
pub mod mapped;
pub mod model;
#[rustfmt::skip]
pub mod onnx;
pub mod opset;
pub mod output;
pub mod read;
pub mod readers;
pub mod stream;
