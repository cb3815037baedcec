"""Ghost Attention data: answers sampled with the instruction on every user turn, kept once as the system prompt."""

from __future__ import annotations

import json

import mlx.core as mx
import pytest
from click.testing import CliRunner

from llama2_mlx.cli import cli
from llama2_mlx.data import EncodeOptions, encode_row
from llama2_mlx.errors import Llama2MLXError
from llama2_mlx.gatt import Instruction, build_gatt_dialogs, read_instructions
from llama2_mlx.generation import generate_batch
from llama2_mlx.loading import load
from llama2_mlx.losses import next_token_loss


def test_answers_are_sampled_with_the_instruction_on_every_turn(tiny_model_dir):
    model, tok = load(tiny_model_dir)
    dialogs = [["hello", "what is 2 plus 2"], ["count letters"]]
    built = build_gatt_dialogs(
        model, tok, dialogs, [Instruction("answer in french")], max_tokens=6, temperature=0.0
    )
    first = built[0]
    assert first[0] == {"role": "system", "content": "answer in french"}
    assert [m["content"] for m in first if m["role"] == "user"] == ["hello", "what is 2 plus 2"]
    assert [m["role"] for m in first] == ["system", "user", "assistant", "user", "assistant"]
    # greedy answers equal what the model says when the instruction follows every user message
    a1 = generate_batch(model, tok, [[{"role": "user", "content": "hello answer in french"}]], max_tokens=6)[
        0
    ][0]
    assert first[2]["content"] == (a1.strip() or "...")
    prompt = [{"role": "user", "content": "hello answer in french"}, {"role": "assistant", "content": first[2]["content"]},
              {"role": "user", "content": "what is 2 plus 2 answer in french"}]  # fmt: skip
    a2 = generate_batch(model, tok, [prompt], max_tokens=6)[0][0]
    assert first[4]["content"] == (a2.strip() or "...")
    assert len(built[1]) == 3


def test_gatt_data_cli_output_trains_with_sft_gatt(tmp_path, tiny_model_dir):
    """`gatt-data` writes dialogs that `sft --gatt` trains on, and --gatt trains the last answer only: the first
    reported loss (before any update; LoRA starts as the base model) is the base model's loss on that answer.

    Guards against: sft ignoring --gatt (every answer of the dialog would be trained).
    """
    dialog = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "old"},
              {"role": "user", "content": "what is 2 plus 2"}, {"role": "assistant", "content": "old"}]  # fmt: skip
    (tmp_path / "d.jsonl").write_text(json.dumps({"messages": dialog}) + "\n")
    (tmp_path / "i.jsonl").write_text('{"instruction": "Act as Napoleon", "short": "Figure: Napoleon"}\n')
    args = ["gatt-data", str(tiny_model_dir), "--dialogs", str(tmp_path / "d.jsonl"), "--instructions",
            str(tmp_path / "i.jsonl"), "--out", str(tmp_path / "g.jsonl"), "--max-tokens", "4", "--seed", "1"]  # fmt: skip
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert (
        "sampling [####################] 2/2 answers\n" in result.stderr
    )  # progress, one line a tenth when piped
    row = json.loads((tmp_path / "g.jsonl").read_text())
    assert row["messages"][0]["content"] in ("Act as Napoleon", "Figure: Napoleon")
    assert [m["content"] for m in row["messages"][1::2]] == ["hi", "what is 2 plus 2"]

    args = ["sft", str(tiny_model_dir), "--data", str(tmp_path / "g.jsonl"), "--out", str(tmp_path / "a"), "--gatt",
            "--iters", "1", "--batch-size", "1", "--seq-len", "256", "--report-every", "1", "--no-progress"]  # fmt: skip
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    first_loss = json.loads((tmp_path / "a" / "metrics.jsonl").read_text().splitlines()[0])["loss"]
    model, tok = load(tiny_model_dir)

    def loss_of(options):
        example = encode_row(row, tok, options)
        total, weight = next_token_loss(model, mx.array([example.ids]), mx.array([example.mask]))
        return (total / weight).item()

    assert first_loss == pytest.approx(loss_of(EncodeOptions(gatt=True)), rel=1e-4)
    assert first_loss != pytest.approx(loss_of(EncodeOptions()), rel=1e-3)


def test_no_instructions_is_an_error(tmp_path):
    (tmp_path / "i.txt").write_text("\n")
    with pytest.raises(Llama2MLXError, match=r"i.txt: no instructions"):
        read_instructions(tmp_path / "i.txt")
