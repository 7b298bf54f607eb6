//! The output files' primitives: where tensor data goes ([`ExternalData`]), the external data
//! file's name and layout constants, and the temporary file that becomes an output only when
//! renamed into place ([`TempFile`]). Shared by the model writer (`model.rs`) and the streamed
//! writer (`stream.rs`).

use crate::error::{Error, Result};
use std::io::Write;
use std::path::{Path, PathBuf};

/// Where tensor data goes when saving.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum ExternalData {
    /// External data when the model would exceed protobuf's 2 GiB limit.
    Auto,
    /// Always `OUT.onnx_data` next to `OUT.onnx`.
    Always,
    /// Everything inside the `.onnx` file (fails above 2 GiB).
    Never,
}

/// The largest model ONNX Runtime and protobuf accept in one file.
pub const PROTOBUF_LIMIT: usize = (1 << 31) - 1;
/// Tensors smaller than this stay inline even with external data (ONNX's default threshold).
pub(crate) const EXTERNAL_THRESHOLD: usize = 1024;
/// External tensors start at multiples of this.
pub(crate) const EXTERNAL_ALIGN: u64 = 64;

/// The external data file name for an output path: `OUT.onnx` -> `OUT.onnx_data`.
pub fn external_data_path(out: &Path) -> PathBuf {
    let mut name = out.file_name().map(|n| n.to_os_string()).unwrap_or_default();
    name.push("_data");
    out.with_file_name(name)
}

/// A temporary file next to the output that is removed unless committed.
pub(crate) struct TempFile {
    pub(crate) path: PathBuf,
    file: Option<std::io::BufWriter<std::fs::File>>,
}

impl TempFile {
    pub(crate) fn create(target: &Path) -> Result<TempFile> {
        let mut name = std::ffi::OsString::from(".");
        name.push(target.file_name().unwrap_or_default());
        name.push(format!(".nibble-tmp-{}", std::process::id()));
        let path = target.with_file_name(name);
        let file = std::fs::File::create(&path).map_err(|source| Error::Write { path: path.clone(), cause: source })?;
        crate::cleanup::register(&path);
        Ok(TempFile { path, file: Some(std::io::BufWriter::with_capacity(1 << 20, file)) })
    }

    pub(crate) fn write_all(&mut self, bytes: &[u8]) -> Result<()> {
        let path = &self.path;
        self.file
            .as_mut()
            .expect("open")
            .write_all(bytes)
            .map_err(|source| Error::Write { path: path.clone(), cause: source })
    }

    /// Writes the buffered bytes to the file (which stays open for more).
    pub(crate) fn flush(&mut self) -> Result<()> {
        let path = &self.path;
        self.file.as_mut().expect("open").flush().map_err(|source| Error::Write { path: path.clone(), cause: source })
    }

    /// Flushes the buffer, and with `sync` waits until the data is on disk.
    pub(crate) fn finish(&mut self, sync: bool) -> Result<()> {
        let path = self.path.clone();
        let w = |source| Error::Write { path: path.clone(), cause: source };
        let file = self.file.take().expect("open").into_inner().map_err(|e| w(e.into_error()))?;
        if sync {
            file.sync_all().map_err(w)?;
        }
        Ok(())
    }

    pub(crate) fn commit(mut self, target: &Path) -> Result<()> {
        std::fs::rename(&self.path, target)
            .map_err(|source| Error::Write { path: target.to_path_buf(), cause: source })?;
        crate::cleanup::unregister(&self.path);
        self.path = PathBuf::new();
        Ok(())
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        if !self.path.as_os_str().is_empty() {
            let _ = std::fs::remove_file(&self.path);
            crate::cleanup::unregister(&self.path);
        }
    }
}
