//! `--format matmulnbits`: ONNX Runtime's `com.microsoft.MatMulNBits` instead of DequantizeLinear,
//! the fastest form for ONNX Runtime on CPUs.
//!
//! Per quantized weight `W` (`K x N` as the product sees it, `block` a power of two >= 16):
//! - `W_Q4`: uint8 `[N, ceil(K/block), block/2]`, column `n`'s codes along K packed low nibble first
//!   (symmetric INT4 codes are stored as `q + 8`, MatMulNBits' default zero point);
//! - `W_scales`: `[N * ceil(K/block)]` in the weight's dtype, column-major over blocks;
//! - `W_zero_points` (zero point only): uint8 `[N * ceil(ceil(K/block)/2)]`, two per byte;
//! - each consuming `MatMul`/`Gemm` becomes `MatMulNBits` named `<node>_Q4` with attributes `K`, `N`,
//!   `bits = 4`, `block_size`, `accuracy_level`; a Gemm bias becomes an `Add` after it.
//!
//! An embedding table `T` (`--gather-axis`) read by a `Gather` becomes a `GatherBlockQuantized`
//! named `<node>_Q4` (ONNX Runtime's quantizer's form): `T_Q4` INT4 (UINT4 with a zero point) with
//! the table's dims, packed as in the DQ form; `T_scales` and `T_zero_points` shaped like the DQ
//! form's scales; attributes `gather_axis` (the Gather's axis), `quantize_axis`, `block_size`.
//!
//! An INT8 layer (mixed precision) is one MatMulNBits with `bits = 8` whose single block per column
//! spans K (`block_size` = K rounded up to a power of two >= 16, the tail padded with the zero
//! point): B `[N, 1, block_size]` one code per byte (symmetric codes stored as `q + 128`), zero
//! points one byte each. Its numbers are those of the per-channel DQ form.
//!
//! The names follow ONNX Runtime's own MatMulNBitsQuantizer. No opset upgrade is needed.

use super::Emitted;
use crate::error::{Error, Result};
use crate::graph::build::{attr_i, node, tensor, ModelNames};
use crate::graph::edit::Edits;
use crate::graph::model::Model;
use crate::graph::onnx::{tensor_proto::DataType, NodeProto, OperatorSetIdProto, TensorProto};
use crate::graph::readers::{node_at, Index};
use crate::plan::{Candidate, Decision};
use nibble::{Bits, FloatFormat, QuantizedWeight};

/// Checks that `block` (given as option `flag`) is a block size MatMulNBits and
/// GatherBlockQuantized run.
pub fn check_block(flag: &str, block: i64) -> Result<usize> {
    if block >= 16 && (block as u64).is_power_of_two() {
        Ok(block as usize)
    } else {
        Err(Error::Usage(format!(
            "{flag} {block}: --format matmulnbits needs a power of two >= 16 (16, 32, 64, 128, ...); use --format dq for other block sizes"
        )))
    }
}

/// `(bits, block_size)` of the MatMulNBits node of a weight with `k` rows in the run's `block`: a
/// per-channel weight (an INT8 layer) has one block spanning K rounded up to a power of two.
pub fn node_layout(c: &Candidate, k: usize, block: usize) -> (Bits, usize) {
    match c.block(nibble::BlockSize::Blocked(block)) {
        nibble::BlockSize::Blocked(b) => (c.bits, b),
        nibble::BlockSize::PerChannel => (c.bits, k.next_power_of_two().max(16)),
    }
}

/// The three MatMulNBits tensors of one weight (`block` the node's block size).
pub fn tensors(c: &Candidate, q: &QuantizedWeight, block: usize) -> Vec<TensorProto> {
    let Decision::Quantize { axis } = c.decision else { unreachable!("planned") };
    let (r, cols) = (c.dims[0] as usize, c.dims[1] as usize);
    let (k, n) = if axis == 0 { (r, cols) } else { (cols, r) };
    // Blocks of the quantization (one for an INT8 layer) and of the node's layout.
    let q_nb = q.scale.len() / n.max(1);
    let nb = k.div_ceil(block);
    debug_assert_eq!(q_nb, nb);
    let zp = q.zero_point.is_some();
    let bits = c.bits;
    let codes: Vec<i8> = match bits {
        Bits::Four => nibble::kernels::unpack_nibbles(&q.packed, r * cols, !zp).expect("packed codes of the weight"),
        Bits::Eight => q.packed.iter().map(|&b| b as i8).collect(),
    };
    // Symmetric codes are stored offset by MatMulNBits' default zero point (8 or 128).
    let offset: u8 = match bits {
        Bits::Four => 8,
        Bits::Eight => 128,
    };
    let code = |kk: usize, nn: usize| -> u8 {
        let v = if axis == 0 { codes[kk * n + nn] } else { codes[nn * k + kk] } as u8;
        if zp {
            v
        } else {
            v.wrapping_add(offset)
        }
    };
    // Scale and zero point of block b, column nn, from the DQ layout.
    let at = |v: &[f32], b: usize, nn: usize| if axis == 0 { v[b * n + nn] } else { v[nn * nb + b] };
    let zp_at = |z: &[u8], b: usize, nn: usize| if axis == 0 { z[b * n + nn] } else { z[nn * nb + b] };
    let blob = bits.bytes_for(block);
    let mut b_bytes = vec![0u8; n * nb * blob];
    for nn in 0..n {
        for b in 0..nb {
            let pad = q.zero_point.as_ref().map_or(offset, |z| zp_at(z, b, nn));
            let at_k = |kk: usize| if kk < k { code(kk, nn) } else { pad };
            let out = &mut b_bytes[(nn * nb + b) * blob..][..blob];
            match bits {
                Bits::Four => {
                    for (i, o) in out.iter_mut().enumerate() {
                        let k0 = b * block + 2 * i;
                        *o = (at_k(k0) & 0xf) | (at_k(k0 + 1) << 4);
                    }
                }
                Bits::Eight => {
                    for (i, o) in out.iter_mut().enumerate() {
                        *o = at_k(b * block + i);
                    }
                }
            }
        }
    }
    let format = c.format().expect("float weight");
    let scales: Vec<f32> =
        (0..n).flat_map(|nn| (0..nb).map(move |b| (b, nn))).map(|(b, nn)| at(&q.scale, b, nn)).collect();
    let w = &c.base;
    let mut out = vec![
        tensor(format!("{w}_Q4"), vec![n as i64, nb as i64, blob as i64], DataType::Uint8 as i32, b_bytes),
        tensor(
            format!("{w}_scales"),
            vec![(n * nb) as i64],
            crate::graph::floats::onnx_type(format),
            crate::graph::floats::encode_floats(format, &scales),
        ),
    ];
    if let Some(z) = &q.zero_point {
        let zb: Vec<u8> = match bits {
            Bits::Four => {
                let per = nb.div_ceil(2);
                let mut zb = vec![0u8; n * per];
                for nn in 0..n {
                    for b in 0..nb {
                        zb[nn * per + b / 2] |= (zp_at(z, b, nn) & 0xf) << (4 * (b % 2));
                    }
                }
                zb
            }
            Bits::Eight => (0..n).flat_map(|nn| (0..nb).map(move |b| (b, nn))).map(|(b, nn)| zp_at(z, b, nn)).collect(),
        };
        out.push(tensor(format!("{w}_zero_points"), vec![zb.len() as i64], DataType::Uint8 as i32, zb));
    }
    out
}

/// The GatherBlockQuantized tensors of an embedding table: the DQ form's codes, scales and zero
/// points under ONNX Runtime's names.
pub fn gather_tensors(c: &Candidate, q: QuantizedWeight) -> Vec<TensorProto> {
    let format = c.format().expect("float table");
    let code_type = if q.zero_point.is_some() { DataType::Uint4 } else { DataType::Int4 } as i32;
    let w = &c.base;
    let scale_dims: Vec<i64> = q.scale_shape.iter().map(|&d| d as i64).collect();
    let mut out = vec![
        tensor(format!("{w}_Q4"), c.dims.clone(), code_type, q.packed),
        tensor(
            format!("{w}_scales"),
            scale_dims.clone(),
            crate::graph::floats::onnx_type(format),
            crate::graph::floats::encode_floats(format, &q.scale),
        ),
    ];
    if let Some(z) = &q.zero_point {
        out.push(tensor(format!("{w}_zero_points"), scale_dims, code_type, nibble::reference::pack(z)));
    }
    out
}

/// Replaces the quantized readers of the chosen weights (in any graph, bodies included) by
/// MatMulNBits (and GatherBlockQuantized) nodes; every other reader keeps the original weight (see
/// [`super::remove_originals`]). The quantized weights come from `quantized` in the order of
/// `chosen`; each new initializer goes through `store` as soon as it is built. Names are ONNX
/// Runtime's quantizer's where `names` says they are free.
pub fn rewrite(
    model: &mut Model,
    chosen: &[&Candidate],
    quantized: super::Quantized<'_>,
    store: super::Store<'_>,
    layout: (usize, usize),
    accuracy_level: i64,
    names: &mut ModelNames,
) -> Result<Emitted> {
    let (block, gather_block) = layout;
    if chosen.iter().any(|c| c.format() == Some(FloatFormat::BF16)) {
        eprintln!(
            "nibble: note: bfloat16 MatMulNBits/GatherBlockQuantized run on ONNX Runtime's CUDA provider; its CPU provider has no bfloat16 kernels (use --format dq, or a float16/float32 model, for CPU inference)"
        );
    }
    let k_of = |c: &Candidate| match c.decision {
        Decision::Quantize { axis: 1 } => c.dims[1] as usize,
        _ => c.dims[0] as usize,
    };
    let root = model.proto.graph.as_ref().expect("graph");
    let idx = Index::build(root);
    let mut edits = Edits::default();
    let mut out = super::remove_originals(root, &idx, chosen, false, &mut edits);
    for c in chosen {
        let q = super::next_quantized(quantized, c)?;
        let mut ts =
            if c.op == "Gather" { gather_tensors(c, q) } else { tensors(c, &q, node_layout(c, k_of(c), block).1) };
        for t in ts.iter_mut() {
            t.name = Some(names.tensor(t.name.as_deref().unwrap_or("")));
        }
        let tied = (!c.tied.is_empty()).then(|| tie_layout(&mut ts, c, k_of(c), block));
        let tname = |i: usize| ts.get(i).and_then(|t| t.name.clone());
        let (q4, scales, zps) = (tname(0).expect("codes"), tname(1).expect("scales"), tname(2));
        if let Some((shape, node_block)) = tied {
            let rows = names.tensor(&format!("{q4}_rows"));
            let shape_name = names.tensor(&format!("{q4}_rows_shape"));
            let reshape = node("Reshape", &names.node(&format!("{q4}_Reshape")), &[&q4, &shape_name], &[&rows], vec![]);
            let e = edits.graph(&c.place);
            e.initializers.push(tensor(
                shape_name,
                vec![2],
                DataType::Int64 as i32,
                shape.iter().flat_map(|v| v.to_le_bytes()).collect(),
            ));
            e.before.entry(super::anchor(c)).or_default().push(reshape);
            for t in &c.tied {
                let n = node_at(root, &t.gather.at);
                let g = tied_gather_node(n, [&rows, &scales], zps.as_deref(), (c.bits, node_block), names);
                edits.graph(&t.gather.at.graph).replace.insert(t.gather.at.node, vec![g]);
            }
            out.bytes += 16;
        }
        for u in c.quantized_uses() {
            let n = node_at(root, &u.at);
            let op = n.op_type.as_deref().unwrap_or("");
            let label = crate::graph::read::node_label(n);
            let nodes = if c.op == "Gather" {
                vec![gather_node(n, c, [&q4, &scales], zps.as_deref(), gather_block, names)]
            } else {
                let gemm_ok = op == "Gemm"
                    && n.attribute.iter().all(|a| match a.name.as_deref() {
                        Some("transA") => a.i.unwrap_or(0) == 0,
                        Some("alpha") | Some("beta") => a.f.unwrap_or(1.0) == 1.0,
                        _ => true,
                    });
                if u.input != 1 || !(op == "MatMul" || gemm_ok) {
                    return Err(Error::Usage(format!(
                        "weight '{}' is read by node '{label}' ({op}), which MatMulNBits cannot replace; use --format dq or --exclude it",
                        c.weight
                    )));
                }
                let Decision::Quantize { axis } = c.decision else { unreachable!() };
                let (r, cols) = (c.dims[0], c.dims[1]);
                let (k, nn) = if axis == 0 { (r, cols) } else { (cols, r) };
                let mut inputs = vec![n.input[0].clone(), q4.clone(), scales.clone()];
                inputs.extend(zps.clone());
                let name = n.name.clone().unwrap_or_else(|| n.output[0].clone());
                let bias = n.input.get(2).filter(|b| !b.is_empty()).cloned();
                let product_out = n.output[0].clone();
                let product = if bias.is_some() {
                    names.tensor(&format!("{product_out}_MatMulNBits"))
                } else {
                    product_out.clone()
                };
                let input_refs: Vec<&str> = inputs.iter().map(String::as_str).collect();
                let (bits, node_block) = node_layout(c, k as usize, block);
                let mut m = node(
                    "MatMulNBits",
                    &names.node(&format!("{name}_Q4")),
                    &input_refs,
                    &[&product],
                    vec![
                        attr_i("K", k),
                        attr_i("N", nn),
                        attr_i("bits", bits.count() as i64),
                        attr_i("block_size", node_block as i64),
                        attr_i("accuracy_level", accuracy_level),
                    ],
                );
                m.domain = Some("com.microsoft".into());
                let mut nodes = vec![m];
                if let Some(b) = bias {
                    nodes.push(node(
                        "Add",
                        &names.node(&format!("{name}_bias_Add")),
                        &[&product, &b],
                        &[&product_out],
                        vec![],
                    ));
                }
                nodes
            };
            edits.graph(&u.at.graph).replace.insert(u.at.node, nodes);
        }
        out.bytes += ts.iter().map(|t| t.raw_data.as_ref().map_or(0, |r| r.len() as u64)).sum::<u64>();
        for t in ts.iter_mut() {
            store(c, t)?;
        }
        edits.graph(&c.place).initializers.extend(ts);
    }
    edits.apply(model.proto.graph.as_mut().expect("graph"));
    if !model.proto.opset_import.iter().any(|o| o.domain.as_deref() == Some("com.microsoft")) {
        model.proto.opset_import.push(OperatorSetIdProto { domain: Some("com.microsoft".into()), version: Some(1) });
    }
    Ok(out)
}

/// Reshapes a tied head's MatMulNBits tensors `ts` (of weight `c` with `k` rows, run's block
/// `block`) so that GatherBlockQuantized reads them too: scales `[N, n_blocks]` and zero points
/// `[N, ceil(n_blocks * bits / 8)]` (2-D, which MatMulNBits also reads). Returns the shape
/// `[N, n_blocks * blob]` of the codes as GatherBlockQuantized reads them, and the node block size.
fn tie_layout(ts: &mut [TensorProto], c: &Candidate, k: usize, block: usize) -> ([i64; 2], usize) {
    let (_, node_block) = node_layout(c, k, block);
    let [n, nb, blob] = [ts[0].dims[0], ts[0].dims[1], ts[0].dims[2]];
    ts[1].dims = vec![n, nb];
    if let Some(z) = ts.get_mut(2) {
        z.dims = vec![n, z.dims[0] / n.max(1)];
    }
    ([n, nb * blob], node_block)
}

/// The GatherBlockQuantized replacing tied embedding Gather `n`: uint8 codes `rows` (`[V, H * bits
/// / 8]`, MatMulNBits' bytes), the head's `scales` and packed zero points; `gather_axis` 0,
/// `quantize_axis` 1 (the last, as uint8 data needs), the head's `block_size` and `bits`.
fn tied_gather_node(
    n: &NodeProto,
    [rows, scales]: [&String; 2],
    zero_points: Option<&str>,
    (bits, block): (Bits, usize),
    names: &mut ModelNames,
) -> NodeProto {
    let mut inputs = vec![rows.clone(), n.input[1].clone(), scales.clone()];
    inputs.extend(zero_points.map(str::to_string));
    let refs: Vec<&str> = inputs.iter().map(String::as_str).collect();
    let name = n.name.clone().unwrap_or_else(|| n.output[0].clone());
    let mut m = node(
        "GatherBlockQuantized",
        &names.node(&format!("{name}_Q{}", bits.count())),
        &refs,
        &[&n.output[0]],
        vec![
            attr_i("gather_axis", 0),
            attr_i("quantize_axis", 1),
            attr_i("block_size", block as i64),
            attr_i("bits", bits.count() as i64),
        ],
    );
    m.domain = Some("com.microsoft".into());
    m
}

/// The GatherBlockQuantized replacing Gather `n` of table `c` (codes and scales `[q4, scales]`).
fn gather_node(
    n: &NodeProto,
    c: &Candidate,
    [q4, scales]: [&String; 2],
    zero_points: Option<&str>,
    block: usize,
    names: &mut ModelNames,
) -> NodeProto {
    let Decision::Quantize { axis } = c.decision else { unreachable!("planned") };
    let rank = c.dims.len() as i64;
    let gather_axis = n.attribute.iter().find(|a| a.name.as_deref() == Some("axis")).and_then(|a| a.i).unwrap_or(0);
    let gather_axis = if gather_axis < 0 { gather_axis + rank } else { gather_axis };
    let mut inputs = vec![q4.clone(), n.input[1].clone(), scales.clone()];
    inputs.extend(zero_points.map(str::to_string));
    let refs: Vec<&str> = inputs.iter().map(String::as_str).collect();
    let name = n.name.clone().unwrap_or_else(|| n.output[0].clone());
    let mut m = node(
        "GatherBlockQuantized",
        &names.node(&format!("{name}_Q4")),
        &refs,
        &[&n.output[0]],
        vec![
            attr_i("gather_axis", gather_axis),
            attr_i("quantize_axis", axis as i64),
            attr_i("block_size", block as i64),
        ],
    );
    m.domain = Some("com.microsoft".into());
    m
}
