#!/usr/bin/env bash
# The whole test suite, set-up included: ONNX Runtime library, formatting, lints, every test, and the
# Python package (wheel built in a fresh venv, then pytest: scripts/test-python.sh).
# Ends with one line "tests: N passed, M failed, K skipped" summing every test binary and pytest's results
# (pytest's skipped tests are not counted as passed; its errors count as failed).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup-ort.sh
cargo fmt --all -- --check
cargo fmt --manifest-path python/Cargo.toml -- --check
cargo clippy --workspace --all-targets --quiet -- -D warnings
# The Python binding crate is its own workspace (see python/Cargo.toml): linted on its own.
CARGO_TARGET_DIR=$PWD/target cargo clippy --manifest-path python/Cargo.toml --all-targets --quiet -- -D warnings
log=$(mktemp)
trap 'rm -f "$log"' EXIT
status=0
cargo test --workspace --no-fail-fast 2>&1 | tee "$log" || status=$?
pystatus=0
scripts/test-python.sh 2>&1 | tee -a "$log" || pystatus=$?
if [ "$status" -eq 0 ]; then status=$pystatus; fi
# A wheel that does not build or install never reaches pytest's summary: count it as one failure.
pyfail=0
if [ "$pystatus" -ne 0 ] && ! grep -qE '^=+ .* in [0-9.]+s' "$log"; then
  echo "python package: the wheel did not build or install (counted as 1 failed)"
  pyfail=1
fi
# cargo: "test result: ok. N passed; M failed; K ignored; ..."; pytest: "=== N passed, K skipped, M failed in ... ===".
# Skipped (pytest) and ignored (cargo) tests are counted apart, never as passed.
awk -v f="$pyfail" '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i; if ($(i+1) ~ /^ignored/) s += $i } }
     /^=+ .*[0-9]+ (passed|failed|error|errors|skipped)/ && / in [0-9.]+s/ {
       for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^(failed|error|errors)/) f += $i; if ($(i+1) ~ /^skipped/) s += $i }
     }
     END { printf "tests: %d passed, %d failed, %d skipped\n", p, f, s }' "$log"
exit "$status"
