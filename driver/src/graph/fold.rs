//! Constant chains: a constant reaching its reader through shape-only ops, in any order and
//! length: `Identity` (how torch exports a shared parameter), `Transpose` (a tied head; any rank),
//! `Cast` to a float type (fp16 stored, fp32 computed), `Reshape` with a constant shape,
//! `Unsqueeze`/`Squeeze` (axes as a constant input from opset 13, as the `axes` attribute before)
//! and `Flatten`, of a constant of any rank. [`chain`] finds such a chain behind a tensor; [`fold`]
//! computes the one tensor it produces (exact: data movement, and a `Cast`'s rounding to its float
//! type).

use super::floats::{decode_floats, encode_floats, onnx_type};
use super::model::{dtype_name, Model};
use super::onnx::{tensor_proto::DataType, GraphProto, TensorProto};
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

const CHAIN_OPS: [&str; 7] = ["Identity", "Transpose", "Cast", "Reshape", "Unsqueeze", "Squeeze", "Flatten"];

/// The chain behind `def` (output 0 of an Identity/Transpose/Cast/Reshape/Unsqueeze/Squeeze/Flatten
/// whose data input is a constant or another such chain; a Reshape's shape and an
/// Unsqueeze/Squeeze's `axes` input, when present, must be constants), or `None`.
pub fn chain(idx: &Index, root: &GraphProto, def: &Def) -> Option<Chain> {
    let Def::Node(at, 0) = def else { return None };
    let n = node_at(root, at);
    let op = n.op_type.as_deref().unwrap_or("");
    if !CHAIN_OPS.contains(&op) || !is_default_domain(n.domain.as_deref()) {
        return None;
    }
    let second = n.input.get(1).is_some_and(|i| !i.is_empty());
    if (op == "Reshape" || second) && !matches!(idx.def_of(at, 1), Some(Def::Constant(_))) {
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

/// The tensor `chain` produces, or why it cannot be folded (a non-float constant, a Transpose perm
/// that is not a permutation, a Cast to a non-float type, a shape or axes that do not fit).
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
                match transpose(&v, &dims, perm.as_deref()) {
                    Some((t, d)) => (v, dims) = (t, d),
                    None => return Ok(Err(format!("Transpose '{label}' with perm {perm:?} of dims {dims:?}"))),
                }
            }
            "Unsqueeze" | "Squeeze" | "Flatten" => {
                let op = n.op_type.as_deref().unwrap_or("");
                let axes = match attr(n, "axes") {
                    Some(a) => Some(a.ints.clone()),
                    None => match idx.def_of(at, 1) {
                        Some(Def::Constant(k)) => match int64s(model, idx.tensor(root, *k))? {
                            Some(v) => Some(v),
                            None => return Ok(Err(format!("{op} '{label}' with non-int64 axes"))),
                        },
                        _ => None,
                    },
                };
                let out = match op {
                    "Unsqueeze" => unsqueeze(&dims, axes.as_deref()),
                    "Squeeze" => squeeze(&dims, axes.as_deref()),
                    _ => flatten(&dims, attr(n, "axis").and_then(|a| a.i).unwrap_or(1)),
                };
                match out {
                    Some(d) => dims = d,
                    None => return Ok(Err(format!("{op} '{label}' of dims {dims:?} (axes {axes:?})"))),
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
                let Some(shape) = int64s(model, idx.tensor(root, *s))? else {
                    return Ok(Err(format!("Reshape '{label}' with a non-int64 shape")));
                };
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

/// The values of an int64 constant, or `None` for another type.
fn int64s(model: &Model, t: &TensorProto) -> Result<Option<Vec<i64>>> {
    if t.data_type != Some(DataType::Int64 as i32) {
        return Ok(None);
    }
    let raw = model.tensor_bytes(t)?;
    Ok(Some(raw.chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().expect("8 bytes"))).collect()))
}

/// `axes` (negative counted from `rank`) as distinct indices in `0..rank`, sorted; `None` if out of
/// range or repeated.
fn normalize_axes(axes: &[i64], rank: usize) -> Option<Vec<usize>> {
    let r = rank as i64;
    let mut out: Vec<usize> = axes
        .iter()
        .map(|&a| if (-r..r).contains(&a) { Some(((a + r) % r) as usize) } else { None })
        .collect::<Option<_>>()?;
    out.sort_unstable();
    let n = out.len();
    out.dedup();
    (out.len() == n).then_some(out)
}

/// ONNX `Transpose` of a row-major tensor: output axis `i` is input axis `perm[i]` (default: the
/// axes reversed). `None` when `perm` is not a permutation of `0..rank`.
fn transpose(v: &[f32], dims: &[i64], perm: Option<&[i64]>) -> Option<(Vec<f32>, Vec<i64>)> {
    let rank = dims.len();
    let perm: Vec<usize> = match perm {
        None => (0..rank).rev().collect(),
        Some(p) => {
            let p: Vec<usize> = p.iter().map(|&a| usize::try_from(a).ok()).collect::<Option<_>>()?;
            let mut sorted = p.clone();
            sorted.sort_unstable();
            (sorted == (0..rank).collect::<Vec<_>>()).then_some(p)?
        }
    };
    let d: Vec<usize> = dims.iter().map(|&x| x as usize).collect();
    let out_dims: Vec<usize> = perm.iter().map(|&p| d[p]).collect();
    // Input strides, read in the output's axis order.
    let mut strides = vec![1usize; rank];
    for i in (0..rank.saturating_sub(1)).rev() {
        strides[i] = strides[i + 1] * d[i + 1];
    }
    let step: Vec<usize> = perm.iter().map(|&p| strides[p]).collect();
    let mut out = Vec::with_capacity(v.len());
    let mut index = vec![0usize; rank];
    let mut src = 0usize;
    for _ in 0..v.len() {
        out.push(v[src]);
        // Advance the output index (last axis fastest), moving `src` by the input strides.
        for ax in (0..rank).rev() {
            index[ax] += 1;
            src += step[ax];
            if index[ax] < out_dims[ax] {
                break;
            }
            src -= step[ax] * index[ax];
            index[ax] = 0;
        }
    }
    Some((out, out_dims.iter().map(|&x| x as i64).collect()))
}

/// ONNX `Unsqueeze`: a 1 inserted at each of `axes` (counted in the output's rank).
fn unsqueeze(dims: &[i64], axes: Option<&[i64]>) -> Option<Vec<i64>> {
    let axes = axes?;
    let rank = dims.len() + axes.len();
    let axes = normalize_axes(axes, rank)?;
    let mut rest = dims.iter();
    Some((0..rank).map(|i| if axes.contains(&i) { 1 } else { *rest.next().expect("rank") }).collect())
}

/// ONNX `Squeeze`: the 1-sized `axes` removed (every 1-sized axis when `axes` is absent); `None`
/// when an axis named is not 1.
fn squeeze(dims: &[i64], axes: Option<&[i64]>) -> Option<Vec<i64>> {
    let axes = match axes {
        Some(a) => normalize_axes(a, dims.len())?,
        None => (0..dims.len()).filter(|&i| dims[i] == 1).collect(),
    };
    if axes.iter().any(|&a| dims[a] != 1) {
        return None;
    }
    Some(dims.iter().enumerate().filter(|(i, _)| !axes.contains(i)).map(|(_, &d)| d).collect())
}

/// ONNX `Flatten`: `[prod(dims[..axis]), prod(dims[axis..])]`, `axis` in `-rank..=rank`.
fn flatten(dims: &[i64], axis: i64) -> Option<Vec<i64>> {
    let r = dims.len() as i64;
    if !(-r..=r).contains(&axis) {
        return None;
    }
    let a = if axis < 0 { axis + r } else { axis } as usize;
    Some(vec![dims[..a].iter().product(), dims[a..].iter().product()])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transpose_matches_index_arithmetic() {
        // [2, 3, 4] with perm [2, 0, 1]: out[k][i][j] = in[i][j][k].
        let v: Vec<f32> = (0..24).map(|x| x as f32).collect();
        let (t, d) = transpose(&v, &[2, 3, 4], Some(&[2, 0, 1])).unwrap();
        assert_eq!(d, [4, 2, 3]);
        for k in 0..4 {
            for i in 0..2 {
                for j in 0..3 {
                    assert_eq!(t[k * 6 + i * 3 + j], v[i * 12 + j * 4 + k]);
                }
            }
        }
        let (t2, d2) = transpose(&v, &[2, 3, 4], None).unwrap();
        assert_eq!(d2, [4, 3, 2]);
        assert_eq!(t2[1], v[12]);
        assert!(transpose(&v, &[2, 3, 4], Some(&[0, 0, 1])).is_none());
    }

    #[test]
    fn shape_ops_follow_onnx() {
        assert_eq!(unsqueeze(&[3, 4], Some(&[0, -1])), Some(vec![1, 3, 4, 1]));
        assert_eq!(unsqueeze(&[3, 4], Some(&[1, 1])), None);
        assert_eq!(unsqueeze(&[3, 4], None), None);
        assert_eq!(squeeze(&[1, 3, 1, 4], None), Some(vec![3, 4]));
        assert_eq!(squeeze(&[1, 3, 1, 4], Some(&[-2])), Some(vec![1, 3, 4]));
        assert_eq!(squeeze(&[1, 3, 4], Some(&[1])), None);
        assert_eq!(flatten(&[2, 3, 4], 1), Some(vec![2, 12]));
        assert_eq!(flatten(&[2, 3, 4], -1), Some(vec![6, 4]));
        assert_eq!(flatten(&[2, 3, 4], 0), Some(vec![1, 24]));
        assert_eq!(flatten(&[2, 3, 4], 4), None);
    }
}
