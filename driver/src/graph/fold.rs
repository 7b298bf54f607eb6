//! Constant chains: a constant reaching its reader through `Identity` (how torch exports a shared
//! parameter), `Transpose` (a tied head), `Cast` to a float type (fp16 stored, fp32 computed) and
//! `Reshape` with a constant shape, in any order and length. [`chain`] finds such a chain behind a
//! tensor; [`fold`] computes the one tensor it produces (exact: data movement, and a `Cast`'s
//! rounding to its float type).

use super::floats::{decode_floats, encode_floats, onnx_type};
use super::model::{dtype_name, Model};
use super::onnx::{tensor_proto::DataType, GraphProto};
use super::read::{attr, is_default_domain};
use super::readers::{node_at, Def, Index, NodeAt};
use crate::error::Result;
use bytes::Bytes;
use nibble::FloatFormat;

/// A constant chain: the constant and the nodes from its reader to the node writing the result.
#[derive(Clone, Debug, PartialEq)]
pub struct Chain {
    /// `Index::constants[constant]` starts the chain.
    pub constant: usize,
    /// The chain's nodes, first (reading the constant) to last.
    pub nodes: Vec<NodeAt>,
}

/// The tensor a chain produces.
#[derive(Clone, Debug)]
pub struct Folded {
    /// Its dims.
    pub dims: Vec<i64>,
    /// Its ONNX data type.
    pub dtype: i32,
    /// Little-endian element bytes.
    pub data: Bytes,
}

const CHAIN_OPS: [&str; 4] = ["Identity", "Transpose", "Cast", "Reshape"];

/// The chain behind `def` (output 0 of an Identity/Transpose/Cast/Reshape whose data input is a
/// constant or another such chain; a Reshape's shape must be a constant), or `None`.
pub fn chain(idx: &Index, root: &GraphProto, def: &Def) -> Option<Chain> {
    let Def::Node(at, 0) = def else { return None };
    let n = node_at(root, at);
    let op = n.op_type.as_deref().unwrap_or("");
    if !CHAIN_OPS.contains(&op) || !is_default_domain(n.domain.as_deref()) {
        return None;
    }
    if op == "Reshape" && !matches!(idx.def_of(at, 1), Some(Def::Constant(_))) {
        return None;
    }
    match idx.def_of(at, 0)? {
        Def::Constant(c) => Some(Chain { constant: *c, nodes: vec![at.clone()] }),
        inner @ Def::Node(..) => {
            let mut c = chain(idx, root, inner)?;
            c.nodes.push(at.clone());
            Some(c)
        }
        Def::Input => None,
    }
}

fn float_format(dtype: i32) -> Option<FloatFormat> {
    match DataType::try_from(dtype).ok()? {
        DataType::Float => Some(FloatFormat::F32),
        DataType::Float16 => Some(FloatFormat::F16),
        DataType::Bfloat16 => Some(FloatFormat::BF16),
        _ => None,
    }
}

/// The tensor `chain` produces, or why it cannot be folded (a non-float constant, a Transpose of
/// rank > 2, a Cast to a non-float type, a shape that does not fit).
pub fn fold(model: &Model, idx: &Index, chain: &Chain) -> Result<std::result::Result<Folded, String>> {
    let root = model.proto.graph.as_ref().expect("graph");
    let t = idx.tensor(root, chain.constant);
    let mut dtype = t.data_type.unwrap_or(0);
    let Some(mut format) = float_format(dtype) else {
        return Ok(Err(format!("data type {} behind the chain", dtype_name(dtype))));
    };
    let mut v = decode_floats(format, &model.tensor_bytes(t)?);
    let mut dims = t.dims.clone();
    let count = dims.iter().try_fold(1i64, |a, &d| if d < 0 { None } else { a.checked_mul(d) });
    if count != Some(v.len() as i64) {
        return Ok(Err("invalid dims".into()));
    }
    for at in &chain.nodes {
        let n = node_at(root, at);
        let label = super::read::node_label(n);
        match n.op_type.as_deref().unwrap_or("") {
            "Identity" => {}
            "Transpose" => {
                let perm = attr(n, "perm").map(|a| a.ints.clone());
                match (dims.len(), perm.as_deref()) {
                    (2, None | Some([1, 0])) => {
                        let (r, c) = (dims[0] as usize, dims[1] as usize);
                        v = (0..r * c).map(|i| v[(i % r) * c + i / r]).collect();
                        dims = vec![dims[1], dims[0]];
                    }
                    (2, Some([0, 1])) => {}
                    (rank, _) => return Ok(Err(format!("Transpose '{label}' of a rank-{rank} constant"))),
                }
            }
            "Cast" => {
                let to = attr(n, "to").and_then(|a| a.i).unwrap_or(0) as i32;
                let Some(f) = float_format(to) else {
                    return Ok(Err(format!("Cast '{label}' to {}", dtype_name(to))));
                };
                v = decode_floats(f, &encode_floats(f, &v));
                format = f;
                dtype = onnx_type(f);
            }
            "Reshape" => {
                let Some(Def::Constant(s)) = idx.def_of(at, 1) else { unreachable!("checked by chain") };
                let st = idx.tensor(root, *s);
                if st.data_type != Some(DataType::Int64 as i32) {
                    return Ok(Err(format!("Reshape '{label}' with a non-int64 shape")));
                }
                let raw = model.tensor_bytes(st)?;
                let shape: Vec<i64> = raw.chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().unwrap())).collect();
                let allowzero = attr(n, "allowzero").and_then(|a| a.i) == Some(1);
                let mut out: Vec<i64> = shape
                    .iter()
                    .enumerate()
                    .map(|(i, &d)| if d == 0 && !allowzero { dims.get(i).copied().unwrap_or(0) } else { d })
                    .collect();
                let total = v.len() as i64;
                let Some(known) = out.iter().filter(|&&d| d != -1).try_fold(1i64, |a, &d| a.checked_mul(d)) else {
                    return Ok(Err(format!("Reshape '{label}' to {shape:?}")));
                };
                match out.iter().filter(|&&d| d == -1).count() {
                    0 => {}
                    1 if known > 0 && total % known == 0 => {
                        let d = out.iter_mut().find(|d| **d == -1).expect("one -1");
                        *d = total / known;
                    }
                    _ => return Ok(Err(format!("Reshape '{label}' to {shape:?}"))),
                }
                let product = out.iter().try_fold(1i64, |a, &d| if d < 0 { None } else { a.checked_mul(d) });
                if product != Some(total) {
                    return Ok(Err(format!("Reshape '{label}' to {shape:?}")));
                }
                dims = out;
            }
            _ => unreachable!("chain ops only"),
        }
    }
    Ok(Ok(Folded { dims, dtype, data: Bytes::from(encode_floats(format, &v)) }))
}
