//! Reading `.npy` arrays and `.npz` archives (numpy's formats), for calibration data and test data.
//!
//! The `.npy` format is read by the `npyz` crate: format versions 1-3, either byte order, dtypes
//! `f2 f4 f8 i1 u1 i2 u2 i4 u4 i8 u8 b1`, C or Fortran order (Fortran arrays are returned in C order).
//! An `.npz` is a zip archive of `.npy` members, stored (`numpy.savez`) or deflated
//! (`numpy.savez_compressed`), read with the `zip` crate. Lengths are checked before anything is
//! allocated; malformed input is an [`NpyError`], never a panic.

use npyz::{NpyFile, NpyHeader, Order, TypeChar};
use std::io::Read;
use std::path::Path;

/// What went wrong reading an array.
#[derive(Debug, thiserror::Error)]
pub enum NpyError {
    /// The bytes are not a valid `.npy` file.
    #[error("{name}: not a valid .npy array: {why}")]
    Malformed {
        /// The array or file name.
        name: String,
        /// What is wrong.
        why: String,
    },
    /// A dtype this reader does not handle.
    #[error(
        "{name}: unsupported dtype {descr:?} (use float32, float16, float64, an integer type or bool, little-endian)"
    )]
    UnsupportedDtype {
        /// The array name.
        name: String,
        /// numpy's descr string.
        descr: String,
    },
    /// The archive could not be read.
    #[error("{path}: not a readable .npz archive: {why}")]
    Archive {
        /// The archive path.
        path: String,
        /// What is wrong.
        why: String,
    },
    /// File system error.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The cause.
        source: std::io::Error,
    },
}

/// Element type of an array.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DType {
    F16,
    F32,
    F64,
    I8,
    U8,
    I16,
    U16,
    I32,
    U32,
    I64,
    U64,
    Bool,
}

impl DType {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            DType::I8 | DType::U8 | DType::Bool => 1,
            DType::F16 | DType::I16 | DType::U16 => 2,
            DType::F32 | DType::I32 | DType::U32 => 4,
            DType::F64 | DType::I64 | DType::U64 => 8,
        }
    }

    /// numpy's name.
    pub fn name(self) -> &'static str {
        match self {
            DType::F16 => "float16",
            DType::F32 => "float32",
            DType::F64 => "float64",
            DType::I8 => "int8",
            DType::U8 => "uint8",
            DType::I16 => "int16",
            DType::U16 => "uint16",
            DType::I32 => "int32",
            DType::U32 => "uint32",
            DType::I64 => "int64",
            DType::U64 => "uint64",
            DType::Bool => "bool",
        }
    }
}

/// An array in C order with little-endian elements.
#[derive(Clone, Debug, PartialEq)]
pub struct Array {
    /// Element type.
    pub dtype: DType,
    /// Dimensions (empty for a scalar).
    pub shape: Vec<usize>,
    /// `product(shape) * dtype.size()` bytes.
    pub data: Vec<u8>,
}

impl Array {
    /// Number of elements.
    pub fn len(&self) -> usize {
        self.shape.iter().product()
    }

    /// Whether the array has no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn chunks<const N: usize>(&self) -> impl Iterator<Item = [u8; N]> + '_ {
        self.data.chunks_exact(N).map(|c| c.try_into().expect("chunk of N bytes"))
    }

    /// The elements converted to f64 (exact for every dtype but 64-bit integers beyond 2^53).
    pub fn to_f64(&self) -> Vec<f64> {
        match self.dtype {
            DType::F16 => self.chunks::<2>().map(|b| half::f16::from_le_bytes(b).to_f64()).collect(),
            DType::F32 => self.chunks::<4>().map(|b| f32::from_le_bytes(b) as f64).collect(),
            DType::F64 => self.chunks::<8>().map(f64::from_le_bytes).collect(),
            DType::I8 => self.data.iter().map(|&b| b as i8 as f64).collect(),
            DType::U8 | DType::Bool => self.data.iter().map(|&b| b as f64).collect(),
            DType::I16 => self.chunks::<2>().map(|b| i16::from_le_bytes(b) as f64).collect(),
            DType::U16 => self.chunks::<2>().map(|b| u16::from_le_bytes(b) as f64).collect(),
            DType::I32 => self.chunks::<4>().map(|b| i32::from_le_bytes(b) as f64).collect(),
            DType::U32 => self.chunks::<4>().map(|b| u32::from_le_bytes(b) as f64).collect(),
            DType::I64 => self.chunks::<8>().map(|b| i64::from_le_bytes(b) as f64).collect(),
            DType::U64 => self.chunks::<8>().map(|b| u64::from_le_bytes(b) as f64).collect(),
        }
    }

    /// f32 elements (exact for f32 and f16 arrays), or `None` for other dtypes.
    pub fn as_f32(&self) -> Option<Vec<f32>> {
        match self.dtype {
            DType::F32 => Some(self.chunks::<4>().map(f32::from_le_bytes).collect()),
            DType::F16 => Some(self.chunks::<2>().map(|b| half::f16::from_le_bytes(b).to_f32()).collect()),
            _ => None,
        }
    }

    /// Raw 16-bit elements (f16 bits), or `None` for other sizes.
    pub fn as_u16(&self) -> Option<Vec<u16>> {
        (self.dtype.size() == 2).then(|| self.chunks::<2>().map(u16::from_le_bytes).collect())
    }

    /// Elements as i64 (integers and bools), or `None` for float dtypes.
    pub fn as_i64(&self) -> Option<Vec<i64>> {
        match self.dtype {
            DType::F16 | DType::F32 | DType::F64 => None,
            DType::U64 => Some(self.chunks::<8>().map(|b| u64::from_le_bytes(b) as i64).collect()),
            _ => Some(self.to_f64().into_iter().map(|v| v as i64).collect()),
        }
    }
}

fn malformed(name: &str, why: impl Into<String>) -> NpyError {
    NpyError::Malformed { name: name.to_string(), why: why.into() }
}

/// Our element type of numpy's type string (`<f4`, `|b1`, `>i8`, ...).
fn dtype_of(t: &npyz::TypeStr) -> Option<DType> {
    Some(match (t.type_char(), t.size_field()) {
        (TypeChar::Float, 2) => DType::F16,
        (TypeChar::Float, 4) => DType::F32,
        (TypeChar::Float, 8) => DType::F64,
        (TypeChar::Int, 1) => DType::I8,
        (TypeChar::Uint, 1) => DType::U8,
        (TypeChar::Int, 2) => DType::I16,
        (TypeChar::Uint, 2) => DType::U16,
        (TypeChar::Int, 4) => DType::I32,
        (TypeChar::Uint, 4) => DType::U32,
        (TypeChar::Int, 8) => DType::I64,
        (TypeChar::Uint, 8) => DType::U64,
        (TypeChar::Bool, 1) => DType::Bool,
        _ => return None,
    })
}

/// The elements of `file` in C order as little-endian bytes.
fn le_bytes<T: npyz::Deserialize + Copy, const N: usize>(
    file: NpyFile<&[u8]>,
    shape: &[usize],
    to_le: fn(T) -> [u8; N],
) -> std::io::Result<Vec<u8>> {
    let fortran = file.order() == Order::Fortran;
    let values: Vec<T> = file.into_vec()?;
    let values = if fortran && shape.len() > 1 {
        use ndarray::ShapeBuilder;
        let a = ndarray::ArrayD::from_shape_vec(ndarray::IxDyn(shape).f(), values)
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e.to_string()))?;
        a.iter().copied().collect()
    } else {
        values
    };
    Ok(values.into_iter().flat_map(to_le).collect())
}

/// Parses one `.npy` file's bytes; `name` is used in errors.
pub fn parse_npy(name: &str, bytes: &[u8]) -> Result<Array, NpyError> {
    if bytes.len() < 10 || &bytes[..6] != b"\x93NUMPY" {
        return Err(malformed(name, "missing the \\x93NUMPY magic"));
    }
    // Checked before npyz sees the header: it must fit in the bytes (npyz allocates the declared
    // length), must not nest deeper than a plain array's header (npyz parses it recursively), and
    // its numbers must hold at most 19 digits in all, so that the element count (their product,
    // which npyz computes unchecked) is below 10^19 < 2^64.
    let (header_len, start): (usize, usize) = match bytes[6] {
        1 => (u16::from_le_bytes([bytes[8], bytes[9]]) as usize, 10),
        _ => match bytes.get(8..12) {
            Some(b) => (u32::from_le_bytes(b.try_into().expect("4 bytes")) as usize, 12),
            None => return Err(malformed(name, "truncated header length")),
        },
    };
    let header =
        bytes.get(start..start.saturating_add(header_len)).ok_or_else(|| malformed(name, "truncated header"))?;
    if header.iter().filter(|&&b| matches!(b, b'(' | b'[' | b'{')).count() > 16 {
        return Err(malformed(name, "header nests too deeply for a plain array"));
    }
    if header.iter().filter(|b| b.is_ascii_digit()).count() > 19 {
        return Err(malformed(name, "the shape declares more elements than an array can hold"));
    }
    let mut data = bytes;
    let header = NpyHeader::from_reader(&mut data).map_err(|e| malformed(name, e.to_string()))?;
    let descr = header.dtype().descr();
    let dtype = match header.dtype() {
        npyz::DType::Plain(t) => dtype_of(&t),
        _ => None,
    }
    .ok_or_else(|| NpyError::UnsupportedDtype { name: name.to_string(), descr })?;
    let shape = header
        .shape()
        .iter()
        .map(|&d| usize::try_from(d).map_err(|_| malformed(name, "dimension overflows")))
        .collect::<Result<Vec<_>, _>>()?;
    let count = shape
        .iter()
        .try_fold(1usize, |a, &d| a.checked_mul(d))
        .ok_or_else(|| malformed(name, "element count overflows"))?;
    let nbytes = count.checked_mul(dtype.size()).ok_or_else(|| malformed(name, "byte size overflows"))?;
    if data.len() < nbytes {
        return Err(malformed(name, format!("data has {} bytes, the header declares {nbytes}", data.len())));
    }
    let file = NpyFile::with_header(header, data);
    let data = match dtype {
        DType::F16 => le_bytes(file, &shape, half::f16::to_le_bytes),
        DType::F32 => le_bytes(file, &shape, f32::to_le_bytes),
        DType::F64 => le_bytes(file, &shape, f64::to_le_bytes),
        DType::I8 => le_bytes(file, &shape, i8::to_le_bytes),
        DType::U8 => le_bytes(file, &shape, u8::to_le_bytes),
        DType::I16 => le_bytes(file, &shape, i16::to_le_bytes),
        DType::U16 => le_bytes(file, &shape, u16::to_le_bytes),
        DType::I32 => le_bytes(file, &shape, i32::to_le_bytes),
        DType::U32 => le_bytes(file, &shape, u32::to_le_bytes),
        DType::I64 => le_bytes(file, &shape, i64::to_le_bytes),
        DType::U64 => le_bytes(file, &shape, u64::to_le_bytes),
        DType::Bool => le_bytes(file, &shape, |b: bool| [b as u8]),
    }
    .map_err(|e| malformed(name, e.to_string()))?;
    Ok(Array { dtype, shape, data })
}

/// Reads a `.npz` archive from bytes: `(name, array)` pairs in archive order, names without `.npy`.
pub fn parse_npz(path: &str, bytes: &[u8]) -> Result<Vec<(String, Array)>, NpyError> {
    let archive_err = |why: String| NpyError::Archive { path: path.to_string(), why };
    let mut zip = zip::ZipArchive::new(std::io::Cursor::new(bytes)).map_err(|e| archive_err(e.to_string()))?;
    let mut out = Vec::with_capacity(zip.len());
    for i in 0..zip.len() {
        let mut file = zip.by_index(i).map_err(|e| archive_err(e.to_string()))?;
        let name = npyz::npz::array_name_from_file_name(file.name()).unwrap_or(file.name()).to_string();
        // Never trust the declared size beyond the archive's own size.
        let limit = (bytes.len() as u64).saturating_mul(1100).min(file.size()).saturating_add(1);
        let mut buf = Vec::new();
        (&mut file).take(limit).read_to_end(&mut buf).map_err(|e| archive_err(format!("member {name}: {e}")))?;
        out.push((name.clone(), parse_npy(&name, &buf)?));
    }
    Ok(out)
}

/// Reads a `.npz` (all members) or `.npy` (one member named after the file stem) from disk.
pub fn read_arrays(path: &Path) -> Result<Vec<(String, Array)>, NpyError> {
    let shown = path.display().to_string();
    let bytes = std::fs::read(path).map_err(|source| NpyError::Io { path: shown.clone(), source })?;
    if bytes.starts_with(b"\x93NUMPY") {
        let stem = path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
        Ok(vec![(stem.clone(), parse_npy(&shown, &bytes)?)])
    } else {
        parse_npz(&shown, &bytes)
    }
}
