//! Model folders in and out, as CPU users deploy LLMs: an onnxruntime-genai folder
//! (`genai_config.json` names the decoder's file in `model.decoder.filename`) or an Optimum export
//! (`config.json` beside `model.onnx` or `decoder_model_merged.onnx`) is quantized into a new
//! folder that holds every other file byte for byte (config, tokenizer, chat template, ...) and the
//! quantized model under its own file name, its weights in `<model>.onnx.data` as the
//! onnxruntime-genai model builder writes them.
//!
//! `genai_config.json` describes the model's inputs and outputs; quantizing changes neither (checked
//! on the written model), so it is copied unchanged. The folder is built in a temporary folder next
//! to the output and renamed into place: an error or Ctrl-C leaves nothing behind, and the input
//! folder is only read.

use crate::error::{Error, Result};
use crate::graph::model::{ExternalData, Model};
use crate::pipeline::{quantize_file, Options, Summary};
use std::collections::HashSet;
use std::path::{Component, Path, PathBuf};
use std::time::Instant;

/// onnxruntime-genai's configuration file.
pub const GENAI_CONFIG: &str = "genai_config.json";
/// The Hugging Face configuration an Optimum export keeps beside its `.onnx` files.
pub const OPTIMUM_CONFIG: &str = "config.json";

/// Which tool wrote the folder.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Layout {
    /// onnxruntime-genai's model builder (`genai_config.json`).
    Genai,
    /// An Optimum export (`config.json` and `.onnx` files).
    Optimum,
}

impl Layout {
    /// The name users know the layout by.
    pub fn name(self) -> &'static str {
        match self {
            Layout::Genai => "onnxruntime-genai",
            Layout::Optimum => "Optimum",
        }
    }
}

/// A model folder: which of its `.onnx` files are quantized.
#[derive(Clone, Debug)]
pub struct ModelFolder {
    /// The folder.
    pub dir: PathBuf,
    /// Who wrote it.
    pub layout: Layout,
    /// The decoder model file(s) to quantize, relative to `dir`.
    pub models: Vec<PathBuf>,
    /// Every other `.onnx` file, relative to `dir`: copied unquantized.
    pub other_models: Vec<PathBuf>,
}

/// What [`quantize_folder`] did.
#[derive(Clone, Debug)]
pub struct FolderSummary {
    /// The input folder's layout.
    pub layout: Layout,
    /// Each quantized model (relative path) with its summary.
    pub models: Vec<(PathBuf, Summary)>,
    /// Files copied byte for byte (relative paths).
    pub copied: Vec<PathBuf>,
    /// `.onnx` files copied unquantized (relative paths).
    pub left_float: Vec<PathBuf>,
    /// Wall time, seconds.
    pub seconds: f64,
}

fn folder_err(path: &Path, why: impl Into<String>) -> Error {
    Error::Folder { path: path.to_path_buf(), why: why.into() }
}

/// Every `.onnx` file under `dir` (relative paths, sorted).
fn onnx_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut found = Vec::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let here = dir.join(&rel);
        let entries = std::fs::read_dir(&here).map_err(|cause| Error::Read { path: here.clone(), cause })?;
        for entry in entries {
            let entry = entry.map_err(|cause| Error::Read { path: here.clone(), cause })?;
            let path = rel.join(entry.file_name());
            if dir.join(&path).is_dir() {
                stack.push(path);
            } else if path.extension().is_some_and(|e| e.eq_ignore_ascii_case("onnx")) {
                found.push(path);
            }
        }
    }
    found.sort();
    Ok(found)
}

/// The decoder file `genai_config.json` names (`model.decoder.filename`), checked to be a relative
/// path inside the folder that exists.
fn genai_model(dir: &Path) -> Result<PathBuf> {
    let config = dir.join(GENAI_CONFIG);
    let text = std::fs::read_to_string(&config).map_err(|cause| Error::Read { path: config.clone(), cause })?;
    let json: serde_json::Value = serde_json::from_str(&text).map_err(|e| {
        folder_err(&config, format!("is not valid JSON ({e}); fix it or write the folder again with the model builder"))
    })?;
    let name = json.pointer("/model/decoder/filename").and_then(|v| v.as_str()).ok_or_else(|| {
        folder_err(&config, "has no string model.decoder.filename naming the decoder's .onnx file; add it (e.g. \"filename\": \"model.onnx\")")
    })?;
    let rel = PathBuf::from(name);
    if name.is_empty() || !rel.components().all(|c| matches!(c, Component::Normal(_))) {
        return Err(folder_err(
            &config,
            format!("model.decoder.filename '{name}' is not a file name inside the folder; name the .onnx file beside genai_config.json"),
        ));
    }
    if !dir.join(&rel).is_file() {
        return Err(folder_err(
            &config,
            format!("model.decoder.filename names '{name}', which is not in {}; copy the model file there or correct the name", dir.display()),
        ));
    }
    Ok(rel)
}

/// The decoder(s) of an Optimum export: `decoder_model_merged.onnx`, else `model.onnx`, else every
/// `decoder*.onnx` (e.g. `decoder_model.onnx` and `decoder_with_past_model.onnx`), else the only
/// `.onnx` file.
fn optimum_models(dir: &Path, onnx: &[PathBuf]) -> Result<Vec<PathBuf>> {
    for name in ["decoder_model_merged.onnx", "model.onnx"] {
        if let Some(p) = onnx.iter().find(|p| p.as_os_str() == name) {
            return Ok(vec![p.clone()]);
        }
    }
    let top: Vec<&PathBuf> = onnx.iter().filter(|p| p.components().count() == 1).collect();
    let decoders: Vec<PathBuf> =
        top.iter().filter(|p| p.to_string_lossy().starts_with("decoder")).map(|p| (*p).clone()).collect();
    if !decoders.is_empty() {
        return Ok(decoders);
    }
    match top.as_slice() {
        [one] => Ok(vec![(*one).clone()]),
        [] => Err(folder_err(
            dir,
            "has config.json but no .onnx file; export the model to ONNX first (optimum-cli export onnx ...)",
        )),
        many => Err(folder_err(
            dir,
            format!(
                "has several .onnx files ({}) and none is a decoder (decoder_model_merged.onnx, model.onnx, decoder*.onnx); quantize one by its path: nibble quantize {} -o OUT.onnx",
                many.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", "),
                dir.join(many[0]).display()
            ),
        )),
    }
}

/// Reads a model folder's layout and chooses the model(s) to quantize.
///
/// Errors ([`Error::Folder`]): not a folder; neither `genai_config.json` nor `config.json`;
/// `genai_config.json` unreadable, without `model.decoder.filename`, or naming a missing file; an
/// Optimum folder without `.onnx` files or with several and no decoder among them.
pub fn detect(dir: &Path) -> Result<ModelFolder> {
    if !dir.is_dir() {
        return Err(folder_err(dir, "is not a folder"));
    }
    let onnx = onnx_files(dir)?;
    let (layout, models) = if dir.join(GENAI_CONFIG).is_file() {
        (Layout::Genai, vec![genai_model(dir)?])
    } else if dir.join(OPTIMUM_CONFIG).is_file() {
        (Layout::Optimum, optimum_models(dir, &onnx)?)
    } else {
        let hint = match onnx.first() {
            Some(first) => {
                format!("; to quantize one model file give its path: nibble quantize {}", dir.join(first).display())
            }
            None => " and no .onnx file".to_string(),
        };
        return Err(folder_err(
            dir,
            format!("has neither genai_config.json (onnxruntime-genai) nor config.json (an Optimum export){hint}"),
        ));
    };
    let other_models = onnx.into_iter().filter(|p| !models.contains(p)).collect();
    Ok(ModelFolder { dir: dir.to_path_buf(), layout, models, other_models })
}

/// The model file of `path`: `path` itself when it is a file, else the one decoder of the model
/// folder `path` (an error when it has several: name one by its path).
pub fn model_file(path: &Path) -> Result<PathBuf> {
    if !path.is_dir() {
        return Ok(path.to_path_buf());
    }
    let folder = detect(path)?;
    match folder.models.as_slice() {
        [one] => Ok(path.join(one)),
        many => Err(folder_err(
            path,
            format!(
                "has several decoders ({}); give the one to use by its path",
                many.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ")
            ),
        )),
    }
}

/// The folder the CLI writes when no `-o` is given: `IN_int4` next to `IN`.
pub fn default_output(input: &Path) -> PathBuf {
    let name = input.file_name().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| "model".into());
    input.with_file_name(format!("{name}_int4"))
}

/// Refuses an output folder that is the input, inside it (the input is never modified), holds it
/// (`--force` would delete it), is a file, or exists without `force`.
fn check_output_dir(input: &Path, output: &Path, force: bool) -> Result<()> {
    let err = |why: &str| Error::Output { path: output.to_path_buf(), why: why.into() };
    let input_real = input.canonicalize().map_err(|cause| Error::Read { path: input.to_path_buf(), cause })?;
    let parent = match output.parent().filter(|p| !p.as_os_str().is_empty()) {
        Some(p) => p.to_path_buf(),
        None => PathBuf::from("."),
    };
    let parent_real = parent.canonicalize().map_err(|_| Error::Output {
        path: output.to_path_buf(),
        why: format!("folder {} does not exist", parent.display()),
    })?;
    let out_real = parent_real.join(output.file_name().ok_or_else(|| err("is not a folder name"))?);
    if out_real == input_real {
        return Err(err("is the input folder; write the quantized folder to another path"));
    }
    if out_real.starts_with(&input_real) {
        return Err(err("is inside the input folder, which nibble never modifies; choose a folder outside it"));
    }
    if output.exists() {
        if input_real.starts_with(out_real.canonicalize().unwrap_or(out_real)) {
            return Err(err("holds the input folder; choose another output folder"));
        }
        if !output.is_dir() {
            return Err(err("is a file; a folder input is written to a folder"));
        }
        if !force {
            return Err(err("already exists; pass --force to replace it"));
        }
    }
    Ok(())
}

/// Copies `src` into `dst` recursively, skipping the files in `skip` (canonical paths), and
/// records each copied file's path relative to the root.
fn copy_tree(root: &Path, rel: &Path, dst: &Path, skip: &HashSet<PathBuf>, copied: &mut Vec<PathBuf>) -> Result<()> {
    let here = root.join(rel);
    let entries = std::fs::read_dir(&here).map_err(|cause| Error::Read { path: here.clone(), cause })?;
    let mut names: Vec<_> = entries
        .map(|e| e.map(|e| e.file_name()))
        .collect::<std::io::Result<_>>()
        .map_err(|cause| Error::Read { path: here.clone(), cause })?;
    names.sort();
    for name in names {
        let path = rel.join(&name);
        let from = root.join(&path);
        let to = dst.join(&path);
        if from.canonicalize().is_ok_and(|real| skip.contains(&real)) {
            continue;
        }
        if from.is_dir() {
            std::fs::create_dir(&to).map_err(|cause| Error::Write { path: to.clone(), cause })?;
            copy_tree(root, &path, dst, skip, copied)?;
        } else {
            std::fs::copy(&from, &to).map_err(|cause| Error::Write { path: to.clone(), cause })?;
            copied.push(path);
        }
    }
    Ok(())
}

/// The names of a graph's inputs and outputs.
fn io_names(model: &Model) -> (Vec<String>, Vec<String>) {
    let g = model.proto.graph.as_ref().expect("checked at load");
    let names =
        |v: &[crate::graph::onnx::ValueInfoProto]| v.iter().map(|i| i.name.clone().unwrap_or_default()).collect();
    (names(&g.input), names(&g.output))
}

/// Quantizes the decoder(s) of the model folder `input` into the folder `output` (see the module
/// documentation). `opts` are those of [`quantize_file`]; `external_data` and its file name are set
/// here (always external, `<model>.onnx.data`). The output folder appears complete or not at all;
/// with `opts.force` an existing one is replaced.
pub fn quantize_folder(input: &Path, output: &Path, opts: &Options) -> Result<FolderSummary> {
    let start = Instant::now();
    let folder = detect(input)?;
    check_output_dir(input, output, opts.force)?;
    // The quantized models and their data files are written anew; external data that an
    // unquantized model also reads is copied.
    let mut skip = HashSet::new();
    for m in &folder.models {
        let path = input.join(m);
        let model = Model::load(&path)?;
        skip.extend(std::iter::once(path).chain(model.external_files()).filter_map(|p| p.canonicalize().ok()));
    }
    for m in &folder.other_models {
        if let Ok(model) = Model::load(&input.join(m)) {
            for p in model.external_files().iter().filter_map(|p| p.canonicalize().ok()) {
                skip.remove(&p);
            }
        }
    }
    let parent = output.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let prefix = format!(".{}.nibble-tmp-", output.file_name().unwrap_or_default().to_string_lossy());
    let tmp = tempfile::Builder::new()
        .prefix(&prefix)
        .tempdir_in(parent)
        .map_err(|cause| Error::Write { path: parent.to_path_buf(), cause })?;
    crate::cleanup::register(tmp.path());
    let result = build(&folder, tmp.path(), &skip, opts);
    let (models, copied) = match result {
        Ok(done) => done,
        Err(e) => {
            crate::cleanup::unregister(tmp.path());
            return Err(e);
        }
    };
    let built = tmp.keep();
    let committed = commit(&built, output);
    crate::cleanup::unregister(&built);
    if committed.is_err() {
        let _ = std::fs::remove_dir_all(&built);
    }
    committed?;
    Ok(FolderSummary {
        layout: folder.layout,
        models,
        copied,
        left_float: folder.other_models,
        seconds: start.elapsed().as_secs_f64(),
    })
}

type Built = (Vec<(PathBuf, Summary)>, Vec<PathBuf>);

/// Fills the temporary folder `tmp`: the copied files, then each quantized model, checked to keep
/// its inputs and outputs (so that `genai_config.json` still describes it).
fn build(folder: &ModelFolder, tmp: &Path, skip: &HashSet<PathBuf>, opts: &Options) -> Result<Built> {
    let mut copied = Vec::new();
    copy_tree(&folder.dir, Path::new(""), tmp, skip, &mut copied)?;
    let mut models = Vec::new();
    for m in &folder.models {
        let (from, to) = (folder.dir.join(m), tmp.join(m));
        let mut data_name = m.file_name().expect("a file").to_os_string();
        data_name.push(".data");
        let model_opts = Options {
            external_data: ExternalData::Always,
            external_data_name: Some(data_name.to_string_lossy().into_owned()),
            force: false,
            ..opts.clone()
        };
        let summary = quantize_file(&from, &to, &model_opts)?;
        if io_names(&Model::load(&from)?) != io_names(&Model::load(&to)?) {
            return Err(folder_err(
                &from,
                "the quantized model's inputs or outputs differ from the input's, so the folder's configuration would not describe it (a bug in nibble: please report it)",
            ));
        }
        models.push((m.clone(), summary));
    }
    Ok((models, copied))
}

/// Renames the built folder to `output`, replacing an existing one (moved aside first and put back
/// if the rename fails).
fn commit(built: &Path, output: &Path) -> Result<()> {
    let write_err = |cause| Error::Write { path: output.to_path_buf(), cause };
    if !output.exists() {
        return std::fs::rename(built, output).map_err(write_err);
    }
    let mut old_name = std::ffi::OsString::from(".");
    old_name.push(output.file_name().unwrap_or_default());
    old_name.push(format!(".nibble-old-{}", std::process::id()));
    let old = output.with_file_name(old_name);
    std::fs::rename(output, &old).map_err(write_err)?;
    if let Err(cause) = std::fs::rename(built, output) {
        let _ = std::fs::rename(&old, output);
        return Err(write_err(cause));
    }
    let _ = std::fs::remove_dir_all(&old);
    Ok(())
}
