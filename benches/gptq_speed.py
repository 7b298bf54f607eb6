#!/usr/bin/env python3
"""GPTQ speed, nibble against ONNX Runtime's GPTQ, measured in one run on the same model and data.

For each model: ``nibble quantize --method gptq`` (``--repeat`` times, the median counts), then ONNX Runtime
1.32's ``GPTQWeightOnlyQuantConfig`` (once: it is slow) with the same block size, calibration samples
(``calib.npz``), percdamp 0.01, symmetric, no act order and the same excluded node, each as its own process
(the command lines are those of ``benches/quality_sweep.py``). Prints and stores, per quantizer, the wall time,
the CPU time (user + system of the process) and the mean 1-minute load average of the machine while it ran
(the machine has 2 cores; a load above about 1 during nibble's run, or above 2 during ONNX Runtime's, means
another job shared it), and the ratio ONNX Runtime / nibble for wall and CPU time.

Results: ``benches/results/gptq_speed.json`` (merged by model) and ``benches/results/gptq_speed.md``.

    cargo build --release
    .venv/bin/python benches/gptq_speed.py --models minilm-l3,gemma3-270m      # set-up: see quality_sweep.py
    .venv/bin/python benches/gptq_speed.py --table
"""
import argparse
import datetime
import json
import os
import resource
import statistics
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "models"))
sys.path.insert(0, HERE)
import common  # noqa: E402
import quality_sweep as qs  # noqa: E402

OUT = os.path.join(qs.RESULTS, "gptq_speed.json")


class LoadSampler:
    """Samples /proc/loadavg's 1-minute value every `period` seconds while running."""

    def __init__(self, period=5.0):
        self.period, self.samples, self._stop = period, [], threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while True:
            with open("/proc/loadavg") as f:
                self.samples.append(float(f.read().split()[0]))
            if self._stop.wait(self.period):
                return

    def __enter__(self):
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()


def timed(method, block, src, dst, calib, exclude):
    """One quantizer process: wall seconds, CPU seconds (user + sys), mean load, command."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    with LoadSampler() as load:
        wall, cmd, _ = qs.quantize(method, block, src, dst, calib, exclude)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    for p in os.listdir(os.path.dirname(dst)):
        if p.startswith(os.path.basename(dst)):
            os.remove(os.path.join(os.path.dirname(dst), p))
    return {"wall_s": round(wall, 2), "cpu_s": round(cpu, 2), "mean_load": round(statistics.mean(load.samples), 2),
            "command": cmd}


def run_model(model, block, repeat):
    d = common.model_dir(model)
    src, calib = os.path.join(d, "model.onnx"), os.path.join(d, "calib.npz")
    qdir = os.path.join(d, "q")
    os.makedirs(qdir, exist_ok=True)
    exclude = ["/lm_head/MatMul"] if model.startswith("gemma") else []
    import numpy as np

    c = np.load(calib)
    ids = c[c.files[0]]
    rec = {"block": block, "calibration": f"{ids.shape[0]} x {ids.shape[1]} tokens",
           "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
           "machine": qs.machine(), "nibble_runs": []}
    for i in range(repeat):
        r = timed("gptq", block, src, os.path.join(qdir, "speed_nibble.onnx"), calib, exclude)
        print(f"{model}: nibble gptq run {i + 1}: {r['wall_s']} s wall, {r['cpu_s']} s CPU, load {r['mean_load']}",
              flush=True)
        rec["nibble_runs"].append(r)
    rec["nibble"] = sorted(rec["nibble_runs"], key=lambda r: r["wall_s"])[len(rec["nibble_runs"]) // 2]
    print(f"{model}: ONNX Runtime GPTQ (slow) ...", flush=True)
    rec["ort"] = timed("ort_gptq", block, src, os.path.join(qdir, "speed_ort.onnx"), calib, exclude)
    o, n = rec["ort"], rec["nibble"]
    rec["ratio_wall"] = round(o["wall_s"] / n["wall_s"], 1)
    rec["ratio_cpu"] = round(o["cpu_s"] / n["cpu_s"], 1)
    print(f"{model}: ONNX Runtime GPTQ {o['wall_s']} s wall ({o['cpu_s']} s CPU, load {o['mean_load']}); "
          f"nibble {n['wall_s']} s ({n['cpu_s']} s CPU): {rec['ratio_wall']}x wall, {rec['ratio_cpu']}x CPU",
          flush=True)
    data = json.load(open(OUT)) if os.path.exists(OUT) else {}
    data[model] = rec
    with open(OUT + ".tmp", "w") as f:
        json.dump(data, f, indent=1, sort_keys=True)
    os.replace(OUT + ".tmp", OUT)


def table():
    data = json.load(open(OUT))
    lines = ["| model | block | calibration | nibble gptq: wall / CPU (load) | ONNX Runtime GPTQ: wall / CPU (load) "
             "| ratio wall / CPU |", "|---|---|---|---|---|---|"]
    for model, r in sorted(data.items()):
        n, o = r["nibble"], r["ort"]
        lines.append(f"| {model} | {r['block']} | {r['calibration']} | {n['wall_s']:.1f} s / {n['cpu_s']:.1f} s "
                     f"({n['mean_load']:.1f}) | {o['wall_s']:.0f} s / {o['cpu_s']:.0f} s ({o['mean_load']:.1f}) | "
                     f"{r['ratio_wall']:.0f}x / {r['ratio_cpu']:.0f}x |")
    m = next(iter(data.values()))["machine"]
    lines += ["", f"Measured in one run per model ({', '.join(sorted({r['date'] for r in data.values()}))}), "
              f"{m['cpu']}, {m['cores']} cores, ONNX Runtime {m['onnxruntime']}. nibble: median of "
              f"{len(next(iter(data.values()))['nibble_runs'])} runs. Wall and CPU time of the whole "
              "quantizer process (load, calibrate, quantize, save)."]
    text = "\n".join(lines) + "\n"
    with open(os.path.join(qs.RESULTS, "gptq_speed.md"), "w") as f:
        f.write(text)
    return text


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="minilm-l3,gemma3-270m")
    ap.add_argument("--block", type=int, default=128)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--table", action="store_true", help="only rewrite the markdown table from the JSON")
    args = ap.parse_args()
    if not args.table:
        if not qs.nibble_help():
            raise SystemExit(f"{qs.NIBBLE} not found: run `cargo build --release` first")
        for model in args.models.split(","):
            run_model(model, args.block, args.repeat)
    print(table())


if __name__ == "__main__":
    main()
