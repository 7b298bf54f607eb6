//! Mixed precision: which MatMul/Gemm weights stay at INT8 (per channel) instead of INT4, as
//! ModelOpt's `get_layer_precision_mapping` chooses them.
//!
//! - `--int8-layers P1,P2,...` (ModelOpt's `layers_8bit`): a node is INT8 when the dot-separated
//!   tokens of a pattern appear, in order and contiguous, among the tokens of its name (names and
//!   patterns have their leading `/` dropped and `/` read as `.`): `layers.3` matches
//!   `/model/layers.3/mlp/down_proj/MatMul` but not `/model/layers.31/...`.
//! - `--mixed-precision` (ModelOpt's `enable_mixed_quant`) without patterns: among nodes named
//!   `/model/layers.{i}/{attn|self_attn}/{qkv_proj|v_proj}/MatMul` and `/model/layers.{i}/mlp/down_proj/MatMul`,
//!   grouped by their two name parts before `MatMul` and kept in graph order, the first and last
//!   eighth of each group and every third node in between are INT8.
//!
//! The weight of each chosen node is quantized to INT8 with one scale per output channel
//! (`s = amax / 127`, codes in -128..=127, or UINT8 with a zero point) and dequantized by a
//! DequantizeLinear with `axis` and no `block_size`. As in ModelOpt, only initializer weights of
//! nodes whose activation is not itself an initializer are considered, and the last consuming node
//! decides for a shared weight.

use crate::error::{Error, Result};
use crate::graph::model::Model;
use crate::plan::{Candidate, Decision};
use nibble::Bits;
use regex::Regex;
use std::collections::{HashMap, HashSet};

/// Marks the candidates that become INT8: by `patterns` (comma-separated) when given, else by
/// ModelOpt's default choice.
pub fn apply(model: &Model, candidates: &mut [Candidate], patterns: Option<&str>) -> Result<()> {
    let g = model.proto.graph.as_ref().expect("graph");
    let chosen_nodes: Vec<String> = match patterns {
        Some(p) => parse_patterns(p)?,
        None => {
            default_nodes(g.node.iter().map(|n| (n.op_type.as_deref().unwrap_or(""), n.name.as_deref().unwrap_or(""))))
        }
    };
    let excluded: HashSet<&str> = candidates
        .iter()
        .filter(|c| matches!(c.decision, Decision::Excluded { .. }))
        .map(|c| c.node.as_str())
        .collect();
    let initializers: HashMap<&str, usize> =
        g.initializer.iter().filter_map(|t| Some((t.name.as_deref()?, t.dims.len()))).collect();
    // weight -> INT8?, the last consuming node deciding (ModelOpt's dict assignment order).
    let mut eight: HashMap<&str, bool> = HashMap::new();
    for n in &g.node {
        let name = n.name.as_deref().unwrap_or("");
        if !matches!(n.op_type.as_deref(), Some("MatMul" | "Gemm")) || excluded.contains(name) {
            continue;
        }
        let (Some(act), Some(w)) = (n.input.first(), n.input.get(1)) else { continue };
        if initializers.contains_key(act.as_str()) || initializers.get(w.as_str()).is_none_or(|&rank| rank == 1) {
            continue;
        }
        eight.insert(w.as_str(), matches_any(name, &chosen_nodes));
    }
    for c in candidates.iter_mut().filter(|c| c.quantized() && c.op != "Gather") {
        if eight.get(c.weight.as_str()) == Some(&true) {
            c.bits = Bits::Eight;
            c.block_size = Some(nibble::BlockSize::PerChannel);
        }
    }
    Ok(())
}

/// Splits and checks `--int8-layers` (ModelOpt's `validate_8bit_layers`).
pub fn parse_patterns(p: &str) -> Result<Vec<String>> {
    let valid = Regex::new(r"^\s*[/a-zA-Z0-9_.\-]+(\s*,\s*[/a-zA-Z0-9_.\-]+)*\s*$").expect("valid regex");
    if !valid.is_match(p) {
        return Err(Error::Usage(format!(
            "--int8-layers '{p}': give comma-separated node names or name parts, such as /model/layers.0/mlp/down_proj/MatMul,layers.5 (letters, digits, / _ . - only)"
        )));
    }
    Ok(p.split(',').map(str::trim).filter(|s| !s.is_empty()).map(String::from).collect())
}

fn tokens(s: &str) -> Vec<&str> {
    s.trim_start_matches('/').split(['/', '.']).collect()
}

/// ModelOpt's `should_quantize_to_8bit`: a pattern's tokens appear contiguously in the name's.
pub fn matches_any(node_name: &str, patterns: &[String]) -> bool {
    let hay = tokens(node_name);
    patterns.iter().any(|p| {
        let needle = tokens(p);
        needle.len() <= hay.len() && hay.windows(needle.len()).any(|w| w == needle.as_slice())
    })
}

/// ModelOpt's default INT8 choice over `(op_type, name)` of the graph's nodes, in order.
pub fn default_nodes<'a>(nodes: impl Iterator<Item = (&'a str, &'a str)>) -> Vec<String> {
    let patterns = [
        r"^/model/layers\.(\d+)/attn/qkv_proj/MatMul$",
        r"^/model/layers\.(\d+)/attn/v_proj/MatMul$",
        r"^/model/layers\.(\d+)/self_attn/qkv_proj/MatMul$",
        r"^/model/layers\.(\d+)/self_attn/v_proj/MatMul$",
        r"^/model/layers\.(\d+)/mlp/down_proj/MatMul$",
    ]
    .map(|p| Regex::new(p).expect("valid regex"));
    let mut groups: Vec<(String, Vec<&str>)> = vec![];
    for (op, name) in nodes {
        if !matches!(op, "MatMul" | "Gemm") || name.contains("lm_head") || !patterns.iter().any(|r| r.is_match(name)) {
            continue;
        }
        let parts: Vec<&str> = name.split('/').collect();
        let key = parts[parts.len() - 3..parts.len() - 1].join(".");
        match groups.iter_mut().find(|(k, _)| *k == key) {
            Some((_, v)) => v.push(name),
            None => groups.push((key, vec![name])),
        }
    }
    // ModelOpt sorts each group by the index in `layers\.(\d+)\.`, which these names (a `/` after
    // the index) never contain: the stable sort keeps graph order, and so does this.
    let mut out = vec![];
    for (_, names) in groups {
        let n = names.len();
        let eighth = n / 8;
        for (i, name) in names.iter().enumerate() {
            let edge = i < eighth || (eighth > 0 && i >= n - eighth);
            let every_third = i >= eighth && i < n - eighth && (i - eighth) % 3 == 0;
            if edge || every_third {
                out.push(name.to_string());
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_match_whole_parts_in_order() {
        let p = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let name = "/model/layers.3/mlp/down_proj/MatMul";
        assert!(matches_any(name, &p(&["layers.3"])));
        assert!(matches_any(name, &p(&["/model/layers.3/mlp"])));
        assert!(matches_any(name, &p(&["mlp.down_proj"])));
        assert!(!matches_any(name, &p(&["layers.31"])));
        assert!(!matches_any(name, &p(&["down_proj.mlp"])));
        assert!(!matches_any(name, &p(&["layers.3/attn"])));
        assert!(!matches_any(name, &p(&[])));
    }

    #[test]
    fn patterns_are_validated_like_modelopt() {
        assert_eq!(parse_patterns(" a/b , c.d ").unwrap(), vec!["a/b", "c.d"]);
        assert!(parse_patterns("a,(b)").is_err());
        assert!(parse_patterns("a,,b").is_err());
    }

    #[test]
    fn default_choice_takes_edges_and_every_third() {
        // 16 layers: eighth = 2 -> layers 0, 1, 14, 15, and 2, 5, 8, 11 of the middle (2..14).
        let names: Vec<String> = (0..16).map(|i| format!("/model/layers.{i}/mlp/down_proj/MatMul")).collect();
        let mut nodes: Vec<(&str, &str)> = names.iter().map(|n| ("MatMul", n.as_str())).collect();
        nodes.push(("MatMul", "/model/layers.0/mlp/up_proj/MatMul"));
        nodes.push(("MatMul", "/lm_head/MatMul"));
        let chosen = default_nodes(nodes.into_iter());
        let idx: Vec<usize> = chosen
            .iter()
            .map(|n| n.trim_start_matches("/model/layers.").split('/').next().unwrap().parse().unwrap())
            .collect();
        assert_eq!(idx, vec![0, 1, 2, 5, 8, 11, 14, 15]);
        // Fewer than 8 layers: no edges, every third from the first.
        let names: Vec<String> = (0..7).map(|i| format!("/model/layers.{i}/self_attn/v_proj/MatMul")).collect();
        let chosen = default_nodes(names.iter().map(|n| ("MatMul", n.as_str())));
        assert_eq!(chosen, vec![names[0].clone(), names[3].clone(), names[6].clone()]);
    }
}
