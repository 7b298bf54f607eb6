//! Calibration (and perplexity) samples from text: a UTF-8 file (or `.jsonl` with a `text` field
//! per line) tokenized with a Hugging Face `tokenizer.json` (the `tokenizers` crate), cut into
//! windows of T tokens spread evenly over the text, each window one sample of `input_ids [1, T]`.
//! Each window starts with the special tokens the tokenizer puts before a text by default (its
//! post-processor: `<bos>` for Gemma and Llama, nothing for Qwen2), as `tokenizer(text)` in
//! transformers and onnxruntime-genai's generator feed the model, followed by T minus that many
//! text tokens.

use crate::error::{Error, Result};
use std::path::{Path, PathBuf};

/// Default number of calibration windows from text.
pub const DEFAULT_SAMPLES: usize = 16;
/// Default window length in tokens. 16 x 512 = 8192 tokens: at least as many rows as the widest
/// MatMul input of a small LLM (GPTQ's Hessian `X^T X` needs more rows than columns to be well
/// conditioned), at a cost of 16 forward passes of 512 tokens on a CPU.
pub const DEFAULT_SEQ_LEN: usize = 512;

/// The tokenizer file to use: `explicit`, else `tokenizer.json` in `model` (a folder) or beside
/// it (a file). Errors name the places looked at and `--tokenizer`.
pub fn find_tokenizer(explicit: Option<&Path>, model: &Path) -> Result<PathBuf> {
    if let Some(p) = explicit {
        return Ok(p.to_path_buf());
    }
    let dir = if model.is_dir() { model.to_path_buf() } else { model.parent().unwrap_or(Path::new(".")).to_path_buf() };
    let candidate = dir.join("tokenizer.json");
    if candidate.is_file() {
        return Ok(candidate);
    }
    Err(Error::Usage(format!(
        "text needs a tokenizer: no tokenizer.json in {}; give one with --tokenizer PATH/tokenizer.json (the model's Hugging Face tokenizer)",
        dir.display()
    )))
}

/// Loads a Hugging Face `tokenizer.json`.
pub fn load_tokenizer(path: &Path) -> Result<tokenizers::Tokenizer> {
    if !path.is_file() {
        return Err(Error::Read {
            path: path.to_path_buf(),
            cause: std::io::Error::new(std::io::ErrorKind::NotFound, "no such tokenizer file"),
        });
    }
    tokenizers::Tokenizer::from_file(path).map_err(|e| Error::Parse {
        path: path.to_path_buf(),
        why: format!("not a Hugging Face tokenizer.json: {e}; give the model's tokenizer.json with --tokenizer"),
    })
}

/// The text of `path`: the file as UTF-8, or for `.jsonl` the `text` fields of its lines joined
/// by blank lines.
pub fn read_text(path: &Path) -> Result<String> {
    let bytes = std::fs::read(path).map_err(|cause| Error::Read { path: path.to_path_buf(), cause })?;
    let text = String::from_utf8(bytes).map_err(|e| Error::Parse {
        path: path.to_path_buf(),
        why: format!("not UTF-8 text (byte {}); convert it to UTF-8", e.utf8_error().valid_up_to()),
    })?;
    if !path.extension().is_some_and(|e| e.eq_ignore_ascii_case("jsonl")) {
        return Ok(text);
    }
    let mut parts = Vec::new();
    for (i, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        let v: serde_json::Value = serde_json::from_str(line)
            .map_err(|e| Error::Parse { path: path.to_path_buf(), why: format!("line {} is not JSON ({e})", i + 1) })?;
        let t = v.get("text").and_then(|t| t.as_str()).ok_or_else(|| Error::Parse {
            path: path.to_path_buf(),
            why: format!("line {} has no string field \"text\"", i + 1),
        })?;
        parts.push(t.to_string());
    }
    Ok(parts.join("\n\n"))
}

/// The token ids of `text` (no special tokens added).
pub fn tokenize(tokenizer: &tokenizers::Tokenizer, text: &str, what: &Path) -> Result<Vec<i64>> {
    let encoding = tokenizer
        .encode(text, false)
        .map_err(|e| Error::Parse { path: what.to_path_buf(), why: format!("the tokenizer failed on it: {e}") })?;
    Ok(encoding.get_ids().iter().map(|&id| i64::from(id)).collect())
}

/// `count` windows of `len` tokens, spread evenly over `tokens` without overlap (the first at the
/// start, the last at the end). Errors when the text holds fewer than `count * len` tokens,
/// saying how many it holds.
pub fn windows(tokens: &[i64], count: usize, len: usize, what: &Path) -> Result<Vec<Vec<i64>>> {
    if count == 0 || len == 0 {
        return Err(Error::Usage("the number of samples and the sequence length must be at least 1".into()));
    }
    let need = count.saturating_mul(len);
    if tokens.len() < need {
        let fits = tokens.len() / len;
        return Err(Error::Usage(format!(
            "{} holds {} tokens, fewer than {count} samples x {len} tokens = {need}; give a longer text{}",
            what.display(),
            tokens.len(),
            if fits > 0 {
                format!(", fewer samples (at most {fits}) or a shorter sequence length")
            } else {
                " or a shorter sequence length".into()
            }
        )));
    }
    let span = tokens.len() - len;
    Ok((0..count)
        .map(|i| {
            let start = if count == 1 { 0 } else { i * span / (count - 1) };
            tokens[start..start + len].to_vec()
        })
        .collect())
}

/// The special tokens `tokenizer` puts before a text when asked to add them (its post-processor's
/// template: `[bos]` for Gemma and Llama tokenizers, `[]` for Qwen2's or a ByteLevel one): the ids
/// of `encode("a", true)` ahead of those of `encode("a", false)`.
pub fn lead_tokens(tokenizer: &tokenizers::Tokenizer, what: &Path) -> Result<Vec<i64>> {
    let plain = tokenize(tokenizer, "a", what)?;
    let with = tokenizer
        .encode("a", true)
        .map_err(|e| Error::Parse { path: what.to_path_buf(), why: format!("the tokenizer failed on it: {e}") })?;
    let with: Vec<i64> = with.get_ids().iter().map(|&id| i64::from(id)).collect();
    let at = with.windows(plain.len().max(1)).position(|w| w == plain.as_slice()).unwrap_or(0);
    Ok(with[..at].to_vec())
}

/// Reads `text`, tokenizes it with the tokenizer at `tokenizer` and cuts `count` windows of `len`
/// tokens, each the tokenizer's [`lead_tokens`] followed by `len` minus that many text tokens: the
/// token sequences for `CalibrationOptions::tokens` or perplexity.
pub fn text_windows(text: &Path, tokenizer: &Path, count: usize, len: usize) -> Result<Vec<Vec<i64>>> {
    let tok = load_tokenizer(tokenizer)?;
    let lead = lead_tokens(&tok, tokenizer)?;
    if len <= lead.len() {
        return Err(Error::Usage(format!(
            "a sequence length of {len} tokens leaves no room for text after the tokenizer's {} leading special token(s); give a longer sequence length",
            lead.len()
        )));
    }
    let ids = tokenize(&tok, &read_text(text)?, text)?;
    let body = windows(&ids, count, len - lead.len(), text)?;
    Ok(body.into_iter().map(|w| lead.iter().copied().chain(w).collect()).collect())
}
