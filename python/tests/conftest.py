"""Shared fixtures: small synthetic models written by `nibble example`, and a runner for the
installed `nibble` command."""

import os
import shutil
import subprocess
import sys

import pytest

import nibble

# A model small enough for fast AWQ runs, with a /lm_head that the default exclusion keeps float.
SMALL = ["--hidden", "64", "--intermediate", "128", "--layers", "2", "--vocab", "100"]


def nibble_command():
    """The `nibble` console script installed next to this interpreter."""
    path = shutil.which("nibble", path=os.path.dirname(sys.executable))
    assert path is not None, "the nibble console script is not installed next to " + sys.executable
    return path


def run_cli(*args, check=None, **kwargs):
    """Runs the installed `nibble` command; returns the CompletedProcess (text output)."""
    p = subprocess.run([nibble_command(), *map(str, args)], capture_output=True, text=True, **kwargs)
    if check is not None:
        assert p.returncode == check, f"exit {p.returncode}\nstdout:\n{p.stdout}\nstderr:\n{p.stderr}"
    return p


@pytest.fixture(scope="session")
def example(tmp_path_factory):
    """Path of a small generated float32 model (input 'input' [batch, seq, 64], output 'logits')."""
    path = tmp_path_factory.mktemp("models") / "example.onnx"
    run_cli("example", path, *SMALL, check=0)
    return path


@pytest.fixture(scope="session")
def samples():
    """Four calibration samples for the example model, as a reader would return them."""
    np = pytest.importorskip("numpy")
    rng = np.random.default_rng(7)
    return [{"input": rng.standard_normal((1, 16, 64)).astype(np.float32)} for _ in range(4)]


class Reader:
    """An ONNX Runtime-style CalibrationDataReader: get_next() returns a dict, then None."""

    def __init__(self, samples):
        self.items = iter(samples)

    def get_next(self):
        return next(self.items, None)


@pytest.fixture
def reader(samples):
    return Reader(samples)
