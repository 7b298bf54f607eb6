"""Model folders from Python: nibble.quantize_file / nibble.quantize on an onnxruntime-genai folder
with calibration from text; the output folder holds every other file byte for byte and runs in
ONNX Runtime (and in onnxruntime-genai where it is installed)."""

import os
import random

import pytest

import nibble
from conftest import run_cli


def _text(path, words=3000):
    rng = random.Random(0)
    vocab = "the quick brown fox jumps over a lazy dog while seven wizards quietly judge boxing matches".split()
    path.write_text(" ".join(rng.choice(vocab) for _ in range(words)))
    return path


@pytest.fixture()
def genai_folder(tmp_path):
    folder = tmp_path / "genai"
    run_cli("example", "--kind", "genai", folder, check=0)
    return folder


def _files(folder):
    out = {}
    for root, _, names in os.walk(folder):
        for n in names:
            p = os.path.join(root, n)
            out[os.path.relpath(p, folder)] = open(p, "rb").read()
    return out


def test_quantize_file_on_a_folder_with_text(genai_folder, tmp_path):
    text = _text(tmp_path / "text.txt")
    before = _files(genai_folder)
    out = tmp_path / "out"
    result = nibble.quantize_file(
        genai_folder,
        out,
        method="gptq",
        block_size=32,
        calibration_text=text,
        calibration_samples=2,
        calibration_seq_len=64,
    )
    assert result["layout"] == "onnxruntime-genai"
    assert [m["quantized"] > 0 for m in result["models"]] == [True]
    assert _files(genai_folder) == before, "the input folder changed"
    after = _files(out)
    assert set(after) == set(before)
    for name, data in before.items():
        if name not in ("model.onnx", "model.onnx.data"):
            assert after[name] == data, name
    assert after["model.onnx.data"] != before["model.onnx.data"]

    import onnxruntime as ort
    session = ort.InferenceSession(str(out / "model.onnx"))
    assert session.get_outputs()[0].name == "logits"
    og = pytest.importorskip("onnxruntime_genai")
    model = og.Model(str(out))
    tokenizer = og.Tokenizer(model)
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=16)
    generator = og.Generator(model, params)
    generator.append_tokens(tokenizer.encode("the quick brown fox"))
    while not generator.is_done():
        generator.generate_next_token()
    assert len(generator.get_sequence(0)) == 16


def test_quantize_modelopt_call_writes_a_folder(genai_folder, tmp_path):
    text = _text(tmp_path / "text.txt")
    out = tmp_path / "q"
    result = nibble.quantize(
        str(genai_folder),
        calibration_method="awq_clip",
        output_path=str(out),
        calibration_text=str(text),
        calibration_samples=2,
        calibration_seq_len=64,
        block_size=32,
    )
    assert result["output"] == str(out)
    assert (out / "genai_config.json").read_bytes() == (genai_folder / "genai_config.json").read_bytes()


def test_text_errors(genai_folder, tmp_path):
    short = _text(tmp_path / "short.txt", words=10)
    with pytest.raises(ValueError, match="holds .* tokens, fewer than 16 samples x 512 tokens"):
        nibble.quantize_file(genai_folder, tmp_path / "o", method="gptq", calibration_text=short)
    assert not (tmp_path / "o").exists()
    with pytest.raises(FileNotFoundError):
        nibble.quantize_file(
            genai_folder, tmp_path / "o", method="gptq", calibration_text=short, tokenizer=tmp_path / "none.json"
        )
    assert not (tmp_path / "o").exists()
