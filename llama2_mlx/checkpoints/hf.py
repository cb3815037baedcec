"""Hugging Face Llama folders (`config.json` + `*.safetensors` or `pytorch_model*.bin`), and the rotary row layout.

Our model folders use Hugging Face names and its rotate-half row order for q_proj/k_proj, so an HF folder needs no
permutation; Meta's checkpoints rotate adjacent pairs and are permuted by `meta_to_hf_rows` (LLAMA2_RECIPE.md).
"""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx

from llama2_mlx.checkpoints.checkpoint import Checkpoint
from llama2_mlx.checkpoints.pth import read_pth
from llama2_mlx.config import ModelArgs
from llama2_mlx.errors import Llama2MLXError

IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)  # a buffer some older HF checkpoints saved; recomputed by RoPE


def meta_to_hf_rows(weight: mx.array, n_heads: int) -> mx.array:
    """Reorder wq/wk rows from Meta's adjacent pairs to HF's halves: within a head, row 2i -> i, 2i+1 -> i + d/2."""
    rows, cols = weight.shape
    head_dim = rows // n_heads
    return weight.reshape(n_heads, head_dim // 2, 2, cols).transpose(0, 2, 1, 3).reshape(rows, cols)


def read_hf(folder: Path) -> Checkpoint:
    """An HF Llama folder as a `Checkpoint`; safetensors are preferred when both formats are present."""
    config_path = folder / "config.json"
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as error:
        raise Llama2MLXError(f"{config_path}: not valid JSON ({error})") from None
    args = ModelArgs.from_hf_config(config, source=str(config_path))
    files = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("pytorch_model*.bin"))
    if not files:
        raise Llama2MLXError(f"{folder}: no *.safetensors or pytorch_model*.bin weights found")
    tensors: dict[str, tuple[tuple[int, ...], object]] = {}
    owner: dict[str, Path] = {}
    dtypes: dict[str, mx.Dtype] = {}
    nbytes = 0
    for file in files:
        for name, (shape, dtype, size, loader) in _file_tensors(file).items():
            if name.endswith(IGNORED_SUFFIXES):
                continue
            if name in tensors:
                raise Llama2MLXError(f"{file}: tensor {name} is also in {owner[name].name} (duplicated)")
            tensors[name], owner[name], dtypes[name] = (shape, loader), file, dtype
            nbytes += size
    dtype = dtypes.get("model.norm.weight", mx.float32)
    tokenizer = folder if (folder / "tokenizer.model").is_file() else None
    return Checkpoint(args, tensors, dtype, nbytes, str(folder), tokenizer)


def _file_tensors(file: Path) -> dict[str, tuple[tuple[int, ...], mx.Dtype, int, object]]:
    """name -> (shape, dtype, bytes, loader) for one weights file; nothing is read until a loader runs."""
    if file.suffix == ".bin":
        return {name: (t.shape, t.mx_dtype, t.nbytes, t.load) for name, t in read_pth(file).items()}
    try:
        arrays = mx.load(str(file))  # lazy: each array is read from the file when evaluated
    except Exception as error:  # MLX raises plain RuntimeError/ValueError for unreadable files
        raise Llama2MLXError(f"{file}: cannot read safetensors ({error})") from None
    # pop on load so the evaluated array is not kept alive by this dict
    return {
        name: (tuple(a.shape), a.dtype, a.nbytes, lambda name=name: arrays.pop(name))
        for name, a in arrays.items()
    }
