"""Shared fixtures: a small sentencepiece tokenizer trained here, and tiny random model folders."""

from __future__ import annotations

import random
from pathlib import Path

import mlx.core as mx
import pytest

from llama2_mlx.config import ModelArgs
from llama2_mlx.model import Llama
from llama2_mlx.model_folder import save_model
from llama2_mlx.tokenizer_training import train_tokenizer

TOKENIZER_VOCAB = 384


def _corpus() -> list[str]:
    rng = random.Random(0)
    words = (
        "the a quick brown fox jumps over lazy dog hello world what is answer speak in french bonjour "
        "monde sort list count letters capital question napoleon tennis plus minus times equals".split()
    )
    lines = [" ".join(rng.choice(words) for _ in range(rng.randint(3, 12))) for _ in range(400)]
    lines += [f"{a} + {b} = {a + b}" for a, b in zip(range(0, 400, 7), range(3, 600, 11), strict=False)]
    lines += ["Emoji: 😀 🎉 café naïve 日本語 — “quotes”", "[INST] <<SYS>> <</SYS>> [/INST]"]
    return lines


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    """A folder holding tokenizer.model: BPE with Llama 2's settings (byte fallback, split digits)."""
    out = tmp_path_factory.mktemp("tokenizer")
    train_tokenizer(_corpus(), TOKENIZER_VOCAB, out)
    return out


def tiny_args(**overrides) -> ModelArgs:
    """A tiny GQA model whose vocabulary matches the test tokenizer."""
    fields = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=TOKENIZER_VOCAB, hidden_dim=160,
                  max_seq_len=512)  # fmt: skip
    fields.update(overrides)
    return ModelArgs(**fields)


def random_model(args: ModelArgs, seed: int = 0) -> Llama:
    """A model with random weights large enough that logits are not all near zero."""
    mx.random.seed(seed)
    model = Llama(args)
    mx.eval(model.parameters())
    return model


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer_dir) -> Path:
    """A complete model folder (config.json, model.safetensors, tokenizer) with a tiny random GQA model."""
    out = tmp_path_factory.mktemp("models") / "tiny"
    save_model(random_model(tiny_args()), out, tokenizer_dir=tokenizer_dir)
    return out


def arithmetic_prompts(path: Path, count: int, seed: int = 5) -> Path:
    """A prompts .jsonl of the world's arithmetic questions (rejection sampling and PPO with the world verifier)."""
    import json

    from llama2_mlx.world.skills import draw_task

    rng = random.Random(seed)
    lines = [json.dumps({"prompt": draw_task("arithmetic", rng).question}) + "\n" for _ in range(count)]
    path.write_text("".join(lines))
    return path
