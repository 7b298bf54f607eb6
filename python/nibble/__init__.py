"""nibble: 4-bit (INT4/UINT4, block-wise) weight quantization of ONNX models on CPU.

Two ways in:

- ``nibble.quantize(onnx_path, calibration_method=..., calibration_data_reader=..., ...)``: NVIDIA
  ModelOpt's ``modelopt.onnx.quantization.int4.quantize`` call (same arguments, same defaults, same
  output graph), returning an ``onnx.ModelProto``. Switching is one changed import.
- ``nibble.quantize_file(input, output, method=..., ...)``: the fast path for big models, straight
  from file to file with no ``ModelProto`` in Python memory; ``nibble.inspect`` and
  ``nibble.compare`` beside it. All return plain ``dict``/``list`` data.

Quantization (per block of ``block_size`` rows along K of a ``[K, N]`` MatMul/Gemm weight ``W``):
symmetric ``s = amax(|W_block|) / 7``, ``q = clip(round_half_even(W / s), -8, 7)`` stored as INT4; with
a zero point ``s = (max - min) / 15``, ``zp = clip(-round(min / s), 0, 15)``, UINT4. AWQ (Lin et al.,
"AWQ: Activation-aware Weight Quantization", 2023) adds per-input-channel pre-quant scales
(``awq_lite``), per-block clip ratios (``awq_clip``) or both (``awq_full``), calibrated by running the
model in ONNX Runtime.

Errors: ``ValueError`` (bad options, model or calibration data), ``OSError`` and its subclasses
(files: ``FileNotFoundError``, ``FileExistsError``, ...), ``RuntimeError`` (ONNX Runtime), each with
nibble's message naming the file, node or tensor and the fix. Ctrl-C raises ``KeyboardInterrupt``
and leaves no output file.

ONNX Runtime's shared library is the one inside the installed ``onnxruntime`` package (or
``$ORT_DYLIB_PATH`` when set).
"""

from __future__ import annotations

import glob
import importlib.util
import os
import shutil
import tempfile
import warnings
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

__all__ = ["quantize", "quantize_file", "merge", "segments", "inspect", "compare", "main", "ort_library", "__version__"]

PathLike = Union[str, "os.PathLike[str]"]


def _find_onnxruntime_library() -> Optional[str]:
    """The shared library inside the installed ``onnxruntime`` package, located without importing
    it (``importlib.util.find_spec`` needs no numpy), or None."""
    try:
        spec = importlib.util.find_spec("onnxruntime")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.origin:
        return None
    capi = os.path.join(os.path.dirname(spec.origin), "capi")
    patterns = ("libonnxruntime.so.*", "libonnxruntime.*.dylib", "libonnxruntime.dylib", "onnxruntime.dll")
    found = sorted(p for pattern in patterns for p in glob.glob(os.path.join(capi, pattern)))
    return found[-1] if found else None


# The Rust side looks up $ORT_DYLIB_PATH first: point it at this interpreter's onnxruntime
# (an explicit setting wins).
if not os.environ.get("ORT_DYLIB_PATH"):
    _lib = _find_onnxruntime_library()
    if _lib is not None:
        os.environ["ORT_DYLIB_PATH"] = _lib

from . import _nibble  # noqa: E402  (after the library lookup above)

__version__: str = _nibble.__version__

Sample = Mapping[str, Any]
"""One calibration sample: model input name -> numpy array (or anything ``numpy.asarray`` takes)."""


def ort_library() -> str:
    """The path of the ONNX Runtime shared library nibble loads (``RuntimeError`` if none is found)."""
    return os.fspath(_nibble.ort_library())


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Runs the ``nibble`` command line (``argv`` without the program name; default ``sys.argv[1:]``)
    and returns its exit code: 0 done, 1 error, 2 usage error. Same options and output as the
    ``nibble`` binary. It installs the command's signal handler: from then on Ctrl-C (SIGINT) and
    SIGTERM remove partial outputs and exit the whole process with code 130, as the binary does."""
    import sys

    args = list(sys.argv[1:] if argv is None else argv)
    sys.stdout.flush()
    sys.stderr.flush()
    return int(_nibble.main(["nibble", *args]))


# ---------------------------------------------------------------------------------------------
# Calibration data from Python objects


def _read_samples(data: Any) -> List[Sample]:
    """Every sample of an ONNX Runtime ``CalibrationDataReader`` (``get_next()`` until None) or of
    an iterable of dicts."""
    if hasattr(data, "get_next"):
        samples = []
        while True:
            item = data.get_next()
            if item is None:
                break
            samples.append(item)
        return samples
    if isinstance(data, Mapping):
        raise ValueError(
            "calibration data: got one dict; pass a list of dicts (one per sample) or a reader with get_next()"
        )
    try:
        return list(data)
    except TypeError:
        raise ValueError(
            f"calibration data: {type(data).__name__} is neither a path, a reader with get_next() nor a list of dicts"
        ) from None


def _raw_samples(data: Any) -> List[List[tuple]]:
    """Samples as (name, numpy dtype name, shape, little-endian C-order bytes) for the Rust side."""
    try:
        import numpy as np
    except ImportError:
        raise ImportError(
            "calibration data from a reader or a list of dicts needs numpy: pip install numpy"
        ) from None
    out = []
    for i, sample in enumerate(_read_samples(data)):
        if not isinstance(sample, Mapping):
            raise ValueError(
                f"calibration sample {i}: {type(sample).__name__}, not a dict of input name -> array"
            )
        arrays = []
        for name, value in sample.items():
            a = np.asarray(value)
            if a.dtype.kind not in "fiub":
                raise ValueError(
                    f"calibration sample {i}, input '{name}': dtype {a.dtype} is not numeric; "
                    "give float32, float16, int64, int32 or bool arrays"
                )
            a = np.ascontiguousarray(a.astype(a.dtype.newbyteorder("<"), copy=False))
            arrays.append((str(name), a.dtype.name, [int(d) for d in a.shape], a.tobytes()))
        out.append(arrays)
    if not out:
        raise ValueError("calibration data: the reader or list holds no samples")
    return out


def _calibration(calibration_data: Any) -> Dict[str, Any]:
    if calibration_data is None:
        return {}
    if isinstance(calibration_data, (str, bytes, os.PathLike)):
        return {"calibration_data": os.fsdecode(calibration_data)}
    return {"calibration_inputs": _raw_samples(calibration_data)}


# ---------------------------------------------------------------------------------------------
# The Pythonic API


def quantize_file(
    input: PathLike,
    output: Optional[PathLike] = None,
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
    accuracy_level: Optional[int] = None,
    gather_axis: Optional[int] = None,
    gather_block_size: int = 32,
    int8_layers: Optional[Union[str, Sequence[str]]] = None,
    mixed_precision: bool = False,
    calibration_data: Any = None,
    calibration_shapes: Optional[Mapping[str, Sequence[int]]] = None,
    calibration_samples: Optional[int] = None,
    calibration_seed: int = 0,
    calibration_text: Optional[PathLike] = None,
    tokenizer: Optional[PathLike] = None,
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
    head_bits: int = 4,
    target_bits: Optional[float] = None,
    segments: Optional[Tuple[int, int]] = None,
) -> Dict[str, Any]:
    """Quantizes the MatMul/Gemm weights of the ONNX model at ``input`` and writes ``output``
    (default ``INPUT_int4.onnx`` next to the input), as ``nibble quantize`` does (same options, same
    bytes). The input is never modified; the output appears atomically or not at all.

    ``input`` may be a model folder (onnxruntime-genai's with ``genai_config.json`` or an Optimum
    export with ``config.json``): ``output`` (default ``INPUT_int4``) is then a folder with every
    other file copied byte for byte and the decoder quantized under its own name, its weights in
    ``<model>.onnx.data`` (README, "LLM folders").

    Args:
        input: the model (``.onnx``, external data next to it), or a model folder.
        output: the quantized model; with external data also ``OUTPUT_data``. For a folder input,
            the output folder.
        method: ``"rtn_dq"`` (round to nearest, DequantizeLinear), ``"rtn"`` (QuantizeLinear ->
            DequantizeLinear on the float weight), ``"awq_lite"``, ``"awq_clip"``, ``"awq_full"``, ``"gptq"`` (Frantar et al. 2022: error feedback
            through the inverse Hessian ``H = 2 X^T X / T`` of the calibration activations),
            ``"awq_gptq"`` (AWQ-lite pre-quant scales, then GPTQ on the scaled weight).
        block_size: rows of K per block (even, >= 2), or -1 for one scale per output channel.
        zero_point: UINT4 codes with a UINT4 zero point per block instead of symmetric INT4.
        exclude: regular expressions matched at the start of node names; matching nodes stay float.
            Default ``["/lm_head"]``; ``[]`` quantizes every weight.
        external_data: ``"auto"`` (``OUTPUT_data`` only above protobuf's 2 GiB), ``"always"``, ``"never"``.
        force: overwrite an existing output.
        fsync: flush the output to disk before renaming it into place.
        skip_nonfinite: leave weights holding NaN/Inf float (with a warning) instead of raising.
        format: ``"dq"`` (INT4 initializers + DequantizeLinear, opset 21, ModelOpt's form) or
            ``"matmulnbits"`` (ONNX Runtime's com.microsoft MatMulNBits).
        accuracy_level: MatMulNBits ``accuracy_level`` (0 unset, 1 fp32, 2 fp16, 3 bf16, 4 int8); default
            4 with ``format="matmulnbits"`` (as the command line and onnxruntime-genai's builder).
        gather_axis: also quantize Gather (embedding) tables, blocked along this axis (0 or 1).
        gather_block_size: block size of the Gather tables.
        int8_layers: keep these layers at INT8 per channel (ModelOpt's ``layers_8bit``): node names
            or dot/slash-separated parts of them, comma-separated or as a list.
        mixed_precision: ModelOpt's default INT8 choice (``enable_mixed_quant``).
        calibration_data: AWQ calibration inputs: a ``.npz``/``.npy`` path (arrays keyed by input
            name, samples stacked on the first axis), an ONNX Runtime ``CalibrationDataReader``
            (``get_next()`` returning ``{input name: numpy array}``, None at the end) or a list of
            such dicts (each one sample, fed to the model as is). A reader or list gives the same
            bytes as the ``.npz`` stacking its samples. Default: seeded random inputs.
        calibration_shapes: sizes of symbolic input dimensions for random calibration,
            e.g. ``{"input_ids": [1, 128]}``.
        calibration_samples: number of random calibration samples (default 8), or of windows of
            ``calibration_text`` (default 16).
        calibration_seed: seed of the random calibration samples.
        calibration_text: calibrate on this UTF-8 text (or ``.jsonl`` with a ``"text"`` field per
            line), tokenized with ``tokenizer`` and cut into ``calibration_samples`` windows of
            ``calibration_seq_len`` tokens spread evenly over it (ValueError when it is shorter,
            saying how many tokens it has).
        tokenizer: the Hugging Face ``tokenizer.json`` for ``calibration_text``; default
            ``tokenizer.json`` in the input folder or beside the model file.
        calibration_seq_len: tokens per ``calibration_text`` window.
        alpha_step: awq_lite alpha grid step in (0, 1] (ModelOpt's ``awqlite_alpha_step``).
        clip_alpha_step: awq_clip ratio grid step in (0, 1] (``awqclip_alpha_step``).
        clip_alpha_min: smallest awq_clip ratio in (0, 1] (``awqclip_alpha_min``).
        fuse: average the pre-quant scales of weights sharing an activation and fold them into the
            producing node (``awqlite_fuse_nodes``).
        per_subgraph: awq_lite searches one scale per activation on the summed loss of the weights
            sharing it (``awqlite_run_per_subgraph``).
        calibration_memory_mb: activation memory held at once during calibration, MiB.
        segment_mb: calibration by segments (``--segment-mb``): ``"auto"`` (the whole graph when the
            model's weights are small against the memory available, else segments), ``0`` (the whole
            graph) or segments of at least this many MiB of weights.
        carry_memory_mb: tensors carried between calibration segments or ``sequential`` steps held in
            memory, MiB (all samples); above it they are spilled to a temporary file
            (``--carry-memory-mb``).
        verbose: print each weight's AWQ choice to stderr.
        scale_search: choose each block's scale by a data-free search over ONNX Runtime's 16-level
            and ModelOpt's 15-level grids (rtn_dq, rtn, gptq, awq_gptq).
        scale_search_clip_min: the scale search also tries clip ratios from this one up to 1 in
            steps of 0.05 (1: no clipping; ``--scale-search-clip-min``).
        percdamp: GPTQ dampening, a fraction of the mean Hessian diagonal added to it.
        gptq_batch: GPTQ rows (input channels) per lazy batch update.
        act_order: GPTQ processes input channels by decreasing Hessian diagonal.
        sequential: GPTQ calibrates step by step, each layer group on the activations of the
            layers already quantized before it (``--sequential``).
        head_bits: code width (4 or 8) of the quantized LM head (``lm_head``, quantized when
            ``exclude`` does not match it) and of its tied embedding, whose Gathers read the head's
            bytes (``--head-bits``); ValueError for another value.
        target_bits: mean bits per parameter over the quantized weights (codes, scales and zero
            points counted), e.g. ``5.0``: each weight gets 4 or 8 bits by its output error
            ``||X (W - Q(W))||^2 / ||X W||^2`` measured on the calibration data, the set of 8-bit weights removing the most error
            within the budget (HAWQ-V3 knapsack; ``--target-bits``). Outside what the model allows (every weight
            at 4 bits .. every weight at 8): ``ValueError`` naming the range. Not with
            ``method="rtn"``, ``int8_layers``, ``mixed_precision`` or ``gather_axis``.
        segments: ``(a, b)``: write a *shard* instead of a model (``--segments A..B``): ``output``
            becomes a folder holding the results of segments ``a..b`` (0-based, inclusive) of the
            ``segment_mb`` cuts, for :func:`merge`. Needs ``segment_mb`` a number of MiB; not with ``target_bits``,
            ``sequential`` or ``method="awq_gptq"`` (``ValueError``). Returns ``{"output": folder,
            "segments": count, "range": (a, b), "first_nodes": first node of each segment,
            "segment_weights": weights of each segment, "weights": weights held, "bytes": bytes of
            results, "seconds": wall time}``.

    Returns:
        For a folder: ``{"output": folder, "layout": "onnxruntime-genai" or "Optimum", "models":
        [one dict as below per quantized model], "copied": files copied, "left_float": other .onnx
        files copied unquantized, "seconds": wall time}``. For a file:
        ``{"output": path, "quantized": weights quantized, "int8": of which INT8, "candidates":
        MatMul/Gemm weights found, "weight_bytes_before"/"weight_bytes_after": bytes of those
        weights before and of their replacements after, "model_bytes_before"/"model_bytes_after":
        model + external data bytes, "opset_raised": bool, "seconds": wall time}``; with
        ``target_bits`` also ``"target_bits"``, ``"achieved_bits"``, ``"bits_range"`` (all 4 bits,
        all 8 bits) and ``"budget_table"`` (the table ``-v`` prints: weight, shape, e4, e8, bytes at
        4 and 8 bits, chosen bits, why).

    Raises:
        ValueError: bad option, model or calibration data. OSError: unreadable input, existing
        output without ``force`` (``FileExistsError``), unwritable output. RuntimeError: ONNX
        Runtime missing or failing (AWQ methods only).
    """
    input = os.fspath(input)
    if output is None and os.path.isdir(input):
        output = os.path.normpath(input) + "_int4"
    elif output is None:
        stem = os.path.splitext(os.path.basename(input))[0] or "model"
        output = os.path.join(os.path.dirname(input), f"{stem}_int4.onnx")
    if isinstance(int8_layers, (list, tuple)):
        int8_layers = ",".join(int8_layers)
    result = _nibble.quantize_file(
        input,
        os.fspath(output),
        method=method,
        block_size=block_size,
        zero_point=zero_point,
        exclude=None if exclude is None else list(exclude),
        external_data=external_data,
        force=force,
        fsync=fsync,
        skip_nonfinite=skip_nonfinite,
        format=format,
        accuracy_level=(4 if format == "matmulnbits" else 0) if accuracy_level is None else accuracy_level,
        gather_axis=gather_axis,
        gather_block_size=gather_block_size,
        int8_layers=int8_layers,
        mixed_precision=mixed_precision,
        calibration_shapes=None
        if calibration_shapes is None
        else {str(k): [int(d) for d in v] for k, v in calibration_shapes.items()},
        calibration_samples=calibration_samples,
        calibration_seed=calibration_seed,
        calibration_text=None if calibration_text is None else os.fspath(calibration_text),
        tokenizer=None if tokenizer is None else os.fspath(tokenizer),
        calibration_seq_len=calibration_seq_len,
        alpha_step=alpha_step,
        clip_alpha_step=clip_alpha_step,
        clip_alpha_min=clip_alpha_min,
        fuse=fuse,
        per_subgraph=per_subgraph,
        calibration_memory_mb=calibration_memory_mb,
        segment_mb=segment_mb,
        carry_memory_mb=carry_memory_mb,
        verbose=verbose,
        scale_search=scale_search,
        scale_search_clip_min=scale_search_clip_min,
        percdamp=percdamp,
        gptq_batch=gptq_batch,
        act_order=act_order,
        sequential=sequential,
        head_bits=head_bits,
        target_bits=target_bits,
        segments=None if segments is None else (int(segments[0]), int(segments[1])),
        **_calibration(calibration_data),
    )
    result["output"] = os.fspath(result["output"])
    return result


def segments(input: PathLike, segment_mb: int, *, exclude: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    """The segments of the model at ``input`` cut at ``segment_mb`` MiB of weights, as
    ``quantize_file(..., segment_mb=segment_mb)`` cuts them (``nibble inspect --segment-mb N``):
    what ``segments=(a, b)`` ranges over (0-based, inclusive). Calibrates nothing.

    Returns:
        ``{"count": segments, "first_nodes": first node of each, "weights": the weights of each,
        "whole": why the graph does not cut (``None`` when it does), "table": one line per segment}``.
        ``exclude`` as for :func:`quantize_file` (it decides which weights are planned).

    Raises:
        ValueError: ``segment_mb`` is 0 or the model cannot be planned. OSError: unreadable input.
    """
    return _nibble.segments(
        os.fspath(input), int(segment_mb), exclude=None if exclude is None else list(exclude)
    )


def merge(
    shards: Sequence[PathLike],
    output: PathLike,
    *,
    model: Optional[PathLike] = None,
    force: bool = False,
    fsync: bool = False,
) -> Dict[str, Any]:
    """Assembles shards (``quantize_file(..., segment_mb=N, segments=(a, b))``) into ``output``:
    the model ``quantize_file(input, output, segment_mb=N)`` with the shards' options writes, byte
    for byte (``nibble merge``). The shards must come from one model and one set of options and
    hold every segment exactly once.

    Args:
        shards: the shard folders.
        output: the model to write (atomically; with external data also ``OUTPUT_data``).
        model: the input model, when it is no longer at the path the shards name (it must be the
            same file: same CRC-32 and sizes).
        force: overwrite an existing output.
        fsync: flush the output to disk before renaming it into place.

    Returns:
        The dict :func:`quantize_file` returns for a model file.

    Raises:
        ValueError: not a shard, shards of other models or options, a segment in two shards or in
        none (the message names the shard and segment). OSError: unreadable input, existing output
        without ``force`` (``FileExistsError``).
    """
    result = _nibble.merge(
        [os.fspath(s) for s in shards],
        os.fspath(output),
        model=None if model is None else os.fspath(model),
        force=force,
        fsync=fsync,
    )
    result["output"] = os.fspath(result["output"])
    return result


def inspect(path: PathLike, exclude: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    """What ``quantize_file`` would do with the model at ``path``, without writing anything.

    Returns ``{"ir_version": int, "opset": default-domain opset, "opset_after": opset after
    quantizing (21 when raised), "weights": [{"node", "weight", "op", "shape": [dims], "dtype",
    "bytes", "decision": "quantize" | "excluded" | "skipped" | "error", "detail"}], "report": the
    text ``nibble inspect`` prints}``. ``exclude`` as for ``quantize_file``.
    """
    return _nibble.inspect(os.fspath(path), None if exclude is None else list(exclude))


def compare(
    original: PathLike,
    quantized: PathLike,
    *,
    seed: int = 0,
    calibration_data: Optional[PathLike] = None,
    per_layer: bool = False,
    segment_mb: Union[str, int, None] = "auto",
    carry_memory_mb: int = 1024,
) -> Dict[str, Any]:
    """Runs ``original`` and ``quantized`` in ONNX Runtime on the same inputs (one seeded random
    sample, or every sample of a ``.npz``/``.npy``) and measures the error of every output.

    ``segment_mb`` as ``nibble compare --segment-mb``: a number of MiB runs each model by segments
    of at least that many MiB of weights (each in its own ONNX Runtime session, the quantized model
    cut at the original's crossing tensors, up to ``carry_memory_mb`` MiB of carried tensors held in
    memory and the rest spilled to a temporary file), for models larger than memory; 0 runs them
    whole; ``"auto"`` (or None) whole unless the original is large against the memory available.

    The quantized model runs in a session with ONNX Runtime's default options, as its users run it
    (DequantizeLinear+MatMul fused into MatMulNBits with int8 activations,
    ``session.qdq_matmulnbits_accuracy_level = 4``); ``weight_only_relative_error`` is the error of
    the weights alone (that option at 1: fp32 activations) when it differs by more than 1%, else
    None. Per-layer errors are weight-only.

    Returns ``{"outputs": [{"output", "relative_error": ||q - o|| / ||o||, "max_abs_error":
    max |q - o|, "cosine": cosine similarity, "top1_agreement": fraction of rows whose argmax over
    the last axis agrees, or None, "weight_only_relative_error"}], "layers": [{"node", "output",
    "relative_error"}] worst first, with ``per_layer`` only}``.
    """
    return _nibble.compare(
        os.fspath(original),
        os.fspath(quantized),
        seed=seed,
        calibration_data=None if calibration_data is None else os.fspath(calibration_data),
        per_layer=per_layer,
        segment_mb=segment_mb,
        carry_memory_mb=carry_memory_mb,
    )


# ---------------------------------------------------------------------------------------------
# ModelOpt's call: modelopt.onnx.quantization.int4.quantize (0.47.0)

_MODELOPT_EPS = ["cpu", "cuda:0", "trt"]
_METHODS = ("rtn", "rtn_dq", "awq_lite", "awq_clip", "awq_full", "gptq", "awq_gptq")
_LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")

# ModelOpt kwarg -> (nibble option, converter); None: accepted, no effect on nibble's result.
_KWARGS = {
    "awqlite_alpha_step": ("alpha_step", float),
    "awqclip_alpha_step": ("clip_alpha_step", float),
    "awqclip_alpha_min": ("clip_alpha_min", float),
    "awqlite_run_per_subgraph": ("per_subgraph", bool),
    "awqlite_fuse_nodes": ("fuse", bool),
    "gather_quantize_axis": ("gather_axis", lambda v: None if v is None else int(v)),
    "gather_block_size": ("gather_block_size", int),
    "layers_8bit": ("int8_layers", lambda v: None if not v else v if isinstance(v, str) else ",".join(v)),
    "enable_mixed_quant": ("mixed_precision", bool),
    # Column batching of ModelOpt's awq_clip (memory only) and the TensorRT-RTX backend choice.
    "awqclip_bsz_col": (None, None),
    "trt_rtx_backend": (None, None),
    # nibble's own options, for the same call.
    "calibration_shapes": ("calibration_shapes", None),
    "calibration_samples": ("calibration_samples", int),
    "calibration_seed": ("calibration_seed", int),
    "calibration_text": ("calibration_text", None),
    "tokenizer": ("tokenizer", None),
    "calibration_seq_len": ("calibration_seq_len", int),
    "calibration_memory_mb": ("calibration_memory_mb", int),
    "segment_mb": ("segment_mb", lambda v: v if v == "auto" else int(v)),
    "carry_memory_mb": ("carry_memory_mb", int),
    "skip_nonfinite": ("skip_nonfinite", bool),
    "scale_search": ("scale_search", bool),
    "scale_search_clip_min": ("scale_search_clip_min", float),
    "percdamp": ("percdamp", float),
    "gptq_batch": ("gptq_batch", int),
    "act_order": ("act_order", bool),
    "sequential": ("sequential", bool),
    "head_bits": ("head_bits", int),
}


def quantize(
    onnx_path: Union[str, "os.PathLike[str]", Any],
    calibration_method: str = "awq_lite",
    calibration_data_reader: Any = None,
    calibration_eps: List[str] = _MODELOPT_EPS,
    use_external_data_format: bool = True,
    use_zero_point: bool = False,
    block_size: Optional[int] = None,
    nodes_to_exclude: Optional[List[str]] = [r"/lm_head"],  # noqa: B006  (ModelOpt's default)
    log_level: str = "INFO",
    input_shapes_profile: Optional[Sequence[Dict[str, str]]] = None,
    output_path: Optional[PathLike] = None,
    **kwargs: Any,
) -> Any:
    """INT4 weight-only quantization with ModelOpt's signature and defaults
    (``modelopt.onnx.quantization.int4.quantize``, ModelOpt 0.47.0), returning an ``onnx.ModelProto``.

    Args:
        onnx_path: the model: a path, or an ``onnx.ModelProto``.
        calibration_method: ``"awq_lite"`` (ModelOpt's default), ``"awq_clip"``, ``"awq_full"``,
            ``"rtn_dq"`` or ``"rtn"``; beyond ModelOpt, ``"gptq"`` and ``"awq_gptq"`` (see
            :func:`quantize_file`).
        calibration_data_reader: an ONNX Runtime ``CalibrationDataReader`` (``get_next()`` returning
            ``{input name: numpy array}``, None at the end) or a list of such dicts; each dict is one
            sample. None: nibble's seeded random inputs (ModelOpt draws one unseeded random token).
        calibration_eps: execution providers; nibble calibrates on CPU, and warns when others are
            asked for explicitly.
        use_external_data_format: accepted for compatibility; the returned ``ModelProto`` holds its
            tensors in memory either way (save it with ``onnx.save(..., save_as_external_data=True)``).
        use_zero_point: UINT4 with a zero point per block instead of symmetric INT4.
        block_size: rows of K per block; None means 128, -1 per channel.
        nodes_to_exclude: regular expressions matched at the start of node names (``re.match``);
            matching nodes stay float. Default ``["/lm_head"]``; None or ``[]`` excludes nothing.
        log_level: ``"DEBUG"`` prints each weight's AWQ choice; other levels print warnings only.
        input_shapes_profile: TensorRT only; ignored with a warning.
        output_path: nibble's: where to write the result. Needed for a model folder
            (onnxruntime-genai or Optimum, README "LLM folders"): ``onnx_path`` a folder is written
            to the folder ``output_path`` (default ``FOLDER_int4``) and the summary dict of
            :func:`quantize_file` is returned instead of a ``ModelProto``. For a model file the
            quantized model is also saved there (with ``OUTPUT_data`` when external data is needed).
        **kwargs: ModelOpt's ``awqlite_alpha_step`` (0.1), ``awqclip_alpha_step`` (0.05),
            ``awqclip_alpha_min`` (0.5), ``awqlite_run_per_subgraph`` (False),
            ``awqlite_fuse_nodes`` (True), ``gather_quantize_axis`` (None), ``gather_block_size``
            (32), ``layers_8bit`` (comma-separated patterns), ``enable_mixed_quant`` (False),
            ``awqclip_bsz_col`` and ``trt_rtx_backend`` (no effect), ``use_column_major`` (False
            only); and nibble's ``calibration_shapes``, ``calibration_samples``,
            ``calibration_seed``, ``calibration_memory_mb``, ``segment_mb``, ``carry_memory_mb``, ``skip_nonfinite``, ``scale_search``,
            ``scale_search_clip_min``, ``percdamp``, ``gptq_batch``, ``act_order``, ``sequential``, ``head_bits``,
            ``calibration_text``, ``tokenizer``, ``calibration_seq_len`` (as in
            :func:`quantize_file`). Any other name raises ``TypeError``.

    Returns:
        The quantized ``onnx.ModelProto`` (needs the ``onnx`` package): the same graph, bytes for
        bytes, as ``nibble quantize --method M`` writes.
    """
    unknown = sorted(k for k in kwargs if k not in _KWARGS and k != "use_column_major")
    if unknown:
        raise TypeError(
            f"nibble.quantize: unknown keyword argument(s) {', '.join(unknown)}; "
            f"known: {', '.join(sorted([*_KWARGS, 'use_column_major']))}"
        )
    if kwargs.get("use_column_major"):
        raise ValueError(
            "use_column_major=True (transposed weights for some execution providers) is not supported by nibble"
        )
    if calibration_method not in _METHODS:
        raise ValueError(
            f"calibration_method={calibration_method!r}: use one of {', '.join(_METHODS)} "
            "(the TensorRT variants are not supported)"
        )
    if not isinstance(log_level, str) or log_level.upper() not in _LOG_LEVELS:
        raise ValueError(f"log_level={log_level!r}: use one of {', '.join(_LOG_LEVELS)}")
    if calibration_eps is not _MODELOPT_EPS and any(ep != "cpu" for ep in calibration_eps):
        warnings.warn(
            f"nibble calibrates with ONNX Runtime on CPU; calibration_eps {list(calibration_eps)} ignored",
            stacklevel=2,
        )
    if input_shapes_profile is not None:
        warnings.warn("input_shapes_profile (TensorRT only) ignored", stacklevel=2)
    options: Dict[str, Any] = {}
    for key, value in kwargs.items():
        name, convert = _KWARGS.get(key, (None, None))
        if name is not None:
            options[name] = convert(value) if convert is not None else value
    common = dict(
        method=calibration_method,
        block_size=128 if block_size is None else int(block_size),
        zero_point=bool(use_zero_point),
        exclude=list(nodes_to_exclude or []),
        calibration_data=calibration_data_reader,
        verbose=log_level.upper() == "DEBUG",
        **options,
    )
    if isinstance(onnx_path, (str, bytes, os.PathLike)) and os.path.isdir(os.fsdecode(onnx_path)):
        return quantize_file(os.fsdecode(onnx_path), output_path, **common)
    try:
        import onnx
    except ImportError:
        raise ImportError(
            "nibble.quantize returns an onnx.ModelProto and needs the onnx package: pip install onnx "
            "(nibble.quantize_file writes the model without it)"
        ) from None

    tmp = tempfile.mkdtemp(prefix="nibble-")
    try:
        if isinstance(onnx_path, (str, bytes, os.PathLike)):
            source = os.fsdecode(onnx_path)
        elif isinstance(onnx_path, onnx.ModelProto):
            source = os.path.join(tmp, "input.onnx")
            try:
                large = onnx_path.ByteSize() > (1 << 31) - (64 << 20)
            except ValueError:
                large = True
            onnx.save_model(onnx_path, source, save_as_external_data=large, location="input.onnx_data")
        else:
            raise ValueError(f"onnx_path: {type(onnx_path).__name__} is neither a path nor an onnx.ModelProto")
        out = os.path.join(tmp, "model_int4.onnx") if output_path is None else os.fspath(output_path)
        quantize_file(source, out, **common)
        return onnx.load_model(out, load_external_data=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

