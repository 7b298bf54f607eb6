//! Quantized weights finished before the output form asks for them (GPTQ's, computed in
//! calibration order while the output is written in plan order): spilled to a temporary file as
//! they come (GPTQ, so that memory does not grow with the model's depth), held in memory, or read
//! from the files earlier runs wrote (a merge's shards).

use crate::error::{Error, Result};
use nibble::QuantizedWeight;
use std::collections::HashMap;
use std::io::Write;
use std::os::unix::fs::FileExt;

/// Where one stored weight lies in a file (a spill file, or a shard's `weights.bin`): its codes,
/// then its scales (f32, little-endian), then its zero points.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    /// Byte offset of the codes.
    pub offset: u64,
    /// Bytes of the packed codes.
    pub packed: usize,
    /// Number of scales.
    pub scales: usize,
    /// Bytes of the zero points, if any.
    pub zero_points: Option<usize>,
    /// Shape of the scales.
    pub scale_shape: [usize; 2],
    /// Block length along K.
    pub block: usize,
}

impl Entry {
    /// The bytes of `q` as stored, and where they lie when written at `offset`.
    pub fn encode(q: &QuantizedWeight, offset: u64) -> (Vec<u8>, Entry) {
        let mut bytes = q.packed.clone();
        bytes.extend(q.scale.iter().flat_map(|v| v.to_le_bytes()));
        if let Some(z) = &q.zero_point {
            bytes.extend_from_slice(z);
        }
        let entry = Entry {
            offset,
            packed: q.packed.len(),
            scales: q.scale.len(),
            zero_points: q.zero_point.as_ref().map(Vec::len),
            scale_shape: q.scale_shape,
            block: q.block,
        };
        (bytes, entry)
    }

    /// Bytes the weight takes in the file.
    pub fn len(&self) -> usize {
        self.packed + 4 * self.scales + self.zero_points.unwrap_or(0)
    }

    /// Never true for a quantized weight (it has codes).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Reads the weight back from `file` (at `path`, named in errors).
    pub fn read(&self, file: &std::fs::File, path: &std::path::Path) -> Result<QuantizedWeight> {
        let mut bytes = vec![0u8; self.len()];
        file.read_exact_at(&mut bytes, self.offset)
            .map_err(|source| Error::Read { path: path.to_path_buf(), cause: source })?;
        let (packed, rest) = bytes.split_at(self.packed);
        let (scales, zero_points) = rest.split_at(4 * self.scales);
        Ok(QuantizedWeight {
            packed: packed.to_vec(),
            scale: scales.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect(),
            scale_shape: self.scale_shape,
            zero_point: self.zero_points.map(|_| zero_points.to_vec()),
            block: self.block,
        })
    }
}

/// The temporary file of spilled weights, removed when dropped (and on Ctrl-C).
struct Spill {
    file: tempfile::NamedTempFile,
    index: HashMap<String, Entry>,
    len: u64,
}

impl Drop for Spill {
    fn drop(&mut self) {
        crate::cleanup::unregister(self.file.path());
    }
}

/// Finished quantized weights by name.
#[derive(Default)]
pub struct Finished {
    held: HashMap<String, QuantizedWeight>,
    spill: Option<Spill>,
    /// Files written by earlier runs (shards, [`crate::shard`]), only read.
    files: Vec<(std::path::PathBuf, std::fs::File)>,
    stored: HashMap<String, (usize, Entry)>,
}

impl Finished {
    /// Weights held in memory.
    pub fn in_memory() -> Finished {
        Finished::default()
    }

    /// Weights written to a new temporary file as they come, read back when taken.
    pub fn spilled() -> Result<Finished> {
        let file = tempfile::Builder::new()
            .prefix("nibble-finished-")
            .tempfile()
            .map_err(|e| Error::Runtime(format!("cannot create a temporary file for the quantized weights: {e}")))?;
        crate::cleanup::register(file.path());
        Ok(Finished { spill: Some(Spill { file, index: HashMap::new(), len: 0 }), ..Default::default() })
    }

    /// Adds the weights `entries` stored in the file at `path` (opened read-only, read when
    /// taken).
    pub fn add_file(&mut self, path: &std::path::Path, entries: Vec<(String, Entry)>) -> Result<()> {
        let file =
            std::fs::File::open(path).map_err(|source| Error::Read { path: path.to_path_buf(), cause: source })?;
        let i = self.files.len();
        self.files.push((path.to_path_buf(), file));
        self.stored.extend(entries.into_iter().map(|(name, e)| (name, (i, e))));
        Ok(())
    }

    /// Keeps `q` as the quantization of weight `name`.
    pub fn insert(&mut self, name: String, q: QuantizedWeight) -> Result<()> {
        let Some(spill) = &mut self.spill else {
            self.held.insert(name, q);
            return Ok(());
        };
        let (bytes, entry) = Entry::encode(&q, spill.len);
        let path = spill.file.path().to_path_buf();
        spill.file.as_file_mut().write_all(&bytes).map_err(|source| Error::Write { path, cause: source })?;
        spill.len += bytes.len() as u64;
        spill.index.insert(name, entry);
        Ok(())
    }

    /// The quantization of weight `name`, if finished (once: it is given away).
    pub fn take(&mut self, name: &str) -> Result<Option<QuantizedWeight>> {
        if let Some(q) = self.held.remove(name) {
            return Ok(Some(q));
        }
        if let Some(spill) = &mut self.spill {
            if let Some(e) = spill.index.remove(name) {
                return e.read(spill.file.as_file(), spill.file.path()).map(Some);
            }
        }
        match self.stored.remove(name) {
            Some((i, e)) => e.read(&self.files[i].1, &self.files[i].0).map(Some),
            None => Ok(None),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spilled_weights_come_back_as_they_went_in() {
        let a = QuantizedWeight {
            packed: vec![1, 2, 3],
            scale: vec![0.5, -1.25e-3],
            scale_shape: [1, 2],
            zero_point: Some(vec![7, 9]),
            block: 32,
        };
        let b = QuantizedWeight { zero_point: None, packed: vec![255; 5], ..a.clone() };
        for mut f in [Finished::in_memory(), Finished::spilled().unwrap()] {
            f.insert("a".into(), a.clone()).unwrap();
            f.insert("b".into(), b.clone()).unwrap();
            assert_eq!(f.take("b").unwrap(), Some(b.clone()));
            assert_eq!(f.take("a").unwrap(), Some(a.clone()));
            assert_eq!(f.take("a").unwrap(), None);
        }
    }
}
