//! A shard on disk: a folder holding `manifest.json` (what it was made from and of, as JSON) and
//! `weights.bin` (the finished results of its weights, little-endian, located by the manifest).
//!
//! `manifest.json`:
//! - `nibble_shard` (format version, 1) and `nibble` (the version that wrote it);
//! - `model`: the input's canonical `path`, and its identity: the CRC-32 of the `.onnx` file and
//!   the name and size of it and of each external data file;
//! - `options`: every option that shapes the output (method, block size, zero point, exclusions,
//!   output form, ...), from which `nibble merge` rebuilds them; `search`: the calibration and search
//!   options (compared between shards only);
//! - `segment_bytes` (`--segment-mb` in bytes), `segments` (`starts`: the first node index of each segment; `first_nodes`) and
//!   `range` (`[A, B]`, 0-based, inclusive);
//! - `quantized`: per weight, its quantized codes, scales and zero points in `weights.bin`
//!   ([`Entry`]); `awq`: per weight, its AWQ scale (f32), clip ratios (f32) and per-subgraph scale
//!   (f64) in `weights.bin`.

use crate::error::{Error, Result};
use crate::graph::model::{ExternalData, Model};
use crate::methods::awq::{AwqOptions, WeightAwq};
use crate::methods::finished::Entry;
use crate::pipeline::{Format, Method, Options};
use clap::ValueEnum;
use serde_json::{json, Value};
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// The manifest's file name in a shard folder.
pub const MANIFEST: &str = "manifest.json";
/// The results' file name in a shard folder.
pub const WEIGHTS: &str = "weights.bin";
const VERSION: u64 = 1;

/// Where one weight's AWQ result lies in `weights.bin`: `scale` f32 values, then `alphas` f32
/// values, then `scale64` f64 values (each absent when `None`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AwqEntry {
    /// Byte offset.
    pub offset: u64,
    /// Number of pre-quant scales.
    pub scale: Option<usize>,
    /// Number of clip ratios.
    pub alphas: Option<usize>,
    /// Number of float64 scales.
    pub scale64: Option<usize>,
}

impl AwqEntry {
    /// The bytes of `a` as stored, and where they lie when written at `offset`.
    pub fn encode(a: &WeightAwq, offset: u64) -> (Vec<u8>, AwqEntry) {
        let mut bytes = vec![];
        for v in [&a.scale, &a.alphas].into_iter().flatten() {
            bytes.extend(v.iter().flat_map(|x| x.to_le_bytes()));
        }
        if let Some(v) = &a.scale64 {
            bytes.extend(v.iter().flat_map(|x| x.to_le_bytes()));
        }
        let e = AwqEntry {
            offset,
            scale: a.scale.as_ref().map(Vec::len),
            alphas: a.alphas.as_ref().map(Vec::len),
            scale64: a.scale64.as_ref().map(Vec::len),
        };
        (bytes, e)
    }

    /// Reads the result back from `file` (at `path`, named in errors).
    pub fn read(&self, file: &std::fs::File, path: &Path) -> Result<WeightAwq> {
        let len = 4 * (self.scale.unwrap_or(0) + self.alphas.unwrap_or(0)) + 8 * self.scale64.unwrap_or(0);
        let mut bytes = vec![0u8; len];
        file.read_exact_at(&mut bytes, self.offset)
            .map_err(|source| Error::Read { path: path.to_path_buf(), cause: source })?;
        let mut at = 0;
        let mut f32s = |n: Option<usize>| {
            n.map(|n| {
                let v =
                    bytes[at..at + 4 * n].chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect();
                at += 4 * n;
                v
            })
        };
        let scale = f32s(self.scale);
        let alphas = f32s(self.alphas);
        let scale64 = self.scale64.map(|n| {
            bytes[at..at + 8 * n].chunks_exact(8).map(|b| f64::from_le_bytes(b.try_into().unwrap())).collect()
        });
        Ok(WeightAwq { scale, alphas, scale64 })
    }
}

/// What a shard was made from and what it holds.
#[derive(Clone, Debug)]
pub struct Manifest {
    /// The shard folder (not stored: where it was read from).
    pub path: PathBuf,
    /// The `nibble` version that wrote it.
    pub nibble: String,
    /// The input model's canonical path.
    pub model_path: PathBuf,
    /// The input model's identity ([`identity`]).
    pub model: Value,
    /// The output options ([`output_options`]).
    pub options: Value,
    /// The calibration and search options ([`search_options`]).
    pub search: Value,
    /// The segments' size in bytes of weights (`--segment-mb` times 2^20).
    pub segment_bytes: u64,
    /// The first node of each segment.
    pub starts: Vec<usize>,
    /// Their names.
    pub first_nodes: Vec<String>,
    /// The segments it holds, 0-based, inclusive.
    pub range: (usize, usize),
    /// Quantized weights in `weights.bin`.
    pub quantized: Vec<(String, Entry)>,
    /// AWQ results in `weights.bin`.
    pub awq: Vec<(String, AwqEntry)>,
}

/// The identity of the model at `model`: the CRC-32 of its `.onnx` file, and the name and size of
/// that file and of each external data file.
pub fn identity(model: &Model) -> Result<Value> {
    let read_err = |path: &Path, source| Error::Read { path: path.to_path_buf(), cause: source };
    let mut file = std::fs::File::open(&model.path).map_err(|e| read_err(&model.path, e))?;
    let mut crc = crc32fast::Hasher::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf).map_err(|e| read_err(&model.path, e))?;
        if n == 0 {
            break;
        }
        crc.update(&buf[..n]);
    }
    let mut files = vec![];
    for p in std::iter::once(model.path.clone()).chain(model.external_files()) {
        let bytes = std::fs::metadata(&p).map_err(|e| read_err(&p, e))?.len();
        let name = p.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        files.push(json!({ "name": name, "bytes": bytes }));
    }
    Ok(json!({ "onnx_crc32": crc.finalize(), "files": files }))
}

fn enum_name<T: ValueEnum>(v: &T) -> String {
    v.to_possible_value().map(|p| p.get_name().to_string()).unwrap_or_default()
}

/// The options that shape the output, as JSON ([`options_from_json`] reads them back).
pub fn output_options(opts: &Options) -> Value {
    json!({
        "method": enum_name(&opts.method),
        "block_size": opts.block_size,
        "zero_point": opts.zero_point,
        "exclude": opts.exclude,
        "external_data": enum_name(&opts.external_data),
        "external_data_name": opts.external_data_name,
        "scale_search": opts.scale_search,
        "scale_search_clip_min": opts.scale_search_clip_min,
        "skip_nonfinite": opts.skip_nonfinite,
        "format": enum_name(&opts.format),
        "accuracy_level": opts.accuracy_level,
        "gather_axis": opts.gather_axis,
        "gather_block_size": opts.gather_block_size,
        "int8_layers": opts.int8_layers,
        "mixed_precision": opts.mixed_precision,
        "head_bits": opts.head_bits.count(),
        "fuse_siblings": opts.awq.fuse,
    })
}

/// A hash of calibration samples given in memory (Python), to compare shards.
fn samples_hash<T: std::fmt::Debug>(v: &Option<T>) -> Option<u32> {
    v.as_ref().map(|v| crc32fast::hash(format!("{v:?}").as_bytes()))
}

/// The calibration and search options, as JSON (shards must agree on them; the output does not
/// need them).
pub fn search_options(opts: &Options) -> Value {
    let a: &AwqOptions = &opts.awq;
    let c = &a.calibration;
    let mut shapes: Vec<_> = c.shapes.iter().collect();
    shapes.sort();
    let mut dims: Vec<_> = c.dims.iter().collect();
    dims.sort();
    json!({
        "alpha_step": a.alpha_step,
        "clip_alpha_step": a.clip_alpha_step,
        "clip_alpha_min": a.clip_alpha_min,
        "per_subgraph": a.per_subgraph,
        "calibration_memory": a.memory_budget,
        "calibration_data": c.data,
        "calibration_inputs_crc32": samples_hash(&c.inputs),
        "calibration_tokens_crc32": samples_hash(&c.tokens),
        "calibration_shapes": format!("{shapes:?}"),
        "calibration_dims": format!("{dims:?}"),
        "calibration_samples": c.samples,
        "calibration_random": c.random,
        "calibration_seed": c.seed,
        "percdamp": opts.gptq.percdamp,
        "gptq_batch": opts.gptq.lazy_batch,
        "act_order": opts.gptq.act_order,
        "sequential": opts.gptq.sequential,
    })
}

/// The output options stored by [`output_options`], on top of [`Options::default`] (every
/// calibration and search option left at its default: a merge does not calibrate).
pub fn options_from_json(v: &Value, shard: &Path) -> Result<Options> {
    let bad = |key: &str| Error::Shard {
        path: shard.to_path_buf(),
        why: format!("{MANIFEST}: option '{key}' is missing or invalid; remake the shard with this nibble"),
    };
    let text = |key: &str| v.get(key).and_then(Value::as_str).ok_or_else(|| bad(key));
    let int = |key: &str| v.get(key).and_then(Value::as_i64).ok_or_else(|| bad(key));
    let flag = |key: &str| v.get(key).and_then(Value::as_bool).ok_or_else(|| bad(key));
    let opt_text = |key: &str| v.get(key).map(|x| x.as_str().map(String::from)).ok_or_else(|| bad(key));
    let mut opts = Options {
        method: Method::from_str(text("method")?, false).map_err(|_| bad("method"))?,
        block_size: int("block_size")?,
        zero_point: flag("zero_point")?,
        exclude: v
            .get("exclude")
            .and_then(Value::as_array)
            .ok_or_else(|| bad("exclude"))?
            .iter()
            .map(|x| x.as_str().map(String::from).ok_or_else(|| bad("exclude")))
            .collect::<Result<_>>()?,
        external_data: ExternalData::from_str(text("external_data")?, false).map_err(|_| bad("external_data"))?,
        external_data_name: opt_text("external_data_name")?,
        scale_search: flag("scale_search")?,
        scale_search_clip_min: v
            .get("scale_search_clip_min")
            .and_then(Value::as_f64)
            .ok_or_else(|| bad("scale_search_clip_min"))?,
        skip_nonfinite: flag("skip_nonfinite")?,
        format: Format::from_str(text("format")?, false).map_err(|_| bad("format"))?,
        accuracy_level: int("accuracy_level")?,
        gather_axis: match v.get("gather_axis") {
            Some(Value::Null) => None,
            Some(x) => Some(x.as_u64().ok_or_else(|| bad("gather_axis"))? as usize),
            None => return Err(bad("gather_axis")),
        },
        gather_block_size: int("gather_block_size")?,
        int8_layers: opt_text("int8_layers")?,
        mixed_precision: flag("mixed_precision")?,
        head_bits: match int("head_bits")? {
            4 => nibble::Bits::Four,
            8 => nibble::Bits::Eight,
            _ => return Err(bad("head_bits")),
        },
        ..Options::default()
    };
    opts.awq.fuse = flag("fuse_siblings")?;
    opts.gptq.scale_search = opts.scale_search;
    opts.gptq.scale_search_clip_min = opts.scale_search_clip_min;
    Ok(opts)
}

impl Manifest {
    /// The manifest as JSON.
    pub fn to_json(&self) -> Value {
        let quantized: Vec<Value> = self
            .quantized
            .iter()
            .map(|(name, e)| {
                json!({
                    "weight": name, "offset": e.offset, "packed": e.packed, "scales": e.scales,
                    "zero_points": e.zero_points, "scale_shape": e.scale_shape, "block": e.block,
                })
            })
            .collect();
        let awq: Vec<Value> = self
            .awq
            .iter()
            .map(|(name, e)| {
                json!({ "weight": name, "offset": e.offset, "scale": e.scale, "alphas": e.alphas, "scale64": e.scale64 })
            })
            .collect();
        json!({
            "nibble_shard": VERSION,
            "nibble": self.nibble,
            "model": { "path": self.model_path, "identity": self.model },
            "options": self.options,
            "search": self.search,
            "segment_bytes": self.segment_bytes,
            "segments": { "starts": self.starts, "first_nodes": self.first_nodes },
            "range": [self.range.0, self.range.1],
            "quantized": quantized,
            "awq": awq,
        })
    }

    /// Reads the manifest of the shard folder `path`.
    ///
    /// # Errors
    /// [`Error::Shard`] naming the shard when it is not a shard folder or its manifest is not one
    /// this nibble wrote.
    pub fn read(path: &Path) -> Result<Manifest> {
        let err = |why: String| Error::Shard { path: path.to_path_buf(), why };
        let file = path.join(MANIFEST);
        let text = std::fs::read_to_string(&file).map_err(|e| {
            err(format!("cannot read {MANIFEST} ({e}): give the folders written by nibble quantize --segments A..B"))
        })?;
        let v: Value = serde_json::from_str(&text).map_err(|e| err(format!("{MANIFEST} is not valid JSON: {e}")))?;
        let bad = |key: &str| err(format!("{MANIFEST}: '{key}' is missing or invalid; remake the shard"));
        if v.get("nibble_shard").and_then(Value::as_u64) != Some(VERSION) {
            return Err(err(format!("{MANIFEST} is not a version-{VERSION} nibble shard manifest; remake the shard")));
        }
        let usize_of = |x: &Value| x.as_u64().map(|n| n as usize);
        let usizes = |x: Option<&Value>, key: &str| -> Result<Vec<usize>> {
            x.and_then(Value::as_array)
                .ok_or_else(|| bad(key))?
                .iter()
                .map(|n| usize_of(n).ok_or_else(|| bad(key)))
                .collect()
        };
        let opt = |x: &Value, key: &str| -> Result<Option<usize>> {
            match x.get(key) {
                Some(Value::Null) => Ok(None),
                Some(n) => usize_of(n).map(Some).ok_or_else(|| bad(key)),
                None => Err(bad(key)),
            }
        };
        let range = usizes(v.get("range"), "range")?;
        if range.len() != 2 {
            return Err(bad("range"));
        }
        let segments = v.get("segments").ok_or_else(|| bad("segments"))?;
        let mut quantized = vec![];
        for e in v.get("quantized").and_then(Value::as_array).ok_or_else(|| bad("quantized"))? {
            let shape = usizes(e.get("scale_shape"), "scale_shape")?;
            let name = e.get("weight").and_then(Value::as_str).ok_or_else(|| bad("weight"))?;
            quantized.push((
                name.to_string(),
                Entry {
                    offset: e.get("offset").and_then(Value::as_u64).ok_or_else(|| bad("offset"))?,
                    packed: opt(e, "packed")?.ok_or_else(|| bad("packed"))?,
                    scales: opt(e, "scales")?.ok_or_else(|| bad("scales"))?,
                    zero_points: opt(e, "zero_points")?,
                    scale_shape: shape.try_into().map_err(|_| bad("scale_shape"))?,
                    block: opt(e, "block")?.ok_or_else(|| bad("block"))?,
                },
            ));
        }
        let mut awq = vec![];
        for e in v.get("awq").and_then(Value::as_array).ok_or_else(|| bad("awq"))? {
            let name = e.get("weight").and_then(Value::as_str).ok_or_else(|| bad("weight"))?;
            awq.push((
                name.to_string(),
                AwqEntry {
                    offset: e.get("offset").and_then(Value::as_u64).ok_or_else(|| bad("offset"))?,
                    scale: opt(e, "scale")?,
                    alphas: opt(e, "alphas")?,
                    scale64: opt(e, "scale64")?,
                },
            ));
        }
        let model = v.get("model").ok_or_else(|| bad("model"))?;
        Ok(Manifest {
            path: path.to_path_buf(),
            nibble: v.get("nibble").and_then(Value::as_str).ok_or_else(|| bad("nibble"))?.to_string(),
            model_path: PathBuf::from(model.get("path").and_then(Value::as_str).ok_or_else(|| bad("model.path"))?),
            model: model.get("identity").cloned().ok_or_else(|| bad("model.identity"))?,
            options: v.get("options").cloned().ok_or_else(|| bad("options"))?,
            search: v.get("search").cloned().ok_or_else(|| bad("search"))?,
            segment_bytes: v.get("segment_bytes").and_then(Value::as_u64).ok_or_else(|| bad("segment_bytes"))?,
            starts: usizes(segments.get("starts"), "segments.starts")?,
            first_nodes: segments
                .get("first_nodes")
                .and_then(Value::as_array)
                .ok_or_else(|| bad("segments.first_nodes"))?
                .iter()
                .map(|n| n.as_str().unwrap_or_default().to_string())
                .collect(),
            range: (range[0], range[1]),
            quantized,
            awq,
        })
    }
}

/// The first key whose value differs between two JSON objects, with both values.
pub fn first_difference(a: &Value, b: &Value) -> Option<String> {
    let (Some(a), Some(b)) = (a.as_object(), b.as_object()) else {
        return (a != b).then(|| format!("{a} vs {b}"));
    };
    let keys: std::collections::BTreeSet<&String> = a.keys().chain(b.keys()).collect();
    keys.into_iter().find_map(|k| {
        let (x, y) = (a.get(k).unwrap_or(&Value::Null), b.get(k).unwrap_or(&Value::Null));
        (x != y).then(|| format!("{k}: {x} vs {y}"))
    })
}
