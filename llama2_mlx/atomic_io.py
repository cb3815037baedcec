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
