//! `nibble quantize --segments A..B` (writing a shard) and `nibble merge` ([`crate::shard`]).

use crate::pipeline::Options;
use crate::shard::ShardSummary;
use clap::CommandFactory;
use std::path::{Path, PathBuf};

/// Parses `A..B` (0-based, inclusive: `2..3` is segments 2 and 3; `4` alone is `4..4`).
pub fn segments_arg(text: &str) -> Result<(usize, usize), String> {
    let bad = || format!("'{text}' is not a range of segments A..B such as 0..3 (0-based, inclusive)");
    let (a, b) = text.split_once("..").unwrap_or((text, text));
    let (a, b) = (a.trim().parse::<usize>().map_err(|_| bad())?, b.trim().parse::<usize>().map_err(|_| bad())?);
    if a > b {
        return Err(format!("{}: the first segment comes after the last", bad()));
    }
    Ok((a, b))
}

/// A usage error found after parsing: printed as clap prints its own, exit code 2.
pub fn usage(message: String) -> anyhow::Error {
    super::Cli::command().error(clap::error::ErrorKind::ArgumentConflict, message).into()
}

/// The shard folder of `quantize --segments` (`-o` is required; a model folder is refused).
pub fn shard_output(folder_input: bool, output: Option<&Path>) -> anyhow::Result<PathBuf> {
    if folder_input {
        return Err(usage("--segments: give the model file (MODEL.onnx), not a model folder".into()));
    }
    output.map(Path::to_path_buf).ok_or_else(|| usage("--segments: give the shard folder with -o SHARD".into()))
}

/// Writes the shard and prints what it holds.
pub fn quantize_shard(model: &Path, shard: &Path, opts: &Options, range: (usize, usize)) -> anyhow::Result<()> {
    if let Err(e) = crate::shard::check_shardable(opts, range) {
        return Err(usage(e.to_string()));
    }
    let s: ShardSummary = crate::shard::quantize_shard(model, shard, opts, range)?;
    println!(
        "shard: segments {}..{} of {} ({} weights, {:.1} MB of results), {:.2} s -> {}",
        s.range.0,
        s.range.1,
        s.layout.len(),
        s.weights,
        s.bytes as f64 / 1e6,
        s.seconds,
        shard.display()
    );
    Ok(())
}

/// Merges the shards and prints the summary line of a quantize run.
pub fn merge(shards: &[PathBuf], output: &Path, model: Option<&Path>, force: bool, fsync: bool) -> anyhow::Result<()> {
    let s = crate::shard::merge(shards, output, model, force, fsync)?;
    super::print_summary(&s, output);
    Ok(())
}
