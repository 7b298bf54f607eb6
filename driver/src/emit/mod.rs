//! Writing quantized weights into the graph, one file per output form. Only graph edits: the numbers
//! come from [`crate::methods`].
//!
//! - [`dq`]: DequantizeLinear (`rtn_dq`, AWQ; ModelOpt's form) and QuantizeLinear -> DequantizeLinear (`rtn`).
//! - [`matmulnbits`]: ONNX Runtime's MatMulNBits, and GatherBlockQuantized for embedding tables.
//! - [`pqs`]: AWQ's pre-quant scales: folded into producing nodes, or `Mul` nodes before the consumers.

pub mod dq;
pub mod matmulnbits;
pub mod pqs;

use crate::error::Result;
use crate::graph::edit::Edits;
use crate::graph::model::byte_size;
use crate::graph::onnx::{GraphProto, TensorProto};
use crate::graph::read::Source;
use crate::graph::readers::{node_at, Def, Index, NodeAt, Use};
use crate::plan::Candidate;
use nibble::{Bits, BlockSize, FloatFormat, QuantizedWeight};
use std::collections::HashSet;

/// What an output form did besides adding the quantized tensors.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Emitted {
    /// Bytes of the added codes, scales and zero points.
    pub bytes: u64,
    /// Original float weights kept because another reader (an excluded node, a non-MatMul operator,
    /// a Gather, a graph output) still reads them.
    pub copies: usize,
    /// Their bytes.
    pub copy_bytes: u64,
}

/// The quantized weights, one per chosen weight and in the same order, produced as the output form
/// asks for them (so that only a few are held at once).
pub type Quantized<'a> = &'a mut dyn Iterator<Item = Result<QuantizedWeight>>;

/// Where each new initializer goes once built, called with the weight it replaces: the streamed
/// output's data file ([`crate::graph::stream::DataSink::put`]) moves its bytes out of memory.
pub type Store<'a> = &'a mut dyn FnMut(&Candidate, &mut TensorProto) -> Result<()>;

/// The next quantized weight of `quantized`, for `c`.
pub(crate) fn next_quantized(quantized: Quantized<'_>, c: &Candidate) -> Result<QuantizedWeight> {
    quantized.next().unwrap_or_else(|| panic!("no quantized weight for '{}': one per chosen weight", c.weight))
}

/// The index of a candidate's constant in `idx`.
pub(crate) fn constant_of(idx: &Index, c: &Candidate) -> usize {
    idx.constants.iter().position(|k| k.graph == c.graph && k.source == c.source).expect("planned from this model")
}

/// Where the quantized form of `c` goes in its graph: before the first node that reads it, or that
/// holds a body reading it.
pub(crate) fn anchor(c: &Candidate) -> usize {
    c.quantized_uses()
        .chain(c.tied.iter().map(|t| &t.gather))
        .map(|u| if u.at.graph.len() == c.place.len() { u.at.node } else { u.at.graph[c.place.len()].0 })
        .min()
        .unwrap_or(0)
}

/// Removes what nothing reads any more once the quantized readers of `chosen` are rewired: each
/// folded chain's nodes (last first) whose output only rewired readers or removed nodes read, then
/// each constant whose readers are all rewired or removed (a Reshape's shape included). The
/// constants that stay are the float copies other readers need (counted in the returned
/// [`Emitted`]; `keep` keeps every original without counting it, as the QDQ form does).
pub(crate) fn remove_originals(
    root: &GraphProto,
    idx: &Index,
    chosen: &[&Candidate],
    keep: bool,
    edits: &mut Edits,
) -> Emitted {
    let mut out = Emitted::default();
    if keep {
        return out;
    }
    let rewired: HashSet<&Use> =
        chosen.iter().flat_map(|c| c.quantized_uses().chain(c.tied.iter().map(|t| &t.gather))).collect();
    let mut dropped: HashSet<NodeAt> = HashSet::new();
    let gone = |d: &Def, dropped: &HashSet<NodeAt>| {
        !idx.outputs.contains(d) && idx.readers(d).iter().all(|u| rewired.contains(u) || dropped.contains(&u.at))
    };
    // Folded chains, then the chains tied embedding Gathers read the table through.
    let chains = chosen
        .iter()
        .flat_map(|c| c.folded.iter().map(|(chain, _)| &chain.nodes).chain(c.tied.iter().map(|t| &t.chain)));
    for nodes in chains.collect::<Vec<_>>() {
        for at in nodes.iter().rev() {
            if !gone(&Def::Node(at.clone(), 0), &dropped) {
                break;
            }
            dropped.insert(at.clone());
        }
    }
    let mut removed: Vec<usize> = vec![];
    let mut kept: Vec<usize> = vec![];
    for c in chosen {
        let k = constant_of(idx, c);
        if removed.contains(&k) || kept.contains(&k) {
            continue;
        }
        if gone(&Def::Constant(k), &dropped) {
            removed.push(k);
        } else {
            kept.push(k);
        }
    }
    // Constants only the removed chain nodes read (a Reshape's shape).
    for at in &dropped {
        for i in 0..node_at(root, at).input.len() {
            if let Some(Def::Constant(k)) = idx.def_of(at, i) {
                if !removed.contains(k) && !kept.contains(k) && gone(&Def::Constant(*k), &dropped) {
                    removed.push(*k);
                }
            }
        }
    }
    for at in &dropped {
        edits.remove(at);
    }
    for k in removed {
        let constant = &idx.constants[k];
        match constant.source {
            Source::Initializer(_) => {
                edits.graph(&constant.graph).remove_initializers.insert(constant.name.clone());
            }
            Source::ConstantNode(i) => edits.remove(&NodeAt { graph: constant.graph.clone(), node: i }),
        }
    }
    out.copies = kept.len();
    out.copy_bytes = kept.iter().map(|&k| byte_size(idx.tensor(root, k)).unwrap_or(0) as u64).sum();
    out
}

fn element_bytes(format: FloatFormat) -> usize {
    match format {
        FloatFormat::F32 => 4,
        FloatFormat::F16 | FloatFormat::BF16 => 2,
    }
}

/// Bytes of codes, scales and zero points an output form writes for `c` at `bits` (`block` the
/// run's 4-bit block size): DequantizeLinear (`matmulnbits` false): `ceil(K N b / 8)` code bytes, one scale per block
/// in the weight's dtype, zero points packed like the codes; MatMulNBits: `[N, blocks, blob]`
/// codes (an 8-bit weight is one block of `K` rounded up to a power of two >= 16, padded), one
/// scale per block, 4-bit zero points packed two per byte per column.
pub fn stored_bytes(c: &Candidate, bits: Bits, block: BlockSize, zero_point: bool, matmulnbits: bool) -> u64 {
    let (r, cols) = (c.dims[0] as usize, c.dims[1] as usize);
    let (k, n) = match c.decision {
        crate::plan::Decision::Quantize { axis: 1 } => (cols, r),
        _ => (r, cols),
    };
    let es = element_bytes(c.format().unwrap_or(FloatFormat::F32));
    let b = match bits {
        Bits::Four => block.resolve(k),
        Bits::Eight => k,
    };
    let bytes = match matmulnbits {
        false => {
            let nb = k.div_ceil(b.max(1));
            bits.bytes_for(k * n) + nb * n * es + if zero_point { bits.bytes_for(nb * n) } else { 0 }
        }
        true => {
            let node_block = match bits {
                Bits::Four => b,
                Bits::Eight => k.next_power_of_two().max(16),
            };
            let nb = k.div_ceil(node_block.max(1));
            let zp = match (zero_point, bits) {
                (false, _) => 0,
                (true, Bits::Four) => n * nb.div_ceil(2),
                (true, Bits::Eight) => n * nb,
            };
            n * nb * bits.bytes_for(node_block) + n * nb * es + zp
        }
    };
    bytes as u64
}
