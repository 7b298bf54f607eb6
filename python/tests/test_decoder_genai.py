"""`nibble example --kind genai` folders in onnxruntime-genai (PyPI `onnxruntime-genai`, installed by
scripts/test-python.sh): the float folder and the folder with its model quantized (MatMulNBits,
the builder's accuracy level 4) load, tokenize and generate. Skipped only when the package is
missing."""

import shutil

import pytest

from conftest import run_cli

og = pytest.importorskip("onnxruntime_genai")

PROMPT = "the river and the mountain in winter"


def generate(folder, steps=8):
    model = og.Model(str(folder))
    tokenizer = og.Tokenizer(model)
    ids = tokenizer.encode(PROMPT)
    # Every word of the prompt is one token of the example's tokenizer (the first has no space).
    assert len(ids) == 3 + len(PROMPT.split()) - 1, list(ids)
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(ids) + steps)
    generator = og.Generator(model, params)
    generator.append_tokens(ids)
    while not generator.is_done():
        generator.generate_next_token()
    sequence = list(generator.get_sequence(0))
    assert sequence[: len(ids)] == list(ids)
    assert len(sequence) == len(ids) + steps
    return sequence


def test_genai_example_and_its_quantized_model_generate(tmp_path):
    folder = tmp_path / "genai"
    run_cli("example", "--kind", "genai", folder, check=0)
    float_tokens = generate(folder)

    quantized = tmp_path / "genai_int4"
    shutil.copytree(folder, quantized)
    (quantized / "model.onnx").unlink()
    (quantized / "model.onnx.data").unlink()
    run_cli(
        "quantize", folder / "model.onnx", "-o", quantized / "model.onnx", "--format", "matmulnbits",
        "--block-size", "32", check=0,
    )
    int4_tokens = generate(quantized)
    # Greedy decoding of a random model: the quantized one follows the same prompt; both sequences
    # are valid token ids of the tokenizer.
    vocab = 988
    assert all(0 <= t < vocab for t in float_tokens + int4_tokens)
