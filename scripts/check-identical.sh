#!/usr/bin/env bash
# Proof that two nibble binaries behave the same: OLD_BIN and NEW_BIN generate the example models
# (byte-compared), then quantize the demo model, small example models (f32, f16, bf16; opsets 13,
# 17, 21; external data) and hand-made models with Gemm (transB=1 with bias, Constant-node weight)
# and Gather tables through every method x format x zero point x block size, plus AWQ variants
# (--per-subgraph, --no-fuse-siblings), Gather tables (--gather-axis 0/1), INT8 layers
# (--int8-layers, --mixed-precision), --no-default-exclude and error cases. Outputs (model and
# external data) are compared with cmp; exit codes, stdout (timings masked) and stderr must match.
#
# Usage: scripts/check-identical.sh OLD_BIN NEW_BIN   (last line: "identical: N runs" or a failure count)
set -euo pipefail
[ $# -eq 2 ] || { echo "usage: $0 OLD_BIN NEW_BIN" >&2; exit 2; }
old=$(realpath "$1")
new=$(realpath "$2")
cd "$(dirname "$0")/.."
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/old" "$work/new" "$work/in"
runs=0
fails=0

mask() { sed -E 's/[0-9]+\.[0-9]+ s \(/T s (/; s#'"$work"'/(old|new)/#OUT/#g'; }

# Runs "$@" (with OUT standing for the output folder) through both binaries and compares.
check() {
    local label="$1"
    shift
    local args_old=() args_new=() a
    for a in "$@"; do
        args_old+=("${a//OUT/$work/old}")
        args_new+=("${a//OUT/$work/new}")
    done
    local co=0 cn=0
    "$old" "${args_old[@]}" >"$work/o.out" 2>"$work/o.err" || co=$?
    "$new" "${args_new[@]}" >"$work/n.out" 2>"$work/n.err" || cn=$?
    runs=$((runs + 1))
    local why=""
    [ "$co" = "$cn" ] || why="exit $co vs $cn"
    cmp -s <(mask <"$work/o.out") <(mask <"$work/n.out") || why="$why stdout differs"
    cmp -s <(mask <"$work/o.err") <(mask <"$work/n.err") || why="$why stderr differs"
    for f in "$work"/old/*; do
        [ -e "$f" ] || continue
        local g="$work/new/$(basename "$f")"
        if [ ! -e "$g" ]; then
            why="$why $(basename "$f") missing"
        elif ! cmp -s "$f" "$g"; then
            why="$why $(basename "$f") differs"
        fi
    done
    for g in "$work"/new/*; do
        [ -e "$g" ] && [ ! -e "$work/old/$(basename "$g")" ] && why="$why extra $(basename "$g")"
    done
    if [ -n "$why" ]; then
        fails=$((fails + 1))
        echo "DIFFERENT: $label:$why"
        diff <(mask <"$work/o.err") <(mask <"$work/n.err") | head -5 || true
    fi
    rm -f "$work"/old/* "$work"/new/*
}

# Inputs: `nibble example` from both binaries must be byte-identical; the old one's are used.
examples=(
    "demo.onnx"
    "f32.onnx --hidden 64 --intermediate 128 --layers 2 --vocab 96"
    "f16.onnx --hidden 64 --intermediate 128 --layers 2 --vocab 96 --dtype f16"
    "bf16.onnx --hidden 64 --intermediate 128 --layers 2 --vocab 96 --dtype bf16"
    "op13.onnx --hidden 64 --intermediate 128 --layers 2 --vocab 96 --opset 13"
    "op21.onnx --hidden 64 --intermediate 128 --layers 2 --vocab 96 --opset 21"
    "ext.onnx --hidden 64 --intermediate 128 --layers 2 --vocab 96 --external-data always"
    "wide.onnx --hidden 256 --intermediate 704 --layers 1 --vocab 96 --dtype f16"
)
for e in "${examples[@]}"; do
    read -r name rest <<<"$e"
    # shellcheck disable=SC2086
    check "example $e" example "OUT/$name" $rest
    # shellcheck disable=SC2086
    "$old" example "$work/in/$name" $rest >/dev/null
done
cargo run --quiet --release -p nibble-driver --example check_models -- "$work/in"

q() { check "quantize $*" quantize "$@"; }

for m in f32 f16 bf16 op13 op21 ext gemm_f32 gemm_f16; do
    src="$work/in/$m.onnx"
    check "inspect $m" inspect "$src"
    for method in rtn_dq rtn awq_lite awq_clip awq_full; do
        for format in dq matmulnbits; do
            for zp in "" --zero-point; do
                for block in 128 32; do
                    # shellcheck disable=SC2086
                    q "$src" -o OUT/q.onnx --method $method --format $format --block-size $block $zp
                done
            done
        done
    done
    q "$src" -o OUT/q.onnx --block-size -1
    q "$src" -o OUT/q.onnx --block-size -1 --zero-point --method rtn
    q "$src" -o OUT/q.onnx --method awq_lite --per-subgraph
    q "$src" -o OUT/q.onnx --method awq_lite --no-fuse-siblings --zero-point
    q "$src" -o OUT/q.onnx --method awq_full --no-fuse-siblings --format matmulnbits
    q "$src" -o OUT/q.onnx --method awq_lite --per-subgraph --no-fuse-siblings --block-size 32
    q "$src" -o OUT/q.onnx --method awq_clip --calibration-samples 3 --calibration-seed 5 --alpha-step 0.25
    q "$src" -o OUT/q.onnx --no-default-exclude --method awq_lite
    q "$src" -o OUT/q.onnx --exclude '/layer/in' --exclude '/model/layers.0'
    q "$src" -o OUT/q.onnx --external-data always
    q "$src" -o OUT/q.onnx --external-data never --format matmulnbits --accuracy-level 4
    for fmt in dq matmulnbits; do
        q "$src" -o OUT/q.onnx --int8-layers layers.0,/layer/proj --format $fmt
        q "$src" -o OUT/q.onnx --mixed-precision --format $fmt --zero-point
        q "$src" -o OUT/q.onnx --int8-layers layers.1 --method awq_lite --format $fmt
        for axis in 0 1; do
            q "$src" -o OUT/q.onnx --gather-axis $axis --format $fmt
            q "$src" -o OUT/q.onnx --gather-axis $axis --zero-point --gather-block-size 16 --format $fmt
            q "$src" -o OUT/q.onnx --gather-axis $axis --method awq_lite --no-default-exclude --format $fmt
        done
    done
done

# The demo model (scripts/demo.sh): the main job, and one run of each method and form.
demo="$work/in/demo.onnx"
check "inspect demo" inspect "$demo"
for method in rtn_dq rtn awq_lite awq_clip awq_full; do
    q "$demo" -o OUT/q.onnx --method $method
    q "$demo" -o OUT/q.onnx --method $method --format matmulnbits --zero-point
done

# GPTQ (Hessians, factors, the working-set batches of --calibration-memory-mb): both forms, zero
# point, act order, awq_gptq (fused and not), sequential, segments; wide.onnx has K = 704 (faer's
# blocked and recursive factorization paths).
for m in f32 f16 bf16 ext gemm_f32 gemm_f16 wide; do
    src="$work/in/$m.onnx"
    q "$src" -o OUT/q.onnx --method gptq
    q "$src" -o OUT/q.onnx --method gptq --format matmulnbits --zero-point --block-size 32
    q "$src" -o OUT/q.onnx --method gptq --act-order --zero-point
    q "$src" -o OUT/q.onnx --method awq_gptq
    q "$src" -o OUT/q.onnx --method awq_gptq --no-fuse-siblings --format matmulnbits
    q "$src" -o OUT/q.onnx --method gptq --sequential
    q "$src" -o OUT/q.onnx --method gptq --segment-mb 1 --calibration-memory-mb 1
done
q "$demo" -o OUT/q.onnx --method gptq

# Errors and usage: same message, same exit code, no output.
q "$work/in/missing.onnx" -o OUT/q.onnx
q "$work/in/f32.onnx" -o OUT/q.onnx --block-size 3
q "$work/in/f32.onnx" -o OUT/q.onnx --format matmulnbits --block-size 24
q "$work/in/f32.onnx" -o OUT/q.onnx --gather-axis 2
q "$work/in/f32.onnx" -o OUT/q.onnx --exclude '('
q "$work/in/f32.onnx" -o OUT/q.onnx --int8-layers nothing.matches
q "$work/in/f32.onnx" -o OUT/q.onnx --method awq_lite --calibration-data "$work/in/missing.npz"
q "$work/in/f32.onnx" -o OUT/q.onnx --method awq_lite --calibration-shapes 'input:1xq'
q "$work/in/f32.onnx" -o OUT/q.onnx --alpha-step 0
q "$work/in/f32.onnx" -o "$work/in/f32.onnx"
q "$work/in/f32.onnx" --method nope
check "no command" 
check "help" --help
check "quantize help" quantize --help
check "version" --version
check "example bad dtype" example OUT/x.onnx --dtype f8

if [ "$fails" -eq 0 ]; then
    echo "identical: $runs runs"
else
    echo "DIFFERENT: $fails of $runs runs"
    exit 1
fi
