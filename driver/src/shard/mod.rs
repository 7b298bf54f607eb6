//! Shards (issue 19 item 5): one model quantized as independent jobs, one per range of segments,
//! then assembled into the model a single run writes.
//!
//! - [`quantize_shard`] (`nibble quantize IN -o SHARD --segment-mb N --segments A..B`) plans the
//!   whole model as a single run does, cuts it into the segments calibration by segments uses
//!   ([`layout`]), calibrates the segments before `A` forward only (the same sessions and waves as
//!   a single run, so the tensors they carry are the same), searches and quantizes the weights of
//!   segments `A..=B` (0-based, inclusive), and writes a shard folder ([`manifest`]): the results of
//!   the search for those weights (GPTQ's quantized weights, AWQ's scales and clip ratios; with
//!   rtn_dq/rtn the quantized weights) and the manifest naming the model, the options and the cuts.
//! - [`merge`] (`nibble merge SHARD... -o OUT`) checks that the shards come from one model and one
//!   set of options and cover every segment exactly once, then runs the rest of a single run (plan,
//!   pre-quant scales, the quantize stage for the weights in no segment, emit, the streamed atomic
//!   output) with the shards' results in place of calibration: the output is the single run's
//!   `nibble quantize IN -o OUT --segment-mb N` byte for byte.
//!
//! Not shardable exactly, refused: `--target-bits` (one bit budget over all weights),
//! `--sequential` (each segment calibrated on the quantized segments before it) and `awq_gptq`
//! (GPTQ then reads weights into which a later segment's pre-quant scale may be folded).

pub mod layout;
pub mod manifest;

use crate::error::{Error, Result};
use crate::graph::build::ModelNames;
use crate::graph::model::Model;
use crate::methods::awq::{AwqOptions, AwqResult};
use crate::methods::finished::{Entry, Finished};
use crate::methods::gptq::GptqOptions;
use crate::pipeline::{check_method_options, choose_weights, fold_scales, Method, Options, Searched, Summary};
use crate::plan::{compile_patterns, Candidate};
use layout::Layout;
use manifest::{AwqEntry, Manifest, MANIFEST, WEIGHTS};
use nibble::scale_search::ScaleGrid;
use nibble::BlockSize;
use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// What [`quantize_shard`] wrote.
#[derive(Clone, Debug)]
pub struct ShardSummary {
    /// The model's segments, their first nodes and weights.
    pub layout: Layout,
    /// The segments written, 0-based, inclusive.
    pub range: (usize, usize),
    /// Weights whose results the shard holds.
    pub weights: usize,
    /// Bytes of `weights.bin`.
    pub bytes: u64,
    /// Wall time.
    pub seconds: f64,
}

/// Refuses what cannot be sharded exactly (usage errors: the message says why and what to do).
pub fn check_shardable(opts: &Options, range: (usize, usize)) -> Result<u64> {
    let usage = |why: String| Err(Error::Usage(format!("--segments {}..{}: {why}", range.0, range.1)));
    if range.0 > range.1 {
        return usage("the first segment is after the last; give A..B with A <= B (0-based, inclusive)".into());
    }
    if opts.target_bits.is_some() {
        return usage(
            "--target-bits chooses bits under one budget over every weight of the model; quantize without --segments"
                .into(),
        );
    }
    if opts.gptq.sequential {
        return usage("--sequential calibrates each segment on the quantized segments before it; quantize without --segments (or without --sequential)".into());
    }
    if opts.method == Method::AwqGptq {
        return usage("awq_gptq runs GPTQ on weights into which another segment's pre-quant scale may be folded; use gptq, awq_lite, awq_clip, awq_full, rtn_dq or rtn".into());
    }
    match opts.awq.segment_bytes {
        Some(b) if b > 0 => Ok(b),
        _ => usage("give --segment-mb N (the segments' size in MiB of weights, the same for every shard)".into()),
    }
}

/// Refuses a shard path that is the input, or that exists (without `force`; with it, only a shard
/// folder is replaced).
fn check_shard_path(model: &Model, shard: &Path, force: bool) -> Result<()> {
    let err = |why: &str| Err(Error::Output { path: shard.to_path_buf(), why: why.into() });
    let same = |a: &Path, b: &Path| matches!((a.canonicalize(), b.canonicalize()), (Ok(a), Ok(b)) if a == b);
    if same(shard, &model.path) || model.external_files().iter().any(|f| same(shard, f)) {
        return err("is the input model or its data; give a new folder name for the shard");
    }
    if shard.exists() {
        if !force {
            return err("already exists; pass --force to replace it");
        }
        if !shard.join(MANIFEST).is_file() {
            return err("exists and is not a shard folder (no manifest.json); give a new folder name");
        }
    }
    match shard.parent().filter(|p| !p.as_os_str().is_empty()) {
        Some(dir) if !dir.is_dir() => err("its parent folder does not exist"),
        _ => Ok(()),
    }
}

/// Quantizes the weights of segments `range.0..=range.1` (0-based, inclusive) of the model at
/// `input` and writes them as a shard folder at `shard` (atomically: a temporary folder beside it,
/// renamed into place; removed on an error or Ctrl-C). `opts` must calibrate by segments
/// (`opts.awq.segment_bytes`). The input is only read.
///
/// # Errors
/// [`Error::Usage`] for options that cannot be sharded ([`check_shardable`]) and a range past the
/// last segment (the message lists the segments); every error of a single run.
pub fn quantize_shard(input: &Path, shard: &Path, opts: &Options, range: (usize, usize)) -> Result<ShardSummary> {
    let start = Instant::now();
    let target = check_shardable(opts, range)?;
    let block = BlockSize::from_i64(opts.block_size).map_err(|e| Error::Usage(format!("--block-size: {e}")))?;
    let patterns = compile_patterns(&opts.exclude)?;
    let model = Model::load(input)?;
    check_shard_path(&model, shard, opts.force)?;
    let (candidates, gather_block) = choose_weights(&model, &patterns, block, opts)?;
    check_method_options(opts)?;
    let chosen: Vec<&Candidate> = candidates.iter().filter(|c| c.quantized()).collect();
    let layout = Layout::of(&model, &chosen, target);
    eprint!("nibble: segments at --segment-mb {}:\n{}", target >> 20, indent(&layout.table()));
    if range.1 >= layout.len() {
        return Err(Error::Usage(format!(
            "--segments {}..{}: the model has {} segments at --segment-mb {} (0..{}, listed above); give a range inside them",
            range.0,
            range.1,
            layout.len(),
            target >> 20,
            layout.len() - 1
        )));
    }
    let owned: Vec<&Candidate> = {
        let mut seen = std::collections::HashSet::new();
        chosen
            .iter()
            .copied()
            .filter(|c| layout.owner.get(&c.base).is_some_and(|&s| s >= range.0 && s <= range.1))
            .filter(|c| seen.insert(c.base.clone()))
            .collect()
    };
    let awq_opts = AwqOptions { segments: Some(range), ..opts.awq.clone() };
    let mut quantized: Finished = Finished::in_memory();
    let mut awq: Option<AwqResult> = None;
    if owned.is_empty() {
        // Nothing to calibrate: the shard holds no weights.
    } else if opts.method.gptq() {
        let cal = crate::methods::gptq::prepare(&model, &chosen, &awq_opts)?;
        let gptq_opts = GptqOptions {
            scale_search: opts.scale_search,
            scale_search_clip_min: opts.scale_search_clip_min,
            ..opts.gptq.clone()
        };
        quantized = crate::methods::gptq::quantize(&cal, &model, &chosen, block, opts.zero_point, &gptq_opts, None)?;
    } else if let Some(method) = opts.method.awq() {
        let a = AwqOptions { method, ..awq_opts };
        awq = Some(crate::methods::awq::search(&model, &chosen, block, opts.zero_point, &a)?);
    } else {
        let grid = opts.scale_search.then(|| ScaleGrid::clipped_to(opts.scale_search_clip_min));
        for c in &owned {
            let b = if c.op == "Gather" { gather_block } else { c.block(block) };
            let q = crate::methods::rtn::quantize_candidate_with(&model, c, b, opts.zero_point, grid.as_ref())?;
            quantized.insert(c.base.clone(), q)?;
        }
    }
    // The shard folder: written beside its final place, renamed into it.
    let parent = shard.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let tmp = tempfile::Builder::new()
        .prefix(".nibble-shard-")
        .tempdir_in(parent)
        .map_err(|e| Error::Write { path: parent.to_path_buf(), cause: e })?;
    crate::cleanup::register(tmp.path());
    let written = write_shard(tmp.path(), &model, &layout, &owned, &mut quantized, awq.as_ref(), opts, range);
    let done = written.and_then(|(weights, bytes)| {
        if shard.exists() {
            std::fs::remove_dir_all(shard).map_err(|e| Error::Write { path: shard.to_path_buf(), cause: e })?;
        }
        std::fs::rename(tmp.path(), shard).map_err(|e| Error::Write { path: shard.to_path_buf(), cause: e })?;
        Ok((weights, bytes))
    });
    crate::cleanup::unregister(tmp.path());
    let (weights, bytes) = done?;
    let _ = tmp.keep();
    Ok(ShardSummary { layout, range, weights, bytes, seconds: start.elapsed().as_secs_f64() })
}

/// The segments of the model at `input` under `opts` (which must set `opts.awq.segment_bytes`),
/// with their first nodes and weights: what `--segments A..B` ranges over. Plans the weights as
/// quantize does; calibrates nothing.
pub fn segments_of(input: &Path, opts: &Options) -> Result<Layout> {
    let target = opts
        .awq
        .segment_bytes
        .filter(|&b| b > 0)
        .ok_or_else(|| Error::Usage("give --segment-mb N (the segments' size in MiB of weights)".into()))?;
    let block = BlockSize::from_i64(opts.block_size).map_err(|e| Error::Usage(format!("--block-size: {e}")))?;
    let patterns = compile_patterns(&opts.exclude)?;
    let model = Model::load(input)?;
    let (candidates, _) = choose_weights(&model, &patterns, block, opts)?;
    let chosen: Vec<&Candidate> = candidates.iter().filter(|c| c.quantized()).collect();
    Ok(Layout::of(&model, &chosen, target))
}

fn indent(table: &str) -> String {
    table.lines().map(|l| format!("  {l}\n")).collect()
}

/// Writes `weights.bin` and `manifest.json` into the folder `dir`; returns the weights and bytes.
#[allow(clippy::too_many_arguments)]
fn write_shard(
    dir: &Path,
    model: &Model,
    layout: &Layout,
    owned: &[&Candidate],
    quantized: &mut Finished,
    awq: Option<&AwqResult>,
    opts: &Options,
    range: (usize, usize),
) -> Result<(usize, u64)> {
    let path = dir.join(WEIGHTS);
    let werr = |e| Error::Write { path: path.clone(), cause: e };
    let mut file = std::io::BufWriter::new(std::fs::File::create(&path).map_err(werr)?);
    let (mut q_entries, mut a_entries, mut len) = (vec![], vec![], 0u64);
    for c in owned {
        let lost =
            || Error::Runtime(format!("weight '{}' of segment {} was not calibrated", c.base, layout.owner[&c.base]));
        if let Some(a) = awq {
            let (bytes, e) = AwqEntry::encode(a.weights.get(&c.base).ok_or_else(lost)?, len);
            file.write_all(&bytes).map_err(werr)?;
            len += bytes.len() as u64;
            a_entries.push((c.base.clone(), e));
        } else {
            let q = quantized.take(&c.base)?.ok_or_else(lost)?;
            let (bytes, e) = Entry::encode(&q, len);
            file.write_all(&bytes).map_err(werr)?;
            len += bytes.len() as u64;
            q_entries.push((c.base.clone(), e));
        }
    }
    file.into_inner().map_err(|e| werr(e.into_error()))?.sync_all().map_err(werr)?;
    let manifest = Manifest {
        path: dir.to_path_buf(),
        nibble: env!("CARGO_PKG_VERSION").into(),
        model_path: model.path.canonicalize().unwrap_or_else(|_| model.path.clone()),
        model: manifest::identity(model)?,
        options: manifest::output_options(opts),
        search: manifest::search_options(opts),
        segment_bytes: opts.awq.segment_bytes.unwrap_or(0),
        starts: layout.segments.starts.clone(),
        first_nodes: layout.first_nodes.clone(),
        range,
        quantized: q_entries,
        awq: a_entries,
    };
    let mpath = dir.join(MANIFEST);
    let text = serde_json::to_string_pretty(&manifest.to_json()).expect("JSON");
    std::fs::write(&mpath, text).map_err(|e| Error::Write { path: mpath, cause: e })?;
    Ok((owned.len(), len))
}

/// Checks that `manifests` come from one model and one set of options and cover each segment
/// exactly once; returns the segment count.
fn check_cover(manifests: &[Manifest]) -> Result<usize> {
    let first = &manifests[0];
    let differ = |m: &Manifest, what: &str, diff: String| Error::Shard {
        path: m.path.clone(),
        why: format!(
            "was made with another {what} than {} ({diff}); merge shards of one model made with the same options",
            first.path.display()
        ),
    };
    for m in &manifests[1..] {
        if m.nibble != first.nibble {
            return Err(differ(m, "nibble version", format!("{} vs {}", m.nibble, first.nibble)));
        }
        if m.model != first.model {
            let d = manifest::first_difference(&m.model, &first.model).unwrap_or_default();
            return Err(differ(m, "input model", format!("{}: {d}", m.model_path.display())));
        }
        for (what, a, b) in [("option", &m.options, &first.options), ("calibration option", &m.search, &first.search)] {
            if let Some(d) = manifest::first_difference(a, b) {
                return Err(differ(m, what, d));
            }
        }
        if m.segment_bytes != first.segment_bytes || m.starts != first.starts {
            let mb = |b: u64| format!("{} MiB", b as f64 / (1u64 << 20) as f64);
            return Err(differ(m, "--segment-mb", format!("{} vs {}", mb(m.segment_bytes), mb(first.segment_bytes))));
        }
    }
    let count = first.starts.len();
    let mut holder: Vec<Option<&Path>> = vec![None; count];
    for m in manifests {
        if m.range.1 >= count || m.range.0 > m.range.1 {
            return Err(Error::Shard {
                path: m.path.clone(),
                why: format!("holds segments {}..{} of a model of {count}; remake it", m.range.0, m.range.1),
            });
        }
        for (s, h) in holder.iter_mut().enumerate().take(m.range.1 + 1).skip(m.range.0) {
            if let Some(other) = h {
                return Err(Error::Shard {
                    path: m.path.clone(),
                    why: format!(
                        "segment {s} (from node '{}') is also in shard {}: give each segment once (leave one of them out)",
                        first.first_nodes.get(s).map_or("", String::as_str),
                        other.display()
                    ),
                });
            }
            *h = Some(&m.path);
        }
    }
    if let Some(s) = holder.iter().position(Option::is_none) {
        let end = (s..count).take_while(|&i| holder[i].is_none()).last().unwrap_or(s);
        return Err(Error::Shard {
            path: first.path.clone(),
            why: format!(
                "segment {s} (from node '{}') is in no shard given (of segments 0..{}): make the missing ones with \
                 nibble quantize {} -o SHARD --segment-mb {} --segments {s}..{end} and merge them too",
                first.first_nodes.get(s).map_or("", String::as_str),
                count - 1,
                first.model_path.display(),
                first.segment_bytes >> 20
            ),
        });
    }
    Ok(count)
}

/// Assembles the shards `shards` into the model at `output`: the model a single run with the
/// shards' options writes (`nibble quantize IN -o OUT --segment-mb N ...`), byte for byte, written
/// the same way (streamed, atomic, nothing left on an error or Ctrl-C). The input model is the one
/// the manifests name, or `model`; it must be the file the shards were made from (same CRC-32 and
/// sizes). Shards and input are only read.
///
/// # Errors
/// [`Error::Shard`] naming the shard: not a shard, shards of different models, options or
/// `--segment-mb`, a segment in two shards or in none; [`Error::Output`] for an output that
/// exists (without `force`) or is the input.
pub fn merge(shards: &[PathBuf], output: &Path, model: Option<&Path>, force: bool, fsync: bool) -> Result<Summary> {
    if shards.is_empty() {
        return Err(Error::Usage("give the shard folders to merge".into()));
    }
    let manifests: Vec<Manifest> = shards.iter().map(|p| Manifest::read(p)).collect::<Result<_>>()?;
    check_cover(&manifests)?;
    let first = &manifests[0];
    let input = model.map(Path::to_path_buf).unwrap_or_else(|| first.model_path.clone());
    let now = manifest::identity(&Model::load(&input)?)?;
    if now != first.model {
        let d = manifest::first_difference(&now, &first.model).unwrap_or_default();
        return Err(Error::Shard {
            path: first.path.clone(),
            why: format!(
                "was made from another model than {} ({d}); give --model with the model the shards were made from",
                input.display()
            ),
        });
    }
    let mut opts = manifest::options_from_json(&first.options, &first.path)?;
    opts.force = force;
    opts.fsync = fsync;
    opts.awq.segment_bytes = Some(first.segment_bytes);
    let mut search = |model: &mut Model,
                      chosen: &[&Candidate],
                      _: BlockSize,
                      opts: &Options,
                      names: &mut ModelNames|
     -> Result<Searched> {
        let layout = Layout::of(model, chosen, first.segment_bytes);
        if layout.segments.starts != first.starts {
            return Err(Error::Shard {
                path: first.path.clone(),
                why: "its segments are not the model's at the same options; remake the shards with this nibble".into(),
            });
        }
        let mut finished = Finished::in_memory();
        let mut awq_weights = HashMap::new();
        let mut held: HashMap<String, usize> = HashMap::new();
        for m in &manifests {
            let file = m.path.join(WEIGHTS);
            for w in m.quantized.iter().map(|(w, _)| w).chain(m.awq.iter().map(|(w, _)| w)) {
                match layout.owner.get(w) {
                    Some(&s) if s >= m.range.0 && s <= m.range.1 => held.insert(w.clone(), s),
                    _ => {
                        return Err(Error::Shard {
                            path: m.path.clone(),
                            why: format!("holds weight '{w}', which is not in its segments; remake the shard"),
                        })
                    }
                };
            }
            finished.add_file(&file, m.quantized.clone())?;
            if !m.awq.is_empty() {
                let f = std::fs::File::open(&file).map_err(|e| Error::Read { path: file.clone(), cause: e })?;
                for (w, e) in &m.awq {
                    awq_weights.insert(w.clone(), e.read(&f, &file)?);
                }
            }
        }
        if let Some((w, s)) = layout.owner.iter().find(|(w, _)| !held.contains_key(*w)) {
            let m = manifests.iter().find(|m| m.range.0 <= *s && *s <= m.range.1).unwrap_or(first);
            return Err(Error::Shard {
                path: m.path.clone(),
                why: format!("lacks weight '{w}' of segment {s}; remake the shard"),
            });
        }
        let (awq, insertions) = match opts.method.awq().filter(|_| !chosen.is_empty()) {
            Some(_) => {
                let (groups, plain) = crate::methods::awq::groups(model, chosen);
                let result = AwqResult { weights: awq_weights, groups, plain };
                let insertions = fold_scales(model, chosen, &result, opts, names)?;
                (Some(result), insertions)
            }
            None => (None, Default::default()),
        };
        Ok(Searched { gptq: finished, awq, insertions })
    };
    crate::pipeline::write_model(&input, output, &opts, &mut search)
}
