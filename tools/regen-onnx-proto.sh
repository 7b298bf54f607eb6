#!/usr/bin/env bash
# Regenerates driver/src/graph/onnx.rs (prost code for ONNX's protobuf schema) from driver/proto/onnx.proto.
# To update the schema: copy onnx/onnx.proto from the `onnx` PyPI wheel into driver/proto/ first.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo run --quiet --release --manifest-path tools/gen-onnx-proto/Cargo.toml
cargo fmt -p nibble-driver 2>/dev/null || true
echo "wrote driver/src/graph/onnx.rs"
