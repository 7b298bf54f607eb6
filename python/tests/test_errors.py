"""Bad options and bad inputs raise the exception of their kind with nibble's message, and leave
no output; Ctrl-C interrupts and leaves no output."""

import os
import signal
import subprocess
import sys
import textwrap
import time
import warnings

import numpy as np
import pytest

import nibble
from conftest import Reader, nibble_command


def test_unknown_kwargs_are_named(example):
    with pytest.raises(TypeError, match=r"unknown keyword argument\(s\) awq_alpha, bogus"):
        nibble.quantize(example, "rtn_dq", bogus=1, awq_alpha=0.2)


def test_use_column_major_is_refused(example):
    with pytest.raises(ValueError, match="use_column_major"):
        nibble.quantize(example, "rtn_dq", use_column_major=True)
    nibble.quantize(example, "rtn_dq", use_column_major=False)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"calibration_method": "awq_clip_trt"}, "calibration_method='awq_clip_trt'"),
        ({"calibration_method": "rtn_dq", "block_size": 3}, "block size"),
        ({"calibration_method": "rtn_dq", "block_size": 0}, "block size"),
        ({"calibration_method": "awq_lite", "awqlite_alpha_step": 0.0}, r"alpha_step 0(\.0)?: use a step in \(0, 1\]"),
        ({"calibration_method": "awq_clip", "awqclip_alpha_min": 1.5}, "clip_alpha_min 1.5"),
        ({"calibration_method": "rtn_dq", "gather_quantize_axis": 2}, "--gather-axis 2: use 0 or 1"),
        ({"calibration_method": "rtn_dq", "nodes_to_exclude": ["("]}, r"\("),
        ({"calibration_method": "rtn_dq", "log_level": "LOUD"}, "log_level='LOUD'"),
    ],
)
def test_bad_options_raise_value_error(example, kwargs, message):
    with pytest.raises(ValueError, match=message):
        nibble.quantize(example, **kwargs)


def test_bad_file_api_options_raise_value_error(example, tmp_path):
    out = tmp_path / "q.onnx"
    with pytest.raises(ValueError, match=r"method=\"sgd\": use one of rtn_dq, rtn, awq_lite, awq_clip, awq_full, gptq, awq_gptq"):
        nibble.quantize_file(example, out, method="sgd")
    with pytest.raises(ValueError, match="external_data"):
        nibble.quantize_file(example, out, external_data="sometimes")
    with pytest.raises(ValueError, match="format"):
        nibble.quantize_file(example, out, format="gguf")
    assert not out.exists()


def test_bad_calibration_data_raises_value_error(example, samples, tmp_path):
    with pytest.raises(ValueError, match=r"no array named 'input'.*has \[\"x\"\]"):
        nibble.quantize(example, "awq_clip", calibration_data_reader=[{"x": samples[0]["input"]}])
    with pytest.raises(ValueError, match="holds no samples"):
        nibble.quantize(example, "awq_clip", calibration_data_reader=Reader([]))
    with pytest.raises(ValueError, match="calibration array 'input' is int64, but the model input is float"):
        nibble.quantize(example, "awq_clip", calibration_data_reader=[{"input": np.ones((1, 4, 64), np.int64)}])
    with pytest.raises(ValueError, match="size 32 in dimension 2 of a sample, the model expects 64"):
        nibble.quantize(example, "awq_clip", calibration_data_reader=[{"input": np.ones((1, 4, 32), np.float32)}])
    with pytest.raises(ValueError, match="pass a list of dicts"):
        nibble.quantize(example, "awq_clip", calibration_data_reader=samples[0])
    with pytest.raises(ValueError, match="not numeric"):
        nibble.quantize(example, "awq_clip", calibration_data_reader=[{"input": np.array(["a"])}])
    with pytest.raises(ValueError, match="calibration-data"):
        nibble.quantize_file(example, tmp_path / "q.onnx", method="awq_clip", calibration_data=tmp_path / "no.npz")
    assert not (tmp_path / "q.onnx").exists()


def test_files_raise_os_errors(example, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"cannot read .*missing\.onnx"):
        nibble.quantize_file(tmp_path / "missing.onnx", tmp_path / "q.onnx")
    with pytest.raises(FileNotFoundError):
        nibble.quantize(str(tmp_path / "missing.onnx"), "rtn_dq")
    out = tmp_path / "q.onnx"
    out.write_bytes(b"keep me")
    with pytest.raises(FileExistsError, match="already exists; pass --force"):
        nibble.quantize_file(example, out)
    assert out.read_bytes() == b"keep me"
    nibble.quantize_file(example, out, force=True)
    with pytest.raises(IsADirectoryError, match="is a directory"):
        nibble.quantize_file(example, tmp_path)
    with pytest.raises(OSError, match="is the input model"):
        nibble.quantize_file(example, example, force=True)
    with pytest.raises(OSError, match="does not exist"):
        nibble.quantize_file(example, tmp_path / "no" / "q.onnx")


def test_not_a_model_raises_value_error(tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\xff\x00 not protobuf")
    with pytest.raises(ValueError, match="is not a valid ONNX model"):
        nibble.quantize_file(bad, tmp_path / "q.onnx")
    with pytest.raises(ValueError, match="is not a valid ONNX model"):
        nibble.inspect(bad)
    with pytest.raises(ValueError, match="neither a path nor an onnx.ModelProto"):
        nibble.quantize(42, "rtn_dq")


def test_onnx_runtime_failure_raises_runtime_error(example, tmp_path):
    # ONNX Runtime is loaded once per process: a child process with a wrong library path.
    code = textwrap.dedent(
        f"""
        import nibble
        try:
            nibble.quantize_file({str(example)!r}, {str(tmp_path / "q.onnx")!r}, method="awq_lite")
        except RuntimeError as e:
            print("RuntimeError:", e)
        """
    )
    env = dict(os.environ, ORT_DYLIB_PATH=str(tmp_path / "libonnxruntime.so.0"))
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert p.stdout.startswith("RuntimeError: ONNX Runtime: ORT_DYLIB_PATH="), p.stdout + p.stderr
    assert "is not a file" in p.stdout
    assert not (tmp_path / "q.onnx").exists()


def test_other_execution_providers_warn_then_use_cpu(example):
    with pytest.warns(UserWarning, match=r"calibrates with ONNX Runtime on CPU; calibration_eps \['cuda:0'\]"):
        a = nibble.quantize(example, "rtn_dq", calibration_eps=["cuda:0"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        b = nibble.quantize(example, "rtn_dq")  # ModelOpt's default list: no warning
        c = nibble.quantize(example, "rtn_dq", calibration_eps=["cpu"])
    assert a.SerializeToString() == b.SerializeToString() == c.SerializeToString()


# Ctrl-C: a model whose AWQ run takes a few seconds, interrupted a third of the way through.
SLOW = ["--hidden", "512", "--intermediate", "1536", "--layers", "4", "--vocab", "1000"]
SLOW_ARGS = dict(method="awq_full", calibration_samples=16)


@pytest.fixture(scope="module")
def slow_run(tmp_path_factory):
    """A model and how long quantizing it with SLOW_ARGS takes here (s)."""
    folder = tmp_path_factory.mktemp("slow")
    path = folder / "slow.onnx"
    subprocess.run([nibble_command(), "example", str(path), *SLOW], check=True, capture_output=True)
    t = time.time()
    nibble.quantize_file(path, folder / "timing.onnx", **SLOW_ARGS)
    seconds = time.time() - t
    assert seconds > 1.0, f"the run takes {seconds:.2f} s: too fast to interrupt reliably"
    return path, seconds


def interrupt(args, seconds, cwd):
    """Starts `python args...`, waits for it to print 'started', sends SIGINT `seconds` later;
    returns (exit code, stdout, stderr)."""
    p = subprocess.Popen([sys.executable, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=cwd)
    line = p.stdout.readline()
    assert "started" in line, line + p.stderr.read()
    time.sleep(seconds)
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=300)
    return p.returncode, line + out, err


def test_ctrl_c_in_python_raises_keyboard_interrupt_and_leaves_no_output(slow_run, tmp_path):
    model, seconds = slow_run
    code = textwrap.dedent(
        f"""
        import os, sys, time
        import nibble
        print("started", flush=True)
        try:
            nibble.quantize_file({str(model)!r}, "q.onnx", **{SLOW_ARGS!r})
            print("finished")
        except KeyboardInterrupt:
            print("interrupted", flush=True)
            # The computation goes on in the background: wait past its end, then look.
            time.sleep({seconds + 2.0})
            print("left:", sorted(os.listdir(".")))
        """
    )
    rc, out, err = interrupt(["-c", code], 0.2 + seconds / 3, tmp_path)
    assert "interrupted" in out and "finished" not in out, out + err
    assert "left: []" in out, out + err


def test_ctrl_c_in_the_cli_exits_130_and_leaves_no_output(slow_run, tmp_path):
    model, seconds = slow_run
    code = "import nibble, sys; print('started', flush=True); sys.exit(nibble.main())"
    args = ["quantize", str(model), "-o", "q.onnx", "--method", "awq_full", "--calibration-samples", "16"]
    rc, out, err = interrupt(["-c", code, *args], 0.2 + seconds / 3, tmp_path)
    assert rc == 130, (rc, out, err)
    assert "nibble: interrupted; no output written" in err
    assert os.listdir(tmp_path) == []
