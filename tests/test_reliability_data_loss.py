"""Issue 13, items 1-8: nothing already saved is lost or corrupted. Each test drives the CLI end to end."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys

import mlx.core as mx
import numpy as np
import pytest
from click.testing import CliRunner

from llama2_mlx.cli import cli
from llama2_mlx.destination import DestinationLock, atomic_folder
from llama2_mlx.errors import Llama2MLXError
from llama2_mlx.loading import load
from llama2_mlx.shard_writer import ShardWriter

CLI = [sys.executable, "-c", "from llama2_mlx.cli import main; main()"]


def snapshot(folder):
    """{relative path: sha256} of every file under `folder`, hidden ones included."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


@pytest.fixture
def data(tmp_path):
    rng = np.random.default_rng(0)
    rows = []
    for _ in range(8):
        a, b = (int(x) for x in rng.integers(0, 50, 2))
        rows.append({"messages": [{"role": "user", "content": f"what is {a} plus {b}"},
                                  {"role": "assistant", "content": f"{a} + {b} = {a + b}"}]})  # fmt: skip
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def sft_args(model, data, out, *extra):
    return ["sft", model, "--data", data, "--out", out, "--iters", "2", "--batch-size", "2", "--seq-len", "32",
            "--lr", "1e-3", "--no-progress", *extra]  # fmt: skip


def test_1_refused_second_sft_writes_nothing(tmp_path, tiny_model_dir, data):
    out = tmp_path / "run"
    assert invoke(*sft_args(tiny_model_dir, data, out)).exit_code == 0
    before = snapshot(out)
    for extra in ([], ["--rank", "4"], ["--resume", "--rank", "4"], ["--resume", "--alpha", "3"]):
        result = invoke(*sft_args(tiny_model_dir, data, out, *extra))
        assert result.exit_code == 1 and result.output.startswith("error: "), (extra, result.output)
        assert snapshot(out) == before, extra
    load(tiny_model_dir, adapter=out)  # the finished adapter still loads


def test_2_nan_is_caught_before_the_update_and_no_nonfinite_weights_are_saved(tmp_path, tiny_model_dir, data):
    out = tmp_path / "run"
    result = invoke(*sft_args(tiny_model_dir, data, out, "--lr", "1e3", "--save-every", "1", "--iters", "40",
                              "--clip-norm", "0"))  # fmt: skip
    assert result.exit_code == 1 and "training stopped at step" in result.output, result.output
    assert "Traceback" not in result.output
    for name in (
        "checkpoint/trainable.safetensors",
        "checkpoint/optimizer.safetensors",
        "adapters.safetensors",
    ):
        for key, array in mx.load(str(out / name)).items():
            assert mx.all(mx.isfinite(array)).item(), (name, key)
    step = json.loads((out / "checkpoint" / "trainer_state.json").read_text())["step"]
    assert f"stopped at step {step + 1}" in result.output  # the last checkpoint is the step before the stop


def test_3_resume_refuses_meaning_changes_and_records_safe_ones(tmp_path, tiny_model_dir, data):
    out = tmp_path / "run"
    assert invoke(*sft_args(tiny_model_dir, data, out)).exit_code == 0
    before = snapshot(out)
    for flag, value in (("--rank", "4"), ("--alpha", "3"), ("--lr", "2e-3"), ("--batch-size", "4"),
                        ("--pack", None), ("--seq-len", "64")):  # fmt: skip
        extra = ["--resume", flag] + ([value] if value else [])
        result = invoke(*sft_args(tiny_model_dir, data, out, *extra))
        name = flag[2:].replace("-", "_")
        assert result.exit_code == 1 and f"changed {name} (" in result.output, (flag, result.output)
        assert snapshot(out) == before
    other = tmp_path / "other.jsonl"
    other.write_text(data.read_text().replace("plus", "and"))
    shutil.copy(other, data)  # same path, other content
    result = invoke(*sft_args(tiny_model_dir, data, out, "--resume", "--iters", "3"))
    assert result.exit_code == 1 and "changed data_fingerprint" in result.output


def test_3_more_iters_is_allowed_and_recorded(tmp_path, tiny_model_dir, data):
    out = tmp_path / "run"
    assert invoke(*sft_args(tiny_model_dir, data, out)).exit_code == 0
    result = invoke(*sft_args(tiny_model_dir, data, out, "--resume", "--iters", "3"))
    assert result.exit_code == 0 and "done: 3 steps" in result.output, result.output
    records = [json.loads(line) for line in (out / "resumes.jsonl").read_text().splitlines()]
    assert records == [{"step": 2, "changed": {"iters": [2, 3]}}]
    assert json.loads((out / "sft_config.json").read_text())["iters"] == 3
    load(tiny_model_dir, adapter=out)


def test_4_outputs_onto_an_existing_model_folder_are_refused(tmp_path, tiny_model_dir, tokenizer_dir, data):
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    before = snapshot(model)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("hello world\nthe quick brown fox\n" * 20)
    adapter = tmp_path / "adapter"
    assert invoke(*sft_args(tiny_model_dir, data, adapter)).exit_code == 0
    pretrain = ["pretrain", "--config", "tiny", "--data", corpus, "--tokenizer", tokenizer_dir, "--out", model,
                "--iters", "1", "--batch-size", "1", "--seq-len", "16", "--no-progress"]  # fmt: skip
    commands = [
        sft_args(tiny_model_dir, data, model),
        sft_args(tiny_model_dir, data, model, "--resume"),
        pretrain,
        ["fuse", tiny_model_dir, "--adapter", adapter, "--out", model],
        ["fuse", model, "--adapter", adapter, "--out", model, "--force"],  # its input, even with --force
        sft_args(model, data, model, "--force"),
    ]
    for command in commands:
        result = invoke(*command)
        assert result.exit_code == 1 and result.output.startswith("error: "), (command, result.output)
        assert snapshot(model) == before, command
    load(model)


def test_5_a_destination_that_appears_meanwhile_is_kept(tmp_path, tiny_model_dir, monkeypatch):
    dst = tmp_path / "dst"
    original = ShardWriter.__enter__

    def appear(self):  # another program creates DST while the command is writing its shards
        dst.mkdir()
        (dst / "theirs.txt").write_text("precious")
        return original(self)

    monkeypatch.setattr(ShardWriter, "__enter__", appear)
    for command in (["convert", tiny_model_dir, dst], ["export", tiny_model_dir, dst]):
        result = invoke(*command)
        assert result.exit_code == 1 and "appeared while this command was writing it" in result.output
        assert snapshot(dst) == {"theirs.txt": hashlib.sha256(b"precious").hexdigest()}
        assert sorted(p.name for p in tmp_path.iterdir()) == ["dst"]  # no temporary left
        shutil.rmtree(dst)


def test_5_6_a_claimed_destination_or_run_folder_refuses_a_second_writer(tmp_path, tiny_model_dir, data):
    dst, run = tmp_path / "dst", tmp_path / "run"
    holder = subprocess.Popen(  # a second process holds both claims, as a running convert or sft would
        [
            sys.executable,
            "-c",
            "import sys, time; from llama2_mlx.destination import DestinationLock as L; "
            f"a = L({str(dst)!r}).acquire(); b = L({str(run)!r}).acquire(); print('held', flush=True); "
            "time.sleep(60)",
        ],  # fmt: skip
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        result = invoke("convert", tiny_model_dir, dst)
        assert (
            result.exit_code == 1
            and f"in use by another llama2-mlx process (pid {holder.pid})" in result.output
        )
        assert not dst.exists()
        result = invoke(*sft_args(tiny_model_dir, data, run))
        assert (
            result.exit_code == 1
            and f"in use by another llama2-mlx process (pid {holder.pid})" in result.output
        )
        assert not run.exists()
    finally:
        holder.kill()
        holder.wait()
    assert invoke("convert", tiny_model_dir, dst).exit_code == 0  # the claim died with its process
    assert invoke(*sft_args(tiny_model_dir, data, run)).exit_code == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.jsonl", "dst", "run"]


def test_6_sft_holds_its_run_folder_while_it_trains(tmp_path, tiny_model_dir, data, monkeypatch):
    """While one sft trains, a second on the same --out is refused and the first finishes intact."""
    import llama2_mlx.trainer as trainer

    out = tmp_path / "run"
    seen = []
    original = trainer.save_checkpoint

    def second_run_meanwhile(*args, **kwargs):
        original(*args, **kwargs)
        if not seen:
            seen.append(invoke(*sft_args(tiny_model_dir, data, out, "--resume")))

    monkeypatch.setattr(trainer, "save_checkpoint", second_run_meanwhile)
    result = invoke(*sft_args(tiny_model_dir, data, out, "--save-every", "1"))
    assert result.exit_code == 0, result.output
    assert seen[0].exit_code == 1 and "in use by another llama2-mlx process" in seen[0].output
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [2]
    load(tiny_model_dir, adapter=out)


def test_7_replace_has_no_moment_without_a_destination(tmp_path, tiny_model_dir):
    """The replace is one renameat2(RENAME_EXCHANGE): failing it (EIO injected by strace) keeps the old DST."""
    dst = tmp_path / "dst"
    assert invoke("convert", tiny_model_dir, dst).exit_code == 0
    before = snapshot(dst)
    command = ["strace", "-f", "-o", "/dev/null", "-e", "inject=renameat2:error=EIO", *CLI, "convert", str(tiny_model_dir), str(dst), "--force", "--dtype", "float16"]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode == 1, result.stderr
    assert f"error: {dst}: Input/output error" in result.stderr and "Traceback" not in result.stderr
    assert snapshot(dst) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dst"]


def test_7_stale_temporaries_are_cleaned_and_a_lost_destination_is_put_back(tmp_path, tiny_model_dir):
    dst = tmp_path / "dst"
    assert invoke("convert", tiny_model_dir, dst).exit_code == 0
    before = snapshot(dst)
    (tmp_path / ".dst.dead1234.tmp").mkdir()  # a killed writer's half-written folder
    (tmp_path / ".dst.dead1234.tmp" / "model.safetensors").write_bytes(b"x" * 1000)
    dst.rename(tmp_path / ".dst.0badf00d.old")  # a crash between the fallback's two renames
    with pytest.raises(RuntimeError, match="abandoned"):
        with atomic_folder(dst, force=True):  # any claim repairs both, before writing anything
            assert snapshot(dst) == before
            assert not (tmp_path / ".dst.dead1234.tmp").exists()
            raise RuntimeError("abandoned")
    assert snapshot(dst) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dst"]


def test_7_training_checkpoints_are_replaced_atomically(tmp_path, tiny_model_dir, data):
    out = tmp_path / "run"
    assert invoke(*sft_args(tiny_model_dir, data, out)).exit_code == 0
    state = out / "checkpoint" / "trainer_state.json"
    command = ["strace", "-f", "-o", "/dev/null", "-e", "inject=renameat2:error=EIO", *CLI, *map(str, sft_args(tiny_model_dir, data, out, "--resume", "--iters", "4"))]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode == 1 and "Input/output error" in result.stderr, result.stderr
    assert json.loads(state.read_text())["step"] == 2  # the old checkpoint, whole
    assert invoke(*sft_args(tiny_model_dir, data, out, "--resume", "--iters", "4")).exit_code == 0
    assert json.loads(state.read_text())["step"] == 4
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]


def test_8_gatt_data_never_overwrites_without_force_nor_its_inputs(tmp_path, tiny_model_dir):
    dialogs = tmp_path / "d.jsonl"
    dialogs.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    instructions = tmp_path / "i.txt"
    instructions.write_text("answer in french\n")
    existing = tmp_path / "existing.jsonl"
    existing.write_text("mine\n")
    base = [
        "gatt-data",
        tiny_model_dir,
        "--dialogs",
        dialogs,
        "--instructions",
        instructions,
        "--max-tokens",
        "2",
    ]
    for out, extra in ((existing, []), (dialogs, ["--force"]), (instructions, ["--force"])):
        result = invoke(*base, "--out", out, *extra)
        assert result.exit_code == 1 and result.output.startswith("error: "), result.output
    assert existing.read_text() == "mine\n"
    assert json.loads(dialogs.read_text())["messages"][0]["content"] == "hi"
    assert invoke(*base, "--out", existing, "--force").exit_code == 0
    assert json.loads(existing.read_text())["messages"][0]["role"] == "system"
    result = invoke(*base, "--out", tmp_path / "new.jsonl", "--max-tokens", "0")
    assert result.exit_code == 1 and "--max-tokens must be at least 1" in result.output


def test_destination_api_refuses_inputs_and_busy_claims(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    with pytest.raises(Llama2MLXError, match="overlaps\\) the input"):
        with atomic_folder(src / "inside", inputs=[src]):
            pass
    with DestinationLock(tmp_path / "x"):
        with pytest.raises(Llama2MLXError, match="in use by another"):
            with atomic_folder(tmp_path / "x"):
                pass
    assert not (tmp_path / "x").exists() and not (tmp_path / ".x.lock").exists()
