//! Streamed output: bounded memory whatever the model's size.
//!
//! A [`DataSink`] is the output's external data file, written as the run goes: each quantized
//! tensor is appended when it is finished ([`DataSink::put`] moves its bytes out of memory and leaves
//! an external-data reference: `location`, `offset`, `length`, offsets aligned to 64 bytes, tensors
//! under 1024 bytes kept inline, as ONNX's `save_model` does). The tensors that will not change are
//! placed first ([`put_unchanged`], copied from the input's memory map, so no copy of the model is
//! held) and written behind the quantized weights' tensors, whenever the writer thread has nothing
//! else to write, while the weights are quantized; [`finish`] appends any other tensor and writes the
//! protobuf last, encoded field by field straight into the file ([`write_proto`]: one tensor's
//! encoding at a time, the same bytes as prost's `encode_to_vec`). Both files are temporary files
//! next to the output, renamed into place at the end and removed on error or Ctrl-C; the input is
//! only read. Each is written by a thread of its own (`output::TempFile`), so the copies into the page
//! cache overlap the quantization of the next weights.
//!
//! When the output is a single `.onnx` file (`--external-data never`, or `auto` under protobuf's
//! 2 GiB limit), the streamed tensors are mapped back from the temporary data file and written
//! inline, so the output is the same file byte for byte as when every tensor was held in memory.

use crate::error::{Error, Result};
use crate::graph::onnx::{tensor_proto::DataLocation, GraphProto, ModelProto, StringStringEntryProto, TensorProto};
use crate::graph::output::{ExternalData, TempFile, EXTERNAL_ALIGN, EXTERNAL_THRESHOLD, PROTOBUF_LIMIT};
use bytes::Bytes;
use prost::Message;
use std::path::Path;

/// The output's external data file, being written: a temporary file next to `data_path`, removed
/// unless [`finish`] renames it into place.
pub struct DataSink {
    tmp: TempFile,
    /// The final file's name, written in every reference (`location`).
    location: String,
    /// Bytes written so far (padding included).
    offset: u64,
    /// Tensors written ahead by [`DataSink::put_early`], by name: where their bytes are.
    early: std::collections::HashMap<String, Early>,
}

/// A tensor's bytes written ahead of the quantized weights: the slice they were taken from (its
/// address and length, to know the tensor still holds those bytes) and where they went.
struct Early {
    address: usize,
    length: usize,
    offset: u64,
}

impl DataSink {
    /// Creates the temporary file for the external data file `data_path`.
    ///
    /// # Errors
    /// [`Error::Write`] naming the temporary file when it cannot be created.
    pub fn create(data_path: &Path) -> Result<DataSink> {
        let location = data_path.file_name().expect("a file name").to_string_lossy().into_owned();
        Ok(DataSink { tmp: TempFile::create(data_path)?, location, offset: 0, early: Default::default() })
    }

    /// Bytes written so far (tensor data and the padding that aligns each tensor to 64 bytes).
    pub fn bytes(&self) -> u64 {
        self.offset
    }

    /// Appends the `raw_data` of `t` (when it holds 1024 bytes or more) to the file and replaces it
    /// by an external-data reference (`location`, `offset`, `length`); smaller tensors and tensors
    /// without `raw_data` are left as they are.
    ///
    /// # Errors
    /// [`Error::Write`] when the file cannot be written (a full disk, a file size limit).
    pub fn put(&mut self, t: &mut TensorProto) -> Result<()> {
        let Some(raw) = t.raw_data.take_if(|r| r.len() >= EXTERNAL_THRESHOLD) else {
            return Ok(());
        };
        let length = raw.len();
        // Written ahead and still holding the very bytes written (the same slice): referenced there.
        let ahead = t.name.as_ref().and_then(|n| self.early.remove(n));
        let offset = match ahead.filter(|e| (e.address, e.length) == (raw.as_ptr() as usize, length)) {
            Some(e) => e.offset,
            None => self.append(raw)?,
        };
        let entry = |k: &str, v: String| StringStringEntryProto { key: Some(k.into()), value: Some(v) };
        t.external_data = vec![
            entry("location", self.location.clone()),
            entry("offset", offset.to_string()),
            entry("length", length.to_string()),
        ];
        t.data_location = Some(DataLocation::External as i32);
        Ok(())
    }

    /// Appends the `raw_data` of `t` (when it holds 1024 bytes or more) now, leaving `t` as it is:
    /// for a tensor that will be written unchanged, so that the writer thread copies it while the
    /// weights are quantized instead of after them. [`DataSink::put`] then references those bytes
    /// when `t` still holds the same slice (same address and length), and appends them again
    /// otherwise.
    ///
    /// # Errors
    /// [`Error::Write`] when the file cannot be written.
    pub fn put_early(&mut self, t: &TensorProto) -> Result<()> {
        let (Some(name), Some(raw)) = (&t.name, t.raw_data.as_ref().filter(|r| r.len() >= EXTERNAL_THRESHOLD)) else {
            return Ok(());
        };
        if self.early.contains_key(name) {
            return Ok(());
        }
        let (address, length) = (raw.as_ptr() as usize, raw.len());
        let offset = self.place(length)?;
        // Written behind: the quantized weights' writes queued after it do not wait for it.
        self.tmp.write_behind(raw.clone())?;
        self.early.insert(name.clone(), Early { address, length, offset });
        Ok(())
    }

    /// Appends `raw` at the next multiple of 64 bytes; returns its offset.
    fn append(&mut self, raw: Bytes) -> Result<u64> {
        let offset = self.place(raw.len())?;
        self.tmp.write_bytes(raw)?;
        Ok(offset)
    }

    /// Pads the file to the next multiple of 64 bytes and counts `length` bytes to be written
    /// there next; returns their offset.
    fn place(&mut self, length: usize) -> Result<u64> {
        let pad = (EXTERNAL_ALIGN - self.offset % EXTERNAL_ALIGN) % EXTERNAL_ALIGN;
        self.tmp.write_all(&[0u8; EXTERNAL_ALIGN as usize][..pad as usize])?;
        self.offset += pad;
        let offset = self.offset;
        self.offset += length as u64;
        Ok(offset)
    }

    /// The `(offset, length)` of `t` when its data is in this file.
    fn range_of(&self, t: &TensorProto) -> Option<(usize, usize)> {
        if t.data_location != Some(DataLocation::External as i32) {
            return None;
        }
        let get = |k: &str| t.external_data.iter().find(|e| e.key.as_deref() == Some(k)).and_then(|e| e.value.clone());
        (get("location")? == self.location).then_some(())?;
        Some((get("offset")?.parse().ok()?, get("length")?.parse().ok()?))
    }

    /// Puts the data of every top-level initializer of `proto` written to this file back inline
    /// (`raw_data` borrowed from a read-only mapping of the file: no copy in memory).
    fn inline(&mut self, proto: &mut ModelProto) -> Result<()> {
        let Some(graph) = proto.graph.as_mut() else { return Ok(()) };
        if self.offset == 0 {
            return Ok(());
        }
        self.tmp.flush()?;
        let map = map_appended(&self.tmp.path)?;
        for t in graph.initializer.iter_mut() {
            if let Some((offset, length)) = self.range_of(t) {
                t.raw_data = Some(map.slice(offset..offset + length));
                t.external_data.clear();
                t.data_location = None;
            }
        }
        Ok(())
    }
}

/// With `--external-data auto`, models larger than this held inline get external data (protobuf's
/// limit less 16 MiB for the protobuf's own fields).
const AUTO_LIMIT: usize = PROTOBUF_LIMIT - (16 << 20);

/// Writes ahead ([`DataSink::put_early`]) the top-level initializers of `graph` that `unchanged`
/// says will be written as they are (by index), when their data certainly goes to the data file:
/// with `Always`, or with `Auto` when their bytes alone exceed the inline limit. The writer thread
/// then copies them while the weights are quantized.
///
/// # Errors
/// [`Error::Write`] when the file cannot be written.
pub fn put_unchanged(
    sink: &mut DataSink,
    graph: &GraphProto,
    unchanged: &dyn Fn(usize) -> bool,
    mode: ExternalData,
) -> Result<()> {
    let ahead = || {
        graph
            .initializer
            .iter()
            .enumerate()
            .filter(|&(i, t)| unchanged(i) && t.raw_data.as_ref().is_some_and(|r| r.len() >= EXTERNAL_THRESHOLD))
            .map(|(_, t)| t)
    };
    let external = match mode {
        ExternalData::Always => true,
        ExternalData::Never => false,
        ExternalData::Auto => ahead().map(|t| t.raw_data.as_ref().map_or(0, |r| r.len())).sum::<usize>() > AUTO_LIMIT,
    };
    if external {
        for t in ahead() {
            sink.put_early(t)?;
        }
    }
    Ok(())
}

/// A read-only mapping of one of nibble's own temporary files that is only ever appended to (the
/// streamed data file, calibration's carried tensors), after the bytes to read have been flushed.
///
/// # Errors
/// [`Error::Read`] naming the file when it cannot be opened or mapped.
pub fn map_appended(path: &Path) -> Result<Bytes> {
    let read = |cause| Error::Read { path: path.to_path_buf(), cause };
    // A temporary file only appended to, whose bytes so far are flushed: they never change.
    crate::graph::mapped::map_file(std::fs::File::open(path).map_err(read)?).map_err(read)
}

/// Writes the model `proto` to `out`, its external data (if any) to `data_path` through `sink` (which
/// may already hold streamed tensors), both atomically. With external data (`Always`, or `Auto`
/// when the model held inline would exceed protobuf's 2 GiB limit less 16 MiB), every top-level
/// initializer of 1024 bytes or more that still holds `raw_data` is appended to the data file (or
/// referenced where [`put_unchanged`] wrote it ahead); else
/// the streamed tensors are put back inline and no data file is written (a stale one is removed).
/// Returns the bytes written (data file with padding, plus the `.onnx` file).
///
/// # Errors
/// [`Error::Write`] naming the file that cannot be written (the temporary files are removed);
/// [`Error::Output`] when an inline model would exceed 2 GiB.
pub fn finish(
    mut proto: ModelProto,
    mut sink: DataSink,
    out: &Path,
    data_path: &Path,
    mode: ExternalData,
    sync: bool,
) -> Result<u64> {
    let external = match mode {
        ExternalData::Always => true,
        ExternalData::Never => false,
        ExternalData::Auto => {
            let mut inline = proto.clone();
            sink.inline(&mut inline)?;
            inline.encoded_len() > AUTO_LIMIT
        }
    };
    let mut data = None;
    if external {
        if let Some(graph) = proto.graph.as_mut() {
            for t in graph.initializer.iter_mut() {
                sink.put(t)?;
            }
        }
        sink.tmp.finish(sync)?;
        data = Some(sink);
    } else {
        sink.inline(&mut proto)?;
        drop(sink);
    }
    let encoded = proto.encoded_len();
    if encoded > PROTOBUF_LIMIT {
        return Err(Error::Output {
            path: out.to_path_buf(),
            why: format!(
                "the model is {encoded} bytes, over protobuf's 2 GiB limit; use --external-data auto or always"
            ),
        });
    }
    let mut tmp = TempFile::create(out)?;
    write_proto(&mut tmp, proto)?;
    tmp.finish(sync)?;
    let mut written = encoded as u64;
    match data {
        Some(d) => {
            written += d.offset;
            d.tmp.commit(data_path)?;
        }
        // A stale data file from an earlier run would be misleading next to an inline model.
        None if data_path.exists() => {
            let _ = std::fs::remove_file(data_path);
        }
        None => {}
    }
    tmp.commit(out)?;
    Ok(written)
}

/// Encodes `proto` into `tmp` field by field, in prost's order (by tag number: the bytes of
/// `proto.encode_to_vec()`), holding one initializer's encoding at a time instead of the whole
/// model's.
fn write_proto(tmp: &mut TempFile, mut proto: ModelProto) -> Result<()> {
    use prost::encoding::{encode_key, encode_varint, WireType};
    let Some(mut graph) = proto.graph.take() else {
        return tmp.write_all(&proto.encode_to_vec());
    };
    // prost writes fields in tag order: ModelProto's fields after `graph` (7) go to `tail`, the
    // ones before stay in `proto`.
    let tail = ModelProto {
        opset_import: std::mem::take(&mut proto.opset_import),
        metadata_props: std::mem::take(&mut proto.metadata_props),
        training_info: std::mem::take(&mut proto.training_info),
        functions: std::mem::take(&mut proto.functions),
        configuration: std::mem::take(&mut proto.configuration),
        ..Default::default()
    };
    let mut head = proto.encode_to_vec();
    encode_key(7, WireType::LengthDelimited, &mut head);
    encode_varint(graph.encoded_len() as u64, &mut head);
    tmp.write_all(&head)?;
    // GraphProto: `node` (1) and `name` (2) come before `initializer` (5), every other field after.
    let initializers = std::mem::take(&mut graph.initializer);
    let graph_head =
        GraphProto { node: std::mem::take(&mut graph.node), name: graph.name.take(), ..Default::default() };
    tmp.write_all(&graph_head.encode_to_vec())?;
    drop(graph_head);
    for t in &initializers {
        write_tensor(tmp, 5, t)?;
    }
    tmp.write_all(&graph.encode_to_vec())?;
    tmp.write_all(&tail.encode_to_vec())
}

/// Encodes tensor `t` as field `tag` of its message into `tmp` (prost's bytes), its `raw_data`
/// written straight from where it lies (the input's mapping or the data file's), not copied.
fn write_tensor(tmp: &mut TempFile, tag: u32, t: &TensorProto) -> Result<()> {
    use prost::encoding::{encode_key, encode_varint, WireType};
    let Some(raw) = &t.raw_data else {
        let mut buf = Vec::new();
        prost::encoding::message::encode(tag, t, &mut buf);
        return tmp.write_all(&buf);
    };
    // TensorProto's fields in tag order: 1-8 before `raw_data` (9), 10-16 after it.
    let after = TensorProto {
        double_data: t.double_data.clone(),
        uint64_data: t.uint64_data.clone(),
        doc_string: t.doc_string.clone(),
        external_data: t.external_data.clone(),
        data_location: t.data_location,
        metadata_props: t.metadata_props.clone(),
        ..Default::default()
    };
    let before = TensorProto {
        dims: t.dims.clone(),
        data_type: t.data_type,
        segment: t.segment,
        float_data: t.float_data.clone(),
        int32_data: t.int32_data.clone(),
        string_data: t.string_data.clone(),
        int64_data: t.int64_data.clone(),
        name: t.name.clone(),
        ..Default::default()
    };
    let mut head = Vec::new();
    encode_key(tag, WireType::LengthDelimited, &mut head);
    encode_varint(t.encoded_len() as u64, &mut head);
    before.encode(&mut head).expect("a Vec grows");
    encode_key(9, WireType::LengthDelimited, &mut head);
    encode_varint(raw.len() as u64, &mut head);
    tmp.write_all(&head)?;
    tmp.write_bytes(raw.clone())?;
    tmp.write_all(&after.encode_to_vec())
}
