"""`load`: a model folder (plus an optional LoRA adapter folder) to a ready model and its tokenizer."""

from __future__ import annotations

import os
from pathlib import Path

import mlx.core as mx

from llama2_mlx.errors import Llama2MLXError
from llama2_mlx.model import Llama
from llama2_mlx.model_folder import load_model


def load(path: str | os.PathLike, adapter: str | os.PathLike | None = None, dtype: mx.Dtype | None = None):
    """Return `(model, tokenizer)` for an MLX model folder; `adapter` applies a LoRA adapter folder on top."""
    from llama2_mlx.tokenizer import Tokenizer

    folder = Path(path)
    model: Llama = load_model(folder, dtype=dtype)
    if adapter is not None:
        from llama2_mlx.lora import apply_adapter

        apply_adapter(model, Path(adapter))
    if not (folder / "tokenizer.model").is_file():
        raise Llama2MLXError(f"{folder}: missing tokenizer.model")
    tokenizer = Tokenizer(folder / "tokenizer.model")
    tokenizer.check_vocab(model.args.vocab_size, f"the model's embedding ({folder / 'config.json'})")
    return model, tokenizer


def demo_model_path() -> Path:
    """The shipped demo model (`weights/demo` in the checkout); commands that take a model fall back to it."""
    return Path(
        os.environ.get("LLAMA2_MLX_DEMO_MODEL", Path(__file__).resolve().parents[1] / "weights" / "demo")
    )


def demo_reward_model_path() -> Path:
    """The shipped demo reward model (`weights/demo-rm`, an adapter and head on the demo model)."""
    return Path(
        os.environ.get(
            "LLAMA2_MLX_DEMO_REWARD_MODEL", Path(__file__).resolve().parents[1] / "weights" / "demo-rm"
        )
    )
