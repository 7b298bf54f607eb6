//! The Rust side of `nibble.int4` (ModelOpt's `find_scales`, `rtn`, `dq_tensor`, `quant_tensor`):
//! flat numpy arrays in (borrowed, zero-copy: float32 as `float32`, float16 and bfloat16 as their
//! `uint16` bit patterns), [`nibble::tensor`] run with the GIL released on every core, flat numpy
//! arrays out. The large outputs (codes, dequantized values) are fresh numpy arrays that the kernels
//! write in place: numpy's allocator asks the kernel for transparent huge pages on arrays of 4 MiB
//! and more (`madvise(MADV_HUGEPAGE)`), so the first write into a 64 MiB output takes 32 page
//! faults, not 16384 (which cost more than the dequantization itself when the output was a Rust
//! vector). Shapes, dtypes and ModelOpt's argument checks are the Python layer's
//! (`python/nibble/int4.py`).

use half::slice::HalfBitsSliceExt;
use half::{bf16, f16};
use nibble::tensor::{self, Blocking, Dequantized};
use nibble::{Bits, BlockSize, WeightData};
use numpy::{AsSliceError, Element, PyArray1, PyArrayMethods, PyReadonlyArray1};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;

/// A flat weight as Python hands it over.
enum Flat<'py> {
    F32(PyReadonlyArray1<'py, f32>),
    Bits16(PyReadonlyArray1<'py, u16>, bool),
}

impl<'py> Flat<'py> {
    /// `format`: "float32", "float16" or "bfloat16"; the last two given as uint16 bit patterns.
    fn new(w: &Bound<'py, PyAny>, format: &str) -> PyResult<Flat<'py>> {
        Ok(match format {
            "float32" => Flat::F32(w.extract()?),
            "float16" => Flat::Bits16(w.extract()?, false),
            "bfloat16" => Flat::Bits16(w.extract()?, true),
            other => return Err(PyValueError::new_err(format!("nibble.int4: unsupported dtype {other}"))),
        })
    }

    fn data(&self) -> PyResult<WeightData<'_>> {
        Ok(match self {
            Flat::F32(a) => WeightData::F32(a.as_slice().map_err(slice_error)?),
            Flat::Bits16(a, false) => WeightData::F16(a.as_slice().map_err(slice_error)?.reinterpret_cast::<f16>()),
            Flat::Bits16(a, true) => WeightData::BF16(a.as_slice().map_err(slice_error)?.reinterpret_cast::<bf16>()),
        })
    }
}

fn bits(num_bits: u32) -> PyResult<Bits> {
    Bits::from_count(num_bits)
        .ok_or_else(|| PyValueError::new_err(format!("num_bits={num_bits}: nibble.int4 supports 4 and 8")))
}

fn blocking(shape: &[usize], axis: usize, block_size: i64) -> PyResult<Blocking> {
    let block = match block_size {
        -1 => BlockSize::PerChannel,
        b if b >= 1 => BlockSize::Blocked(b as usize),
        b => {
            return Err(PyValueError::new_err(format!(
                "block_size={b}: use a positive block size, or -1 for per-channel"
            )))
        }
    };
    Blocking::new(shape, axis, block).map_err(|e| PyValueError::new_err(e.to_string()))
}

fn slice_error(e: AsSliceError) -> PyErr {
    PyValueError::new_err(format!("nibble.int4: {e}"))
}

/// A fresh zero-filled numpy array of `n` elements and what `fill` returns after writing into it
/// with the GIL released.
fn fresh<'py, T: Element + Send, R: Send, E: Send>(
    py: Python<'py>,
    n: usize,
    fill: impl FnOnce(&mut [T]) -> Result<R, E> + Send,
    error: impl FnOnce(E) -> PyErr,
) -> PyResult<(Bound<'py, PyArray1<T>>, R)> {
    let out = PyArray1::<T>::zeros(py, n, false);
    let r = {
        let mut guard = out.readwrite();
        let slice = guard.as_slice_mut().map_err(slice_error)?;
        py.detach(|| fill(slice)).map_err(error)?
    };
    Ok((out, r))
}

fn value_error(what: &str) -> impl Fn(nibble::Error) -> PyErr + '_ {
    move |e| PyValueError::new_err(format!("{what}: {e}"))
}

type Quantized<'py> = (Option<Bound<'py, PyArray1<u8>>>, Bound<'py, PyArray1<f32>>, Option<Bound<'py, PyArray1<f32>>>);

/// `find_scales` (`codes=False`) or `quant_tensor` (`codes=True`) of the flat row-major `w` of
/// `shape`: returns `(codes or None, scales, zero points or None)`, flat, scales and zero points as
/// float32 values of `w`'s dtype in `[outer, blocks, inner]` order.
#[pyfunction]
#[pyo3(signature = (w, format, shape, axis, block_size, alpha, zero_point, num_bits, codes))]
#[allow(clippy::too_many_arguments)]
pub fn int4_quantize<'py>(
    py: Python<'py>,
    w: &Bound<'py, PyAny>,
    format: &str,
    shape: Vec<usize>,
    axis: usize,
    block_size: i64,
    alpha: f64,
    zero_point: bool,
    num_bits: u32,
    codes: bool,
) -> PyResult<Quantized<'py>> {
    let flat = Flat::new(w, format)?;
    let data = flat.data()?;
    let b = blocking(&shape, axis, block_size)?;
    let bits = bits(num_bits)?;
    let (q, s) = if codes {
        let quantize = |q: &mut [u8]| tensor::quant_tensor(data, b, alpha, zero_point, bits, q);
        let (q, s) = fresh(py, b.elements(), quantize, value_error("w"))?;
        (Some(q), s)
    } else {
        (None, py.detach(|| tensor::find_scales(data, b, alpha, zero_point, bits)).map_err(value_error("w"))?)
    };
    Ok((q, PyArray1::from_vec(py, s.scale), s.zero_point.map(|z| PyArray1::from_vec(py, z))))
}

/// `rtn` of the flat `w` with flat scales (and zero points) given as float32 values of `w`'s dtype,
/// `[outer, blocks, inner]` order: the codes, flat, one byte per element.
#[pyfunction]
#[pyo3(signature = (w, format, shape, axis, block_size, scale, zero_point, num_bits))]
#[allow(clippy::too_many_arguments)]
pub fn int4_rtn<'py>(
    py: Python<'py>,
    w: &Bound<'py, PyAny>,
    format: &str,
    shape: Vec<usize>,
    axis: usize,
    block_size: i64,
    scale: PyReadonlyArray1<'py, f32>,
    zero_point: Option<PyReadonlyArray1<'py, f32>>,
    num_bits: u32,
) -> PyResult<Bound<'py, PyArray1<u8>>> {
    let flat = Flat::new(w, format)?;
    let data = flat.data()?;
    let b = blocking(&shape, axis, block_size)?;
    let bits = bits(num_bits)?;
    let s = scale.as_slice().map_err(slice_error)?;
    let z = zero_point.as_ref().map(|z| z.as_slice()).transpose().map_err(slice_error)?;
    Ok(fresh(py, b.elements(), |q| tensor::rtn(data, b, s, z, bits, q), value_error("w"))?.0)
}

/// `dq_tensor` of flat codes (`signed`: int8, else uint8) with flat scales (and zero points) held as
/// float32 values of `format`: the dequantized values, flat, float32 (or uint16 bit patterns of
/// float16/bfloat16).
#[pyfunction]
#[pyo3(signature = (codes, signed, shape, axis, block_size, scale, zero_point, format))]
#[allow(clippy::too_many_arguments)]
pub fn int4_dq_tensor<'py>(
    py: Python<'py>,
    codes: PyReadonlyArray1<'py, u8>,
    signed: bool,
    shape: Vec<usize>,
    axis: usize,
    block_size: i64,
    scale: PyReadonlyArray1<'py, f32>,
    zero_point: Option<PyReadonlyArray1<'py, f32>>,
    format: &str,
) -> PyResult<Bound<'py, PyAny>> {
    let b = blocking(&shape, axis, block_size)?;
    let q = codes.as_slice().map_err(slice_error)?;
    let s = scale.as_slice().map_err(slice_error)?;
    let z = zero_point.as_ref().map(|z| z.as_slice()).transpose().map_err(slice_error)?;
    let n = b.elements();
    let dq = |out: Dequantized<'_>| tensor::dq_tensor(q, signed, b, s, z, out);
    match format {
        "float32" => {
            Ok(fresh(py, n, |out: &mut [f32]| dq(Dequantized::F32(out)), value_error("dq_tensor"))?.0.into_any())
        }
        "float16" => Ok(fresh(
            py,
            n,
            |out: &mut [u16]| dq(Dequantized::F16(out.reinterpret_cast_mut::<f16>())),
            value_error("dq_tensor"),
        )?
        .0
        .into_any()),
        "bfloat16" => Ok(fresh(
            py,
            n,
            |out: &mut [u16]| dq(Dequantized::BF16(out.reinterpret_cast_mut::<bf16>())),
            value_error("dq_tensor"),
        )?
        .0
        .into_any()),
        other => Err(PyValueError::new_err(format!("nibble.int4: unsupported dtype {other}"))),
    }
}
