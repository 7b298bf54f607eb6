#!/usr/bin/env python3
"""Peak memory against model depth (issue 19, item 4): two decoders of the same width and different
depth, quantized by each method, the peak memory of the quantizing process sampled from /proc.

For each depth (default 4 and 24 layers; hidden 2048, MLP 5632, vocab 32000, fp16 weights in an
external data file, as issue 19 measured landed main) ``nibble example`` writes the model once, then
``nibble quantize --method M`` runs for each method as its own process while a sampler reads
``/proc/PID/status`` every 10 ms: peak ``RssAnon`` (anonymous memory: the heap; the model's mapped
pages are left out, they are file-backed and the kernel can drop them) and peak ``VmRSS`` (resident
set, counting the mapped model pages read), with the wall time and the output's size. Calibrated
methods use nibble's random calibration (``--calibration-samples``, default 8).

Prints a Markdown table (and the machine's 1-minute load average before and after, since the
machine is shared). Everything is written under ``--work`` (default a folder in /tmp), removed at
the end unless ``--keep``: about 2.5 GB for the default models.

    cargo build --release
    python3 benches/memory.py                                  # rtn_dq on 4 and 24 layers
    python3 benches/memory.py --methods rtn_dq,awq_clip,gptq --layers 4,24
"""
import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def status_kb(pid, keys):
    """The values (kB) of `keys` in /proc/PID/status, or None once the process is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            found = {}
            for line in f:
                k, _, v = line.partition(":")
                if k in keys:
                    found[k] = int(v.split()[0])
            return found
    except (FileNotFoundError, ProcessLookupError):
        return None


def measure(cmd, period=0.01):
    """Runs `cmd`; returns (wall seconds, peak RssAnon MB, peak VmRSS MB, stderr)."""
    start = time.monotonic()
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    peak = {"RssAnon": 0, "VmRSS": 0}
    err = []
    t = threading.Thread(target=lambda: err.append(p.stderr.read()), daemon=True)
    t.start()
    while p.poll() is None:
        s = status_kb(p.pid, peak.keys())
        if s:
            for k, v in s.items():
                peak[k] = max(peak[k], v)
        time.sleep(period)
    wall = time.monotonic() - start
    t.join()
    if p.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed ({p.returncode}):\n{''.join(err)}")
    return wall, peak["RssAnon"] / 1024, peak["VmRSS"] / 1024, "".join(err)


def size_mb(path):
    files = [path] + [os.path.join(os.path.dirname(path), f) for f in os.listdir(os.path.dirname(path))
                      if f.startswith(os.path.basename(path) + "_data")]
    return sum(os.path.getsize(f) for f in files if os.path.exists(f)) / 1e6


def loadavg():
    with open("/proc/loadavg") as f:
        return float(f.read().split()[0])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nibble", default=os.path.join(ROOT, "target", "release", "nibble"))
    ap.add_argument("--layers", default="4,24", help="decoder depths, comma-separated")
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--intermediate", type=int, default=5632)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--dtype", default="f16")
    ap.add_argument("--methods", default="rtn_dq", help="comma-separated quantize methods")
    ap.add_argument("--calibration-samples", type=int, default=8)
    ap.add_argument("--extra", default="", help="more quantize options, space-separated")
    ap.add_argument("--work", default=None, help="folder for models and outputs (default: a temporary one)")
    ap.add_argument("--keep", action="store_true", help="keep the models and outputs")
    ap.add_argument("--stderr-tail", type=int, default=0,
                    help="print the last N lines of each run's stderr (e.g. the GPTQ time summary of -v)")
    a = ap.parse_args()
    if not os.path.exists(a.nibble):
        sys.exit(f"{a.nibble} not found: run `cargo build --release` or pass --nibble")
    work = a.work or tempfile.mkdtemp(prefix="nibble-memory-")
    os.makedirs(work, exist_ok=True)
    rows = []
    load_before = loadavg()
    try:
        for layers in [int(x) for x in a.layers.split(",")]:
            src = os.path.join(work, f"decoder{layers}.onnx")
            if not os.path.exists(src):
                subprocess.run([a.nibble, "example", src, "--hidden", str(a.hidden), "--intermediate",
                                str(a.intermediate), "--layers", str(layers), "--vocab", str(a.vocab), "--dtype",
                                a.dtype, "--external-data", "always", "--force"], check=True,
                               stdout=subprocess.DEVNULL)
            model_mb = size_mb(src)
            for method in a.methods.split(","):
                out = os.path.join(work, f"decoder{layers}_{method}.onnx")
                cmd = [a.nibble, "quantize", src, "-o", out, "--method", method, "--force"]
                if method not in ("rtn_dq", "rtn"):
                    cmd += ["--calibration-samples", str(a.calibration_samples)]
                cmd += a.extra.split()
                wall, anon, rss, err = measure(cmd)
                if a.stderr_tail > 0:
                    tail = [line for line in err.splitlines() if line.strip()][-a.stderr_tail:]
                    print("\n".join(tail), file=sys.stderr)
                rows.append((layers, model_mb, method, anon, rss, wall, size_mb(out)))
                print(f"{layers} layers ({model_mb:.0f} MB) {method}: peak RssAnon {anon:.0f} MB, "
                      f"peak RSS {rss:.0f} MB, {wall:.1f} s, output {size_mb(out):.0f} MB", file=sys.stderr)
                for f in os.listdir(work):
                    if f.startswith(os.path.basename(out)):
                        os.remove(os.path.join(work, f))
    finally:
        if not a.keep and not a.work:
            shutil.rmtree(work, ignore_errors=True)
    print(f"Model: `nibble example`, hidden {a.hidden}, MLP {a.intermediate}, vocab {a.vocab}, {a.dtype} weights "
          f"in external data; block 128; calibrated methods: {a.calibration_samples} random samples. "
          f"Load average (1 min) before {load_before:.1f}, after {loadavg():.1f} on {os.cpu_count()} cores.")
    print()
    print("| layers | model | method | peak RssAnon | peak RSS | wall | output |")
    print("|---|---|---|---|---|---|---|")
    for layers, model_mb, method, anon, rss, wall, out_mb in rows:
        print(f"| {layers} | {model_mb:.0f} MB | {method} | {anon:.0f} MB | {rss:.0f} MB | {wall:.1f} s | {out_mb:.0f} MB |")
    by_method = {}
    for layers, _, method, anon, *_ in rows:
        by_method.setdefault(method, []).append((layers, anon))
    for method, v in by_method.items():
        if len(v) >= 2:
            (l0, a0), (l1, a1) = min(v), max(v)
            print(f"\n{method}: peak RssAnon {l1} layers / {l0} layers = {a1 / max(a0, 1e-9):.2f}x")


if __name__ == "__main__":
    main()
