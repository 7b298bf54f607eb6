#!/usr/bin/env python3
"""Quantize a model with ModelOpt (CPU/numpy path) and with nibble, and compare the outputs tensor by
tensor: node and initializer names, attributes, dtypes, dims and bytes. A development check (ModelOpt
pulls in torch); not part of the test suite. Usage:

    python3 -m venv .venv && .venv/bin/pip install nvidia-modelopt onnx onnxruntime onnx-graphsurgeon ml_dtypes
    .venv/bin/python scripts/compare_modelopt.py MODEL.onnx [--block-size 128] [--nibble target/release/nibble]
"""
import argparse, os, subprocess, sys, tempfile, time

import numpy as np
import onnx
from onnx import numpy_helper


def tensors(model):
    out = {}
    for t in model.graph.initializer:
        out[t.name] = (t.data_type, tuple(t.dims), numpy_helper.to_array(t).tobytes() if t.data_type not in (21, 22) else bytes(t.raw_data))
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--block-size", type=int, default=128)
    ap.add_argument("--nibble", default="target/release/nibble")
    args = ap.parse_args()
    from modelopt.onnx.quantization.int4 import quantize

    tmp = tempfile.mkdtemp()
    t0 = time.time()
    ref = quantize(args.model, calibration_method="rtn_dq", block_size=args.block_size)
    t_ref = time.time() - t0
    out = os.path.join(tmp, "nibble.onnx")
    t0 = time.time()
    subprocess.run([args.nibble, "quantize", args.model, "-o", out, "--block-size", str(args.block_size), "--force"], check=True)
    t_nib = time.time() - t0
    got = onnx.load(out)
    a, b = tensors(ref), tensors(got)
    ref_names = {n.name for n in ref.graph.node}
    got_names = {n.name for n in got.graph.node}
    problems = []
    if set(a) != set(b):
        problems.append(f"initializer names differ: only ModelOpt {sorted(set(a) - set(b))[:5]}, only nibble {sorted(set(b) - set(a))[:5]}")
    if ref_names != got_names:
        problems.append(f"node names differ: only ModelOpt {sorted(ref_names - got_names)[:5]}, only nibble {sorted(got_names - ref_names)[:5]}")
    same = 0
    for name in sorted(set(a) & set(b)):
        if a[name] == b[name]:
            same += 1
        else:
            problems.append(f"{name}: dtype/dims/bytes differ ({a[name][:2]} vs {b[name][:2]})")
    ref_dq = {n.name: {x.name: onnx.helper.get_attribute_value(x) for x in n.attribute} for n in ref.graph.node if n.op_type == "DequantizeLinear"}
    got_dq = {n.name: {x.name: onnx.helper.get_attribute_value(x) for x in n.attribute} for n in got.graph.node if n.op_type == "DequantizeLinear"}
    for k in ref_dq:
        if ref_dq[k] != got_dq.get(k):
            problems.append(f"{k}: attributes {ref_dq[k]} vs {got_dq.get(k)}")
    print(f"{same} of {len(a)} initializers identical; {len(ref_dq)} DQ nodes; ModelOpt {t_ref:.2f} s, nibble {t_nib:.2f} s (x{t_ref / t_nib:.1f})")
    print(f"opsets: ModelOpt {[(o.domain, o.version) for o in ref.opset_import]}, nibble {[(o.domain, o.version) for o in got.opset_import]}")
    for p in problems[:20]:
        print("DIFF", p)
    sys.exit(1 if problems else 0)


if __name__ == "__main__":
    main()
