"""MLX model folders (DESIGN.md "Formats"): config.json with Hugging Face keys, safetensors shards, tokenizer.

The same layout mlx-lm reads. Folders are written through `destination.atomic_folder`, so an interrupted write
never leaves a half-written model where a good one was.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from llama2_mlx.chat_template import with_chat_template
from llama2_mlx.config import ModelArgs
from llama2_mlx.destination import atomic_folder
from llama2_mlx.errors import Llama2MLXError
from llama2_mlx.fileio import read_json
from llama2_mlx.model import Llama
from llama2_mlx.shard_writer import DEFAULT_SHARD_BYTES, Entry, ShardWriter

DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}
WEIGHT_DTYPES = ("float32", "float16", "bfloat16", "uint32")  # uint32: packed quantized weights
TOKENIZER_FILES = (
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.json",
    "chat_template.jinja",
)


def default_dtype(checkpoint_dtype: mx.Dtype = mx.bfloat16) -> mx.Dtype:
    """float32 on the CPU backend (its half-precision matmuls are several times slower), else the checkpoint's."""
    if mx.default_device() == mx.cpu:
        return mx.float32
    return checkpoint_dtype if checkpoint_dtype in (mx.float16, mx.bfloat16) else mx.float32


def parse_dtype(name: str | None) -> mx.Dtype | None:
    if name is None:
        return None
    if name not in DTYPES:
        raise Llama2MLXError(f"unknown dtype {name!r}; choose one of {', '.join(DTYPES)}")
    return DTYPES[name]


def read_config(folder: Path) -> dict:
    path = folder / "config.json"
    if not folder.is_dir():
        raise Llama2MLXError(f"{folder}: no such model folder")
    return read_json(path, "a model folder")


def read_weights(folder: Path) -> dict[str, mx.array]:
    """All tensors of a folder's safetensors files (memory-mapped by MLX; read when used), headers checked."""
    from llama2_mlx.checkpoints.safetensors_file import load_safetensors

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise Llama2MLXError(f"{folder}: no *.safetensors weights found")
    weights: dict[str, mx.array] = {}
    for file in files:
        weights.update(load_safetensors(file, WEIGHT_DTYPES))
    return weights


QUANTIZATION = {"group_size": (32, 64, 128), "bits": (2, 3, 4, 6, 8)}


def read_quantization(config: dict, source: str) -> dict | None:
    """config.json's "quantization" entry (mlx-lm's), checked: None, or {"group_size": 32|64|128, "bits": ...}."""
    entry = config.get("quantization")
    if entry is None:
        return None
    if not isinstance(entry, dict):
        raise Llama2MLXError(f"{source}: 'quantization' must be an object, got {entry!r:.60}")
    for key, allowed in QUANTIZATION.items():
        value = entry.get(key)
        if isinstance(value, bool) or value not in allowed:
            raise Llama2MLXError(
                f"{source}: 'quantization.{key}' must be one of {', '.join(map(str, allowed))}, got {value!r:.60}"
            )
    return {key: entry[key] for key in QUANTIZATION}


def build_model(args: ModelArgs, quantization: dict | None = None) -> Llama:
    """An uninitialised-weight model of this shape, quantized in mlx-lm's layout when `quantization` is given."""
    model = Llama(args)
    if quantization:
        nn.quantize(model, group_size=quantization["group_size"], bits=quantization["bits"])
    return model


def check_weights(model: nn.Module, weights: dict[str, mx.array], source: str) -> None:
    """Missing, unexpected or mis-shaped tensors -> one error naming the tensor and both shapes."""
    expected = dict(tree_flatten(model.parameters()))
    missing = sorted(set(expected) - set(weights))
    if missing:
        raise Llama2MLXError(
            f"{source}: missing tensor {missing[0]}"
            + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
        )
    unexpected = sorted(set(weights) - set(expected))
    if unexpected:
        raise Llama2MLXError(
            f"{source}: unexpected tensor {unexpected[0]}"
            + (f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else "")
        )
    for name, array in sorted(weights.items()):
        if tuple(array.shape) != tuple(expected[name].shape):
            raise Llama2MLXError(
                f"{source}: tensor {name} has shape {tuple(array.shape)}, the config expects {tuple(expected[name].shape)}"
            )


def load_model(path: str | os.PathLike, dtype: mx.Dtype | None = None, lazy: bool = False) -> Llama:
    """Read a model folder into a `Llama`. Float weights are cast to `dtype` (default: `default_dtype`)."""
    folder = Path(path)
    config = read_config(folder)
    args = ModelArgs.from_hf_config(config, source=str(folder / "config.json"))
    model = build_model(args, read_quantization(config, str(folder / "config.json")))
    return fill_model(model, read_weights(folder), str(folder), dtype, lazy)


def fill_model(
    model: nn.Module,
    weights: dict[str, mx.array],
    source: str,
    dtype: mx.Dtype | None = None,
    lazy: bool = False,
) -> nn.Module:
    """Check `weights` against `model` (every tensor, by name and shape) and load them into it, in eval mode.

    Every float tensor (quantized layers' scales and biases too) follows the compute dtype `dtype` (default:
    `default_dtype` of the checkpoint's); packed uint32 stays. Arrays already in that dtype are loaded as they
    are, not copied, so two models filled from one dict share their memory.
    """
    weights = {k: v for k, v in weights.items() if not k.endswith("rotary_emb.inv_freq")}
    check_weights(model, weights, source)
    float_dtype = next((v.dtype for k, v in weights.items() if k.endswith("norm.weight")), mx.float32)
    target = dtype or default_dtype(float_dtype)
    weights = {k: v.astype(target) if _is_float(v) and v.dtype != target else v for k, v in weights.items()}
    model.load_weights(list(weights.items()))
    if not lazy:
        mx.eval(model.parameters())
    model.eval()
    return model


def save_model(
    model: Llama,
    path: str | os.PathLike,
    tokenizer_dir: str | os.PathLike | None = None,
    dtype: mx.Dtype | None = None,
    force: bool = False,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    config_extra: dict | None = None,
    progress: Callable[[str, int, int], None] | None = None,
) -> Path:
    """Write `model` as a model folder (config.json, safetensors, tokenizer files copied from `tokenizer_dir`);
    `progress(tensor, bytes written, total bytes)` follows the writing.

    `config_extra` adds or replaces config.json keys (a reward model's architecture and label count).
    """
    with atomic_folder(path, force=force, inputs=[tokenizer_dir]) as tmp:
        write_model_folder(model, tmp, tokenizer_dir, dtype, max_shard_bytes, config_extra, progress)
    return Path(path)


def write_model_folder(
    model: Llama,
    folder: Path,
    tokenizer_dir: str | os.PathLike | None = None,
    dtype: mx.Dtype | None = None,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    config_extra: dict | None = None,
    progress: Callable[[str, int, int], None] | None = None,
) -> None:
    """The files of a model folder, written into `folder` (a temporary one: callers publish it atomically);
    `progress(tensor, bytes written, total bytes)` follows the writing."""
    weights = dict(tree_flatten(model.parameters()))
    if not all(mx.all(mx.isfinite(v)).item() for v in weights.values() if _is_float(v)):
        raise Llama2MLXError(f"{folder}: refusing to write a model with non-finite (nan/inf) weights")
    for name, array in weights.items():
        if dtype is not None and _is_float(array) and not _is_quant_tensor(name, weights):
            weights[name] = array.astype(dtype)
    groups: dict[str, list[Entry]] = {}  # a module's tensors (a quantized weight's scales too) share a shard
    for name, array in weights.items():
        groups.setdefault(name.rsplit(".", 1)[0], []).append((name, tuple(array.shape), array.dtype))
    total, done = sum(array.nbytes for array in weights.values()), 0
    with ShardWriter(folder, list(groups.values()), max_shard_bytes) as writer:
        for name, array in weights.items():
            writer.add(name, array)
            done += array.nbytes
            if progress is not None:
                progress(name, done, total)
    config = {**model.args.to_hf_config(), **(config_extra or {})}
    quantization = quantization_of(model)
    if quantization:
        config["quantization"] = quantization
    write_config(folder, config)
    if tokenizer_dir is not None:
        copy_tokenizer(Path(tokenizer_dir), folder)


def write_config(folder: Path, config: dict) -> None:
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")


def copy_tokenizer(source: Path, folder: Path) -> None:
    """Copy the tokenizer files; the folder's tokenizer_config.json gets Llama 2's chat template if it has none."""
    for name in TOKENIZER_FILES:
        if (source / name).is_file():
            shutil.copy2(source / name, folder / name)
    if (folder / "tokenizer_config.json").exists():
        config = read_json(folder / "tokenizer_config.json", "a tokenizer config")
        if not (folder / "chat_template.jinja").exists() and not config.get("chat_template"):
            _write_tokenizer_config(folder, with_chat_template(config))
    elif (folder / "tokenizer.model").exists():
        write_tokenizer_config(folder)


def write_tokenizer_config(folder: Path) -> None:
    """The tokenizer_config.json that lets transformers and mlx-lm open our tokenizer and apply its chat format."""
    config = {
        "tokenizer_class": "LlamaTokenizer",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "add_bos_token": True,
        "add_eos_token": False,
        "legacy": True,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 4096,
    }
    _write_tokenizer_config(folder, with_chat_template(config))


def _write_tokenizer_config(folder: Path, config: dict) -> None:
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")


def quantization_of(model: nn.Module) -> dict | None:
    for _, module in model.named_modules():
        if isinstance(module, nn.QuantizedLinear | nn.QuantizedEmbedding):
            return {"group_size": module.group_size, "bits": module.bits}
    return None


def _is_float(array: mx.array) -> bool:
    return mx.issubdtype(array.dtype, mx.floating)


def _is_quant_tensor(name: str, weights: dict[str, mx.array]) -> bool:
    """Quantized weights are uint32; their scales/biases keep their dtype when casting the rest."""
    stem = name.rsplit(".", 1)[0]
    return f"{stem}.scales" in weights
