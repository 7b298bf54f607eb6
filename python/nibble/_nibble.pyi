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
    calibration_samples: int = 8,
    calibration_seed: int = 0,
    alpha_step: float = 0.1,
    clip_alpha_step: float = 0.05,
    clip_alpha_min: float = 0.5,
    fuse: bool = True,
    per_subgraph: bool = False,
    calibration_memory_mb: int = 1024,
    verbose: bool = False,
    scale_search: bool = False,
    scale_search_clip_min: float = 1.0,
    percdamp: float = 0.01,
    gptq_batch: int = 128,
    act_order: bool = False,
    sequential: bool = False,
    target_bits: Optional[float] = None,
) -> Dict[str, Any]: ...
def main(argv: List[str]) -> int: ...
def inspect(path: _Path, exclude: Optional[Sequence[str]] = None) -> Dict[str, Any]: ...
def compare(
    original: _Path,
    quantized: _Path,
    seed: int = 0,
    calibration_data: Optional[_Path] = None,
    per_layer: bool = False,
) -> Dict[str, Any]: ...
def ort_library() -> "os.PathLike[str]": ...
def simd_tier() -> str: ...
