"""Crash consistency (issue 13): convert, fuse and sft killed with SIGKILL at chosen system calls.

strace delivers SIGKILL when the process enters the N-th call of a syscall (mid shard write, at the publishing
rename, at the atomic exchange, while the old folder is being deleted, between checkpoint writes). Afterwards the
destination must be absent or complete and loadable, and the next run must work: a new claim (no stale lock, stale
temporaries cleaned) or `sft --resume`.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys

import mlx.core as mx
import pytest
from click.testing import CliRunner

from llama2_mlx.cli import cli
from llama2_mlx.loading import load
from llama2_mlx.model_folder import load_model

CLI = [sys.executable, "-c", "from llama2_mlx.cli import main; main()"]


def killed_at(syscall: str, when: int, *args) -> None:
    command = ["strace", "-f", "-o", "/dev/null", "-e", f"inject={syscall}:signal=KILL:when={when}", *CLI,
               *map(str, args)]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0, f"{syscall}:{when} was never reached: {result.stderr}"


def weights_digest(folder) -> str:
    return hashlib.sha256(b"".join(p.read_bytes() for p in sorted(folder.glob("*.safetensors")))).hexdigest()


def visible(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if not p.name.startswith("."))


def absent_or_complete(dst, expected_digests) -> bool:
    """True when DST is complete (loads, weights equal to one expected version); False when absent."""
    if not dst.exists():
        return False
    load_model(dst)
    load(dst)  # tokenizer too
    assert weights_digest(dst) in expected_digests
    return True


@pytest.mark.parametrize("syscall, when", [("pwrite64", 11), ("renameat2", 1), ("unlink", 1)])
def test_convert_killed(tmp_path, tiny_model_dir, syscall, when):
    dst = tmp_path / "dst"
    killed_at(syscall, when, "convert", tiny_model_dir, dst)
    expected = {weights_digest(tiny_model_dir)}
    assert absent_or_complete(dst, expected) == (syscall == "unlink")  # unlink: the lock, after publishing
    result = CliRunner().invoke(cli, ["convert", str(tiny_model_dir), str(dst), "--force"])
    assert result.exit_code == 0, result.output
    assert absent_or_complete(dst, expected) and sorted(p.name for p in tmp_path.iterdir()) == ["dst"]


@pytest.mark.parametrize("syscall, when, kept", [("renameat2", 1, "old"), ("unlinkat", 1, "new")])
def test_convert_force_killed_keeps_old_or_new(tmp_path, tiny_model_dir, syscall, when, kept):
    """Replacing a float32 DST by a float16 one, killed at the exchange (the old one stays) or while the old one
    is deleted after it (the new one is there)."""
    dst, f16 = tmp_path / "dst", tmp_path / "f16"
    assert CliRunner().invoke(cli, ["convert", str(tiny_model_dir), str(dst)]).exit_code == 0
    assert (
        CliRunner().invoke(cli, ["convert", str(tiny_model_dir), str(f16), "--dtype", "float16"]).exit_code
        == 0
    )
    digests = {"old": weights_digest(dst), "new": weights_digest(f16)}
    killed_at(syscall, when, "convert", tiny_model_dir, dst, "--force", "--dtype", "float16")
    assert absent_or_complete(dst, {digests[kept]})
    result = CliRunner().invoke(cli, ["convert", str(tiny_model_dir), str(dst), "--force"])
    assert result.exit_code == 0 and sorted(p.name for p in tmp_path.iterdir()) == ["dst", "f16"]


@pytest.fixture
def adapter(tmp_path, tiny_model_dir):
    data = tmp_path / "data.jsonl"
    rows = [{"prompt": f"what is {i} plus {i}", "completion": f"{2 * i}"} for i in range(6)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "adapter"
    result = CliRunner().invoke(cli, ["sft", str(tiny_model_dir), "--data", str(data), "--out", str(out), "--iters",
                                      "1", "--batch-size", "2", "--seq-len", "32", "--lr", "1e-2", "--no-progress"])  # fmt: skip
    assert result.exit_code == 0, result.output
    return out


@pytest.mark.parametrize("syscall, when", [("pwrite64", 5), ("renameat2", 1)])
def test_fuse_killed(tmp_path, tiny_model_dir, adapter, syscall, when):
    dst = tmp_path / "fused"
    killed_at(syscall, when, "fuse", tiny_model_dir, "--adapter", adapter, "--out", dst)
    assert not dst.exists()
    result = CliRunner().invoke(
        cli, ["fuse", str(tiny_model_dir), "--adapter", str(adapter), "--out", str(dst)]
    )
    assert result.exit_code == 0, result.output
    load_model(dst)
    assert "fused" in visible(tmp_path) and not [p for p in tmp_path.iterdir() if p.name.startswith(".fused")]


@pytest.mark.parametrize(
    "syscall, when",
    [
        ("renameat2", 1),  # publishing the first checkpoint: none exists yet
        ("renameat2", 3),  # exchanging the third for the second
        ("unlinkat", 2),  # deleting the replaced checkpoint
        ("rename", 4),  # replacing adapters.safetensors / metrics.jsonl files
    ],
)
def test_sft_killed_then_resumed(tmp_path, tiny_model_dir, syscall, when):
    data = tmp_path / "data.jsonl"
    rows = [{"prompt": f"what is {i} plus {i}", "completion": f"{2 * i}"} for i in range(6)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out, full = tmp_path / "run", tmp_path / "full"
    args = ["sft", tiny_model_dir, "--data", data, "--iters", "4", "--save-every", "1", "--report-every", "1",
            "--batch-size", "2", "--seq-len", "32", "--lr", "1e-2", "--no-progress"]  # fmt: skip
    killed_at(syscall, when, *args, "--out", out)
    state = out / "checkpoint" / "trainer_state.json"
    if state.exists():  # whatever checkpoint is there is whole
        step = json.loads(state.read_text())["step"]
        assert set(mx.load(str(out / "checkpoint" / "trainable.safetensors"))) and 1 <= step <= 4
    result = CliRunner().invoke(cli, [*map(str, args), "--out", str(out), "--resume"])
    assert result.exit_code == 0 and "done: 4 steps" in result.output, result.output
    assert CliRunner().invoke(cli, [*map(str, args), "--out", str(full)]).exit_code == 0
    load(tiny_model_dir, adapter=out)
    a = mx.load(str(out / "adapters.safetensors"))
    b = mx.load(str(full / "adapters.safetensors"))
    for name in b:  # resumed = uninterrupted
        assert mx.allclose(a[name], b[name], rtol=1e-5, atol=1e-7).item(), name
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]
    shutil.rmtree(full)
