#!/usr/bin/env bash
# Runs every fuzz target for a short period (default 20 s each) on stable Rust without sanitizers.
# Longer runs: FUZZ_SECONDS=600 scripts/fuzz-smoke.sh, or `cargo fuzz run -s none TARGET` in fuzz/
# (`RUSTC_BOOTSTRAP=1 cargo fuzz run TARGET` for AddressSanitizer). Crashes are kept in
# fuzz/artifacts/TARGET/; add each fixed one to fuzz/regressions/TARGET/ (replayed by the tests).
set -euo pipefail
cd "$(dirname "$0")/.."
seconds="${FUZZ_SECONDS:-20}"
if ! cargo fuzz --version >/dev/null 2>&1; then
  cargo install cargo-fuzz --version 0.13.2 --locked --quiet
fi
cd fuzz
for target in model npz kernels; do
  mkdir -p "corpus/$target"
  if [ -d "regressions/$target" ]; then cp -n regressions/"$target"/* "corpus/$target/" 2>/dev/null || true; fi
  echo "fuzz: $target for ${seconds}s"
  cargo fuzz run -s none "$target" "corpus/$target" -- -max_total_time="$seconds" -rss_limit_mb=4096 2>&1 | tail -n 3
done
