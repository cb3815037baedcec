"""Data parallel through mx.distributed: 2 local processes give the losses of 1 process on the combined batch."""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from tests import distributed_worker

ROOT = Path(__file__).resolve().parents[1]


def launcher() -> str:
    """mlx.launch beside this Python (the console script of the mlx package), else on PATH."""
    beside = Path(sys.executable).parent / "mlx.launch"
    found = str(beside) if beside.is_file() else shutil.which("mlx.launch")
    if found is None:
        pytest.fail("mlx.launch not found; it ships with the mlx package")
    return found


def test_two_processes_equal_one_process_on_the_combined_batch(tmp_path):
    two = tmp_path / "two"
    two.mkdir()
    port = str(random.Random(os.getpid()).randint(20000, 40000))
    command = [launcher(), "-n", "2", "--starting-port", port, "--", sys.executable,
               str(ROOT / "tests" / "distributed_worker.py"), str(two)]  # fmt: skip
    # mlx.launch exits 0 even when a rank fails, so the proof is in the files each rank writes
    run = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=180)
    outputs = [two / f"losses_rank{r}.json" for r in (0, 1)]
    assert all(p.is_file() for p in outputs), run.stdout + run.stderr

    one = tmp_path / "one"
    one.mkdir()
    distributed_worker.main(one)
    expected = json.loads((one / "losses_rank0.json").read_text())
    for path in outputs:
        got = json.loads(path.read_text())
        assert [r["step"] for r in got] == [r["step"] for r in expected]
        for mine, theirs in zip(got, expected, strict=True):
            key = "val_loss" if "val_loss" in theirs else "loss"
            assert mine[key] == pytest.approx(theirs[key], rel=1e-5), (mine, theirs)

    def tokens(history):
        return [r["trained_tokens"] for r in history if "loss" in r]

    assert tokens(json.loads(outputs[0].read_text())) == tokens(expected)  # tokens of both ranks are counted

    # only rank 0 writes the run folder, and it holds what one process writes
    assert (two / "run" / "checkpoint" / "trainer_state.json").is_file()
    assert json.loads((two / "run" / "checkpoint" / "trainer_state.json").read_text())["world_size"] == 2
    assert len((two / "run" / "metrics.jsonl").read_text().splitlines()) == len(expected)

    # Plain SGD (no clipping): the applied update of 2 ranks equals that of 1 process on the combined batch.
    # Guards against: the all-reduced gradient being a mean over ranks (halved) instead of a sum divided by the
    # total token count; AdamW and clipping would hide that uniform scale.
    single = mx.load(str(one / "sgd_rank0.safetensors"))
    assert any(
        name.endswith("lora_b") and mx.abs(value).max().item() > 1e-3 for name, value in single.items()
    )
    for rank in (0, 1):
        trained = mx.load(str(two / f"sgd_rank{rank}.safetensors"))
        assert sorted(trained) == sorted(single)
        for name, value in single.items():
            np.testing.assert_allclose(
                np.array(trained[name]), np.array(value), rtol=1e-4, atol=1e-6, err_msg=name
            )


def test_train_rm_on_two_processes_equals_one(tmp_path, tiny_model_dir):
    """`mlx.launch -n 2 llama2-mlx train-rm ...` trains the reward model one process trains on the same global
    batches (each rank scores its half of the pairs; the loss sums and pair counts are all-reduced)."""
    rows = [{"prompt": f"what is {i} plus {i + 1}", "chosen": f"the answer is {2 * i + 1}",
             "rejected": "dog" if i % 2 else f"the answer is {2 * i}", "rating": "better" if i % 2 else "slightly_better"}
            for i in range(16)]  # fmt: skip
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))

    def args(out):
        return ["cli.py", "train-rm", str(tiny_model_dir), "--data", str(data), "--out", str(out), "--iters", "3",
                "--batch-size", "4", "--lr", "1e-2", "--seq-len", "128", "--no-progress"]  # fmt: skip

    port = str(random.Random(os.getpid() + 1).randint(20000, 40000))
    run = subprocess.run([launcher(), "-n", "2", "--starting-port", port, "--", sys.executable, *args(tmp_path / "two")],
                         cwd=ROOT, capture_output=True, text=True, timeout=180)  # fmt: skip
    assert (tmp_path / "two" / "score.safetensors").is_file(), run.stdout + run.stderr
    one = subprocess.run([sys.executable, *args(tmp_path / "one")], cwd=ROOT, capture_output=True, text=True,
                         timeout=180)  # fmt: skip
    assert one.returncode == 0, one.stderr
    for name in ("score.safetensors", "adapters.safetensors"):
        single, double = mx.load(str(tmp_path / "one" / name)), mx.load(str(tmp_path / "two" / name))
        assert sorted(single) == sorted(double)
        for key, value in single.items():
            np.testing.assert_allclose(
                np.array(double[key]), np.array(value), rtol=1e-4, atol=1e-6, err_msg=key
            )
    state = json.loads((tmp_path / "two" / "checkpoint" / "trainer_state.json").read_text())
    assert state["world_size"] == 2
