//! Calibration by segments (issue 19): the graph cut where few tensors cross
//! ([`crate::calibrate::segments`]) and run one segment after the other, each in its own ONNX Runtime
//! session that holds only that segment's nodes and the initializers they read (from the model's
//! data files in the temporary folder: linked, not copied). The tensors crossing into a segment are
//! carried per calibration sample from the sessions before it ([`Sequential`], with no weight
//! replaced), so the memory of a calibration no longer grows with the model's depth: one segment's
//! weights, the activations of one wave, and the carried tensors.
//!
//! Every node runs once with the same inputs as in the whole graph; the sessions use the same
//! options as the whole-graph capture ([`crate::calibrate::runtime::SessionOptions::default`]).

use crate::calibrate::capture::Capture;
use crate::calibrate::runtime::{Input, NamedTensor, SessionOptions};
use crate::calibrate::segments::{cut_for, Segments};
use crate::calibrate::sequential::Sequential;
use crate::error::Result;
use crate::graph::read::node_label;
use std::collections::HashMap;

/// A calibration run segment by segment.
pub struct Segmented<'c> {
    capture: &'c Capture,
    runner: Sequential<'c>,
    segments: Segments,
    producer: HashMap<String, usize>,
}

impl<'c> Segmented<'c> {
    /// Cuts the captured model into segments of about `target` bytes of weights, for capturing
    /// `activations` (every activation the steps will ask for) on `samples` samples. `Ok(Err(why))`
    /// when the graph does not cut: it is then run whole.
    pub fn new(
        capture: &'c Capture,
        samples: usize,
        activations: &[String],
        target: u64,
    ) -> Result<std::result::Result<Segmented<'c>, String>> {
        Segmented::with_session(capture, samples, activations, target, SessionOptions::default())
    }

    /// [`Segmented::new`] with each segment's session built with `session`.
    pub fn with_session(
        capture: &'c Capture,
        samples: usize,
        activations: &[String],
        target: u64,
        session: SessionOptions,
    ) -> Result<std::result::Result<Segmented<'c>, String>> {
        let g = capture.base().graph.as_ref().expect("graph");
        let (producer, segments) = cut_for(g, activations, target);
        let segments = match segments {
            Ok(s) => s,
            Err(why) => return Ok(Err(why)),
        };
        let runner = Sequential::new(capture, samples)?.only_for(activations).with_session(session);
        Ok(Ok(Segmented { capture, runner, segments, producer }))
    }

    /// Holds up to `bytes` of carried tensors (all samples) in memory and spills the rest to a
    /// temporary file ([`Sequential::with_carry_limit`]). Call it before the first run.
    pub fn with_carry_limit(self, bytes: u64) -> Segmented<'c> {
        Segmented { runner: self.runner.with_carry_limit(bytes), ..self }
    }

    /// Bytes of carried tensors spilled to the temporary folder so far.
    pub fn spilled_bytes(&self) -> u64 {
        self.runner.spilled_bytes()
    }

    /// The segments.
    pub fn segments(&self) -> &Segments {
        &self.segments
    }

    /// The index of the node producing `activation` (0 for a graph input).
    pub fn producer(&self, activation: &str) -> usize {
        self.producer.get(activation).copied().unwrap_or(0)
    }

    /// Captures `activations` (all in segment `segment`, asked for in the order of their producers
    /// across calls) on every sample: runs the nodes they need that no earlier call ran. Errors
    /// name the segment and its first node.
    pub fn run(
        &mut self,
        segment: usize,
        activations: &[String],
        samples: &[Vec<Input>],
    ) -> Result<Vec<Vec<NamedTensor>>> {
        self.runner.step(activations, samples).map_err(|e| {
            let g = self.capture.base().graph.as_ref().expect("graph");
            let first = &g.node[self.segments.starts[segment]];
            e.in_segment("calibration ", segment, self.segments.len(), &node_label(first))
        })
    }
}
