"""`llama2-mlx eval`: scoring held-out world dialogs (exact counts on hand-made answers) and the command itself."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from llama2_mlx.cli import cli
from llama2_mlx.errors import Llama2MLXError
from llama2_mlx.evaluation import (
    _cut_at_tag,
    answer_heldout,
    parse_heldout,
    read_heldout,
    score,
    world_heldout,
)
from llama2_mlx.generation import generate
from llama2_mlx.loading import load

ARITHMETIC = {
    "messages": [{"role": "user", "content": "What is 12 + 7?"}],
    "skill": "arithmetic",
    "check": {"type": "arithmetic", "expected": 19},
}
COUNTING = {
    "messages": [{"role": "user", "content": "How many r are in carrot?"}],
    "skill": "counting",
    "check": {"type": "count", "word": "carrot", "letter": "r", "expected": 2},
    "follow_ups": [
        {"content": "And the letter t?", "skill": "follow_up",
         "check": {"type": "count", "word": "carrot", "letter": "t", "expected": 1}},
        {"content": "And the letter a?", "skill": "follow_up",
         "check": {"type": "count", "word": "carrot", "letter": "a", "expected": 1}},
    ],
}  # fmt: skip
CAPITALS = {
    "messages": [{"role": "system", "content": "Answer in capitals."},
                 {"role": "user", "content": "What is the capital of Norland?"}],
    "skill": "lookup",
    "check": {"type": "lookup", "table": "capitals", "key": "Norland", "expected": "Vesk"},
    "style": "capitals",
    "follow_ups": [
        {"content": "And Brask?", "skill": "follow_up",
         "check": {"type": "lookup", "table": "capitals", "key": "Brask", "expected": "Tolm"}},
        {"content": "What colour is snow?", "skill": "lookup",
         "check": {"type": "lookup", "table": "colours", "key": "snow", "expected": "white"}},
    ],
}  # fmt: skip


def test_score_counts_right_answers_per_skill_and_style_per_turn():
    items = [parse_heldout(record) for record in (ARITHMETIC, COUNTING, CAPITALS)]
    answers = [
        ["12 + 7 = 19."],
        ["c-a-r-r-o-t has 2 r.", "c-a-r-r-o-t has 2 t.", "c-a-r-r-o-t has 1 a."],
        ["THE CAPITAL OF NORLAND IS VESK.", "The capital of Brask is Tolm.", "SNOW IS BLACK."],
    ]
    report = score(items, answers)
    got = {skill: (t.right, t.total) for skill, t in report.skills.items()}
    assert got == {"arithmetic": (1, 1), "counting": (1, 1), "follow_up": (2, 3), "lookup": (1, 2)}
    assert (report.overall.right, report.overall.total) == (5, 7)
    assert {n: (t.right, t.total) for n, t in report.style_turns.items()} == {1: (1, 1), 2: (0, 1), 3: (1, 1)}
    summary = report.to_json()
    assert summary["task_accuracy"]["follow_up"] == {"right": 2, "total": 3, "accuracy": 2 / 3}
    assert summary["style_adherence_by_turn"]["2"]["accuracy"] == 0.0


def test_answers_are_cut_at_a_template_tag():
    assert _cut_at_tag("12 + 7 = 19. [INST] What is 1 + 1? [/INST]") == "12 + 7 = 19. "
    assert _cut_at_tag("fine <</SYS>> x") == "fine "
    assert _cut_at_tag("12 + 7 = 19.") == "12 + 7 = 19."


@pytest.mark.parametrize(
    "line, message",
    [
        ("{not json", "not valid JSON"),
        ('{"messages": [], "skill": "x", "check": {}}', "'messages' must be a non-empty list"),
        ('{"messages": [{"role": "system", "content": "hi"}], "skill": "x"}', "must end with a user message"),
        ('{"messages": [{"role": "user", "content": "hi"}], "skill": "x", "check": {"type": "count"}}',
         "missing field 'expected'"),
        ('{"messages": [{"role": "user", "content": "hi"}], "skill": "x", "style": "pirate",'
         ' "check": {"type": "arithmetic", "expected": 1}}', "unknown style 'pirate'"),
        ('{"messages": [{"role": "user", "content": "hi"}], "skill": "x", "check": {"type": "arithmetic",'
         ' "expected": 1}, "follow_ups": [{"content": "and?"}]}', "follow_ups\\[0\\]: needs a string 'content'"),
    ],
)  # fmt: skip
def test_bad_heldout_lines_name_the_file_and_line(tmp_path, line, message):
    path = tmp_path / "heldout.jsonl"
    path.write_text(json.dumps(ARITHMETIC) + "\n" + line + "\n")
    with pytest.raises(Llama2MLXError, match=f"heldout.jsonl:2: .*{message}"):
        read_heldout(path)


def test_multi_turn_answers_feed_back_the_models_own_answers(tiny_model_dir):
    """Batched, turn-by-turn answers equal answering each dialog alone with its own history."""
    model, tok = load(tiny_model_dir)
    items = [parse_heldout(record) for record in (COUNTING, ARITHMETIC, CAPITALS)]
    answers = answer_heldout(model, tok, items, max_tokens=6, batch_size=2)
    assert [len(a) for a in answers] == [3, 1, 3]
    for item, item_answers in zip(items, answers, strict=True):
        history = list(item.context)
        for turn, answer in zip(item.turns, item_answers, strict=True):
            history.append({"role": "user", "content": turn.user})
            assert answer == _cut_at_tag(generate(model, tok, history, max_tokens=6)).strip()
            history.append({"role": "assistant", "content": answer})


def test_eval_command_on_a_model_folder(tmp_path, tiny_model_dir):
    prompts = tmp_path / "heldout.jsonl"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in (ARITHMETIC, COUNTING, CAPITALS)))
    out = tmp_path / "scores.json"
    args = ["eval", str(tiny_model_dir), "--prompts", str(prompts), "--max-tokens", "4", "--json", str(out)]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines()[0].split() == ["task", "accuracy", "rate", "right/total"]
    scores = json.loads(out.read_text())
    totals = {skill: s["total"] for skill, s in scores["task_accuracy"].items()}
    assert totals == {"arithmetic": 1, "counting": 1, "follow_up": 3, "lookup": 2}
    assert scores["task_accuracy_overall"]["total"] == 7
    assert {n: s["total"] for n, s in scores["style_adherence_by_turn"].items()} == {"1": 1, "2": 1, "3": 1}
    for s in [*scores["task_accuracy"].values(), *scores["style_adherence_by_turn"].values()]:
        assert 0 <= s["right"] <= s["total"] and s["accuracy"] == pytest.approx(s["right"] / s["total"])
    for skill, s in scores["task_accuracy"].items():
        assert f"  {skill}" in result.output and f"{s['right']}/{s['total']}" in result.output


def test_eval_command_errors(tmp_path, tiny_model_dir):
    missing = CliRunner().invoke(
        cli, ["eval", str(tiny_model_dir), "--prompts", str(tmp_path / "none.jsonl")]
    )
    assert missing.exit_code == 1
    assert missing.output == f"error: {tmp_path / 'none.jsonl'}: held-out prompts file not found\n"
    both = CliRunner().invoke(cli, ["eval", str(tiny_model_dir), "--prompts", "x.jsonl", "--seed", "1"])
    assert both.exit_code == 2 and "--seed chooses the world's own held-out set" in both.output


def test_default_prompts_are_the_worlds_heldout_set():
    items = world_heldout(seed=0, count=10)
    assert len(items) == 10 and sum(item.style is not None for item in items) == 4
    assert [len(item.turns) for item in items[:5]] == [1, 3, 3, 1, 3]


def test_eval_data_is_the_masked_sft_loss(tmp_path, tiny_model_dir):
    """`eval --data`: mean cross-entropy over answer tokens (all tokens of plain text), computed here by hand per
    example with numpy, and its exponential."""
    import math

    import mlx.core as mx
    import numpy as np

    from llama2_mlx.data import DataReport, EncodeOptions, read_examples
    from llama2_mlx.evaluation import score_data

    data = tmp_path / "mine.jsonl"
    rows = [
        {
            "messages": [
                {"role": "user", "content": "what is the answer"},
                {"role": "assistant", "content": "hello world"},
            ]
        },
        {"prompt": "sort list", "completion": "the a quick"},
        {"text": "the quick brown fox jumps over the lazy dog"},
    ]
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    model, tok = load(tiny_model_dir)
    total, count = 0.0, 0
    for example in read_examples(data, tok, EncodeOptions(), DataReport()):
        logits = np.array(model(mx.array([example.ids[:-1]]))[0], dtype=np.float64)
        shifted = logits - logits.max(-1, keepdims=True)
        log_probs = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
        for position, (target, scored) in enumerate(zip(example.ids[1:], example.mask[1:], strict=True)):
            if scored:
                total -= log_probs[position, target]
                count += 1
    assert 0 < count < sum(len(e.ids) for e in read_examples(data, tok, EncodeOptions(), DataReport()))
    result = score_data(model, tok, data, batch_size=2)
    assert result.tokens == count and result.examples == 3
    assert result.loss == pytest.approx(total / count, rel=1e-5)
    assert result.perplexity == pytest.approx(math.exp(total / count), rel=1e-5)
    cli_result = CliRunner().invoke(cli, ["eval", str(tiny_model_dir), "--data", str(data)])
    assert cli_result.exit_code == 0, cli_result.output
    assert cli_result.stdout == f"{result.summary()}\n"
    assert CliRunner().invoke(cli, ["eval", "--data", str(data), "--prompts", str(data)]).exit_code == 2
