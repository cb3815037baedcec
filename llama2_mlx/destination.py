"""The one place that claims and replaces what a command writes (a model folder, a checkpoint, a .jsonl file).

Writing a destination DST goes in three steps, so that a crash or an error at any point leaves DST absent or
complete (the old one or the new one), never half-written, and never deletes a DST the command did not own:

1. Claim, at the start: an exclusive lock on the hidden sibling `.DST.lock`. The operating system releases it
   when the process dies, so a killed run leaves no stale claim, and a second process gets a one-line refusal.
   Holding the lock, DST must not exist (unless `force`), must not be one of the command's inputs, and the hidden
   temporaries a killed run left beside it (`.DST.*.tmp`, `.DST.*.old`) are deleted.
2. Write everything into a hidden temporary sibling `.DST.<random>.tmp` (created with the user's umask).
3. Publish with ONE rename: without `force` a no-replace rename (a DST that appeared meanwhile is kept and the
   command fails); with `force` an atomic exchange of the two names, so there is no moment without a DST, and the
   old one is deleted afterwards. Platforms without these renames (not Linux or macOS) fall back to a check
   before the rename, and to two renames whose gap the next claim repairs (`.DST.<random>.old` is put back).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import fcntl
import os
import secrets
import shutil
import sys
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from llama2_mlx.errors import Llama2MLXError


class DestinationLock:
    """An exclusive, process-lifetime lock on `.NAME.lock` beside `path`; `release` removes the lock file."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.lock_path = self.path.with_name(f".{self.path.name}.lock")
        self.fd: int | None = None

    def acquire(self) -> DestinationLock:
        for parent in self.path.parents:  # mkdir would say "File exists" for a file where a folder should be
            if os.path.lexists(parent) and not parent.is_dir():
                raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(parent))
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o666)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(fd, 32).decode(errors="replace").strip() or "?"
                os.close(fd)
                raise Llama2MLXError(
                    f"{self.path}: in use by another llama2-mlx process (pid {holder}); "
                    "wait for it to finish or choose another destination"
                ) from None
            try:  # the previous holder may have removed the file between our open and our lock: lock the new one
                same = os.fstat(fd).st_ino == os.stat(self.lock_path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            os.unlink(self.lock_path)
        except FileNotFoundError:
            pass
        os.close(self.fd)
        self.fd = None

    def __enter__(self) -> DestinationLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def check_not_input(path: Path, inputs: Iterable[str | os.PathLike | None]) -> None:
    """A destination may not be, contain or lie inside one of the files or folders the command reads."""
    target = Path(path).resolve()
    for source in inputs:
        if source is None:
            continue
        source = Path(source).resolve()
        if target == source or target in source.parents or source in target.parents:
            raise Llama2MLXError(f"{path}: is (or overlaps) the input {source}; choose another destination")


def clean_stale_temporaries(path: Path) -> None:
    """Delete the `.NAME.*.tmp` / `.NAME.*.old` siblings a killed writer left (call only holding the lock).

    If DST itself is missing but an `.old` copy exists (a crash between the two renames of the fallback
    replace), that copy is put back first."""
    prefix = f".{path.name}."
    if not path.parent.is_dir():
        return
    for sibling in sorted(path.parent.iterdir()):
        if not sibling.name.startswith(prefix) or sibling.name == f".{path.name}.lock":
            continue
        if sibling.name.endswith(".old") and not os.path.lexists(path):
            os.rename(sibling, path)
        elif sibling.name.endswith((".tmp", ".old")):
            remove(sibling)


def temporary_sibling(path: Path, folder: bool) -> Path:
    """A new hidden `.NAME.<random>.tmp` beside `path`; a folder is created (honouring the umask), a file not."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    if folder:
        os.mkdir(tmp, 0o777)
    return tmp


def publish(tmp: Path, path: Path, replace: bool) -> None:
    """Move the finished `tmp` to `path` in one rename: no-replace unless `replace`, then an atomic exchange."""
    if replace and os.path.lexists(path):
        if _rename2(tmp, path, _EXCHANGE):
            remove(tmp)  # tmp now holds the old destination
            return
        old = path.with_name(f".{path.name}.{secrets.token_hex(4)}.old")
        os.rename(path, old)  # fallback: a crash here is repaired by the next claim's clean_stale_temporaries
        os.rename(tmp, path)
        remove(old)
        return
    try:
        if _rename2(tmp, path, _NOREPLACE):
            return
    except FileExistsError:
        raise Llama2MLXError(
            f"{path}: appeared while this command was writing it; it was left untouched "
            "(use --force to replace it)"
        ) from None
    if os.path.lexists(path):
        raise Llama2MLXError(f"{path}: appeared while this command was writing it; it was left untouched")
    os.rename(tmp, path)


@contextmanager
def atomic_destination(
    path: str | os.PathLike,
    force: bool = False,
    folder: bool = True,
    inputs: Iterable[str | os.PathLike | None] = (),
) -> Iterator[Path]:
    """Claim `path`, yield a temporary sibling to write (a folder, or a file path when `folder` is False), and
    publish it when the block succeeds. An existing `path` is an error unless `force`; see the module docstring."""
    final = Path(path)
    check_not_input(final, inputs)
    with DestinationLock(final):
        clean_stale_temporaries(final)
        if os.path.lexists(final) and not force:
            raise Llama2MLXError(f"{final}: already exists (use --force to overwrite)")
        tmp = temporary_sibling(final, folder)
        try:
            yield tmp
            publish(tmp, final, replace=force)
        except BaseException:
            remove(tmp)
            raise


def atomic_folder(path: str | os.PathLike, force: bool = False, inputs: Iterable = ()):
    """`atomic_destination` for a folder (model folders, checkpoints, world data)."""
    return atomic_destination(path, force=force, folder=True, inputs=inputs)


def atomic_file(path: str | os.PathLike, force: bool = False, inputs: Iterable = ()):
    """`atomic_destination` for one file: the block writes the yielded path."""
    return atomic_destination(path, force=force, folder=False, inputs=inputs)


def remove(path: Path) -> None:
    """Delete a file or a folder tree; a missing one is fine."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        try:
            path.unlink()
        except FileNotFoundError:
            pass


# renameat2 (Linux) / renamex_np (macOS) flags
_NOREPLACE, _EXCHANGE = "noreplace", "exchange"
_FLAGS = {
    "linux": {_NOREPLACE: 1, _EXCHANGE: 2},
    "darwin": {_NOREPLACE: 0x4, _EXCHANGE: 0x2},  # RENAME_EXCL, RENAME_SWAP
}
_LIBC = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True) if sys.platform in _FLAGS else None
_AT_FDCWD = -100


def _rename2(source: Path, target: Path, mode: str) -> bool:
    """One atomic rename with the given mode; False when the platform or file system cannot do it."""
    if _LIBC is None:
        return False
    flags = _FLAGS[sys.platform][mode]
    src, dst = os.fsencode(source), os.fsencode(target)
    if sys.platform == "linux":
        function = getattr(_LIBC, "renameat2", None)
        if function is None:
            return False
        result = function(_AT_FDCWD, src, _AT_FDCWD, dst, ctypes.c_uint(flags))
    else:
        function = getattr(_LIBC, "renamex_np", None)
        if function is None:
            return False
        result = function(src, dst, ctypes.c_uint(flags))
    if result == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), str(target))
