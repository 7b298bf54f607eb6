//! Which segment each weight belongs to, for shards (`--segments A..B`): the graph cut as
//! calibration by segments cuts it ([`crate::calibrate::segments::cut_for`], on the activations of
//! the planned weights), each weight in the segment of the node producing its activation (as
//! calibration assigns its wave). Weights calibration reaches no activation of (Gather tables,
//! weights read by several nodes, in If/Loop/Scan bodies, or fed by a constant) belong to no
//! segment: `nibble merge` quantizes them by round to nearest, as a whole run does.

use crate::calibrate::segments::{cut_for, Segments};
use crate::graph::model::Model;
use crate::graph::read::node_label;
use crate::plan::Candidate;
use std::collections::HashMap;

/// The segments of a planned model and the weights of each.
#[derive(Clone, Debug)]
pub struct Layout {
    /// The cuts (one segment starting at node 0 when the graph does not cut).
    pub segments: Segments,
    /// Why the graph does not cut, when it does not.
    pub whole: Option<String>,
    /// The name (or op and index) of each segment's first node.
    pub first_nodes: Vec<String>,
    /// The weights of each segment (base names, in plan order).
    pub weights: Vec<Vec<String>>,
    /// Segment of each weight that has one.
    pub owner: HashMap<String, usize>,
}

impl Layout {
    /// The layout of `chosen` (the planned weights of `model`) in segments of at least `target`
    /// bytes of weights.
    pub fn of(model: &Model, chosen: &[&Candidate], target: u64) -> Layout {
        let (groups, _) = crate::methods::awq::groups(model, chosen);
        let activations: Vec<String> = groups.iter().map(|g| g.activation.clone()).collect();
        let g = model.proto.graph.as_ref().expect("graph");
        let (producer, cut) = cut_for(g, &activations, target);
        let (segments, whole) = match cut {
            Ok(s) => (s, None),
            Err(why) => (Segments { starts: vec![0], crossing: vec![] }, Some(why)),
        };
        let mut owner = HashMap::new();
        for gr in &groups {
            let s = segments.of(producer.get(&gr.activation).copied().unwrap_or(0));
            for w in &gr.weights {
                owner.insert(w.clone(), s);
            }
        }
        let mut weights = vec![vec![]; segments.len()];
        for c in chosen {
            if let Some(&s) = owner.get(&c.base) {
                if !weights[s].contains(&c.base) {
                    weights[s].push(c.base.clone());
                }
            }
        }
        let first_nodes = segments.starts.iter().map(|&i| g.node.get(i).map(node_label).unwrap_or_default()).collect();
        Layout { segments, whole, first_nodes, weights, owner }
    }

    /// Number of segments.
    pub fn len(&self) -> usize {
        self.segments.len()
    }

    /// Never true.
    pub fn is_empty(&self) -> bool {
        self.segments.is_empty()
    }

    /// One line per segment: its index (0-based), first node, and weights.
    pub fn table(&self) -> String {
        let mut out = String::new();
        if let Some(why) = &self.whole {
            out.push_str(&format!("one segment (the graph does not cut: {why})\n"));
        }
        for (i, (first, ws)) in self.first_nodes.iter().zip(&self.weights).enumerate() {
            let shown: Vec<&str> = ws.iter().take(4).map(String::as_str).collect();
            let more = if ws.len() > 4 { format!(", ... ({} more)", ws.len() - 4) } else { String::new() };
            out.push_str(&format!(
                "segment {i}: from node '{first}', {} weights: {}{more}\n",
                ws.len(),
                shown.join(", ")
            ));
        }
        out
    }
}
