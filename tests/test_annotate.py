"""The world as annotator (`annotate`): sampled answers judged by the world's checks become preference pairs."""

from __future__ import annotations

import json
from pathlib import Path

from click.testing import CliRunner

from llama2_mlx.cli import cli
from llama2_mlx.preferences import load_pairs
from llama2_mlx.tokenizer import Tokenizer
from llama2_mlx.world import write_world
from llama2_mlx.world.annotate import annotate, read_samples, read_world_prompts

SUM = {"prompt": "What is 12 + 7?", "check": {"type": "arithmetic", "expected": 19}}
STYLED = {
    "messages": [
        {"role": "system", "content": "Capitals only."},
        {"role": "user", "content": "Sort 9, 2, 5."},
    ],
    "check": {"type": "sort", "expected": [2, 5, 9]},
    "style": "capitals",
}
CAPITAL = {"prompt": "Name the capital of Norland.", "check": {"type": "lookup", "table": "capitals",
                                                                "key": "Norland", "expected": "Vesk"}}  # fmt: skip


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def samples(index: int, row: dict, answers: list[str]) -> list[dict]:
    head = {key: row[key] for key in ("prompt", "messages") if key in row}
    return [{"prompt_index": index, **head, "answer": answer, "reward": 0.0} for answer in answers]


def test_pairs_put_a_right_answer_over_a_wrong_one(tmp_path):
    prompts = read_world_prompts(write_jsonl(tmp_path / "prompts.jsonl", [SUM, STYLED, CAPITAL]))
    rows = (
        samples(0, SUM, ["12 + 7 = 19.", "12 + 7 = 18.", "12 + 7 = 19.", "", "12 + 7 = 21."])
        + samples(1, STYLED, ["2, 5, 9.", "2, 9, 5.", "2, 5, 9. ", "2, 5, 9."])
        + samples(2, CAPITAL, ["The capital of Norland is Vesk."] * 3)  # all right: nothing to learn
    )
    answers = read_samples(write_jsonl(tmp_path / "samples.jsonl", rows), prompts)
    pairs, undecided = annotate(prompts, answers, pairs_per_prompt=5)
    assert undecided == 1
    by_prompt = {}
    for pair in pairs:
        by_prompt.setdefault(pair.get("prompt") or pair["messages"][-1]["content"], []).append(pair)
        assert pair["rating"] == "better" and pair["chosen"] and pair["rejected"]
    # one right text and two wrong ones (the empty answer never pairs): the right one is used once
    assert [(p["chosen"], p["rejected"]) for p in by_prompt["What is 12 + 7?"]] in (
        [("12 + 7 = 19.", "12 + 7 = 18.")], [("12 + 7 = 19.", "12 + 7 = 21.")]
    )  # fmt: skip
    # styled: no answer is in capitals, so the right content ranks above the wrong one
    assert [(p["chosen"], p["rejected"]) for p in by_prompt["Sort 9, 2, 5."]] in (
        [("2, 5, 9.", "2, 9, 5.")], [("2, 5, 9. ", "2, 9, 5.")]
    )  # fmt: skip
    assert by_prompt["Sort 9, 2, 5."][0]["messages"] == STYLED["messages"]
    # the style counts below the content: right + styled > right > wrong + styled > wrong
    grades = [
        prompts[1].grade(a) for a in ("2, 5, 9.", "2, 9, 5.", "2, 5, 9. ANYTHING ELSE?".upper(), "2, 9, 5!")
    ]
    assert grades == [2, 0, 3, 0]


def test_at_most_pairs_per_prompt(tmp_path):
    prompts = read_world_prompts(write_jsonl(tmp_path / "prompts.jsonl", [SUM]))
    answers = {0: ["12 + 7 = 19.", "19 = 12 + 7 = 19.", "12 + 7 = 18.", "12 + 7 = 17.", "12 + 7 = 16."]}
    assert len(annotate(prompts, answers, pairs_per_prompt=1)[0]) == 1
    pairs = annotate(prompts, answers, pairs_per_prompt=9)[0]
    assert len(pairs) == 2 and len({p["rejected"] for p in pairs}) == 2  # two right texts, each used once


def test_bad_files_name_the_line(tmp_path):
    no_check = write_jsonl(tmp_path / "plain.jsonl", [SUM, {"prompt": "Hi."}])
    result = CliRunner().invoke(cli, ["annotate", str(no_check), "--prompts", str(no_check), "--out",
                                      str(tmp_path / "pairs.jsonl")])  # fmt: skip
    assert result.exit_code != 0 and f"{no_check}:2: no 'check' data" in result.output
    assert "Traceback" not in result.output
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [SUM, CAPITAL])
    wrong_prompt = write_jsonl(tmp_path / "samples.jsonl", samples(1, SUM, ["12 + 7 = 19."]))
    result = CliRunner().invoke(cli, ["annotate", str(wrong_prompt), "--prompts", str(prompts), "--out",
                                      str(tmp_path / "pairs.jsonl")])  # fmt: skip
    assert result.exit_code != 0 and f"{wrong_prompt}:1: its prompt is not line 2" in result.output
    assert not (tmp_path / "pairs.jsonl").exists()


def test_the_world_prompts_and_samples_give_pairs_train_rm_reads(tmp_path, tokenizer_dir):
    world = tmp_path / "world"
    write_world(world, sizes={"corpus": 5, "corpus_valid": 5, "train": 5, "valid": 5, "preferences": 5,
                              "preferences_valid": 5, "prompts": 30, "heldout": 5})  # fmt: skip
    rows = [json.loads(line) for line in (world / "prompts.jsonl").read_text().splitlines()]
    sample_rows = []
    for index, row in enumerate(rows):  # a right answer judged by the row's own check, and a wrong one
        expected = row["check"]["expected"]
        right = f"= {expected}." if row["check"]["type"] == "arithmetic" else f"{expected}."
        if row["check"]["type"] == "sort":
            right = ", ".join(map(str, expected)) + "."
        if row.get("style") == "capitals":
            right = right.upper()
        elif row.get("style") == "question":
            right += " Anything else?"
        elif row.get("style") == "sure":
            right = f"Sure: {right}"
        sample_rows += samples(index, row, [right, "No idea"])
    sample_file = write_jsonl(tmp_path / "samples.jsonl", sample_rows)
    out = tmp_path / "pairs.jsonl"
    result = CliRunner().invoke(cli, ["annotate", str(sample_file), "--prompts", str(world / "prompts.jsonl"),
                                      "--out", str(out)])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert f"{out}: 30 pairs from 30 prompts" in result.output
    pairs = [json.loads(line) for line in out.read_text().splitlines()]
    assert all(p["rejected"] == "No idea" for p in pairs)
    train, _, report = load_pairs(str(out), Tokenizer(tokenizer_dir / "tokenizer.model"), 256, 0.0, 0, False)
    assert len(train) == 30
    again = CliRunner().invoke(cli, ["annotate", str(sample_file), "--prompts", str(world / "prompts.jsonl"),
                                     "--out", str(out)])  # fmt: skip
    assert again.exit_code != 0 and "already exists" in again.output
