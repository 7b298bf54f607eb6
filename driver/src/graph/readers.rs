//! Who reads each tensor, in the whole model: the main graph and every If/Loop/Scan body,
//! recursively, with outer-scope references resolved as ONNX scopes them (a body's inputs,
//! initializers and node outputs shadow the enclosing graphs' names).
//!
//! Each node input resolves to a [`Def`]: a constant (initializer or `Constant` node of some graph),
//! a node output, or a graph input. [`Index::uses`] lists the readers of every definition in walk
//! order (each graph's nodes in order, a node's bodies right after it), so for a model without
//! subgraphs the order is the node order. Model-local functions read only their own inputs, so
//! they hold no readers of the model's constants.
//!
//! A graph is addressed by its [`GraphPath`] from the main graph: one `(node, attribute, graph)`
//! step per body (`graph` is 0 for the attribute's `g`, `i + 1` for `graphs[i]`).

use super::onnx::{GraphProto, NodeProto, TensorProto};
use super::read::{attr, is_default_domain, Source};
use std::collections::{HashMap, HashSet};

/// A graph of the model: the steps `(node index, attribute index, graph index)` from the main graph
/// (empty for the main graph).
pub type GraphPath = Vec<(usize, usize, usize)>;

/// A node: its graph and index in that graph's node list.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NodeAt {
    /// The graph.
    pub graph: GraphPath,
    /// The index in `graph.node`.
    pub node: usize,
}

/// One read of a tensor: input `input` of node `at`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Use {
    /// The reading node.
    pub at: NodeAt,
    /// Which of its inputs.
    pub input: usize,
}

/// Where a tensor name resolves to.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Def {
    /// `Index::constants[i]`.
    Constant(usize),
    /// Output `.1` of a node.
    Node(NodeAt, usize),
    /// A graph input (or a name defined nowhere).
    Input,
}

/// A constant tensor of some graph.
#[derive(Clone, Debug)]
pub struct Constant {
    /// Its name.
    pub name: String,
    /// Its graph.
    pub graph: GraphPath,
    /// Initializer or Constant node of that graph.
    pub source: Source,
}

/// The readers of every tensor of a model.
#[derive(Clone, Debug, Default)]
pub struct Index {
    /// Every constant of every graph, in walk order.
    pub constants: Vec<Constant>,
    /// The readers of each definition, in walk order.
    pub uses: HashMap<Def, Vec<Use>>,
    /// Definitions that are also a graph output (of the graph that sees them).
    pub outputs: HashSet<Def>,
    /// The definition each node input resolves to.
    pub resolved: HashMap<Use, Def>,
    /// Every node, in walk order.
    pub nodes: Vec<NodeAt>,
}

/// The graph at `path` below `root`.
pub fn graph_at<'a>(root: &'a GraphProto, path: &[(usize, usize, usize)]) -> &'a GraphProto {
    path.iter().fold(root, |g, &(n, a, i)| {
        let at = &g.node[n].attribute[a];
        if i == 0 {
            at.g.as_ref().expect("body")
        } else {
            &at.graphs[i - 1]
        }
    })
}

/// The graph at `path` below `root`, mutably.
pub fn graph_at_mut<'a>(root: &'a mut GraphProto, path: &[(usize, usize, usize)]) -> &'a mut GraphProto {
    path.iter().fold(root, |g, &(n, a, i)| {
        let at = &mut g.node[n].attribute[a];
        if i == 0 {
            at.g.as_mut().expect("body")
        } else {
            &mut at.graphs[i - 1]
        }
    })
}

/// The bodies of a node: `(attribute index, graph index, body)`.
pub fn bodies(n: &NodeProto) -> impl Iterator<Item = (usize, usize, &GraphProto)> {
    n.attribute.iter().enumerate().flat_map(|(ai, a)| {
        a.g.iter().map(move |g| (ai, 0, g)).chain(a.graphs.iter().enumerate().map(move |(gi, g)| (ai, gi + 1, g)))
    })
}

impl Index {
    /// Indexes `root` (the model's main graph).
    pub fn build(root: &GraphProto) -> Index {
        let mut idx = Index::default();
        let mut scopes: Vec<HashMap<String, Def>> = vec![];
        idx.walk(root, vec![], &mut scopes);
        idx
    }

    fn walk(&mut self, g: &GraphProto, path: GraphPath, scopes: &mut Vec<HashMap<String, Def>>) {
        let mut frame: HashMap<String, Def> = HashMap::new();
        for v in &g.input {
            frame.insert(v.name.clone().unwrap_or_default(), Def::Input);
        }
        for (i, t) in g.initializer.iter().enumerate() {
            let name = t.name.clone().unwrap_or_default();
            frame.insert(name.clone(), Def::Constant(self.constants.len()));
            self.constants.push(Constant { name, graph: path.clone(), source: Source::Initializer(i) });
        }
        for (i, n) in g.node.iter().enumerate() {
            let at = NodeAt { graph: path.clone(), node: i };
            let constant = n.op_type.as_deref() == Some("Constant")
                && is_default_domain(n.domain.as_deref())
                && attr(n, "value").and_then(|a| a.t.as_ref()).is_some();
            for (j, o) in n.output.iter().enumerate().filter(|(_, o)| !o.is_empty()) {
                if constant && j == 0 {
                    frame.insert(o.clone(), Def::Constant(self.constants.len()));
                    self.constants.push(Constant {
                        name: o.clone(),
                        graph: path.clone(),
                        source: Source::ConstantNode(i),
                    });
                } else {
                    frame.insert(o.clone(), Def::Node(at.clone(), j));
                }
            }
        }
        scopes.push(frame);
        for (i, n) in g.node.iter().enumerate() {
            let at = NodeAt { graph: path.clone(), node: i };
            self.nodes.push(at.clone());
            for (j, name) in n.input.iter().enumerate().filter(|(_, s)| !s.is_empty()) {
                let def = resolve(scopes, name);
                let u = Use { at: at.clone(), input: j };
                self.uses.entry(def.clone()).or_default().push(u.clone());
                self.resolved.insert(u, def);
            }
            for (ai, gi, body) in bodies(n) {
                let mut p = path.clone();
                p.push((i, ai, gi));
                self.walk(body, p, scopes);
            }
        }
        for o in &g.output {
            let def = resolve(scopes, o.name.as_deref().unwrap_or(""));
            self.outputs.insert(def);
        }
        scopes.pop();
    }

    /// The readers of `def` (empty if none).
    pub fn readers(&self, def: &Def) -> &[Use] {
        self.uses.get(def).map_or(&[], Vec::as_slice)
    }

    /// The definition input `input` of node `at` reads.
    pub fn def_of(&self, at: &NodeAt, input: usize) -> Option<&Def> {
        self.resolved.get(&Use { at: at.clone(), input })
    }

    /// The tensor of constant `i`.
    pub fn tensor<'a>(&self, root: &'a GraphProto, i: usize) -> &'a TensorProto {
        let c = &self.constants[i];
        let g = graph_at(root, &c.graph);
        match c.source {
            Source::Initializer(k) => &g.initializer[k],
            Source::ConstantNode(k) => attr(&g.node[k], "value").and_then(|a| a.t.as_ref()).expect("Constant value"),
        }
    }
}

fn resolve(scopes: &[HashMap<String, Def>], name: &str) -> Def {
    scopes.iter().rev().find_map(|f| f.get(name).cloned()).unwrap_or(Def::Input)
}

/// The node at `at` below `root`.
pub fn node_at<'a>(root: &'a GraphProto, at: &NodeAt) -> &'a NodeProto {
    &graph_at(root, &at.graph).node[at.node]
}

/// A readable name of a graph: `If-node/attribute` steps joined by ` > ` (empty for the main graph).
pub fn graph_label(root: &GraphProto, path: &[(usize, usize, usize)]) -> String {
    let mut g = root;
    let mut parts = vec![];
    for &(n, a, i) in path {
        let node = &g.node[n];
        let attr = &node.attribute[a];
        parts.push(format!("{}/{}", super::read::node_label(node), attr.name.as_deref().unwrap_or("")));
        g = if i == 0 { attr.g.as_ref().expect("body") } else { &attr.graphs[i - 1] };
    }
    parts.join(" > ")
}

/// A node's name for reports: its label, prefixed by its graph's label inside a body.
pub fn node_label_at(root: &GraphProto, at: &NodeAt) -> String {
    let own = super::read::node_label(node_at(root, at));
    if at.graph.is_empty() {
        own
    } else {
        format!("{} > {own}", graph_label(root, &at.graph))
    }
}
