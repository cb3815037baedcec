"""`export`: an MLX model folder back to a Hugging Face folder that `transformers` loads.

Our folders already use Hugging Face names and row layout, so export is a streamed copy: quantized weights are
dequantized (transformers does not read MLX's affine packing), the config loses its "quantization" entry, and the
tokenizer files travel along. Written atomically, like every folder.
"""

from __future__ import annotations

import os
from pathlib import Path

import mlx.core as mx

from llama2_mlx.errors import Llama2MLXError
from llama2_mlx.model_folder import (
    ShardedWriter,
    atomic_folder,
    copy_tokenizer,
    read_config,
    read_weights,
    write_config,
)

FORMATS = ("hf",)


def export(
    model_dir: str | os.PathLike, dst: str | os.PathLike, format: str = "hf", force: bool = False
) -> Path:
    """Write `model_dir` as a Hugging Face Llama folder at `dst` (safetensors, config.json, tokenizer)."""
    if format not in FORMATS:
        raise Llama2MLXError(f"export format {format!r} is not supported; choose one of {', '.join(FORMATS)}")
    folder = Path(model_dir)
    config = read_config(folder)
    weights = read_weights(folder)  # lazy: each tensor is read when evaluated below
    quantization = config.pop("quantization", None)
    quantized = (
        {name.rsplit(".", 1)[0] for name in weights if name.endswith(".scales")} if quantization else set()
    )
    dtype = None
    with atomic_folder(dst, force=force) as tmp:
        with ShardedWriter(tmp) as writer:
            for name in sorted(weights):
                stem, part = name.rsplit(".", 1)
                if stem in quantized and part != "weight":
                    continue  # scales and biases are consumed with their weight
                # popped, so each tensor is freed once written
                array = (
                    _dequantize(weights, stem, quantization, folder)
                    if stem in quantized
                    else weights.pop(name)
                )
                mx.eval(array)
                dtype = dtype or (array.dtype if mx.issubdtype(array.dtype, mx.floating) else None)
                writer.add(name, array)
                del array
        config["torch_dtype"] = str(dtype or mx.float32).rsplit(".", 1)[-1]
        write_config(tmp, config)
        copy_tokenizer(folder, tmp)
    return Path(dst)


def _dequantize(weights: dict[str, mx.array], stem: str, quantization: dict, folder: Path) -> mx.array:
    """MLX affine weights back to floats in the scales' dtype; the three arrays are dropped from `weights`."""
    for part in ("weight", "scales", "biases"):
        if f"{stem}.{part}" not in weights:
            raise Llama2MLXError(f"{folder}: quantized layer {stem} lacks {stem}.{part}")
    weight, scales, biases = (weights.pop(f"{stem}.{part}") for part in ("weight", "scales", "biases"))
    return mx.dequantize(weight, scales, biases, quantization["group_size"], quantization["bits"])
