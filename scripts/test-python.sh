#!/usr/bin/env bash
# The Python package's tests: builds the wheel (release, abi3) from this checkout in a fresh venv,
# installs it with its test extras from PyPI, and runs pytest on python/tests.
# Reuses the repository's cargo target dir (target/release), so a second run only relinks.
# Environment: PYTHON (default python3), PYTEST_ARGS (extra pytest arguments).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
venv=$root/target/py-venv
wheels=$root/target/wheels
rm -rf "$venv" "$wheels"
"${PYTHON:-python3}" -m venv "$venv"
# pip's isolated build fetches maturin; the wheel lands in target/wheels.
CARGO_TARGET_DIR=$root/target "$venv/bin/pip" wheel --quiet --no-deps --wheel-dir "$wheels" .
wheel=$(ls "$wheels"/nibble-*.whl)
echo "wheel: $(basename "$wheel") ($(du -k "$wheel" | cut -f1) KiB)"
"$venv/bin/pip" install --quiet "$wheel[test]" onnxruntime-genai
# Run outside the source tree so that `import nibble` is the installed wheel.
cd "$root/python/tests"
"$venv/bin/python" -m pytest -p no:cacheprovider -rs ${PYTEST_ARGS:-} .
