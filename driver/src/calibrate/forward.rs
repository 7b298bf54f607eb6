//! A model's graph outputs computed step by step (issue 19: `nibble compare` and its perplexity on
//! models larger than memory): the nodes are split into steps, each run in its own ONNX Runtime
//! session holding only the initializers its nodes read, with the tensors crossing from earlier
//! steps carried per sample ([`Carried`]: in memory up to a limit, then spilled to a temporary file).
//! A graph output is handed to the caller, one sample at a time, by the step that computes it, so
//! logits are never held for every sample at once.
//!
//! The steps come from a cut ([`SegmentMap`]: the segments [`crate::calibrate::segments::cut_for`]
//! finds in one graph, keyed by the names of the tensors each segment's nodes produce), so the
//! original model and its quantized form are cut at the same crossing tensors: quantization keeps
//! every activation's name and only adds or replaces nodes that compute from initializers alone
//! (DequantizeLinear, MatMulNBits in place of MatMul, with the MatMul's output name). A node whose
//! inputs are all initializers (or outputs of such nodes: DequantizeLinear, a Constant) is put into
//! every step that reads it instead of being carried, as a shared weight is loaded by each segment.
//!
//! Every node runs once per sample with the same inputs as in the whole graph; with graph
//! optimizations disabled the outputs are bit for bit the whole graph's (tested in
//! `driver/tests/compare_segments.rs`).

use crate::calibrate::capture::Capture;
use crate::calibrate::carry::Carried;
use crate::calibrate::runtime::{Input, SessionOptions};
use crate::calibrate::segments::cut_for;
use crate::calibrate::sequential::declared;
use crate::error::{Error, Result};
use crate::graph::onnx::GraphProto;
use crate::graph::read::{ancestors, node_label, reads};
use std::collections::{HashMap, HashSet};

/// The segment of every tensor produced by a node of a cut graph (0-based), and the number of
/// segments.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SegmentMap {
    segment_of: HashMap<String, usize>,
    count: usize,
}

impl SegmentMap {
    /// Cuts `g` as calibration does ([`cut_for`]: segments of at least `target` bytes of weights at
    /// the points where the fewest tensors cross, between the first and the last of `activations`
    /// (the inputs of the quantized MatMuls)). `Err`: why the graph stays whole.
    pub fn cut(g: &GraphProto, activations: &[String], target: u64) -> std::result::Result<SegmentMap, String> {
        let (_, segments) = cut_for(g, activations, target);
        let segments = segments?;
        let segment_of = g
            .node
            .iter()
            .enumerate()
            .flat_map(|(i, n)| n.output.iter().filter(|o| !o.is_empty()).map(move |o| (o.clone(), i)))
            .map(|(o, i)| (o, segments.of(i)))
            .collect();
        Ok(SegmentMap { segment_of, count: segments.len() })
    }

    /// Number of segments.
    pub fn len(&self) -> usize {
        self.count
    }

    /// Never true: a cut has at least two segments.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }
}

/// Which nodes compute from initializers alone (inputs all initializers or outputs of such nodes,
/// no subgraph).
fn constant_nodes(g: &GraphProto) -> Vec<bool> {
    let mut constant_names: HashSet<&str> = g.initializer.iter().filter_map(|t| t.name.as_deref()).collect();
    let inputs: HashSet<&str> = g.input.iter().filter_map(|v| v.name.as_deref()).collect();
    g.node
        .iter()
        .map(|n| {
            let c = n.attribute.iter().all(|a| a.g.is_none() && a.graphs.is_empty())
                && n.input.iter().filter(|i| !i.is_empty()).all(|i| constant_names.contains(i.as_str()))
                && !n.input.iter().any(|i| inputs.contains(i.as_str()));
            if c {
                constant_names.extend(n.output.iter().filter(|o| !o.is_empty()).map(String::as_str));
            }
            c
        })
        .collect()
}

/// The steps computing `outputs` of `g`, as node masks: with `map`, one per segment (each node in
/// the segment of its outputs; a node computing from initializers alone in every step reading it);
/// without, one step of every node the outputs depend on. `Err` says why `g` cannot be run by
/// `map`'s segments (a node producing none of the cut graph's tensors, a tensor read before the
/// segment producing it, an output that is a graph input).
pub fn steps(
    g: &GraphProto,
    outputs: &[String],
    map: Option<&SegmentMap>,
) -> std::result::Result<Vec<Vec<bool>>, String> {
    let need = ancestors(g, outputs.iter().map(String::as_str));
    let Some(map) = map else { return Ok(vec![need]) };
    let produced: HashSet<&str> = g.node.iter().flat_map(|n| n.output.iter().map(String::as_str)).collect();
    if let Some(o) = outputs.iter().find(|o| !produced.contains(o.as_str())) {
        return Err(format!("its output '{o}' is not computed by a node"));
    }
    let constant = constant_nodes(g);
    let last = map.count - 1;
    // The segment of every node that does not compute from initializers alone.
    let mut seg: Vec<Option<usize>> = vec![None; g.node.len()];
    let mut producer_seg: HashMap<&str, usize> = HashMap::new();
    for (i, n) in g.node.iter().enumerate().filter(|(i, _)| need[*i] && !constant[*i]) {
        let s = n.output.iter().find_map(|o| map.segment_of.get(o)).copied().ok_or_else(|| {
            format!("its node '{}' produces no tensor of the original graph, so it has no segment", node_label(n))
        })?;
        seg[i] = Some(s);
        for o in n.output.iter().filter(|o| !o.is_empty()) {
            producer_seg.insert(o, s);
        }
    }
    // Every tensor a node reads comes from its own segment or an earlier one.
    for (i, n) in g.node.iter().enumerate() {
        let Some(s) = seg[i] else { continue };
        for r in reads(std::iter::once(n)) {
            if let Some(&p) = producer_seg.get(r.as_str()) {
                if p > s {
                    return Err(format!(
                        "its node '{}' (segment {}) reads '{r}', computed in the later segment {}",
                        node_label(n),
                        s + 1,
                        p + 1
                    ));
                }
            }
        }
    }
    let mut masks = vec![vec![false; g.node.len()]; map.count];
    for (i, s) in seg.iter().enumerate() {
        if let Some(s) = s {
            masks[*s][i] = true;
        }
    }
    // Nodes computing from initializers alone, last to first: in every step that reads them (a
    // graph output among them in the last step).
    let outputs: HashSet<&str> = outputs.iter().map(String::as_str).collect();
    let mut step_reads: Vec<HashSet<String>> =
        masks.iter().map(|m| reads(g.node.iter().zip(m).filter(|(_, &k)| k).map(|(n, _)| n))).collect();
    for i in (0..g.node.len()).rev().filter(|&i| need[i] && constant[i]) {
        let n = &g.node[i];
        let outs: Vec<&str> = n.output.iter().map(String::as_str).filter(|o| !o.is_empty()).collect();
        for (k, (mask, read)) in masks.iter_mut().zip(step_reads.iter_mut()).enumerate() {
            if outs.iter().any(|o| read.contains(*o)) || (k == last && outs.iter().any(|o| outputs.contains(o))) {
                mask[i] = true;
                read.extend(reads(std::iter::once(n)));
            }
        }
    }
    Ok(masks)
}

/// A model's forward pass over steps ([`steps`]) of its [`Capture`].
pub struct Forward<'c> {
    capture: &'c Capture,
    outputs: Vec<String>,
    steps: Vec<Vec<bool>>,
}

/// One step's plan: the carried tensors it reads, the tensors it hands on, its outputs.
struct StepPlan {
    fed: Vec<String>,
    carry: HashSet<String>,
    wanted: Vec<String>,
    /// Tensors read by later steps (kept in the carry after this step).
    later: HashSet<String>,
}

impl<'c> Forward<'c> {
    /// The whole graph in one step: the nodes `outputs` depend on (one session, as
    /// [`Capture::run_with`] builds it).
    pub fn whole(capture: &'c Capture, outputs: &[String]) -> Forward<'c> {
        let g = capture.base().graph.as_ref().expect("graph");
        let steps = steps(g, outputs, None).expect("whole graph");
        Forward { capture, outputs: outputs.to_vec(), steps }
    }

    /// One step per segment of `map` ([`steps`]); `Err` says why the graph is run whole.
    pub fn segmented(
        capture: &'c Capture,
        outputs: &[String],
        map: &SegmentMap,
    ) -> std::result::Result<Forward<'c>, String> {
        let g = capture.base().graph.as_ref().expect("graph");
        let steps = steps(g, outputs, Some(map))?;
        Ok(Forward { capture, outputs: outputs.to_vec(), steps })
    }

    /// Number of steps.
    pub fn len(&self) -> usize {
        self.steps.len()
    }

    /// Never true.
    pub fn is_empty(&self) -> bool {
        self.steps.is_empty()
    }

    /// What each step reads, carries and outputs.
    fn plans(&self) -> Vec<StepPlan> {
        let g = self.capture.base().graph.as_ref().expect("graph");
        let constant = constant_nodes(g);
        let step_reads: Vec<HashSet<String>> =
            self.steps.iter().map(|m| reads(g.node.iter().zip(m).filter(|(_, &k)| k).map(|(n, _)| n))).collect();
        // Tensors each step computes (nodes from initializers alone excepted: every reader holds them).
        let step_made: Vec<Vec<String>> = self
            .steps
            .iter()
            .map(|m| {
                g.node
                    .iter()
                    .zip(m)
                    .zip(&constant)
                    .filter(|((_, &k), &c)| k && !c)
                    .flat_map(|((n, _), _)| n.output.iter().filter(|o| !o.is_empty()).cloned())
                    .collect()
            })
            .collect();
        let mut plans = vec![];
        let mut earlier: HashSet<String> = HashSet::new();
        for k in 0..self.steps.len() {
            let later: HashSet<String> = step_reads[k + 1..].iter().flatten().cloned().collect();
            let mut fed: Vec<String> = step_reads[k].iter().filter(|r| earlier.contains(*r)).cloned().collect();
            fed.sort();
            let made: HashSet<&String> = step_made[k].iter().collect();
            let carry: HashSet<String> = step_made[k].iter().filter(|t| later.contains(*t)).cloned().collect();
            let mut wanted: Vec<String> = self.outputs.iter().filter(|o| made.contains(o)).cloned().collect();
            if k + 1 == self.steps.len() {
                // Outputs computed from initializers alone.
                wanted.extend(self.outputs.iter().filter(|o| !earlier.contains(*o) && !made.contains(o)).cloned());
            }
            wanted.dedup();
            earlier.extend(step_made[k].iter().cloned());
            plans.push(StepPlan { fed, carry, wanted, later });
        }
        plans
    }

    /// Runs every step on every sample in sessions built with `opts`, holding up to `carry_limit`
    /// bytes of carried tensors (all samples) in memory; calls `each(step, sample, outputs)` with
    /// the graph outputs each step computes for each sample, in the order given, with their own
    /// element types. Errors name the step and its first node.
    pub fn run(
        &self,
        samples: &[Vec<Input>],
        opts: SessionOptions,
        carry_limit: u64,
        mut each: impl FnMut(usize, usize, Vec<Input>) -> Result<()>,
    ) -> Result<()> {
        let mut run = self.start(samples.len(), opts, carry_limit);
        while run.next(samples, &mut each)? {}
        Ok(())
    }

    /// A run to advance one step at a time ([`ForwardRun::next`]), e.g. two models in lockstep.
    pub fn start(&self, samples: usize, opts: SessionOptions, carry_limit: u64) -> ForwardRun<'_, 'c> {
        ForwardRun {
            forward: self,
            plans: self.plans(),
            carried: Carried::new(samples, carry_limit, self.capture.dir()),
            step: 0,
            opts,
        }
    }
}

/// A [`Forward`] under way.
pub struct ForwardRun<'f, 'c> {
    forward: &'f Forward<'c>,
    plans: Vec<StepPlan>,
    carried: Carried,
    step: usize,
    opts: SessionOptions,
}

impl ForwardRun<'_, '_> {
    /// Bytes of carried tensors spilled to the temporary folder so far.
    pub fn spilled_bytes(&self) -> u64 {
        self.carried.spilled_bytes()
    }

    /// Runs the next step on every sample (the same `samples` each call) and calls
    /// `each(step, sample, outputs)`; `false` once every step ran.
    pub fn next(
        &mut self,
        samples: &[Vec<Input>],
        mut each: impl FnMut(usize, usize, Vec<Input>) -> Result<()>,
    ) -> Result<bool> {
        let k = self.step;
        let Some(plan) = self.plans.get(k) else { return Ok(false) };
        self.step += 1;
        let f = self.forward;
        let mask = &f.steps[k];
        if !mask.iter().any(|&m| m) || samples.is_empty() {
            return Ok(true);
        }
        let g = f.capture.base().graph.as_ref().expect("graph");
        let named = |e: Error| {
            let first = g.node.iter().zip(mask).find(|(_, &m)| m).map(|(n, _)| node_label(n)).unwrap_or_default();
            e.in_segment("", k, f.steps.len(), &first)
        };
        let inputs = plan.fed.iter().map(|n| declared(n, self.carried.element(0, n).expect("carried"))).collect();
        let mut outputs = plan.wanted.clone();
        let mut carry: Vec<&String> = plan.carry.iter().filter(|c| !plan.wanted.contains(c)).collect();
        carry.sort();
        outputs.extend(carry.into_iter().cloned());
        let proto = f.capture.cut(mask, |_, n| n.clone(), vec![], inputs, &outputs);
        let mut session = f.capture.open_cut(proto, self.opts).map_err(named)?;
        for (s, sample) in samples.iter().enumerate() {
            let mut feeds = sample.clone();
            for n in &plan.fed {
                feeds.push(self.carried.get(s, n)?.expect("carried by every sample"));
            }
            let out = session.run(s, &feeds).map_err(named)?;
            drop(feeds);
            let mut wanted: Vec<Option<Input>> = vec![None; plan.wanted.len()];
            for t in out {
                let at = plan.wanted.iter().position(|w| *w == t.name);
                if plan.carry.contains(&t.name) {
                    if let Some(i) = at {
                        wanted[i] = Some(t.clone());
                    }
                    self.carried.insert(s, t)?;
                } else if let Some(i) = at {
                    wanted[i] = Some(t);
                }
            }
            let wanted = wanted
                .into_iter()
                .zip(&plan.wanted)
                .map(|(t, name)| {
                    t.ok_or_else(|| named(Error::Runtime(format!("sample {s}: output '{name}' was not produced"))))
                })
                .collect::<Result<Vec<_>>>()?;
            if !wanted.is_empty() {
                each(k, s, wanted)?;
            }
        }
        self.carried.end_step();
        self.carried.retain(|n| plan.later.contains(n));
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::graph::build::{init, io, node};
    use nibble::FloatFormat;

    /// x -> [MatMul W_i -> Add residual] x layers; in `dq` form each W_i is read through a
    /// DequantizeLinear-like node computing from initializers alone.
    fn layers(count: usize, dq: bool) -> GraphProto {
        let mut nodes = vec![];
        let mut inits = vec![];
        let mut h = "x".to_string();
        for i in 0..count {
            let w = format!("W{i}");
            inits.push(init(&w, &[4, 4], &[0.0; 16], FloatFormat::F32));
            let read = if dq {
                let out = format!("{w}_DequantizeLinear_Output");
                nodes.push(node("Identity", &format!("dq{i}"), &[&w], &[&out], vec![]));
                out
            } else {
                w.clone()
            };
            nodes.push(node("MatMul", &format!("mm{i}"), &[&h, &read], &[&format!("b{i}")], vec![]));
            nodes.push(node("Add", &format!("r{i}"), &[&format!("b{i}"), &h], &[&format!("h{i}")], vec![]));
            h = format!("h{i}");
        }
        GraphProto {
            node: nodes,
            initializer: inits,
            input: vec![io("x", 1, &[Some(4)])],
            output: vec![io(&h, 1, &[Some(4)])],
            ..Default::default()
        }
    }

    #[test]
    fn the_quantized_graph_is_cut_where_the_original_is() {
        let (o, q) = (layers(4, false), layers(4, true));
        let acts: Vec<String> = (0..4).map(|i| if i == 0 { "x".into() } else { format!("h{}", i - 1) }).collect();
        let map = SegmentMap::cut(&o, &acts, 64).unwrap();
        assert_eq!(map.len(), 3);
        let out = vec!["h3".to_string()];
        let os = steps(&o, &out, Some(&map)).unwrap();
        let qs = steps(&q, &out, Some(&map)).unwrap();
        let names = |g: &GraphProto, m: &Vec<bool>| -> Vec<String> {
            g.node.iter().zip(m).filter(|(_, &k)| k).map(|(n, _)| n.name.clone().unwrap()).collect()
        };
        let o_names: Vec<Vec<String>> = os.iter().map(|m| names(&o, m)).collect();
        // Cut after r0 and r1 (one tensor crosses, and 64 bytes of weights fill a segment); the
        // nodes after the last activation's producer go to the last segment.
        assert_eq!(o_names, [vec!["mm0", "r0"], vec!["mm1", "r1"], vec!["mm2", "r2", "mm3", "r3"]]);
        // Each DequantizeLinear goes with the MatMul reading it.
        let q_names: Vec<Vec<String>> = qs.iter().map(|m| names(&q, m)).collect();
        assert_eq!(q_names[1], ["dq1", "mm1", "r1"]);
        assert_eq!(q_names[2].len(), 6);
        // The whole graph: one step of everything the outputs need.
        assert_eq!(steps(&q, &out, None).unwrap(), vec![vec![true; q.node.len()]]);
    }

    #[test]
    fn a_graph_that_does_not_match_the_cut_says_why() {
        let o = layers(4, false);
        let acts: Vec<String> = vec!["h0".into(), "h2".into()];
        let map = SegmentMap::cut(&o, &acts, 16).unwrap();
        let mut q = layers(4, false);
        q.node[4].output[0] = "renamed".into();
        q.node[5].input[0] = "renamed".into();
        let why = steps(&q, &["h3".to_string()], Some(&map)).unwrap_err();
        assert!(why.contains("'mm2' produces no tensor of the original graph"), "{why}");
        let why = steps(&o, &["x".to_string()], Some(&map)).unwrap_err();
        assert!(why.contains("output 'x' is not computed by a node"), "{why}");
    }
}
