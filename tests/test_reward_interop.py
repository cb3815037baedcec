"""Reward-model folders in and out: `fuse` (LoRA form -> standalone), `export --format hf` (transformers'
AutoModelForSequenceClassification gives our rewards) and `convert` of a Hugging Face LlamaForSequenceClassification."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from transformers import AutoModelForSequenceClassification, LlamaConfig, LlamaForSequenceClassification

import llama2_mlx as L
from llama2_mlx.checkpoints.convert import convert
from llama2_mlx.cli import cli
from llama2_mlx.errors import Llama2MLXError
from llama2_mlx.lora import LoRALinear
from llama2_mlx.reward_model import PAD_TOKEN_ID, RewardScorer, load_reward_model
from tests.conftest import TOKENIZER_VOCAB

PAIRS = [
    {"prompt": "what is the answer", "chosen": "the answer is two", "rejected": "dog", "rating": "better"},
    {"prompt": "sort list", "chosen": "a b c", "rejected": "c b a", "rating": "significantly_better"},
    {"messages": [{"role": "system", "content": "speak in french"}, {"role": "user", "content": "hello"}],
     "chosen": "bonjour monde", "rejected": "hello world", "rating": "slightly_better"},
]  # fmt: skip
# (prompt, answer) rows of different lengths, so that batches carry padding
ROWS = [
    ("sort list", "a b c"),
    ("what is the answer to the quick brown fox question", "the lazy dog jumps over the answer, two"),
    ([{"role": "system", "content": "speak in french"}, {"role": "user", "content": "hello"}], "bonjour"),
]


def train_lora_rm(base: Path, out: Path, data: Path) -> Path:
    """A small LoRA reward model, trained with a high learning rate so that its adapter visibly matters."""
    args = ["train-rm", str(base), "--data", str(data), "--out", str(out), "--batch-size", "3", "--iters", "4",
            "--lr", "3e-2", "--seq-len", "128", "--targets", "q,v,down", "--no-progress"]  # fmt: skip
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("pairs") / "pairs.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in PAIRS * 4))
    return path


@pytest.fixture(scope="module")
def lora_rm(tmp_path_factory, tiny_model_dir, pairs_file) -> Path:
    return train_lora_rm(tiny_model_dir, tmp_path_factory.mktemp("rm") / "lora-rm", pairs_file)


@pytest.fixture(scope="module")
def qlora_rm(tmp_path_factory, tiny_model_dir, pairs_file) -> Path:
    folder = tmp_path_factory.mktemp("rm")
    convert(tiny_model_dir, folder / "base-q4", quantize=4, group_size=32)
    return train_lora_rm(folder / "base-q4", folder / "qlora-rm", pairs_file)


def our_rewards(rm: RewardScorer) -> list[float]:
    return rm.score_batch([p for p, _ in ROWS], [a for _, a in ROWS], batch_size=len(ROWS))


def transformers_rewards(folder: Path, rows: list[list[int]], side: str) -> np.ndarray:
    """transformers' rewards for `rows` batched with pad id 0 on `side` (it finds the last real token by the pad id)."""
    model = AutoModelForSequenceClassification.from_pretrained(folder, dtype=torch.float32).eval()
    width = max(map(len, rows))
    pads = [[PAD_TOKEN_ID] * (width - len(row)) for row in rows]
    tokens = [row + pad if side == "right" else pad + row for row, pad in zip(rows, pads, strict=True)]
    mask = [[int(i < len(row)) if side == "right" else int(i >= width - len(row)) for i in range(width)]
            for row in rows]  # fmt: skip
    with torch.no_grad():
        logits = model(torch.tensor(tokens), attention_mask=torch.tensor(mask)).logits
    assert logits.shape == (len(rows), 1)
    return logits[:, 0].numpy()


def assert_rewards_close(ours, theirs, rel: float = 1e-4) -> None:
    ours, theirs = np.asarray(ours), np.asarray(theirs)
    error = float(np.abs(ours - theirs).max())
    assert error <= rel * max(1.0, float(np.abs(theirs).max())), (ours, theirs)


def test_fuse_makes_a_standalone_reward_model_with_the_same_rewards(lora_rm, tmp_path):
    out = tmp_path / "fused"
    result = CliRunner().invoke(cli, ["fuse", str(lora_rm), "--out", str(out)])
    assert result.exit_code == 0, result.output
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlamaForSequenceClassification"] and config["num_labels"] == 1
    assert "base_model" not in config and config["pad_token_id"] == PAD_TOKEN_ID
    assert (out / "tokenizer.model").is_file() and (out / "tokenizer_config.json").is_file()
    stored = mx.load(str(out / "model.safetensors"))
    assert stored["score.weight"].shape == (1, 64)
    assert not any(name.startswith("lm_head") or "lora" in name for name in stored)

    lora, fused = L.load_reward_model(lora_rm), L.load_reward_model(out)
    assert fused.base_path is None
    assert_rewards_close(our_rewards(fused), our_rewards(lora), rel=1e-5)
    # the adapter is in the fused weights: without it (base + trained head) the rewards differ
    without = L.load_reward_model(lora_rm)
    for _, module in without.network.named_modules():
        if isinstance(module, LoRALinear):
            module.lora_b = mx.zeros_like(module.lora_b)
    gap = np.abs(np.array(our_rewards(without)) - our_rewards(lora)).max()
    assert gap > 1e-2 * max(1.0, np.abs(our_rewards(lora)).max()), gap


def test_fuse_flags_and_bad_input(lora_rm, tmp_path, tiny_model_dir):
    runner = CliRunner()
    with_adapter = runner.invoke(
        cli, ["fuse", str(lora_rm), "--adapter", str(lora_rm), "--out", str(tmp_path / "a")]
    )
    assert with_adapter.exit_code == 2 and "drop --adapter" in with_adapter.output
    no_adapter = runner.invoke(cli, ["fuse", str(tiny_model_dir), "--out", str(tmp_path / "b")])
    assert no_adapter.exit_code == 2 and "--adapter" in no_adapter.output
    assert runner.invoke(cli, ["fuse", str(lora_rm), "--out", str(tmp_path / "fused")]).exit_code == 0
    again = runner.invoke(cli, ["fuse", str(tmp_path / "fused"), "--out", str(tmp_path / "c")])
    assert again.exit_code == 1
    assert again.output.strip() == (
        f"error: {tmp_path / 'fused' / 'config.json'}: a standalone reward model (no base_model): "
        "there is no adapter to fuse"
    )
    assert not any((tmp_path / name).exists() for name in "abc")


@pytest.mark.parametrize("form", ["lora", "qlora", "fused", "fused 4-bit"])
def test_export_gives_transformers_our_rewards(form, lora_rm, qlora_rm, tmp_path):
    """LoRA and QLoRA reward models (fused in memory), and standalone ones, float or 4-bit (dequantized)."""
    source = {"lora": lora_rm, "qlora": qlora_rm}.get(form, tmp_path / "fused")
    if form.startswith("fused"):
        lora_form = qlora_rm if form == "fused 4-bit" else lora_rm
        assert CliRunner().invoke(cli, ["fuse", str(lora_form), "--out", str(source)]).exit_code == 0
        assert ("quantization" in json.loads((source / "config.json").read_text())) == (form == "fused 4-bit")
    result = CliRunner().invoke(cli, ["export", str(source), str(tmp_path / "hf"), "--format", "hf"])
    assert result.exit_code == 0, result.output
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["architectures"] == ["LlamaForSequenceClassification"] and config["num_labels"] == 1
    assert (
        config["pad_token_id"] == PAD_TOKEN_ID and "base_model" not in config and "quantization" not in config
    )
    stored = mx.load(str(tmp_path / "hf" / "model.safetensors"))
    assert not any(name.endswith((".scales", ".biases", ".lora_a", ".lora_b")) for name in stored)

    rm = load_reward_model(source)
    ours = our_rewards(rm)
    rows = [rm.encode(prompt, answer) for prompt, answer in ROWS]
    assert len(set(map(len, rows))) == len(rows)  # every batch below is padded
    for side in ("right", "left"):
        assert_rewards_close(ours, transformers_rewards(tmp_path / "hf", rows, side))


def test_export_of_a_lora_reward_model_without_its_base_names_the_file(lora_rm, tmp_path):
    moved = tmp_path / "elsewhere" / "rm"
    shutil.copytree(lora_rm, moved)
    result = CliRunner().invoke(cli, ["export", str(moved), str(tmp_path / "hf")])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert result.output.startswith(f"error: {moved / 'config.json'}: base_model ")
    assert result.output.strip().endswith("is not a model folder") and len(result.output.splitlines()) == 1
    assert not (tmp_path / "hf").exists()


def hf_reward_model(num_labels: int = 1, seed: int = 0) -> LlamaForSequenceClassification:
    """A tiny random LlamaForSequenceClassification, weights larger than the default init so rewards are far from 0."""
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=TOKENIZER_VOCAB, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         rms_norm_eps=1e-5, num_labels=num_labels, pad_token_id=PAD_TOKEN_ID)  # fmt: skip
    model = LlamaForSequenceClassification(config)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            parameter.copy_(torch.randn_like(parameter) * (0.2 if name.endswith("norm.weight") else 0.08))
            if name.endswith("norm.weight"):
                parameter.add_(1.0)
    return model.eval()


@pytest.fixture(scope="module")
def hf_rm_folder(tmp_path_factory, tokenizer_dir) -> Path:
    folder = tmp_path_factory.mktemp("hf-rm") / "hf"
    hf_reward_model().save_pretrained(folder)
    shutil.copy(tokenizer_dir / "tokenizer.model", folder / "tokenizer.model")
    return folder


def test_convert_reads_a_transformers_reward_model(hf_rm_folder, tmp_path):
    stored = mx.load(str(next(hf_rm_folder.glob("*.safetensors"))))
    assert "score.weight" in stored and not any(name.startswith("lm_head") for name in stored)
    result = CliRunner().invoke(cli, ["convert", str(hf_rm_folder), str(tmp_path / "rm")])
    assert result.exit_code == 0, result.output
    config = json.loads((tmp_path / "rm" / "config.json").read_text())
    assert config["architectures"] == ["LlamaForSequenceClassification"] and config["num_labels"] == 1
    assert "base_model" not in config

    rm = L.load_reward_model(tmp_path / "rm")
    rows = [rm.encode(prompt, answer) for prompt, answer in ROWS]
    theirs = transformers_rewards(hf_rm_folder, rows, "right")
    assert np.abs(theirs).max() > 0.5  # rewards far from zero, so the comparison means something
    assert_rewards_close(our_rewards(rm), theirs)


def test_quantized_convert_quantizes_the_backbone_only(hf_rm_folder, tmp_path):
    convert(hf_rm_folder, tmp_path / "q8", quantize=8, group_size=32)
    stored = mx.load(str(tmp_path / "q8" / "model.safetensors"))
    assert stored["score.weight"].dtype == mx.float32 and "score.scales" not in stored
    assert stored["model.layers.0.mlp.down_proj.weight"].dtype == mx.uint32
    assert "model.embed_tokens.scales" in stored
    quantized = L.load_reward_model(tmp_path / "q8")
    rows = [quantized.encode(prompt, answer) for prompt, answer in ROWS]
    theirs = transformers_rewards(hf_rm_folder, rows, "right")
    # 8-bit weights move the rewards a little, not a lot
    error = np.abs(np.array(our_rewards(quantized)) - theirs).max()
    assert 0 < error < 0.05 * np.abs(theirs).max(), error


def test_convert_refuses_other_reward_models(tmp_path, tokenizer_dir, lora_rm):
    two = tmp_path / "two-labels"
    hf_reward_model(num_labels=2).save_pretrained(two)
    with pytest.raises(
        Llama2MLXError, match=r"tensor score.weight has shape \(2, 64\), the config expects \(1, 64\)"
    ):
        convert(two, tmp_path / "out")
    with pytest.raises(
        Llama2MLXError, match=rf"{lora_rm / 'config.json'}: a LoRA reward model .* `llama2-mlx fuse`"
    ):
        convert(lora_rm, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_fuse_of_a_qlora_reward_model_requantizes_the_backbone_unless_dequantize(qlora_rm, tmp_path):
    qlora = our_rewards(L.load_reward_model(qlora_rm))
    for flags, name in (([], "q4"), (["--dequantize"], "float")):
        result = CliRunner().invoke(cli, ["fuse", str(qlora_rm), "--out", str(tmp_path / name), *flags])
        assert result.exit_code == 0, result.output
    stored = mx.load(str(tmp_path / "q4" / "model.safetensors"))
    assert stored["model.layers.0.self_attn.q_proj.weight"].dtype == mx.uint32
    assert stored["score.weight"].dtype == mx.float32
    assert json.loads((tmp_path / "q4" / "config.json").read_text())["quantization"] == {
        "group_size": 32,
        "bits": 4,
    }
    assert "quantization" not in json.loads((tmp_path / "float" / "config.json").read_text())
    assert_rewards_close(our_rewards(L.load_reward_model(tmp_path / "float")), qlora, rel=1e-5)
    # re-quantizing W + BA rounds it again: close to the QLoRA rewards, not equal
    requantized = np.array(our_rewards(L.load_reward_model(tmp_path / "q4")))
    assert 0 < np.abs(requantized - qlora).max() < 0.1 * max(1.0, np.abs(qlora).max())
