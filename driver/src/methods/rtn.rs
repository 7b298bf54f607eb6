//! Round to nearest (ModelOpt's `rtn`/`rtn_dq` numbers): one planned weight straight from its
//! stored bytes to INT4/INT8 codes, scales and zero points, through the kernel crate
//! ([`nibble::quantize_weight`]: `scale = amax / 7` per block, or `(max - min) / 15` with a zero point),
//! or with the data-free scale search (`--scale-search`).

use crate::error::{Error, Result};
use crate::graph::model::dtype_name;
use crate::graph::model::Model;
use crate::plan::{Candidate, Decision};
use bytes::Bytes;
use nibble::scale_search::ScaleGrid;
use nibble::{BlockSize, FloatFormat, QuantParams, QuantizedWeight, WeightData};

/// The weight's elements, borrowed when aligned, copied otherwise.
enum Elements {
    F32(Vec<f32>),
    F16(Vec<half::f16>),
    BF16(Vec<half::bf16>),
    Borrowed,
}

fn weight_data<'a>(format: FloatFormat, bytes: &'a Bytes, copy: &'a mut Elements) -> WeightData<'a> {
    match format {
        FloatFormat::F32 => match bytemuck::try_cast_slice::<u8, f32>(bytes) {
            Ok(v) => WeightData::F32(v),
            Err(_) => {
                *copy =
                    Elements::F32(bytes.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect());
                match copy {
                    Elements::F32(v) => WeightData::F32(v),
                    _ => unreachable!(),
                }
            }
        },
        FloatFormat::F16 => match bytemuck::try_cast_slice::<u8, half::f16>(bytes) {
            Ok(v) => WeightData::F16(v),
            Err(_) => {
                *copy = Elements::F16(bytes.chunks_exact(2).map(|c| half::f16::from_le_bytes([c[0], c[1]])).collect());
                match copy {
                    Elements::F16(v) => WeightData::F16(v),
                    _ => unreachable!(),
                }
            }
        },
        FloatFormat::BF16 => match bytemuck::try_cast_slice::<u8, half::bf16>(bytes) {
            Ok(v) => WeightData::BF16(v),
            Err(_) => {
                *copy =
                    Elements::BF16(bytes.chunks_exact(2).map(|c| half::bf16::from_le_bytes([c[0], c[1]])).collect());
                match copy {
                    Elements::BF16(v) => WeightData::BF16(v),
                    _ => unreachable!(),
                }
            }
        },
    }
}

/// Quantizes one candidate weight (`block` is the run's; an INT8 layer takes one block per channel).
pub fn quantize_candidate(model: &Model, c: &Candidate, block: BlockSize, zero_point: bool) -> Result<QuantizedWeight> {
    quantize_candidate_with(model, c, block, zero_point, None)
}

/// [`quantize_candidate`], with the data-free scale search over `scale_search` if given
/// ([`nibble::scale_search::scale_search_weight`]: per block, the scale of ModelOpt's 15-level and
/// ONNX Runtime's 16-level grids at the grid's clip ratios with the lowest weight reconstruction
/// error; 16-level scales can be negative, `extreme / -8`).
pub fn quantize_candidate_with(
    model: &Model,
    c: &Candidate,
    block: BlockSize,
    zero_point: bool,
    scale_search: Option<&ScaleGrid>,
) -> Result<QuantizedWeight> {
    let Decision::Quantize { axis } = c.decision else { unreachable!("only planned weights") };
    let format = c.format().ok_or_else(|| Error::UnsupportedDtype {
        tensor: c.weight.clone(),
        node: c.node.clone(),
        dtype: dtype_name(c.dtype),
    })?;
    let bytes = c.data(model)?;
    let mut copy = Elements::Borrowed;
    let data = weight_data(format, &bytes, &mut copy);
    let shape = [c.dims[0] as usize, c.dims[1] as usize];
    let params = QuantParams { block_size: c.block(block), axis, zero_point, alpha: 1.0, bits: c.bits };
    if let Some(grid) = scale_search {
        return nibble::scale_search::scale_search_weight(data, shape, &params, grid, None)
            .map_err(|e| Error::kernel(&c.weight, e));
    }
    nibble::quantize_weight(data, shape, &params).map_err(|e| Error::kernel(&c.weight, e))
}
