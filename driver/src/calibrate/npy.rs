//! Reading `.npy` arrays and `.npz` archives (numpy's formats), for calibration data and test data.
//!
//! Supported: format versions 1-3, little-endian or byte-order-free dtypes
//! `f2 f4 f8 i1 u1 i2 u2 i4 u4 i8 u8 b1`, C or Fortran order (Fortran arrays are returned in C order),
//! stored or deflated archive members. Every length and offset is checked; malformed input is an
//! [`NpyError`], never a panic.

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
    fn parse(descr: &str) -> Option<DType> {
        // The first character is the byte order (any character, not a byte: fuzzing found a
        // multi-byte one).
        let mut chars = descr.chars();
        if !matches!(chars.next()?, '<' | '|' | '=') {
            return None;
        }
        let code = chars.as_str();
        Some(match code {
            "f2" => DType::F16,
            "f4" => DType::F32,
            "f8" => DType::F64,
            "i1" => DType::I8,
            "u1" => DType::U8,
            "i2" => DType::I16,
            "u2" => DType::U16,
            "i4" => DType::I32,
            "u4" => DType::U32,
            "i8" => DType::I64,
            "u8" => DType::U64,
            "b1" => DType::Bool,
            _ => return None,
        })
    }

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

/// Parses one `.npy` file's bytes; `name` is used in errors.
pub fn parse_npy(name: &str, bytes: &[u8]) -> Result<Array, NpyError> {
    if bytes.len() < 10 || &bytes[..6] != b"\x93NUMPY" {
        return Err(malformed(name, "missing the \\x93NUMPY magic"));
    }
    let major = bytes[6];
    let (header_len, start): (usize, usize) = match major {
        1 => (u16::from_le_bytes([bytes[8], bytes[9]]) as usize, 10),
        2 | 3 => {
            let b = bytes.get(8..12).ok_or_else(|| malformed(name, "truncated header length"))?;
            (u32::from_le_bytes(b.try_into().expect("4 bytes")) as usize, 12)
        }
        v => return Err(malformed(name, format!("unsupported format version {v}"))),
    };
    let end = start.checked_add(header_len).ok_or_else(|| malformed(name, "header length overflows"))?;
    let header = bytes.get(start..end).ok_or_else(|| malformed(name, "truncated header"))?;
    let header = std::str::from_utf8(header).map_err(|_| malformed(name, "header is not text"))?;
    let descr = dict_value(header, "descr").ok_or_else(|| malformed(name, "header has no 'descr'"))?;
    let descr = descr.trim().trim_matches(|c| c == '\'' || c == '"').to_string();
    let fortran = match dict_value(header, "fortran_order").map(str::trim) {
        Some("True") => true,
        Some("False") => false,
        _ => return Err(malformed(name, "header has no valid 'fortran_order'")),
    };
    let shape_text = dict_value(header, "shape").ok_or_else(|| malformed(name, "header has no 'shape'"))?;
    let shape_text = shape_text.trim();
    let inner = shape_text
        .strip_prefix('(')
        .and_then(|s| s.strip_suffix(')'))
        .ok_or_else(|| malformed(name, format!("shape {shape_text:?} is not a tuple")))?;
    let shape = inner
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| s.parse::<usize>().map_err(|_| malformed(name, format!("bad dimension {s:?}"))))
        .collect::<Result<Vec<_>, _>>()?;
    let dtype = DType::parse(&descr).ok_or_else(|| NpyError::UnsupportedDtype { name: name.to_string(), descr })?;
    let count = shape
        .iter()
        .try_fold(1usize, |a, &d| a.checked_mul(d))
        .ok_or_else(|| malformed(name, "element count overflows"))?;
    let nbytes = count.checked_mul(dtype.size()).ok_or_else(|| malformed(name, "byte size overflows"))?;
    let data = bytes.get(end..).unwrap_or(&[]);
    if data.len() < nbytes {
        return Err(malformed(name, format!("data has {} bytes, the header declares {nbytes}", data.len())));
    }
    let mut data = data[..nbytes].to_vec();
    if fortran && shape.len() > 1 {
        data = fortran_to_c(&data, &shape, dtype.size());
    }
    Ok(Array { dtype, shape, data })
}

/// Reorders a Fortran-order buffer into C order.
fn fortran_to_c(data: &[u8], shape: &[usize], size: usize) -> Vec<u8> {
    let count: usize = shape.iter().product();
    let mut out = vec![0u8; data.len()];
    let mut index = vec![0usize; shape.len()];
    for c_pos in 0..count {
        // Fortran offset of the C-order multi-index.
        let mut f_pos = 0;
        let mut stride = 1;
        for (i, &d) in index.iter().zip(shape) {
            f_pos += i * stride;
            stride *= d;
        }
        out[c_pos * size..(c_pos + 1) * size].copy_from_slice(&data[f_pos * size..(f_pos + 1) * size]);
        for axis in (0..shape.len()).rev() {
            index[axis] += 1;
            if index[axis] < shape[axis] {
                break;
            }
            index[axis] = 0;
        }
    }
    out
}

/// The text of `'key': value` in a Python dict literal, up to the next top-level comma.
fn dict_value<'a>(header: &'a str, key: &str) -> Option<&'a str> {
    let pos = header.find(&format!("'{key}'")).or_else(|| header.find(&format!("\"{key}\"")))?;
    let rest = &header[pos + key.len() + 2..];
    let rest = rest.trim_start().strip_prefix(':')?;
    let mut depth = 0i32;
    for (i, ch) in rest.char_indices() {
        match ch {
            '(' | '[' | '{' => depth += 1,
            ')' | ']' => depth -= 1,
            '}' if depth == 0 => return Some(&rest[..i]),
            '}' => depth -= 1,
            ',' if depth == 0 => return Some(&rest[..i]),
            _ => {}
        }
    }
    Some(rest)
}

/// Reads a `.npz` archive from bytes: `(name, array)` pairs in archive order, names without `.npy`.
pub fn parse_npz(path: &str, bytes: &[u8]) -> Result<Vec<(String, Array)>, NpyError> {
    let archive_err = |why: String| NpyError::Archive { path: path.to_string(), why };
    let mut zip = zip::ZipArchive::new(std::io::Cursor::new(bytes)).map_err(|e| archive_err(e.to_string()))?;
    let mut out = Vec::with_capacity(zip.len());
    for i in 0..zip.len() {
        let mut file = zip.by_index(i).map_err(|e| archive_err(e.to_string()))?;
        let name = file.name().trim_end_matches(".npy").to_string();
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
