//! Activation capture: the inputs of the quantized MatMul/Gemm nodes, observed on the calibration
//! samples by ONNX Runtime.
//!
//! The model is written once to a temporary folder with its weights as external data; for each
//! group ("wave") of activations a small model file whose graph outputs are exactly those tensors
//! (with no declared type, which ONNX Runtime accepts) is written next to it and run on every sample,
//! so ONNX Runtime computes only what the wave needs. The caller sizes the waves to bound memory.

use crate::model::{save, ExternalData, Model};
use crate::onnx::{ModelProto, ValueInfoProto};
use crate::runtime::{open, run, Input, NamedTensor, SessionOptions};
use crate::{Error, Result};
use prost::Message;

impl Drop for Capture {
    fn drop(&mut self) {
        crate::cleanup::unregister(self.dir.path());
    }
}

/// A model prepared for capturing activations.
pub struct Capture {
    dir: tempfile::TempDir,
    base: ModelProto,
    waves: std::cell::Cell<usize>,
}

impl Capture {
    /// Writes the model (weights as external data) into a new temporary folder.
    pub fn new(model: &Model) -> Result<Capture> {
        let dir = tempfile::Builder::new()
            .prefix("nibble-calibration-")
            .tempdir()
            .map_err(|e| Error::Runtime(format!("cannot create a temporary folder for calibration: {e}")))?;
        crate::cleanup::register(dir.path());
        let base_path = dir.path().join("base.onnx");
        save(model.inlined_proto()?, &base_path, ExternalData::Always)?;
        let base = Model::load(&base_path)?.proto;
        Ok(Capture { dir, base, waves: std::cell::Cell::new(0) })
    }

    /// Runs every sample with `outputs` as the graph outputs; returns, per sample, the tensors in
    /// the order of `outputs` (float16 widened to float32).
    pub fn run(&self, outputs: &[String], samples: &[Vec<Input>]) -> Result<Vec<Vec<NamedTensor>>> {
        let mut proto = self.base.clone();
        let g = proto.graph.as_mut().expect("graph");
        g.output = outputs.iter().map(|n| ValueInfoProto { name: Some(n.clone()), ..Default::default() }).collect();
        let i = self.waves.get();
        self.waves.set(i + 1);
        let path = self.dir.path().join(format!("wave{i}.onnx"));
        std::fs::write(&path, proto.encode_to_vec()).map_err(|source| Error::Write { path: path.clone(), source })?;
        let mut session = open(&path, SessionOptions::default())?;
        let result = samples
            .iter()
            .enumerate()
            .map(|(s, inputs)| {
                let mut out =
                    run(&mut session, inputs).map_err(|e| Error::Runtime(format!("calibration sample {s}: {e}")))?;
                // ORT returns outputs in graph order; keep the caller's order explicitly.
                outputs
                    .iter()
                    .map(|name| {
                        let pos = out.iter().position(|t| &t.name == name).ok_or_else(|| {
                            Error::Runtime(format!("calibration sample {s}: activation '{name}' was not produced"))
                        })?;
                        Ok(out.swap_remove(pos))
                    })
                    .collect::<Result<Vec<_>>>()
            })
            .collect();
        let _ = std::fs::remove_file(&path);
        result
    }
}
