"""Small file helpers shared by every module that reads or writes the project's files.

Writes are atomic (a temporary sibling renamed over the target), so a crash or Ctrl-C mid-write leaves the
previous file intact (whole folders use `model_folder.atomic_folder`). JSON reads fail with one line naming the file.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llama2_mlx.errors import Llama2MLXError

if TYPE_CHECKING:  # mlx is imported where arrays are written, so light readers (and --help) stay fast
    import mlx.core as mx


def read_json(path: Path, needed_for: str) -> Any:
    """Parse a JSON file; a missing or malformed one is a `Llama2MLXError` naming it and what needs it."""
    if not path.is_file():
        raise Llama2MLXError(f"{path}: missing; {needed_for} needs {path.name}")
    try:
        return json.loads(path.read_bytes().decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as error:
        raise Llama2MLXError(f"{path}: not valid JSON ({error})") from None


def utf8_lines(path: Path) -> Iterator[tuple[int, str | None]]:
    """`(line number, text)` for each line of a text file, decoded one line at a time, so that a line which is not
    UTF-8 is `(number, None)` (the caller names path:line, or skips it) instead of ending the whole read."""
    with path.open("rb") as file:
        for number, raw in enumerate(file, start=1):
            try:
                yield number, raw.decode("utf-8")
            except UnicodeDecodeError:
                yield number, None


def jsonl_records(path: Path, not_found: str) -> Iterator[tuple[str, Any]]:
    """`("path:line", parsed JSON)` for each non-blank line of a JSON Lines file, so callers name the line in their
    own errors; a missing file or a line that is not UTF-8 JSON is a `Llama2MLXError` naming it."""
    if not path.is_file():
        raise Llama2MLXError(f"{path}: {not_found}")
    for number, line in utf8_lines(path):
        if line is None:
            raise Llama2MLXError(f"{path}:{number}: not UTF-8 text")
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except (json.JSONDecodeError, RecursionError) as error:
            raise Llama2MLXError(
                f"{path}:{number}: not valid JSON ({getattr(error, 'msg', error)})"
            ) from None
        yield f"{path}:{number}", row


def write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def save_safetensors_atomic(path: Path, arrays: dict[str, mx.array]) -> None:
    import mlx.core as mx

    tmp = path.with_name(f".{path.stem}.tmp.safetensors")  # MLX insists on the .safetensors suffix
    mx.save_safetensors(str(tmp), arrays)
    os.replace(tmp, path)


def write_model_files(
    model, folder: Path, tokenizer_dir: Path | None = None, config_extra: dict | None = None
) -> None:
    """Write a model folder's files (config, weights, tokenizer) into an existing run folder, each file atomically.

    A run folder also holds metrics.jsonl and checkpoint/, so the files are written to a hidden temporary folder
    inside it (cleaned by the next `run_folder.claim_run_folder` if a crash leaves it) and then renamed in.
    """
    from llama2_mlx.destination import remove, temporary_sibling
    from llama2_mlx.model_folder import write_model_folder

    tmp = temporary_sibling(folder / "model", folder=True)
    try:
        write_model_folder(model, tmp, tokenizer_dir=tokenizer_dir, config_extra=config_extra)
        for path in sorted(tmp.iterdir(), key=lambda p: p.name == "config.json"):  # config.json last
            os.replace(path, folder / path.name)
    finally:
        remove(tmp)
