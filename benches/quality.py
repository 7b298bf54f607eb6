#!/usr/bin/env python3
"""Quality of a quantized model against its float original, on the held-out evaluation set that
``benches/models/make_data.py`` writes, measured in ONNX Runtime (CPU) under two session options:

  default   ``SessionOptions()`` as it comes. ONNX Runtime fuses DequantizeLinear(INT4) + MatMul into
            MatMulNBits and runs it with int8-quantized activations
            (``session.qdq_matmulnbits_accuracy_level`` = 4); MatMulNBits nodes written by a quantizer
            run at the ``accuracy_level`` they carry (0, unset, for ONNX Runtime's own quantizer as
            called here: float32 activations).
  level1    ``session.qdq_matmulnbits_accuracy_level`` = "1": float32 activations, so the difference
            from the float model is the weight quantization error alone.

Metrics:
  causal LM (input ``input_ids`` -> ``logits``): mean next-token negative log-likelihood over the
      evaluation rows (each row ``<bos>`` + 511 tokens: 511 predictions per row), and perplexity
      exp(NLL).
  encoder (``input_ids``, ``attention_mask`` -> ``sentence_embedding``): mean over the evaluation
      paragraphs of the cosine similarity between the quantized and the float model's embedding
      (the float model is run under the same session options).

    python3 benches/quality.py target/bench-models/gemma3-270m/q/rtn_dq_b128.onnx --model gemma3-270m
    python3 benches/quality.py FLOAT_OR_QUANT.onnx --model minilm-l3 --json

Prints one line per session option (and JSON with --json).
"""
import argparse
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "models"))
import common  # noqa: E402

LEVELS = {"default": None, "level1": "1"}


def session(path, level):
    import onnxruntime as ort

    so = ort.SessionOptions()
    if LEVELS[level] is not None:
        so.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", LEVELS[level])
    return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])


def lm_nll(path, ev, level):
    s = session(path, level)
    ids = ev["input_ids"]
    total, count = 0.0, 0
    for row in ids:
        logits = s.run(["logits"], {"input_ids": row[None]})[0][0].astype(np.float64)  # [S, V]
        logits = logits[:-1]
        m = logits.max(-1, keepdims=True)
        lse = (m[:, 0] + np.log(np.exp(logits - m).sum(-1)))
        tgt = logits[np.arange(len(row) - 1), row[1:]]
        total += float((lse - tgt).sum())
        count += len(row) - 1
    nll = total / count
    return {"nll": nll, "perplexity": float(np.exp(nll)), "tokens": count}


def embeddings(path, ev, level):
    s = session(path, level)
    return s.run(["sentence_embedding"], {"input_ids": ev["input_ids"], "attention_mask": ev["attention_mask"]})[0]


def evaluate(model, quant, float_path=None, levels=("default", "level1"), float_cache=None):
    """Returns {level: metrics} for the quantized (or float) model at `quant`."""
    d = common.model_dir(model)
    float_path = float_path or os.path.join(d, "model.onnx")
    ev = dict(np.load(os.path.join(d, "eval.npz")))
    out = {}
    for level in levels:
        if "logits" in outputs(float_path):
            out[level] = lm_nll(quant, ev, level)
        else:
            key = ("emb", level)
            if float_cache is not None and key in float_cache:
                ref = float_cache[key]
            else:
                ref = embeddings(float_path, ev, level)
                if float_cache is not None:
                    float_cache[key] = ref
            got = embeddings(quant, ev, level)
            cos = (ref * got).sum(1) / (np.linalg.norm(ref, axis=1) * np.linalg.norm(got, axis=1))
            out[level] = {"mean_cosine": float(cos.mean()), "min_cosine": float(cos.min()), "rows": len(cos)}
    return out


def outputs(path):
    import onnx

    return [o.name for o in onnx.load(path, load_external_data=False).graph.output]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("quantized")
    ap.add_argument("--model", required=True, help="folder name under target/bench-models (gemma3-270m, minilm-l3)")
    ap.add_argument("--float", dest="float_path")
    ap.add_argument("--levels", default="default,level1")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    res = evaluate(args.model, args.quantized, args.float_path, args.levels.split(","))
    for level, m in res.items():
        what = ("session.qdq_matmulnbits_accuracy_level=1 (float32 activations)" if level == "level1"
                else "default SessionOptions (DQ+MatMul fused to MatMulNBits with int8 activations)")
        print(f"{level:8s} {json.dumps(m)}   [{what}]")
    if args.json:
        print(json.dumps(res))


if __name__ == "__main__":
    main()
