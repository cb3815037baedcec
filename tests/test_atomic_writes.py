"""Atomic writes: a write that fails half-way leaves the previous file as it was."""

from __future__ import annotations

import mlx.core as mx
import pytest

from llama2_mlx.fileio import save_safetensors_atomic, write_text_atomic


def test_failed_text_write_leaves_the_previous_file_intact(tmp_path):
    """Guards against: `write_text_atomic` writing the target directly (a failed write would empty it)."""
    path = tmp_path / "metrics.jsonl"
    write_text_atomic(path, "old\n")
    with pytest.raises(UnicodeEncodeError):  # fails after the file was opened for writing
        write_text_atomic(path, "new \ud800\n")
    assert path.read_text() == "old\n"
    write_text_atomic(path, "new\n")
    assert path.read_text() == "new\n"


def test_failed_safetensors_write_leaves_the_previous_file_intact(tmp_path, monkeypatch):
    """Guards against: `save_safetensors_atomic` writing the target directly (a crash mid-write would leave a
    half-written file in place of the previous one)."""
    path = tmp_path / "adapters.safetensors"
    save_safetensors_atomic(path, {"a": mx.arange(4)})

    def crash_mid_write(file, arrays):
        with open(file, "wb") as handle:
            handle.write(b"\x08\x00\x00")
        raise OSError("disk full")

    monkeypatch.setattr(mx, "save_safetensors", crash_mid_write)
    with pytest.raises(OSError, match="disk full"):
        save_safetensors_atomic(path, {"a": mx.arange(8)})
    monkeypatch.undo()
    assert mx.load(str(path))["a"].tolist() == [0, 1, 2, 3]
