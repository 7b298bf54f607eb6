"""nibble.int4 (ModelOpt's int4 numpy functions) against ModelOpt 0.47.0's own outputs (the golden
cases in tests/data/golden, bit for bit) and against an independent numpy implementation of the
formulas written below (seeded random shapes, ranks, axes, block sizes, alphas, dtypes, bit widths).

nibble's deliberate differences (README, "Differences from ModelOpt") are checked as such: the
zero-point range contains zero (ModelOpt's one-sided goldens differ exactly there), 8-bit zero-point
codes are uint8, NaN/Inf weights raise ValueError."""

import math
import pathlib

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

import nibble
import nibble.int4 as int4
from test_quantize import run_both_ways

ml_dtypes = pytest.importorskip("ml_dtypes")
BF16 = np.dtype(ml_dtypes.bfloat16)
GOLDEN = pathlib.Path(__file__).resolve().parents[2] / "tests" / "data" / "golden"
UINT = {8: np.uint64, 4: np.uint32, 2: np.uint16}


def golden(prefix):
    names = sorted(p.stem for p in GOLDEN.glob(f"{prefix}*.npz"))
    assert names, f"no golden cases {prefix}* in {GOLDEN}"
    return names


def load(name):
    with np.load(GOLDEN / f"{name}.npz") as d:
        return {k: d[k] for k in d.files}


def same_bits(got, want, what, values=False):
    """Same dtype, shape and bits (``values``: the same values, -0.0 == 0.0, for zero points)."""
    got, want = np.ascontiguousarray(got), np.ascontiguousarray(want)
    assert got.dtype == want.dtype, f"{what}: dtype {got.dtype} != {want.dtype}"
    assert got.shape == want.shape, f"{what}: shape {got.shape} != {want.shape}"
    if not values and (got.dtype.kind == "f" or got.dtype == BF16):
        got, want = got.view(UINT[got.dtype.itemsize]), want.view(UINT[want.dtype.itemsize])
    np.testing.assert_array_equal(got, want, err_msg=what)


def params(a):
    get = lambda k, d: a[k].item() if k in a else d  # noqa: E731
    return dict(
        block_size=int(get("in_block_size", -1)),
        quantize_axis=int(get("in_quantize_axis", 0)),
        alpha=float(get("in_alpha", 1.0)),
        use_zero_point=bool(get("in_use_zero_point", False)),
        num_bits=int(get("in_num_bits", 4)),
    )


# ---------------------------------------------------------------------------------------------
# An independent implementation: ModelOpt's formulas step by step, every operation computed in
# float32 and rounded to the weight dtype (what numpy does for float16/bfloat16), with nibble's
# zero-point range [min(lo, 0), max(hi, 0)].


def reference(w, block_size, axis, alpha, zero_point, num_bits):
    dt = w.dtype
    rnd = lambda x: np.asarray(x, np.float32).astype(dt).astype(np.float32)  # noqa: E731
    wm = np.moveaxis(w.astype(np.float32), axis, 0)
    n = wm.shape[0]
    b = n if block_size == -1 else block_size
    nb = math.ceil(n / b)
    padded = np.zeros((nb * b,) + wm.shape[1:], np.float32)
    padded[:n] = wm
    blocks = padded.reshape((nb, b) + wm.shape[1:])
    a = np.float32(np.array(alpha).astype(dt))
    clip_min = np.float32(np.array(1e-5).astype(dt))
    if zero_point:
        levels = 2**num_bits - 1
        hi = rnd(np.maximum(blocks.max(axis=1), 0) * a)
        lo = rnd(np.minimum(blocks.min(axis=1), 0) * a)
        s = rnd(np.maximum(rnd(hi - lo), clip_min) / np.float32(levels))
        zp = np.clip(-np.rint(rnd(lo / s)), 0, levels) + np.float32(0)
    else:
        qmax = 2 ** (num_bits - 1) - 1
        amax = np.abs(blocks).max(axis=1)
        s = np.maximum(rnd(rnd(amax * a) / np.float32(qmax)), clip_min)
        zp = None
    se = np.repeat(s, b, axis=0)[:n]
    y = np.rint(rnd(wm / se))
    if zp is None:
        q = np.clip(y, -(2 ** (num_bits - 1)), 2 ** (num_bits - 1) - 1) + np.float32(0)  # int8 has no -0
        dq = rnd(q * se)
    else:
        ze = np.repeat(zp, b, axis=0)[:n]
        q = np.clip(rnd(y + ze), 0, 2**num_bits - 1)
        dq = rnd(rnd(q - ze) * se)
    back = lambda x: np.ascontiguousarray(np.moveaxis(x, 0, axis))  # noqa: E731
    code = np.uint8 if zero_point and num_bits == 8 else np.int8
    return (
        back(q).astype(code),
        back(s).astype(dt),
        None if zp is None else back(zp).astype(dt),
        back(dq).astype(dt),
    )


def check_against_reference(w, block_size, axis, alpha, zp, num_bits, what):
    q, s, z = int4.quant_tensor(w, block_size, axis, alpha, zp, num_bits)
    rq, rs, rz, rdq = reference(w, block_size, axis, alpha, zp, num_bits)
    same_bits(s, rs, f"{what}: scales")
    if zp:
        same_bits(z, rz, f"{what}: zero points", values=True)
    else:
        assert z is None
    same_bits(q, rq, f"{what}: codes")
    s2, z2 = int4.find_scales(w, block_size, axis, alpha, zp, num_bits)
    same_bits(s2, s, f"{what}: find_scales")
    same_bits(int4.rtn(w, s, block_size, axis, z, num_bits), q, f"{what}: rtn")
    same_bits(int4.dq_tensor(q, s, block_size, axis, z), rdq, f"{what}: dq_tensor")


# ---------------------------------------------------------------------------------------------
# ModelOpt's goldens


@pytest.mark.parametrize("name", golden("q_") + golden("q8_"))
def test_quantization_goldens(name):
    a = load(name)
    p = params(a)
    w = a["in_w"]
    args = (p["block_size"], p["quantize_axis"], p["alpha"], p["use_zero_point"], p["num_bits"])
    if not np.isfinite(w).all():
        # ModelOpt: NaN scales and garbage codes, or its own ValueError with a zero point.
        with pytest.raises(ValueError, match="NaN or Inf.*block"):
            int4.quant_tensor(w, *args)
        with pytest.raises(ValueError, match="NaN or Inf"):
            int4.find_scales(w, *args)
        return
    q, s, z = int4.quant_tensor(w, *args)
    if name in ("q_allpos_b32_zp", "q_allneg_b32_zp"):
        # ModelOpt's one-sided range saturates; nibble's contains zero (the reference's).
        assert not np.array_equal(q, a["out_q"])
        check_against_reference(w, *args, what=name)
        return
    same_bits(s, a["out_scale"], f"{name}: quant_tensor scales")
    if p["use_zero_point"]:
        same_bits(z, a["out_zp"], f"{name}: zero points", values=True)
    else:
        assert z is None
    want_q = a["out_q"]
    same_bits(q.view(want_q.dtype), want_q, f"{name}: codes")
    s2, z2 = int4.find_scales(w, *args)
    same_bits(s2, a["out_scale"], f"{name}: find_scales")
    q2 = int4.rtn(w, a["out_scale"], p["block_size"], p["quantize_axis"], a.get("out_zp"), p["num_bits"])
    same_bits(q2.view(want_q.dtype), want_q, f"{name}: rtn")
    for key in ("out_dq", "out_dq_quant_tensor"):
        if key in a and a[key].dtype == w.dtype:
            dq = int4.dq_tensor(q, s, p["block_size"], p["quantize_axis"], z)
            same_bits(dq, a[key], f"{name}: {key}")
    check_against_reference(w, *args, what=name)


def test_nan_zero_point_raises_value_error_like_modelopt():
    a = load("q_nan_inf_b32_zp")
    with pytest.raises(ValueError):
        int4.find_scales(a["in_w"], int(a["in_block_size"]), use_zero_point=True)


@pytest.mark.parametrize("name", golden("get_weight_scale_"))
def test_get_weight_scale_goldens(name):
    a = load(name)
    same_bits(int4.get_weight_scale(a["in_w"], int(a["in_block_size"])), a["out_weight_scale"], name)


@pytest.mark.parametrize("name", golden("get_act_scale_"))
def test_get_act_scale_goldens(name):
    a = load(name)
    same_bits(int4.get_act_scale(a["in_x"]), a["out_act_scale"], name)


@pytest.mark.parametrize("name", golden("get_scale_"))
def test_get_scale_goldens(name):
    a = load(name)
    for i, alpha in enumerate(a["in_alphas"]):
        alpha = alpha if name.endswith("npf64alpha") else float(alpha)
        same_bits(int4.get_scale(a["in_x_max"], a["in_w_max"], alpha), a[f"out_scale_alpha{i}"], f"{name} {i}")


def test_alpha_grids_golden():
    a = load("alpha_grids")
    np.testing.assert_array_equal(int4.AWQClipHelper(np.ones((4, 2), np.float32), 2).alphas, a["out_awq_clip_alphas"])
    lite = int4.AWQLiteHelper(np.ones((4, 3), np.float32), np.ones((3, 2), np.float32), 2)
    np.testing.assert_array_equal(list(lite.loss), a["out_awq_lite_alphas"])
    assert (lite.alpha_step, int4.AWQClipHelper.alpha_step, int4.AWQClipHelper.min_alpha) == (0.1, 0.05, 0.5)


@pytest.mark.parametrize("name", golden("clip_search_"))
def test_awq_clip_helper_golden(name):
    a = load(name)
    h = int4.AWQClipHelper(a["in_w"], int(a["in_block_size"]))
    np.testing.assert_array_equal(h.alphas, a["in_alphas"])
    same_bits(h.w_amax, a["out_w_amax"], f"{name}: w_amax")
    for alpha, loss in zip(h.alphas, a["out_losses"]):
        assert h.loss[alpha].shape == loss.shape
        h.loss[alpha] = loss
    h.update_best_params()
    same_bits(h.best_alpha, a["out_best_alpha"], f"{name}: best alpha")
    same_bits(h.best_loss, a["out_best_loss"], f"{name}: best loss")


@pytest.mark.parametrize("name", golden("awq_lite_node_"))
def test_awq_lite_helper_golden(name):
    a = load(name)
    h = int4.AWQLiteHelper(a["in_x"], a["in_w"], int(a["in_block_size"]))
    same_bits(h.act_scale, a["out_act_scale"], f"{name}: act scale")
    same_bits(h.weight_scale, a["out_weight_scale"], f"{name}: weight scale")
    np.testing.assert_array_equal(list(h.loss), a["out_alphas"])
    for alpha, loss in zip(list(h.loss), a["out_losses"]):
        h.loss[alpha] = float(loss)
    h.update_best_params()
    assert h.best_alpha == a["out_best_alpha"].item()
    same_bits(h.best_scale, a["out_best_scale"], f"{name}: best scale")


# ---------------------------------------------------------------------------------------------
# Random cases against the reference


def random_weight(rng, shape, dtype):
    kind = rng.integers(0, 4)
    w = rng.standard_normal(shape).astype(np.float32) * np.float32(rng.choice([1e-3, 0.05, 1.0, 30.0]))
    if kind == 1:
        w = np.abs(w) + np.float32(0.01)  # one-sided blocks
    elif kind == 2:
        w = np.round(w * 4) / 4  # exact ties after division
    w[rng.random(shape) < 0.05] = 0
    return w.astype(dtype)


@pytest.mark.parametrize("dtype", [np.float32, np.float16, BF16], ids=["f32", "f16", "bf16"])
def test_random_against_reference(dtype):
    rng = np.random.default_rng(21)
    for i in range(150):
        ndim = int(rng.integers(1, 4))
        shape = tuple(int(d) for d in rng.integers(1, 40, size=ndim))
        axis = int(rng.choice([0, ndim - 1]))
        block = int(rng.choice([-1, 1, 2, 3, 8, 16, 32, 7, 50]))
        alpha = float(rng.choice([1.0, 0.9, 0.75, 0.5]))
        zp = bool(rng.integers(0, 2))
        bits = int(rng.choice([4, 8]))
        w = random_weight(rng, shape, dtype)
        check_against_reference(w, block, axis, alpha, zp, bits, f"case {i}: {shape} axis {axis} block {block} "
                                f"alpha {alpha} zp {zp} bits {bits}")


def test_large_2d_and_transposed_inputs():
    rng = np.random.default_rng(5)
    w = rng.standard_normal((1000, 300)).astype(np.float32)
    for axis, block in ((0, 128), (1, 32), (0, -1)):
        check_against_reference(w, block, axis, 1.0, False, 4, f"axis {axis} block {block}")
        check_against_reference(w, block, axis, 1.0, True, 4, f"zp axis {axis} block {block}")
    # A non-contiguous view gives the same as its contiguous copy.
    t = w.T
    for got, want in zip(int4.quant_tensor(t, 64), int4.quant_tensor(np.ascontiguousarray(t), 64)):
        same_bits(got, want, "transposed view")


def test_dq_tensor_other_dtypes_follow_numpy():
    rng = np.random.default_rng(3)
    w = rng.standard_normal((64, 8)).astype(np.float16)
    q, s, z = int4.quant_tensor(w, 32, use_zero_point=True)
    # int16 codes and float16 scales: numpy promotes to float32.
    got = int4.dq_tensor(q.astype(np.int16), s, 32, 0, z)
    want = (q.astype(np.int16) - np.repeat(z, 32, axis=0)) * np.repeat(s, 32, axis=0)
    same_bits(got, want, "int16 codes")
    # uint8 codes without zero point are read unsigned.
    u = np.full((64, 8), 200, np.uint8)
    same_bits(int4.dq_tensor(u, s, 32), u * np.repeat(s, 32, axis=0), "uint8 codes")


# ---------------------------------------------------------------------------------------------
# Errors


def test_errors():
    w = np.ones((64, 8), np.float32)
    with pytest.raises(TypeError, match="float64"):
        int4.find_scales(w.astype(np.float64), 32)
    with pytest.raises(ValueError, match="num_bits"):
        int4.quant_tensor(w, 32, num_bits=3)
    with pytest.raises(ValueError, match="block_size"):
        int4.find_scales(w, 0)
    with pytest.raises(ValueError, match="quantize_axis"):
        int4.find_scales(np.ones((4, 4, 4), np.float32), 2, quantize_axis=1)
    with pytest.raises(ValueError, match="quantize_axis"):
        int4.find_scales(w, 2, quantize_axis=2)
    s, _ = int4.find_scales(w, 32)
    with pytest.raises(ValueError, match="expected \\(4, 8\\)"):
        int4.rtn(w, s, 16)
    with pytest.raises(ValueError, match="zero, NaN or Inf"):
        int4.rtn(w, np.zeros_like(s), 32)
    bad = w.copy()
    bad[40, 3] = np.nan
    with pytest.raises(ValueError, match="block 1 .*column 3"):
        int4.rtn(bad, s, 32)
    with pytest.raises(ValueError, match="expected"):
        int4.dq_tensor(np.zeros((64, 8), np.int8), s[:1], 32)


# ---------------------------------------------------------------------------------------------
# quantize_rtn


@pytest.mark.parametrize("dq_only", [True, False])
def test_quantize_rtn_equals_quantize_and_runs(tmp_path, example, dq_only):
    model = onnx.load(str(example))
    got = int4.quantize_rtn(model, 32, dq_only=dq_only)
    want = nibble.quantize(model, calibration_method="rtn_dq" if dq_only else "rtn", block_size=32, nodes_to_exclude=[])
    assert got.SerializeToString() == want.SerializeToString()
    path = tmp_path / "rtn.onnx"
    onnx.save(got, str(path))
    a, b = run_both_ways(path)
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
    if dq_only:
        # The written codes and scales are quant_tensor's.
        inits = {i.name: i for i in got.graph.initializer}
        weights = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
        checked = 0
        for name, w in weights.items():
            if f"{name}_i4" not in inits:
                continue
            q, s, _ = int4.quant_tensor(w, 32)
            np.testing.assert_array_equal(numpy_helper.to_array(inits[f"{name}_i4"]).astype(np.int8), q)
            same_bits(numpy_helper.to_array(inits[f"{name}_scale"]), s, name)
            checked += 1
        assert checked >= 10


def test_readme_int4_script():
    import re
    import subprocess
    import sys

    text = (pathlib.Path(__file__).resolve().parents[2] / "README.md").read_text(encoding="utf-8")
    (script,) = [b for b in re.findall(r"```python\n(.*?)```", text, re.S) if "import nibble.int4" in b]
    p = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    dtype, shape, err = p.stdout.split(" ", 2)
    assert (dtype, shape) == ("int8", "(32,") and err.startswith("4096)")
    # Half a quantization step at most: amax / 7 / 2 for standard normal blocks of 128 (amax < 6).
    assert 0 < float(err.split()[-1]) < 6 / 7 / 2 + 1e-3
