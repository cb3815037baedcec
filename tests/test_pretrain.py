"""Pretraining from random weights on the shared loop: validation loss falls; the output is a model folder."""

from __future__ import annotations

import json
import sys

import mlx.core as mx
import numpy as np
import pytest
from click.testing import CliRunner

from llama2_mlx.cli import cli
from llama2_mlx.errors import Llama2MLXError
from llama2_mlx.loading import load
from llama2_mlx.pretrain import model_args_for


def corpus(n: int, seed: int) -> str:
    """Documents with structure a tiny model learns in a few steps: counting and sums."""
    rng = np.random.default_rng(seed)
    lines = []
    for _ in range(n):
        a = int(rng.integers(0, 20))
        lines.append(" ".join(str(a + i) for i in range(8)) + f" the quick brown fox {a} + 1 = {a + 1}")
    return "\n".join(lines) + "\n"


def test_pretrain_cli_lowers_validation_loss_and_writes_a_model_folder(tmp_path, tokenizer_dir):
    (tmp_path / "train.txt").write_text(corpus(200, 0))
    (tmp_path / "valid.txt").write_text(corpus(20, 1))
    (tmp_path / "params.json").write_text(json.dumps(
        {"dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "multiple_of": 32, "norm_eps": 1e-5,
         "vocab_size": -1}))  # fmt: skip
    out = tmp_path / "model"
    args = ["pretrain", "--config", str(tmp_path / "params.json"), "--data", str(tmp_path / "train.txt"),
            "--valid", str(tmp_path / "valid.txt"), "--tokenizer", str(tokenizer_dir), "--out", str(out),
            "--seq-len", "64", "--batch-size", "8", "--iters", "30", "--lr", "3e-3", "--eval-every", "15",
            "--save-every", "15", "--report-every", "1", "--no-progress"]  # fmt: skip
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    vals = [r["val_loss"] for r in records if "val_loss" in r]
    assert len(vals) == 3 and vals[0] > 5.5 and vals[-1] < vals[0] - 2.0  # ln(384) = 5.95 at random init
    lrs = [r["lr"] for r in records if "lr" in r]  # warmup = 10% of 30 steps, then cosine to 10% of the peak
    assert lrs[:4] == pytest.approx([1e-3, 2e-3, 3e-3, 3e-3]) and lrs[-1] == pytest.approx(3e-4)

    model, tok = load(out)
    assert model.args.dim == 64 and model.args.n_kv_heads == 2 and model.args.vocab_size == tok.vocab_size
    assert model.args.hidden_dim == 192  # Meta's rounding: int(2 * 256 / 3) = 170 -> multiple of 32

    plot = CliRunner().invoke(cli, ["plot", str(out)])
    assert plot.exit_code == 0, plot.output
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_model_config_sources(tmp_path):
    assert model_args_for("tiny-gqa", 384).n_kv_heads == 2 and model_args_for("tiny", 100).vocab_size == 100
    with pytest.raises(Llama2MLXError, match="unknown model preset 'small'"):
        model_args_for("small", 384)


def test_bad_corpus_line(tmp_path, tokenizer_dir):
    (tmp_path / "c.jsonl").write_text('{"text": "fine"}\n{"txt": "x"}\n')
    args = ["pretrain", "--config", "tiny", "--data", str(tmp_path / "c.jsonl"), "--tokenizer",
            str(tokenizer_dir / "tokenizer.model"), "--out", str(tmp_path / "o")]  # fmt: skip
    result = CliRunner().invoke(cli, args)
    assert (
        result.exit_code == 1
        and f'{tmp_path / "c.jsonl"}:2: expected an object with a string "text"' in result.output
    )


def test_plot_without_matplotlib_says_what_to_install(tmp_path, monkeypatch):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n')
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    result = CliRunner().invoke(cli, ["plot", str(tmp_path)])
    assert result.exit_code == 1
    assert result.output.strip() == "error: plotting needs matplotlib: pip install matplotlib"


@pytest.fixture(scope="module")
def pretrained_from_32000_vocab_config(tmp_path_factory, tokenizer_dir):
    """One pretraining step of a model whose config.json says 32000 tokens, with --init-std 0.05."""
    from llama2_mlx.config import ModelArgs

    folder = tmp_path_factory.mktemp("pretrain")
    hf_config = ModelArgs(
        dim=32, n_layers=1, n_heads=2, n_kv_heads=2, vocab_size=32000, hidden_dim=64
    ).to_hf_config()
    (folder / "config.json").write_text(json.dumps(hf_config))
    (folder / "train.txt").write_text(corpus(20, 0))
    args = ["pretrain", "--config", str(folder / "config.json"), "--data", str(folder / "train.txt"),
            "--tokenizer", str(tokenizer_dir), "--out", str(folder / "m"), "--seq-len", "32", "--batch-size", "2",
            "--iters", "1", "--lr", "1e-5", "--valid-fraction", "0", "--init-std", "0.05", "--no-progress"]  # fmt: skip
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    return load(folder / "m")


def test_tokenizer_vocab_drives_the_model(pretrained_from_32000_vocab_config):
    """A config.json written for Llama 2's 32000-token vocabulary, pretrained with our 384-token tokenizer: the
    model's embedding, output layer and logits have the tokenizer's 384 rows.

    Guards against: pretraining keeping a config.json's vocab_size instead of the tokenizer's (every id above
    the tokenizer's range would be an untrainable row, and the folder would not match its tokenizer).
    """
    model, tok = pretrained_from_32000_vocab_config
    assert tok.vocab_size == 384 == model.args.vocab_size
    assert model.model.embed_tokens.weight.shape == (384, 32) and model.lm_head.weight.shape == (384, 32)
    assert model(mx.array([tok.encode("the quick brown fox")])).shape[-1] == 384


def test_init_std_sets_the_spread_of_every_matrix(pretrained_from_32000_vocab_config):
    """--init-std 0.05 (one step at lr 1e-5 later): every matrix has mean 0 and std 0.05, every norm weight is 1.

    Guards against: --init-std ignored (the default 0.02 used), or the norms initialised like the matrices.
    """
    from mlx.utils import tree_flatten

    model, _ = pretrained_from_32000_vocab_config
    for name, weight in tree_flatten(model.parameters()):
        values = np.array(weight)
        if weight.ndim == 2:
            assert abs(values.std() - 0.05) < 0.004 and abs(values.mean()) < 0.004, name
        else:
            np.testing.assert_allclose(values, 1.0, atol=1e-3, err_msg=name)
