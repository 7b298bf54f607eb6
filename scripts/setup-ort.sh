#!/usr/bin/env bash
# Installs the ONNX Runtime shared library from the PyPI wheel into .ort/ (no numpy, no venv, ~3 s).
# nibble finds it there automatically; nothing is downloaded at build or run time.
set -euo pipefail
cd "$(dirname "$0")/.."
version="${ORT_VERSION:-1.32.0}"
if ! ls .ort/onnxruntime/capi/libonnxruntime.so.* >/dev/null 2>&1; then
  python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore --no-deps --target .ort "onnxruntime==${version}"
fi
ls .ort/onnxruntime/capi/libonnxruntime.so.* | head -n 1
