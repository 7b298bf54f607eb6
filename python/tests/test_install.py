"""The package as pip installed it: a wheel (not an editable build), the console script, and
ONNX Runtime's library from the onnxruntime package."""

import os
import subprocess
import sys
from importlib import metadata

import nibble
from conftest import nibble_command, run_cli


def test_installed_from_an_abi3_wheel():
    dist = metadata.distribution("nibble")
    wheel = dist.read_text("WHEEL")
    assert wheel is not None, "no WHEEL metadata: not installed from a wheel"
    tags = [line.split(":", 1)[1].strip() for line in wheel.splitlines() if line.startswith("Tag:")]
    assert tags and all(t.startswith("cp39-abi3-") for t in tags), tags
    # The extension module lives in site-packages, not in the source tree.
    assert "site-packages" in nibble._nibble.__file__, nibble._nibble.__file__
    assert [ep.value for ep in dist.entry_points if ep.name == "nibble"] == ["nibble.__main__:main"]


def test_onnxruntime_library_comes_from_the_onnxruntime_package():
    import importlib.util

    capi = os.path.join(os.path.dirname(importlib.util.find_spec("onnxruntime").origin), "capi")
    lib = nibble.ort_library()
    assert os.path.dirname(lib) == capi, lib
    assert os.path.basename(lib).startswith("libonnxruntime")


def test_console_script_and_python_m_print_the_same_help():
    a = run_cli("--help", check=0)
    b = subprocess.run([sys.executable, "-m", "nibble", "--help"], capture_output=True, text=True)
    assert b.returncode == 0
    assert a.stdout == b.stdout
    assert "quantize" in a.stdout and "Usage: nibble" in a.stdout


def test_cli_exit_codes(tmp_path):
    assert run_cli("--version", check=0).stdout.startswith("nibble ")
    usage = run_cli("quantize", check=2)
    assert "Usage: nibble quantize" in usage.stderr
    assert run_cli("no-such-command", check=2).stderr.startswith("error: unrecognized subcommand")
    missing = run_cli("quantize", tmp_path / "missing.onnx", check=1)
    assert missing.stderr.startswith("nibble: error: cannot read ")
    assert not (tmp_path / "missing_int4.onnx").exists()


def test_main_returns_exit_codes_in_process(tmp_path):
    assert nibble.main(["quantize", str(tmp_path / "missing.onnx")]) == 1
    assert nibble.main(["quantize", "--block-size"]) == 2


def test_cli_in_the_venv_needs_no_set_up(tmp_path, example):
    # A clean environment: no ORT_DYLIB_PATH, run from a folder without .ort/.
    env = {k: v for k, v in os.environ.items() if k != "ORT_DYLIB_PATH"}
    out = tmp_path / "q.onnx"
    p = run_cli("quantize", example, "-o", out, "--method", "awq_lite", check=0, env=env, cwd=tmp_path)
    assert p.stdout.startswith("quantized 12 of 13 weights")
    assert out.exists()
