#!/usr/bin/env python3
"""--target-bits on the example model: achieved mean bits, bytes and output error per target.

For each method and target, quantizes `nibble example`'s model (hidden 256, MLP 704, 4 layers, vocab
1000; lm_head excluded by default) with `--target-bits B` and measures the output error against the
float model with `nibble compare --json` (relative error ||y - y_q|| / ||y|| of the
logits on seeded random inputs; ONNX Runtime default session, and
the weight-only error with session.qdq_matmulnbits_accuracy_level=1 where the two differ). The
all-4-bit and all-8-bit ends come from the refusal message's range. Prints a Markdown table.

    python3 benches/target_bits.py [--nibble target/release/nibble] [--methods rtn_dq,gptq]
"""

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile


def run(args):
    p = subprocess.run(args, capture_output=True, text=True)
    return p.returncode, p.stdout, p.stderr


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--nibble", default="target/release/nibble")
    ap.add_argument("--methods", default="rtn_dq,gptq")
    ap.add_argument("--fractions", default="0,0.1,0.25,0.5,1")
    args = ap.parse_args()
    nb = args.nibble
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "m.onnx")
        code, out, err = run([nb, "example", src])
        assert code == 0, err
        code, _, err = run([nb, "quantize", src, "-o", os.path.join(d, "x.onnx"), "--target-bits", "100"])
        m = re.search(r"give a target in ([0-9.]+)\.\.([0-9.]+)", err)
        assert m, err
        lo, hi = float(m.group(1)), float(m.group(2))
        print(f"range of targets on this model: {lo:.3f}..{hi:.3f} bits/parameter\n")
        print("| method | --target-bits | achieved bits | INT8 weights | weight bytes | output rel. error (default session) | weight-only rel. error (accuracy level 1) |")
        print("|---|---|---|---|---|---|---|")
        for method in args.methods.split(","):
            for f in [float(x) for x in args.fractions.split(",")]:
                target = min(max(round(lo + f * (hi - lo), 3), lo), hi)
                out_path = os.path.join(d, f"{method}_{f}.onnx")
                code, out, err = run([nb, "quantize", src, "-o", out_path, "--force", "--method", method,
                                      "--target-bits", f"{target}"])
                assert code == 0, err
                achieved = float(re.search(r"([0-9.]+) bits/parameter achieved", out).group(1))
                int8 = re.search(r"(\d+) of (\d+) weights at 8 bits", out)
                after = re.search(r"\(([0-9.]+ MB) -> ([0-9.]+ MB)\)", out).group(2)
                code, cmp, err = run([nb, "compare", src, out_path, "--json"])
                assert code == 0, err
                r = json.loads(cmp)[0]
                wo = r.get("weight_only_relative_error")
                wo = "same" if wo is None else f"{wo:.4e}"
                print(f"| {method} | {target:.3f} | {achieved:.3f} | {int8.group(1)}/{int8.group(2)} | {after} | {r['relative_error']:.4e} | {wo} |")
                sys.stdout.flush()


if __name__ == "__main__":
    main()
