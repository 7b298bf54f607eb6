#!/usr/bin/env python3
"""Writes the INT8 golden cases (tests/data/golden/q8_*.npz) from ModelOpt's own quant_utils
(find_scales / rtn / dq_tensor with num_bits=8), the way its mixed-precision layers call them.
A development script (needs ModelOpt in .venv); the outputs are committed.

    .venv/bin/python scripts/gen_int8_golden.py tests/data/golden
"""
import os, sys

import numpy as np
from modelopt.onnx.quantization.quant_utils import dq_tensor, find_scales, rtn


def case(out_dir, name, w, block, zero_point):
    s, zp = find_scales(w, block, use_zero_point=zero_point, num_bits=8)
    s = s.astype(w.dtype)
    if zp is not None:
        zp = zp.astype(w.dtype)
    q = rtn(w, s, block, zp=zp, num_bits=8)
    # rtn returns int8 even for UINT8 codes (200 wraps to -56): dequantize the codes as stored (uint8).
    q = q.astype(np.uint8) if zero_point else q
    dq = dq_tensor(q, s, block, zp=zp)
    arrays = dict(in_w=w, in_block_size=np.array(block), in_use_zero_point=np.array(int(zero_point)),
                  in_num_bits=np.array(8), out_scale=s, out_q=q.astype(np.uint8) if zero_point else q.astype(np.int8),
                  out_dq=dq.astype(np.float32))
    if zp is not None:
        arrays["out_zp"] = zp
    np.savez(os.path.join(out_dir, name + ".npz"), **arrays)


def main():
    out = sys.argv[1]
    rng = np.random.default_rng(8)
    w = rng.standard_normal((256, 64)).astype(np.float32)
    w[:, 3] = 0.0                      # an all-zero channel: CLIP_MIN scale
    w[::7, 5] = np.float32(1.5)        # ties at .5 after scaling
    case(out, "q8_fp32_256x64_perchannel", w, 256, False)
    case(out, "q8_fp32_256x64_perchannel_zp", w, 256, True)
    case(out, "q8_fp32_256x64_b32", w, 32, False)
    h = (rng.standard_normal((200, 48)) * 3).astype(np.float16)
    case(out, "q8_fp16_200x48_perchannel", h, 200, False)
    case(out, "q8_fp16_200x48_perchannel_zp", h, 200, True)
    case(out, "q8_fp16_200x48_b64_zp", h, 64, True)


if __name__ == "__main__":
    main()
