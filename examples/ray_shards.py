"""Quantize one model as independent shard jobs on a Ray cluster, merge, and check the result.

Each shard is a Ray task calling nibble's Python package (``nibble.quantize_file(...,
segment_mb=N, segments=(a, b))``): it calibrates the segments before ``a`` forward only and
searches/quantizes the weights of segments ``a..b``. ``nibble.merge`` assembles the shards; the
script then runs the single job ``nibble.quantize_file(..., segment_mb=N)`` and checks that the two
models are the same bytes. Ray is the scheduler (``ray.init()`` starts a local cluster; pass
``--address`` to use a running one whose workers see the same files); nibble has none of its own.

Setup (PyPI only; Ray is not a dependency of nibble or of its tests):

    python3 -m venv target/ray-venv
    target/ray-venv/bin/pip install ray target/wheels/nibble-*.whl onnxruntime

Run:

    target/ray-venv/bin/python examples/ray_shards.py --method gptq --segment-mb 3 --shards 3

Without ``--model`` it writes ``nibble example``'s transformer (4 layers of width 256) to the work
folder first.
"""

import argparse
import os
import sys
import tempfile
import time

import ray

import nibble


@ray.remote(num_cpus=1)
def quantize_shard(model, shard, method, segment_mb, first, last):
    """One job: the shard of segments first..last (0-based, inclusive)."""
    import nibble as nb  # imported in the worker process

    start = time.time()
    result = nb.quantize_file(
        model, shard, method=method, segment_mb=segment_mb, segments=(first, last), force=True
    )
    return {"range": result["range"], "weights": result["weights"], "seconds": time.time() - start, "pid": os.getpid()}


def ranges(count, shards):
    """`shards` consecutive ranges covering segments 0..count-1, as even as possible."""
    shards = max(1, min(shards, count))
    cuts = [round(i * count / shards) for i in range(shards + 1)]
    return [(cuts[i], cuts[i + 1] - 1) for i in range(shards)]


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="the .onnx model (default: generate nibble example's transformer)")
    p.add_argument("--method", default="gptq")
    p.add_argument("--segment-mb", type=int, default=3)
    p.add_argument("--shards", type=int, default=3)
    p.add_argument("--workdir", help="where the shards and models go (default: a new temporary folder)")
    p.add_argument("--address", help="a running Ray cluster (default: start a local one)")
    args = p.parse_args()
    work = args.workdir or tempfile.mkdtemp(prefix="nibble-ray-")
    os.makedirs(work, exist_ok=True)
    model = args.model
    if model is None:
        model = os.path.join(work, "model.onnx")
        if not os.path.exists(model):
            if nibble.main(["example", model, "--layers", "4"]) != 0:
                return 1
    model = os.path.abspath(model)

    layout = nibble.segments(model, args.segment_mb)
    print(f"model {model}: {layout['count']} segments at --segment-mb {args.segment_mb}")
    print(layout["table"], end="")

    if args.address:
        ray.init(address=args.address)
    else:
        ray.init()
    print(f"ray {ray.__version__}: {ray.cluster_resources().get('CPU', 0):.0f} CPUs")
    t0 = time.time()
    jobs = [
        quantize_shard.remote(model, os.path.join(work, f"shard_{a}_{b}"), args.method, args.segment_mb, a, b)
        for a, b in ranges(layout["count"], args.shards)
    ]
    done = ray.get(jobs)
    t_shards = time.time() - t0
    for d in done:
        print(f"shard {d['range'][0]}..{d['range'][1]}: {d['weights']} weights, {d['seconds']:.2f} s (worker pid {d['pid']})")
    ray.shutdown()

    t1 = time.time()
    merged = os.path.join(work, "merged.onnx")
    shards = [os.path.join(work, f"shard_{a}_{b}") for a, b in ranges(layout["count"], args.shards)]
    s = nibble.merge(shards, merged, force=True)
    t_merge = time.time() - t1
    print(f"merge: {s['quantized']} weights quantized, {s['model_bytes_after']} bytes, {t_merge:.2f} s")

    t2 = time.time()
    single = os.path.join(work, "single.onnx")
    nibble.quantize_file(model, single, method=args.method, segment_mb=args.segment_mb, force=True)
    t_single = time.time() - t2
    files = [(merged, single)] + [
        (a, b) for a, b in [(merged + "_data", single + "_data")] if os.path.exists(a) or os.path.exists(b)
    ]
    same = all(open(a, "rb").read() == open(b, "rb").read() for a, b in files)
    print(
        f"shards {t_shards:.2f} s (Ray, wall) + merge {t_merge:.2f} s; single run {t_single:.2f} s; "
        f"merged == single run byte for byte: {same}"
    )
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
