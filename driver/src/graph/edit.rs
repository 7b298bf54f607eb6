//! Structural edits to the graphs of a model (nodes inserted, replaced or removed; initializers
//! removed and added), collected per graph and applied bodies first, so that the [`GraphPath`]s and
//! node indices every edit was planned with stay valid until it is applied.

use super::onnx::{GraphProto, NodeProto, TensorProto, ValueInfoProto};
use super::readers::{graph_at_mut, GraphPath, NodeAt};
use std::collections::{BTreeMap, HashMap, HashSet};

/// The edits of one graph.
#[derive(Default)]
pub struct GraphEdit {
    /// Nodes inserted before node `i`, in order.
    pub before: BTreeMap<usize, Vec<NodeProto>>,
    /// Node `i` replaced by these nodes (none: removed).
    pub replace: HashMap<usize, Vec<NodeProto>>,
    /// Initializers (and the graph inputs listing them) removed.
    pub remove_initializers: HashSet<String>,
    /// Initializers appended, in order.
    pub initializers: Vec<TensorProto>,
    /// Value infos appended, in order.
    pub value_info: Vec<ValueInfoProto>,
}

/// Edits to every graph of a model.
#[derive(Default)]
pub struct Edits {
    graphs: BTreeMap<GraphPath, GraphEdit>,
}

impl Edits {
    /// The edits of the graph at `path`.
    pub fn graph(&mut self, path: &GraphPath) -> &mut GraphEdit {
        self.graphs.entry(path.clone()).or_default()
    }

    /// Removes node `at`.
    pub fn remove(&mut self, at: &NodeAt) {
        self.graph(&at.graph).replace.insert(at.node, vec![]);
    }

    /// Applies every edit to `root`, the deepest bodies first.
    pub fn apply(self, root: &mut GraphProto) {
        let mut graphs: Vec<(GraphPath, GraphEdit)> = self.graphs.into_iter().collect();
        graphs.sort_by_key(|(p, _)| std::cmp::Reverse(p.len()));
        for (path, mut e) in graphs {
            let g = graph_at_mut(root, &path);
            if !e.before.is_empty() || !e.replace.is_empty() {
                let old = std::mem::take(&mut g.node);
                for (i, n) in old.into_iter().enumerate() {
                    if let Some(nodes) = e.before.remove(&i) {
                        g.node.extend(nodes);
                    }
                    match e.replace.remove(&i) {
                        Some(nodes) => g.node.extend(nodes),
                        None => g.node.push(n),
                    }
                }
                for (_, nodes) in std::mem::take(&mut e.before) {
                    g.node.extend(nodes);
                }
            }
            if !e.remove_initializers.is_empty() {
                g.initializer.retain(|t| !e.remove_initializers.contains(t.name.as_deref().unwrap_or("")));
                // Older exports also list initializers as graph inputs: drop those entries with them.
                g.input.retain(|v| !e.remove_initializers.contains(v.name.as_deref().unwrap_or("")));
            }
            g.initializer.extend(e.initializers);
            g.value_info.extend(e.value_info);
        }
    }
}
