"""nibble.quantize (ModelOpt's call) and nibble.quantize_file give the bytes `nibble quantize`
writes, and the quantized models run in ONNX Runtime."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest

import nibble
from conftest import Reader, run_cli

METHODS = ["rtn_dq", "rtn", "awq_lite", "awq_clip", "awq_full", "gptq", "awq_gptq"]


def cli_bytes(tmp_path, model, *args):
    out = tmp_path / "cli.onnx"
    run_cli("quantize", model, "-o", out, *args, check=0)
    assert not (tmp_path / "cli.onnx_data").exists(), "expected an inline model"
    return out.read_bytes()


def run_both_ways(path):
    """Runs the model with default session options and with optimizations disabled (fused
    MatMulNBits pinned to fp32 accumulation, accuracy level 1); returns both outputs."""
    x = np.random.default_rng(0).standard_normal((1, 8, 64)).astype(np.float32)
    outs = []
    for level in (ort.GraphOptimizationLevel.ORT_ENABLE_ALL, ort.GraphOptimizationLevel.ORT_DISABLE_ALL):
        so = ort.SessionOptions()
        so.graph_optimization_level = level
        so.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "1")
        s = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        outs.append(s.run(None, {"input": x})[0])
    return outs


@pytest.mark.parametrize("method", METHODS)
def test_quantize_equals_cli(tmp_path, example, method):
    expected = cli_bytes(tmp_path, example, "--method", method)
    model = nibble.quantize(str(example), calibration_method=method)
    assert isinstance(model, onnx.ModelProto)
    assert model.SerializeToString() == expected
    # The file API too.
    summary = nibble.quantize_file(example, tmp_path / "api.onnx", method=method)
    assert (tmp_path / "api.onnx").read_bytes() == expected
    assert summary["quantized"] == 12 and summary["candidates"] == 13 and summary["opset_raised"]
    # And the result runs in ONNX Runtime, optimized or not, to within 1e-4 of each other.
    a, b = run_both_ways(tmp_path / "api.onnx")
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def test_quantize_options_map_to_cli_flags(tmp_path, example):
    expected = cli_bytes(
        tmp_path, example, "--method", "awq_full", "--block-size", "32", "--zero-point", "--alpha-step", "0.25",
        "--clip-alpha-step", "0.1", "--clip-alpha-min", "0.6", "--exclude", "", "--gather-axis", "0",
        "--gather-block-size", "16", "--int8-layers", "layers.1", "--calibration-samples", "3",
        "--calibration-seed", "5",
    )
    model = nibble.quantize(
        example, calibration_method="awq_full", use_zero_point=True, block_size=32, nodes_to_exclude=None,
        awqlite_alpha_step=0.25, awqclip_alpha_step=0.1, awqclip_alpha_min=0.6, gather_quantize_axis=0,
        gather_block_size=16, layers_8bit="layers.1", calibration_samples=3, calibration_seed=5,
        awqclip_bsz_col=64,
    )
    assert model.SerializeToString() == expected


def test_gptq_options_map_to_cli_flags(tmp_path, example):
    expected = cli_bytes(
        tmp_path, example, "--method", "gptq", "--block-size", "32", "--zero-point", "--scale-search",
        "--percdamp", "0.05", "--gptq-batch", "16", "--act-order",
    )
    nibble.quantize_file(
        example, tmp_path / "api.onnx", method="gptq", block_size=32, zero_point=True, scale_search=True,
        percdamp=0.05, gptq_batch=16, act_order=True,
    )
    assert (tmp_path / "api.onnx").read_bytes() == expected
    model = nibble.quantize(
        example, calibration_method="gptq", block_size=32, use_zero_point=True, scale_search=True, percdamp=0.05,
        gptq_batch=16, act_order=True,
    )
    assert model.SerializeToString() == expected
    expected = cli_bytes(tmp_path, example, "--method", "awq_gptq", "--sequential", "--force")
    nibble.quantize_file(example, tmp_path / "seq.onnx", method="awq_gptq", sequential=True, force=True)
    assert (tmp_path / "seq.onnx").read_bytes() == expected
    model = nibble.quantize(example, calibration_method="awq_gptq", sequential=True)
    assert model.SerializeToString() == expected
    with pytest.raises(ValueError, match="percdamp"):
        nibble.quantize_file(example, tmp_path / "bad.onnx", method="gptq", percdamp=-1.0)
    assert not (tmp_path / "bad.onnx").exists()


def test_segment_options_map_to_cli_flags(tmp_path, example):
    # segment_mb and carry_memory_mb reach the driver as the CLI's flags do: the same bytes. (This
    # small model does not cut into 1 MiB segments; driver/tests/segments.rs tests the spilling.)
    spilled = cli_bytes(tmp_path, example, "--method", "gptq", "--segment-mb", "1", "--carry-memory-mb", "0")
    nibble.quantize_file(example, tmp_path / "api.onnx", method="gptq", segment_mb=1, carry_memory_mb=0)
    assert (tmp_path / "api.onnx").read_bytes() == spilled
    # The default ("auto") keeps this small model whole: the bytes of segment_mb=0.
    whole = tmp_path / "whole.onnx"
    run_cli("quantize", example, "-o", whole, "--method", "gptq", "--segment-mb", "0", check=0)
    for value in ("auto", 0):
        out = tmp_path / f"auto_{value}.onnx"
        nibble.quantize_file(example, out, method="gptq", segment_mb=value)
        assert out.read_bytes() == whole.read_bytes(), value
    with pytest.raises(ValueError, match="segment_mb half"):
        nibble.quantize_file(example, tmp_path / "bad.onnx", method="gptq", segment_mb="half")


def test_per_subgraph_and_no_fusion(tmp_path, example):
    expected = cli_bytes(tmp_path, example, "--method", "awq_lite", "--per-subgraph", "--no-fuse-siblings")
    model = nibble.quantize(example, "awq_lite", awqlite_run_per_subgraph=True, awqlite_fuse_nodes=False)
    assert model.SerializeToString() == expected


def test_modelproto_input_equals_path_input(example):
    from_path = nibble.quantize(str(example), calibration_method="awq_clip")
    from_proto = nibble.quantize(onnx.load(str(example)), calibration_method="awq_clip")
    assert from_proto.SerializeToString() == from_path.SerializeToString()


@pytest.mark.parametrize("method", ["awq_lite", "awq_clip", "awq_full"])
def test_reader_and_list_equal_npz(tmp_path, example, samples, method):
    npz = tmp_path / "calib.npz"
    np.savez(npz, input=np.stack([s["input"] for s in samples]))  # [4, 1, 16, 64]
    expected = cli_bytes(tmp_path, example, "--method", method, "--calibration-data", npz)
    by_reader = nibble.quantize(example, method, calibration_data_reader=Reader(samples))
    assert by_reader.SerializeToString() == expected
    by_list = nibble.quantize(example, method, calibration_data_reader=samples)
    assert by_list.SerializeToString() == expected
    nibble.quantize_file(example, tmp_path / "api.onnx", method=method, calibration_data=Reader(samples))
    assert (tmp_path / "api.onnx").read_bytes() == expected
    # Random calibration gives other bytes: the samples were used.
    assert nibble.quantize(example, method).SerializeToString() != expected


def test_reader_dtypes_convert_as_npz_does(tmp_path, example, samples):
    # float64 arrays narrow to float32, as the .npz reader does.
    npz = tmp_path / "calib64.npz"
    np.savez(npz, input=np.stack([s["input"].astype(np.float64) * 1.1 for s in samples]))
    expected = cli_bytes(tmp_path, example, "--method", "awq_clip", "--calibration-data", npz)
    as64 = [{"input": s["input"].astype(np.float64) * 1.1} for s in samples]
    assert nibble.quantize(example, "awq_clip", calibration_data_reader=as64).SerializeToString() == expected


def test_float16_model_and_external_data(tmp_path):
    model = tmp_path / "f16.onnx"
    run_cli("example", model, "--hidden", "64", "--intermediate", "128", "--layers", "1", "--vocab", "50",
            "--dtype", "f16", "--external-data", "always", check=0)
    # Same file names in two folders: the .onnx names its data file.
    (tmp_path / "cli").mkdir()
    (tmp_path / "api").mkdir()
    out = tmp_path / "cli" / "q.onnx"
    run_cli("quantize", model, "-o", out, "--method", "awq_lite", "--external-data", "always", check=0)
    nibble.quantize_file(model, tmp_path / "api" / "q.onnx", method="awq_lite", external_data="always")
    assert (tmp_path / "api" / "q.onnx").read_bytes() == out.read_bytes()
    assert (tmp_path / "api" / "q.onnx_data").read_bytes() == (tmp_path / "cli" / "q.onnx_data").read_bytes()
    # ModelOpt's call loads the external data into the returned ModelProto.
    proto = nibble.quantize(str(model), "awq_lite")
    assert all(t.data_location == onnx.TensorProto.DEFAULT for t in proto.graph.initializer)
    assert onnx.load(str(out), load_external_data=True).graph.initializer[0].raw_data == \
        proto.graph.initializer[0].raw_data


def test_inspect_returns_plain_data(example):
    info = nibble.inspect(example)
    assert info["opset"] == 17 and info["opset_after"] == 21
    decisions = {w["node"]: w["decision"] for w in info["weights"]}
    assert len(decisions) == 13
    assert decisions["/lm_head/MatMul"] == "excluded"
    assert sum(d == "quantize" for d in decisions.values()) == 12
    w = info["weights"][0]
    assert w["shape"] == [64, 64] and w["dtype"] == "float" and w["bytes"] == 64 * 64 * 4
    assert info["report"] == run_cli("inspect", example, check=0).stdout
    assert nibble.inspect(example, exclude=[])["weights"][-1]["decision"] == "quantize"


def test_compare_returns_plain_data(tmp_path, example):
    q = tmp_path / "q.onnx"
    nibble.quantize_file(example, q)
    r = nibble.compare(example, q, per_layer=True)
    (out,) = r["outputs"]
    assert out["output"] == "logits"
    assert 0 < out["relative_error"] < 0.5 and 0.9 < out["cosine"] <= 1.0
    assert 0.0 <= out["top1_agreement"] <= 1.0
    assert len(r["layers"]) == 12
    errors = [layer["relative_error"] for layer in r["layers"]]
    assert errors == sorted(errors, reverse=True)
    # The same numbers as the CLI's --json.
    import json

    cli = json.loads(run_cli("compare", example, q, "--json", check=0).stdout)
    assert cli[0]["relative_error"] == out["relative_error"]
    assert cli[0]["cosine"] == out["cosine"]


def test_compare_by_segments_agrees_with_the_whole_graph(tmp_path):
    # The default example (4 layers of 3.2 MB of float32 weights), cut into segments of 1 MiB, each
    # run in its own ONNX Runtime session, every carried tensor spilled to disk.
    example = tmp_path / "t.onnx"
    run_cli("example", example, check=0)
    q = tmp_path / "q.onnx"
    nibble.quantize_file(example, q)
    whole = nibble.compare(example, q, per_layer=True, segment_mb=0)
    cut = nibble.compare(example, q, per_layer=True, segment_mb=1, carry_memory_mb=0)
    # float32: equal up to the fusions ONNX Runtime's default optimizations apply per session.
    assert cut["outputs"][0]["relative_error"] == pytest.approx(whole["outputs"][0]["relative_error"], rel=1e-5)
    by_node = {layer["node"]: layer["relative_error"] for layer in whole["layers"]}
    assert len(cut["layers"]) == len(by_node) == 24
    for layer in cut["layers"]:
        assert layer["relative_error"] == pytest.approx(by_node[layer["node"]], rel=1e-5)
    with pytest.raises(ValueError, match="segment_mb lots"):
        nibble.compare(example, q, segment_mb="lots")
