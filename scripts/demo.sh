#!/usr/bin/env bash
# The main job on an example model: build nibble, generate a transformer-like ONNX model
# (opset 17, 11 MB of f32 weights), show what will be quantized, quantize it to INT4 (rtn_dq,
# block 128), and run original and quantized side by side in ONNX Runtime.
set -euo pipefail
cd "$(dirname "$0")/.."
step() { printf '\n== %s\n' "$*"; }
step "1/5 ONNX Runtime's library from the PyPI wheel into .ort/ (a few seconds)"
scripts/setup-ort.sh
step "2/5 building nibble in release mode (first time: about 6-7 minutes on 2 cores; cargo shows its progress)"
cargo build --release -p nibble-driver
mkdir -p example
step "3/5 a generated example model (random weights, 4 decoder-like layers)"
target/release/nibble example example/model.onnx --force
step "4/5 what will be quantized (first 12 lines; the whole listing is in example/inspect.txt)"
target/release/nibble inspect example/model.onnx > example/inspect.txt
head -n 12 example/inspect.txt
echo "... ($(grep -c ' quantize ' example/inspect.txt) weights to quantize, $(wc -l < example/inspect.txt) lines in all)"
step "5/5 quantize to INT4 (rtn_dq, block 128) and compare in ONNX Runtime"
target/release/nibble quantize example/model.onnx -o example/model_int4.onnx --force
target/release/nibble compare example/model.onnx example/model_int4.onnx
cat <<'TXT'

How to read this: `rel. error` is ||y_int4 - y_float|| / ||y_float|| over the logits for the same seeded
random inputs, `cosine` their cosine similarity, and `top-1` the share of positions whose largest logit is the
same token. The example's weights and inputs are random (untrained): 4-bit rounding moves each random layer's
output by roughly 10%, which compounds over its 4 layers to the ~18% shown. Trained models lose far less; see
BENCHMARKS.md for perplexity on real LLMs and README's "Which method" for what to use there.
TXT
