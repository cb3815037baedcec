"""Single-file atomic writes: write a temporary sibling, then rename it over the target.

A crash or Ctrl-C mid-write leaves the previous file intact (whole folders use `model_folder.atomic_folder`).
"""

from __future__ import annotations

import os
from pathlib import Path

import mlx.core as mx


def write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def save_safetensors_atomic(path: Path, arrays: dict[str, mx.array]) -> None:
    tmp = path.with_name(f".{path.stem}.tmp.safetensors")  # MLX insists on the .safetensors suffix
    mx.save_safetensors(str(tmp), arrays)
    os.replace(tmp, path)


def write_model_files(model, folder: Path, tokenizer_dir: Path | None = None) -> None:
    """Write a model folder's files (config, weights, tokenizer) into an existing run folder, each file atomically.

    A run folder also holds metrics.jsonl and checkpoint/, so `model_folder.save_model` (which replaces a whole
    folder) writes to a temporary sibling whose files are then renamed in.
    """
    import shutil

    from llama2_mlx.model_folder import save_model

    tmp = folder / ".model.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    save_model(model, tmp, tokenizer_dir=tokenizer_dir)
    for path in tmp.iterdir():
        os.replace(path, folder / path.name)
    tmp.rmdir()
