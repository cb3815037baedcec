"""`Checkpoint`: what a reader found, in the terms of our model folders, before any weight is read.

Readers (Meta, Hugging Face) check names and shapes up front and hand back one loader per tensor, in Hugging Face
names and layout, so the converter can validate everything first and then stream the weights one tensor at a time.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx

from llama2_mlx.config import ModelArgs


@dataclass
class Checkpoint:
    args: ModelArgs
    # Hugging Face tensor name -> (shape, a loader that reads, merges and permutes it when called, once)
    tensors: dict[str, tuple[tuple[int, ...], Callable[[], mx.array]]]
    dtype: mx.Dtype  # the checkpoint's float dtype (kept on disk unless the user asks for another)
    nbytes: int  # bytes of weights the loaders will read
    source: str  # the file or folder named in errors
    tokenizer_dir: Path | None  # the folder holding tokenizer.model (and maybe tokenizer_config.json)
