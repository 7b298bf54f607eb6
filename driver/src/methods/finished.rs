//! Quantized weights finished before the output form asks for them (GPTQ's, computed in
//! calibration order while the output is written in plan order): held in memory, or spilled to a
//! temporary file (calibration by segments, so that memory does not grow with the model's depth).

use crate::error::{Error, Result};
use nibble::QuantizedWeight;
use std::collections::HashMap;
use std::io::Write;
use std::os::unix::fs::FileExt;

/// Where one spilled weight lies in the file: its codes, then its scales (f32, little-endian), then
/// its zero points.
struct Entry {
    offset: u64,
    packed: usize,
    scales: usize,
    zero_points: Option<usize>,
    scale_shape: [usize; 2],
    block: usize,
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
        Ok(Finished { held: HashMap::new(), spill: Some(Spill { file, index: HashMap::new(), len: 0 }) })
    }

    /// Keeps `q` as the quantization of weight `name`.
    pub fn insert(&mut self, name: String, q: QuantizedWeight) -> Result<()> {
        let Some(spill) = &mut self.spill else {
            self.held.insert(name, q);
            return Ok(());
        };
        let mut bytes = q.packed.clone();
        bytes.extend(q.scale.iter().flat_map(|v| v.to_le_bytes()));
        if let Some(z) = &q.zero_point {
            bytes.extend_from_slice(z);
        }
        let path = spill.file.path().to_path_buf();
        spill.file.as_file_mut().write_all(&bytes).map_err(|source| Error::Write { path, cause: source })?;
        let entry = Entry {
            offset: spill.len,
            packed: q.packed.len(),
            scales: q.scale.len(),
            zero_points: q.zero_point.as_ref().map(Vec::len),
            scale_shape: q.scale_shape,
            block: q.block,
        };
        spill.len += bytes.len() as u64;
        spill.index.insert(name, entry);
        Ok(())
    }

    /// The quantization of weight `name`, if finished (once: it is given away).
    pub fn take(&mut self, name: &str) -> Result<Option<QuantizedWeight>> {
        let Some(spill) = &mut self.spill else { return Ok(self.held.remove(name)) };
        let Some(e) = spill.index.remove(name) else { return Ok(None) };
        let len = e.packed + 4 * e.scales + e.zero_points.unwrap_or(0);
        let mut bytes = vec![0u8; len];
        spill
            .file
            .as_file()
            .read_exact_at(&mut bytes, e.offset)
            .map_err(|source| Error::Read { path: spill.file.path().to_path_buf(), cause: source })?;
        let (packed, rest) = bytes.split_at(e.packed);
        let (scales, zero_points) = rest.split_at(4 * e.scales);
        Ok(Some(QuantizedWeight {
            packed: packed.to_vec(),
            scale: scales.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect(),
            scale_shape: e.scale_shape,
            zero_point: e.zero_points.map(|_| zero_points.to_vec()),
            block: e.block,
        }))
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
