//! Which constants get quantized: every rank-2 float constant (initializer or Constant node) that is
//! the weight input (B) of a MatMul or Gemm not excluded by a `--exclude` pattern. Patterns are
//! regular expressions anchored at the start of the node name, like Python's `re.match` in
//! ModelOpt (default `/lm_head`).

//!
//! INT8 layers (ModelOpt's `layers_8bit`, `enable_mixed_quant`) are chosen in [`mixed`], or by
//! measured sensitivity within a size budget (`--target-bits`) in [`budget`]; Gather
//! (embedding) tables by [`plan_gather`].

pub mod budget;
pub mod mixed;
pub mod tied;

use crate::error::{Error, Result};
use crate::graph::fold::{chain, fold, Chain};
use crate::graph::model::{byte_size, dtype_name, Model};
use crate::graph::onnx::tensor_proto::DataType;
use crate::graph::onnx::GraphProto;
use crate::graph::read::{attr_int, is_default_domain, Source};
use crate::graph::readers::{graph_at, node_at, node_label_at, Def, GraphPath, Index, Use};
use nibble::{Bits, FloatFormat};
use regex::Regex;

/// What happens to one candidate weight.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Quantized with blocks along this axis of the stored tensor.
    Quantize {
        /// 0 for `[K, N]` weights, 1 for `transB=1` Gemm weights stored `[N, K]`.
        axis: usize,
    },
    /// Left as is because its node matched a pattern.
    Excluded {
        /// The pattern.
        pattern: String,
    },
    /// A float weight of a type that cannot be quantized: an error for `quantize`.
    Unsupported {
        /// Why.
        reason: String,
    },
    /// Left as is for another reason.
    Skipped {
        /// Why.
        reason: String,
    },
}

/// What one reader of a candidate weight gets.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reads {
    /// The quantized weight (it is rewired to the quantized form).
    Quantized,
    /// The original float tensor, which stays in the model for it; why.
    Original(String),
    /// The head's quantized bytes, as a tied embedding (see [`tied`]): a Gather of the table, or the
    /// Transpose/Identity chain a Gather reads the table through.
    Tied,
}

/// One reader of a candidate weight.
#[derive(Clone, Debug)]
pub struct Reader {
    /// The node input reading it (`None`: a graph output).
    pub at: Option<Use>,
    /// The node's name (prefixed by its If/Loop/Scan body inside one).
    pub label: String,
    /// Its operator.
    pub op: String,
    /// What it gets.
    pub reads: Reads,
    /// For a folded chain: a reader of the chain's constant (or of an intermediate tensor), not of
    /// the chain's result.
    pub of_source: bool,
}

/// One weight input of a MatMul/Gemm (or an embedding table), with every reader of it.
#[derive(Clone, Debug)]
pub struct Candidate {
    /// The tensor name the quantized readers read: the constant's name, or the output of the
    /// constant chain it reaches them through.
    pub weight: String,
    /// The base of the names of the quantized form (`W_i4`, `W_scale`, ...; the weight's name
    /// except for a second quantized copy of a table).
    pub base: String,
    /// The first consuming node's name.
    pub node: String,
    /// Its operator.
    pub op: String,
    /// The tensor's dims.
    pub dims: Vec<i64>,
    /// The ONNX data type.
    pub dtype: i32,
    /// Size in bytes.
    pub bytes: usize,
    /// Where the constant lives in its graph.
    pub source: Source,
    /// The constant's graph.
    pub graph: GraphPath,
    /// The graph the quantized form goes into: the constant's, or the chain result's.
    pub place: GraphPath,
    /// Every reader, each with what it gets.
    pub readers: Vec<Reader>,
    /// The folded constant chain the weight comes from, with its result's bytes.
    pub folded: Option<(Chain, bytes::Bytes)>,
    /// What happens to it.
    pub decision: Decision,
    /// Code width: 4 bits, or 8 (a mixed-precision INT8 layer, or `--head-bits 8`).
    pub bits: Bits,
    /// This weight's own block size (`None`: the run's): one block per channel for an INT8 layer
    /// of ModelOpt's mixed precision.
    pub block_size: Option<nibble::BlockSize>,
    /// Embedding Gathers that read this (head) weight's quantized bytes (see [`tied`]).
    pub tied: Vec<tied::TiedGather>,
}

impl Candidate {
    /// The element format, for float weights.
    pub fn format(&self) -> Option<FloatFormat> {
        match DataType::try_from(self.dtype).ok()? {
            DataType::Float => Some(FloatFormat::F32),
            DataType::Float16 => Some(FloatFormat::F16),
            DataType::Bfloat16 => Some(FloatFormat::BF16),
            _ => None,
        }
    }

    /// Its block size given the run's `default`: its own when set (one block per channel for a
    /// ModelOpt INT8 layer).
    pub fn block(&self, default: nibble::BlockSize) -> nibble::BlockSize {
        self.block_size.unwrap_or(default)
    }

    /// Whether it will be quantized.
    pub fn quantized(&self) -> bool {
        matches!(self.decision, Decision::Quantize { .. })
    }

    /// The node inputs rewired to the quantized form.
    pub fn quantized_uses(&self) -> impl Iterator<Item = &Use> {
        self.readers.iter().filter(|r| r.reads == Reads::Quantized).filter_map(|r| r.at.as_ref())
    }

    /// The stored bytes of the weight: the constant's, or the folded chain's result.
    pub fn data(&self, model: &Model) -> Result<bytes::Bytes> {
        if let Some((_, data)) = &self.folded {
            return Ok(data.clone());
        }
        let root = model.proto.graph.as_ref().expect("graph");
        let g = graph_at(root, &self.graph);
        let t = match self.source {
            Source::Initializer(i) => &g.initializer[i],
            Source::ConstantNode(i) => {
                crate::graph::read::attr(&g.node[i], "value").and_then(|a| a.t.as_ref()).expect("Constant value")
            }
        };
        model.tensor_bytes(t)
    }
}

/// Compiles `--exclude` patterns, anchored at the start like `re.match`.
pub fn compile_patterns(patterns: &[String]) -> Result<Vec<(String, Regex)>> {
    patterns
        .iter()
        .map(|p| {
            Regex::new(&format!("^(?:{p})"))
                .map(|r| (p.clone(), r))
                .map_err(|e| Error::Usage(format!("invalid --exclude pattern '{p}': {e}")))
        })
        .collect()
}

/// Lists every MatMul/Gemm weight (a constant, or a constant chain folded to one tensor) of the
/// whole model, bodies included, in the order of their first MatMul/Gemm reader, and decides its
/// fate and what each of its readers gets: a MatMul/Gemm reading it as B and not excluded reads the
/// quantized weight; an excluded node, any other operator and a graph output read the original
/// (kept for them). A weight read as `[K, N]` and as `[N, K]` (`transB=1`) is left float.
pub fn plan(model: &Model, exclude: &[(String, Regex)]) -> Result<Vec<Candidate>> {
    let root = model.proto.graph.as_ref().expect("graph");
    let idx = Index::build(root);
    let mut order: Vec<Def> = vec![];
    for at in &idx.nodes {
        let n = node_at(root, at);
        if !matches!(n.op_type.as_deref(), Some("MatMul" | "Gemm")) || !is_default_domain(n.domain.as_deref()) {
            continue;
        }
        let Some(def) = n.input.get(1).filter(|s| !s.is_empty()).and_then(|_| idx.def_of(at, 1)) else { continue };
        let weight = match def {
            Def::Constant(_) => true,
            Def::Node(..) => chain(&idx, root, def).is_some(),
            Def::Input => false,
        };
        if weight && !order.contains(def) {
            order.push(def.clone());
        }
    }
    let mut out = vec![];
    for def in &order {
        out.extend(split_layouts(root, candidate(model, &idx, root, def, exclude)?));
    }
    Ok(out)
}

/// The blocking axis a quantized reader asks for: 1 for a Gemm with `transB=1` (weight stored
/// `[N, K]`), else 0.
fn axis_of(root: &GraphProto, u: &Use) -> usize {
    let n = node_at(root, &u.at);
    usize::from(n.op_type.as_deref() == Some("Gemm") && attr_int(n, "transB") == Some(1))
}

/// A weight read both as `[K, N]` (MatMul, Gemm) and as `[N, K]` (Gemm with `transB=1`): one
/// quantized copy per layout, each read by its own readers (the first keeps ModelOpt's names, the
/// other is named `W_axisA`); the readers of the original are listed under the first.
fn split_layouts(root: &GraphProto, c: Candidate) -> Vec<Candidate> {
    let axes: Vec<usize> = c.quantized_uses().map(|u| axis_of(root, u)).collect();
    if !c.quantized() || axes.iter().all(|&a| a == axes[0]) {
        return vec![c];
    }
    let mut out = vec![];
    for (i, axis) in [axes[0], 1 - axes[0]].into_iter().enumerate() {
        let mut k = c.clone();
        k.readers.retain(|r| match (&r.reads, &r.at) {
            (Reads::Quantized, Some(u)) => axis_of(root, u) == axis,
            _ => i == 0,
        });
        k.decision = Decision::Quantize { axis };
        if i > 0 {
            k.base = format!("{}_axis{axis}", c.weight);
        }
        let first = k.quantized_uses().next().map(|u| u.at.clone());
        if let Some(at) = first {
            k.node = node_at(root, &at).name.clone().unwrap_or_default();
            k.op = node_at(root, &at).op_type.clone().unwrap_or_default();
        }
        out.push(k);
    }
    out
}

fn reader(root: &GraphProto, u: &Use, reads: Reads, of_source: bool) -> Reader {
    let n = node_at(root, &u.at);
    Reader {
        at: Some(u.clone()),
        label: node_label_at(root, &u.at),
        op: n.op_type.clone().unwrap_or_default(),
        reads,
        of_source,
    }
}

fn output_reader(of_source: bool) -> Reader {
    Reader {
        at: None,
        label: "(graph output)".into(),
        op: String::new(),
        reads: Reads::Original("a graph output".into()),
        of_source,
    }
}

/// What a non-quantizing reader of a weight gets, and why.
fn original_because(op: &str, input: usize) -> String {
    match (op, input) {
        ("Gather", 0) => "embedding Gather: reads the original table (--gather-axis quantizes tables)".into(),
        ("MatMul" | "Gemm", 0) => format!("{op} reads it as its A input: reads the original"),
        _ => format!("{op} reads the original"),
    }
}

fn candidate(
    model: &Model,
    idx: &Index,
    root: &GraphProto,
    def: &Def,
    exclude: &[(String, Regex)],
) -> Result<Candidate> {
    let mut readers: Vec<Reader> = vec![];
    let mut first_pattern: Option<String> = None;
    let mut first_b: Option<String> = None;
    let mut axes: Vec<usize> = vec![];
    for u in idx.readers(def) {
        let n = node_at(root, &u.at);
        let op = n.op_type.as_deref().unwrap_or("");
        if matches!(op, "MatMul" | "Gemm") && is_default_domain(n.domain.as_deref()) && u.input == 1 {
            let name = n.name.clone().unwrap_or_default();
            first_b.get_or_insert(name.clone());
            if let Some((p, _)) = exclude.iter().find(|(_, r)| r.is_match(&name)) {
                first_pattern.get_or_insert(p.clone());
                readers.push(reader(root, u, Reads::Original(format!("excluded by '{p}': reads the original")), false));
            } else {
                axes.push(if op == "Gemm" && attr_int(n, "transB") == Some(1) { 1 } else { 0 });
                readers.push(reader(root, u, Reads::Quantized, false));
            }
        } else {
            readers.push(reader(root, u, Reads::Original(original_because(op, u.input)), false));
        }
    }
    if idx.outputs.contains(def) {
        readers.push(output_reader(false));
    }
    let (weight, constant, place, folded, fold_error) = match def {
        Def::Constant(i) => (idx.constants[*i].name.clone(), *i, idx.constants[*i].graph.clone(), None, None),
        Def::Node(at, _) => {
            let c = chain(idx, root, def).expect("planned chains only");
            let name = node_at(root, at).output[0].clone();
            // Readers of the constant and of the chain's intermediate tensors keep the original.
            let mut defs = vec![Def::Constant(c.constant)];
            defs.extend(c.nodes[..c.nodes.len() - 1].iter().map(|a| Def::Node(a.clone(), 0)));
            for d in &defs {
                for u in idx.readers(d).iter().filter(|u| !c.nodes.contains(&u.at)) {
                    let op = node_at(root, &u.at).op_type.clone().unwrap_or_default();
                    let why = format!(
                        "{}; the chain's constant '{}' stays",
                        original_because(&op, u.input),
                        idx.constants[c.constant].name
                    );
                    readers.push(reader(root, u, Reads::Original(why), true));
                }
                if idx.outputs.contains(d) {
                    readers.push(output_reader(true));
                }
            }
            let (folded, error) = match fold(model, idx, &c)? {
                Ok(f) => (Some((c.clone(), f)), None),
                Err(why) => (None, Some(why)),
            };
            (name, c.constant, at.graph.clone(), folded, error)
        }
        Def::Input => unreachable!("constants and chains only"),
    };
    let t = idx.tensor(root, constant);
    let (dims, dtype, bytes) = match &folded {
        Some((_, f)) => (f.dims.clone(), f.dtype, f.data.len()),
        None => (t.dims.clone(), t.data_type.unwrap_or(0), byte_size(t).unwrap_or(0)),
    };
    let quantized: Vec<&Reader> = readers.iter().filter(|r| r.reads == Reads::Quantized).collect();
    let node = quantized
        .first()
        .and_then(|r| r.at.as_ref())
        .map(|u| node_at(root, &u.at).name.clone().unwrap_or_default())
        .or(first_b)
        .unwrap_or_default();
    let op = quantized.first().map_or_else(
        || readers.iter().find(|r| matches!(r.op.as_str(), "MatMul" | "Gemm")).map_or(String::new(), |r| r.op.clone()),
        |r| r.op.clone(),
    );
    let mut decision = if quantized.is_empty() {
        Decision::Excluded { pattern: first_pattern.unwrap_or_default() }
    } else if let Some(why) = fold_error {
        Decision::Skipped { reason: format!("behind a constant chain that cannot be folded: {why}") }
    } else if dims.len() != 2 {
        Decision::Skipped { reason: format!("rank {} (only 2-D weights are quantized)", dims.len()) }
    } else if matches!(DataType::try_from(dtype), Ok(DataType::Double)) {
        Decision::Unsupported { reason: format!("data type {}", dtype_name(dtype)) }
    } else if !matches!(DataType::try_from(dtype), Ok(DataType::Float | DataType::Float16 | DataType::Bfloat16)) {
        Decision::Skipped {
            reason: format!("data type {} (only float32/float16/bfloat16 weights are quantized)", dtype_name(dtype)),
        }
    } else {
        Decision::Quantize { axis: axes[0] }
    };
    if decision.is_quantize() && folded.is_none() && byte_size(t).is_none() {
        decision = Decision::Skipped { reason: "invalid dims".into() };
    }
    let mut c = Candidate::four_bit(idx, root, constant, node, &op, readers, decision);
    (c.weight, c.base, c.dims, c.dtype, c.bytes, c.place) = (weight.clone(), weight, dims, dtype, bytes, place);
    c.folded = folded.map(|(chain, f)| (chain, f.data));
    Ok(c)
}

impl Candidate {
    /// A 4-bit candidate for constant `k` of `idx` (named after it, placed in its graph), read by
    /// node `node` of type `op`.
    fn four_bit(
        idx: &Index,
        root: &GraphProto,
        k: usize,
        node: String,
        op: &str,
        readers: Vec<Reader>,
        decision: Decision,
    ) -> Candidate {
        let (constant, t) = (&idx.constants[k], idx.tensor(root, k));
        Candidate {
            weight: constant.name.clone(),
            base: constant.name.clone(),
            node,
            op: op.to_string(),
            dims: t.dims.clone(),
            dtype: t.data_type.unwrap_or(0),
            bytes: byte_size(t).unwrap_or(0),
            source: constant.source.clone(),
            graph: constant.graph.clone(),
            place: constant.graph.clone(),
            readers,
            folded: None,
            decision,
            bits: Bits::Four,
            block_size: None,
            tied: vec![],
        }
    }
}

impl Decision {
    fn is_quantize(&self) -> bool {
        matches!(self, Decision::Quantize { .. })
    }
}

/// The embedding tables (`--gather-axis`, ModelOpt's `gather_quantize_axis`): the data input of
/// every Gather, blocked along `axis`. A table that is also a MatMul/Gemm weight (tied embeddings)
/// is shared only where that is exact (`shared`: the head's quantization is plain RTN blocked along
/// the same axis with the same block size and bits); otherwise its Gathers get their own quantized
/// copy of the table (or, with the head excluded, the table's only one). Other readers of a table
/// keep the original.
pub fn plan_gather(
    model: &Model,
    exclude: &[(String, Regex)],
    axis: usize,
    candidates: &mut Vec<Candidate>,
    shared: &dyn Fn(&Candidate) -> bool,
) -> Result<()> {
    let root = model.proto.graph.as_ref().expect("graph");
    let idx = Index::build(root);
    let mut tables: Vec<usize> = vec![];
    for at in &idx.nodes {
        let n = node_at(root, at);
        if n.op_type.as_deref() != Some("Gather") || !is_default_domain(n.domain.as_deref()) {
            continue;
        }
        if let Some(Def::Constant(c)) = idx.def_of(at, 0) {
            if !tables.contains(c) {
                tables.push(*c);
            }
        }
    }
    let mut added = vec![];
    for c in tables {
        let def = Def::Constant(c);
        let name = idx.constants[c].name.clone();
        let is_gather = |r: &Reader| r.op == "Gather" && r.at.as_ref().is_some_and(|u| u.input == 0);
        if let Some(head) = candidates.iter_mut().find(|k| k.weight == name && k.folded.is_none() && k.op != "Gather") {
            if shared(head) {
                for r in head.readers.iter_mut().filter(|r| is_gather(r)) {
                    let label = r.label.clone();
                    r.reads = match exclude.iter().find(|(_, re)| re.is_match(&gather_name(root, r))) {
                        Some((p, _)) => Reads::Original(format!("excluded by '{p}': reads the original ({label})")),
                        None => Reads::Quantized,
                    };
                }
                continue;
            }
            // Its own copy: the Gathers move to the table's candidate.
            head.readers.retain(|r| !is_gather(r));
        }
        let t = idx.tensor(root, c);
        let head = candidates.iter().find(|k| k.weight == name && k.folded.is_none() && k.op != "Gather");
        let taken = head.is_some_and(|k| k.quantized());
        let head_readers: Vec<Reader> = head.map(|k| k.readers.clone()).unwrap_or_default();
        let mut readers: Vec<Reader> = vec![];
        let mut pattern = None;
        for u in idx.readers(&def) {
            let n = node_at(root, &u.at);
            let op = n.op_type.as_deref().unwrap_or("");
            if op == "Gather" && u.input == 0 {
                let nname = n.name.clone().unwrap_or_default();
                match exclude.iter().find(|(_, r)| r.is_match(&nname)) {
                    Some((p, _)) => {
                        pattern.get_or_insert(p.clone());
                        let why = format!("excluded by '{p}': reads the original");
                        readers.push(reader(root, u, Reads::Original(why), false));
                    }
                    None => readers.push(reader(root, u, Reads::Quantized, false)),
                }
            } else if taken {
                // The quantized head's candidate accounts for every other reader.
            } else if let Some(r) = head_readers.iter().find(|r| r.at.as_ref() == Some(u)) {
                readers.push(r.clone());
            } else {
                readers.push(reader(root, u, Reads::Original(original_because(op, u.input)), false));
            }
        }
        if idx.outputs.contains(&def) && !taken {
            readers.push(output_reader(false));
        }
        let dtype = t.data_type.unwrap_or(0);
        let first = readers.iter().find(|r| r.reads == Reads::Quantized);
        let node = first
            .or_else(|| readers.iter().find(|r| r.op == "Gather"))
            .and_then(|r| r.at.as_ref())
            .map(|u| node_at(root, &u.at).name.clone().unwrap_or_default())
            .unwrap_or_default();
        let decision = if first.is_none() {
            Decision::Excluded { pattern: pattern.unwrap_or_default() }
        } else if t.dims.len() != 2 {
            Decision::Skipped { reason: format!("rank {} (only 2-D tables are quantized)", t.dims.len()) }
        } else if !matches!(DataType::try_from(dtype), Ok(DataType::Float | DataType::Float16 | DataType::Bfloat16)) {
            Decision::Skipped { reason: format!("data type {}", dtype_name(dtype)) }
        } else if byte_size(t).is_none() {
            Decision::Skipped { reason: "invalid dims".into() }
        } else {
            Decision::Quantize { axis }
        };
        let mut table = Candidate::four_bit(&idx, root, c, node, "Gather", readers, decision);
        if taken {
            table.base = format!("{name}_gather");
        }
        added.push(table);
    }
    candidates.extend(added);
    Ok(())
}

fn gather_name(root: &GraphProto, r: &Reader) -> String {
    r.at.as_ref().and_then(|u| node_at(root, &u.at).name.clone()).unwrap_or_default()
}

/// MatMul/Gemm nodes inside model-local functions (`ModelProto.functions`), which nibble does not
/// quantize (a function body is shared by every call site and has no initializers of its own):
/// `(function, node label, op)`, each reported so no weight stays float silently.
pub fn function_matmuls(model: &Model) -> Vec<(String, String, String)> {
    let mut out = Vec::new();
    for f in &model.proto.functions {
        for n in &f.node {
            let op = n.op_type.as_deref().unwrap_or("");
            if matches!(op, "MatMul" | "Gemm") && n.domain.as_deref().unwrap_or("").is_empty() {
                let name = f.name.clone().unwrap_or_default();
                out.push((name, crate::graph::read::node_label(n), op.to_string()));
            }
        }
    }
    out
}
