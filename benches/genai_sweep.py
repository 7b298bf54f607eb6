#!/usr/bin/env python3
"""Size, perplexity, decode speed and quantize cost of onnxruntime-genai folders: the builder's
(``benches/genai_models.py``) and nibble's, measured in one run (issues 18 and 22; BENCHMARKS.md,
"onnxruntime-genai folders").

    PY=target/bench-models/genai/venv/bin/python
    cargo build --release -p nibble-driver
    $PY benches/genai_sweep.py --model gemma3-270m --default-runs --level1
    $PY benches/genai_sweep.py --model gemma3-270m \\
        --run "rtn_b64=--method rtn_dq --block-size 64" \\
        --run "gptq_zp_b128_nde=--method gptq --zero-point --calibration-data {calib_npz} --no-default-exclude"
    $PY benches/genai_sweep.py --model gemma3-270m --config runs.json   # [{"label": ..., "args": [...]}]
    $PY benches/genai_sweep.py --model gemma3-270m --table              # tables from the JSON only

Folders: the builder's ``fp32``, ``int4`` and ``k_quant_mixed`` under
``target/bench-models/genai/<model>/`` (those that exist) are measured as references; every nibble run
writes ``target/bench-models/genai/<model>/nibble/<label>/``.

A nibble run is ``target/release/nibble quantize {in_model} -o {out_model} ARGS`` with ARGS taken as
given (``--run LABEL=ARGS``, split like a shell line, or a JSON config list), so the sweep runs any
option nibble has, today's or a later one's. ARGS may use the placeholders ``{in_model}`` (the fp32
folder's model.onnx), ``{in_dir}`` (the fp32 folder), ``{out_model}``, ``{out_dir}``, ``{calib_npz}``
(the text calibration below as an .npz of every graph input), ``{calib_text}`` (the calibration text as
a file) and ``{tokenizer}`` (the fp32 folder's tokenizer.json). With ``--folder-io`` the leading
arguments become ``quantize {in_dir} -o {out_dir}`` (nibble's folder mode). When nibble leaves no
``genai_config.json`` in the output folder, the fp32 folder's other files (config, tokenizer) are
copied beside the model.

Text: Python's own ``pydoc_data.topics`` (the Language Reference topics that ``help()`` prints; PSF
license, ships with CPython, so no download), joined in sorted-key order as ``benches/models/make_data.py``
does: the first 60% is calibration text, the last 40% is held out. Tokenized with the folder's
``tokenizer.json`` (``tokenizers``); a row starts with the BOS token for model families trained with
one (``lead_tokens``: Gemma yes, Qwen2 no).
  calibration (``{calib_npz}``): 16 windows x 128 tokens, evenly spaced; ``attention_mask`` ones,
      ``position_ids`` 0..127 when the graph has it, every ``past_key_values.*`` input an empty cache
      ``[16, kv_heads, P, head_size]`` (heads and size from genai_config.json; P = 0, or for a model
      with a sliding window P = max(window, tokens) zeros that the attention mask leaves out, since
      GroupQueryAttention refuses a shorter buffer there: see ``feeds``).
  evaluation: ``--eval-rows`` (4) windows x ``--eval-len`` (512) tokens, evenly spaced over the held-out
      part; perplexity = exp(mean next-token NLL) over the (eval-len - 1) predictions of each row, one
      row per session run with an empty KV cache.

Measured per folder:
  bytes        model.onnx plus its external data files (the folder's other files are not counted)
  ppl default  a default ONNX Runtime session: ``SessionOptions()`` untouched (all graph optimizations;
               DequantizeLinear(INT4)+MatMul fused into MatMulNBits running with int8 activations,
               ``session.qdq_matmulnbits_accuracy_level`` 4; MatMulNBits nodes a quantizer wrote run at
               the ``accuracy_level`` they carry)
  ppl level1   (``--level1``, for folders with DequantizeLinear nodes only, where it changes anything)
               ``session.qdq_matmulnbits_accuracy_level`` = "1": the fused nodes keep float32
               activations, so the number is the weight quantization's effect alone
  decode tok/s onnxruntime-genai (``og.Model`` with the folder's genai_config.json session options),
               greedy, a 64-token prompt from the held-out text then ``--decode-tokens`` (64) new
               tokens; tokens/s over the new tokens (the prompt's forward pass excluded), median of
               ``--decode-repeats`` (3) runs, each in a fresh process; the machine's 1-minute load
               average is recorded beside it (a shared machine: compare numbers of one run)
  quantize     nibble runs only: wall and CPU seconds and peak RSS (wait4's ru_maxrss) of the process

Results merge into ``benches/results/genai-<model>.json`` by label (runs can be split or repeated)
and the table is written to ``benches/results/genai-<model>.md``. Timings come from a shared 2-core
machine: compare numbers from the same run.
"""
import argparse
import datetime
import hashlib
import json
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "models"))
import common  # noqa: E402
import make_data  # noqa: E402

NIBBLE = os.path.join(common.ROOT, "target", "release", "nibble")
RESULTS = os.path.join(HERE, "results")
REFERENCES = {
    "fp32": "builder -p fp32 (float)",
    "int4": "builder -p int4 (RTN b32 symmetric, lm_head 4-bit, accuracy_level 4)",
    "k_quant_mixed": "builder -p int4 algo_config=k_quant_mixed",
}
# The runs of BENCHMARKS.md: today's nibble on the builder's fp32 graph (file in, file out, npz calibration).
DEFAULT_RUNS = [
    ("rtn_dq_b32", "--method rtn_dq --block-size 32"),
    ("rtn_dq_b128", "--method rtn_dq --block-size 128"),
    ("gptq_zp_b128", "--method gptq --zero-point --block-size 128 --calibration-data {calib_npz}"),
    ("rtn_dq_b32_nde", "--method rtn_dq --block-size 32 --no-default-exclude"),
    ("gptq_zp_b128_nde", "--method gptq --zero-point --block-size 128 --calibration-data {calib_npz} "
                         "--no-default-exclude"),
]
DECODE_SNIPPET = r"""
import json, sys, time
import onnxruntime_genai as og
folder, prompt, n = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3])
dec = json.load(open(folder + "/genai_config.json"))["model"]["decoder"]
window = (dec.get("sliding_window") or {}).get("window_size", 0)
model = og.Model(folder)
params = og.GeneratorParams(model)
# a sliding-window GroupQueryAttention refuses a KV buffer shorter than its window
params.set_search_options(max_length=max(len(prompt) + n, window), do_sample=False)
gen = og.Generator(model, params)
t0 = time.perf_counter()
gen.append_tokens(prompt)  # the prompt's forward pass
t1 = time.perf_counter()
k = 0
while k < n and not gen.is_done():
    gen.generate_next_token()  # picks a token from the last logits, runs the next forward pass
    k += 1
t2 = time.perf_counter()
print(json.dumps({"first_token_s": t1 - t0, "tokens": k, "decode_tok_s": k / (t2 - t1)}))
"""


def genai_config(folder):
    with open(os.path.join(folder, "genai_config.json")) as f:
        return json.load(f)


def model_file(folder):
    return os.path.join(folder, genai_config(folder)["model"]["decoder"]["filename"])


def model_bytes(folder):
    path = model_file(folder)
    base = os.path.basename(path)
    return sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder)
               if f == base or f.startswith(base + ".") or f.startswith(base + "_"))


BOS_FAMILIES = ("gemma", "llama", "mistral", "phi3")


def lead_tokens(folder):
    """[bos] when the model family is trained with one: tokenizer_config.json's add_bos_token when it
    says (transformers 4 writes it), else genai_config's model.type starting with one of BOS_FAMILIES
    (transformers 5 leaves the key out); [] otherwise (Qwen2 has no BOS)."""
    p = os.path.join(folder, "tokenizer_config.json")
    tc = json.load(open(p)) if os.path.exists(p) else {}
    m = genai_config(folder)["model"]
    add = tc["add_bos_token"] if "add_bos_token" in tc else m.get("type", "").startswith(BOS_FAMILIES)
    bos = m.get("bos_token_id")
    return [int(bos)] if add and bos is not None else []


def token_sets(folder, calib_samples, calib_len, eval_rows, eval_len):
    from tokenizers import Tokenizer

    text, calib_text, eval_text = make_data.corpus()
    tk = Tokenizer.from_file(os.path.join(folder, "tokenizer.json"))
    lead = lead_tokens(folder)
    cids = tk.encode(calib_text, add_special_tokens=False).ids
    eids = tk.encode(eval_text, add_special_tokens=False).ids
    info = {"source": "pydoc_data.topics (CPython %s, PSF license), sorted keys, last 40%% held out"
                      % platform.python_version(),
            "text_sha256": hashlib.sha256(text.encode()).hexdigest(), "lead_tokens": lead,
            "calibration": [calib_samples, calib_len], "evaluation": [eval_rows, eval_len],
            "calibration_text_tokens": len(cids), "evaluation_text_tokens": len(eids)}
    return (make_data.windows(cids, calib_samples, calib_len, lead),
            make_data.windows(eids, eval_rows, eval_len, lead), calib_text, info)


def graph_inputs(path):
    import onnx

    m = onnx.load(path, load_external_data=False)
    out = []
    for i in m.graph.input:
        t = i.type.tensor_type
        out.append((i.name, t.elem_type, [d.dim_value if d.HasField("dim_value") else d.dim_param
                                          for d in t.shape.dim]))
    return out


def feeds(inputs, cfg, ids):
    """One set of graph inputs for token rows ids [B, T] with an empty KV cache."""
    import onnx

    dec = cfg["model"]["decoder"]
    b, t = ids.shape
    # GroupQueryAttention with a sliding window refuses a KV buffer shorter than the window ("KV cache
    # capacity (0) must be at least local_window_size"); a longer zero buffer with the attention mask
    # covering only the new tokens is read as an empty shared cache (onnxruntime-genai's own layout):
    # the logits are the same for any capacity >= max(window, t) (checked: 512 vs 1024, max diff 0).
    window = (dec.get("sliding_window") or {}).get("window_size", 0)
    past = max(window, t) if window else 0
    out = {}
    for name, elem, dims in inputs:
        np_t = onnx.helper.tensor_dtype_to_np_dtype(elem)
        if name == "input_ids":
            out[name] = ids.astype(np_t)
        elif name == "attention_mask":
            out[name] = np.ones((b, t), np_t)
        elif name == "position_ids":
            out[name] = np.broadcast_to(np.arange(t), (b, t)).astype(np_t)
        elif name.startswith("past_key_values") or name.startswith("past_"):
            out[name] = np.zeros((b, dec["num_key_value_heads"], past, dec["head_size"]), np_t)
        else:
            raise SystemExit(f"input {name} {dims}: no rule to feed it; add one to feeds()")
    return out


def write_calibration(folder, calib_ids, calib_text, out_dir):
    os.makedirs(out_dir, exist_ok=True)
    npz = os.path.join(out_dir, "calib.npz")
    txt = os.path.join(out_dir, "calib.txt")
    arrays = feeds(graph_inputs(model_file(folder)), genai_config(folder), calib_ids)
    # written beside and renamed into place: another sweep of the same model may be reading them
    np.savez(npz + ".tmp.npz", **arrays)
    os.replace(npz + ".tmp.npz", npz)
    with open(txt + ".tmp", "w") as f:
        f.write(calib_text)
    os.replace(txt + ".tmp", txt)
    return npz, txt


def perplexity(folder, eval_ids, level1):
    import onnxruntime as ort

    so = ort.SessionOptions()
    if level1:
        so.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "1")
    path = model_file(folder)
    s = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    inputs = graph_inputs(path)
    cfg = genai_config(folder)
    total, count = 0.0, 0
    for row in eval_ids:
        logits = s.run(["logits"], feeds(inputs, cfg, row[None]))[0][0, :-1].astype(np.float64)
        m = logits.max(-1)
        lse = m + np.log(np.exp(logits - m[:, None]).sum(-1))
        total += float((lse - logits[np.arange(len(row) - 1), row[1:]]).sum())
        count += len(row) - 1
    del s
    return round(float(np.exp(total / count)), 3)


def perplexity_no_optimization(folder, eval_ids):
    """The first evaluation row's perplexity with every graph optimization disabled
    (``GraphOptimizationLevel.ORT_DISABLE_ALL``: DequantizeLinear + MatMul run as written, nothing
    fused) next to the same row in a default session: the folder runs in both modes, and how far the
    two differ."""
    import onnxruntime as ort

    path = model_file(folder)
    inputs = graph_inputs(path)
    cfg = genai_config(folder)
    row = eval_ids[0]
    out = {}
    for mode in ("default", "disable_all"):
        so = ort.SessionOptions()
        if mode == "disable_all":
            so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        s = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
        logits = s.run(["logits"], feeds(inputs, cfg, row[None]))[0][0, :-1].astype(np.float64)
        del s
        m = logits.max(-1)
        lse = m + np.log(np.exp(logits - m[:, None]).sum(-1))
        out[mode] = round(float(np.exp((lse - logits[np.arange(len(row) - 1), row[1:]]).mean())), 3)
    return out


def quantized_nodes(folder):
    """How the weights are stored: op counts of the quantized forms, the accuracy_level values the
    MatMulNBits nodes carry (a DequantizeLinear -> MatMul pair has none: a default session fuses it
    into MatMulNBits at ``session.qdq_matmulnbits_accuracy_level``, 4 unless set) and the bits of
    MatMulNBits / GatherBlockQuantized nodes."""
    import onnx

    g = onnx.load(model_file(folder), load_external_data=False).graph
    ops, levels, bits = {}, set(), set()
    for n in g.node:
        if n.op_type in ("MatMulNBits", "GatherBlockQuantized", "DequantizeLinear", "MatMul", "Gather"):
            ops[n.op_type] = ops.get(n.op_type, 0) + 1
        for a in n.attribute:
            if n.op_type == "MatMulNBits" and a.name == "accuracy_level":
                levels.add(a.i)
            if n.op_type in ("MatMulNBits", "GatherBlockQuantized") and a.name == "bits":
                bits.add(f"{n.op_type} {a.i}")
    return {"ops": ops, "matmulnbits_accuracy_level": sorted(levels), "bits": sorted(bits)}


def has_dq(folder):
    return any(n.op_type == "DequantizeLinear" for n in __import__("onnx").load(
        model_file(folder), load_external_data=False).graph.node)


def decode_speed(folder, prompt, tokens, repeats, log_dir):
    rates, first = [], []
    for k in range(repeats):
        log = os.path.join(log_dir, f"decode-{k}.log")
        p = subprocess.run([sys.executable, "-c", DECODE_SNIPPET, folder, json.dumps(prompt), str(tokens)],
                           capture_output=True, text=True)
        with open(log, "w") as f:
            f.write(p.stdout + p.stderr)
        if p.returncode != 0:
            return {"error": (p.stderr.strip().splitlines() or ["?"])[-1][:300]}
        r = json.loads(p.stdout.strip().splitlines()[-1])
        rates.append(r["decode_tok_s"])
        first.append(r["first_token_s"])
    return {"decode_tok_s": round(statistics.median(rates), 1), "decode_tok_s_all": [round(x, 1) for x in rates],
            "load_average_1min": round(os.getloadavg()[0], 1),
            "prefill_s": round(statistics.median(first), 2), "new_tokens": tokens, "prompt_tokens": len(prompt)}


def run_nibble(nibble, label, args, src, dst_root, subs, folder_io):
    out_dir = os.path.join(dst_root, label)
    shutil.rmtree(out_dir, ignore_errors=True)
    os.makedirs(out_dir)
    in_model = model_file(src)
    out_model = os.path.join(out_dir, os.path.basename(in_model))
    subs = dict(subs, in_model=in_model, in_dir=src, out_model=out_model, out_dir=out_dir)
    args = [a.format(**subs) for a in args]
    lead = ["quantize", src, "-o", out_dir] if folder_io else ["quantize", in_model, "-o", out_model]
    cmd = [nibble] + lead + ["--force"] + args
    r = common.run_measured(cmd, os.path.join(dst_root, f"{label}.log"))
    r["binary"] = os.path.relpath(nibble, common.ROOT)
    r["command"] = " ".join(shlex.quote(c) for c in ["nibble"] + lead + args).replace(common.ROOT + "/", "")
    if r["returncode"] == 0 and not os.path.exists(os.path.join(out_dir, "genai_config.json")):
        model_names = {os.path.basename(in_model)}
        for f in os.listdir(src):
            if f in model_names or f.startswith(os.path.basename(in_model) + "."):
                continue
            shutil.copy(os.path.join(src, f), out_dir)
    return out_dir, r


def machine():
    import onnxruntime
    import onnxruntime_genai

    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "")
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(),
            "onnxruntime": onnxruntime.__version__, "onnxruntime_genai": onnxruntime_genai.__version__,
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}


def fmt(v, spec="{:.2f}"):
    return "-" if v is None else spec.format(v)


def table(data):
    ref = data["runs"].get("fp32", {}).get("ppl_default")
    rows = ["| folder | how | bytes (MB) | ppl default | ppl level1 | row 0: default / opt. disabled "
            "| decode tok/s (median; runs) | quantize wall s / CPU s | peak RSS MB | stored as |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    order = [k for k in REFERENCES if k in data["runs"]] + [k for k in data["runs"] if k not in REFERENCES]
    for label in order:
        r = data["runs"][label]
        q = r.get("quantize") or {}
        d = r.get("decode") or {}
        dec = ("error: " + d["error"][:60]) if "error" in d else (
            f"{d['decode_tok_s']} ({', '.join(map(str, d['decode_tok_s_all']))}; load "
            f"{d.get('load_average_1min', '?')})" if d else "-")
        cost = f"{q['seconds']} / {q['cpu_seconds']}" if q else "-"
        if "debug" in q.get("binary", ""):
            cost += " (debug build)"
        r0 = r.get("ppl_row0")
        row0 = f"{r0['default']:.2f} / {r0['disable_all']:.2f}" if r0 else "-"
        nodes = r.get("nodes") or {}
        stored = ", ".join(f"{k} {v}" for k, v in sorted(nodes.get("ops", {}).items())
                           if k in ("MatMulNBits", "GatherBlockQuantized", "DequantizeLinear"))
        if nodes.get("matmulnbits_accuracy_level"):
            stored += f" (accuracy_level {', '.join(map(str, nodes['matmulnbits_accuracy_level']))})"
        if nodes.get("bits"):
            stored += f"; bits: {', '.join(nodes['bits'])}"
        rows.append(f"| {label} | {r['how']} | {fmt(r.get('bytes') and r['bytes'] / 1e6, '{:.1f}')} "
                    f"| {fmt(r.get('ppl_default'))} | {fmt(r.get('ppl_level1'))} | {row0} | {dec} | {cost} "
                    f"| {fmt(q.get('peak_rss_mb'), '{:.0f}')} | {stored or '-'} |")
    t = data["text"]
    head = [f"# onnxruntime-genai folders: {data['model']}", "",
            f"Machine: {data['machine']}.", "",
            f"Text: {t['source']} (sha256 {t['text_sha256'][:16]}...); perplexity over {t['evaluation'][0]} x "
            f"{t['evaluation'][1]} held-out tokens (lead tokens {t['lead_tokens']}); calibration: the first 60% "
            f"of the text, as an npz of {t['calibration'][0]} x {t['calibration'][1]} tokens (`--calibration-data`) "
            "or as text (`--calibration-text`, nibble's windows: 16 x 512 unless the row says otherwise). "
            f"fp32 perplexity {fmt(ref)}.", "",
            "Session options: *ppl default* = `SessionOptions()` untouched; *ppl level1* = the same with "
            "`session.qdq_matmulnbits_accuracy_level` = \"1\" (only for folders with DequantizeLinear nodes); "
            "*row 0* = the first evaluation window alone in a default session and with "
            "`graph_optimization_level` = ORT_DISABLE_ALL (one run per folder: it loads and runs unfused). "
            "Decode: onnxruntime-genai with the folder's genai_config.json, greedy, 64-token prompt, tokens/s "
            "over the new tokens (the prompt's forward pass excluded), with the 1-minute load average of "
            "the shared 2-core machine.", ""]
    notes = [f"- {k}: `{r['command']}`" + (f" -- FAILED ({r['error']})" if r.get("error") else "")
             for k, r in ((k, data["runs"][k]) for k in order)]
    return "\n".join(head + rows + ["", "Commands:"] + notes) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="folder name under target/bench-models/genai/")
    ap.add_argument("--run", action="append", default=[], metavar="LABEL=ARGS", help="a nibble run (repeatable)")
    ap.add_argument("--config", help="JSON list of {\"label\": ..., \"args\": [...]} nibble runs")
    ap.add_argument("--default-runs", action="store_true", help="the runs of BENCHMARKS.md (DEFAULT_RUNS)")
    ap.add_argument("--nibble", default=NIBBLE, help="the nibble binary (default: target/release/nibble)")
    ap.add_argument("--folder-io", action="store_true", help="call nibble with folders: quantize IN_DIR -o OUT_DIR")
    ap.add_argument("--references", default=",".join(REFERENCES), help="builder folders to measure")
    ap.add_argument("--level1", action="store_true", help="also perplexity at qdq_matmulnbits_accuracy_level 1")
    ap.add_argument("--no-decode", action="store_true")
    ap.add_argument("--check-no-optimization", action="store_true",
                    help="also run the first evaluation row with every graph optimization disabled "
                         "(ORT_DISABLE_ALL) and in a default session (ppl_row0)")
    ap.add_argument("--decode-tokens", type=int, default=64)
    ap.add_argument("--decode-repeats", type=int, default=3)
    ap.add_argument("--eval-rows", type=int, default=4)
    ap.add_argument("--eval-len", type=int, default=512)
    ap.add_argument("--calib-samples", type=int, default=16)
    ap.add_argument("--calib-len", type=int, default=128)
    ap.add_argument("--table", action="store_true", help="only rewrite the markdown table from the JSON")
    ap.add_argument("--decode-only", action="store_true",
                    help="measure only the decode speed of the references and of existing nibble outputs "
                         "(no quantization), keeping the other numbers")
    args = ap.parse_args()

    root = os.path.join(common.WORK, "genai", args.model)
    json_path = os.path.join(RESULTS, f"genai-{args.model}.json")
    data = json.load(open(json_path)) if os.path.exists(json_path) else {"model": args.model, "runs": {}}
    md_path = os.path.join(RESULTS, f"genai-{args.model}.md")
    if args.table:
        open(md_path, "w").write(table(data))
        return

    fp32 = os.path.join(root, "fp32")
    if not os.path.exists(os.path.join(fp32, "genai_config.json")):
        raise SystemExit(f"{fp32}: no genai_config.json; build it with benches/genai_models.py")
    calib_ids, eval_ids, calib_text, info = token_sets(fp32, args.calib_samples, args.calib_len,
                                                       args.eval_rows, args.eval_len)
    data["text"] = info
    data["machine"] = machine()
    npz, txt = write_calibration(fp32, calib_ids, calib_text, os.path.join(root, "data"))
    subs = {"calib_npz": npz, "calib_text": txt, "tokenizer": os.path.join(fp32, "tokenizer.json")}
    prompt = [int(x) for x in eval_ids[0][:64]]

    runs = []
    for name in [r for r in args.references.split(",") if r]:
        if os.path.exists(os.path.join(root, name, "genai_config.json")):
            runs.append((name, None))
    specs = list(DEFAULT_RUNS) if args.default_runs else []
    specs += [tuple(r.split("=", 1)) for r in args.run]
    if args.config:
        specs += [(c["label"], c["args"]) for c in json.load(open(args.config))]
    runs += [(label, a if isinstance(a, list) else shlex.split(a)) for label, a in specs]
    if not args.decode_only and any(a is not None for _, a in runs) and not os.path.exists(args.nibble):
        raise SystemExit(f"{args.nibble} missing: cargo build --release -p nibble-driver")

    mine = set()

    def save():
        """Merges this run's labels into the JSON under a lock (sweeps of one model can run at once)."""
        import fcntl

        os.makedirs(RESULTS, exist_ok=True)
        with open(json_path + ".lock", "w") as lk:
            fcntl.flock(lk, fcntl.LOCK_EX)
            disk = json.load(open(json_path)) if os.path.exists(json_path) else {"model": args.model, "runs": {}}
            disk["text"], disk["machine"] = data["text"], data["machine"]
            for label in mine:
                disk["runs"][label] = data["runs"][label]
            with open(json_path + ".tmp", "w") as f:
                json.dump(disk, f, indent=1, sort_keys=True)
            os.replace(json_path + ".tmp", json_path)
            open(md_path, "w").write(table(disk))

    if args.decode_only:
        for label, nargs in runs:
            folder = os.path.join(root, label) if nargs is None else os.path.join(root, "nibble", label)
            rec = data["runs"].get(label)
            if rec is None or "error" in rec or not os.path.exists(os.path.join(folder, "genai_config.json")):
                continue
            rec["decode"] = decode_speed(folder, prompt, args.decode_tokens, args.decode_repeats, folder)
            print(f"== {label}: {rec['decode']}", flush=True)
            mine.add(label)
            save()
        return

    for label, nargs in runs:
        print(f"== {label}", flush=True)
        rec = {}
        if nargs is None:
            folder = os.path.join(root, label)
            rec["how"] = REFERENCES[label]
            build = os.path.join(root, "build.json")
            b = json.load(open(build)).get(label, {}) if os.path.exists(build) else {}
            rec["command"] = b.get("command", f"builder ({label})")
            if b:
                rec["quantize"] = {k: b[k] for k in ("seconds", "cpu_seconds", "peak_rss_mb") if k in b}
        else:
            folder, q = run_nibble(args.nibble, label, nargs, fp32, os.path.join(root, "nibble"), subs, args.folder_io)
            rec["how"] = "nibble " + " ".join(a for a in nargs if not a.startswith("{")).replace(
                "--calibration-data", "--calibration-data (text npz)").replace(
                "--calibration-text", "--calibration-text (calibration part)")
            rec["command"] = q.pop("command")
            rec["quantize"] = q
            print(f"   quantize: {q}", flush=True)
            if q["returncode"] != 0:
                rec["error"] = f"nibble exit {q['returncode']}: see {os.path.relpath(folder)}.log"
                data["runs"][label] = rec
                mine.add(label)
                save()
                continue
        rec["bytes"] = model_bytes(folder)
        try:
            rec["ppl_default"] = perplexity(folder, eval_ids, False)
            if args.level1 and has_dq(folder):
                rec["ppl_level1"] = perplexity(folder, eval_ids, True)
        except Exception as e:  # an output ONNX Runtime refuses is a result to report, not a crash
            rec["error"] = f"ONNX Runtime: {str(e).splitlines()[0][:300]}"
        if "error" not in rec:
            rec["nodes"] = quantized_nodes(folder)
            if args.check_no_optimization:
                try:
                    rec["ppl_row0"] = perplexity_no_optimization(folder, eval_ids)
                except Exception as e:
                    rec["error"] = f"ONNX Runtime (optimizations disabled): {str(e).splitlines()[0][:300]}"
        if not args.no_decode and "error" not in rec:
            rec["decode"] = decode_speed(folder, prompt, args.decode_tokens, args.decode_repeats, folder)
        print(f"   {({k: v for k, v in rec.items() if k != 'quantize'})}", flush=True)
        data["runs"][label] = rec
        mine.add(label)
        save()


if __name__ == "__main__":
    main()
