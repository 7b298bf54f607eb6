//! Readers over an ONNX graph: attributes of a node, the constant tensors (initializers and
//! `Constant` nodes) by name, and the names that If/Loop/Scan bodies read from the outer scope.

use super::model::Model;
use super::onnx::{AttributeProto, GraphProto, NodeProto, TensorProto};
use std::collections::{HashMap, HashSet};

/// Where a constant tensor lives in the top-level graph.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Source {
    /// `graph.initializer[i]`.
    Initializer(usize),
    /// The `value` of the `Constant` node `graph.node[i]`.
    ConstantNode(usize),
}

/// The attribute `name` of `n`.
pub fn attr<'a>(n: &'a NodeProto, name: &str) -> Option<&'a AttributeProto> {
    n.attribute.iter().find(|a| a.name.as_deref() == Some(name))
}

/// The integer attribute `name` of `n`.
pub fn attr_int(n: &NodeProto, name: &str) -> Option<i64> {
    attr(n, name).and_then(|a| a.i)
}

/// Removes and returns the attribute `name` of `n`.
pub fn take_attr(n: &mut NodeProto, name: &str) -> Option<AttributeProto> {
    let i = n.attribute.iter().position(|a| a.name.as_deref() == Some(name))?;
    Some(n.attribute.remove(i))
}

/// Whether an operator domain is ONNX's default one (`""` or `ai.onnx`; unset means default).
pub fn is_default_domain(d: Option<&str>) -> bool {
    matches!(d, None | Some("") | Some("ai.onnx"))
}

/// A node's name for messages: its name, else its first output.
pub fn node_label(n: &NodeProto) -> String {
    n.name.clone().filter(|s| !s.is_empty()).or_else(|| n.output.first().cloned()).unwrap_or_default()
}

/// The constant tensors of the top-level graph by name.
pub fn constants(model: &Model) -> HashMap<String, (Source, &TensorProto)> {
    let g = model.proto.graph.as_ref().expect("graph");
    let mut map = HashMap::new();
    for (i, t) in g.initializer.iter().enumerate() {
        map.insert(t.name.clone().unwrap_or_default(), (Source::Initializer(i), t));
    }
    for (i, n) in g.node.iter().enumerate() {
        if n.op_type.as_deref() == Some("Constant") && matches!(n.domain.as_deref(), None | Some("")) {
            if let (Some(out), Some(t)) = (n.output.first(), attr(n, "value").and_then(|a| a.t.as_ref())) {
                map.insert(out.clone(), (Source::ConstantNode(i), t));
            }
        }
    }
    map
}

/// Every name read by a node inside the subgraphs (If/Loop/Scan bodies, recursively) of `g`'s
/// nodes: the outer-scope names those bodies may reference.
pub fn subgraph_inputs(g: &GraphProto) -> HashSet<String> {
    let mut acc = HashSet::new();
    for n in &g.node {
        body_reads(n, &mut acc);
    }
    acc
}

/// Every name the nodes read: their inputs and, for nodes with bodies, every name read inside them.
pub fn reads<'a>(nodes: impl IntoIterator<Item = &'a NodeProto>) -> HashSet<String> {
    let mut acc = HashSet::new();
    for n in nodes {
        acc.extend(n.input.iter().filter(|i| !i.is_empty()).cloned());
        body_reads(n, &mut acc);
    }
    acc
}

/// Adds every name read inside `n`'s bodies (recursively) to `acc`: a superset of the outer-scope
/// names the bodies reference (names the bodies define themselves are included too).
fn body_reads(n: &NodeProto, acc: &mut HashSet<String>) {
    for a in &n.attribute {
        for s in a.g.iter().chain(&a.graphs) {
            for m in &s.node {
                acc.extend(m.input.iter().filter(|i| !i.is_empty()).cloned());
                body_reads(m, acc);
            }
        }
    }
}

/// The nodes of `g` that the tensors `wanted` depend on, as a mask over `g.node`: their producers
/// and, transitively, the producers of everything those read (inputs and, for nodes with bodies,
/// the outer-scope names the bodies read). Backward passes over the nodes until nothing changes
/// (one pass for a graph in topological order, as ONNX requires).
pub fn ancestors<'a>(g: &GraphProto, wanted: impl IntoIterator<Item = &'a str>) -> Vec<bool> {
    let mut need: HashSet<String> = wanted.into_iter().map(str::to_string).collect();
    let mut keep = vec![false; g.node.len()];
    let mut changed = true;
    while changed {
        changed = false;
        for (i, n) in g.node.iter().enumerate().rev() {
            if !keep[i] && n.output.iter().any(|o| !o.is_empty() && need.contains(o)) {
                keep[i] = true;
                changed = true;
                need.extend(n.input.iter().filter(|x| !x.is_empty()).cloned());
                body_reads(n, &mut need);
            }
        }
    }
    keep
}
