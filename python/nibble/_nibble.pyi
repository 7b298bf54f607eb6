"""Type stubs of the Rust extension module ``nibble._nibble`` (see ``nibble/__init__.py`` for the
documented API built on it)."""

import os
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

__version__: str

_Path = Union[str, "os.PathLike[str]"]
# name, numpy dtype name, shape, little-endian C-order bytes
_RawArray = Tuple[str, str, Sequence[int], bytes]

def quantize_file(
    input: _Path,
    output: _Path,
    *,
    method: str = "rtn_dq",
    block_size: int = 128,
    zero_point: bool = False,
    exclude: Optional[Sequence[str]] = None,
    external_data: str = "auto",
    force: bool = False,
    fsync: bool = False,
    skip_nonfinite: bool = False,
    format: str = "dq",
    accuracy_level: int = 0,
    gather_axis: Optional[int] = None,
    gather_block_size: int = 32,
    int8_layers: Optional[str] = None,
    mixed_precision: bool = False,
    calibration_data: Optional[_Path] = None,
    calibration_inputs: Optional[Sequence[Sequence[_RawArray]]] = None,
    calibration_shapes: Optional[Mapping[str, Sequence[int]]] = None,
    calibration_samples: Optional[int] = None,
    calibration_seed: int = 0,
    calibration_text: Optional[_Path] = None,
    tokenizer: Optional[_Path] = None,
    calibration_seq_len: int = 512,
    alpha_step: float = 0.1,
    clip_alpha_step: float = 0.05,
    clip_alpha_min: float = 0.5,
    fuse: bool = True,
    per_subgraph: bool = False,
    calibration_memory_mb: int = 1024,
    segment_mb: Union[int, str] = "auto",
    carry_memory_mb: int = 1024,
    verbose: bool = False,
    scale_search: bool = False,
    scale_search_clip_min: float = 1.0,
    percdamp: float = 0.01,
    gptq_batch: int = 128,
    act_order: bool = False,
    sequential: bool = False,
    target_bits: Optional[float] = None,
    segments: Optional[Tuple[int, int]] = None,
) -> Dict[str, Any]: ...
def segments(input: _Path, segment_mb: int, *, exclude: Optional[Sequence[str]] = None) -> Dict[str, Any]: ...
def merge(
    shards: Sequence[_Path],
    output: _Path,
    *,
    model: Optional[_Path] = None,
    force: bool = False,
    fsync: bool = False,
) -> Dict[str, Any]: ...
def main(argv: List[str]) -> int: ...
def inspect(path: _Path, exclude: Optional[Sequence[str]] = None) -> Dict[str, Any]: ...
def compare(
    original: _Path,
    quantized: _Path,
    seed: int = 0,
    calibration_data: Optional[_Path] = None,
    per_layer: bool = False,
    segment_mb: Union[str, int, None] = None,
    carry_memory_mb: int = 1024,
) -> Dict[str, Any]: ...
def ort_library() -> "os.PathLike[str]": ...
def simd_tier() -> str: ...

# nibble.int4 (python/nibble/int4.py): flat arrays; float16/bfloat16 as uint16 bit patterns;
# scales and zero points as float32 values of the weight's dtype, [outer, blocks, inner] order.
def int4_quantize(
    w: Any,
    format: str,
    shape: Sequence[int],
    axis: int,
    block_size: int,
    alpha: float,
    zero_point: bool,
    num_bits: int,
    codes: bool,
) -> Tuple[Optional[Any], Any, Optional[Any]]: ...
def int4_rtn(
    w: Any,
    format: str,
    shape: Sequence[int],
    axis: int,
    block_size: int,
    scale: Any,
    zero_point: Optional[Any],
    num_bits: int,
) -> Any: ...
def int4_dq_tensor(
    codes: Any,
    signed: bool,
    shape: Sequence[int],
    axis: int,
    block_size: int,
    scale: Any,
    zero_point: Optional[Any],
    format: str,
) -> Any: ...
