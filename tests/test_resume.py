"""Exact resume: Ctrl-C at step k then --resume gives the same losses as one uninterrupted run."""

from __future__ import annotations

import json
import os
import signal

import mlx.core as mx
import numpy as np
import pytest
from click.testing import CliRunner

from llama2_mlx.cli import cli
from llama2_mlx.data import Batcher, Example
from llama2_mlx.lora import LoRAConfig, apply_lora
from llama2_mlx.losses import next_token_loss
from llama2_mlx.optim import OptimizerConfig, make_optimizer
from llama2_mlx.trainer import Batch, Callback, TrainConfig, train
from tests.conftest import random_model, tiny_args

ITERS = 8


def examples() -> list[Example]:
    rng = np.random.default_rng(0)
    out = []
    for _ in range(10):
        ids = [1] + rng.integers(3, 384, size=int(rng.integers(6, 20))).tolist()
        out.append(Example(ids, [False] + (rng.random(len(ids) - 1) < 0.6).tolist()))
    return out


class InterruptAt(Callback):
    def __init__(self, step):
        self.step = step

    def on_report(self, record):
        if record["step"] == self.step and "loss" in record:
            os.kill(os.getpid(), signal.SIGINT)


def run(out_dir, resume=False, init_seed=0, callbacks=()):
    """LoRA with dropout (RNG), 2 epochs of shuffled batches (data position), accumulation, warmup + cosine."""
    model = random_model(tiny_args())
    mx.random.seed(init_seed)
    apply_lora(model, LoRAConfig(rank=4, dropout=0.3, targets=["q", "v", "up"]))
    batches = Batcher(examples(), batch_size=2, seq_len=32, seed=5)
    optimizer = make_optimizer(OptimizerConfig(lr=5e-3, warmup=2), ITERS)
    config = TrainConfig(iters=ITERS, grad_accum=2, report_every=1, save_every=3, out_dir=out_dir, resume=resume,
                         progress=False)  # fmt: skip
    return train(model, optimizer, next_token_loss, batches, config, callbacks=callbacks)


def losses(result):
    return {r["step"]: r["loss"] for r in result.history if "loss" in r}


def test_interrupt_and_resume_equals_uninterrupted(tmp_path):
    full = losses(run(tmp_path / "full"))
    assert len(full) == ITERS

    first = run(tmp_path / "split", callbacks=[InterruptAt(5)])
    assert first.status == "interrupted" and first.step == 5
    state = json.loads((tmp_path / "split" / "checkpoint" / "trainer_state.json").read_text())
    assert state["step"] == 5 and state["data_position"] == 10

    second = run(tmp_path / "split", resume=True, init_seed=123)  # weights and RNG come from the checkpoint
    resumed = losses(second)
    assert sorted(resumed) == list(range(6, ITERS + 1))
    for step in range(1, 6):
        assert losses(first)[step] == full[step]
    for step in resumed:
        assert resumed[step] == pytest.approx(full[step], rel=1e-6), step
    steps = [
        json.loads(line)["step"] for line in (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()
    ]
    assert steps == list(range(1, ITERS + 1))


def test_checkpoint_without_resume_is_refused(tmp_path, tiny_model_dir):
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"text": f"hello world {i}"}) + "\n" for i in range(4)))
    args = ["sft", str(tiny_model_dir), "--data", str(data), "--out", str(tmp_path / "o"), "--iters", "2",
            "--batch-size", "2", "--seq-len", "32", "--no-progress"]  # fmt: skip
    assert CliRunner().invoke(cli, args).exit_code == 0
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 1 and "holds a sft run with a checkpoint; use --resume" in result.output
    result = CliRunner().invoke(cli, [*args, "--iters", "3", "--resume"])
    assert result.exit_code == 0 and "done: 3 steps" in result.output, result.output


def test_checkpoint_restores_the_random_key(tmp_path):
    """After load_checkpoint, random draws continue exactly as they would have after the save.

    Guards against: resume not restoring the RNG key (LoRA dropout masks would differ from the uninterrupted run),
    or restoring only part of it.
    """
    from llama2_mlx.trainer import load_checkpoint, save_checkpoint

    model = random_model(tiny_args(n_layers=1))
    apply_lora(model, LoRAConfig(rank=2))
    optimizer = make_optimizer(OptimizerConfig(), 10)
    optimizer.init(model.trainable_parameters())
    mx.random.seed(2**40 + 12345)  # a key whose two 32-bit halves are both non-zero
    mx.random.uniform(shape=(3,))  # and moved on from the seed
    save_checkpoint(model, optimizer, tmp_path / "ckpt", step=3, position=3, world_size=1)
    expected = mx.random.uniform(shape=(5,)).tolist()
    mx.random.seed(7)
    assert load_checkpoint(model, optimizer, tmp_path / "ckpt") == 3
    assert mx.random.uniform(shape=(5,)).tolist() == expected


def test_resume_restarts_the_data_at_the_saved_micro_batch(tmp_path):
    """With 3 micro-batches a step, a run stopped after 2 steps resumes reading at micro-batch 6.

    Guards against: resume restarting the batch source at the step index instead of the micro-batch index.
    """
    starts = []

    def batches(start):
        starts.append(start)
        return iter(
            Batch((mx.array([[1, 2, 3, 4]]), mx.array([[False, True, True, True]])), 4) for _ in range(99)
        )

    def run_to(iters, resume):
        model = random_model(tiny_args(n_layers=1))
        config = TrainConfig(iters=iters, grad_accum=3, out_dir=tmp_path, resume=resume, progress=False)
        return train(model, make_optimizer(OptimizerConfig(), 4), next_token_loss, batches, config)

    run_to(2, resume=False)
    assert json.loads((tmp_path / "checkpoint" / "trainer_state.json").read_text())["data_position"] == 6
    assert run_to(4, resume=True).step == 4
    assert starts == [0, 6]
