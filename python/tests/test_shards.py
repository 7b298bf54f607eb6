"""Shards through Python: quantize_file(..., segment_mb=N, segments=(a, b)) writes a shard folder,
nibble.merge assembles shards into the bytes of the single run quantize_file(..., segment_mb=N),
and the merged model runs in ONNX Runtime (default session and optimizations disabled)."""

import numpy as np
import onnxruntime as ort
import pytest

import nibble
from conftest import run_cli


@pytest.fixture(scope="module")
def wide(tmp_path_factory):
    """`nibble example` with 3 layers of width 256 (about 8 MB of float32 weights): two or more
    segments at segment_mb=3."""
    path = tmp_path_factory.mktemp("shards") / "t.onnx"
    run_cli("example", path, "--layers", "3", check=0)
    return path


def run_both_ways(path):
    x = np.random.default_rng(0).standard_normal((1, 8, 256)).astype(np.float32)
    outs = []
    for level in (ort.GraphOptimizationLevel.ORT_ENABLE_ALL, ort.GraphOptimizationLevel.ORT_DISABLE_ALL):
        so = ort.SessionOptions()
        so.graph_optimization_level = level
        s = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        outs.append(s.run(None, {"input": x})[0])
    return outs


@pytest.mark.parametrize("method", ["rtn_dq", "gptq"])
def test_merged_shards_equal_the_single_run(tmp_path, wide, method):
    common = dict(method=method, segment_mb=3, calibration_samples=2)
    single = tmp_path / "single.onnx"
    nibble.quantize_file(wide, single, **common)
    first = nibble.quantize_file(wide, tmp_path / "a", segments=(0, 0), **common)
    count = first["segments"]
    assert count >= 2 and first["range"] == (0, 0) and first["weights"] == len(first["segment_weights"][0])
    rest = nibble.quantize_file(wide, tmp_path / "b", segments=(1, count - 1), **common)
    merged = tmp_path / "merged.onnx"
    result = nibble.merge([first["output"], rest["output"]], merged)
    assert result["output"] == str(merged)
    assert merged.read_bytes() == single.read_bytes()
    for y in run_both_ways(merged):
        assert np.isfinite(y).all() and y.size > 0


def test_bad_shards_raise_and_write_nothing(tmp_path, wide):
    a = nibble.quantize_file(wide, tmp_path / "a", segment_mb=3, segments=(0, 0))["output"]
    out = tmp_path / "m.onnx"
    with pytest.raises(ValueError, match="is in no shard"):
        nibble.merge([a], out)
    with pytest.raises(ValueError, match="is also in shard"):
        nibble.merge([a, a], out)
    with pytest.raises(ValueError, match="segment-mb"):
        nibble.quantize_file(wide, tmp_path / "b", segments=(0, 0))
    with pytest.raises(ValueError, match="target-bits"):
        nibble.quantize_file(wide, tmp_path / "c", segment_mb=3, segments=(0, 0), target_bits=5.0)
    assert not out.exists() and not (tmp_path / "b").exists() and not (tmp_path / "c").exists()
