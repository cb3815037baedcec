"""Reading .safetensors files safely: the header is checked completely before MLX (or our lazy reader) sees it.

MLX's own loader trusts the header: a directory, a FIFO (it would block for ever), negative, overlapping or
out-of-file `data_offsets`, or JSON of the wrong types give tracebacks or silently wrong tensors. `read_header`
turns every such file into one `Llama2MLXError` naming the file and the entry.
"""

from __future__ import annotations

import json
import math
import stat
import struct
from pathlib import Path
from typing import Any

from llama2_mlx.checkpoints.pth import LazyTensor
from llama2_mlx.errors import Llama2MLXError

SAFETENSORS_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64", "I64": "int64",
                      "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "U32": "uint32", "U64": "uint64",
                      "BOOL": "bool"}  # fmt: skip
ITEM_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8, "int64": 8, "int32": 4, "int16": 2,
              "int8": 1, "uint8": 1, "uint32": 4, "uint64": 8, "bool": 1}  # fmt: skip
MAX_HEADER_BYTES = 100 * 2**20


def read_header(path: Path) -> tuple[int, dict[str, tuple[str, tuple[int, ...], int, int]]]:
    """(header length, {name: (dtype name, shape, begin, end)}) of a safetensors file, every field checked."""
    try:
        info = path.stat()
    except OSError as error:
        raise Llama2MLXError(f"{path}: cannot read safetensors ({error.strerror})") from None
    if not stat.S_ISREG(info.st_mode):
        raise Llama2MLXError(f"{path}: not a regular file; expected safetensors weights")
    size = info.st_size
    with path.open("rb") as file:
        head = file.read(8)
        length = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
        if not 0 < length <= min(MAX_HEADER_BYTES, size - 8):
            raise Llama2MLXError(
                f"{path}: cannot read safetensors (bad header length; truncated or not safetensors)"
            )
        try:
            header = json.loads(file.read(length))
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as error:
            raise Llama2MLXError(f"{path}: cannot read safetensors (corrupt header: {error})") from None
    if not isinstance(header, dict):
        raise Llama2MLXError(f"{path}: cannot read safetensors (the header is not a JSON object)")
    data_size = size - 8 - length
    entries = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        entries[name] = _entry(path, name, entry, data_size)
    spans = sorted((begin, end, name) for name, (_, _, begin, end) in entries.items() if end > begin)
    for (_, end, first), (begin, _, second) in zip(spans, spans[1:], strict=False):
        if begin < end:
            raise Llama2MLXError(f"{path}: tensors {first!r} and {second!r} overlap; the file is corrupt")
    return length, entries


def _entry(path: Path, name: str, entry: Any, data_size: int) -> tuple[str, tuple[int, ...], int, int]:
    def bad(what: str) -> Llama2MLXError:
        return Llama2MLXError(f"{path}: safetensors entry {name!r}: {what}: {entry!r:.100}")

    if not isinstance(entry, dict):
        raise bad("expected an object with dtype, shape and data_offsets")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in SAFETENSORS_DTYPES:
        raise bad(f"unsupported dtype (known: {', '.join(SAFETENSORS_DTYPES)})")
    if not isinstance(shape, list) or not all(_count(d) for d in shape):
        raise bad("shape must be a list of non-negative integers")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_count(o) for o in offsets)):
        raise bad("data_offsets must be two non-negative integers")
    begin, end = offsets
    dtype = SAFETENSORS_DTYPES[dtype]
    if end < begin or end > data_size:
        raise bad(f"data_offsets outside the file's {data_size} data bytes (truncated or corrupt)")
    if end - begin != math.prod(shape) * ITEM_BYTES[dtype]:
        raise bad(
            f"spans {end - begin} bytes, its shape and dtype need {math.prod(shape) * ITEM_BYTES[dtype]}"
        )
    return dtype, tuple(shape), begin, end


def _count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def read_safetensors(path: Path) -> dict[str, LazyTensor]:
    """The tensors of a safetensors file from its (checked) JSON header; no data is read."""
    length, entries = read_header(path)
    for name, (dtype, _, _, _) in entries.items():
        if (
            dtype == "uint32"
        ):  # only MLX's packed quantized weights use it; the lazy reader has no such storage
            raise Llama2MLXError(
                f"{path}: tensor {name} has dtype uint32 (quantized); convert a float checkpoint"
            )
    return {
        name: LazyTensor(
            path, 8 + length + begin, math.prod(shape), 0, shape, _contiguous_strides(shape), dtype
        )
        for name, (dtype, shape, begin, _) in entries.items()
    }


def load_safetensors(path: Path, dtypes: tuple[str, ...] | None = None) -> dict:
    """Every tensor of a checked safetensors file as an `mx.array` (memory-mapped by MLX, read when used).

    `dtypes`: the only dtype names allowed (e.g. float weights), anything else is an error naming the tensor."""
    import mlx.core as mx

    _, entries = read_header(path)
    for name, (dtype, _, _, _) in entries.items():
        if dtypes is not None and dtype not in dtypes:
            raise Llama2MLXError(
                f"{path}: tensor {name} has dtype {dtype}; expected one of {', '.join(dtypes)}"
            )
    try:
        return mx.load(str(path))
    except Exception as error:  # MLX raises plain RuntimeError/ValueError for files its checks refuse
        raise Llama2MLXError(f"{path}: cannot read safetensors ({error})") from None


def _contiguous_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(math.prod(shape[axis + 1 :]) for axis in range(len(shape)))
