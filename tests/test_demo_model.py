"""The shipped demo model (weights/demo): what a newcomer runs first, with no model argument and no download."""

from __future__ import annotations

import json

from click.testing import CliRunner

from llama2_mlx.cli import cli
from llama2_mlx.config import ModelArgs
from llama2_mlx.loading import demo_model_path


def test_shipped_model_is_a_small_gqa_llama():
    folder = demo_model_path()
    args = ModelArgs.from_hf_config(json.loads((folder / "config.json").read_text()))
    assert args.n_kv_heads < args.n_heads  # grouped-query attention, as the issue asks
    assert sum(f.stat().st_size for f in folder.iterdir()) <= 20 * 1024**2


def test_chat_without_a_model_answers_piped_questions(monkeypatch):
    monkeypatch.delenv("LLAMA2_MLX_DEMO_MODEL", raising=False)
    questions = "What is the capital of Quenia?\nAnd Norland?\n"
    result = CliRunner().invoke(cli, ["chat", "--temperature", "0", "--max-tokens", "24"], input=questions)
    assert result.exit_code == 0, result.output
    # a fact from the world's table, then a follow-up that needs the first turn's context; the space before EOS
    # (Meta's "{answer} " + EOS) is part of the answer but not printed
    assert result.stdout == "The capital of Quenia is Ardo.\nThe capital of Norland is Vesk.\n"
