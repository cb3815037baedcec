"""llama2-mlx: the Llama 2 recipe (model, converters, chat, SFT, reward model, rejection sampling) in MLX.

The public API (DESIGN.md, "Public Python API") is re-exported here. Imports are lazy so that `import llama2_mlx`
and the CLI's `--help` stay fast.
"""

from __future__ import annotations

import importlib
from typing import Any

from llama2_mlx import openblas

openblas.preload()  # before anything imports mlx.core: MLX's Linux wheel then calls OpenBLAS (see openblas.py)

__version__ = "0.1.0"

# public name -> module that defines it
_PUBLIC = {
    "ModelArgs": "llama2_mlx.config",
    "Llama": "llama2_mlx.model",
    "KVCache": "llama2_mlx.cache",
    "load": "llama2_mlx.loading",
    "load_model": "llama2_mlx.model_folder",
    "save_model": "llama2_mlx.model_folder",
    "Llama2MLXError": "llama2_mlx.errors",
    "convert": "llama2_mlx.checkpoints.convert",
    "export": "llama2_mlx.checkpoints.export",
    "Tokenizer": "llama2_mlx.tokenizer",
    "generate": "llama2_mlx.generation",
    "load_reward_model": "llama2_mlx.reward_model",
    "RewardModel": "llama2_mlx.reward_model",
}

__all__ = sorted(_PUBLIC)


def __getattr__(name: str) -> Any:
    if name in _PUBLIC:
        return getattr(importlib.import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'llama2_mlx' has no attribute {name!r}")
