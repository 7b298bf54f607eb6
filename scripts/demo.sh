#!/usr/bin/env bash
# The main job on an example model: build nibble, generate a transformer-like ONNX model
# (opset 17, 11 MB of f32 weights), show what will be quantized, quantize it to INT4 (rtn_dq,
# block 128), and run original and quantized side by side in ONNX Runtime.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup-ort.sh >/dev/null
cargo build --release --quiet -p nibble-driver
mkdir -p example
target/release/nibble example example/model.onnx --force
target/release/nibble inspect example/model.onnx | head -n 8
target/release/nibble quantize example/model.onnx -o example/model_int4.onnx --force
target/release/nibble compare example/model.onnx example/model_int4.onnx
