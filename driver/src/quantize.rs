//! The `quantize` pipeline: load, plan, quantize every chosen weight (in parallel across weights, and
//! across blocks inside each), rewrite the graph as ModelOpt does, raise the opset, save atomically.
//!
//! Output graph per quantized weight `W` (DQ form, `rtn_dq`): initializers `W_i4` (INT4, or UINT4
//! with a zero point; the original dims), `W_scale` (the weight's dtype; `[ceil(K/B), N]`, 1-D `[N]`
//! per channel), `W_zp` (UINT4, zero point only); node `W_DequantizeLinear` with attributes `axis`
//! and `block_size` writing `W_DequantizeLinear_Output`, which every former consumer of `W` reads.
//! `rtn` keeps `W` and inserts `W_QuantizeLinear` -> `W_DequantizeLinear` with valid blocked
//! attributes on both (ModelOpt writes none, which ONNX Runtime rejects).

use crate::model::{external_data_path, save_with, ExternalData, Model};
use crate::onnx::{
    attribute_proto::AttributeType, tensor_proto::DataType, tensor_shape_proto, type_proto, AttributeProto, NodeProto,
    TensorProto, TensorShapeProto, TypeProto, ValueInfoProto,
};
use crate::plan::{compile_patterns, plan, Candidate, Decision, Source};
use crate::{opset, Error, Result};
use bytes::Bytes;
use nibble::{Bits, BlockSize, FloatFormat, QuantParams, QuantizedWeight, WeightData};
use rayon::prelude::*;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Quantization algorithm.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Method {
    /// Round to nearest, DequantizeLinear only (ModelOpt `rtn_dq`).
    #[value(name = "rtn_dq")]
    RtnDq,
    /// Round to nearest, QuantizeLinear -> DequantizeLinear on the float weight (ModelOpt `rtn`).
    #[value(name = "rtn")]
    Rtn,
    /// Activation-aware pre-quant scales, calibrated in ONNX Runtime (ModelOpt `awq_lite`).
    #[value(name = "awq_lite")]
    AwqLite,
    /// Activation-aware clip ratios per block (ModelOpt `awq_clip`).
    #[value(name = "awq_clip")]
    AwqClip,
    /// awq_lite, then awq_clip on the scaled weights (ModelOpt `awq_full`).
    #[value(name = "awq_full")]
    AwqFull,
}

impl Method {
    /// The AWQ variant, for AWQ methods.
    pub fn awq(self) -> Option<crate::awq::AwqMethod> {
        use crate::awq::AwqMethod;
        match self {
            Method::RtnDq | Method::Rtn => None,
            Method::AwqLite => Some(AwqMethod::Lite),
            Method::AwqClip => Some(AwqMethod::Clip),
            Method::AwqFull => Some(AwqMethod::Full),
        }
    }
}

/// What `quantize` was asked to do.
#[derive(Clone, Debug)]
pub struct Options {
    /// The algorithm.
    pub method: Method,
    /// Block size along K; -1 for per-channel.
    pub block_size: i64,
    /// UINT4 with zero points.
    pub zero_point: bool,
    /// Node-name patterns to leave unquantized.
    pub exclude: Vec<String>,
    /// Where tensor data goes.
    pub external_data: ExternalData,
    /// Overwrite an existing output.
    pub force: bool,
    /// AWQ settings (AWQ methods only).
    pub awq: crate::awq::AwqOptions,
    /// Leave weights holding NaN or Inf unquantized (with a warning) instead of failing.
    pub skip_nonfinite: bool,
    /// Output form.
    pub format: Format,
    /// MatMulNBits `accuracy_level` (0: unset, 1: fp32, 2: fp16, 3: bf16, 4: int8 activations).
    pub accuracy_level: i64,
    /// Quantize Gather (embedding) tables, blocked along this axis (ModelOpt's
    /// `gather_quantize_axis`; off by default).
    pub gather_axis: Option<usize>,
    /// Block size of the Gather tables (ModelOpt's `gather_block_size`).
    pub gather_block_size: i64,
    /// Node patterns kept at INT8 per channel (ModelOpt's `layers_8bit`; see [`crate::mixed`]).
    pub int8_layers: Option<String>,
    /// ModelOpt's default INT8 layer choice (`enable_mixed_quant`), when `int8_layers` is unset.
    pub mixed_precision: bool,
    /// Flush the output to disk (fsync) before renaming it into place.
    pub fsync: bool,
}

/// The operator the quantized weights feed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// INT4 initializers and DequantizeLinear (ModelOpt's form; opset 21).
    Dq,
    /// ONNX Runtime's com.microsoft MatMulNBits (fastest on ONNX Runtime CPUs).
    #[value(name = "matmulnbits")]
    MatMulNBits,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            method: Method::RtnDq,
            block_size: 128,
            zero_point: false,
            exclude: vec!["/lm_head".into()],
            external_data: ExternalData::Auto,
            force: false,
            awq: Default::default(),
            skip_nonfinite: false,
            format: Format::Dq,
            accuracy_level: 0,
            gather_axis: None,
            gather_block_size: 32,
            int8_layers: None,
            mixed_precision: false,
            fsync: false,
        }
    }
}

/// What `quantize` did.
#[derive(Clone, Debug)]
pub struct Summary {
    /// Weights quantized.
    pub quantized: usize,
    /// Of which kept at INT8.
    pub int8: usize,
    /// MatMul/Gemm weights found.
    pub candidates: usize,
    /// Bytes of the quantized weights before.
    pub weight_bytes_before: u64,
    /// Bytes of their replacements (codes, scales, zero points).
    pub weight_bytes_after: u64,
    /// Model + external data size of the input.
    pub model_bytes_before: u64,
    /// Bytes written.
    pub model_bytes_after: u64,
    /// Whether the opset was raised to 21.
    pub opset_raised: bool,
    /// Wall time.
    pub seconds: f64,
}

fn same_file(a: &Path, b: &Path) -> bool {
    match (a.canonicalize(), b.canonicalize()) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    }
}

/// Refuses output paths that would overwrite the input or its data, or an existing file without
/// `force`.
pub fn check_output(model: &Model, out: &Path, force: bool) -> Result<()> {
    let err = |why: String| Error::Output { path: out.to_path_buf(), why };
    let data = external_data_path(out);
    if same_file(out, &model.path) || same_file(&data, &model.path) {
        return Err(err("is the input model; write the quantized model to another path".into()));
    }
    for ext in model.external_files() {
        if same_file(out, &ext) || same_file(&data, &ext) {
            return Err(err(format!(
                "(or its {}) is the input's external data file; choose another output name",
                data.display()
            )));
        }
    }
    if out.is_dir() {
        return Err(err("is a directory; give a file name such as model_int4.onnx".into()));
    }
    if out.exists() && !force {
        return Err(err("already exists; pass --force to overwrite it".into()));
    }
    match out.parent().filter(|p| !p.as_os_str().is_empty()) {
        Some(dir) if !dir.is_dir() => Err(err(format!("folder {} does not exist", dir.display()))),
        _ => Ok(()),
    }
}

/// The weight's elements, borrowed when aligned, copied otherwise.
enum Elements {
    F32(Vec<f32>),
    F16(Vec<half::f16>),
    BF16(Vec<half::bf16>),
    Borrowed,
}

fn weight_data<'a>(format: FloatFormat, bytes: &'a Bytes, copy: &'a mut Elements) -> WeightData<'a> {
    match format {
        FloatFormat::F32 => match bytemuck::try_cast_slice::<u8, f32>(bytes) {
            Ok(v) => WeightData::F32(v),
            Err(_) => {
                *copy =
                    Elements::F32(bytes.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect());
                match copy {
                    Elements::F32(v) => WeightData::F32(v),
                    _ => unreachable!(),
                }
            }
        },
        FloatFormat::F16 => match bytemuck::try_cast_slice::<u8, half::f16>(bytes) {
            Ok(v) => WeightData::F16(v),
            Err(_) => {
                *copy = Elements::F16(bytes.chunks_exact(2).map(|c| half::f16::from_le_bytes([c[0], c[1]])).collect());
                match copy {
                    Elements::F16(v) => WeightData::F16(v),
                    _ => unreachable!(),
                }
            }
        },
        FloatFormat::BF16 => match bytemuck::try_cast_slice::<u8, half::bf16>(bytes) {
            Ok(v) => WeightData::BF16(v),
            Err(_) => {
                *copy =
                    Elements::BF16(bytes.chunks_exact(2).map(|c| half::bf16::from_le_bytes([c[0], c[1]])).collect());
                match copy {
                    Elements::BF16(v) => WeightData::BF16(v),
                    _ => unreachable!(),
                }
            }
        },
    }
}

/// Quantizes one candidate weight (`block` is the run's; an INT8 layer takes one block per channel).
pub fn quantize_candidate(model: &Model, c: &Candidate, block: BlockSize, zero_point: bool) -> Result<QuantizedWeight> {
    let Decision::Quantize { axis } = c.decision else { unreachable!("only planned weights") };
    let consts = crate::plan::constants(model);
    let (_, t) = consts.get(&c.weight).expect("planned from the same model");
    let format = c.format().ok_or_else(|| Error::UnsupportedDtype {
        tensor: c.weight.clone(),
        node: c.node.clone(),
        dtype: crate::model::dtype_name(c.dtype),
    })?;
    let bytes = model.tensor_bytes(t)?;
    let mut copy = Elements::Borrowed;
    let data = weight_data(format, &bytes, &mut copy);
    let shape = [c.dims[0] as usize, c.dims[1] as usize];
    let params = QuantParams { block_size: c.block(block), axis, zero_point, alpha: 1.0, bits: c.bits };
    nibble::quantize_weight(data, shape, &params).map_err(|e| Error::kernel(&c.weight, e))
}

/// Tensor bytes of `format` as f32 values (exact).
pub fn decode_floats(format: FloatFormat, bytes: &[u8]) -> Vec<f32> {
    match format {
        FloatFormat::F32 => bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect(),
        FloatFormat::F16 => bytes.chunks_exact(2).map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
        FloatFormat::BF16 => bytes.chunks_exact(2).map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
    }
}

/// Quantizes a weight with its AWQ outcome: rows of the `[K, N]` view multiplied by the
/// pre-quant scale, and the clip ratios per block.
pub fn quantize_candidate_awq(
    model: &Model,
    c: &Candidate,
    block: BlockSize,
    zero_point: bool,
    awq: &crate::awq::WeightAwq,
) -> Result<QuantizedWeight> {
    let Decision::Quantize { axis } = c.decision else { unreachable!("only planned weights") };
    let format = c.format().expect("float weight");
    if let Some(s) = &awq.scale64 {
        return quantize_scaled_f64(model, c, block, zero_point, s, axis);
    }
    let consts = crate::plan::constants(model);
    let (_, t) = consts.get(&c.weight).expect("planned from the same model");
    let mut v = decode_floats(format, &model.tensor_bytes(t)?);
    let shape = [c.dims[0] as usize, c.dims[1] as usize];
    if let Some(s) = &awq.scale {
        let cols = shape[1];
        for (e, x) in v.iter_mut().enumerate() {
            // K runs along rows for axis 0, along columns for a transB=1 weight stored [N, K].
            let k = if axis == 0 { e / cols } else { e % cols };
            *x = format.round(*x * s[k]);
        }
    }
    let params = QuantParams { block_size: c.block(block), axis, zero_point, alpha: 1.0, bits: c.bits };
    let halves: Vec<half::f16>;
    let bhalves: Vec<half::bf16>;
    let data = match format {
        FloatFormat::F32 => WeightData::F32(&v),
        FloatFormat::F16 => {
            halves = v.iter().map(|&x| half::f16::from_f32(x)).collect();
            WeightData::F16(&halves)
        }
        FloatFormat::BF16 => {
            bhalves = v.iter().map(|&x| half::bf16::from_f32(x)).collect();
            WeightData::BF16(&bhalves)
        }
    };
    nibble::quantize_weight::quantize_weight_alphas_with(
        nibble::Tier::best(),
        data,
        shape,
        &params,
        awq.alphas.as_deref(),
    )
    .map_err(|e| Error::kernel(&c.weight, e))
}

/// A per-subgraph AWQ weight: `W * s` and its quantization in float64 (ModelOpt's promotion), the
/// scales cast to the weight dtype; back in the stored layout for `transB=1` weights.
fn quantize_scaled_f64(
    model: &Model,
    c: &Candidate,
    block: BlockSize,
    zero_point: bool,
    s: &[f64],
    axis: usize,
) -> Result<QuantizedWeight> {
    let format = c.format().expect("float weight");
    let (kn, [k, n]) = crate::awq::weight_kn(model, c)?;
    let scaled: Vec<f64> = kn.iter().enumerate().map(|(e, &v)| v as f64 * s[e / n]).collect();
    let params = QuantParams { block_size: c.block(block), axis: 0, zero_point, alpha: 1.0, bits: c.bits };
    let q = nibble::awq::subgraph::quantize_f64(format, &scaled, [k, n], &params);
    if axis == 0 {
        return Ok(q);
    }
    // Stored [N, K]: transpose codes, scales and zero points back.
    let codes: Vec<i8> = match c.bits {
        Bits::Four => {
            nibble::kernels::unpack_nibbles(&q.packed, k * n, false).map_err(|e| Error::kernel(&c.weight, e))?
        }
        Bits::Eight => q.packed.iter().map(|&b| b as i8).collect(),
    };
    let mut t = vec![0u8; k * n];
    for r in 0..k {
        for col in 0..n {
            t[col * k + r] = codes[r * n + col] as u8;
        }
    }
    let nb = q.scale_shape[0];
    let tr = |v: &[f32]| -> Vec<f32> { (0..n * nb).map(|e| v[(e % nb) * n + e / nb]).collect() };
    Ok(QuantizedWeight {
        packed: match c.bits {
            Bits::Four => nibble::reference::pack(&t),
            Bits::Eight => t,
        },
        scale: tr(&q.scale),
        scale_shape: [n, nb],
        zero_point: q.zero_point.map(|z| (0..n * nb).map(|e| z[(e % nb) * n + e / nb]).collect()),
        block: q.block,
    })
}

/// Scale values as tensor bytes of `format`.
pub fn encode_floats(format: FloatFormat, values: &[f32]) -> Vec<u8> {
    match format {
        FloatFormat::F32 => values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        FloatFormat::F16 => values.iter().flat_map(|&v| half::f16::from_f32(v).to_le_bytes()).collect(),
        FloatFormat::BF16 => values.iter().flat_map(|&v| half::bf16::from_f32(v).to_le_bytes()).collect(),
    }
}

fn onnx_dtype(format: FloatFormat) -> i32 {
    match format {
        FloatFormat::F32 => DataType::Float as i32,
        FloatFormat::F16 => DataType::Float16 as i32,
        FloatFormat::BF16 => DataType::Bfloat16 as i32,
    }
}

/// An initializer holding `raw` bytes.
pub(crate) fn tensor(name: String, dims: Vec<i64>, dtype: i32, raw: Vec<u8>) -> TensorProto {
    TensorProto {
        name: Some(name),
        dims,
        data_type: Some(dtype),
        raw_data: Some(Bytes::from(raw)),
        ..Default::default()
    }
}

fn attr_int(name: &str, v: i64) -> AttributeProto {
    AttributeProto {
        name: Some(name.into()),
        i: Some(v),
        r#type: Some(AttributeType::Int as i32),
        ..Default::default()
    }
}

fn value_info(name: String, elem_type: i32, dims: &[i64]) -> ValueInfoProto {
    let shape = TensorShapeProto {
        dim: dims
            .iter()
            .map(|&d| tensor_shape_proto::Dimension {
                value: Some(tensor_shape_proto::dimension::Value::DimValue(d)),
                ..Default::default()
            })
            .collect(),
    };
    ValueInfoProto {
        name: Some(name),
        r#type: Some(TypeProto {
            value: Some(type_proto::Value::TensorType(type_proto::Tensor {
                elem_type: Some(elem_type),
                shape: Some(shape),
            })),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// The nodes and tensors replacing one weight.
struct Replacement {
    weight: String,
    nodes: Vec<NodeProto>,
    initializers: Vec<TensorProto>,
    value_info: Vec<ValueInfoProto>,
    dq_output: String,
    keep_original: bool,
    bytes: u64,
}

fn replacement(c: &Candidate, q: QuantizedWeight, block: BlockSize, method: Method) -> Replacement {
    let Decision::Quantize { axis } = c.decision else { unreachable!() };
    let format = c.format().expect("float weight");
    let w = &c.weight;
    let code_type = match (c.bits, q.zero_point.is_some()) {
        (Bits::Four, false) => DataType::Int4,
        (Bits::Four, true) => DataType::Uint4,
        (Bits::Eight, false) => DataType::Int8,
        (Bits::Eight, true) => DataType::Uint8,
    } as i32;
    let scale_dims: Vec<i64> = match block {
        BlockSize::PerChannel => vec![q.scale.len() as i64],
        BlockSize::Blocked(_) => q.scale_shape.iter().map(|&d| d as i64).collect(),
    };
    let mut attrs = vec![];
    match block {
        BlockSize::PerChannel => attrs.push(attr_int("axis", 1 - axis as i64)),
        BlockSize::Blocked(b) => {
            attrs.push(attr_int("axis", axis as i64));
            attrs.push(attr_int("block_size", b as i64));
        }
    }
    let scale_name = format!("{w}_scale");
    let zp_name = format!("{w}_zp");
    let dq_out = format!("{w}_DequantizeLinear_Output");
    let mut initializers =
        vec![tensor(scale_name.clone(), scale_dims.clone(), onnx_dtype(format), encode_floats(format, &q.scale))];
    let zp_bytes = match &q.zero_point {
        Some(z) if c.bits == Bits::Four => Some(nibble::reference::pack(z)),
        Some(z) => Some(z.clone()),
        None if method == Method::Rtn => Some(vec![0u8; c.bits.bytes_for(q.scale.len())]),
        None => None,
    };
    if let Some(zb) = zp_bytes {
        initializers.push(tensor(zp_name.clone(), scale_dims.clone(), code_type, zb));
    }
    let mut dq_inputs = vec![String::new(), scale_name.clone()];
    if initializers.len() == 2 {
        dq_inputs.push(zp_name.clone());
    }
    let mut nodes = vec![];
    let mut value_infos = vec![];
    match method {
        Method::RtnDq | Method::AwqLite | Method::AwqClip | Method::AwqFull => {
            let codes = format!("{w}_i4");
            initializers.insert(0, tensor(codes.clone(), c.dims.clone(), code_type, q.packed));
            dq_inputs[0] = codes;
        }
        Method::Rtn => {
            let q_out = format!("{w}_QuantizeLinear_Output");
            let mut q_inputs = vec![w.clone(), scale_name.clone()];
            q_inputs.push(zp_name.clone());
            nodes.push(NodeProto {
                name: Some(format!("{w}_QuantizeLinear")),
                op_type: Some("QuantizeLinear".into()),
                input: q_inputs,
                output: vec![q_out.clone()],
                attribute: attrs.clone(),
                ..Default::default()
            });
            value_infos.push(value_info(q_out.clone(), code_type, &c.dims));
            dq_inputs[0] = q_out;
        }
    }
    nodes.push(NodeProto {
        name: Some(format!("{w}_DequantizeLinear")),
        op_type: Some("DequantizeLinear".into()),
        input: dq_inputs,
        output: vec![dq_out.clone()],
        attribute: attrs,
        ..Default::default()
    });
    value_infos.push(value_info(dq_out.clone(), onnx_dtype(format), &c.dims));
    let bytes = initializers.iter().map(|t| t.raw_data.as_ref().map_or(0, |r| r.len() as u64)).sum();
    Replacement {
        weight: w.clone(),
        nodes,
        initializers,
        value_info: value_infos,
        dq_output: dq_out,
        keep_original: method == Method::Rtn,
        bytes,
    }
}

/// Applies the replacements to the top-level graph.
fn rewrite(model: &mut Model, replacements: Vec<Replacement>, sources: &[(String, Source)]) {
    let g = model.proto.graph.as_mut().expect("graph");
    let by_weight: std::collections::HashMap<&str, &Replacement> =
        replacements.iter().map(|r| (r.weight.as_str(), r)).collect();
    // Names still needed elsewhere (graph outputs, subgraphs) keep their original tensor.
    let mut outer_refs = std::collections::HashSet::new();
    for o in &g.output {
        outer_refs.insert(o.name.clone().unwrap_or_default());
    }
    fn collect_subgraph_inputs(g: &crate::onnx::GraphProto, acc: &mut std::collections::HashSet<String>) {
        for n in &g.node {
            acc.extend(n.input.iter().cloned());
            for a in &n.attribute {
                for s in a.g.iter().chain(&a.graphs) {
                    collect_subgraph_inputs(s, acc);
                }
            }
        }
    }
    for n in &g.node {
        for a in &n.attribute {
            for s in a.g.iter().chain(&a.graphs) {
                collect_subgraph_inputs(s, &mut outer_refs);
            }
        }
    }
    let removed_constant_nodes: std::collections::HashSet<usize> = sources
        .iter()
        .filter(|(w, _)| !by_weight[w.as_str()].keep_original && !outer_refs.contains(w))
        .filter_map(|(_, s)| if let Source::ConstantNode(i) = s { Some(*i) } else { None })
        .collect();
    let removed_initializers: std::collections::HashSet<String> = sources
        .iter()
        .filter(|(w, s)| {
            matches!(s, Source::Initializer(_)) && !by_weight[w.as_str()].keep_original && !outer_refs.contains(w)
        })
        .map(|(w, _)| w.clone())
        .collect();
    let old_nodes = std::mem::take(&mut g.node);
    let mut inserted = std::collections::HashSet::new();
    for (i, mut node) in old_nodes.into_iter().enumerate() {
        if removed_constant_nodes.contains(&i) {
            continue;
        }
        for input in node.input.iter_mut() {
            if let Some(r) = by_weight.get(input.as_str()) {
                if inserted.insert(r.weight.clone()) {
                    g.node.extend(r.nodes.iter().cloned());
                }
                *input = r.dq_output.clone();
            }
        }
        g.node.push(node);
    }
    g.initializer.retain(|t| !removed_initializers.contains(t.name.as_deref().unwrap_or("")));
    // Older exports also list initializers as graph inputs: drop those entries with them.
    g.input.retain(|v| !removed_initializers.contains(v.name.as_deref().unwrap_or("")));
    for r in replacements {
        g.initializer.extend(r.initializers);
        g.value_info.extend(r.value_info);
    }
}

/// Marks weights holding NaN or Inf as skipped, with a warning naming each.
fn skip_nonfinite(model: &Model, candidates: &mut [Candidate]) -> Result<()> {
    let consts = crate::plan::constants(model);
    for c in candidates.iter_mut().filter(|c| c.quantized()) {
        let Some(format) = c.format() else { continue };
        let (_, t) = consts.get(&c.weight).expect("planned from this model");
        let bad = decode_floats(format, &model.tensor_bytes(t)?).iter().position(|v| !v.is_finite());
        if let Some(e) = bad {
            eprintln!(
                "nibble: warning: weight '{}' holds NaN or Inf (element {e}); left unquantized (--skip-nonfinite)",
                c.weight
            );
            c.decision = Decision::Skipped { reason: "holds NaN or Inf".into() };
        }
    }
    Ok(())
}

/// Quantizes the model at `input` into `output`.
pub fn quantize_file(input: &Path, output: &Path, opts: &Options) -> Result<Summary> {
    let start = Instant::now();
    let block = BlockSize::from_i64(opts.block_size).map_err(|e| Error::Usage(format!("--block-size: {e}")))?;
    let patterns = compile_patterns(&opts.exclude)?;
    let mut model = Model::load(input)?;
    check_output(&model, output, opts.force)?;
    let model_bytes_before = std::fs::metadata(input).map(|m| m.len()).unwrap_or(0)
        + model.external_files().iter().map(|p| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0)).sum::<u64>();
    let mut candidates = plan(&model, &patterns);
    if opts.int8_layers.is_some() || opts.mixed_precision {
        crate::mixed::apply(&model, &mut candidates, opts.int8_layers.as_deref())?;
        if !candidates.iter().any(|c| c.bits == Bits::Eight) {
            let why = match &opts.int8_layers {
                Some(p) => format!("no quantized MatMul/Gemm node name contains the tokens of '{p}'"),
                None => "no MatMul is named /model/layers.N/(self_)attn/(qkv|v)_proj/MatMul or /model/layers.N/mlp/down_proj/MatMul (give --int8-layers)".into(),
            };
            eprintln!("nibble: warning: every layer stays INT4: {why}");
        }
    }
    let gather_block = match opts.gather_axis {
        Some(axis) => {
            if axis > 1 {
                return Err(Error::Usage(format!("--gather-axis {axis}: use 0 or 1")));
            }
            let b = BlockSize::from_i64(opts.gather_block_size)
                .map_err(|e| Error::Usage(format!("--gather-block-size: {e}")))?;
            let gathers = crate::plan::plan_gather(&model, &patterns, axis, &candidates);
            candidates.extend(gathers);
            b
        }
        None => block,
    };
    let block_of = |c: &Candidate| if c.op == "Gather" { gather_block } else { c.block(block) };
    if opts.skip_nonfinite {
        skip_nonfinite(&model, &mut candidates)?;
    }
    if let Some(c) = candidates.iter().find(|c| matches!(c.decision, Decision::Unsupported { .. })) {
        return Err(Error::UnsupportedDtype {
            tensor: c.weight.clone(),
            node: c.node.clone(),
            dtype: crate::model::dtype_name(c.dtype),
        });
    }
    let chosen: Vec<&Candidate> = candidates.iter().filter(|c| c.quantized()).collect();
    if opts.format == Format::MatMulNBits {
        crate::nbits::check_block("--block-size", opts.block_size)?;
        if opts.gather_axis.is_some() {
            crate::nbits::check_block("--gather-block-size", opts.gather_block_size)?;
        }
    }
    let opset_raised = !chosen.is_empty() && opts.format == Format::Dq && opset::check_upgrade(&model.proto)?;
    // AWQ: searches on the original weights, then folds into producers (before their own weights
    // are quantized), then the Mul nodes for the rest.
    let mut insertions = crate::pqs::Insertions::default();
    let awq = match opts.method.awq() {
        Some(method) if !chosen.is_empty() => {
            let awq_opts = crate::awq::AwqOptions { method, ..opts.awq.clone() };
            let result = crate::awq::search(&model, &chosen, block, opts.zero_point, &awq_opts)?;
            for (w, why) in &result.plain {
                eprintln!("nibble: weight '{w}' is quantized without AWQ: {why}");
            }
            let formats: HashMap<String, FloatFormat> =
                chosen.iter().map(|c| (c.weight.clone(), c.format().expect("float weight"))).collect();
            insertions = crate::pqs::apply(&mut model, &result, &|w| formats[w], awq_opts.fuse)?;
            Some(result)
        }
        _ => None,
    };
    let quantized: Vec<Result<QuantizedWeight>> = chosen
        .par_iter()
        .map(|c| match awq.as_ref().and_then(|a| a.weights.get(&c.weight)) {
            Some(a) => quantize_candidate_awq(&model, c, block, opts.zero_point, a),
            None => quantize_candidate(&model, c, block_of(c), opts.zero_point),
        })
        .collect();
    let quantized = quantized.into_iter().collect::<Result<Vec<_>>>()?;
    let weight_bytes_before = chosen.iter().map(|c| c.bytes as u64).sum();
    model.inline_external_data()?;
    if let Some(g) = model.proto.graph.as_mut() {
        for (n, input) in &insertions.rewire {
            g.node[*n].input[0] = input.clone();
        }
    }
    let weight_bytes_after;
    let mut opset_raised = opset_raised;
    if opts.format == Format::MatMulNBits {
        let before = model.proto.graph.as_ref().map_or(0, |g| g.initializer.len());
        let nbits_block = crate::nbits::check_block("--block-size", opts.block_size)?;
        let nbits_gather_block = match opts.gather_axis {
            Some(_) => crate::nbits::check_block("--gather-block-size", opts.gather_block_size)?,
            None => nbits_block,
        };
        crate::nbits::rewrite(&mut model, &chosen, quantized, nbits_block, nbits_gather_block, opts.accuracy_level)?;
        let g = model.proto.graph.as_ref().expect("graph");
        weight_bytes_after = g.initializer[before.saturating_sub(chosen.len())..]
            .iter()
            .filter(|t| {
                t.name
                    .as_deref()
                    .is_some_and(|n| n.ends_with("_Q4") || n.ends_with("_scales") || n.ends_with("_zero_points"))
            })
            .map(|t| t.raw_data.as_ref().map_or(0, |r| r.len() as u64))
            .sum();
        opset_raised = false;
    } else {
        let form = if opts.method == Method::Rtn { Method::Rtn } else { Method::RtnDq };
        let replacements: Vec<Replacement> =
            chosen.iter().zip(quantized).map(|(c, q)| replacement(c, q, block_of(c), form)).collect();
        weight_bytes_after = replacements.iter().map(|r| r.bytes).sum();
        let sources: Vec<(String, Source)> = chosen.iter().map(|c| (c.weight.clone(), c.source.clone())).collect();
        rewrite(&mut model, replacements, &sources);
    }
    if let Some(g) = model.proto.graph.as_mut() {
        g.initializer.extend(std::mem::take(&mut insertions.initializers));
        crate::pqs::insert_after_producers(g, std::mem::take(&mut insertions.nodes));
    }
    if !chosen.is_empty() && opts.format == Format::Dq {
        opset::upgrade(&mut model.proto)?;
        model.proto.ir_version = Some(model.proto.ir_version.unwrap_or(0).max(10));
    }
    let proto = std::mem::take(&mut model.proto);
    let model_bytes_after = save_with(proto, output, opts.external_data, opts.fsync)?;
    Ok(Summary {
        quantized: chosen.len(),
        int8: chosen.iter().filter(|c| c.bits == Bits::Eight).count(),
        candidates: candidates.len(),
        weight_bytes_before,
        weight_bytes_after,
        model_bytes_before,
        model_bytes_after,
        opset_raised,
        seconds: start.elapsed().as_secs_f64(),
    })
}

/// The path the CLI suggests when no `-o` is given: `MODEL_int4.onnx`.
pub fn default_output(input: &Path) -> PathBuf {
    let stem = input.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| "model".into());
    input.with_file_name(format!("{stem}_int4.onnx"))
}
