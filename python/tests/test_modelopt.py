"""Dev-only: nibble.quantize(...) against modelopt.onnx.quantization.int4.quantize(...) with the same
arguments. Skipped (not passed) unless ModelOpt is importable; CI does not install it.

Install: pip install nvidia-modelopt==0.47.0 onnx-graphsurgeon ml_dtypes (CPU/numpy path)."""

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

import nibble
from conftest import Reader as Plain

try:
    from modelopt.onnx.quantization import int4
except ImportError as e:  # not installed, or without its [onnx] extras
    pytest.skip(f"ModelOpt is not importable (dev-only check): {e}", allow_module_level=True)


def reader(samples):
    """ModelOpt iterates the reader: it needs ONNX Runtime's CalibrationDataReader class."""
    from onnxruntime.quantization import CalibrationDataReader

    class Reader(Plain, CalibrationDataReader):
        pass

    return Reader(samples)


def tensors(model):
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def dq_nodes(model):
    return sorted(
        (n.name, list(n.input), [(a.name, onnx.helper.get_attribute_value(a)) for a in n.attribute])
        for n in model.graph.node
        if n.op_type == "DequantizeLinear"
    )


# ModelOpt ignores use_zero_point for RTN and awq_clip (README, "Differences from ModelOpt" 5), and
# its awq_lite crashes on CPU where it would fold scales into a producer (8): those are not compared.
@pytest.mark.parametrize(
    "method, zero_point, extra",
    [
        ("rtn_dq", False, {}),
        ("awq_clip", False, {}),
        ("awq_lite", False, {"awqlite_fuse_nodes": False}),
        ("awq_lite", True, {"awqlite_fuse_nodes": False}),
    ],
)
def test_same_quantized_weights_as_modelopt(example, samples, method, zero_point, extra):
    args = dict(calibration_method=method, use_zero_point=zero_point, calibration_eps=["cpu"], **extra)
    theirs = int4.quantize(str(example), calibration_data_reader=reader(samples), **args)
    ours = nibble.quantize(str(example), calibration_data_reader=reader(samples), **args)
    # Same DQ nodes, same names and attributes; the same codes, scales and zero points bit for bit
    # (awq_lite: its pre-quant scales come from float32 losses summed in another order, so the
    # README's figure applies: codes equal for >= 99.8% of elements, scales to float32 rounding).
    assert dq_nodes(ours) == dq_nodes(theirs)
    a, b = tensors(ours), tensors(theirs)
    quantized = [n for n in b if n.endswith(("_i4", "_scale", "_zp"))]
    assert quantized
    for name in quantized:
        assert a[name].dtype == b[name].dtype and a[name].shape == b[name].shape, name
        if method != "awq_lite":
            np.testing.assert_array_equal(a[name], b[name], err_msg=name)
        elif name.endswith("_scale"):
            np.testing.assert_allclose(a[name], b[name], rtol=1e-6, err_msg=name)
        else:
            assert np.mean(a[name] == b[name]) >= 0.998, name
    # Where ModelOpt is wrong (README, "Differences from ModelOpt"): it leaves opset 17 with INT4 DQ.
    opset = {o.domain: o.version for o in ours.opset_import}
    assert opset.get("", opset.get("ai.onnx")) == 21
