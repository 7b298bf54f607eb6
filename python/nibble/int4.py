"""``nibble.int4``: ModelOpt's ``modelopt.onnx.quantization.int4`` numpy functions (ModelOpt 0.47.0),
same signatures, defaults, return types, shapes and dtypes, computed by nibble's kernels.

Switching is one changed import::

    from modelopt.onnx.quantization import int4   # before
    import nibble.int4 as int4                    # after

Functions (``w`` a float32, float16 or bfloat16 (``ml_dtypes``) array; blocks of ``block_size``
elements along ``quantize_axis``, 0 or the last axis; a last partial block is zero-padded for its
statistics as ModelOpt pads it; ``block_size=-1``: one block over the whole axis):

- ``find_scales(w, block_size, quantize_axis=0, alpha=1.0, use_zero_point=False, num_bits=4)``
  -> ``(s, zp)``: symmetric ``s = max(amax(|w_blk|) * alpha / (2**(num_bits-1) - 1), 1e-5)``,
  ``zp`` None; with a zero point ``s = max(hi - lo, 1e-5) / (2**num_bits - 1)``,
  ``zp = clip(-rint(lo / s), 0, 2**num_bits - 1)``. ``s`` and ``zp`` have ``w``'s dtype and shape
  with the quantize axis shortened to ``ceil(len / block_size)``.
- ``rtn(w, s, block_size, quantize_axis=0, zp=None, num_bits=4)`` -> int8 codes of ``w``'s shape:
  ``clip(rint(w / s), -2**(num_bits-1), 2**(num_bits-1) - 1)``, or ``clip(rint(w / s) + zp, 0,
  2**num_bits - 1)`` (uint8 for 8-bit codes with a zero point, see below).
- ``dq_tensor(w, s, block_size, quantize_axis=0, zp=None)`` -> ``w * s`` or ``(w - zp) * s`` in
  numpy's result dtype (``s``'s for int8/uint8 codes).
- ``quant_tensor(w, block_size, quantize_axis=0, alpha=1.0, use_zero_point=False, num_bits=4)``
  -> ``(wq, s, zp)``: ``find_scales`` then ``rtn`` in one pass.
- ``get_act_scale(x)``, ``get_weight_scale(weight, block_size=None)``, ``get_scale(x_max, w_max,
  alpha)``: AWQ-lite's statistics (Lin et al., "AWQ: Activation-aware Weight Quantization", 2023),
  the same numpy expressions as ModelOpt (so the same float32/float16 summation and powers).
- ``AWQClipHelper``, ``AWQLiteHelper``: AWQ search bookkeeping (alphas, losses, best choice).
- ``quantize_rtn(onnx_model, block_size, dq_only=False, nodes_to_exclude=[], **kwargs)``: RTN on an
  ``onnx.ModelProto`` through :func:`nibble.quantize` (``"rtn_dq"`` or ``"rtn"``).

Every step is computed in the weight's dtype and rounded as numpy rounds (f32 division, round half
to even); the results are bit-identical to ModelOpt's, with these differences (README, "Differences
from ModelOpt"): a zero-point block range always contains zero (ModelOpt's one-sided blocks
saturate), ``alpha`` also applies with a zero point (ModelOpt ignores it), 8-bit zero-point codes
are returned as uint8 (ModelOpt wraps 128..255 to negative int8), and where ModelOpt returns
garbage nibble raises: NaN or Inf in ``w`` (``ValueError`` naming the block; ModelOpt gives NaN
scales, or its own ``ValueError`` "Zero-point values out of range" with a zero point), zero or
non-finite scales given to ``rtn``, and scales whose shape does not match ``w`` and ``block_size``.
Arrays of other dtypes raise ``TypeError``; int codes or scales that numpy would promote to another
dtype in ``dq_tensor`` (and ``rtn`` scales of another dtype than ``w``) take numpy's own expression.

Work runs on all cores with the GIL released; inputs are read in place (a C-contiguous array is not
copied), and codes and dequantized values are written straight into fresh numpy arrays.
"""

from __future__ import annotations

import math
from typing import Any, Optional, Tuple

import numpy as np

from . import _nibble

__all__ = [
    "find_scales",
    "rtn",
    "dq_tensor",
    "quant_tensor",
    "get_act_scale",
    "get_weight_scale",
    "get_scale",
    "quantize_rtn",
    "AWQClipHelper",
    "AWQLiteHelper",
    "CLIP_MIN",
]

CLIP_MIN = 1e-5
"""Smallest scale (ModelOpt's ``CLIP_MIN``), in the weight's dtype."""

try:  # bfloat16 arrays come from ml_dtypes, as for ModelOpt
    import ml_dtypes as _ml_dtypes

    _BF16: Optional[np.dtype] = np.dtype(_ml_dtypes.bfloat16)
except ImportError:  # pragma: no cover - ml_dtypes missing: float32 and float16 only
    _BF16 = None


def _format(a: np.ndarray, name: str) -> str:
    """nibble's name of ``a``'s float dtype, or TypeError."""
    if a.dtype == np.float32:
        return "float32"
    if a.dtype == np.float16:
        return "float16"
    if _BF16 is not None and a.dtype == _BF16:
        return "bfloat16"
    raise TypeError(f"{name}: dtype {a.dtype} is not supported; use float32, float16 or bfloat16 (ml_dtypes)")


def _flat(a: np.ndarray, fmt: str) -> np.ndarray:
    """``a`` as a flat C-ordered array (no copy when already contiguous); 16-bit floats as uint16."""
    flat = np.ascontiguousarray(a).reshape(-1)
    return flat if fmt == "float32" else flat.view(np.uint16)


def _axis(w: np.ndarray, quantize_axis: Any) -> int:
    """The quantize axis, checked: 0 or the last axis (ModelOpt blocks along one of these)."""
    if isinstance(quantize_axis, bool) or not isinstance(quantize_axis, (int, np.integer)):
        raise TypeError(f"quantize_axis={quantize_axis!r}: an int is required")
    ndim = w.ndim
    axis = int(quantize_axis) + (ndim if quantize_axis < 0 else 0)
    if ndim == 0 or not 0 <= axis < ndim:
        raise ValueError(f"quantize_axis={quantize_axis}: out of range for an array of shape {w.shape}")
    if axis not in (0, ndim - 1):
        raise ValueError(
            f"quantize_axis={quantize_axis} of a {ndim}-D array: ModelOpt's functions block along axis 0 "
            f"or the last axis ({ndim - 1}); move the axis first (np.moveaxis)"
        )
    return axis


def _block(block_size: Any, w: np.ndarray, axis: int) -> int:
    """The block length along ``axis`` (``-1``: the whole axis), checked."""
    if isinstance(block_size, bool) or not isinstance(block_size, (int, np.integer)):
        raise TypeError(f"block_size={block_size!r}: an int is required")
    b = int(block_size)
    if b == -1:
        return max(w.shape[axis], 1)
    if b < 1:
        raise ValueError(f"block_size={b}: use a positive block size, or -1 for one block over the axis")
    return b


def _scale_shape(w: np.ndarray, axis: int, block: int) -> Tuple[int, ...]:
    shape = list(w.shape)
    shape[axis] = math.ceil(shape[axis] / block)
    return tuple(shape)


def _bits(num_bits: Any) -> int:
    if num_bits not in (4, 8) or isinstance(num_bits, bool):
        raise ValueError(f"num_bits={num_bits!r}: nibble.int4 supports 4 and 8")
    return int(num_bits)


def _code_dtype(zero_point: bool, num_bits: int) -> Any:
    return np.uint8 if zero_point and num_bits == 8 else np.int8


def _quantize(w: Any, block_size: Any, quantize_axis: Any, alpha: float, use_zero_point: bool, num_bits: Any, codes: bool):
    w = np.asarray(w)
    fmt = _format(w, "w")
    axis = _axis(w, quantize_axis)
    block = _block(block_size, w, axis)
    bits = _bits(num_bits)
    zero_point = bool(use_zero_point)
    q, s, z = _nibble.int4_quantize(
        _flat(w, fmt), fmt, list(w.shape), axis, block, float(alpha), zero_point, bits, codes
    )
    shape = _scale_shape(w, axis, block)
    s = s.astype(w.dtype).reshape(shape)
    z = None if z is None else z.astype(w.dtype).reshape(shape)
    wq = None if q is None else q.view(_code_dtype(zero_point, bits)).reshape(w.shape)
    return wq, s, z


def find_scales(
    w: np.ndarray,
    block_size: int,
    quantize_axis: int = 0,
    alpha: float = 1.0,
    use_zero_point: bool = False,
    num_bits: int = 4,
):
    """Scales (and zero points) of ``w`` per block of ``block_size`` along ``quantize_axis``.

    Args:
        w: float32, float16 or bfloat16 array, any rank (quantize axis 0 or the last one).
        block_size: elements per block (a partial last block is zero-padded); -1: the whole axis.
        quantize_axis: 0 (MatMul ``[K, N]`` weights) or the last axis (Gather tables).
        alpha: clip ratio applied to the block's range (a Python float, converted to ``w``'s dtype).
        use_zero_point: asymmetric codes ``0..2**num_bits - 1`` with a zero point per block.
        num_bits: 4 or 8.

    Returns:
        ``(s, zp)``: arrays of ``w``'s dtype, ``w``'s shape with the quantize axis shortened to
        ``ceil(len / block_size)``; ``zp`` None without a zero point.

    Raises:
        ValueError: NaN/Inf in ``w`` (the message names the block), bad axis, block size or num_bits.
        TypeError: ``w`` of another dtype.
    """
    _, s, z = _quantize(w, block_size, quantize_axis, alpha, use_zero_point, num_bits, False)
    return s, z


def quant_tensor(
    w: np.ndarray,
    block_size: int,
    quantize_axis: int = 0,
    alpha: float = 1.0,
    use_zero_point: bool = False,
    num_bits: int = 4,
):
    """``find_scales`` then ``rtn`` in one pass over ``w``.

    Returns:
        ``(wq, s, zp)``: int8 codes of ``w``'s shape (uint8 for 8-bit codes with a zero point),
        and :func:`find_scales`'s ``s`` and ``zp``.

    Raises:
        As :func:`find_scales`.
    """
    return _quantize(w, block_size, quantize_axis, alpha, use_zero_point, num_bits, True)


def _expanded(a: np.ndarray, block: int, axis: int, length: int) -> np.ndarray:
    """Per-block values repeated over the elements of their blocks (ModelOpt's ``repeat`` on the
    padded array; the padding is dropped again)."""
    index = [slice(None)] * a.ndim
    index[axis] = slice(0, length)
    return np.repeat(a, block, axis=axis)[tuple(index)]


def _check_blocks(name: str, a: Optional[np.ndarray], w: np.ndarray, axis: int, block: int) -> None:
    if a is not None and tuple(a.shape) != _scale_shape(w, axis, block):
        raise ValueError(
            f"{name}: shape {tuple(a.shape)} does not match w of shape {tuple(w.shape)} with block_size "
            f"{block} along axis {axis}: expected {_scale_shape(w, axis, block)}"
        )


def rtn(
    w: np.ndarray,
    s: np.ndarray,
    block_size: int,
    quantize_axis: int = 0,
    zp: Optional[np.ndarray] = None,
    num_bits: int = 4,
) -> np.ndarray:
    """Round-to-nearest codes of ``w`` for scales ``s`` (and zero points ``zp``), ties to even.

    Args:
        w: float32, float16 or bfloat16 array.
        s: scales in :func:`find_scales`'s shape; finite and non-zero.
        block_size, quantize_axis: as for :func:`find_scales`.
        zp: zero points in ``s``'s shape, or None (symmetric).
        num_bits: 4 or 8.

    Returns:
        int8 codes of ``w``'s shape (uint8 for 8-bit codes with a zero point).

    Raises:
        ValueError: NaN/Inf in ``w``, zero or non-finite scales, shapes that do not match.
    """
    w = np.asarray(w)
    s = np.asarray(s)
    fmt = _format(w, "w")
    axis = _axis(w, quantize_axis)
    block = _block(block_size, w, axis)
    bits = _bits(num_bits)
    zp = None if zp is None else np.asarray(zp)
    _check_blocks("s", s, w, axis, block)
    _check_blocks("zp", zp, w, axis, block)
    if not (np.isfinite(s).all() and (s != 0).all()):
        raise ValueError("s: holds zero, NaN or Inf scales (ModelOpt would return garbage codes); use find_scales' s")
    levels = 2**bits - 1
    fast = s.dtype == w.dtype and (
        zp is None or (zp.dtype == w.dtype and bool(((zp >= 0) & (zp <= levels) & (zp == np.round(zp))).all()))
    )
    if not fast:
        # numpy's own expression (mixed dtypes, non-integer zero points).
        if not np.isfinite(w).all():
            raise ValueError("w: holds NaN or Inf; ModelOpt would return garbage codes")
        y = np.rint(w / _expanded(s, block, axis, w.shape[axis]))
        if zp is None:
            return y.clip(-(2 ** (bits - 1)), 2 ** (bits - 1) - 1).astype(np.int8)
        return (y + _expanded(zp, block, axis, w.shape[axis])).clip(0, levels).astype(_code_dtype(True, bits))
    q = _nibble.int4_rtn(
        _flat(w, fmt),
        fmt,
        list(w.shape),
        axis,
        block,
        np.ascontiguousarray(s, dtype=np.float32).reshape(-1),
        None if zp is None else np.ascontiguousarray(zp, dtype=np.float32).reshape(-1),
        bits,
    )
    return q.view(_code_dtype(zp is not None, bits)).reshape(w.shape)


def dq_tensor(
    w: np.ndarray,
    s: np.ndarray,
    block_size: int,
    quantize_axis: int = 0,
    zp: Optional[np.ndarray] = None,
) -> np.ndarray:
    """Dequantizes codes ``w``: ``w * s``, or ``(w - zp) * s``, per block.

    Args:
        w: codes (int8 or uint8; other dtypes as numpy computes them), any shape.
        s: scales in :func:`find_scales`'s shape (float32, float16 or bfloat16).
        block_size, quantize_axis: as for :func:`find_scales`.
        zp: zero points in ``s``'s shape, or None.

    Returns:
        The dequantized array, ``w``'s shape, numpy's result dtype (``s``'s for int8/uint8 codes).

    Raises:
        ValueError: shapes that do not match.
    """
    w = np.asarray(w)
    s = np.asarray(s)
    axis = _axis(w, quantize_axis)
    block = _block(block_size, w, axis)
    zp = None if zp is None else np.asarray(zp)
    _check_blocks("s", s, w, axis, block)
    _check_blocks("zp", zp, w, axis, block)
    try:
        fmt = _format(s, "s")
    except TypeError:
        fmt = None
    out_dtype = np.result_type(w, s) if zp is None else np.result_type(np.result_type(w, zp), s)
    if fmt is None or w.dtype not in (np.int8, np.uint8) or out_dtype != s.dtype or (zp is not None and zp.dtype != s.dtype):
        # numpy's own expression for other dtype combinations.
        se = _expanded(s, block, axis, w.shape[axis])
        if zp is None:
            return w * se
        return (w - _expanded(zp, block, axis, w.shape[axis])) * se
    out = _nibble.int4_dq_tensor(
        np.ascontiguousarray(w).reshape(-1).view(np.uint8),
        w.dtype == np.int8,
        list(w.shape),
        axis,
        block,
        np.ascontiguousarray(s, dtype=np.float32).reshape(-1),
        None if zp is None else np.ascontiguousarray(zp, dtype=np.float32).reshape(-1),
        fmt,
    )
    return out.view(s.dtype).reshape(w.shape)


def _pad_rows(w: np.ndarray, block_size: int) -> np.ndarray:
    """Zero-pads axis 0 of ``w`` to a multiple of ``block_size`` (ModelOpt's ``_pad``)."""
    extra = -w.shape[0] % block_size
    if extra == 0:
        return w
    return np.pad(w, [(0, extra)] + [(0, 0)] * (w.ndim - 1))


def get_act_scale(x: np.ndarray) -> np.ndarray:
    """AWQ-lite's activation scale: ``mean(|x|, axis=0)`` (``x``: ``[tokens, K]`` -> ``[K]``, ``x``'s dtype)."""
    return x.__abs__().mean(0)


def get_weight_scale(weight: np.ndarray, block_size: Optional[int] = None) -> np.ndarray:
    """AWQ-lite's weight scale of a ``[K, N]`` weight -> ``[K]``: ``|w| / (amax + finfo.tiny)``
    averaged over each row, where the amax is taken, as ModelOpt takes it, over
    ``w.reshape(block_size, -1)`` of the zero-padded row-major weight (rows ``r, r + K/B, ...``:
    strided, not contiguous, rows); without ``block_size`` over each column."""
    shape = weight.shape
    rows = None
    if block_size:
        if shape[0] % block_size != 0:
            rows = shape[0]
            weight = _pad_rows(weight, block_size)
            shape = weight.shape
        weight = weight.reshape(block_size, -1)
    amax = weight.__abs__().max(axis=0, keepdims=True)
    scale = (weight.__abs__() / (amax + np.finfo(amax.dtype).tiny)).reshape(shape)
    if rows is not None:
        scale = scale[:rows, ...]
    return scale.mean(1)


def get_scale(x_max: np.ndarray, w_max: np.ndarray, alpha: float) -> np.ndarray:
    """AWQ's per-input-channel scale ``s = x^alpha / (w^(1 - alpha) + finfo.tiny)``, clipped to
    ``[1e-4, 1e4]`` and normalized by ``sqrt(max(s) * min(s))`` (shapes and dtype of the inputs;
    a numpy float64 ``alpha`` promotes float16 inputs to float64, as in numpy)."""
    s = (x_max.__pow__(alpha) / (w_max.__pow__(1 - alpha) + np.finfo(w_max.dtype).tiny)).clip(min=1e-4, max=1e4)
    return s / np.sqrt(s.max() * s.min())


class AWQClipHelper:
    """AWQ-clip search state of one ``[K, N]`` weight: the clip ratios ``alphas`` (``min_alpha``,
    ``min_alpha + alpha_step``, ... below 1, then 1.0), one float32 loss array ``[N, ceil(K/B)]`` per
    ratio in ``loss`` (filled by the caller), and per block ``best_loss``/``best_alpha`` (flat,
    column-major blocks as ModelOpt orders them) updated by :meth:`update_best_params` (strict ``<``:
    the first ratio reaching a minimum wins, starting from 1.0 at infinite loss)."""

    min_alpha = 0.5
    alpha_step = 0.05

    def __init__(self, w: np.ndarray, block_size: int, **kwargs: Any) -> None:
        self.alpha_step = kwargs.get("awqclip_alpha_step", self.alpha_step)
        self.min_alpha = kwargs.get("awqclip_alpha_min", self.min_alpha)
        self.alphas = [round(float(k), 2) for k in np.arange(self.min_alpha, 1.0, self.alpha_step)] + [1.0]
        ci, co = w.shape
        self.block_size = block_size if block_size != -1 else w.shape[0]
        padded = _pad_rows(w, self.block_size).T
        self.w_amax = np.abs(padded.reshape(-1, self.block_size)).max(axis=-1)
        self.loss = {
            k: np.zeros((co, math.ceil(ci / self.block_size)), dtype=np.float32) for k in self.alphas
        }
        self.best_loss = np.full_like(self.w_amax, float("inf"))
        self.best_alpha = np.ones_like(self.w_amax)

    def update_best_params(self) -> None:
        """Takes, per block, the ratio of the smallest loss so far (``best_loss``, ``best_alpha``)."""
        for alpha, loss in self.loss.items():
            loss = loss.reshape(self.w_amax.shape)
            better = loss < self.best_loss
            self.best_loss = np.where(better, loss, self.best_loss)
            self.best_alpha = np.where(better, alpha, self.best_alpha)


class AWQLiteHelper:
    """AWQ-lite search state of one weight: ``act_scale`` (:func:`get_act_scale` of ``x``),
    ``weight_scale`` (:func:`get_weight_scale` of ``w``), a loss per alpha in ``loss`` (keys
    ``0, alpha_step, ..., 1``, ``np.arange`` values, filled by the caller), and ``best_alpha`` /
    ``best_scale`` (:func:`get_scale` at the first minimum) set by :meth:`update_best_params`.
    Unlike ModelOpt, the alpha grid follows ``awqlite_alpha_step`` (ModelOpt builds it from the class
    default 0.1 whatever the argument)."""

    alpha_step = 0.1

    def __init__(self, x: Optional[np.ndarray], w: Optional[np.ndarray], block_size: int, **kwargs: Any) -> None:
        self.alpha_step = kwargs.get("awqlite_alpha_step", self.alpha_step)
        self.block_size = block_size if block_size != -1 else w.shape[0]
        self.weight_scale = None if w is None else get_weight_scale(w, self.block_size)
        self.act_scale = None if x is None else get_act_scale(x)
        self.loss = {k.item(): 0.0 for k in np.arange(0, 1.0 + self.alpha_step, self.alpha_step)}
        self.best_scale = None
        self.best_alpha = None

    def update_best_params(self) -> None:
        """Sets ``best_alpha`` (the first alpha of smallest loss) and ``best_scale``."""
        self.best_alpha = min(self.loss, key=self.loss.__getitem__)
        self.best_scale = get_scale(self.act_scale, self.weight_scale, self.best_alpha)


def quantize_rtn(
    onnx_model: Any,
    block_size: int,
    dq_only: bool = False,
    nodes_to_exclude: Optional[list] = [],  # noqa: B006  (ModelOpt's default)
    **kwargs: Any,
) -> Any:
    """RTN INT4 quantization of an ``onnx.ModelProto`` (ModelOpt's ``int4.quantize_rtn``): the model
    :func:`nibble.quantize` returns with ``calibration_method="rtn_dq"`` (``dq_only=True``:
    INT4 initializers + DequantizeLinear) or ``"rtn"`` (QuantizeLinear -> DequantizeLinear on the float
    weight, valid blocked nodes where ModelOpt's are not). ``nodes_to_exclude``: regular expressions
    matched at the start of node names (default: none). ``kwargs``: as for :func:`nibble.quantize`
    (``gather_quantize_axis``, ``gather_block_size``, ``layers_8bit``, ``use_column_major=False``, ...).

    Raises:
        ValueError, OSError, TypeError: as :func:`nibble.quantize`.
    """
    from . import quantize

    return quantize(
        onnx_model,
        calibration_method="rtn_dq" if dq_only else "rtn",
        block_size=block_size,
        nodes_to_exclude=list(nodes_to_exclude or []),
        **kwargs,
    )
