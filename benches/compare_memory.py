#!/usr/bin/env python3
"""Peak memory of ``nibble compare`` whole and by segments (issue 19, item 2).

``nibble example`` writes a decoder (default 24 layers, hidden 2048, MLP 5632, vocab 32000, fp16 weights
in an external data file: about 2 GB), ``nibble quantize --method rtn_dq --external-data always``
quantizes it, then ``nibble compare ORIGINAL QUANTIZED`` runs with each ``--segment-mb`` given (0: both
models whole, as before issue 19; N: segments of at least N MiB of weights) as its own process while
``benches/memory.py``'s sampler reads ``/proc/PID/status`` every 10 ms: peak ``RssAnon`` (anonymous
memory: ONNX Runtime's copies of the weights, activations, carried tensors; the mapped model pages are
left out) and peak ``VmRSS``, with the wall time. (``nibble example``'s model takes a float input,
not token ids, so the compare is of the outputs, not of a perplexity.)

Everything is written under ``--work`` (default a folder in /tmp, removed at the end unless ``--keep``):
about 2.7 GB for the default model.

    cargo build --release
    python3 benches/compare_memory.py                         # --segment-mb 0,100
    python3 benches/compare_memory.py --layers 4 --segment-mb 0,100 --extra=--per-layer
"""
import argparse
import os
import shutil
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
from memory import loadavg, measure, size_mb  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nibble", default=os.path.join(ROOT, "target", "release", "nibble"))
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--intermediate", type=int, default=5632)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--dtype", default="f16")
    ap.add_argument("--segment-mb", default="0,100", help="comma-separated --segment-mb values (0: whole)")
    ap.add_argument("--extra", default="", help="more compare options, space-separated")
    ap.add_argument("--work", default=None, help="folder for the models (default: a temporary one)")
    ap.add_argument("--keep", action="store_true", help="keep the models")
    a = ap.parse_args()
    if not os.path.exists(a.nibble):
        sys.exit(f"{a.nibble} not found: run `cargo build --release` or pass --nibble")
    work = a.work or tempfile.mkdtemp(prefix="nibble-compare-memory-")
    os.makedirs(work, exist_ok=True)
    rows = []
    load_before = loadavg()
    try:
        src = os.path.join(work, f"decoder{a.layers}.onnx")
        q = os.path.join(work, f"decoder{a.layers}_rtn_dq.onnx")
        if not os.path.exists(src):
            subprocess.run([a.nibble, "example", src, "--hidden", str(a.hidden), "--intermediate",
                            str(a.intermediate), "--layers", str(a.layers), "--vocab", str(a.vocab), "--dtype",
                            a.dtype, "--external-data", "always", "--force"], check=True, stdout=subprocess.DEVNULL)
        if not os.path.exists(q):
            subprocess.run([a.nibble, "quantize", src, "-o", q, "--method", "rtn_dq", "--external-data", "always",
                            "--force"], check=True, stdout=subprocess.DEVNULL)
        extra = a.extra.split()
        for mb in a.segment_mb.split(","):
            cmd = [a.nibble, "compare", src, q, "--segment-mb", mb] + extra
            wall, anon, rss, err = measure(cmd)
            notes = [line for line in err.splitlines() if "note" in line]
            rows.append((mb, anon, rss, wall))
            print(f"--segment-mb {mb}: peak RssAnon {anon:.0f} MB, peak RSS {rss:.0f} MB, {wall:.1f} s; "
                  + " ".join(notes), file=sys.stderr)
        model_mb, q_mb = size_mb(src), size_mb(q)
    finally:
        if not a.keep and not a.work:
            shutil.rmtree(work, ignore_errors=True)
    print(f"Model: `nibble example`, {a.layers} layers, hidden {a.hidden}, MLP {a.intermediate}, vocab {a.vocab}, "
          f"{a.dtype} weights in external data ({model_mb:.0f} MB); quantized rtn_dq, external data ({q_mb:.0f} MB); "
          f"compare options: {' '.join(extra) or '(defaults: one random sample of 16 tokens)'}. "
          f"Load average (1 min) before {load_before:.1f}, after {loadavg():.1f} on {os.cpu_count()} cores.")
    print()
    print("| compare | peak RssAnon | peak RSS | wall |")
    print("|---|---|---|---|")
    for mb, anon, rss, wall in rows:
        how = "whole (`--segment-mb 0`)" if mb == "0" else f"segments (`--segment-mb {mb}`)"
        print(f"| {how} | {anon:.0f} MB | {rss:.0f} MB | {wall:.1f} s |")


if __name__ == "__main__":
    main()
