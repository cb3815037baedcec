"""Hub ids resolve through huggingface-hub's own cache, offline: a prepared local cache converts with no network
(socket connections are made to fail), and a repo missing from the cache is one clear error."""

from __future__ import annotations

import shutil
import socket

import mlx.core as mx
import numpy as np
import pytest
import torch

from llama2_mlx.checkpoints.convert import convert
from llama2_mlx.errors import Llama2MLXError
from llama2_mlx.model_folder import load_model
from tests.test_convert_hf import TOKENS, hf_model

REVISION = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def offline_cache(tmp_path, monkeypatch):
    """HF_HUB_CACHE in a temp dir, HF_HUB_OFFLINE=1, and any attempt to open a connection fails the test."""
    cache = tmp_path / "hub-cache"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def no_network(*args, **kwargs):
        raise AssertionError("the test tried to reach the network")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    return cache


def _cache_repo(cache, repo_id: str, files: dict) -> None:
    """The layout huggingface-hub writes: models--org--name/{refs/main, snapshots/<revision>/...}."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / REVISION
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(REVISION)
    for name, source in files.items():
        shutil.copy(source, snapshot / name)


def _logits(folder) -> np.ndarray:
    return np.array(load_model(folder)(mx.array(TOKENS)))


def test_hub_id_from_offline_cache(offline_cache, tmp_path, tokenizer_dir):
    model = hf_model(seed=5)
    model.save_pretrained(tmp_path / "saved")
    files = {name: tmp_path / "saved" / name for name in ("config.json", "model.safetensors")}
    _cache_repo(
        offline_cache, "someone/tiny-llama-2", files | {"tokenizer.model": tokenizer_dir / "tokenizer.model"}
    )
    convert("someone/tiny-llama-2", tmp_path / "out")
    with torch.no_grad():
        theirs = model(torch.tensor(TOKENS)).logits.numpy()
    ours = _logits(tmp_path / "out")
    assert np.abs(ours - theirs).max() <= 1e-4 * max(1.0, np.abs(theirs).max())
    assert (tmp_path / "out" / "tokenizer.model").is_file()


def test_bin_only_repo_and_missing_repo(offline_cache, tmp_path, tokenizer_dir):
    model = hf_model(seed=6)
    model.save_pretrained(tmp_path / "saved")
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    _cache_repo(
        offline_cache,
        "someone/bin-only",
        {
            "config.json": tmp_path / "saved" / "config.json",
            "pytorch_model.bin": tmp_path / "pytorch_model.bin",
            "tokenizer.model": tokenizer_dir / "tokenizer.model",
        },
    )
    convert("someone/bin-only", tmp_path / "out")
    with torch.no_grad():
        theirs = model(torch.tensor(TOKENS)).logits.numpy()
    assert np.abs(_logits(tmp_path / "out") - theirs).max() <= 1e-4 * max(1.0, np.abs(theirs).max())

    with pytest.raises(
        Llama2MLXError,
        match=r"someone/absent: no such local folder, not in the local Hugging Face cache, and HF_HUB_OFFLINE",
    ):
        convert("someone/absent", tmp_path / "absent")
    assert not (tmp_path / "absent").exists()
