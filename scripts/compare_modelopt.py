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
    ap.add_argument("--method", default="rtn_dq")
    ap.add_argument("--calibration-data", default=None, help=".npz keyed by input name, samples on axis 0")
    ap.add_argument("--zero-point", action="store_true")
    ap.add_argument("--int8-layers", default=None, help="ModelOpt's layers_8bit")
    ap.add_argument("--mixed-precision", action="store_true", help="ModelOpt's enable_mixed_quant")
    args = ap.parse_args()
    from modelopt.onnx.quantization.int4 import quantize

    tmp = tempfile.mkdtemp()
    t0 = time.time()
    reader = None
    if args.calibration_data:
        data = np.load(args.calibration_data)
        n = min(data[k].shape[0] for k in data.files)
        reader = [{k: data[k][i] for k in data.files} for i in range(n)]
    ref = quantize(args.model, calibration_method=args.method, block_size=args.block_size,
                   calibration_data_reader=reader, use_zero_point=args.zero_point,
                   layers_8bit=args.int8_layers, enable_mixed_quant=args.mixed_precision)
    t_ref = time.time() - t0
    out = os.path.join(tmp, "nibble.onnx")
    t0 = time.time()
    cmd = [args.nibble, "quantize", args.model, "-o", out, "--block-size", str(args.block_size), "--force", "--method", args.method]
    if args.calibration_data:
        cmd += ["--calibration-data", args.calibration_data]
    if args.zero_point:
        cmd += ["--zero-point"]
    if args.int8_layers:
        cmd += ["--int8-layers", args.int8_layers]
    if args.mixed_precision:
        cmd += ["--mixed-precision"]
    subprocess.run(cmd, check=True)
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
    worst_ulp, differing = 0, []
    elem_total, elem_same = 0, 0
    for name in sorted(set(a) & set(b)):
        if a[name] == b[name]:
            same += 1
        elif a[name][:2] == b[name][:2] and a[name][0] in (1, 10, 16):
            dt = {1: np.float32, 10: np.float16, 16: np.uint16}[a[name][0]]
            x = np.frombuffer(a[name][2], dtype=dt); y = np.frombuffer(b[name][2], dtype=dt)
            ix = x.view(np.int32 if dt == np.float32 else np.int16).astype(np.int64)
            iy = y.view(np.int32 if dt == np.float32 else np.int16).astype(np.int64)
            ulp = int(np.abs(ix - iy).max())
            worst_ulp = max(worst_ulp, ulp)
            differing.append(f"{name} ({int((ix != iy).sum())} of {len(ix)} values, max {ulp} ulp)")
        else:
            problems.append(f"{name}: dtype/dims/bytes differ ({a[name][:2]} vs {b[name][:2]})")
        if name.endswith("_i4") and a[name][:2] == b[name][:2]:
            x = np.frombuffer(a[name][2], dtype=np.uint8); y = np.frombuffer(b[name][2], dtype=np.uint8)
            lo = (x & 15) == (y & 15); hi = (x >> 4) == (y >> 4)
            elem_total += 2 * len(x); elem_same += int(lo.sum() + hi.sum())
    if elem_total:
        print(f"quantized codes equal: {elem_same} of {elem_total} ({100.0 * elem_same / elem_total:.2f}%)")
    ref_dq = {n.name: {x.name: onnx.helper.get_attribute_value(x) for x in n.attribute} for n in ref.graph.node if n.op_type == "DequantizeLinear"}
    got_dq = {n.name: {x.name: onnx.helper.get_attribute_value(x) for x in n.attribute} for n in got.graph.node if n.op_type == "DequantizeLinear"}
    for k in ref_dq:
        if ref_dq[k] != got_dq.get(k):
            problems.append(f"{k}: attributes {ref_dq[k]} vs {got_dq.get(k)}")
    print(f"{same} of {len(a)} initializers identical; {len(ref_dq)} DQ nodes; ModelOpt {t_ref:.2f} s, nibble {t_nib:.2f} s (x{t_ref / t_nib:.1f})")
    print(f"opsets: ModelOpt {[(o.domain, o.version) for o in ref.opset_import]}, nibble {[(o.domain, o.version) for o in got.opset_import]}")
    if differing:
        print(f"{len(differing)} float initializers differ by at most {worst_ulp} ulp (float32 power: numpy uses SVML on AVX-512): " + "; ".join(differing[:3]))
    for p in problems[:20]:
        print("DIFF", p)
    sys.exit(1 if problems else 0)


if __name__ == "__main__":
    main()
