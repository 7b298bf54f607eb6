//! Tied embeddings: one float table `E` (`[V, H]`, vocabulary x hidden) read both by an embedding
//! `Gather(E, ids)` and, as `[K, N] = [H, V]`, by the LM head (`MatMul(x, Transpose(E))`,
//! `Gemm(x, E, transB=1)`, or the genai builder's `MatMul(x, W)` with `Gather(Transpose(W), ids)`),
//! directly or through `Transpose`/`Identity` nodes.
//!
//! When the head is quantized, its embedding Gathers read the head's quantized bytes instead of the
//! float table, so the model holds one copy of the table and no float leftover:
//! - `--format matmulnbits`: the head's MatMulNBits `B` (uint8 `[N, n_blocks, blob]`) is reshaped to
//!   `[N, n_blocks * blob]` (`[V, H/2]` at 4 bits, `[V, H]` at 8) and read by ONNX Runtime's
//!   `com.microsoft.GatherBlockQuantized` (`gather_axis = 0`, `quantize_axis = 1`, `block_size`,
//!   `bits`), which takes the head's scales `[N, n_blocks]` and packed zero points
//!   `[N, ceil(n_blocks * bits / 8)]` as they are (MatMulNBits reads the same 2-D tensors). It needs
//!   `K` to be a multiple of the block size (no padded block).
//! - `--format dq`: the Gather reads the head's `DequantizeLinear` output (through a `Transpose`
//!   when the head's weight is stored `[K, N]`).
//!
//! A Gather is not tied (and keeps the float table, with a note) when it reads the table as
//! `[K, N]` or through a Cast/Reshape (its shape disagrees with the head's), gathers along another
//! axis, is excluded by a pattern, sits in another graph than the head's quantized form, or when
//! the head's quantized weight is not the table itself (AWQ's pre-quant scales are folded into it,
//! or the QDQ form keeps the float weight).

use crate::graph::fold::chain;
use crate::graph::model::Model;
use crate::graph::read::{attr_int, is_default_domain};
use crate::graph::readers::{node_at, Def, Index, NodeAt, Use};
use crate::plan::{Candidate, Decision, Reader, Reads};
use nibble::{Bits, BlockSize};
use regex::Regex;

/// An embedding Gather reading a quantized head's bytes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TiedGather {
    /// The Gather's table input (input 0).
    pub gather: Use,
    /// The Transpose/Identity nodes between the head's constant and the Gather, first to last
    /// (empty: it reads the constant); removed once nothing else reads them.
    pub chain: Vec<NodeAt>,
}

/// What the run allows.
#[derive(Clone, Copy, Debug)]
pub struct TieRules {
    /// `--format matmulnbits` (else the DequantizeLinear form).
    pub matmulnbits: bool,
    /// The run's block size.
    pub block: BlockSize,
    /// Why the head's quantized weight is not the table itself, if it is not (AWQ pre-quant scales,
    /// the QDQ form).
    pub not_the_table: Option<&'static str>,
    /// `--gather-axis`, if given.
    pub gather_axis: Option<usize>,
}

/// How many `Transpose`s a chain of Transpose/Identity nodes holds, or `None` if it holds another
/// operator (a Cast or Reshape changes what the table is).
fn transposes(model: &Model, nodes: &[NodeAt]) -> Option<usize> {
    let root = model.proto.graph.as_ref().expect("graph");
    let mut t = 0;
    for at in nodes {
        let n = node_at(root, at);
        match n.op_type.as_deref() {
            Some("Identity") => {}
            Some("Transpose") => {
                let perm = crate::graph::read::attr(n, "perm").map(|a| a.ints.clone()).unwrap_or_default();
                if !(perm.is_empty() || perm == [1, 0]) {
                    return None;
                }
                t += 1;
            }
            _ => return None,
        }
    }
    Some(t)
}

/// Whether `name` is a head's node name (`lm_head`, as ModelOpt's default exclude pattern says).
pub fn is_head_name(name: &str) -> bool {
    name.contains("lm_head")
}

/// Sets `bits` (`--head-bits`) on every quantized head: a MatMul/Gemm named like `lm_head` or with
/// tied embedding Gathers. It keeps the run's block size. Returns how many it set.
pub fn set_head_bits(candidates: &mut [Candidate], bits: Bits) -> usize {
    let mut n = 0;
    for c in candidates.iter_mut().filter(|c| c.quantized() && c.op != "Gather") {
        if is_head_name(&c.node) || !c.tied.is_empty() {
            c.bits = bits;
            c.block_size = None;
            n += 1;
        }
    }
    n
}

/// Ties every embedding Gather whose table is a quantized head's weight (see the module docs):
/// records it in the head's [`Candidate::tied`], marks the reader through which it reads the
/// table [`Reads::Tied`], and takes it out of any `--gather-axis` table candidate of the same
/// constant (dropping that candidate when no Gather is left to it). Returns notes for the user:
/// each tie, and each Gather left float with why.
pub fn tie(
    model: &Model,
    exclude: &[(String, Regex)],
    candidates: &mut Vec<Candidate>,
    rules: &TieRules,
) -> Vec<String> {
    let root = model.proto.graph.as_ref().expect("graph");
    let idx = Index::build(root);
    let mut notes = vec![];
    for at in &idx.nodes {
        let n = node_at(root, at);
        if n.op_type.as_deref() != Some("Gather") || !is_default_domain(n.domain.as_deref()) {
            continue;
        }
        let label = crate::graph::read::node_label(n);
        // `flips`: the Transposes on the Gather's way to the constant; `None` when the way holds a
        // Cast or Reshape (the Gather reads another tensor than the table).
        let (k, chain_nodes, flips) = match idx.def_of(at, 0) {
            Some(Def::Constant(k)) => (*k, vec![], Some(0)),
            Some(def @ Def::Node(..)) => match chain(&idx, root, def) {
                Some(c) => {
                    let t = transposes(model, &c.nodes);
                    (c.constant, c.nodes, t)
                }
                None => continue,
            },
            _ => continue,
        };
        let constant = &idx.constants[k];
        let same = |c: &Candidate| c.op != "Gather" && c.graph == constant.graph && c.source == constant.source;
        if !candidates.iter().any(same) {
            continue;
        }
        let Some(ci) = candidates.iter().position(|c| same(c) && c.quantized()) else {
            if rules.gather_axis.is_some() && !chain_nodes.is_empty() {
                notes.push(format!(
                    "warning: Gather '{label}' reads table '{}' through Transpose/Identity and stays float with its head (the head is not quantized: lm_head is excluded by default; pass --no-default-exclude to quantize it and share its bytes), --gather-axis does not apply to it",
                    constant.name
                ));
            }
            continue;
        };
        let c = &candidates[ci];
        let Decision::Quantize { axis } = c.decision else { unreachable!("quantized") };
        let head_flips = match &c.folded {
            None => Some(0),
            Some((ch, _)) => transposes(model, &ch.nodes),
        };
        let keep = |why: String| format!("Gather '{label}' keeps the float table '{}': {why}", constant.name);
        let Some(head_flips) = head_flips else {
            notes.push(keep(format!("head '{}' reads it through a Cast or Reshape", c.node)));
            continue;
        };
        let Some(flips) = flips else {
            notes.push(keep(format!(
                "it reads the table through a Cast or Reshape, so it does not gather rows of head '{}''s [N, K] weight",
                c.node
            )));
            continue;
        };
        if let Some(why) = rules.not_the_table {
            notes.push(keep(why.to_string()));
            continue;
        }
        // Stored constant as [N, K]? Then the table must be it (even transposes) or vice versa.
        let constant_nk = (head_flips % 2 == 1) ^ (axis == 1);
        if !(constant_nk ^ (flips % 2 == 1)) {
            notes.push(keep(format!("it gathers rows of the head's [K, N] = {:?} weight, not of [N, K]", c.dims)));
            continue;
        }
        let gather_axis = attr_int(n, "axis").unwrap_or(0);
        if gather_axis != 0 && gather_axis != -2 {
            notes
                .push(keep(format!("it gathers along axis {gather_axis}; GatherBlockQuantized gathers rows (axis 0)")));
            continue;
        }
        if let Some((p, _)) = exclude.iter().find(|(_, r)| r.is_match(n.name.as_deref().unwrap_or(""))) {
            notes.push(keep(format!("excluded by '{p}'")));
            continue;
        }
        if at.graph != c.place {
            notes.push(keep("it is in another graph (an If/Loop/Scan body) than the head's weight".into()));
            continue;
        }
        let k_dim = c.dims[axis] as usize;
        if rules.matmulnbits {
            let node_block = match c.block(rules.block) {
                BlockSize::Blocked(b) => b,
                BlockSize::PerChannel => k_dim.next_power_of_two().max(16),
            };
            if !k_dim.is_multiple_of(node_block) {
                notes.push(keep(format!(
                    "the hidden size {k_dim} is not a multiple of the block size {node_block}, so MatMulNBits pads the last block and GatherBlockQuantized cannot read the same bytes (use a block size dividing {k_dim})"
                )));
                continue;
            }
        }
        let gather = Use { at: at.clone(), input: 0 };
        let read = chain_nodes.first().map_or(gather.clone(), |first| Use { at: first.clone(), input: 0 });
        let head_node = c.node.clone();
        let c = &mut candidates[ci];
        match c.readers.iter_mut().find(|r| r.at.as_ref() == Some(&read)) {
            Some(r) => r.reads = Reads::Tied,
            None => c.readers.push(Reader {
                label: crate::graph::read::node_label(node_at(root, &read.at)),
                op: node_at(root, &read.at).op_type.clone().unwrap_or_default(),
                at: Some(read),
                reads: Reads::Tied,
                of_source: c.folded.is_some(),
            }),
        }
        c.tied.push(TiedGather { gather: gather.clone(), chain: chain_nodes });
        let form = if rules.matmulnbits { "GatherBlockQuantized" } else { "its DequantizeLinear output" };
        notes.push(format!(
            "tied embedding: Gather '{label}' reads lm_head '{head_node}''s quantized bytes of '{}' ({form}): one copy of the table",
            constant.name
        ));
        if rules.gather_axis == Some(0) {
            notes.push(format!(
                "warning: --gather-axis 0 does not apply to Gather '{label}': a tied table shares its head's blocks, which run along the hidden axis (axis 1)"
            ));
        }
        // Its --gather-axis table candidate gives this Gather up.
        for t in candidates
            .iter_mut()
            .filter(|t| t.op == "Gather" && t.graph == constant.graph && t.source == constant.source)
        {
            t.readers.retain(|r| r.at.as_ref() != Some(&gather));
        }
        candidates
            .retain(|t| !(t.op == "Gather" && t.quantized() && !t.readers.iter().any(|r| r.reads == Reads::Quantized)));
    }
    notes
}
