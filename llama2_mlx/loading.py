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
    """The shipped demo model, which commands that take a model fall back to: $LLAMA2_MLX_DEMO_MODEL if set, else
    `weights/demo` in a checkout, else the copy a wheel or `pip install .` puts inside the package."""
    if "LLAMA2_MLX_DEMO_MODEL" in os.environ:
        return Path(os.environ["LLAMA2_MLX_DEMO_MODEL"])
    package = Path(__file__).resolve().parent
    checkout = package.parent / "weights" / "demo"
    return checkout if checkout.is_dir() else package / "demo_model"


def demo_reward_model_path() -> Path:
    """The shipped demo reward model (an adapter and head on the demo model): $LLAMA2_MLX_DEMO_REWARD_MODEL if set,
    else `weights/demo-rm` in a checkout, else the copy inside the installed package."""
    if "LLAMA2_MLX_DEMO_REWARD_MODEL" in os.environ:
        return Path(os.environ["LLAMA2_MLX_DEMO_REWARD_MODEL"])
    package = Path(__file__).resolve().parent
    checkout = package.parent / "weights" / "demo-rm"
    return checkout if checkout.is_dir() else package / "demo_reward_model"
