"""Dev-only: nibble.quantize(...) against modelopt.onnx.quantization.int4.quantize(...) with the same
arguments. Skipped (not passed) unless ModelOpt is importable; CI does not install it.

Install: pip install nvidia-modelopt==0.47.0 onnx-graphsurgeon ml_dtypes (CPU/numpy path)."""

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

import nibble
from conftest import Reader

int4 = pytest.importorskip("modelopt.onnx.quantization.int4", reason="ModelOpt is not installed (dev-only check)")


def tensors(model):
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def dq_nodes(model):
    return sorted(
        (n.name, list(n.input), [(a.name, onnx.helper.get_attribute_value(a)) for a in n.attribute])
        for n in model.graph.node
        if n.op_type == "DequantizeLinear"
    )


@pytest.mark.parametrize("method", ["rtn_dq", "awq_clip"])
@pytest.mark.parametrize("zero_point", [False, True])
def test_same_quantized_weights_as_modelopt(example, samples, method, zero_point):
    args = dict(calibration_method=method, use_zero_point=zero_point, calibration_eps=["cpu"])
    theirs = int4.quantize(str(example), calibration_data_reader=Reader(samples), **args)
    ours = nibble.quantize(str(example), calibration_data_reader=Reader(samples), **args)
    # Same DQ nodes, same names and attributes; the same codes, scales and zero points bit for bit.
    assert dq_nodes(ours) == dq_nodes(theirs)
    a, b = tensors(ours), tensors(theirs)
    quantized = [n for n in b if n.endswith(("_i4", "_scale", "_zp"))]
    assert quantized
    for name in quantized:
        assert a[name].dtype == b[name].dtype, name
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)
    # Where ModelOpt is wrong (README, "Differences from ModelOpt"): it leaves opset 17 with INT4 DQ.
    opset = {o.domain: o.version for o in ours.opset_import}
    assert opset.get("", opset.get("ai.onnx")) == 21
