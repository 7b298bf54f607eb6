//! Activation capture: the inputs of the quantized MatMul/Gemm nodes, observed on the calibration
//! samples by ONNX Runtime.
//!
//! The model is written once to a temporary folder with its weights as external data; for each
//! group ("wave") of activations a small model file whose graph outputs are exactly those tensors
//! (with no declared type, which ONNX Runtime accepts) is written next to it and run on every sample,
//! so ONNX Runtime computes only what the wave needs. The caller sizes the waves to bound memory.
//! A bfloat16 model is captured through its float32 twin ([`crate::twin`]).

use crate::calibrate::runtime::{open, run_values, Input, NamedTensor, SessionOptions};
use crate::error::{Error, Result};
use crate::graph::model::{save, ExternalData, Model};
use crate::graph::onnx::{GraphProto, ModelProto, NodeProto, TensorProto, ValueInfoProto};
use crate::graph::read::{ancestors, reads};
use prost::Message;

/// A hard link to the data file (ONNX Runtime refuses symbolic links that leave the model's
/// folder), or a copy when the temporary folder is on another file system.
fn link_file(target: &std::path::Path, link: &std::path::Path) -> Result<()> {
    std::fs::hard_link(target, link)
        .or_else(|_| std::fs::copy(target, link).map(|_| ()))
        .map_err(|source| Error::Write { path: link.to_path_buf(), cause: source })
}

/// A session of a cut of the captured model ([`Capture::open_cut`]).
pub(crate) struct CutSession {
    session: ort::session::Session,
    path: std::path::PathBuf,
}

impl CutSession {
    /// Runs sample number `sample` (named in errors) on `inputs`; returns its outputs with their own
    /// element types.
    pub(crate) fn run(&mut self, sample: usize, inputs: &[Input]) -> Result<Vec<Input>> {
        run_values(&mut self.session, inputs).map_err(|e| Error::Runtime(format!("calibration sample {sample}: {e}")))
    }
}

impl Drop for CutSession {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
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
    twin: bool,
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
        let twin = crate::calibrate::twin::needs_twin(&model.proto);
        let base = if twin {
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
        Ok(Capture { dir, base, waves: std::cell::Cell::new(0), twin })
    }

    /// Runs every sample with `outputs` as the graph outputs; returns, per sample, the tensors in
    /// the order of `outputs` (float16 widened to float32).
    pub fn run(&self, outputs: &[String], samples: &[Vec<Input>]) -> Result<Vec<Vec<NamedTensor>>> {
        self.run_with(outputs, samples, SessionOptions::default())
    }

    /// [`Capture::run`] in a session built with `opts`. Only the nodes the outputs depend on run.
    pub fn run_with(
        &self,
        outputs: &[String],
        samples: &[Vec<Input>],
        opts: SessionOptions,
    ) -> Result<Vec<Vec<NamedTensor>>> {
        let g = self.base.graph.as_ref().expect("graph");
        let keep = ancestors(g, outputs.iter().map(String::as_str));
        let proto = self.cut(&keep, |_, n| n.clone(), vec![], vec![], outputs);
        let outs = self.run_cut(proto, opts, samples.iter().map(|s| s.to_vec()))?;
        outs.into_iter()
            .enumerate()
            .map(|(s, out)| {
                let mut out = out.into_iter().map(Some).collect::<Vec<_>>();
                outputs
                    .iter()
                    .map(|name| {
                        let t =
                            out.iter_mut().find(|t| t.as_ref().is_some_and(|t| &t.name == name)).and_then(Option::take);
                        let t = t.ok_or_else(|| {
                            Error::Runtime(format!("calibration sample {s}: activation '{name}' was not produced"))
                        })?;
                        t.into_float().map_err(|e| Error::Runtime(format!("calibration sample {s}: {e}")))
                    })
                    .collect::<Result<Vec<_>>>()
            })
            .collect()
    }

    /// The base model cut down to the nodes in `keep` (each passed through `node`, which may
    /// rewire inputs), the initializers those nodes read (plus `extra`), the base graph's inputs plus
    /// `inputs`, and `outputs` (no declared type, which ONNX Runtime accepts) as graph outputs.
    pub(crate) fn cut(
        &self,
        keep: &[bool],
        node: impl Fn(usize, &NodeProto) -> NodeProto,
        extra: Vec<TensorProto>,
        inputs: Vec<ValueInfoProto>,
        outputs: &[String],
    ) -> ModelProto {
        let base = self.base.graph.as_ref().expect("graph");
        let nodes: Vec<NodeProto> =
            base.node.iter().enumerate().filter(|(i, _)| keep[*i]).map(|(i, n)| node(i, n)).collect();
        let mut read = reads(&nodes);
        read.extend(outputs.iter().cloned());
        let g = GraphProto {
            node: nodes,
            initializer: base
                .initializer
                .iter()
                .filter(|t| t.name.as_ref().is_some_and(|n| read.contains(n)))
                .cloned()
                .chain(extra)
                .collect(),
            input: base.input.iter().cloned().chain(inputs).collect(),
            output: outputs.iter().map(|n| ValueInfoProto { name: Some(n.clone()), ..Default::default() }).collect(),
            name: base.name.clone(),
            value_info: base.value_info.clone(),
            sparse_initializer: base.sparse_initializer.clone(),
            ..Default::default()
        };
        let mut m = ModelProto { graph: None, ..self.base.clone() };
        m.graph = Some(g);
        m
    }

    /// Writes `proto` into the temporary folder, opens it and runs every sample's feeds; returns
    /// each sample's outputs with their own element types.
    pub(crate) fn run_cut(
        &self,
        proto: ModelProto,
        opts: SessionOptions,
        feeds: impl Iterator<Item = Vec<Input>>,
    ) -> Result<Vec<Vec<Input>>> {
        let mut session = self.open_cut(proto, opts)?;
        feeds.enumerate().map(|(s, inputs)| session.run(s, &inputs)).collect()
    }

    /// Writes `proto` into the temporary folder and opens it (the file is removed when the session
    /// is dropped), for running the samples one at a time.
    pub(crate) fn open_cut(&self, proto: ModelProto, opts: SessionOptions) -> Result<CutSession> {
        let i = self.waves.get();
        self.waves.set(i + 1);
        let path = self.dir.path().join(format!("wave{i}.onnx"));
        std::fs::write(&path, proto.encode_to_vec())
            .map_err(|source| Error::Write { path: path.clone(), cause: source })?;
        match open(&path, opts) {
            Ok(session) => Ok(CutSession { session, path }),
            Err(e) => {
                let _ = std::fs::remove_file(&path);
                Err(e)
            }
        }
    }

    /// The temporary folder (holds the model's data files).
    pub(crate) fn dir(&self) -> &std::path::Path {
        self.dir.path()
    }

    /// The ONNX element type in which the captured model holds a weight of `format` (float32 for
    /// the twin of a bfloat16 model).
    pub(crate) fn weight_type(&self, format: nibble::FloatFormat) -> i32 {
        match self.twin {
            true => crate::graph::floats::onnx_type(nibble::FloatFormat::F32),
            false => crate::graph::floats::onnx_type(format),
        }
    }

    /// The model as captured (the float32 twin for a bfloat16 model).
    pub(crate) fn base(&self) -> &ModelProto {
        &self.base
    }
}
