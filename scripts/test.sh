#!/usr/bin/env bash
# The whole test suite, set-up included: ONNX Runtime library, formatting, lints, every test.
# Ends with one line "tests: N passed, M failed" summing every test binary.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup-ort.sh
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --quiet -- -D warnings
log=$(mktemp)
trap 'rm -f "$log"' EXIT
status=0
cargo test --workspace --no-fail-fast 2>&1 | tee "$log" || status=$?
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i } }
     END { printf "tests: %d passed, %d failed\n", p, f }' "$log"
exit "$status"
