"""`Checkpoint`: what a reader found, in the terms of our model folders, before any weight is read.

Readers (Meta, Hugging Face) check names and shapes up front and describe each tensor by its shape, dtype and a
function yielding it as consecutive blocks of rows, in Hugging Face names and layout. The converter validates
everything first, then streams: no more than a block of any tensor is in memory at once.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx

from llama2_mlx.config import ModelArgs


@dataclass(frozen=True)
class TensorSource:
    shape: tuple[int, ...]
    dtype: mx.Dtype
    # blocks(rows): consecutive row blocks of about `rows` rows (readers may round to whole heads) covering the
    # tensor in order; each block is read (and merged, permuted) only when the iterator reaches it
    blocks: Callable[[int], Iterator[mx.array]]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.size


@dataclass
class Checkpoint:
    args: ModelArgs
    tensors: dict[str, TensorSource]  # by Hugging Face name, in the order they will be written
    dtype: mx.Dtype  # the checkpoint's float dtype (kept on disk unless the user asks for another)
    source: str  # the file or folder named in errors
    tokenizer_dir: Path | None  # the folder holding tokenizer.model (and maybe tokenizer_config.json)
    reward_model: bool = False  # a LlamaForSequenceClassification: `score.weight`, no `lm_head.weight`

    @property
    def nbytes(self) -> int:
        return sum(tensor.nbytes for tensor in self.tensors.values())


def row_blocks(load_rows: Callable[[int, int], mx.array], total_rows: int, rows: int) -> Iterator[mx.array]:
    """Consecutive blocks of `rows` rows from a `load_rows(start, stop)` function."""
    for start in range(0, total_rows, rows):
        yield load_rows(start, min(start + rows, total_rows))
