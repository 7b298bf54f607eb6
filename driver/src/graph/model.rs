//! Loading and saving ONNX models.
//!
//! Loading maps the `.onnx` file and decodes it with prost straight from the mapping
//! (`Bytes::from_owner`), so `raw_data` fields point into the file; external data files are mapped
//! too, and every external reference is checked (relative location inside the model's folder, no
//! `..`, offset + length inside the file, length equal to the tensor's size) before any byte is read.
//!
//! Saving writes `OUT.onnx` (and `OUT.onnx_data` when external data is used) to temporary files in
//! the output folder and renames them into place, so an error or an interruption never leaves a
//! partial model behind (with `sync`, `--fsync`, the files are also flushed to disk before the
//! rename, for a machine crash). The input is only ever read.

use crate::error::{Error, Result};
use crate::graph::onnx::{tensor_proto::DataLocation, tensor_proto::DataType, ModelProto, TensorProto};
use bytes::Bytes;
use prost::Message;
use std::collections::HashMap;
use std::path::{Component, Path, PathBuf};

use crate::graph::output::TempFile;
pub use crate::graph::output::{external_data_path, ExternalData, PROTOBUF_LIMIT};

/// A loaded model and the folder its external data is resolved against.
pub struct Model {
    /// The decoded model (raw data borrowed from the mapped file).
    pub proto: ModelProto,
    /// Where it was read from.
    pub path: PathBuf,
    dir: PathBuf,
    /// Decoded from memory: external data cannot be resolved.
    in_memory: bool,
    /// Mapped external data files, by canonical path.
    external: std::sync::Mutex<HashMap<PathBuf, Bytes>>,
}

/// ONNX's name for a data type number.
pub fn dtype_name(dtype: i32) -> String {
    DataType::try_from(dtype).map_or_else(|_| format!("type {dtype}"), |d| d.as_str_name().to_string())
}

/// Bytes per element for fixed-size types (`None` for strings, 4-bit types, unknown).
pub fn dtype_size(dtype: i32) -> Option<usize> {
    use DataType::*;
    Some(match DataType::try_from(dtype).ok()? {
        Float | Int32 | Uint32 => 4,
        Uint8 | Int8 | Bool | Float8e4m3fn | Float8e4m3fnuz | Float8e5m2 | Float8e5m2fnuz | Float8e8m0 => 1,
        Uint16 | Int16 | Float16 | Bfloat16 => 2,
        Int64 | Double | Uint64 | Complex64 => 8,
        Complex128 => 16,
        _ => return None,
    })
}

/// Number of elements of a tensor, checked against overflow and negative dims.
pub fn element_count(t: &TensorProto) -> Option<usize> {
    t.dims.iter().try_fold(1usize, |acc, &d| usize::try_from(d).ok().and_then(|d| acc.checked_mul(d)))
}

/// The byte size of a tensor's data.
pub fn byte_size(t: &TensorProto) -> Option<usize> {
    let n = element_count(t)?;
    let dtype = t.data_type.unwrap_or(0);
    if dtype == DataType::Int4 as i32 || dtype == DataType::Uint4 as i32 {
        return Some(n.div_ceil(2));
    }
    n.checked_mul(dtype_size(dtype)?)
}

impl Model {
    /// Maps and decodes `path`.
    pub fn load(path: &Path) -> Result<Model> {
        let read_err = |source| Error::Read { path: path.to_path_buf(), cause: source };
        if path.is_dir() {
            return Err(read_err(std::io::Error::other("is a directory, not an .onnx file")));
        }
        let file = std::fs::File::open(path).map_err(read_err)?;
        let bytes = crate::graph::mapped::map_file(file).map_err(read_err)?;
        let proto =
            ModelProto::decode(bytes).map_err(|e| Error::Parse { path: path.to_path_buf(), why: e.to_string() })?;
        if proto.graph.is_none() {
            return Err(Error::Parse { path: path.to_path_buf(), why: "it has no graph".into() });
        }
        let dir = path.parent().map(Path::to_path_buf).unwrap_or_default();
        let dir = if dir.as_os_str().is_empty() { PathBuf::from(".") } else { dir };
        Ok(Model { proto, path: path.to_path_buf(), dir, in_memory: false, external: Default::default() })
    }

    /// Decodes a model from bytes (no external data can be resolved: its folder is `.`). For fuzzing
    /// and for models held in memory.
    pub fn from_bytes(bytes: Bytes) -> Result<Model> {
        let path = PathBuf::from("<memory>");
        let proto = ModelProto::decode(bytes).map_err(|e| Error::Parse { path: path.clone(), why: e.to_string() })?;
        if proto.graph.is_none() {
            return Err(Error::Parse { path, why: "it has no graph".into() });
        }
        Ok(Model { proto, path, dir: PathBuf::from("."), in_memory: true, external: Default::default() })
    }

    /// A second handle on the same model for reading while the graph is being rewritten: the graph
    /// is cloned, the tensor bytes are shared (borrowed from the same mapped files: no copy of the
    /// data).
    pub fn reader(&self) -> Model {
        let external = self.external.lock().unwrap_or_else(|e| e.into_inner()).clone();
        Model {
            proto: self.proto.clone(),
            path: self.path.clone(),
            dir: self.dir.clone(),
            in_memory: self.in_memory,
            external: std::sync::Mutex::new(external),
        }
    }

    /// The folder external data locations are relative to.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Whether any top-level initializer keeps its data in an external file.
    pub fn has_external_data(&self) -> bool {
        self.proto
            .graph
            .as_ref()
            .is_some_and(|g| g.initializer.iter().any(|t| t.data_location == Some(DataLocation::External as i32)))
    }

    /// Canonical paths of the external data files the model refers to (for output checks).
    pub fn external_files(&self) -> Vec<PathBuf> {
        let mut files = Vec::new();
        if let Some(g) = &self.proto.graph {
            for t in &g.initializer {
                if let Some(loc) = external_entry(t, "location") {
                    if let Ok(p) = self.dir.join(loc).canonicalize() {
                        if !files.contains(&p) {
                            files.push(p);
                        }
                    }
                }
            }
        }
        files
    }

    /// Bytes on disk of the model file and the external data files it refers to (0 for a model
    /// built in memory).
    pub fn bytes_on_disk(&self) -> u64 {
        let size = |p: &Path| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0);
        match self.in_memory {
            true => 0,
            false => size(&self.path) + self.external_files().iter().map(|p| size(p)).sum::<u64>(),
        }
    }

    /// The little-endian bytes of a tensor, from `raw_data`, the typed fields, or external data,
    /// checked against the size its dims and type declare.
    pub fn tensor_bytes(&self, t: &TensorProto) -> Result<Bytes> {
        let name = t.name.clone().unwrap_or_default();
        let bad = |why: String| Error::BadTensor { tensor: name.clone(), why };
        let expected = byte_size(t).ok_or_else(|| {
            bad(format!("dims {:?} of type {} have no fixed byte size", t.dims, dtype_name(t.data_type.unwrap_or(0))))
        })?;
        if t.data_location == Some(DataLocation::External as i32) {
            return self.external_bytes(t, expected);
        }
        if let Some(raw) = &t.raw_data {
            if raw.len() != expected {
                return Err(bad(format!("raw_data has {} bytes, dims {:?} need {expected}", raw.len(), t.dims)));
            }
            return Ok(raw.clone());
        }
        let dtype = DataType::try_from(t.data_type.unwrap_or(0)).ok();
        let n = element_count(t).unwrap_or(0);
        let out: Vec<u8> = match dtype {
            Some(DataType::Float) if t.float_data.len() == n => {
                t.float_data.iter().flat_map(|v| v.to_le_bytes()).collect()
            }
            Some(DataType::Double) if t.double_data.len() == n => {
                t.double_data.iter().flat_map(|v| v.to_le_bytes()).collect()
            }
            Some(DataType::Int64) if t.int64_data.len() == n => {
                t.int64_data.iter().flat_map(|v| v.to_le_bytes()).collect()
            }
            Some(DataType::Float16 | DataType::Bfloat16 | DataType::Uint16 | DataType::Int16)
                if t.int32_data.len() == n =>
            {
                t.int32_data.iter().flat_map(|&v| (v as u16).to_le_bytes()).collect()
            }
            Some(DataType::Int32) if t.int32_data.len() == n => {
                t.int32_data.iter().flat_map(|v| v.to_le_bytes()).collect()
            }
            Some(DataType::Int8 | DataType::Uint8 | DataType::Bool) if t.int32_data.len() == n => {
                t.int32_data.iter().map(|&v| v as u8).collect()
            }
            _ if n == 0 => Vec::new(),
            _ => {
                return Err(bad(format!(
                    "holds no data matching dims {:?} and type {}",
                    t.dims,
                    dtype_name(t.data_type.unwrap_or(0))
                )))
            }
        };
        Ok(Bytes::from(out))
    }

    fn external_bytes(&self, t: &TensorProto, expected: usize) -> Result<Bytes> {
        let name = t.name.clone().unwrap_or_default();
        let err = |why: String| Error::ExternalData { tensor: name.clone(), why };
        if self.in_memory {
            return Err(err("cannot be read for a model held in memory".into()));
        }
        let location = external_entry(t, "location").ok_or_else(|| err("has no 'location' entry".into()))?;
        let rel = Path::new(location);
        if rel.is_absolute() || rel.components().any(|c| !matches!(c, Component::Normal(_) | Component::CurDir)) {
            return Err(err(format!(
                "location '{location}' must be a plain relative path inside the model's folder (no '..', not absolute)"
            )));
        }
        let dir = self.dir.canonicalize().map_err(|e| err(format!("model folder {}: {e}", self.dir.display())))?;
        let path = dir.join(rel);
        let real = path.canonicalize().map_err(|e| err(format!("file '{location}' next to the model: {e}")))?;
        if !real.starts_with(&dir) {
            return Err(err(format!(
                "location '{location}' resolves to {} outside the model's folder",
                real.display()
            )));
        }
        let parse = |key: &str| -> Result<Option<usize>> {
            external_entry(t, key)
                .map(|v| v.parse::<usize>().map_err(|_| err(format!("{key} '{v}' is not a number"))))
                .transpose()
        };
        let offset = parse("offset")?.unwrap_or(0);
        let length = parse("length")?;
        let file = self.map_external(&real).map_err(|e| err(format!("file '{location}': {e}")))?;
        let length = length.unwrap_or(file.len().saturating_sub(offset));
        if length != expected {
            return Err(err(format!("length {length} does not match the {expected} bytes of dims {:?}", t.dims)));
        }
        let end = offset.checked_add(length).filter(|&e| e <= file.len()).ok_or_else(|| {
            err(format!("range {offset}..{} lies past the end of '{location}' ({} bytes): the file is truncated or the offset is wrong", offset as u128 + length as u128, file.len()))
        })?;
        Ok(file.slice(offset..end))
    }

    fn map_external(&self, real: &Path) -> std::io::Result<Bytes> {
        let mut cache = self.external.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(b) = cache.get(real) {
            return Ok(b.clone());
        }
        let bytes = crate::graph::mapped::map_file(std::fs::File::open(real)?)?;
        cache.insert(real.to_path_buf(), bytes.clone());
        Ok(bytes)
    }

    /// A copy of the model whose top-level initializers all hold their data inline (borrowed from
    /// the mapped files, no copy of the bytes).
    pub fn inlined_proto(&self) -> Result<ModelProto> {
        let mut proto = self.proto.clone();
        if let Some(g) = proto.graph.as_mut() {
            for t in g.initializer.iter_mut() {
                if t.data_location == Some(DataLocation::External as i32) {
                    t.raw_data = Some(self.tensor_bytes(t)?);
                    t.external_data.clear();
                    t.data_location = None;
                }
            }
        }
        Ok(proto)
    }

    /// Replaces every external reference in the top-level initializers by `raw_data` borrowed from
    /// the mapped files, so the model no longer depends on the input's folder.
    pub fn inline_external_data(&mut self) -> Result<()> {
        let mut graph = self.proto.graph.take().expect("checked at load");
        let result = graph.initializer.iter_mut().try_for_each(|t| {
            if t.data_location == Some(DataLocation::External as i32) {
                let bytes = self.tensor_bytes(t)?;
                t.raw_data = Some(bytes);
                t.external_data.clear();
                t.data_location = None;
            }
            Ok(())
        });
        self.proto.graph = Some(graph);
        result
    }
}

fn external_entry<'a>(t: &'a TensorProto, key: &str) -> Option<&'a str> {
    t.external_data.iter().find(|e| e.key.as_deref() == Some(key)).and_then(|e| e.value.as_deref())
}

/// Writes `proto` to `out` atomically; with external data, large initializers go to
/// `OUT.onnx_data`. Every tensor must hold its data inline (see [`Model::inline_external_data`]).
/// Returns the total bytes written.
pub fn save(proto: ModelProto, out: &Path, mode: ExternalData) -> Result<u64> {
    save_with(proto, out, mode, false)
}

/// Writes `bytes` to `out` through a temporary file next to it, renamed into place (removed on
/// error or Ctrl-C): a chart or report is never left half-written.
///
/// # Errors
/// [`Error::Write`] naming the temporary or final path when it cannot be written.
pub fn write_atomic(out: &Path, bytes: &[u8]) -> Result<()> {
    let mut tmp = TempFile::create(out)?;
    tmp.write_all(bytes)?;
    tmp.finish(false)?;
    tmp.commit(out)
}

/// [`save`], and with `sync` each file is flushed to disk (fsync) before it is renamed into place,
/// so that the output also survives a power loss (the rename alone protects against errors and
/// interruptions, not against a crash of the machine).
pub fn save_with(proto: ModelProto, out: &Path, mode: ExternalData, sync: bool) -> Result<u64> {
    save_with_data(proto, out, &external_data_path(out), mode, sync)
}

/// [`save_with`] with the external data written to `data_path` (a file in `out`'s folder), e.g.
/// `model.onnx.data` as onnxruntime-genai's model builder names it.
pub fn save_with_data(proto: ModelProto, out: &Path, data_path: &Path, mode: ExternalData, sync: bool) -> Result<u64> {
    let sink = crate::graph::stream::DataSink::create(data_path)?;
    crate::graph::stream::finish(proto, sink, out, data_path, mode, sync)
}
