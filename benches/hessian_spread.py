#!/usr/bin/env python3
"""How uneven GPTQ's Hessian diagonal is, per weight, on an onnxruntime-genai folder: the measurement
behind "why act order matters on some models" (issue 22; BENCHMARKS.md, "onnxruntime-genai folders").

    PY=target/bench-models/genai/venv/bin/python
    $PY benches/genai_sweep.py --model gemma3-270m --table         # writes nothing new; the npz
    $PY benches/hessian_spread.py --model gemma3-270m               # uses data/calib.npz of the sweep

GPTQ (Frantar et al. 2022, arXiv:2210.17323) quantizes a weight's input channels (rows of W, K x N)
one after another and spreads each one's rounding error over the channels not yet quantized, weighted
by the inverse of the Hessian H = X^T X (X: the MatMul's input activations, rows = tokens). With
``--act-order`` the channels go in order of decreasing diag(H) (the channels that carry the most
activation energy first, while many channels are left to absorb their error). The more the diagonal
is concentrated in a few channels (outlier channels), the more the order matters.

For every MatMul whose second input is an initializer, this captures its first input on the sweep's
calibration rows (``target/bench-models/genai/<model>/data/calib.npz``, the first ``--rows`` rows, one
row per session run) in a default ONNX Runtime session, accumulates d_j = sum over tokens of x_j^2 and
reports, per weight:
  spread    max(d) / median(d)
  top1pct   share of trace(H) in the 1% largest channels (at least one channel)
and per weight kind (q/k/v or qkv, o_proj, gate/up, down_proj, lm_head) the median over layers, into
``benches/results/hessian-<model>.json`` and a markdown table on stdout.
"""
import argparse
import json
import os
import re
import statistics
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, "models"))
import common  # noqa: E402
import genai_sweep  # noqa: E402

KINDS = [("qkv", r"(qkv|q_proj|k_proj|v_proj)"), ("o_proj", r"o_proj"), ("gate/up", r"(gate_proj|up_proj)"),
         ("down_proj", r"down_proj"), ("lm_head", r"lm_head")]


def kind(name):
    return next((k for k, rx in KINDS if re.search(rx, name)), "other")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--rows", type=int, default=8, help="calibration rows (of data/calib.npz) to accumulate")
    args = ap.parse_args()
    import onnx
    import onnxruntime as ort

    root = os.path.join(common.WORK, "genai", args.model)
    fp32 = os.path.join(root, "fp32")
    path = genai_sweep.model_file(fp32)
    m = onnx.load(path, load_external_data=False)
    inits = {t.name for t in m.graph.initializer}
    targets = {}
    for n in m.graph.node:
        if n.op_type == "MatMul" and len(n.input) == 2 and n.input[1] in inits:
            targets[n.input[0]] = targets.get(n.input[0], []) + [n.name]
    have = {o.name for o in m.graph.output}
    for x in targets:
        if x not in have:
            m.graph.output.append(onnx.ValueInfoProto(name=x))
    # written beside the model so that its external data (a relative location) resolves; removed after
    tmp = os.path.join(fp32, "hessian_spread_tmp.onnx")
    onnx.save(m, tmp)
    try:
        s = ort.InferenceSession(tmp, providers=["CPUExecutionProvider"])
        calib = np.load(os.path.join(root, "data", "calib.npz"))
        feeds_all = {k: calib[k] for k in calib.files}
        names = list(targets)
        diag = {}
        rows = min(args.rows, len(feeds_all["input_ids"]))
        for r in range(rows):
            outs = s.run(names, {k: v[r:r + 1] for k, v in feeds_all.items()})
            for x, a in zip(names, outs):
                a = a.reshape(-1, a.shape[-1]).astype(np.float64)
                diag[x] = diag.get(x, 0.0) + (a * a).sum(0)
        del s
    finally:
        os.remove(tmp)
    per = []
    for x, nodes in targets.items():
        d = diag[x]
        top = max(1, len(d) // 100)
        per.append({"nodes": nodes, "kind": kind(nodes[0]), "k": int(len(d)),
                    "spread": float(d.max() / max(np.median(d), 1e-30)),
                    "top1pct": float(np.sort(d)[-top:].sum() / d.sum())})
    summary = {}
    for k, _ in KINDS + [("other", "")]:
        rows_k = [p for p in per if p["kind"] == k]
        if rows_k:
            summary[k] = {"weights_inputs": len(rows_k),
                          "spread_median": statistics.median(p["spread"] for p in rows_k),
                          "spread_max": max(p["spread"] for p in rows_k),
                          "top1pct_median": statistics.median(p["top1pct"] for p in rows_k)}
    allp = {"spread_median": statistics.median(p["spread"] for p in per),
            "top1pct_median": statistics.median(p["top1pct"] for p in per)}
    out = {"model": args.model, "rows": rows, "tokens_per_row": int(feeds_all["input_ids"].shape[1]),
           "all": allp, "by_kind": summary, "per_input": per}
    with open(os.path.join(HERE, "results", f"hessian-{args.model}.json"), "w") as f:
        json.dump(out, f, indent=1)
    print(f"{args.model}: {rows} x {out['tokens_per_row']} calibration tokens; all inputs: spread median "
          f"{allp['spread_median']:.1f}, top-1% share median {allp['top1pct_median']:.3f}")
    print("| kind | inputs | max/median diag(H), median (max) | top-1% channels' share of tr(H), median |")
    print("|---|---|---|---|")
    for k, v in summary.items():
        print(f"| {k} | {v['weights_inputs']} | {v['spread_median']:.1f} ({v['spread_max']:.1f}) "
              f"| {v['top1pct_median']:.3f} |")


if __name__ == "__main__":
    main()
