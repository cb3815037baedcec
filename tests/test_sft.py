"""SFT end to end: packed == unpacked, validation loss falls, the CLI with a config file, the adapter folder."""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from click.testing import CliRunner

from llama2_mlx.cli import cli
from llama2_mlx.data import Batcher, EncodeOptions, encode_row
from llama2_mlx.loading import load
from llama2_mlx.lora import LoRAConfig, apply_lora
from llama2_mlx.losses import next_token_loss
from llama2_mlx.optim import OptimizerConfig, make_optimizer
from llama2_mlx.tokenizer import Tokenizer
from llama2_mlx.trainer import TrainConfig, train
from tests.conftest import random_model, tiny_args


def dialogs(n: int, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(n):
        a, b = (int(x) for x in rng.integers(0, 50, 2))
        rows.append({"messages": [{"role": "user", "content": f"what is {a} plus {b}"},
                                  {"role": "assistant", "content": f"{a} + {b} = {a + b}"}]})  # fmt: skip
    return rows


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def losses_of(batches, steps=3):
    model = random_model(tiny_args())
    mx.random.seed(0)
    apply_lora(model, LoRAConfig(rank=4, targets=["q", "v", "down"]))
    config = TrainConfig(iters=steps, report_every=1, progress=False)
    result = train(model, make_optimizer(OptimizerConfig(lr=1e-2), steps), next_token_loss, batches, config)
    return [r["loss"] for r in result.history]


def test_packed_equals_unpacked_with_document_mask(tokenizer_dir):
    tok = Tokenizer(tokenizer_dir / "tokenizer.model")
    examples = [encode_row(row, tok, EncodeOptions()) for row in dialogs(6)]
    longest = max(len(e.ids) for e in examples)
    unpacked = Batcher(examples, batch_size=6, seq_len=128)
    packed = Batcher(examples, batch_size=6, seq_len=2 * longest + 8, packing=True)
    assert len(unpacked) == 1 and len(packed) == 1 and next(packed(0)).inputs[0].shape[0] < 6
    expected, got = losses_of(unpacked), losses_of(packed)
    assert got == pytest.approx(expected, rel=1e-4)
    assert expected[-1] < expected[0]
    plain = losses_of(
        Batcher(examples, batch_size=6, seq_len=2 * longest + 8, packing=True, document_mask=False)
    )
    assert plain[0] != pytest.approx(expected[0], rel=1e-4)  # attention across examples changes the loss


def test_sft_cli_lowers_validation_loss_and_writes_an_adapter(tmp_path, tiny_model_dir):
    data = tmp_path / "data"
    data.mkdir()
    write_jsonl(data / "train.jsonl", dialogs(32, seed=1))
    write_jsonl(data / "valid.jsonl", dialogs(8, seed=2))
    (tmp_path / "sft.yaml").write_text(
        "rank: 4\nlr: 0.001\nbatch_size: 8\nseq_len: 64\niters: 4\ntargets: [q, v]\n"
    )
    out = tmp_path / "adapter"
    args = ["sft", str(tiny_model_dir), "--data", str(data), "--out", str(out), "-c", str(tmp_path / "sft.yaml"),
            "--lr", "1e-2", "--iters", "24", "--eval-every", "12", "--save-every", "12", "--no-progress",
            "--targets", "q,v,o,gate,up,down"]  # fmt: skip
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert "done: 24 steps" in result.output
    assert (
        "data: 40 examples; 32 for training, 8 for validation; 4 batches per epoch, 24 steps" in result.output
    )
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    vals = [r["val_loss"] for r in records if "val_loss" in r]
    assert [r["step"] for r in records if "val_loss" in r] == [0, 12, 24]
    assert vals[-1] < vals[0] - 1.0
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["rank"] == 4 and config["targets"] == ["q", "v", "o", "gate", "up", "down"]  # file < flags
    assert json.loads((out / "sft_config.json").read_text())["lr"] == 1e-2

    model, tok = load(tiny_model_dir, adapter=out)  # the adapter reproduces the final validation loss
    examples = [encode_row(row, tok, EncodeOptions()) for row in dialogs(8, seed=2)]
    total, weight = next_token_loss(model, *next(Batcher(examples, 8, 64).once()).inputs)
    assert (total / weight).item() == pytest.approx(vals[-1], rel=1e-4)


def test_sft_cli_errors_are_one_line(tmp_path, tiny_model_dir):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"messages": []}\n')
    result = CliRunner().invoke(
        cli, ["sft", str(tiny_model_dir), "--data", str(bad), "--out", str(tmp_path / "o")]
    )
    assert result.exit_code == 1
    assert (
        result.output.strip()
        == f"error: {bad}:2: 'messages' must be a non-empty list (use --skip-bad-lines to skip such lines)"
    )
    result = CliRunner().invoke(cli, ["sft", str(tiny_model_dir), "--out", str(tmp_path / "o")])
    assert result.exit_code == 2 and "missing --data" in result.output
    (tmp_path / "c.yaml").write_text("rnak: 4\n")
    result = CliRunner().invoke(
        cli, ["sft", "--data", str(bad), "--out", "o", "-c", str(tmp_path / "c.yaml")]
    )
    assert result.exit_code == 1 and "unknown key 'rnak'" in result.output


def test_qlora_and_full_fine_tuning_from_the_cli(tmp_path, tokenizer_dir):
    import mlx.nn as nn

    from llama2_mlx.model_folder import load_model, save_model

    quantized = random_model(tiny_args())
    nn.quantize(quantized, group_size=32, bits=4)
    q4 = save_model(quantized, tmp_path / "q4", tokenizer_dir=tokenizer_dir)
    data = write_jsonl(tmp_path / "d.jsonl", dialogs(8))
    common = [
        "--data",
        str(data),
        "--iters",
        "3",
        "--batch-size",
        "4",
        "--seq-len",
        "64",
        "--lr",
        "1e-2",
        "--no-progress",
    ]
    result = CliRunner().invoke(cli, ["sft", str(q4), "--out", str(tmp_path / "qlora"), *common])
    assert result.exit_code == 0, result.output
    model, _ = load(q4, adapter=tmp_path / "qlora")
    assert isinstance(model.layers[0].self_attn.q_proj.linear, nn.QuantizedLinear)
    assert mx.abs(model.layers[0].self_attn.q_proj.lora_b).max().item() > 0
    result = CliRunner().invoke(cli, ["sft", str(q4), "--out", str(tmp_path / "bad"), "--full", *common])
    assert result.exit_code == 1 and "full fine-tuning needs a float model" in result.output

    base = save_model(random_model(tiny_args()), tmp_path / "f32", tokenizer_dir=tokenizer_dir)
    result = CliRunner().invoke(cli, ["sft", str(base), "--out", str(tmp_path / "full"), "--full", *common])
    assert result.exit_code == 0, result.output
    tuned, before = load_model(tmp_path / "full"), load_model(base)
    assert (tmp_path / "full" / "tokenizer.model").is_file()
    assert not mx.array_equal(tuned.model.embed_tokens.weight, before.model.embed_tokens.weight)
    assert not mx.array_equal(tuned.model.norm.weight, before.model.norm.weight)


def test_seq_len_longer_than_the_context_is_cut_with_a_warning(tmp_path, monkeypatch):
    """`sft --pack` with the default --seq-len 4096 on the 256-token demo model: rows stop at its context."""
    import llama2_mlx.data
    from llama2_mlx.loading import demo_model_path

    seen = []
    batcher = llama2_mlx.data.Batcher

    def recording_batcher(*args, **kwargs):
        seen.append(kwargs["seq_len"])
        return batcher(*args, **kwargs)

    monkeypatch.setattr(llama2_mlx.data, "Batcher", recording_batcher)
    data = Path(__file__).resolve().parents[1] / "examples" / "data" / "sft_messages.jsonl"
    result = CliRunner().invoke(cli, ["sft", str(demo_model_path()), "--data", str(data), "--out", str(tmp_path / "o"),
                                      "--pack", "--iters", "1", "--batch-size", "2", "--no-progress"])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert (
        f"warning: --seq-len 4096 is longer than {demo_model_path()}'s context (256 tokens); rows are cut to 256"
        in result.stderr
    )
    assert seen == [256]


def sft_records(tmp_path, model_dir, data, name, *flags) -> list[dict]:
    """The training reports (metrics.jsonl, every step) of a short `sft` run."""
    args = ["sft", str(model_dir), "--data", str(data), "--out", str(tmp_path / name), "--lr", "1e-2",
            "--seq-len", "128", "--report-every", "1", "--seed", "0", "--no-progress", *flags]  # fmt: skip
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if "loss" in r]


def test_sft_epoch_with_grad_accum_visits_every_example_once(tmp_path, tiny_model_dir):
    """One epoch of 16 dialogs at --batch-size 4 --grad-accum 2 (micro-batches of 2) is 4 steps that train on
    every dialog's tokens exactly once.

    Guards against: --grad-accum making every micro-batch a whole batch (8 rows a step, and 2 steps an epoch).
    """
    rows = dialogs(16, seed=3)
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    records = sft_records(
        tmp_path, tiny_model_dir, data, "a", "--batch-size", "4", "--grad-accum", "2", "--epochs", "1"
    )
    _, tok = load(tiny_model_dir)
    tokens = sum(len(encode_row(row, tok, EncodeOptions()).ids) for row in rows)
    assert [r["step"] for r in records] == [1, 2, 3, 4] and records[-1]["trained_tokens"] == tokens


def test_sft_pack_mask_flag(tmp_path, tiny_model_dir):
    """All 6 dialogs in one step: --pack with the default document mask gives the unpacked loss; --pack-mask none
    (attention across the packed dialogs) does not.

    Guards against: sft ignoring --pack-mask none (or --pack).
    """
    data = write_jsonl(tmp_path / "d.jsonl", dialogs(6, seed=4))

    def first_loss(name, *flags):
        return sft_records(tmp_path, tiny_model_dir, data, name, "--batch-size", "6", "--iters", "1", *flags)[
            0
        ]["loss"]

    unpacked = first_loss("unpacked")
    assert first_loss("packed", "--pack") == pytest.approx(unpacked, rel=1e-4)
    assert first_loss("none", "--pack", "--pack-mask", "none") != pytest.approx(unpacked, rel=1e-3)
