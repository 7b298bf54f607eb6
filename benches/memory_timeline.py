#!/usr/bin/env python3
"""RssAnon against time, next to a run's stderr lines: which stage of a run holds the memory.

Runs CMD (the process itself is sampled, not its children), stamps every stderr line with the seconds since the start (``LOG``), samples
``/proc/PID/status`` every 50 ms and writes a ``MEM`` line (RssAnon, VmRSS, threads, MiB) whenever
RssAnon moved by 20 MiB or more since the last one, then ``END`` with the exit code and the peak
RssAnon. With ``nibble quantize -v`` each GPTQ/AWQ weight prints a line when it is finished, so each
rise is tied to a weight. ``--layers`` then prints, per decoder layer (the ``layers.N.`` in those
lines), the lowest and highest RssAnon sampled while that layer's weights were the latest finished:
a trend in the lowest is memory kept from layer to layer, in the highest a working set that grows.

    python3 benches/memory_timeline.py run.log nibble quantize m.onnx -o q.onnx --method gptq -v --segment-mb 100
    python3 benches/memory_timeline.py --layers run.log
"""
import re
import subprocess
import sys
import threading
import time


def run(log_path, cmd):
    log = open(log_path, "w")
    t0 = time.monotonic()
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    def read():
        for line in p.stderr:
            log.write(f"{time.monotonic() - t0:9.2f} LOG {line.rstrip()}\n")
            log.flush()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    peak, last = 0, None
    while p.poll() is None:
        try:
            with open(f"/proc/{p.pid}/status") as f:
                keys = ("RssAnon", "VmRSS", "Threads")
                d = {k: v.split()[0] for k, _, v in (line.partition(":") for line in f) if k in keys}
            anon = int(d["RssAnon"]) // 1024
        except (FileNotFoundError, ProcessLookupError, KeyError):
            break
        peak = max(peak, anon)
        if last is None or abs(anon - last) >= 20:
            log.write(f"{time.monotonic() - t0:9.2f} MEM anon {anon} rss {int(d['VmRSS']) // 1024} thr {d['Threads']}\n")
            log.flush()
            last = anon
        time.sleep(0.05)
    p.wait()
    reader.join(timeout=5)
    log.write(f"{time.monotonic() - t0:9.2f} END rc {p.returncode} peak_anon {peak}\n")
    print(f"exit {p.returncode}, peak RssAnon {peak} MiB, {time.monotonic() - t0:.1f} s")
    return p.returncode


def layers(log_path):
    cur, stats = None, {}
    for line in open(log_path):
        parts = line.split()
        if len(parts) < 2:
            continue
        if parts[1] == "LOG":
            m = re.search(r"layers\.(\d+)\.", line)
            if m:
                cur = int(m.group(1))
        elif parts[1] == "MEM" and cur is not None:
            a = int(parts[3])
            s = stats.setdefault(cur, [a, a])
            s[0], s[1] = min(s[0], a), max(s[1], a)
    print("| layer | lowest RssAnon | highest RssAnon |\n|---|---|---|")
    for k in sorted(stats):
        print(f"| {k} | {stats[k][0]} MiB | {stats[k][1]} MiB |")


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--layers":
        layers(sys.argv[2])
    elif len(sys.argv) >= 3 and not sys.argv[1].startswith("-"):
        sys.exit(run(sys.argv[1], sys.argv[2:]))
    else:
        sys.exit(__doc__)
