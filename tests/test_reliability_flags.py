"""Issue 13, items 15-17: OS errors and bad flag values give one line; folders honour the umask; metrics.jsonl
after a resume equals an uninterrupted run's."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys

import pytest
from click.testing import CliRunner

from llama2_mlx.cli import cli
from llama2_mlx.data import Batcher
from llama2_mlx.lora import LoRAConfig, apply_lora
from llama2_mlx.losses import next_token_loss
from llama2_mlx.optim import OptimizerConfig, make_optimizer
from llama2_mlx.trainer import Callback, TrainConfig, train
from tests.conftest import random_model, tiny_args
from tests.test_resume import examples

CLI = [sys.executable, "-c", "from llama2_mlx.cli import main; main()"]


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def one_error_line(output: str) -> str:
    lines = output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in output, output
    return lines[0]


@pytest.fixture
def data(tmp_path):
    row = {
        "messages": [{"role": "user", "content": "what is 1 plus 2"}, {"role": "assistant", "content": "3"}]
    }
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps(row) + "\n")
    return path


@pytest.mark.parametrize(
    "flag, value, expected",
    [
        ("--seed", "-1", "seed (--seed) must be at least 0"),
        ("--seed", str(2**40), "seed (--seed) must be at most 4294967295"),
        ("--lr", "nan", "lr (--lr) must be a finite number, got nan"),
        ("--lr", "inf", "lr (--lr) must be a finite number, got inf"),
        ("--alpha", "-inf", "alpha (--alpha) must be a finite number"),
        ("--report-every", "0", "report_every (--report-every) must be at least 1"),
        ("--clip-norm", "-1", "clip_norm (--clip-norm) must be at least 0"),
        ("--batch-size", "0", "batch_size (--batch-size) must be at least 1"),
        ("--valid-fraction", "1", "valid_fraction (--valid-fraction) must be at most 0.99"),
    ],
)
def test_16_bad_flag_values_are_one_line_before_anything_is_written(tmp_path, data, tiny_model_dir, flag, value,
                                                                      expected):  # fmt: skip
    out = tmp_path / "run"
    result = invoke("sft", tiny_model_dir, "--data", data, "--out", out, "--iters", "1", flag, value)
    assert result.exit_code == 1 and expected in one_error_line(result.output)
    assert not out.exists()


def test_16_yaml_numbers_written_as_strings_work(tmp_path, data, tiny_model_dir):
    config = tmp_path / "c.yaml"
    config.write_text("lr: 1e-4\niters: 1\nbatch_size: 1\nseq_len: 32\nprogress: false\n")
    result = invoke("sft", tiny_model_dir, "--data", data, "--out", tmp_path / "run", "-c", config)
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "run" / "sft_config.json").read_text())["lr"] == 1e-4
    config.write_text("lr: fast\n")
    result = invoke("sft", tiny_model_dir, "--data", data, "--out", tmp_path / "run2", "-c", config)
    assert "'lr' must be a number, got 'fast'" in one_error_line(result.output)
    config.write_text("lr: .nan\n")
    result = invoke("sft", tiny_model_dir, "--data", data, "--out", tmp_path / "run2", "-c", config)
    assert "lr (--lr) must be a finite number, got nan" in one_error_line(result.output)


def test_15_os_errors_are_one_line_naming_the_path(tmp_path, tiny_model_dir):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    result = invoke("convert", tiny_model_dir, blocker / "dst")
    assert one_error_line(result.output) == f"error: {blocker}: Not a directory"
    assert blocker.read_text() == "not a folder"
    # a full disk while the shards are written: strace makes every pwrite fail with ENOSPC
    dst = tmp_path / "dst"
    command = ["strace", "-f", "-o", "/dev/null", "-e", "inject=pwrite64:error=ENOSPC", *CLI, "convert",
               str(tiny_model_dir), str(dst)]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True)
    line = one_error_line(result.stderr)
    assert result.returncode == 1 and line.endswith("shard-00000.tmp.safetensors: No space left on device"), (
        line
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]  # nothing partial
    # a read-only file system (we may run as root, so chmod would not stop us): mkdir fails with EROFS
    command = ["strace", "-f", "-o", "/dev/null", "-e", "inject=mkdir:error=EROFS", *CLI, "convert",
               str(tiny_model_dir), str(dst)]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True)
    line = one_error_line(result.stderr)
    assert result.returncode == 1 and line.endswith(": Read-only file system") and str(tmp_path) in line, line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def test_17_written_folders_honour_the_umask(tmp_path, data, tiny_model_dir):
    previous = os.umask(0o022)
    try:
        assert invoke("convert", tiny_model_dir, tmp_path / "model").exit_code == 0
        result = invoke("sft", tiny_model_dir, "--data", data, "--out", tmp_path / "run", "--iters", "1",
                        "--batch-size", "1", "--seq-len", "32", "--no-progress")  # fmt: skip
        assert result.exit_code == 0, result.output
    finally:
        os.umask(previous)
    for path in [tmp_path / "model", tmp_path / "run", tmp_path / "run" / "checkpoint"]:
        assert stat.S_IMODE(path.stat().st_mode) == 0o755, path
        for file in path.iterdir():
            if file.is_file():
                assert stat.S_IMODE(file.stat().st_mode) == 0o644, file


def run(out_dir, resume=False, callbacks=()):
    model = random_model(tiny_args())
    apply_lora(model, LoRAConfig(rank=4, dropout=0.3, targets=["q", "v"]))
    batches = Batcher(examples(), batch_size=2, seq_len=32, seed=5)
    optimizer = make_optimizer(OptimizerConfig(lr=5e-3, warmup=2), 9)
    config = TrainConfig(
        iters=9, report_every=3, save_every=2, out_dir=out_dir, resume=resume, progress=False
    )
    return train(model, optimizer, next_token_loss, batches, config, callbacks=callbacks)


def test_17_metrics_after_resume_equal_an_uninterrupted_run(tmp_path):
    """Interrupted at step 2 (inside the first report window) and resumed: the same records."""
    run(tmp_path / "full")

    class InterruptAfterStep(Callback):
        sent = False

        def on_checkpoint(self, step, folder):
            if not self.sent:  # Ctrl-C during step 2's checkpoint: the loop stops there, mid report window
                self.sent = True
                os.kill(os.getpid(), signal.SIGINT)

    assert run(tmp_path / "split", callbacks=[InterruptAfterStep()]).status == "interrupted"
    with (tmp_path / "split" / "metrics.jsonl").open("a") as file:
        file.write('{"step": 5, "loss": 1.0, "lr"')  # a torn last line, as a power cut leaves it
    assert run(tmp_path / "split", resume=True).status == "finished"

    def records(name):
        lines = (tmp_path / name / "metrics.jsonl").read_text().splitlines()
        return [{k: v for k, v in json.loads(line).items() if k not in ("tokens_per_sec", "peak_memory_gb")}
                for line in lines]  # fmt: skip

    full, split = records("full"), records("split")
    assert [r["step"] for r in full] == [3, 6, 9] and len(split) == len(full)
    for a, b in zip(full, split, strict=True):
        assert a["trained_tokens"] == b["trained_tokens"] and a["lr"] == pytest.approx(b["lr"], rel=1e-6)
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
