//! The feed plan: for every input of a model, how calibration (and perplexity) feed it.
//!
//! A decoder LLM exported for ONNX Runtime (onnxruntime-genai's model builder, an Optimum export)
//! has, besides `input_ids`, inputs that must be consistent with it: the attention mask, position
//! ids, the KV cache of earlier steps, GroupQueryAttention's `seqlens_k` / `total_sequence_length`,
//! a merged decoder's `use_cache_branch`. Each sample is fed as a first pass over its tokens with an
//! EMPTY past (past length 0, or `--calibration-shapes past_sequence_length=N`):
//!
//! | input | fed with | shape |
//! |---|---|---|
//! | `input_ids` (ids of an embedding table) | the sample's tokens | `[batch, T]` |
//! | `attention_mask` | ones over past + current | `[batch, P + T]` |
//! | `position_ids` | `P, P+1, ..., P+T-1` | `[batch, T]` |
//! | `past_key_values.N.key/value`, `past_key`/`past_value`, `past_N` | zeros | `[batch, kv_heads, P, head_size]` (rank 5: `[2, batch, heads, P, head_size]`); read by a GroupQueryAttention with a window-sized cache (`sliding_window_cache` = 1, `local_window_size` W > 0): `[batch, kv_heads, max(W, P + T), head_size]` |
//! | `seqlens_k` | `P + T - 1` (int32) | `[batch]` |
//! | `total_sequence_length` | `P + T` (int32) | scalar |
//! | `use_cache_branch` | false | `[1]` |
//! | anything else | seeded random, as before | symbolic dims: batch 1, others 128 |
//!
//! A GroupQueryAttention with a window-sized cache (`sliding_window_cache` = 1 and
//! `local_window_size` W > 0: how onnxruntime-genai's builder writes Gemma 3's local layers)
//! refuses a cache capacity below W (ONNX Runtime 1.32: INVALID_ARGUMENT), so an empty past is
//! refused there. Its cache is fed `max(W, P + T)` zeros: GroupQueryAttention takes the tokens
//! processed so far from `seqlens_k` (`P + T - 1`, from the attention mask `[batch, P + T]`), not
//! from the buffer's size, so only `P` rows count and the rest is masked out (the logits equal
//! those of the same model without a window when `T` <= W; `benches/genai_sweep.py` feeds real
//! Gemma 3 folders the same way). A window without `sliding_window_cache` takes an empty past.
//!
//! The cache's head count and head size, when its dims are symbolic, are read from (first found):
//! `--calibration-shapes DIM=N`; the attention node reading the cache (GroupQueryAttention's
//! `kv_num_heads` and the packed QKV MatMul's width / (`num_heads` + 2 `kv_num_heads`);
//! MultiHeadAttention's `num_heads` and the query MatMul's width / `num_heads`); the
//! `genai_config.json` (`model.decoder.num_key_value_heads`, `head_size`) or `config.json`
//! (`num_key_value_heads` or `num_attention_heads`/`n_head`, `head_dim` or
//! `hidden_size`/`n_embd` over the head count) next to the model.

use crate::calibrate::runtime::{Input, InputData};
use crate::calibrate::spec::{vocabulary, InputSpec};
use crate::error::{Error, Result};
use crate::graph::model::Model;
use crate::graph::onnx::{tensor_proto::DataType, NodeProto};
use std::collections::HashMap;

/// How one model input is fed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Feed {
    /// Token ids: the sample's tokens, `[batch, T]`.
    Tokens,
    /// Attention mask: ones, `[batch, P + T]`.
    Mask,
    /// Position ids: `P..P+T`, `[batch, T]`.
    Positions,
    /// KV cache of past steps: zeros with past length `P` (`dims` is the full shape with the
    /// batch and past dims still to fill: `batch_axis`, `past_axis`); with a sliding `window` > 0,
    /// a shared buffer of `max(window, P + T)` zeros.
    Cache {
        /// Fixed dims (head count, head size, and `2` for a rank-5 `past`); the batch and past
        /// entries are placeholders.
        dims: Vec<usize>,
        /// Axis of the batch.
        batch_axis: usize,
        /// Axis of the past length.
        past_axis: usize,
        /// `local_window_size` of the GroupQueryAttention reading it with a window-sized cache (0: none).
        window: usize,
    },
    /// GroupQueryAttention's `seqlens_k`: `P + T - 1` per batch row (int32 `[batch]`).
    SeqlensK,
    /// GroupQueryAttention's `total_sequence_length`: `P + T` (int32 scalar).
    TotalSequenceLength,
    /// A merged decoder's `use_cache_branch`: false (no past).
    UseCacheBranch,
    /// Anything else: seeded random values of the input's type (see [`crate::calibrate::inputs`]).
    Random,
}

impl Feed {
    /// One line for `nibble inspect`.
    pub fn describe(&self, past: usize) -> String {
        match self {
            Feed::Tokens => "token ids (calibration text/npz tokens, or random ids with --calibration-random)".into(),
            Feed::Mask => format!("ones over past + current tokens [batch, {past} + T]"),
            Feed::Positions => format!("positions {past}..{past}+T"),
            Feed::Cache { dims, batch_axis, past_axis, window } => {
                let len = if *window > 0 { format!("max({window}, {past} + T)") } else { past.to_string() };
                let d: Vec<String> = dims
                    .iter()
                    .enumerate()
                    .map(|(i, v)| {
                        if i == *batch_axis {
                            "batch".into()
                        } else if i == *past_axis {
                            len.clone()
                        } else {
                            v.to_string()
                        }
                    })
                    .collect();
                let shared = if *window > 0 {
                    format!(" (sliding window {window}: a shared buffer, the first {past} count)")
                } else {
                    String::new()
                };
                format!("KV cache, past length {past}: zeros [{}]{shared}", d.join(", "))
            }
            Feed::SeqlensK => format!("seqlens_k = {past} + T - 1 (int32)"),
            Feed::TotalSequenceLength => format!("total_sequence_length = {past} + T (int32)"),
            Feed::UseCacheBranch => "false (no past)".into(),
            Feed::Random => "seeded random values (symbolic dims: batch 1, others 128)".into(),
        }
    }
}

/// The feed of every model input, in the model's input order.
#[derive(Clone, Debug)]
pub struct FeedPlan {
    /// Each input and its feed.
    pub inputs: Vec<(InputSpec, Feed)>,
    /// Past length `P` fed to the cache (0: empty).
    pub past: usize,
}

impl FeedPlan {
    /// True when an input is token ids (a language model): random data would be random tokens.
    pub fn has_tokens(&self) -> bool {
        self.inputs.iter().any(|(_, f)| *f == Feed::Tokens)
    }

    /// True when the model has decoder-only inputs (cache, mask, positions...).
    pub fn is_decoder(&self) -> bool {
        self.inputs.iter().any(|(_, f)| !matches!(f, Feed::Tokens | Feed::Random))
    }

    /// The inputs of one sample of `tokens` (batch 1): every input per the plan; `Random`
    /// inputs are filled by `random(spec)`.
    pub fn sample(&self, tokens: &[i64], mut random: impl FnMut(&InputSpec) -> Input) -> Vec<Input> {
        let (p, t) = (self.past, tokens.len());
        self.inputs
            .iter()
            .map(|(s, f)| {
                let ints = |shape: Vec<usize>, v: Vec<i64>| Input { name: s.name.clone(), shape, data: int_data(s, v) };
                match f {
                    Feed::Tokens => ints(vec![1, t], tokens.to_vec()),
                    Feed::Mask => ints(vec![1, p + t], vec![1; p + t]),
                    Feed::Positions => ints(vec![1, t], (p..p + t).map(|i| i as i64).collect()),
                    Feed::SeqlensK => ints(vec![1], vec![(p + t) as i64 - 1]),
                    Feed::TotalSequenceLength => ints(vec![], vec![(p + t) as i64]),
                    Feed::UseCacheBranch => {
                        Input { name: s.name.clone(), shape: vec![1], data: InputData::Bool(vec![false]) }
                    }
                    Feed::Cache { dims, batch_axis, past_axis, window } => {
                        let mut shape = dims.clone();
                        shape[*batch_axis] = 1;
                        shape[*past_axis] = if *window > 0 { (*window).max(p + t) } else { p };
                        let n = shape.iter().product();
                        let data = match DataType::try_from(s.elem_type) {
                            Ok(DataType::Float16) => InputData::F16(vec![half::f16::ZERO; n]),
                            _ => InputData::F32(vec![0.0; n]),
                        };
                        Input { name: s.name.clone(), shape, data }
                    }
                    Feed::Random => random(s),
                }
            })
            .collect()
    }
}

fn int_data(s: &InputSpec, v: Vec<i64>) -> InputData {
    match DataType::try_from(s.elem_type) {
        Ok(DataType::Int32) => InputData::I32(v.into_iter().map(|x| x as i32).collect()),
        Ok(DataType::Bool) => InputData::Bool(v.into_iter().map(|x| x != 0).collect()),
        Ok(DataType::Float) => InputData::F32(v.into_iter().map(|x| x as f32).collect()),
        _ => InputData::I64(v),
    }
}

/// The feed plan of `specs` (the model's inputs). `dims` are `--calibration-shapes DIM=N` values.
pub fn plan(model: &Model, specs: &[InputSpec], dims: &HashMap<String, usize>) -> Result<FeedPlan> {
    let past = dims.get("past_sequence_length").copied().unwrap_or(0);
    let mut config = None;
    let mut inputs = Vec::new();
    for s in specs {
        let lower = s.name.to_lowercase();
        let int = matches!(DataType::try_from(s.elem_type), Ok(DataType::Int64 | DataType::Int32));
        let float = matches!(DataType::try_from(s.elem_type), Ok(DataType::Float | DataType::Float16));
        // Names first: position ids also index a table (learned positions).
        let feed = if int && s.dims.len() == 2 && lower.contains("attention_mask") {
            Feed::Mask
        } else if int && s.dims.len() == 2 && lower.contains("position_ids") {
            Feed::Positions
        } else if int && s.dims.len() == 2 && (lower.contains("input_ids") || vocabulary(model, &s.name).is_some()) {
            Feed::Tokens
        } else if int && lower == "seqlens_k" {
            Feed::SeqlensK
        } else if int && (lower == "total_sequence_length" || lower == "total_seq_len") {
            Feed::TotalSequenceLength
        } else if lower == "use_cache_branch" {
            Feed::UseCacheBranch
        } else if float && lower.starts_with("past") && (s.dims.len() == 4 || s.dims.len() == 5) {
            let cfg = config.get_or_insert_with(|| ConfigHeads::read(model));
            cache(model, s, dims, cfg)?
        } else {
            Feed::Random
        };
        inputs.push((s.clone(), feed));
    }
    Ok(FeedPlan { inputs, past })
}

/// The cache feed of input `s`: `[batch, heads, past, head_size]` or `[2, batch, heads, past, head_size]`.
fn cache(model: &Model, s: &InputSpec, dims: &HashMap<String, usize>, cfg: &ConfigHeads) -> Result<Feed> {
    let off = s.dims.len() - 4;
    let (batch_axis, heads_axis, past_axis, size_axis) = (off, off + 1, off + 2, off + 3);
    let from_graph = attention_heads(model, &s.name);
    let window = local_window(model, &s.name);
    let named = |axis: usize| s.symbols.get(axis).cloned().flatten().and_then(|n| dims.get(&n).copied());
    let heads = s.dims[heads_axis].or_else(|| named(heads_axis)).or(from_graph.map(|(h, _)| h)).or(cfg.kv_heads);
    let size = s.dims[size_axis].or_else(|| named(size_axis)).or(from_graph.map(|(_, d)| d)).or(cfg.head_size);
    let (Some(heads), Some(size)) = (heads, size) else {
        let name = |axis: usize| s.symbols.get(axis).cloned().flatten().unwrap_or_else(|| format!("dimension {axis}"));
        let missing: Vec<String> = [(heads, heads_axis), (size, size_axis)]
            .iter()
            .filter(|(v, _)| v.is_none())
            .map(|(_, a)| format!("{}=N", name(*a)))
            .collect();
        return Err(Error::Usage(format!(
            "KV-cache input '{}'{}: its head count or head size is symbolic and neither the attention node reading it \
             nor a genai_config.json/config.json next to the model gives it; pass --calibration-shapes {}",
            s.name,
            crate::calibrate::spec::shape_text(s),
            missing.join(",")
        )));
    };
    let mut full = vec![0; s.dims.len()];
    if off == 1 {
        full[0] = s.dims[0].unwrap_or(2);
    }
    full[heads_axis] = heads;
    full[size_axis] = size;
    Ok(Feed::Cache { dims: full, batch_axis, past_axis, window })
}

/// `local_window_size` of the GroupQueryAttention reading `input` as its past key/value, when > 0
/// and its cache is window-sized (`sliding_window_cache` = 1); else 0.
fn local_window(model: &Model, input: &str) -> usize {
    let Some(g) = model.proto.graph.as_ref() else { return 0 };
    g.node
        .iter()
        .filter(|n| n.op_type.as_deref() == Some("GroupQueryAttention"))
        .filter(|n| n.input.get(3).is_some_and(|i| i == input) || n.input.get(4).is_some_and(|i| i == input))
        .find_map(|n| {
            let attr = |name: &str| n.attribute.iter().find(|a| a.name.as_deref() == Some(name)).and_then(|a| a.i);
            (attr("sliding_window_cache") == Some(1)).then(|| attr("local_window_size")).flatten()
        })
        .map_or(0, |w| w.max(0) as usize)
}

/// (kv heads, head size) from the attention node that reads `input` as its past key/value.
fn attention_heads(model: &Model, input: &str) -> Option<(usize, usize)> {
    let g = model.proto.graph.as_ref()?;
    let node = g.node.iter().find(|n| n.input.iter().any(|i| i == input))?;
    let attr = |n: &NodeProto, name: &str| {
        n.attribute.iter().find(|a| a.name.as_deref() == Some(name)).and_then(|a| a.i).map(|v| v as usize)
    };
    let query_width = || -> Option<usize> {
        let mut name = node.input.first()?.clone();
        // Back through a bias Add to the MatMul whose constant weight gives the width.
        for _ in 0..3 {
            let producer = g.node.iter().find(|n| n.output.contains(&name))?;
            match producer.op_type.as_deref() {
                Some("MatMul") => {
                    // The weight, or the INT4 weight its DequantizeLinear reads (a quantized model).
                    let mut w = producer.input.get(1)?.clone();
                    if let Some(dq) = g
                        .node
                        .iter()
                        .find(|n| n.op_type.as_deref() == Some("DequantizeLinear") && n.output.first() == Some(&w))
                    {
                        w = dq.input.first()?.clone();
                    }
                    let t = g.initializer.iter().find(|t| t.name.as_deref() == Some(w.as_str()))?;
                    return t.dims.last().map(|&d| d as usize);
                }
                Some("MatMulNBits") => return attr(producer, "N"),
                Some("Add") => {
                    name = producer
                        .input
                        .iter()
                        .find(|i| {
                            g.node.iter().any(|n| n.op_type.as_deref() == Some("MatMul") && n.output.contains(i))
                        })?
                        .clone();
                }
                _ => return None,
            }
        }
        None
    };
    match node.op_type.as_deref()? {
        "GroupQueryAttention" => {
            let (q, kv) = (attr(node, "num_heads")?, attr(node, "kv_num_heads")?);
            let packed = node.input.get(1).is_none_or(|k| k.is_empty());
            let width = query_width()?;
            let size = if packed { width / (q + 2 * kv) } else { width / q };
            Some((kv, size))
        }
        "MultiHeadAttention" => {
            let q = attr(node, "num_heads")?;
            Some((q, query_width()? / q))
        }
        _ => None,
    }
}

/// Head count and head size from the folder's `genai_config.json` or `config.json`.
#[derive(Clone, Debug, Default)]
struct ConfigHeads {
    kv_heads: Option<usize>,
    head_size: Option<usize>,
}

impl ConfigHeads {
    fn read(model: &Model) -> ConfigHeads {
        let dir = model.dir();
        let json = |name: &str| -> Option<serde_json::Value> {
            serde_json::from_slice(&std::fs::read(dir.join(name)).ok()?).ok()
        };
        let n = |v: &serde_json::Value, key: &str| v.get(key).and_then(|x| x.as_u64()).map(|x| x as usize);
        if let Some(d) = json("genai_config.json").as_ref().and_then(|v| v.get("model")?.get("decoder").cloned()) {
            let heads = n(&d, "num_key_value_heads").or_else(|| n(&d, "num_attention_heads"));
            let size =
                n(&d, "head_size").or_else(|| Some(n(&d, "hidden_size")? / n(&d, "num_attention_heads")?.max(1)));
            if heads.is_some() || size.is_some() {
                return ConfigHeads { kv_heads: heads, head_size: size };
            }
        }
        if let Some(c) = json("config.json") {
            let q = n(&c, "num_attention_heads").or_else(|| n(&c, "n_head"));
            let heads = n(&c, "num_key_value_heads").or(q);
            let hidden = n(&c, "hidden_size").or_else(|| n(&c, "n_embd"));
            let size = n(&c, "head_dim").or_else(|| Some(hidden? / q?.max(1)));
            return ConfigHeads { kv_heads: heads, head_size: size };
        }
        ConfigHeads::default()
    }
}
