"""Ghost Attention data: answers sampled with the instruction on every user turn, kept once as the system prompt."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from llama2_mlx.cli import cli
from llama2_mlx.errors import Llama2MLXError
from llama2_mlx.gatt import Instruction, build_gatt_dialogs, read_instructions
from llama2_mlx.generation import generate_batch
from llama2_mlx.loading import load


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
    (tmp_path / "d.jsonl").write_text(json.dumps({"messages": [{"role": "user", "content": "hi"},
                                                               {"role": "assistant", "content": "old"}]}) + "\n")  # fmt: skip
    (tmp_path / "i.jsonl").write_text('{"instruction": "Act as Napoleon", "short": "Figure: Napoleon"}\n')
    args = ["gatt-data", str(tiny_model_dir), "--dialogs", str(tmp_path / "d.jsonl"), "--instructions",
            str(tmp_path / "i.jsonl"), "--out", str(tmp_path / "g.jsonl"), "--max-tokens", "4"]  # fmt: skip
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert (
        "sampling [####################] 1/1 answers\n" in result.stderr
    )  # progress, one line a tenth when piped
    row = json.loads((tmp_path / "g.jsonl").read_text())
    assert row["messages"][0]["content"] in ("Act as Napoleon", "Figure: Napoleon")
    assert row["messages"][1] == {"role": "user", "content": "hi"}
    with pytest.raises(Llama2MLXError, match=r"i.txt: no instructions"):
        (tmp_path / "i.txt").write_text("\n")
        read_instructions(tmp_path / "i.txt")
