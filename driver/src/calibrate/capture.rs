//! Activation capture: the inputs of the quantized MatMul/Gemm nodes, observed on the calibration
//! samples by ONNX Runtime.
//!
//! The model is written once to a temporary folder with its weights as external data; for each
//! group ("wave") of activations a small model file whose graph outputs are exactly those tensors
//! (with no declared type, which ONNX Runtime accepts) is written next to it and run on every sample,
//! so ONNX Runtime computes only what the wave needs. The caller sizes the waves to bound memory.
//! A bfloat16 model is captured through its float32 twin ([`crate::twin`]).

use crate::calibrate::runtime::{open, run, Input, NamedTensor, SessionOptions};
use crate::error::{Error, Result};
use crate::graph::model::{save, ExternalData, Model};
use crate::graph::onnx::{ModelProto, ValueInfoProto};
use prost::Message;

/// A hard link to the data file (ONNX Runtime refuses symbolic links that leave the model's
/// folder), or a copy when the temporary folder is on another file system.
fn link_file(target: &std::path::Path, link: &std::path::Path) -> Result<()> {
    std::fs::hard_link(target, link)
        .or_else(|_| std::fs::copy(target, link).map(|_| ()))
        .map_err(|source| Error::Write { path: link.to_path_buf(), cause: source })
}

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
        let base = if crate::calibrate::twin::needs_twin(&model.proto) {
            // bfloat16: ONNX Runtime's CPU provider runs the float32 twin instead.
            save(crate::calibrate::twin::f32_twin(model)?, &base_path, ExternalData::Always)?;
            Model::load(&base_path)?.proto
        } else if model.has_external_data() && !model.external_files().is_empty() {
            // Link the (checked) external data files instead of writing the weights again.
            let g = model.proto.graph.as_ref().expect("graph");
            let mut linked = std::collections::HashSet::new();
            for t in g.initializer.iter().filter(|t| !t.external_data.is_empty()) {
                model.tensor_bytes(t)?; // validates location, offset and length
                let loc =
                    t.external_data.iter().find(|e| e.key.as_deref() == Some("location")).and_then(|e| e.value.clone());
                let Some(loc) = loc else { continue };
                if linked.insert(loc.clone()) {
                    let target = model
                        .dir()
                        .join(&loc)
                        .canonicalize()
                        .map_err(|source| Error::Read { path: model.dir().join(&loc), cause: source })?;
                    let link = dir.path().join(&loc);
                    if let Some(parent) = link.parent() {
                        std::fs::create_dir_all(parent)
                            .map_err(|source| Error::Write { path: parent.to_path_buf(), cause: source })?;
                    }
                    link_file(&target, &link)?;
                }
            }
            model.proto.clone()
        } else {
            save(model.inlined_proto()?, &base_path, ExternalData::Always)?;
            Model::load(&base_path)?.proto
        };
        Ok(Capture { dir, base, waves: std::cell::Cell::new(0) })
    }

    /// Runs every sample with `outputs` as the graph outputs; returns, per sample, the tensors in
    /// the order of `outputs` (float16 widened to float32).
    pub fn run(&self, outputs: &[String], samples: &[Vec<Input>]) -> Result<Vec<Vec<NamedTensor>>> {
        self.run_with(outputs, samples, SessionOptions::default())
    }

    /// [`Capture::run`] in a session built with `opts`.
    pub fn run_with(
        &self,
        outputs: &[String],
        samples: &[Vec<Input>],
        opts: SessionOptions,
    ) -> Result<Vec<Vec<NamedTensor>>> {
        let mut proto = self.base.clone();
        let g = proto.graph.as_mut().expect("graph");
        g.output = outputs.iter().map(|n| ValueInfoProto { name: Some(n.clone()), ..Default::default() }).collect();
        let i = self.waves.get();
        self.waves.set(i + 1);
        let path = self.dir.path().join(format!("wave{i}.onnx"));
        std::fs::write(&path, proto.encode_to_vec())
            .map_err(|source| Error::Write { path: path.clone(), cause: source })?;
        let mut session = open(&path, opts)?;
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
