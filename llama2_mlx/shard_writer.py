"""`ShardWriter`: the safetensors shards of a model folder, laid out up front and written block by block.

Every writer of model folders (save, convert, export) knows each output tensor's name, shape and dtype before it
has the data, so the shards and their headers are planned first and each block of rows then goes straight to its
place in its file. Memory is one block, whatever the shard or model size. At the end the shards get their final
names: `model.safetensors`, or `model-0000k-of-0000n.safetensors` plus `model.safetensors.index.json`.
"""

from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path

import mlx.core as mx

from llama2_mlx.errors import Llama2MLXError

DEFAULT_SHARD_BYTES = 2 * 1024**3

SAFETENSORS_DTYPE = {mx.float32: "F32", mx.float16: "F16", mx.bfloat16: "BF16", mx.uint32: "U32",
                     mx.int32: "I32", mx.int64: "I64", mx.uint8: "U8", mx.bool_: "BOOL"}  # fmt: skip

# one output tensor of the plan: (name, shape, dtype)
Entry = tuple[str, tuple[int, ...], mx.Dtype]


class ShardWriter:
    """Streams tensors into shards laid out up front. `groups` (e.g. a quantized weight with its scales and
    biases) are kept in one shard; a new shard starts when the next group would pass `max_shard_bytes`."""

    def __init__(self, folder: Path, groups: list[list[Entry]], max_shard_bytes: int = DEFAULT_SHARD_BYTES):
        self.folder = Path(folder)
        self.shards: list[tuple[Path, list[str]]] = []  # (temporary path, tensor names)
        self.total_bytes = 0
        self.files: list[int] = []
        self.regions: dict[str, tuple[int, int, int, mx.Dtype]] = {}  # name -> (file, next byte, end, dtype)
        layout: list[list[Entry]] = [[]]
        size = 0
        for group in groups:
            group_bytes = sum(_nbytes(shape, dtype) for _, shape, dtype in group)
            if layout[-1] and size + group_bytes > max_shard_bytes:
                layout.append([])
                size = 0
            layout[-1].extend(group)
            size += group_bytes
        for entries in layout:
            self._open_shard(entries)

    def _open_shard(self, entries: list[Entry]) -> None:
        header: dict = {"__metadata__": {"format": "mlx"}}
        offset = 0
        for name, shape, dtype in entries:
            end = offset + _nbytes(shape, dtype)
            header[name] = {
                "dtype": SAFETENSORS_DTYPE[dtype],
                "shape": list(shape),
                "data_offsets": [offset, end],
            }
            offset = end
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # the format allows space padding; keeps the data 8-byte aligned
        path = self.folder / f"shard-{len(self.shards):05d}.tmp.safetensors"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        _pwrite_all(fd, memoryview(struct.pack("<Q", len(raw)) + raw), 0, path)
        start = 8 + len(raw)
        for name, _, dtype in entries:
            begin, end = header[name]["data_offsets"]
            self.regions[name] = (len(self.files), start + begin, start + end, dtype)
        self.files.append(fd)
        self.shards.append((path, [name for name, _, _ in entries]))
        self.total_bytes += offset

    def write(self, name: str, block: mx.array) -> None:
        """Append the next block of rows of tensor `name` (blocks arrive in row order)."""
        fd_index, position, end, dtype = self.regions[name]
        if block.dtype != dtype or position + block.nbytes > end:
            raise Llama2MLXError(
                f"{name}: block {block.shape} {block.dtype} does not fit the planned tensor ({dtype})"
            )
        path = self.shards[fd_index][0]
        _pwrite_all(self.files[fd_index], memoryview(mx.contiguous(block)).cast("B"), position, path)
        self.regions[name] = (fd_index, position + block.nbytes, end, dtype)

    def add(self, name: str, array: mx.array) -> None:
        self.write(name, array)

    def close(self) -> None:
        """Check every tensor is complete, then give the shards their final names (and the index)."""
        unfinished = [name for name, (_, position, end, _) in self.regions.items() if position != end]
        self._close_files()
        if unfinished:
            raise Llama2MLXError(f"tensor {unfinished[0]} was not written completely")
        count = len(self.shards)
        if count == 1:
            self.shards[0][0].rename(self.folder / "model.safetensors")
            return
        weight_map = {}
        for index, (path, names) in enumerate(self.shards, start=1):
            final = f"model-{index:05d}-of-{count:05d}.safetensors"
            path.rename(self.folder / final)
            weight_map.update({name: final for name in names})
        index_file = {
            "metadata": {"total_size": self.total_bytes},
            "weight_map": dict(sorted(weight_map.items())),
        }
        (self.folder / "model.safetensors.index.json").write_text(json.dumps(index_file, indent=2) + "\n")

    def _close_files(self) -> None:
        for fd in self.files:
            os.close(fd)
        self.files = []

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self._close_files()


def _nbytes(shape: tuple[int, ...], dtype: mx.Dtype) -> int:
    return math.prod(shape) * dtype.size


def _pwrite_all(fd: int, data: memoryview, position: int, path: Path) -> None:
    written = 0
    try:
        while written < len(data):  # pwrite may write less than asked
            written += os.pwrite(fd, data[written:], position + written)
    except OSError as error:  # e.g. a full disk: name the file, as every error message does
        raise OSError(error.errno, error.strerror, str(path)) from None
