//! Where a graph is cut into consecutive segments for calibration by segments (issue 19): points in
//! the graph's topological order (ONNX's node order) where few tensors cross, so that each segment
//! can run as its own ONNX Runtime session holding only its own weights, fed with the crossing
//! tensors (the residual stream, the attention mask, positions, rotary caches) of the segment before.
//!
//! The tensors crossing position `p` (between node `p - 1` and node `p`) are those produced by a
//! node before `p` and read by a node at or after `p` (inputs and names read inside If/Loop/Scan
//! bodies), or produced before `p` and a graph output. Graph inputs and initializers never cross:
//! every segment reads them from the samples and the model's data. The cuts are the positions with
//! the fewest crossing tensors among those between the first and last node reading a weight (in a
//! decoder: after each residual Add); a segment closes at the first such position once it holds
//! `target` bytes of weights (about one decoder layer, or several when layers are small).
//!
//! A weight read by nodes of several segments (a shared weight, a tied embedding) is loaded by each
//! of those segments' sessions: its values are the same in each, so the results do not change.

use crate::graph::model::byte_size;
use crate::graph::onnx::GraphProto;
use crate::graph::read::reads;
use std::collections::HashMap;

/// The segments of a graph: consecutive ranges of its node list.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Segments {
    /// The first node of each segment, ascending; the first is 0.
    pub starts: Vec<usize>,
    /// The number of tensors crossing each cut (`starts[1..]`).
    pub crossing: Vec<usize>,
}

impl Segments {
    /// The segment holding node `node`.
    pub fn of(&self, node: usize) -> usize {
        self.starts.partition_point(|&s| s <= node).saturating_sub(1)
    }

    /// Number of segments.
    pub fn len(&self) -> usize {
        self.starts.len()
    }

    /// Never true: a graph is at least one segment.
    pub fn is_empty(&self) -> bool {
        self.starts.is_empty()
    }
}

/// Per position `0..=n` of `g`'s node list (`n` nodes), counting only the nodes in `keep` as
/// producers and readers: the number of tensors crossing it, and whether each of them is read by
/// at least two nodes after it (a tensor with a single reader across a cut could be fused with its
/// producer by ONNX Runtime in the whole graph and not in the segments: a cut there may change the
/// floats, so it is not a candidate).
pub fn crossings(g: &GraphProto, keep: &[bool]) -> (Vec<usize>, Vec<bool>) {
    let n = g.node.len();
    let mut producer: HashMap<&str, usize> = HashMap::new();
    for (i, node) in g.node.iter().enumerate().filter(|(i, _)| keep[*i]) {
        for o in node.output.iter().filter(|o| !o.is_empty()) {
            producer.insert(o.as_str(), i);
        }
    }
    // The nodes reading each produced tensor, ascending.
    let mut readers: HashMap<&str, Vec<usize>> = HashMap::new();
    for (i, node) in g.node.iter().enumerate().filter(|(i, _)| keep[*i]) {
        for name in reads(std::iter::once(node)) {
            if let Some((&key, _)) = producer.get_key_value(name.as_str()) {
                readers.entry(key).or_default().push(i);
            }
        }
    }
    // A tensor produced by node p and last read by node q crosses positions p+1..=q; it has a
    // single reader left at positions after its second-to-last reader.
    let mut delta = vec![0isize; n + 2];
    let mut single = vec![0isize; n + 2];
    for (name, r) in &readers {
        let p = producer[name];
        let q = *r.last().expect("one reader");
        if q > p {
            delta[p + 1] += 1;
            delta[q + 1] -= 1;
            let from = r.len().checked_sub(2).map_or(p, |i| r[i].max(p)) + 1;
            single[from] += 1;
            single[q + 1] -= 1;
        }
    }
    let (mut counts, mut shared) = (Vec::with_capacity(n + 1), Vec::with_capacity(n + 1));
    let (mut live, mut alone) = (0isize, 0isize);
    for (d, s) in delta.iter().zip(&single).take(n + 1) {
        live += d;
        alone += s;
        counts.push(live.max(0) as usize);
        shared.push(alone == 0);
    }
    (counts, shared)
}

/// Bytes of the initializers each node reads (a weight read by several nodes counts for each).
pub fn weight_bytes(g: &GraphProto) -> Vec<u64> {
    let sizes: HashMap<&str, u64> =
        g.initializer.iter().filter_map(|t| Some((t.name.as_deref()?, byte_size(t).unwrap_or(0) as u64))).collect();
    g.node.iter().map(|node| reads(std::iter::once(node)).iter().filter_map(|r| sizes.get(r.as_str())).sum()).collect()
}

/// Cuts the nodes `keep` of `g` (those the calibration runs) into segments of at least `target`
/// bytes of weights each (the last may hold less), at positions inside `window` (between the
/// first and the last activation's producer) where the fewest tensors cross, preferring those where
/// each is read by two nodes or more after the cut. `Err` gives the reason the graph stays whole.
pub fn cut(g: &GraphProto, keep: &[bool], window: std::ops::Range<usize>, target: u64) -> Result<Segments, String> {
    let bytes: Vec<u64> = weight_bytes(g).into_iter().zip(keep).map(|(b, &k)| if k { b } else { 0 }).collect();
    let (counts, shared) = crossings(g, keep);
    let inside = || window.start + 1..=window.end.min(g.node.len());
    let Some(fewest) = inside().map(|p| counts[p]).min() else {
        return Err("its activations all come from one node".into());
    };
    // Among the positions crossed by the fewest tensors, those where each is read twice or more
    // after the cut, if any (a decoder of fused SkipLayerNormalization nodes has none: each residual
    // sum has one reader, the next one).
    let prefer_shared = inside().any(|p| counts[p] == fewest && shared[p]);
    let candidates = || inside().filter(|&p| counts[p] == fewest && (shared[p] || !prefer_shared));
    let total: u64 = bytes.iter().sum();
    let mut starts = vec![0];
    let mut crossing = vec![];
    // Bytes of the nodes before `at`, and of those in the open segment.
    let (mut before, mut held, mut at) = (0u64, 0u64, 0usize);
    for p in candidates() {
        let more: u64 = bytes[at..p].iter().sum();
        (before, held, at) = (before + more, held + more, p);
        if held >= target && total > before {
            starts.push(p);
            crossing.push(counts[p]);
            held = 0;
        }
    }
    if starts.len() == 1 {
        return Err(format!(
            "its {} MB of weights do not fill two segments of {} MB at the points where the fewest ({fewest}) \
             tensors cross",
            total >> 20,
            target >> 20
        ));
    }
    Ok(Segments { starts, crossing })
}

/// The index of the node producing each tensor of `g`, and `g` cut ([`cut`]) for capturing
/// `activations`: the nodes they depend on, cut between the first and the last activation's
/// producer into segments of at least `target` bytes of weights (`Err`: why the graph stays whole).
/// Calibration by segments and shards (`--segments`, [`crate::shard`]) cut the same way.
pub fn cut_for(
    g: &GraphProto,
    activations: &[String],
    target: u64,
) -> (HashMap<String, usize>, Result<Segments, String>) {
    let producer: HashMap<String, usize> = g
        .node
        .iter()
        .enumerate()
        .flat_map(|(i, n)| n.output.iter().filter(|o| !o.is_empty()).map(move |o| (o.clone(), i)))
        .collect();
    let made: Vec<usize> = activations.iter().filter_map(|a| producer.get(a).copied()).collect();
    let window = made.iter().copied().min().unwrap_or(0)..made.iter().copied().max().unwrap_or(0);
    let keep = crate::graph::read::ancestors(g, activations.iter().map(String::as_str));
    let segments = cut(g, &keep, window, target);
    (producer, segments)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::graph::build::{init, io, node};
    use nibble::FloatFormat;

    /// x -> [MatMul W_i -> Add residual] x layers, with a "mask" computed once and read by each layer.
    fn layers(count: usize) -> GraphProto {
        let mut nodes = vec![node("Relu", "mask", &["x"], &["mask"], vec![])];
        let mut inits = vec![];
        let mut h = "x".to_string();
        for i in 0..count {
            let w = format!("W{i}");
            inits.push(init(&w, &[4, 4], &[0.0; 16], FloatFormat::F32));
            nodes.push(node("Mul", &format!("m{i}"), &[&h, "mask"], &[&format!("a{i}")], vec![]));
            nodes.push(node("MatMul", &format!("mm{i}"), &[&format!("a{i}"), &w], &[&format!("b{i}")], vec![]));
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
    fn crossings_count_the_residual_and_the_mask() {
        let g = layers(2);
        let all = vec![true; g.node.len()];
        // Positions: 0 | mask 1 | m0 2 | mm0 3 | r0 4 | m1 5 | mm1 6 | r1 7 (x is a graph input).
        // After mask: {mask}; after m0: {mask, a0}; after mm0: {mask, b0}; after r0: {mask, h0};
        // after m1: {a1, h0}; after mm1: {b1, h0}; after r1: nothing (h1 is only a graph output).
        let (counts, shared) = crossings(&g, &all);
        assert_eq!(counts, vec![0, 1, 2, 2, 2, 2, 2, 0]);
        // Only after r0 is every crossing tensor read twice more (h0 by m1 and r1; mask by m1 only
        // in two layers, so not there either).
        assert_eq!(shared, vec![true, true, false, false, false, false, false, true]);
        let (_, shared) = crossings(&layers(3), &[true; 10]);
        assert!(shared[4] && !shared[7], "{shared:?}");
        // A node outside `keep` neither produces nor reads.
        let mut keep = all.clone();
        keep[0] = false;
        assert_eq!(crossings(&g, &keep).0[1..3], [0, 1]);
    }

    #[test]
    fn cuts_after_each_layer_once_it_holds_the_target() {
        let g = layers(4);
        let all = vec![true; g.node.len()];
        // Activations a0..a3 come from m0..m3 (nodes 1, 4, 7, 10). Candidates: after r0 (4) and
        // r1 (7), each crossed by {mask, h}; after r2 the mask has one reader left.
        let s = cut(&g, &all, 1..10, 64).unwrap();
        assert_eq!(s.starts, vec![0, 4, 7]);
        assert_eq!(s.crossing, vec![2, 2]);
        assert_eq!(s.of(0), 0);
        assert_eq!(s.of(5), 1);
        assert_eq!(s.of(12), 2);
        let s = cut(&g, &all, 1..10, 128).unwrap();
        assert_eq!(s.starts, vec![0, 7]);
    }

    #[test]
    fn a_graph_too_small_stays_whole_with_the_reason() {
        let g = layers(4);
        let all = vec![true; g.node.len()];
        let why = cut(&g, &all, 1..10, 1 << 30).unwrap_err();
        assert!(why.contains("do not fill two segments"), "{why}");
        let why = cut(&layers(1), &[true; 4], 1..1, 1).unwrap_err();
        assert!(why.contains("one node"), "{why}");
    }
}
