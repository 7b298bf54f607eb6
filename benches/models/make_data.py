#!/usr/bin/env python3
"""Calibration and evaluation token sets for the real-model benchmarks, from real English text that
ships with Python itself: ``pydoc_data.topics`` (the Python Language Reference's topic texts that
``help()`` prints; ~900 KB).

    python3 benches/models/make_data.py               # both models, after the convert_*.py scripts

The topics are joined in sorted-key order; the first 60% of the text is the calibration part, the
last 40% the held-out evaluation part (no overlap). Per model, in target/bench-models/<model>/:

  calib.npz  16 samples x 128 tokens, one array per model input, samples on axis 0
             (gemma3-270m: input_ids [16, 128] int64, each window starting with <bos>;
              minilm-l3: input_ids and attention_mask [16, 128], [CLS] ... [SEP], mask all ones)
  eval.npz   gemma3-270m: input_ids [N, 512] (<bos> + 511 tokens of consecutive held-out text; the
             perplexity is over the 511 next-token predictions of each row), default N = 2 (1022
             predictions: each evaluation of the 262k-token lm_head model costs ~0.5 TFLOP per
             session, minutes on a shared 2-core machine);
             minilm-l3: input_ids, attention_mask [N, 128]: N paragraphs of held-out text
             (at most 128 tokens, zero-padded), default N = 64.
Both files also hold ``text_sha256`` (of the joined text) and ``python_version``, since the text comes
with the Python that runs this script.
"""
import argparse
import hashlib
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402


def corpus():
    from pydoc_data.topics import topics

    text = "\n\n".join(topics[k].strip() for k in sorted(topics))
    cut = int(len(text) * 0.6)
    cut = text.index("\n\n", cut)
    return text, text[:cut], text[cut:]


def windows(ids, n, length, lead):
    """n windows of `length` tokens, `lead` prepended, evenly spaced over the token stream ids."""
    body = length - len(lead)
    if len(ids) < n * body:
        raise SystemExit(f"text too short: {len(ids)} tokens for {n} x {body}")
    step = (len(ids) - body) // max(n - 1, 1)
    return np.array([lead + ids[i * step: i * step + body] for i in range(n)], np.int64)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="gemma3-270m,minilm-l3")
    ap.add_argument("--calib-samples", type=int, default=16)
    ap.add_argument("--calib-len", type=int, default=128)
    ap.add_argument("--lm-eval-rows", type=int, default=2)
    ap.add_argument("--lm-eval-len", type=int, default=512)
    ap.add_argument("--enc-eval-rows", type=int, default=64)
    args = ap.parse_args()
    from tokenizers import Tokenizer

    text, calib_text, eval_text = corpus()
    meta = {"text_sha256": np.array(hashlib.sha256(text.encode()).hexdigest()),
            "python_version": np.array(sys.version.split()[0])}
    print(f"pydoc_data.topics: {len(text)} chars (calibration {len(calib_text)}, evaluation {len(eval_text)}), "
          f"sha256 {meta['text_sha256']}")
    for name in args.models.split(","):
        d = common.model_dir(name)
        tk = Tokenizer.from_file(os.path.join(d, "tokenizer.json"))
        if name.startswith("gemma"):
            bos = tk.token_to_id("<bos>")
            cids = tk.encode(calib_text, add_special_tokens=False).ids
            eids = tk.encode(eval_text, add_special_tokens=False).ids
            calib = {"input_ids": windows(cids, args.calib_samples, args.calib_len, [bos])}
            ev = {"input_ids": windows(eids, args.lm_eval_rows, args.lm_eval_len, [bos])}
            print(f"{name}: calibration {len(cids)} tokens, evaluation {len(eids)} tokens -> "
                  f"calib {calib['input_ids'].shape}, eval {ev['input_ids'].shape}")
        else:
            cls, sep = tk.token_to_id("[CLS]"), tk.token_to_id("[SEP]")
            cids = tk.encode(calib_text, add_special_tokens=False).ids
            c = windows(cids, args.calib_samples, args.calib_len - 1, [cls])
            c = np.concatenate([c, np.full((c.shape[0], 1), sep, np.int64)], axis=1)
            calib = {"input_ids": c, "attention_mask": np.ones_like(c)}
            paras = [p.strip() for p in eval_text.split("\n\n") if len(p.strip()) > 80]
            step = max(len(paras) // args.enc_eval_rows, 1)
            paras = paras[::step][: args.enc_eval_rows]
            L = args.calib_len
            ids = np.zeros((len(paras), L), np.int64)
            mask = np.zeros((len(paras), L), np.int64)
            for r, p in enumerate(paras):
                e = tk.encode(p).ids
                if len(e) > L:
                    e = e[: L - 1] + [sep]
                ids[r, : len(e)] = e
                mask[r, : len(e)] = 1
            ev = {"input_ids": ids, "attention_mask": mask}
            print(f"{name}: calib {c.shape}, eval {ids.shape} ({int(mask.sum())} tokens)")
        np.savez(os.path.join(d, "calib.npz"), **calib)
        np.savez(os.path.join(d, "eval.npz"), **ev, **meta)


if __name__ == "__main__":
    main()
