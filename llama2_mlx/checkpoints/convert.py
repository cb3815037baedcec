"""`convert`: a Meta folder, a Hugging Face folder or a hub id into an MLX model folder, one tensor at a time.

Everything that can be checked from metadata (names, shapes, shard counts, vocab) is checked before any weight is
read. The output shards are then laid out, and each tensor streams through in blocks of rows: read, merged,
permuted, cast (and quantized), written at its place in its shard, dropped. Peak memory is a few blocks, not the
model nor a shard. The folder is written atomically.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten

from llama2_mlx.checkpoints.checkpoint import Checkpoint, TensorSource
from llama2_mlx.checkpoints.hf import read_hf
from llama2_mlx.checkpoints.hub import resolve
from llama2_mlx.checkpoints.meta import is_meta_folder, read_meta
from llama2_mlx.config import ModelArgs
from llama2_mlx.destination import atomic_folder
from llama2_mlx.errors import Llama2MLXError
from llama2_mlx.model_folder import (
    build_model,
    copy_tokenizer,
    write_config,
)
from llama2_mlx.reward_model import build_reward_model, reward_config
from llama2_mlx.shard_writer import DEFAULT_SHARD_BYTES, Entry, ShardWriter

QUANTIZE_BITS = (4, 8)
GROUP_SIZES = (32, 64, 128)
BLOCK_BYTES = 16 * 2**20  # rows are read, merged, cast and written in blocks of about this size

# progress(tensor name, bytes read so far, total bytes to read)
Progress = Callable[[str, int, int], None]


@dataclass(frozen=True)
class ConvertResult:
    """What `convert` wrote, for the one-line summary."""

    path: Path
    parameters: int
    dtype: str
    quantization: dict | None
    bytes_on_disk: int
    seconds: float


def open_checkpoint(src: str | os.PathLike, verify: bool = False) -> Checkpoint:
    """Dispatch on what `src` is: a Meta folder, a Hugging Face folder, or a hub id (downloaded first)."""
    folder = resolve(src)
    if not folder.is_dir():
        raise Llama2MLXError(
            f"{folder}: not a folder; give a Meta or Hugging Face checkpoint folder or a hub id"
        )
    if (folder / "config.json").is_file() and not is_meta_folder(folder):
        if verify:
            raise Llama2MLXError(
                f"{folder}: --verify checks Meta's checklist.chk; this is a Hugging Face folder"
            )
        return read_hf(folder)
    if is_meta_folder(folder):
        return read_meta(folder, verify=verify)
    raise Llama2MLXError(
        f"{folder}: neither a Meta checkpoint (params.json + consolidated.*.pth) "
        "nor a Hugging Face one (config.json + *.safetensors)"
    )


def convert(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    dtype: mx.Dtype | str | None = None,
    quantize: int | None = None,
    group_size: int | None = None,
    force: bool = False,
    verify: bool = False,
    progress: Progress | None = None,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
) -> ConvertResult:
    """Convert `src` into the MLX model folder `dst`.

    `dtype` defaults to the checkpoint's own float dtype (bf16 stays bf16 on disk; `load_model` casts for the
    device). `quantize` = 4 or 8 bits stores MLX affine-quantized weights in mlx-lm's layout, in groups of
    `group_size` (default: 64, or the largest of 128 and 32 that divides the layers' input widths).
    """
    start = time.perf_counter()
    target = _parse_dtype(dtype)
    quantization = _quantization(quantize, group_size)
    done = 0
    # first, so an existing or busy DST fails before any download or md5 sum
    with atomic_folder(dst, force=force, inputs=[src]) as tmp:
        checkpoint = open_checkpoint(src, verify)
        quantization = _fit_group_size(quantization, checkpoint)
        _check_tensors(checkpoint, _model_parameters(checkpoint, None))
        _check_tokenizer(checkpoint)
        quantized = _model_parameters(checkpoint, quantization) if quantization else {}
        plan = {
            name: _outputs(name, tensor, target, quantized) for name, tensor in checkpoint.tensors.items()
        }
        with ShardWriter(tmp, list(plan.values()), max_shard_bytes) as writer:
            for name, tensor in checkpoint.tensors.items():
                rows = max(1, BLOCK_BYTES * tensor.shape[0] // max(1, tensor.nbytes)) if tensor.shape else 1
                for block in tensor.blocks(rows):
                    done += block.nbytes
                    if target is not None and mx.issubdtype(block.dtype, mx.floating):
                        block = block.astype(target)
                    parts = mx.quantize(block, **quantization) if len(plan[name]) == 3 else (block,)
                    mx.eval(*parts)
                    for (out_name, _, _), part in zip(plan[name], parts, strict=True):
                        writer.write(out_name, part)
                    del block, parts
                    if progress is not None:
                        progress(name, done, checkpoint.nbytes)
        final_dtype = target or checkpoint.dtype
        config = checkpoint.args.to_hf_config() | {"torch_dtype": _dtype_name(final_dtype)}
        if checkpoint.reward_model:
            config |= reward_config(checkpoint.args)
        if quantization:
            config["quantization"] = quantization
        write_config(tmp, config)
        if checkpoint.tokenizer_dir is not None:
            copy_tokenizer(checkpoint.tokenizer_dir, tmp)
    path = Path(dst)
    size = sum(file.stat().st_size for file in path.iterdir() if file.is_file())
    parameters = sum(math.prod(tensor.shape) for tensor in checkpoint.tensors.values())
    return ConvertResult(
        path, parameters, _dtype_name(final_dtype), quantization, size, time.perf_counter() - start
    )


def _outputs(
    name: str, tensor: TensorSource, target: mx.Dtype | None, quantized: dict[str, mx.array]
) -> list[Entry]:
    """The tensor(s) one checkpoint tensor becomes: itself (cast), or a quantized weight with its scales and biases."""
    dtype = target if target is not None and mx.issubdtype(tensor.dtype, mx.floating) else tensor.dtype
    stem = name.rsplit(".", 1)[0]
    if f"{stem}.scales" not in quantized:
        return [(name, tensor.shape, dtype)]
    # mx.quantize returns the packed uint32 weight, then scales and biases in the weight's dtype
    return [(f"{stem}.{part}", tuple(quantized[f"{stem}.{part}"].shape), mx.uint32 if part == "weight" else dtype)
            for part in ("weight", "scales", "biases")]  # fmt: skip


def _parse_dtype(dtype: mx.Dtype | str | None) -> mx.Dtype | None:
    from llama2_mlx.model_folder import parse_dtype

    return parse_dtype(dtype) if isinstance(dtype, str) else dtype


def _quantization(bits: int | None, group_size: int | None) -> dict | None:
    if bits is None:
        return None
    if bits not in QUANTIZE_BITS:
        raise Llama2MLXError(f"quantize: {bits} bits is not supported; choose 4 or 8")
    if group_size is not None and group_size not in GROUP_SIZES:
        raise Llama2MLXError(f"group size {group_size} is not supported; choose 32, 64 or 128")
    return {"group_size": group_size, "bits": bits}


def fitting_group_sizes(args: ModelArgs) -> list[int]:
    """The group sizes that divide the input width of every quantized layer (the model width, and the feed-forward
    width for down_proj): MLX quantizes each row in groups."""
    return [size for size in GROUP_SIZES if args.dim % size == 0 and args.hidden_dim % size == 0]


def _fit_group_size(quantization: dict | None, checkpoint: Checkpoint) -> dict | None:
    """The default group size (64, else the largest that fits) or the requested one, if it fits the layers."""
    if quantization is None:
        return None
    fitting = fitting_group_sizes(checkpoint.args)
    widths = f"model width {checkpoint.args.dim}, feed-forward width {checkpoint.args.hidden_dim}"
    if not fitting:
        raise Llama2MLXError(
            f"{checkpoint.source}: no group size of 32, 64 or 128 divides the layers ({widths})"
        )
    if quantization["group_size"] is None:
        return quantization | {"group_size": 64 if 64 in fitting else max(fitting)}
    if quantization["group_size"] not in fitting:
        raise Llama2MLXError(
            f"{checkpoint.source}: group size {quantization['group_size']} does not divide the layers ({widths}); "
            f"--group-size {' or '.join(map(str, fitting))} works"
        )
    return quantization


def _model_parameters(checkpoint: Checkpoint, quantization: dict | None) -> dict[str, mx.array]:
    """The parameters (names, shapes) of the model this folder will hold; lazy, so nothing is allocated."""
    # a reward model (`score` head, no `lm_head`) quantizes its backbone only; its head stays float
    build = build_reward_model if checkpoint.reward_model else build_model
    try:
        model = build(checkpoint.args, quantization)
    except ValueError as error:  # MLX refuses a group size that does not divide a layer's input size
        raise Llama2MLXError(f"{checkpoint.source}: cannot quantize with {quantization} ({error})") from None
    return dict(tree_flatten(model.parameters()))


def _check_tensors(checkpoint: Checkpoint, expected: dict[str, mx.array]) -> None:
    """Missing, unexpected or mis-shaped tensors, named, before anything is written."""
    missing = sorted(set(expected) - set(checkpoint.tensors))
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise Llama2MLXError(f"{checkpoint.source}: missing tensor {missing[0]}{more}")
    unexpected = sorted(set(checkpoint.tensors) - set(expected))
    if unexpected:
        more = f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""
        raise Llama2MLXError(f"{checkpoint.source}: unexpected tensor {unexpected[0]}{more}")
    for name, tensor in sorted(checkpoint.tensors.items()):
        if not mx.issubdtype(tensor.dtype, mx.floating):
            raise Llama2MLXError(
                f"{checkpoint.source}: tensor {name} has dtype {_dtype_name(tensor.dtype)}; weights must be floats"
            )
        if tuple(tensor.shape) != tuple(expected[name].shape):
            raise Llama2MLXError(
                f"{checkpoint.source}: tensor {name} has shape {tuple(tensor.shape)}, "
                f"the config expects {tuple(expected[name].shape)}"
            )


def _check_tokenizer(checkpoint: Checkpoint) -> None:
    """A model folder without a (working, matching) tokenizer.model is one no command can use: refuse it now."""
    from llama2_mlx.tokenizer import Tokenizer

    if checkpoint.tokenizer_dir is None:
        raise Llama2MLXError(
            f"{checkpoint.source}: no tokenizer.model beside the weights (or in the folder above); put Llama 2's "
            "tokenizer.model there"
        )
    tokenizer = Tokenizer(checkpoint.tokenizer_dir / "tokenizer.model")
    tokenizer.check_vocab(checkpoint.args.vocab_size, f"the model's embedding ({checkpoint.source})")


def _dtype_name(dtype: mx.Dtype) -> str:
    return str(dtype).rsplit(".", 1)[-1]
