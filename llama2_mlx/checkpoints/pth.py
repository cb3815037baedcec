"""Read PyTorch `.pth` / `.bin` checkpoints without torch and without running pickle code.

A `torch.save` file is a zip archive (`<name>/data.pkl` + one stored, uncompressed member per storage under
`<name>/data/<key>`). The pickle is read by an unpickler that resolves only the few globals a tensor checkpoint
needs, so a file whose pickle would call `os.system` (or anything else) is refused before any of it runs. Tensors
come back as `LazyTensor`s: shape, dtype and the byte range of their storage; the bytes are memory-mapped and copied
into MLX only when `load()` or `load_rows()` is called, so reading a 13 GB checkpoint never holds it all.
"""

from __future__ import annotations

import collections
import pickle
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from llama2_mlx.errors import Llama2MLXError

# torch storage class -> (our dtype name, numpy dtype of the raw bits). bf16 has no numpy dtype: read as uint16.
STORAGE_DTYPES: dict[str, tuple[str, str]] = {
    "FloatStorage": ("float32", "<f4"),
    "HalfStorage": ("float16", "<f2"),
    "BFloat16Storage": ("bfloat16", "<u2"),
    "DoubleStorage": ("float64", "<f8"),
    "LongStorage": ("int64", "<i8"),
    "IntStorage": ("int32", "<i4"),
    "ShortStorage": ("int16", "<i2"),
    "CharStorage": ("int8", "i1"),
    "ByteStorage": ("uint8", "u1"),
    "BoolStorage": ("bool", "?"),
}

_ZIP_LOCAL_HEADER = struct.Struct("<4sHHHHHIIIHH")  # signature ... file name length, extra field length


@dataclass(frozen=True)
class _StorageType:
    name: str


@dataclass(frozen=True)
class _Storage:
    dtype: str
    key: str
    numel: int


@dataclass(frozen=True)
class LazyTensor:
    """A tensor inside a checkpoint file (.pth, .bin or .safetensors): its metadata now, its data when loaded."""

    path: Path
    data_offset: int  # absolute file offset of the storage's first byte
    storage_numel: int
    storage_offset: int  # in elements
    shape: tuple[int, ...]
    strides: tuple[int, ...]  # in elements
    dtype: str

    @property
    def nbytes(self) -> int:
        return (
            int(np.prod(self.shape, dtype=np.int64)) * np.dtype(STORAGE_DTYPES_BY_NAME[self.dtype]).itemsize
        )

    @property
    def mx_dtype(self):
        """The MLX dtype `load` returns."""
        import mlx.core as mx

        return mx.bool_ if self.dtype == "bool" else getattr(mx, self.dtype)

    def load(self):
        """The whole tensor as an `mx.array` in its stored dtype (bf16 rebuilt from its bits)."""
        return self.load_rows(0, self.shape[0] if self.shape else 1)

    def load_rows(self, start: int, stop: int):
        """Rows [start, stop) (the first axis) as an `mx.array`, copied out of a mapping made just for them.

        The mapping is dropped before returning, so the checkpoint's pages never pile up in resident memory.
        """
        import mlx.core as mx

        raw = np.dtype(STORAGE_DTYPES_BY_NAME[self.dtype])
        mapped = np.memmap(
            self.path, dtype=raw, mode="r", offset=self.data_offset, shape=(self.storage_numel,)
        )
        view = np.lib.stride_tricks.as_strided(
            mapped[self.storage_offset :],
            shape=self.shape,
            strides=tuple(s * raw.itemsize for s in self.strides),
            writeable=False,
        )
        array = mx.array(view[start:stop] if self.shape else view)  # a copy: touches only these rows' pages
        del view, mapped
        return array.view(mx.bfloat16) if self.dtype == "bfloat16" else array


STORAGE_DTYPES_BY_NAME = {name: raw for name, raw in STORAGE_DTYPES.values()}


@dataclass(frozen=True)
class _TensorRef:
    storage: _Storage
    offset: int
    shape: tuple[int, ...]
    strides: tuple[int, ...]


def _rebuild_tensor(storage: _Storage, storage_offset, size, stride, *_ignored) -> _TensorRef:
    if not isinstance(storage, _Storage):
        raise pickle.UnpicklingError(f"tensor built from {type(storage).__name__}, not a storage")
    return _TensorRef(
        storage, int(storage_offset), tuple(int(s) for s in size), tuple(int(s) for s in stride)
    )


def _rebuild_parameter(data, *_ignored):
    return data


# The only globals a tensor checkpoint needs; each maps to a harmless stand-in of ours.
_ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("collections", "OrderedDict"): collections.OrderedDict,
    **{("torch", name): _StorageType(name) for name in STORAGE_DTYPES},
}


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file, source: str):
        super().__init__(file)
        self.source = source

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED_GLOBALS:
            return _ALLOWED_GLOBALS[(module, name)]
        raise Llama2MLXError(
            f"{self.source}: refused to load global '{module}.{name}' (not a plain tensor checkpoint; "
            "only tensors, storages and OrderedDict are allowed)"
        )

    def persistent_load(self, pid: Any) -> _Storage:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise Llama2MLXError(f"{self.source}: unsupported persistent id {pid!r:.80}")
        _, storage_type, key, _location, numel = pid
        if not isinstance(storage_type, _StorageType):
            raise Llama2MLXError(
                f"{self.source}: storage {key!r} has an unsupported type {storage_type!r:.80}"
            )
        return _Storage(STORAGE_DTYPES[storage_type.name][0], str(key), int(numel))


def read_pth(path: str | Path) -> dict[str, LazyTensor]:
    """The tensors of a torch zip checkpoint by name, without torch and without executing pickle code."""
    path = Path(path)
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as error:
        raise Llama2MLXError(
            f"{path}: not a readable PyTorch zip checkpoint ({error}); the file may be truncated or corrupt"
        ) from None
    with archive, path.open("rb") as raw_file:
        pickles = [info for info in archive.infolist() if info.filename.endswith("data.pkl")]
        if len(pickles) != 1:
            raise Llama2MLXError(f"{path}: expected one data.pkl in the archive, found {len(pickles)}")
        prefix = pickles[0].filename[: -len("data.pkl")]
        byteorder = f"{prefix}byteorder"
        if byteorder in archive.namelist() and archive.read(byteorder).strip() != b"little":
            raise Llama2MLXError(f"{path}: big-endian checkpoints are not supported")
        try:
            with archive.open(pickles[0]) as pickle_file:
                state = _RestrictedUnpickler(pickle_file, str(path)).load()
        except Llama2MLXError:
            raise
        except Exception as error:  # a corrupt pickle raises any of several unpickling errors
            raise Llama2MLXError(f"{path}: corrupt pickle in {pickles[0].filename} ({error})") from None
        if not isinstance(state, dict):
            raise Llama2MLXError(f"{path}: expected a dict of tensors, found {type(state).__name__}")
        members = {info.filename: info for info in archive.infolist()}
        tensors = {}
        for name, ref in state.items():
            if not isinstance(ref, _TensorRef):
                continue  # non-tensor entries (a step counter, metadata) carry no weights
            member = members.get(f"{prefix}data/{ref.storage.key}")
            if member is None:
                raise Llama2MLXError(
                    f"{path}: tensor {name!r} refers to missing storage data/{ref.storage.key}"
                )
            tensors[str(name)] = _lazy_tensor(path, raw_file, member, ref, name)
        return tensors


def _lazy_tensor(path: Path, raw_file, member: zipfile.ZipInfo, ref: _TensorRef, name: str) -> LazyTensor:
    """Check the tensor fits its storage and the storage fits the file; find the storage's file offset."""
    storage, offset, shape, strides = ref.storage, ref.offset, ref.shape, ref.strides
    if member.compress_type != zipfile.ZIP_STORED:
        raise Llama2MLXError(f"{path}: storage of tensor {name!r} is compressed; torch never writes that")
    itemsize = np.dtype(STORAGE_DTYPES_BY_NAME[storage.dtype]).itemsize
    if member.file_size < storage.numel * itemsize:
        raise Llama2MLXError(
            f"{path}: storage of tensor {name!r} holds {member.file_size} bytes, needs {storage.numel * itemsize}"
        )
    last = (
        offset + sum((n - 1) * s for n, s in zip(shape, strides, strict=True)) if all(shape) else offset - 1
    )
    if offset < 0 or last >= storage.numel:
        raise Llama2MLXError(f"{path}: tensor {name!r} of shape {shape} reaches past its storage")
    raw_file.seek(member.header_offset)
    header = raw_file.read(_ZIP_LOCAL_HEADER.size)
    if len(header) < _ZIP_LOCAL_HEADER.size or header[:4] != b"PK\x03\x04":
        raise Llama2MLXError(f"{path}: bad zip entry for tensor {name!r}; the file is corrupt")
    fields = _ZIP_LOCAL_HEADER.unpack(header)
    data_offset = member.header_offset + _ZIP_LOCAL_HEADER.size + fields[9] + fields[10]
    if data_offset + storage.numel * itemsize > path.stat().st_size:
        raise Llama2MLXError(f"{path}: tensor {name!r} reaches past the end of the file; it is truncated")
    return LazyTensor(path, data_offset, storage.numel, offset, shape, strides, storage.dtype)
