#!/usr/bin/env python3
"""Interleaved end-to-end A/B of `nibble quantize --method rtn_dq` binaries against a read of the model.

    python3 benches/rtn_ab.py MODEL.onnx ROUNDS BIN [BIN...]

Each round runs every binary once on MODEL (`--block-size 128 --external-data always`, the output
removed after each run, so no run renames over an earlier output), then times `cat MODEL
MODEL_data > /dev/null` (the read the ratios are taken against; the model stays in the page cache). Prints per binary the median wall time (`perf_counter`), user and system CPU time
(`os.wait4`), every round's values, and the median wall / median read ratio: all measured in one
run, as BENCHMARKS.md asks. Run it alone on the machine (or under an exclusive lock).
"""
import os
import statistics as st
import subprocess
import sys
import tempfile
import time


def main():
    model, rounds, bins = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
    out = tempfile.mkdtemp(prefix="rtn_ab_")

    files = [f for f in (model, model + "_data") if os.path.exists(f)]

    def read_model():
        t = time.perf_counter()
        subprocess.run(["cat", *files], stdout=subprocess.DEVNULL, check=True)
        return time.perf_counter() - t

    read_model()
    res = {b: [] for b in bins}
    reads = []
    for _ in range(rounds):
        for b in bins:
            t = time.perf_counter()
            p = subprocess.Popen(
                [b, "quantize", model, "-o", os.path.join(out, "q.onnx"), "--method", "rtn_dq",
                 "--block-size", "128", "--force", "--external-data", "always"],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            _, status, ru = os.wait4(p.pid, 0)
            wall = time.perf_counter() - t
            if status != 0:
                sys.exit(f"{b} failed on {model} (status {status})")
            res[b].append((wall, ru.ru_utime, ru.ru_stime))
            for f in ("q.onnx", "q.onnx_data"):
                os.remove(os.path.join(out, f))
        reads.append(read_model())
    os.rmdir(out)
    for b in bins:
        v = res[b]
        print(b, "median wall %.4f user %.4f sys %.4f" % tuple(st.median(x[i] for x in v) for i in range(3)))
        for i, n in enumerate(("wall", "user", "sys")):
            print("  %-4s" % n, " ".join("%.3f" % x[i] for x in v))
    print("cat median %.4f" % st.median(reads), " ".join("%.3f" % c for c in reads))
    for b in bins:
        print(b, "wall/cat %.2f" % (st.median(x[0] for x in res[b]) / st.median(reads)))


if __name__ == "__main__":
    main()
