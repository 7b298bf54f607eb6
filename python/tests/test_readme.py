"""The README's ModelOpt-style Python script runs as written on the example model and writes a
model that ONNX Runtime runs."""

import os
import re
import subprocess
import sys

import numpy as np
import onnxruntime as ort
import pytest

from conftest import run_cli

README = os.path.join(os.path.dirname(__file__), "..", "..", "README.md")


def test_readme_script(tmp_path):
    if not os.path.exists(README):
        pytest.fail(f"{README} is missing")
    with open(README, encoding="utf-8") as f:
        blocks = re.findall(r"```python\n(.*?)```", f.read(), re.S)
    (script,) = [b for b in blocks if "from nibble import quantize" in b]
    (tmp_path / "example").mkdir()
    run_cli("example", "example/model.onnx", check=0, cwd=tmp_path)
    p = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    out = tmp_path / "example" / "model_awq.onnx"
    s = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    y = s.run(None, {"input": np.zeros((1, 4, 256), np.float32)})[0]
    assert y.shape == (1, 4, 1000) and np.isfinite(y).all()
    assert out.stat().st_size < (tmp_path / "example" / "model.onnx").stat().st_size / 3
