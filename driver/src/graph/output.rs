//! The output files' primitives: where tensor data goes ([`ExternalData`]), the external data
//! file's name and layout constants, and the temporary file that becomes an output only when
//! renamed into place ([`TempFile`]). Shared by the model writer (`model.rs`) and the streamed
//! writer (`stream.rs`).

use crate::error::{Error, Result};
use bytes::Bytes;
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

/// Small writes are gathered up to this many bytes before they go to the writer thread.
const BUFFER: usize = 1 << 20;
/// Writes queued for the writer thread at most (each a gathered buffer or one tensor's bytes), so
/// memory stays bounded: the caller waits when the disk is slower than the quantization.
const QUEUE: usize = 4;

/// A temporary file next to the output that is removed unless committed. Its bytes are written by a
/// thread of its own, each at its place in the order given (behind bytes, [`TempFile::write_behind`],
/// when nothing else waits): the copies into the page cache overlap the caller's work (quantizing
/// the next weights) instead of following it.
pub(crate) struct TempFile {
    pub(crate) path: PathBuf,
    writer: Option<Writer>,
}

/// The writer thread of a [`TempFile`] and what is queued for it.
struct Writer {
    /// Small writes not yet sent.
    pending: Vec<u8>,
    queue: std::sync::mpsc::SyncSender<Job>,
    /// Returns the file, or the first error (after which it writes nothing more).
    thread: std::thread::JoinHandle<std::io::Result<std::fs::File>>,
}

enum Job {
    Write(Bytes),
    /// Bytes placed after the ones queued before it, but written only when no other job waits
    /// ([`TempFile::write_behind`]).
    Behind(Bytes),
    /// Answered when every write queued before it is done.
    Flush(std::sync::mpsc::SyncSender<()>),
}

/// Behind bytes are written this many at a time between the other jobs: a job that arrives waits
/// for at most one such slice.
const SLICE: usize = 4 << 20;

/// Writes `bytes` at `offset` of `file`. Bytes that are a range of a mapped file
/// ([`file_range_of`](crate::graph::mapped::file_range_of): an unchanged tensor of the input) are
/// copied from that file in the kernel (`copy_file_range(2)`): the input's pages are never faulted
/// into this process nor copied through user memory. Where the kernel cannot copy between the two
/// files (another file system, an old kernel), the rest is written from memory.
fn write_at(file: &std::fs::File, bytes: &[u8], offset: u64) -> std::io::Result<()> {
    use std::os::unix::fs::FileExt;
    let mut done = 0usize;
    if let Some((source, from)) = crate::graph::mapped::file_range_of(bytes) {
        let (mut from, mut to) = (from, offset);
        while done < bytes.len() {
            match rustix::fs::copy_file_range(&*source, Some(&mut from), file, Some(&mut to), bytes.len() - done) {
                Ok(0) => break,
                Ok(n) => done += n,
                Err(rustix::io::Errno::INTR) => {}
                Err(_) => break,
            }
        }
    }
    file.write_all_at(&bytes[done..], offset + done as u64)
}

/// The writer thread's loop: each job's bytes go at the file's end as the jobs were given
/// (positional writes), except that behind bytes ([`Job::Behind`]) keep their place but are
/// written a slice at a time whenever no other job waits, and all of them before a flush is
/// answered and before the thread ends.
fn write_jobs(file: &std::fs::File, jobs: std::sync::mpsc::Receiver<Job>) -> std::io::Result<()> {
    use std::sync::mpsc::TryRecvError;
    // The file's length once every job so far is written, and the behind bytes not yet written,
    // each with its offset.
    let mut end = 0u64;
    let mut behind = std::collections::VecDeque::<(u64, Bytes)>::new();
    let write_slice = |behind: &mut std::collections::VecDeque<(u64, Bytes)>| -> std::io::Result<()> {
        let Some((offset, bytes)) = behind.front_mut() else { return Ok(()) };
        let n = bytes.len().min(SLICE);
        write_at(file, &bytes[..n], *offset)?;
        *offset += n as u64;
        let _ = bytes.split_to(n);
        if bytes.is_empty() {
            behind.pop_front();
        }
        Ok(())
    };
    loop {
        let job = if behind.is_empty() {
            jobs.recv().ok()
        } else {
            match jobs.try_recv() {
                Ok(job) => Some(job),
                Err(TryRecvError::Empty) => {
                    write_slice(&mut behind)?;
                    continue;
                }
                Err(TryRecvError::Disconnected) => None,
            }
        };
        match job {
            Some(Job::Write(bytes)) => {
                write_at(file, &bytes, end)?;
                end += bytes.len() as u64;
            }
            Some(Job::Behind(bytes)) => {
                let length = bytes.len() as u64;
                behind.push_back((end, bytes));
                end += length;
            }
            Some(Job::Flush(done)) => {
                while !behind.is_empty() {
                    write_slice(&mut behind)?;
                }
                let _ = done.send(());
            }
            None => break,
        }
    }
    while !behind.is_empty() {
        write_slice(&mut behind)?;
    }
    Ok(())
}

impl TempFile {
    pub(crate) fn create(target: &Path) -> Result<TempFile> {
        let mut name = std::ffi::OsString::from(".");
        name.push(target.file_name().unwrap_or_default());
        name.push(format!(".nibble-tmp-{}", std::process::id()));
        let path = target.with_file_name(name);
        let err = |cause| Error::Write { path: path.clone(), cause };
        let file = std::fs::File::create(&path).map_err(err)?;
        crate::cleanup::register(&path);
        let (queue, jobs) = std::sync::mpsc::sync_channel::<Job>(QUEUE);
        let thread = std::thread::Builder::new()
            .name("nibble-writer".into())
            .spawn(move || {
                write_jobs(&file, jobs)?;
                Ok(file)
            })
            .map_err(err);
        let thread = match thread {
            Ok(t) => t,
            Err(e) => {
                let _ = std::fs::remove_file(&path);
                crate::cleanup::unregister(&path);
                return Err(e);
            }
        };
        Ok(TempFile { path, writer: Some(Writer { pending: Vec::with_capacity(BUFFER), queue, thread }) })
    }

    /// Appends `bytes` (copied: for small pieces; [`TempFile::write_bytes`] takes large ones without
    /// a copy).
    pub(crate) fn write_all(&mut self, bytes: &[u8]) -> Result<()> {
        let w = self.writer.as_mut().expect("open");
        if w.pending.len() + bytes.len() > BUFFER {
            self.send_pending()?;
        }
        if bytes.len() >= BUFFER {
            return self.send(Job::Write(Bytes::copy_from_slice(bytes)));
        }
        self.writer.as_mut().expect("open").pending.extend_from_slice(bytes);
        Ok(())
    }

    /// Appends `bytes`, handed to the writer thread without a copy when large (a tensor's data,
    /// or a slice of a mapped file).
    pub(crate) fn write_bytes(&mut self, bytes: Bytes) -> Result<()> {
        if bytes.len() < BUFFER {
            return self.write_all(&bytes);
        }
        self.send_pending()?;
        self.send(Job::Write(bytes))
    }

    /// Appends `bytes` like [`TempFile::write_bytes`], but the writer thread writes them only when
    /// it has nothing else queued (and all of them before a flush or the end): for data that is
    /// ready long before it is needed and costs no memory to hold (a slice of a mapped file), so
    /// that the writes queued after it do not wait for it.
    pub(crate) fn write_behind(&mut self, bytes: Bytes) -> Result<()> {
        if bytes.len() < BUFFER {
            return self.write_all(&bytes);
        }
        self.send_pending()?;
        self.send(Job::Behind(bytes))
    }

    fn send_pending(&mut self) -> Result<()> {
        let w = self.writer.as_mut().expect("open");
        if w.pending.is_empty() {
            return Ok(());
        }
        let full = std::mem::replace(&mut w.pending, Vec::with_capacity(BUFFER));
        self.send(Job::Write(Bytes::from(full)))
    }

    /// Queues `job`; when the writer thread has stopped on an error, returns that error.
    fn send(&mut self, job: Job) -> Result<()> {
        match self.writer.as_ref().expect("open").queue.send(job) {
            Ok(()) => Ok(()),
            Err(_) => Err(self.stopped()),
        }
    }

    /// The error the writer thread stopped on (it stops only on one).
    fn stopped(&mut self) -> Error {
        self.stop().err().unwrap_or_else(|| self.error(std::io::Error::other("the writer thread stopped")))
    }

    /// Ends the writer thread (after the writes queued so far) and returns the file.
    fn stop(&mut self) -> Result<std::fs::File> {
        let Writer { queue, thread, .. } = self.writer.take().expect("open");
        drop(queue);
        match thread.join() {
            Ok(done) => done.map_err(|cause| self.error(cause)),
            Err(_) => Err(self.error(std::io::Error::other("the writer thread panicked"))),
        }
    }

    fn error(&self, cause: std::io::Error) -> Error {
        Error::Write { path: self.path.clone(), cause }
    }

    /// Waits until every byte given so far is in the file (which stays open for more).
    pub(crate) fn flush(&mut self) -> Result<()> {
        self.send_pending()?;
        let (done, wait) = std::sync::mpsc::sync_channel(1);
        self.send(Job::Flush(done))?;
        match wait.recv() {
            Ok(()) => Ok(()),
            // The thread stopped on an error before reaching the flush.
            Err(_) => Err(self.stopped()),
        }
    }

    /// Writes every byte given so far, ends the writer thread, and with `sync` waits until the
    /// data is on disk.
    pub(crate) fn finish(&mut self, sync: bool) -> Result<()> {
        self.send_pending()?;
        let file = self.stop()?;
        if sync {
            file.sync_all().map_err(|cause| self.error(cause))?;
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
        // Not finished (an error elsewhere): the queued writes end before the file is removed.
        if let Some(Writer { queue, thread, .. }) = self.writer.take() {
            drop(queue);
            let _ = thread.join();
        }
        if !self.path.as_os_str().is_empty() {
            let _ = std::fs::remove_file(&self.path);
            crate::cleanup::unregister(&self.path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Behind bytes keep their place among the other writes, are all in the file when a flush
    /// returns, and the file is the bytes given in order.
    #[test]
    fn behind_bytes_keep_their_place() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("out.bin");
        let bytes = |seed: u8, n: usize| Bytes::from((0..n).map(|i| (i as u8).wrapping_mul(seed)).collect::<Vec<u8>>());
        let (a, b, c, d) = (bytes(3, 100), bytes(5, 16 * SLICE + 17), bytes(7, BUFFER + 5), bytes(11, 2 * BUFFER));
        let mut tmp = TempFile::create(&target).unwrap();
        tmp.write_all(&a).unwrap();
        tmp.write_behind(b.clone()).unwrap();
        tmp.write_bytes(c.clone()).unwrap();
        tmp.flush().unwrap();
        // The last bytes of the behind bytes first: the writer thread writes them front to back.
        let mut end = vec![0u8; 4096];
        let file = std::fs::File::open(&tmp.path).unwrap();
        let at = (a.len() + b.len() - end.len()) as u64;
        std::os::unix::fs::FileExt::read_exact_at(&file, &mut end, at).unwrap();
        assert_eq!(end, b[b.len() - 4096..], "behind bytes unwritten after the flush");
        let given = [&a[..], &b[..], &c[..]].concat();
        assert_eq!(std::fs::read(&tmp.path).unwrap(), given, "after the flush");
        tmp.write_behind(d.clone()).unwrap();
        tmp.write_all(&a).unwrap();
        tmp.finish(false).unwrap();
        tmp.commit(&target).unwrap();
        assert_eq!(std::fs::read(&target).unwrap(), [&given[..], &d[..], &a[..]].concat(), "at the end");
    }

    /// Slices of a mapped file (copied file to file by the kernel) and of memory land at their
    /// places, in both kinds of write, whether the source is on the output's file system or on
    /// another one (`/dev/shm`, where the kernel may refuse and the rest is written from memory).
    #[test]
    fn slices_of_mapped_files_are_copied_in_place() {
        let dir = tempfile::tempdir().unwrap();
        let other = tempfile::tempdir_in("/dev/shm").ok();
        for source_dir in [Some(dir.path()), other.as_ref().map(|d| d.path())].into_iter().flatten() {
            let path = source_dir.join("input.bin");
            let input: Vec<u8> = (0..3 * SLICE as u32 + 4099).map(|i| (i % 251) as u8).collect();
            std::fs::write(&path, &input).unwrap();
            let mapped = crate::graph::mapped::map_file(std::fs::File::open(&path).unwrap()).unwrap();
            let (a, b, c) = (mapped.slice(7..BUFFER + 7), mapped.slice(BUFFER + 100..), mapped.slice(3..BUFFER + 9));
            assert!(crate::graph::mapped::file_range_of(&b).is_some());
            let memory = Bytes::from(vec![9u8; 2 * BUFFER + 1]);
            let target = dir.path().join("out.bin");
            let mut tmp = TempFile::create(&target).unwrap();
            tmp.write_all(b"head").unwrap();
            tmp.write_bytes(a.clone()).unwrap();
            tmp.write_behind(b.clone()).unwrap();
            tmp.write_bytes(memory.clone()).unwrap();
            tmp.write_bytes(c.clone()).unwrap();
            tmp.finish(false).unwrap();
            tmp.commit(&target).unwrap();
            let want = [&b"head"[..], &a[..], &b[..], &memory[..], &c[..]].concat();
            assert!(std::fs::read(&target).unwrap() == want, "from {}", source_dir.display());
            assert_eq!(std::fs::read(&path).unwrap(), input, "the input is unchanged");
        }
    }
}
