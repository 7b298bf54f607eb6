//! Sequential calibration (`--sequential`): the activations of each step are captured from the
//! model in which the weights of every earlier step already hold their quantized values, so a layer
//! is fitted to the inputs it will see in the quantized model (GPTQ's sequential mode, Frantar et al.
//! 2022, section 4; with steps as fine as `--true-sequential` in the GPTQ reference code).
//!
//! Every node of the model runs once over the whole calibration: a step runs only the nodes its
//! activations need that no earlier step ran, fed with the tensors earlier steps left for later
//! nodes (the residual stream, masks, positions), which are held per sample until no node still
//! needs them ([`Carried`]: in memory up to a limit, above it in a temporary file). A weight's quantized values enter the model by rewiring its consumer's input to a
//! new initializer in the temporary folder (written once, as external data), so the nodes that read
//! it, all still ahead, compute with them.

use crate::calibrate::capture::Capture;
use crate::calibrate::carry::Carried;
use crate::calibrate::runtime::{Input, NamedTensor, SessionOptions};
use crate::error::{Error, Result};
use crate::graph::onnx::{tensor_proto, type_proto, StringStringEntryProto, TensorProto};
use crate::graph::onnx::{TypeProto, ValueInfoProto};
use crate::graph::read::{ancestors, reads};
use std::collections::{HashMap, HashSet};
use std::io::Write;

/// The state of a sequential calibration over one [`Capture`].
pub struct Sequential<'c> {
    capture: &'c Capture,
    /// Nodes of the captured model that already ran.
    ran: Vec<bool>,
    /// Per sample, the tensors produced so far that nodes still to run read.
    carried: Carried,
    /// Consumer node -> (input slot, replacement initializer).
    rewired: HashMap<usize, (usize, String)>,
    /// The replacement initializers (external data in `values`).
    replacements: Vec<TensorProto>,
    values: std::fs::File,
    values_len: u64,
    /// The nodes some activation still to capture depends on (all nodes unless
    /// [`Sequential::only_for`] narrowed them): only what they read is carried.
    future: Option<Vec<bool>>,
    /// How each step's session is built.
    session: SessionOptions,
}

const VALUES_FILE: &str = "sequential_weights.bin";

/// Default bytes of carried tensors held in memory (all samples) before they are spilled to a
/// temporary file (`--carry-memory-mb 1024`).
pub const DEFAULT_CARRY_MEMORY: u64 = 1 << 30;

impl<'c> Sequential<'c> {
    /// Starts with nothing run and nothing replaced; up to [`DEFAULT_CARRY_MEMORY`] bytes of carried
    /// tensors are held in memory.
    pub fn new(capture: &'c Capture, samples: usize) -> Result<Sequential<'c>> {
        let path = capture.dir().join(VALUES_FILE);
        let values = std::fs::File::create(&path).map_err(|source| Error::Write { path, cause: source })?;
        let nodes = capture.base().graph.as_ref().map_or(0, |g| g.node.len());
        Ok(Sequential {
            capture,
            ran: vec![false; nodes],
            carried: Carried::new(samples, DEFAULT_CARRY_MEMORY, capture.dir()),
            rewired: HashMap::new(),
            replacements: vec![],
            values,
            values_len: 0,
            future: None,
            session: SessionOptions::default(),
        })
    }

    /// Builds each step's session with `session` instead of the defaults.
    pub fn with_session(mut self, session: SessionOptions) -> Sequential<'c> {
        self.session = session;
        self
    }

    /// Holds up to `bytes` of carried tensors (all samples) in memory and spills the rest to a
    /// temporary file in the calibration folder. Call it before the first step.
    pub fn with_carry_limit(mut self, bytes: u64) -> Sequential<'c> {
        self.carried = Carried::new(self.carried.samples(), bytes, self.capture.dir());
        self
    }

    /// Bytes of carried tensors spilled to the temporary folder so far.
    pub fn spilled_bytes(&self) -> u64 {
        self.carried.spilled_bytes()
    }

    /// Carries only the tensors that the nodes `activations` (every activation the steps will ask
    /// for) depend on read: a tensor read only by nodes no step runs (a KV-cache output's
    /// producers) is dropped after its step instead of being held to the end.
    pub fn only_for(mut self, activations: &[String]) -> Sequential<'c> {
        let g = self.capture.base().graph.as_ref().expect("graph");
        self.future = Some(ancestors(g, activations.iter().map(String::as_str)));
        self
    }

    /// Captures `activations` on every sample (`samples` as given to [`Sequential::new`]),
    /// running only the nodes no earlier step ran; returns per sample the tensors in the order of
    /// `activations`, as float32.
    pub fn step(&mut self, activations: &[String], samples: &[Vec<Input>]) -> Result<Vec<Vec<NamedTensor>>> {
        if samples.is_empty() {
            return Ok(vec![]);
        }
        let g = self.capture.base().graph.as_ref().expect("graph");
        let graph_inputs: HashSet<&str> = g.input.iter().filter_map(|i| i.name.as_deref()).collect();
        let wanted: Vec<&str> = activations
            .iter()
            .map(String::as_str)
            .filter(|a| !graph_inputs.contains(a) && !self.carried.contains(0, a))
            .collect();
        let need = ancestors(g, wanted.iter().copied());
        let run: Vec<bool> = need.iter().zip(&self.ran).map(|(&n, &r)| n && !r).collect();
        for (r, &now) in self.ran.iter_mut().zip(&run) {
            *r |= now;
        }
        // Tensors this step produces that a node still to run reads: carried to later steps.
        let future = |i: usize| self.future.as_ref().is_none_or(|f| f[i]);
        let read_ahead = reads(
            g.node.iter().zip(&self.ran).enumerate().filter(|(i, (_, &r))| !r && future(*i)).map(|(_, (n, _))| n),
        );
        let produced: Vec<String> = g
            .node
            .iter()
            .zip(&run)
            .filter(|(_, &r)| r)
            .flat_map(|(n, _)| n.output.iter().filter(|o| !o.is_empty()).cloned())
            .collect();
        let mut outputs: Vec<String> = wanted.iter().map(|s| s.to_string()).collect();
        outputs.extend(produced.iter().filter(|o| read_ahead.contains(*o) && !wanted.contains(&o.as_str())).cloned());
        // Per sample, the wanted activations no later node reads (not carried, so never spilled).
        let mut fresh: Vec<Vec<Input>> = vec![vec![]; samples.len()];
        if run.iter().any(|&r| r) {
            // The carried tensors the nodes of this step read become graph inputs.
            let read_now = reads(g.node.iter().zip(&run).filter(|(_, &r)| r).map(|(n, _)| n));
            let fed: Vec<String> = self.carried.names(0).filter(|k| read_now.contains(*k)).cloned().collect();
            let inputs = fed.iter().map(|n| declared(n, self.carried.element(0, n).expect("carried"))).collect();
            let proto = self.capture.cut(
                &run,
                |i, n| match self.rewired.get(&i) {
                    Some((slot, name)) => {
                        let mut n = n.clone();
                        n.input[*slot] = name.clone();
                        n
                    }
                    None => n.clone(),
                },
                self.replacements.clone(),
                inputs,
                &outputs,
            );
            // One sample at a time: its feeds read back, its outputs carried (or spilled) at once.
            let mut session = self.capture.open_cut(proto, self.session)?;
            for (s, sample) in samples.iter().enumerate() {
                let mut feeds = sample.clone();
                for n in &fed {
                    feeds.push(self.carried.get(s, n)?.expect("carried by every sample"));
                }
                let out = session.run(s, &feeds)?;
                drop(feeds);
                for t in out {
                    match read_ahead.contains(&t.name) {
                        true => self.carried.insert(s, t)?,
                        false => fresh[s].push(t),
                    }
                }
            }
            self.carried.end_step();
        }
        let mut result = Vec::with_capacity(samples.len());
        for (s, (sample, fresh)) in samples.iter().zip(fresh).enumerate() {
            let mut fresh: Vec<Option<Input>> = fresh.into_iter().map(Some).collect();
            let mut tensors = Vec::with_capacity(activations.len());
            for a in activations {
                let t = match fresh.iter_mut().find(|t| t.as_ref().is_some_and(|t| &t.name == a)) {
                    Some(t) => t.take(),
                    None => match self.carried.get(s, a)? {
                        Some(t) => Some(t),
                        None => sample.iter().find(|i| &i.name == a).cloned(),
                    },
                };
                let t = t.ok_or_else(|| {
                    Error::Runtime(format!("calibration sample {s}: activation '{a}' was not produced"))
                })?;
                tensors.push(t.into_float().map_err(|e| Error::Runtime(format!("calibration sample {s}: {e}")))?);
            }
            result.push(tensors);
        }
        // Drop what no node still to run reads.
        self.carried.retain(|k| read_ahead.contains(k));
        Ok(result)
    }

    /// From now on, node `node` of the captured model reads `values` (row-major `dims`, stored as
    /// ONNX type `data_type`: float32, float16 or bfloat16 bytes in `bytes`) at input `slot`
    /// instead of its weight. Call it before any step runs the node.
    pub fn replace(&mut self, node: usize, slot: usize, dims: &[usize], data_type: i32, bytes: &[u8]) -> Result<()> {
        if self.ran.get(node).copied().unwrap_or(true) {
            return Err(Error::Runtime(format!(
                "sequential calibration: node {node} already ran before its weight was quantized"
            )));
        }
        let path = self.capture.dir().join(VALUES_FILE);
        self.values.write_all(bytes).map_err(|source| Error::Write { path, cause: source })?;
        let name = format!("nibble_sequential_{}", self.replacements.len());
        let entry = |k: &str, v: String| StringStringEntryProto { key: Some(k.into()), value: Some(v) };
        self.replacements.push(TensorProto {
            name: Some(name.clone()),
            dims: dims.iter().map(|&d| d as i64).collect(),
            data_type: Some(data_type),
            data_location: Some(tensor_proto::DataLocation::External as i32),
            external_data: vec![
                entry("location", VALUES_FILE.into()),
                entry("offset", self.values_len.to_string()),
                entry("length", bytes.len().to_string()),
            ],
            ..Default::default()
        });
        self.values_len += bytes.len() as u64;
        self.rewired.insert(node, (slot, name));
        Ok(())
    }
}

/// A graph input for a carried tensor: its element type, its rank with unknown dimensions.
pub(crate) fn declared(
    name: &str,
    (elem, rank): (crate::graph::onnx::tensor_proto::DataType, usize),
) -> ValueInfoProto {
    let dim = (0..rank).map(|_| Default::default()).collect();
    ValueInfoProto {
        name: Some(name.to_string()),
        r#type: Some(TypeProto {
            value: Some(type_proto::Value::TensorType(type_proto::Tensor {
                elem_type: Some(elem as i32),
                shape: Some(crate::graph::onnx::TensorShapeProto { dim }),
            })),
            ..Default::default()
        }),
        ..Default::default()
    }
}
