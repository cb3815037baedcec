"""`export`: an MLX model folder back to a Hugging Face folder that `transformers` loads.

Our folders already use Hugging Face names and row layout, so export is a streamed copy: quantized weights are
dequantized (transformers does not read MLX's affine packing), the config loses its "quantization" entry, and the
tokenizer files travel along. One tensor is in memory at a time; the folder is written atomically. A LoRA reward
model (base + adapter + head) is the exception: it is loaded and fused in memory first, in the compute dtype.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten

from llama2_mlx.checkpoints.convert import Progress
from llama2_mlx.config import ModelArgs
from llama2_mlx.destination import atomic_folder
from llama2_mlx.errors import Llama2MLXError
from llama2_mlx.model_folder import (
    build_model,
    check_weights,
    copy_tokenizer,
    read_config,
    read_quantization,
    read_weights,
    write_config,
)
from llama2_mlx.reward_model import build_reward_model, fused_reward_model, is_reward_folder, reward_config
from llama2_mlx.shard_writer import Entry, ShardWriter

FORMATS = ("hf",)


def export(
    model_dir: str | os.PathLike,
    dst: str | os.PathLike,
    format: str = "hf",
    force: bool = False,
    progress: Progress | None = None,
) -> Path:
    """Write `model_dir` as a Hugging Face Llama folder at `dst` (safetensors, config.json, tokenizer);
    `progress(tensor, bytes written, total bytes)` follows the writing.

    A reward-model folder becomes a `LlamaForSequenceClassification` folder (`score.weight`, `num_labels` 1, and
    `pad_token_id` by which transformers finds each row's last real token); a LoRA one is fused first, in memory.
    """
    if format not in FORMATS:
        raise Llama2MLXError(f"export format {format!r} is not supported; choose one of {', '.join(FORMATS)}")
    folder = Path(model_dir)
    config = read_config(folder)
    source = str(folder / "config.json")
    tokenizer_dir = folder
    if config.get("base_model") and is_reward_folder(folder):
        # a LoRA reward model: its adapter is fused in memory (in float, so the rewards stay those it computes)
        scorer = fused_reward_model(folder, dequantize=True)
        config = {**scorer.network.args.to_hf_config(), **reward_config(scorer.network.args)}
        weights, tokenizer_dir = dict(tree_flatten(scorer.network.parameters())), scorer.tokenizer_dir
        quantization = None
        del scorer
    else:
        quantization = read_quantization(config, source)
        config.pop("quantization", None)
        weights = read_weights(folder)  # lazy: each tensor is read when evaluated below
        # every tensor the config implies, no other, right shapes: an incomplete folder is not exported
        build = build_reward_model if is_reward_folder(folder) else build_model
        check_weights(build(ModelArgs.from_hf_config(config, source), quantization), weights, str(folder))
    quantized = {name[: -len(".scales")] for name in weights if name.endswith(".scales")}
    if quantized and not quantization:
        raise Llama2MLXError(f'{folder / "config.json"}: quantized tensors but no "quantization" entry')
    outputs = [
        _output(name, weights, quantized, quantization, folder)
        for name in sorted(weights)
        if _kept(name, quantized)
    ]
    with atomic_folder(dst, force=force, inputs=[folder]) as tmp:
        total = sum(math.prod(shape) * dtype.size for _, shape, dtype in outputs)
        done = 0
        with ShardWriter(tmp, [[entry] for entry in outputs]) as writer:
            for name, _, _ in outputs:
                stem = name.rsplit(".", 1)[0]
                # popped, so each tensor is freed once written
                array = _dequantize(weights, stem, quantization) if stem in quantized else weights.pop(name)
                mx.eval(array)
                writer.write(name, array)
                done += array.nbytes
                del array
                if progress is not None:
                    progress(name, done, total)
        float_dtypes = [dtype for _, _, dtype in outputs if mx.issubdtype(dtype, mx.floating)]
        config["torch_dtype"] = str(float_dtypes[0] if float_dtypes else mx.float32).rsplit(".", 1)[-1]
        write_config(tmp, config)
        copy_tokenizer(tokenizer_dir, tmp)
    return Path(dst)


def _kept(name: str, quantized: set[str]) -> bool:
    """Every tensor but the scales and biases of quantized layers, which are folded into their weight."""
    stem, part = name.rsplit(".", 1)
    return stem not in quantized or part == "weight"


def _output(
    name: str, weights: dict[str, mx.array], quantized: set[str], quantization: dict | None, folder: Path
) -> Entry:
    """(name, shape, dtype) of an exported tensor: a dequantized weight has `32 / bits` values per uint32 word."""
    stem = name.rsplit(".", 1)[0]
    if stem not in quantized:
        return (name, tuple(weights[name].shape), weights[name].dtype)
    for part in ("scales", "biases"):
        if f"{stem}.{part}" not in weights:
            raise Llama2MLXError(f"{folder}: quantized layer {stem} lacks {stem}.{part}")
    rows, words = weights[name].shape
    return (name, (rows, words * 32 // quantization["bits"]), weights[f"{stem}.scales"].dtype)


def _dequantize(weights: dict[str, mx.array], stem: str, quantization: dict) -> mx.array:
    """MLX affine weights back to floats in the scales' dtype; the three arrays are dropped from `weights`."""
    weight, scales, biases = (weights.pop(f"{stem}.{part}") for part in ("weight", "scales", "biases"))
    return mx.dequantize(weight, scales, biases, quantization["group_size"], quantization["bits"])
