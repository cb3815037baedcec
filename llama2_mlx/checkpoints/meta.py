"""Meta's Llama 2 download (`params.json`, `consolidated.*.pth`, `checklist.chk`, `tokenizer.model`).

Shards are fairscale model-parallel slices; they are merged tensor by tensor with the axis rules of
LLAMA2_RECIPE.md, renamed to Hugging Face names and permuted to the rotate-half row layout our folders use. Every
check (file count, names, shapes, vocab) runs on the pickles' metadata before a single weight is read.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Iterator
from pathlib import Path

import mlx.core as mx

from llama2_mlx.checkpoints.checkpoint import Checkpoint, TensorSource, row_blocks
from llama2_mlx.checkpoints.hf import meta_to_hf_rows
from llama2_mlx.checkpoints.pth import LazyTensor, read_pth
from llama2_mlx.config import ModelArgs
from llama2_mlx.errors import Llama2MLXError
from llama2_mlx.fileio import read_json, utf8_lines
from llama2_mlx.tokenizer import Tokenizer

# Meta name (with the layer as N) -> (Hugging Face name, axis the shards are concatenated on; None = replicated)
_LAYOUT: dict[str, tuple[str, int | None]] = {
    "tok_embeddings.weight": ("model.embed_tokens.weight", 1),
    "norm.weight": ("model.norm.weight", None),
    "output.weight": ("lm_head.weight", 0),
    "layers.N.attention.wq.weight": ("model.layers.N.self_attn.q_proj.weight", 0),
    "layers.N.attention.wk.weight": ("model.layers.N.self_attn.k_proj.weight", 0),
    "layers.N.attention.wv.weight": ("model.layers.N.self_attn.v_proj.weight", 0),
    "layers.N.attention.wo.weight": ("model.layers.N.self_attn.o_proj.weight", 1),
    "layers.N.feed_forward.w1.weight": ("model.layers.N.mlp.gate_proj.weight", 0),
    "layers.N.feed_forward.w2.weight": ("model.layers.N.mlp.down_proj.weight", 1),
    "layers.N.feed_forward.w3.weight": ("model.layers.N.mlp.up_proj.weight", 0),
    "layers.N.attention_norm.weight": ("model.layers.N.input_layernorm.weight", None),
    "layers.N.ffn_norm.weight": ("model.layers.N.post_attention_layernorm.weight", None),
}
IGNORED = ("rope.freqs",)  # a precomputed RoPE table some copies carry


def is_meta_folder(folder: Path) -> bool:
    return (folder / "params.json").is_file() or any(folder.glob("consolidated.*.pth"))


def read_meta(folder: Path, verify: bool = False) -> Checkpoint:
    """A Meta folder as a `Checkpoint` (merged, renamed, permuted lazily); `verify` checks checklist.chk first."""
    params = _read_params(folder)
    shards = sorted(folder.glob("consolidated.*.pth"))
    if not shards:
        raise Llama2MLXError(f"{folder}: no consolidated.*.pth checkpoint files")
    if verify:
        verify_checklist(folder)
    tables = [read_pth(path) for path in shards]
    layouts = _expected_layout(params["n_layers"])
    for path, table in zip(shards, tables, strict=True):
        _check_names(path, table, layouts)
    _check_model_parallel(params, shards, tables)

    vocab = tables[0]["tok_embeddings.weight"].shape[0]
    tokenizer_dir = next((d for d in (folder, folder.parent) if (d / "tokenizer.model").is_file()), None)
    if tokenizer_dir is not None:
        Tokenizer(tokenizer_dir / "tokenizer.model").check_vocab(vocab, "tok_embeddings")
    args = ModelArgs.from_meta_params(params, vocab, source=str(folder / "params.json"))

    tensors = {}
    for meta_name, (hf_name, axis) in layouts.items():
        parts = [(path, table[meta_name]) for path, table in zip(shards, tables, strict=True)]
        shape = _merged_shape(meta_name, parts, axis)
        permuted = meta_name.endswith(("attention.wq.weight", "attention.wk.weight"))
        if permuted and parts[0][1].shape[0] % args.head_dim:
            raise Llama2MLXError(
                f"{parts[0][0]}: {meta_name} has {parts[0][1].shape[0]} rows, not whole heads"
            )
        blocks = _blocks(meta_name, parts, axis, args.head_dim if permuted else None)
        tensors[hf_name] = TensorSource(shape, parts[0][1].mx_dtype, blocks)
    dtype = tables[0]["norm.weight"].mx_dtype
    return Checkpoint(args, tensors, dtype, str(folder), tokenizer_dir)


def verify_checklist(folder: Path) -> None:
    """Compare every file listed in checklist.chk (`<md5>  <name>` lines) with its md5 sum."""
    checklist = folder / "checklist.chk"
    if not checklist.is_file():
        raise Llama2MLXError(f"{checklist}: missing; --verify needs Meta's checklist of md5 sums")
    for number, line in utf8_lines(checklist):
        if line is None:
            raise Llama2MLXError(f"{checklist}:{number}: not UTF-8 text")
        if not line.strip():
            continue
        fields = line.split()
        if len(fields) != 2 or not re.fullmatch(r"[0-9a-fA-F]{32}", fields[0]):
            raise Llama2MLXError(f"{checklist}:{number}: expected '<md5>  <file name>', got {line!r}")
        expected, name = fields
        path = folder / name
        if not path.is_file():
            raise Llama2MLXError(f"{checklist}:{number}: listed file {name} is missing")
        digest = hashlib.md5()
        with path.open("rb") as file:
            while chunk := file.read(1 << 24):
                digest.update(chunk)
        if digest.hexdigest() != expected.lower():
            raise Llama2MLXError(
                f"{path}: md5 {digest.hexdigest()} does not match checklist.chk ({expected})"
            )


def _read_params(folder: Path) -> dict:
    path = folder / "params.json"
    params = read_json(path, "a Meta checkpoint folder")
    for key in ("dim", "n_layers", "n_heads"):
        if not isinstance(params.get(key), int) or params[key] <= 0:
            raise Llama2MLXError(f"{path}: field '{key}' must be a positive integer, got {params.get(key)!r}")
    return params


def _expected_layout(n_layers: int) -> dict[str, tuple[str, int | None]]:
    layout = {}
    for meta, (hf, axis) in _LAYOUT.items():
        if "N" in meta.split("."):
            for layer in range(n_layers):
                layout[meta.replace(".N.", f".{layer}.")] = (hf.replace(".N.", f".{layer}."), axis)
        else:
            layout[meta] = (hf, axis)
    return layout


def _check_names(path: Path, table: dict[str, LazyTensor], layout: dict) -> None:
    missing = [name for name in layout if name not in table]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise Llama2MLXError(f"{path}: missing tensor {missing[0]}{more}")
    extra = [name for name in table if name not in layout and name not in IGNORED]
    if extra:
        more = f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""
        raise Llama2MLXError(
            f"{path}: unexpected tensor {extra[0]}{more} (params.json has n_layers mismatch?)"
        )


def _check_model_parallel(params: dict, shards: list[Path], tables: list[dict[str, LazyTensor]]) -> None:
    """The shard count must equal the model-parallel size implied by the first shard's query projection."""
    rows = tables[0]["layers.0.attention.wq.weight"].shape[0]
    if rows == 0 or params["dim"] % rows:
        raise Llama2MLXError(f"{shards[0]}: wq has {rows} rows, which does not divide dim {params['dim']}")
    implied = params["dim"] // rows
    if implied != len(shards):
        raise Llama2MLXError(
            f"{shards[0].parent}: found {len(shards)} consolidated.*.pth file(s) but the tensor shapes "
            f"(wq {rows} of dim {params['dim']} rows per shard) imply {implied}"
        )


def _merged_shape(name: str, parts: list[tuple[Path, LazyTensor]], axis: int | None) -> tuple[int, ...]:
    """The full tensor's shape; the shards must agree on every axis they are not split on."""
    first_path, first = parts[0]
    for path, tensor in parts[1:]:
        if tensor.dtype != first.dtype:
            raise Llama2MLXError(
                f"shards disagree on {name}: {first_path.name} holds {first.dtype}, {path.name} holds {tensor.dtype}"
            )
        if len(tensor.shape) != len(first.shape) or any(
            a != b for i, (a, b) in enumerate(zip(tensor.shape, first.shape, strict=True)) if i != axis
        ):
            raise Llama2MLXError(
                f"shards disagree on {name}: {first_path.name} has shape {first.shape}, {path.name} has {tensor.shape}"
            )
    if axis is None:
        return first.shape
    if axis >= len(first.shape):
        raise Llama2MLXError(f"{first_path}: tensor {name} has shape {first.shape}, expected 2 dimensions")
    shape = list(first.shape)
    shape[axis] = sum(tensor.shape[axis] for _, tensor in parts)
    return tuple(shape)


def _blocks(
    name: str, parts: list[tuple[Path, LazyTensor]], axis: int | None, head_dim: int | None
) -> Callable:
    """Row blocks of the merged tensor, read shard by shard; wq/wk blocks hold whole heads, permuted per head."""

    def blocks(rows: int) -> Iterator[mx.array]:
        if axis is None:  # replicated: shard 0's copy, after checking the others hold the same values
            array = parts[0][1].load()
            for path, tensor in parts[1:]:
                if not mx.array_equal(tensor.load(), array).item():
                    raise Llama2MLXError(
                        f"shards disagree on replicated tensor {name}: {path.name} differs from {parts[0][0].name}"
                    )
            yield array
        elif axis == 0:  # shards hold consecutive rows (whole heads for wq/wk)
            if head_dim:
                rows = max(head_dim, rows // head_dim * head_dim)
            for _, tensor in parts:
                for block in row_blocks(tensor.load_rows, tensor.shape[0], rows):
                    yield meta_to_hf_rows(block, block.shape[0] // head_dim) if head_dim else block
        else:  # shards hold consecutive columns: each block of rows is stitched from all of them
            total = parts[0][1].shape[0]
            for start in range(0, total, rows):
                stop = min(start + rows, total)
                yield mx.concatenate([tensor.load_rows(start, stop) for _, tensor in parts], axis=1)

    return blocks
