#!/usr/bin/env python3
"""One run timing ``quant_tensor`` + ``dq_tensor`` (block-wise INT4, symmetric and with a zero point)
on a 4096 x 4096 float32 and float16 weight: nibble.int4 against ModelOpt's numpy functions
(``modelopt.onnx.quantization.int4``, CPU path) when ModelOpt is installed, else nibble alone.

Each timing is the best of ``--repeat`` runs (ModelOpt: of ``--repeat // 2``); both libraries run in
this process on the same arrays, and their outputs are checked to be bit-identical before anything
is timed (with a zero point only on weights whose blocks all straddle zero, where nibble's range
equals ModelOpt's). Besides the pair, each function is timed alone (``quant`` and ``dq`` columns:
``quant_tensor``, then ``dq_tensor`` of its codes).

Setup (a venv with the wheel and ModelOpt; ``import modelopt.onnx.quantization`` also needs
onnxslim, onnxscript and lief, which nvidia-modelopt 0.47.0 does not pull in):
    python3 -m venv v && v/bin/pip install target/wheels/nibble-*.whl nvidia-modelopt \
        onnx-graphsurgeon onnxslim onnxscript lief ml_dtypes
    v/bin/python benches/int4_numpy.py [--size 4096] [--block 128] [--repeat 5]
"""

import argparse
import os
import time

import numpy as np

import nibble
import nibble.int4 as nq

try:
    import logging

    logging.disable(logging.WARNING)  # ModelOpt warns that cupy is missing: the numpy path is wanted
    from modelopt.onnx.quantization import int4 as mo
except ImportError:
    mo = None


def best_of(repeat, fn):
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def qdq(lib, w, block, zp):
    q, s, z = lib.quant_tensor(w, block, 0, 1.0, zp)
    return q, s, z, lib.dq_tensor(q, s, block, 0, z)


def check_identical(w, block, zp):
    for got, want in zip(qdq(nq, w, block, zp), qdq(mo, w, block, zp)):
        if want is None:
            assert got is None
            continue
        assert got.dtype == want.dtype and got.shape == want.shape
        assert np.array_equal(got.view(np.uint8), np.ascontiguousarray(want).view(np.uint8)), "outputs differ"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=4096)
    ap.add_argument("--block", type=int, default=128)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    n, block = args.size, args.block
    rng = np.random.default_rng(0)
    base = rng.standard_normal((n, n)).astype(np.float32)
    print(f"nibble {nibble.__version__}, SIMD tier {nibble._nibble.simd_tier()}, {os.cpu_count()} CPUs; "
          f"ModelOpt {'present' if mo else 'not installed'}; numpy {np.__version__}")
    print(f"quant_tensor + dq_tensor, [{n}, {n}], block {block}, best of {args.repeat}; load average "
          f"{' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    print(f"{'dtype':8} {'zero point':10} {'nibble ms':>10} {'(quant':>7} {'dq)':>6} "
          f"{'ModelOpt ms':>12} {'(quant':>7} {'dq)':>7} {'ratio':>7}")
    for dtype in (np.float32, np.float16):
        w = base.astype(dtype)
        for zp in (False, True):
            if mo is not None:
                check_identical(w, block, zp)
            times = {}
            for name, lib, repeat in ((nq, nq, args.repeat), (mo, mo, max(1, args.repeat // 2))):
                if lib is None:
                    continue
                q, s, z = lib.quant_tensor(w, block, 0, 1.0, zp)
                times[name] = (
                    best_of(repeat, lambda: qdq(lib, w, block, zp)),
                    best_of(repeat, lambda: lib.quant_tensor(w, block, 0, 1.0, zp)),
                    best_of(repeat, lambda: lib.dq_tensor(q, s, block, 0, z)),
                )
            t_n, q_n, d_n = times[nq]
            row = f"{np.dtype(dtype).name:8} {str(zp):10} {t_n * 1e3:10.1f} {q_n * 1e3:7.1f} {d_n * 1e3:6.1f} "
            if mo is not None:
                t_m, q_m, d_m = times[mo]
                print(row + f"{t_m * 1e3:12.1f} {q_m * 1e3:7.1f} {d_m * 1e3:7.1f} {t_m / t_n:6.1f}x")
            else:
                print(row + f"{'-':>12} {'-':>7} {'-':>7} {'-':>7}")


if __name__ == "__main__":
    main()
