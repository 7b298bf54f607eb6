//! The mmap layer: read-only mappings of files as [`Bytes`], and where a slice of one comes from.
//!
//! Every file nibble reads through memory (the input model, its external data files, its own
//! temporary files that are only appended to) is mapped here. Each live mapping is listed with its
//! file, so that the output writer can ask [`file_range_of`] whether the bytes it is given (an
//! unchanged tensor, a slice of the input) are a range of a file, and copy them from file to file
//! in the kernel (`copy_file_range(2)`) instead of reading the mapped pages into its own address
//! space: no page faults on the input's pages, no copy through user memory.

use bytes::Bytes;
use std::fs::File;
use std::sync::{Arc, Mutex};

/// A live mapping: its first address, its length and its file.
struct Entry {
    start: usize,
    len: usize,
    file: Arc<File>,
}

/// Every live mapping made by [`map_file`] (a few per run: a linear search is enough).
static MAPPINGS: Mutex<Vec<Entry>> = Mutex::new(Vec::new());

fn mappings() -> std::sync::MutexGuard<'static, Vec<Entry>> {
    MAPPINGS.lock().unwrap_or_else(|e| e.into_inner())
}

/// The owner of a mapping held by [`Bytes`]: listed in [`MAPPINGS`] from its creation until it is
/// dropped (unlisted before the pages are unmapped, so a later mapping at the same address is
/// never mistaken for it).
struct Mapping {
    map: memmap2::Mmap,
}

impl AsRef<[u8]> for Mapping {
    fn as_ref(&self) -> &[u8] {
        &self.map
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        let start = self.map.as_ptr() as usize;
        mappings().retain(|e| e.start != start);
    }
}

/// Maps `file` read-only: its bytes, borrowed from the page cache (an empty file gives empty bytes
/// without a mapping).
///
/// The caller promises what every mmap-based reader does: the file is not changed while it is
/// mapped (nibble never writes its input; its own temporary files are only appended to, and only
/// bytes already written are read).
///
/// # Errors
/// The `io::Error` of reading the file's length or of `mmap(2)`.
pub fn map_file(file: File) -> std::io::Result<Bytes> {
    if file.metadata()?.len() == 0 {
        return Ok(Bytes::new());
    }
    // SAFETY: a read-only private mapping; the file is not modified while mapped (the contract
    // above), so the bytes behind the slice never change under a reader.
    let map = unsafe { memmap2::Mmap::map(&file) }?;
    let entry = Entry { start: map.as_ptr() as usize, len: map.len(), file: Arc::new(file) };
    mappings().push(entry);
    Ok(Bytes::from_owner(Mapping { map }))
}

/// The file and the offset in it that `bytes` are a copy of, when they lie inside one mapping made
/// by [`map_file`] that is still live (which it is while the [`Bytes`] they were sliced from are).
/// `None` for any other memory.
pub fn file_range_of(bytes: &[u8]) -> Option<(Arc<File>, u64)> {
    let start = bytes.as_ptr() as usize;
    let end = start.checked_add(bytes.len())?;
    mappings()
        .iter()
        .find(|e| e.start <= start && end <= e.start + e.len)
        .map(|e| (Arc::clone(&e.file), (start - e.start) as u64))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A slice of a mapping names its file and offset; other memory, and a dropped mapping, do not.
    #[test]
    fn slices_of_a_mapping_know_their_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("data.bin");
        let data: Vec<u8> = (0..10_000u32).map(|i| (i * 7) as u8).collect();
        std::fs::write(&path, &data).unwrap();
        let bytes = map_file(File::open(&path).unwrap()).unwrap();
        assert_eq!(&bytes[..], &data[..]);
        let slice = bytes.slice(1000..5000);
        let (file, offset) = file_range_of(&slice).expect("a slice of the mapping");
        assert_eq!(offset, 1000);
        let mut back = vec![0u8; slice.len()];
        std::os::unix::fs::FileExt::read_exact_at(&*file, &mut back, offset).unwrap();
        assert_eq!(back, &slice[..]);
        assert!(file_range_of(&data[1000..5000]).is_none(), "heap memory is no file's");
        let start = bytes.as_ptr() as usize;
        drop((bytes, slice));
        assert!(mappings().iter().all(|e| e.start != start), "unlisted when dropped");
        std::fs::write(&path, b"").unwrap();
        assert!(map_file(File::open(&path).unwrap()).unwrap().is_empty());
    }
}
