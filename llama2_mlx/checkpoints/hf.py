"""Hugging Face Llama folders (`config.json` + `*.safetensors` or `pytorch_model*.bin`), and the rotary row layout.

Our model folders use Hugging Face names and its rotate-half row order for q_proj/k_proj, so an HF folder needs no
permutation; Meta's checkpoints rotate adjacent pairs and are permuted by `meta_to_hf_rows` (LLAMA2_RECIPE.md).
Both weight formats are read as `LazyTensor`s: the safetensors header gives each tensor's byte range directly.
"""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx

from llama2_mlx.checkpoints.checkpoint import Checkpoint, TensorSource, row_blocks
from llama2_mlx.checkpoints.pth import LazyTensor, read_pth
from llama2_mlx.checkpoints.safetensors_file import read_safetensors
from llama2_mlx.config import ModelArgs
from llama2_mlx.errors import Llama2MLXError
from llama2_mlx.fileio import read_json
from llama2_mlx.reward_model import ARCHITECTURE as REWARD_ARCHITECTURE

IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)  # a buffer some older HF checkpoints saved; recomputed by RoPE


def meta_to_hf_rows(weight: mx.array, n_heads: int) -> mx.array:
    """Reorder wq/wk rows from Meta's adjacent pairs to HF's halves: within a head, row 2i -> i, 2i+1 -> i + d/2."""
    rows, cols = weight.shape
    head_dim = rows // n_heads
    return weight.reshape(n_heads, head_dim // 2, 2, cols).transpose(0, 2, 1, 3).reshape(rows, cols)


def read_hf(folder: Path) -> Checkpoint:
    """An HF Llama folder as a `Checkpoint`; safetensors are preferred when both formats are present.

    A `LlamaForSequenceClassification` folder (how published Llama 2 reward models are stored) is a reward model.
    """
    config_path = folder / "config.json"
    config = read_json(config_path, "a Hugging Face model folder")
    args = ModelArgs.from_hf_config(config, source=str(config_path))
    if config.get("base_model"):
        raise Llama2MLXError(
            f"{config_path}: a LoRA reward model (an adapter on {config['base_model']}); "
            "make it standalone with `llama2-mlx fuse` first"
        )
    files = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("pytorch_model*.bin"))
    if not files:
        raise Llama2MLXError(f"{folder}: no *.safetensors or pytorch_model*.bin weights found")
    tensors: dict[str, TensorSource] = {}
    owner: dict[str, Path] = {}
    for file in files:
        table = read_pth(file) if file.suffix == ".bin" else read_safetensors(file)
        for name, tensor in table.items():
            if name.endswith(IGNORED_SUFFIXES):
                continue
            if name in tensors:
                raise Llama2MLXError(f"{file}: tensor {name} is also in {owner[name].name} (duplicated)")
            owner[name] = file
            tensors[name] = TensorSource(tensor.shape, tensor.mx_dtype, _blocks(tensor))
    dtype = tensors["model.norm.weight"].dtype if "model.norm.weight" in tensors else mx.float32
    tokenizer = folder if (folder / "tokenizer.model").is_file() else None
    reward_model = REWARD_ARCHITECTURE in (config.get("architectures") or [])
    return Checkpoint(args, tensors, dtype, str(folder), tokenizer, reward_model)


def _blocks(tensor: LazyTensor):
    return lambda rows: row_blocks(tensor.load_rows, tensor.shape[0] if tensor.shape else 1, rows)
