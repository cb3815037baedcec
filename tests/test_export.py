"""`export --format hf`: our folders (float or quantized) back to Hugging Face folders that transformers loads with
the same logits (quantized weights dequantized exactly as MLX computes with them)."""

from __future__ import annotations

import json

import mlx.core as mx
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from transformers import AutoTokenizer, LlamaForCausalLM

from llama2_mlx.checkpoints.convert import convert
from llama2_mlx.checkpoints.export import export
from llama2_mlx.cli import cli
from llama2_mlx.errors import Llama2MLXError
from llama2_mlx.model_folder import load_model
from llama2_mlx.tokenizer import Tokenizer
from tests.checkpoint_builders import meta_reference, write_meta_folder
from tests.conftest import TOKENIZER_VOCAB

PARAMS = dict(
    dim=64, n_layers=2, n_heads=8, n_kv_heads=2, vocab_size=TOKENIZER_VOCAB, multiple_of=32, norm_eps=1e-5
)
TOKENS = [[1, 306, 4, 77, 300, 2, 9, 100, 383, 12, 45], [1, 17, 17, 250, 3, 99, 380, 0, 5, 64, 7]]


@pytest.fixture(scope="module")
def meta_folder(tmp_path_factory, tokenizer_dir):
    folder = tmp_path_factory.mktemp("export") / "meta"
    return write_meta_folder(folder, PARAMS, meta_reference(PARAMS, seed=4).state_dict(), 2, tokenizer_dir)


def _transformers_logits(folder) -> np.ndarray:
    model = LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.tensor(TOKENS)).logits.float().numpy()


def _assert_close(ours: np.ndarray, theirs: np.ndarray) -> None:
    error = np.abs(ours - theirs).max()
    assert error <= 1e-4 * max(1.0, np.abs(theirs).max()), error


def test_export_float_folder(meta_folder, tmp_path):
    convert(meta_folder, tmp_path / "mlx")
    export(tmp_path / "mlx", tmp_path / "hf")
    ours = np.array(load_model(tmp_path / "mlx")(mx.array(TOKENS)))
    _assert_close(ours, _transformers_logits(tmp_path / "hf"))
    # the tokenizer travels along and transformers reads it with the same ids as ours
    text = "hello world, the quick fox"
    hf_ids = AutoTokenizer.from_pretrained(tmp_path / "hf")(text)["input_ids"]
    assert hf_ids == Tokenizer(tmp_path / "hf" / "tokenizer.model").encode(text, bos=True, eos=False)


def test_export_quantized_folder_is_dequantized(meta_folder, tmp_path):
    convert(meta_folder, tmp_path / "q4", quantize=4, group_size=32)
    export(tmp_path / "q4", tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert "quantization" not in config
    stored = mx.load(str(tmp_path / "hf" / "model.safetensors"))
    assert not any(name.endswith((".scales", ".biases")) for name in stored)
    assert stored["model.layers.0.self_attn.q_proj.weight"].shape == (64, 64)
    ours = np.array(load_model(tmp_path / "q4")(mx.array(TOKENS)))
    _assert_close(ours, _transformers_logits(tmp_path / "hf"))


def test_export_errors_and_cli(meta_folder, tmp_path):
    convert(meta_folder, tmp_path / "mlx", dtype="bfloat16")
    with pytest.raises(Llama2MLXError, match="export format 'gguf' is not supported"):
        export(tmp_path / "mlx", tmp_path / "out", format="gguf")
    with pytest.raises(Llama2MLXError, match=r"nothing: no such model folder"):
        export(tmp_path / "nothing", tmp_path / "out")
    runner = CliRunner()
    result = runner.invoke(cli, ["export", str(tmp_path / "mlx"), str(tmp_path / "hf"), "--format", "hf"])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    again = runner.invoke(cli, ["export", str(tmp_path / "mlx"), str(tmp_path / "hf")])
    assert again.exit_code == 1 and "already exists (use --force to overwrite)" in again.stderr
    assert (
        runner.invoke(cli, ["export", str(tmp_path / "mlx"), str(tmp_path / "hf"), "--force"]).exit_code == 0
    )
