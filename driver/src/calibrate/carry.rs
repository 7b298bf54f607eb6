//! The tensors carried between calibration steps ([`crate::calibrate::sequential`], and so
//! calibration by segments): per calibration sample, the tensors earlier steps produced that nodes
//! still to run read (the residual stream, masks, positions, rotary caches).
//!
//! They are held in memory up to a limit in bytes over all samples (`--carry-memory-mb`); a tensor
//! that would pass the limit is written instead to a temporary file in the calibration's temporary
//! folder and read back through a read-only memory map when a later step feeds it. Each step that
//! spills writes a file of its own, removed as soon as none of its tensors is carried any more, and
//! when the [`Carried`] is dropped; the folder itself is removed at the end, on an error and on
//! Ctrl-C ([`crate::cleanup`]). A tensor comes back with its exact bytes (little-endian, as held), so
//! spilling never changes a calibration's results.

use crate::calibrate::runtime::{Input, InputData};
use crate::error::{Error, Result};
use crate::graph::onnx::tensor_proto::DataType;
use bytes::Bytes;
use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};

/// Element type of a spilled tensor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    F32,
    F16,
    I64,
    I32,
    Bool,
}

/// Where one carried tensor is.
enum Slot {
    /// In memory.
    Held(Input),
    /// In spill file `file`, bytes `offset..offset + len`.
    Spilled { file: usize, offset: usize, len: usize, shape: Vec<usize>, kind: Kind },
}

/// One spill file: written by one step, then only read.
struct SpillFile {
    path: PathBuf,
    /// Open for writing until first read.
    writer: Option<std::io::BufWriter<std::fs::File>>,
    /// The read-only mapping, once written.
    map: Option<Bytes>,
    len: usize,
    /// Carried tensors still in the file.
    live: usize,
}

/// The carried tensors of every calibration sample.
pub struct Carried {
    samples: Vec<HashMap<String, Slot>>,
    /// Bytes held in memory at most (all samples).
    limit: u64,
    /// Bytes held in memory now.
    held: u64,
    dir: PathBuf,
    files: Vec<Option<SpillFile>>,
    /// The spill file being written (by the current step).
    writing: Option<usize>,
    /// Bytes spilled so far.
    written: u64,
}

/// Bytes of a tensor's values.
fn byte_len(data: &InputData) -> usize {
    match data {
        InputData::F32(v) => 4 * v.len(),
        InputData::I64(v) => 8 * v.len(),
        InputData::I32(v) => 4 * v.len(),
        InputData::F16(v) => 2 * v.len(),
        InputData::Bool(v) => v.len(),
    }
}

/// `bytes` (any alignment) as values of `T`.
fn values<T: bytemuck::Pod>(bytes: &[u8]) -> Vec<T> {
    let mut v = vec![T::zeroed(); bytes.len() / std::mem::size_of::<T>()];
    bytemuck::cast_slice_mut::<T, u8>(&mut v).copy_from_slice(bytes);
    v
}

impl Carried {
    /// Nothing carried for `samples` samples; tensors past `limit` bytes held in memory are spilled
    /// to files in `dir` (a temporary folder removed on Ctrl-C).
    pub fn new(samples: usize, limit: u64, dir: &Path) -> Carried {
        Carried {
            samples: (0..samples).map(|_| HashMap::new()).collect(),
            limit,
            held: 0,
            dir: dir.to_path_buf(),
            files: vec![],
            writing: None,
            written: 0,
        }
    }

    /// Number of samples.
    pub fn samples(&self) -> usize {
        self.samples.len()
    }

    /// Whether sample `sample` carries `name`.
    pub fn contains(&self, sample: usize, name: &str) -> bool {
        self.samples[sample].contains_key(name)
    }

    /// The names sample `sample` carries.
    pub fn names(&self, sample: usize) -> impl Iterator<Item = &String> {
        self.samples[sample].keys()
    }

    /// The ONNX element type and the rank of `name` as sample `sample` carries it.
    pub fn element(&self, sample: usize, name: &str) -> Option<(DataType, usize)> {
        Some(match self.samples[sample].get(name)? {
            Slot::Held(t) => (
                match t.data {
                    InputData::F32(_) => DataType::Float,
                    InputData::F16(_) => DataType::Float16,
                    InputData::I64(_) => DataType::Int64,
                    InputData::I32(_) => DataType::Int32,
                    InputData::Bool(_) => DataType::Bool,
                },
                t.shape.len(),
            ),
            Slot::Spilled { kind, shape, .. } => (
                match kind {
                    Kind::F32 => DataType::Float,
                    Kind::F16 => DataType::Float16,
                    Kind::I64 => DataType::Int64,
                    Kind::I32 => DataType::Int32,
                    Kind::Bool => DataType::Bool,
                },
                shape.len(),
            ),
        })
    }

    /// Bytes held in memory now (all samples).
    pub fn held_bytes(&self) -> u64 {
        self.held
    }

    /// Bytes spilled to files so far.
    pub fn spilled_bytes(&self) -> u64 {
        self.written
    }

    /// Number of tensors in spill files now (all samples).
    pub fn spilled(&self) -> usize {
        self.files.iter().flatten().map(|f| f.live).sum()
    }

    /// Carries `t` for sample `sample` (replacing a tensor of the same name): in memory while the
    /// limit allows, else appended to this step's spill file.
    ///
    /// # Errors
    /// [`Error::Write`] naming the spill file when it cannot be created or written (a full disk).
    pub fn insert(&mut self, sample: usize, t: Input) -> Result<()> {
        self.remove(sample, &t.name);
        let len = byte_len(&t.data);
        if self.held + len as u64 <= self.limit {
            self.held += len as u64;
            self.samples[sample].insert(t.name.clone(), Slot::Held(t));
            return Ok(());
        }
        let file = match self.writing {
            Some(f) => f,
            None => {
                let path = self.dir.join(format!("carried_{}.bin", self.files.len()));
                let w = std::fs::File::create(&path)
                    .map_err(|source| Error::Write { path: path.clone(), cause: source })?;
                self.files.push(Some(SpillFile {
                    path,
                    writer: Some(std::io::BufWriter::new(w)),
                    map: None,
                    len: 0,
                    live: 0,
                }));
                self.writing = Some(self.files.len() - 1);
                self.files.len() - 1
            }
        };
        let f = self.files[file].as_mut().expect("file being written");
        let w = f.writer.as_mut().expect("open for writing");
        let (kind, written) = match &t.data {
            InputData::F32(v) => (Kind::F32, w.write_all(bytemuck::cast_slice(v))),
            InputData::F16(v) => (Kind::F16, w.write_all(bytemuck::cast_slice(v))),
            InputData::I64(v) => (Kind::I64, w.write_all(bytemuck::cast_slice(v))),
            InputData::I32(v) => (Kind::I32, w.write_all(bytemuck::cast_slice(v))),
            InputData::Bool(v) => (Kind::Bool, w.write_all(&v.iter().map(|&b| b as u8).collect::<Vec<u8>>())),
        };
        written.map_err(|source| Error::Write { path: f.path.clone(), cause: source })?;
        let slot = Slot::Spilled { file, offset: f.len, len, shape: t.shape, kind };
        f.len += len;
        f.live += 1;
        self.written += len as u64;
        self.samples[sample].insert(t.name, slot);
        Ok(())
    }

    /// A copy of the tensor `name` sample `sample` carries (read back from its spill file if it
    /// was spilled).
    ///
    /// # Errors
    /// [`Error::Write`]/[`Error::Read`] naming the spill file when it cannot be flushed or mapped.
    pub fn get(&mut self, sample: usize, name: &str) -> Result<Option<Input>> {
        let (file, offset, len, shape, kind) = match self.samples[sample].get(name) {
            None => return Ok(None),
            Some(Slot::Held(t)) => return Ok(Some(t.clone())),
            Some(Slot::Spilled { file, offset, len, shape, kind }) => (*file, *offset, *len, shape.clone(), *kind),
        };
        let f = self.files[file].as_mut().expect("a live spill file");
        if let Some(mut w) = f.writer.take() {
            // The step that wrote this file is over: nothing more is appended to it.
            w.flush().map_err(|source| Error::Write { path: f.path.clone(), cause: source })?;
            self.writing = self.writing.filter(|&w| w != file);
        }
        if f.map.is_none() {
            f.map = Some(crate::graph::stream::map_appended(&f.path)?);
        }
        let bytes = &f.map.as_ref().expect("mapped")[offset..offset + len];
        let data = match kind {
            Kind::F32 => InputData::F32(values(bytes)),
            Kind::F16 => InputData::F16(values(bytes)),
            Kind::I64 => InputData::I64(values(bytes)),
            Kind::I32 => InputData::I32(values(bytes)),
            Kind::Bool => InputData::Bool(bytes.iter().map(|&b| b != 0).collect()),
        };
        Ok(Some(Input { name: name.to_string(), shape, data }))
    }

    /// Ends the current step: the tensors spilled from now on go to a new file.
    pub fn end_step(&mut self) {
        self.writing = None;
    }

    /// Keeps only the tensors whose name passes `keep`; a spill file none of whose tensors is kept
    /// is removed.
    pub fn retain(&mut self, keep: impl Fn(&str) -> bool) {
        for s in 0..self.samples.len() {
            let gone: Vec<String> = self.samples[s].keys().filter(|k| !keep(k)).cloned().collect();
            for name in gone {
                self.remove(s, &name);
            }
        }
    }

    /// Drops `name` from sample `sample`.
    fn remove(&mut self, sample: usize, name: &str) {
        match self.samples[sample].remove(name) {
            Some(Slot::Held(t)) => self.held -= byte_len(&t.data) as u64,
            Some(Slot::Spilled { file, .. }) => {
                let f = self.files[file].as_mut().expect("a live spill file");
                f.live -= 1;
                if f.live == 0 && self.writing != Some(file) {
                    let f = self.files[file].take().expect("a live spill file");
                    drop(f.map);
                    drop(f.writer);
                    let _ = std::fs::remove_file(&f.path);
                }
            }
            None => {}
        }
    }
}

impl Drop for Carried {
    fn drop(&mut self) {
        for f in self.files.drain(..).flatten() {
            drop(f.writer);
            let _ = std::fs::remove_file(&f.path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tensors() -> Vec<Input> {
        vec![
            Input { name: "h".into(), shape: vec![1, 3], data: InputData::F32(vec![1.5, -0.0, f32::MIN_POSITIVE]) },
            Input {
                name: "h16".into(),
                shape: vec![2],
                data: InputData::F16(vec![half::f16::from_f32(0.1), half::f16::NEG_INFINITY]),
            },
            Input { name: "pos".into(), shape: vec![3], data: InputData::I64(vec![0, -1, i64::MAX]) },
            Input { name: "ids".into(), shape: vec![1], data: InputData::I32(vec![i32::MIN]) },
            Input { name: "mask".into(), shape: vec![1, 2], data: InputData::Bool(vec![true, false]) },
        ]
    }

    #[test]
    fn spilled_tensors_come_back_as_they_went_in_and_their_files_go() {
        let dir = tempfile::tempdir().unwrap();
        let files = || std::fs::read_dir(dir.path()).unwrap().count();
        for limit in [0, 12, u64::MAX] {
            let mut c = Carried::new(2, limit, dir.path());
            for s in 0..2 {
                for t in tensors() {
                    c.insert(s, t).unwrap();
                }
            }
            assert!(c.held_bytes() <= limit);
            let spilled = c.spilled();
            assert_eq!(spilled > 0, limit < u64::MAX, "limit {limit}: {spilled} spilled");
            assert_eq!(files(), (spilled > 0) as usize);
            c.end_step();
            for s in 0..2 {
                for t in tensors() {
                    assert_eq!(c.element(s, &t.name).unwrap().1, t.shape.len());
                    assert_eq!(c.get(s, &t.name).unwrap().as_ref(), Some(&t), "limit {limit}");
                }
            }
            // A second step spills into a file of its own; the first goes once nothing in it is kept.
            c.insert(0, Input { name: "next".into(), shape: vec![1], data: InputData::F32(vec![2.0]) }).unwrap();
            c.retain(|n| n == "next");
            assert_eq!(c.samples.iter().map(HashMap::len).sum::<usize>(), 1);
            // With a limit, "next" finds the memory taken by the first step's tensors and spills.
            assert_eq!(files(), (limit < u64::MAX) as usize, "limit {limit}");
            assert_eq!(c.held_bytes(), if limit == u64::MAX { 4 } else { 0 });
            drop(c);
            assert_eq!(files(), 0);
        }
    }
}
