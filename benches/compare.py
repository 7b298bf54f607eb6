#!/usr/bin/env python3
"""Side-by-side benchmark: nibble, NVIDIA ModelOpt (numpy CPU path) and ONNX Runtime's
MatMulNBitsQuantizer on the same generated transformer-like model, one process at a time, in the same
run. Prints a table of median wall time, peak memory (max RSS of the process) and ratios, and writes it
to BENCHMARKS.md with the machine it ran on. Not part of the test suite.

    python3 benches/compare.py                       # ~1.1 GB fp32 model (270M parameters)
    python3 benches/compare.py --hidden 768 --layers 4 --runs 1 --methods rtn_dq,awq_lite

Set-up: builds nibble (release) and, on the first run, makes a venv (`--venv`, default .venv; e.g.
`--venv target/bench-venv` to keep it out of the checkout) with ModelOpt's ONNX path and ONNX Runtime:
    pip install nvidia-modelopt==0.47.0 onnxslim onnxscript lief onnx-graphsurgeon ml_dtypes cppimport \
        pybind11 onnx onnxruntime==1.32.0 numpy
(`import modelopt.onnx.quantization.int4` needs onnxslim, onnxscript, lief, onnx-graphsurgeon and
ml_dtypes besides onnx, and packing its 4-bit output compiles a C++ helper through cppimport and pybind11; the `[onnx]` extra pulls more than this script uses). `--output` names the
Markdown file the table is written to (default BENCHMARKS.md, which it overwrites: pass a scratch file
and copy the table).
"""
import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VENV = os.path.join(ROOT, ".venv")
PY = os.path.join(VENV, "bin", "python")
MODELOPT_PACKAGES = ["nvidia-modelopt==0.47.0", "onnxslim", "onnxscript", "lief", "onnx-graphsurgeon", "ml_dtypes", "cppimport", "pybind11"]
NIBBLE = os.path.join(ROOT, "target", "release", "nibble")

MODELOPT_SNIPPET = """
import sys, numpy as np, onnx
from modelopt.onnx.quantization.int4 import quantize
model, out, method, block, calib = sys.argv[1:6]
reader = None
if calib != "-":
    d = np.load(calib)
    n = min(d[k].shape[0] for k in d.files)
    reader = [{k: d[k][i] for k in d.files} for i in range(n)]
m = quantize(model, calibration_method=method, block_size=int(block), calibration_data_reader=reader,
             calibration_eps=["cpu"], log_level="WARNING")
onnx.save(m, out, save_as_external_data=True, location=out.split("/")[-1] + "_data")
"""

ORT_SNIPPET = """
import sys, onnx
from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer
model, out, block = sys.argv[1:4]
q = MatMulNBitsQuantizer(onnx.load(model), block_size=int(block), is_symmetric=True)
q.process()
q.model.save_model_to_file(out, use_external_data_format=True)
"""

FORWARD_SNIPPET = """
import sys, time, numpy as np, onnxruntime as ort
model, calib = sys.argv[1:3]
s = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
d = np.load(calib)
n = min(d[k].shape[0] for k in d.files)
feeds = [{k: d[k][i] for k in d.files} for i in range(n)]
t = time.perf_counter()
for f in feeds:
    s.run(None, f)
print(time.perf_counter() - t)
"""

WRAP = """
import resource, subprocess, sys, tempfile, time
err = tempfile.TemporaryFile(mode="w+")
t = time.perf_counter()
p = subprocess.Popen(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=err)
anon = 0
while p.poll() is None:  # peak anonymous memory (heap; not the file-backed mapping of the model)
    try:
        for line in open(f"/proc/{p.pid}/status"):
            if line.startswith("RssAnon:"):
                anon = max(anon, int(line.split()[1]) * 1024)
    except OSError:
        pass
    time.sleep(0.002)
dt = time.perf_counter() - t
rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
print(f"{dt} {rss} {p.returncode} {anon}")
if p.returncode:
    err.seek(0)
    sys.stderr.write(err.read()[-3000:])
"""


def sh(cmd, **kw):
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, **kw)


def setup(skip_modelopt):
    sh(["cargo", "build", "--release", "--quiet", "-p", "nibble-driver"], cwd=ROOT)
    sh([os.path.join(ROOT, "scripts", "setup-ort.sh")])
    if not os.path.exists(PY):
        sh([sys.executable, "-m", "venv", VENV])
    need = ["numpy", "onnx", "onnxruntime==1.32.0"] + ([] if skip_modelopt else MODELOPT_PACKAGES)
    probe = subprocess.run([PY, "-c", "import numpy, onnx, onnxruntime" + ("" if skip_modelopt else ", modelopt.onnx.quantization.int4")],
                           capture_output=True)
    if probe.returncode:
        sh([PY, "-m", "pip", "install", "--quiet"] + need)


def measure(cmd, out=None):
    """Wall time, peak RSS, peak anonymous memory of one process (a fresh output each time)."""
    if out:
        for f in (out, out + "_data"):
            if os.path.exists(f):
                os.remove(f)
    r = subprocess.run([sys.executable, "-c", WRAP] + cmd, capture_output=True, text=True)
    parts = r.stdout.split()
    if r.returncode or len(parts) != 4 or parts[2] != "0":
        sys.stderr.write(r.stderr[-3000:])
        return None
    return float(parts[0]), int(parts[1]), int(parts[3])


def median_run(cmd, runs, out=None):
    results = [measure(cmd, out) for _ in range(runs)]
    if any(r is None for r in results):
        return None
    return statistics.median(r[0] for r in results), max(r[1] for r in results), max(r[2] for r in results)


def output_size(out):
    return sum(os.path.getsize(f) for f in (out, out + "_data") if os.path.exists(f))


def page_cache_read(path, runs):
    files = [path] + ([path + "_data"] if os.path.exists(path + "_data") else [])
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        for f in files:
            with open(f, "rb") as fh:
                while fh.read(1 << 24):
                    pass
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main():
    global VENV, PY
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=1536)
    ap.add_argument("--intermediate", type=int, default=4096)
    ap.add_argument("--layers", type=int, default=10)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--dtype", default="f32", choices=["f32", "f16"])
    ap.add_argument("--block-size", type=int, default=128)
    ap.add_argument("--runs", type=int, default=3, help="runs per tool (median); AWQ runs once")
    ap.add_argument("--methods", default="rtn_dq,awq_lite,awq_clip,awq_full")
    ap.add_argument("--samples", type=int, default=8, help="calibration samples of --seq tokens")
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--skip-modelopt", action="store_true")
    ap.add_argument("--output", default=os.path.join(ROOT, "BENCHMARKS.md"))
    ap.add_argument("--venv", default=VENV, help="the Python environment with ModelOpt and onnxruntime")
    args = ap.parse_args()
    VENV = os.path.abspath(args.venv)
    PY = os.path.join(VENV, "bin", "python")
    setup(args.skip_modelopt)
    work = tempfile.mkdtemp(prefix="nibble-bench-")
    try:
        model = os.path.join(work, "model.onnx")
        sh([NIBBLE, "example", model, "--hidden", str(args.hidden), "--intermediate", str(args.intermediate),
            "--layers", str(args.layers), "--vocab", str(args.vocab), "--dtype", args.dtype, "--external-data", "always"])
        calib = os.path.join(work, "calib.npz")
        sh([PY, "-c", f"import numpy as np; np.savez('{calib}', input=np.random.default_rng(0).standard_normal("
                      f"({args.samples}, 1, {args.seq}, {args.hidden})).astype(np.float32))"])
        size = os.path.getsize(model) + os.path.getsize(model + "_data")
        cat = page_cache_read(model, 3)
        rows = []
        methods = [m for m in args.methods.split(",") if m]
        forward = None
        if any(m.startswith("awq") for m in methods):
            # ONNX Runtime's forward passes over the calibration samples alone (session made first).
            r = subprocess.run([PY, "-c", FORWARD_SNIPPET, model, calib], capture_output=True, text=True)
            forward = float(r.stdout.split()[-1]) if r.returncode == 0 and r.stdout.split() else None
        for method in methods:
            awq = method.startswith("awq")
            runs = 1 if awq else args.runs
            out = os.path.join(work, f"nibble_{method}.onnx")
            cmd = [NIBBLE, "quantize", model, "-o", out, "--method", method, "--block-size", str(args.block_size),
                   "--force", "--external-data", "always"]
            if awq:
                cmd += ["--calibration-data", calib]
            nib = median_run(cmd, runs, out)
            out_size = output_size(out)
            mo = None
            if not args.skip_modelopt:
                out_mo = os.path.join(work, f"modelopt_{method}.onnx")
                mo = median_run([PY, "-c", MODELOPT_SNIPPET, model, out_mo, method, str(args.block_size), calib if awq else "-"], runs, out_mo)
            ort = None
            if method == "rtn_dq":
                out_ort = os.path.join(work, "ort.onnx")
                ort = median_run([PY, "-c", ORT_SNIPPET, model, out_ort, str(args.block_size)], args.runs, out_ort)
            rows.append((method, nib, mo, ort, out_size))
            print(json.dumps({"method": method, "nibble": nib, "modelopt": mo, "ort": ort}), flush=True)
        cpu = "unknown"
        try:
            cpu = [l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")][0]
        except Exception:
            pass
        fmt_t = lambda r: "-" if r is None else f"{r[0]:.2f} s"
        fmt_m = lambda r: "-" if r is None else f"{r[1] / 1e6:.0f} MB"
        ratio = lambda a, b: "-" if a is None or b is None else f"{b[0] / a[0]:.1f}x"
        lines = [
            "# Benchmarks",
            "",
            f"Produced by `python3 benches/compare.py {' '.join(sys.argv[1:])}` on {time.strftime('%Y-%m-%d')}.",
            f"Machine: {cpu}, {os.cpu_count()} cores, {platform.system()} {platform.release()}.",
            f"Model: generated transformer-like, hidden {args.hidden}, MLP {args.intermediate}, {args.layers} layers, "
            f"vocab {args.vocab}, {args.dtype} weights, {size / 1e9:.2f} GB; block size {args.block_size}; AWQ calibration "
            f"{args.samples} samples x {args.seq} tokens. Reading the model from the page cache: {cat:.2f} s.",
            "ONNX Runtime's forward passes over the calibration samples alone: "
            + ("-" if forward is None else f"{forward:.2f} s") + " (the floor under any AWQ calibration).",
            "Times are medians of the runs (AWQ: one run), each writing a fresh output; peak is the peak resident",
            "set of the process (for nibble it counts the mapped model pages it read); anon is nibble's peak",
            "anonymous memory (heap), beside the size of the output it wrote.",
            "",
            "| method | nibble | ModelOpt | ORT MatMulNBitsQuantizer | nibble vs ModelOpt | nibble vs ORT | nibble vs page-cache read (RTN) or forward passes (AWQ) | nibble peak / anon / output | ModelOpt peak | ORT peak |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for method, nib, mo, ort, out_size in rows:
            base = forward if method.startswith("awq") else cat
            vs_cat = "-" if nib is None or base is None else f"{nib[0] / base:.1f}x"
            mem = "-" if nib is None else f"{nib[1] / 1e6:.0f} / {nib[2] / 1e6:.0f} / {out_size / 1e6:.0f} MB"
            lines.append(f"| {method} | {fmt_t(nib)} | {fmt_t(mo)} | {fmt_t(ort)} | {ratio(nib, mo)} | {ratio(nib, ort)} | "
                         f"{vs_cat} | {mem} | {fmt_m(mo)} | {fmt_m(ort)} |")
        text = "\n".join(lines) + "\n"
        print(text)
        with open(args.output, "w") as f:
            f.write(text)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
