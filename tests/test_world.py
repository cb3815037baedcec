"""The synthetic world: checkers on hand-written answers, styles per turn, determinism, file formats, ratings."""

from __future__ import annotations

import json
import random
import re

import pytest
from click.testing import CliRunner

from llama2_mlx.cli import cli
from llama2_mlx.errors import Llama2MLXError
from llama2_mlx.tokenizer import Tokenizer
from llama2_mlx.world import check_answer, get_style, parse_sizes, write_world
from llama2_mlx.world.dialogs import KINDS, draw_dialog
from llama2_mlx.world.facts import TABLES
from llama2_mlx.world.preferences import draw_pair
from llama2_mlx.world.skills import Task, draw_task, follow_up
from llama2_mlx.world.writer import heldout_dialogs, training_dialogs

SMALL = {"corpus": 40, "corpus_valid": 5, "train": 30, "valid": 5, "preferences": 30, "preferences_valid": 5,
         "prompts": 5, "heldout": 20}  # fmt: skip
ARITHMETIC = {"type": "arithmetic", "expected": 19}
COUNT = {"type": "count", "word": "carrot", "letter": "r", "expected": 2}
SORT_NUMBERS = {"type": "sort", "expected": [2, 5, 9]}
SORT_WORDS = {"type": "sort", "expected": ["apple", "fig", "pear"]}
CAPITAL = {"type": "lookup", "table": "capitals", "key": "Norland", "expected": "Vesk"}


@pytest.mark.parametrize(
    "check, answer, right",
    [
        (ARITHMETIC, "12 + 7 = 19.", True),
        (ARITHMETIC, "12 + 7 = 18.", False),
        (ARITHMETIC, "19.", False),
        (ARITHMETIC, "Sure: 12 + 7 = 19. Anything else?", True),
        (ARITHMETIC, "12 + 7 = 19 = 20.", False),
        (ARITHMETIC, "12 + 7 = -19.", False),
        (COUNT, "c-a-r-r-o-t has 2 r.", True),
        (COUNT, "C-A-R-R-O-T HAS 2 R.", True),
        (COUNT, "c-a-r-r-o-t has 3 r.", False),
        (COUNT, "carrot has 2 r, or 3.", False),
        (SORT_NUMBERS, "2, 5, 9.", True),
        (SORT_NUMBERS, "Sure: 2, 5, 9. Want another one?", True),
        (SORT_NUMBERS, "2, 9, 5.", False),
        (SORT_NUMBERS, "2, 5.", False),
        (SORT_WORDS, "APPLE, FIG, PEAR.", True),
        (SORT_WORDS, "fig, apple, pear.", False),
        (SORT_WORDS, "apple, fig.", False),
        (CAPITAL, "The capital of Norland is Vesk.", True),
        (CAPITAL, "THE CAPITAL OF NORLAND IS VESK. Shall I go on?", True),
        (CAPITAL, "The capital of Norland is Tolm.", False),
        (CAPITAL, "Vesk or Tolm.", False),
        (
            {"type": "lookup", "table": "colours", "key": "a plum", "expected": "purple"},
            "A plum is purple.",
            True,
        ),
        (
            {"type": "lookup", "table": "colours", "key": "a plum", "expected": "purple"},
            "A plum is red.",
            False,
        ),
    ],
)
def test_checkers_on_hand_written_answers(check, answer, right):
    assert check_answer(answer, check) is right


@pytest.mark.parametrize(
    "check, message",
    [({"type": "poem"}, "'type' must be one of"), ({"type": "count"}, "missing field 'expected'"),
     ({"type": "lookup", "table": "rivers", "expected": "x"}, "unknown table 'rivers'")],
)  # fmt: skip
def test_bad_check_data_is_a_user_error(check, message):
    with pytest.raises(Llama2MLXError, match=message):
        check_answer("1 + 1 = 2.", check)


@pytest.mark.parametrize(
    "style, answer, follows",
    [
        ("capitals", "THE CAPITAL OF NORLAND IS VESK.", True),
        ("capitals", "The capital of Norland is Vesk.", False),
        ("capitals", "12 + 7 = 19.", False),  # nothing to capitalise: the style is not visible
        ("question", "12 + 7 = 19. Anything else?", True),
        ("question", "12 + 7 = 19.", False),
        ("sure", "Sure: 12 + 7 = 19.", True),
        ("sure", "12 + 7 = 19. Sure:", False),
    ],
)
def test_style_checks(style, answer, follows):
    assert get_style(style).follows(answer) is follows


def test_unknown_style_is_a_user_error():
    with pytest.raises(Llama2MLXError, match="unknown style 'pirate'"):
        get_style("pirate")


def test_capitals_adherence_is_scored_per_turn():
    style = get_style("capitals")
    answers = ["THE CAPITAL OF NORLAND IS VESK.", "C-A-R-R-O-T HAS 2 R.", "c-a-r-r-o-t has 1 t."]
    assert [style.follows(answer) for answer in answers] == [True, True, False]


def test_styled_dialogs_follow_their_style_at_every_turn_and_answer_right():
    rng = random.Random(3)
    for _ in range(60):
        dialog = draw_dialog("style", rng, turns=3)
        style = get_style(dialog.style)
        assert dialog.system in style.instructions
        for task, answer in zip(dialog.tasks, dialog.answers, strict=True):
            assert style.follows(answer) and not style.follows(task.answer)
            assert check_answer(answer, task.check)
            assert check_answer(task.answer, task.check)


def test_follow_ups_refer_to_the_previous_answer():
    nineteen = Task("arithmetic", "What is 12 + 7?", "12 + 7 = 19.", dict(ARITHMETIC), "arithmetic:12 + 7")
    rng = random.Random(0)
    seen = set()
    for _ in range(50):
        task = follow_up(nineteen, rng)
        seen.add(task.question.split()[1])
        if task.question == "And double it?":
            assert (task.answer, task.check["expected"]) == ("19 * 2 = 38.", 38)
        else:
            n = int(re.search(r"\d+", task.question).group())
            expected = 19 + n if task.question.startswith("Now add") else 19 - n
            assert task.answer == f"19 {'+' if 'add' in task.question else '-'} {n} = {expected}."
            assert task.check["expected"] == expected
    assert seen == {"double", "add", "subtract"}
    reverse = follow_up(Task("sorting", "Sort 5, 2, 9.", "2, 5, 9.", dict(SORT_NUMBERS)), rng)
    assert (reverse.question, reverse.answer, reverse.check["expected"]) == (
        "Now in reverse order.",
        "9, 5, 2.",
        [9, 5, 2],
    )
    letter = follow_up(
        Task("counting", "How many r are in carrot?", "c-a-r-r-o-t has 2 r.", dict(COUNT)), rng
    )
    assert (
        letter.answer == f"c-a-r-r-o-t has {'carrot'.count(letter.check['letter'])} {letter.check['letter']}."
    )


def test_every_reference_answer_passes_its_checker():
    rng = random.Random(5)
    for skill in ("arithmetic", "counting", "sorting", "lookup"):
        for _ in range(50):
            task = draw_task(skill, rng)
            assert check_answer(task.answer, task.check), task


def test_the_world_is_deterministic_from_its_seed(tmp_path):
    write_world(tmp_path / "a", seed=7, sizes=SMALL)
    write_world(tmp_path / "b", seed=7, sizes=SMALL)
    write_world(tmp_path / "c", seed=8, sizes=SMALL)
    names = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    assert len(names) == 9
    for name in names:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    assert (tmp_path / "a" / "sft/train.jsonl").read_bytes() != (
        tmp_path / "c" / "sft/train.jsonl"
    ).read_bytes()


def test_files_follow_the_design_formats(tmp_path, tokenizer_dir):
    counts = write_world(tmp_path / "w", seed=0, sizes=SMALL)
    out = tmp_path / "w"
    assert counts["sft/train.jsonl"] == 30 and counts["heldout.jsonl"] == 20
    tok = Tokenizer(tokenizer_dir / "tokenizer.model")

    def rows(name):
        return [json.loads(line) for line in (out / name).read_text().splitlines()]

    for name in ("sft/train.jsonl", "sft/valid.jsonl"):
        for row in rows(name):
            assert list(row) == ["messages"]
            ids, mask = tok.encode_dialog_with_mask(row["messages"])  # the chat format accepts every dialog
            assert len(ids) == len(mask) and any(mask)
    ratings = {"significantly_better", "better", "slightly_better", "negligibly_better"}
    for row in rows("preferences/train.jsonl") + rows("preferences/valid.jsonl"):
        assert set(row) - {"prompt", "messages"} == {"chosen", "rejected", "rating"}
        assert ("prompt" in row) != ("messages" in row) and row["rating"] in ratings
        if "messages" in row:
            tok.encode_dialog(row["messages"])  # ends with the user's turn
        assert row["chosen"] != row["rejected"]
    for row in rows("prompts.jsonl"):
        assert list(row)[0] in ("prompt", "messages") and row["check"]["type"] in {
            "arithmetic",
            "count",
            "sort",
            "lookup",
        }
        assert set(row) - {"prompt", "messages"} <= {"check", "style"}
        assert ("style" in row) <= (row.get("messages", [{}])[0].get("role") == "system")
    for row in rows("heldout.jsonl"):
        tok.encode_dialog(row["messages"])
        assert row["skill"] in {"arithmetic", "counting", "sorting", "lookup"}
        assert len(row.get("follow_ups", [])) in (0, 2)
        assert ("style" in row) <= (row["messages"][0]["role"] == "system")
    corpus = (out / "corpus.txt").read_text().splitlines()
    assert len(corpus) == 40 and all(corpus)
    assert json.loads((out / "world.json").read_text())["sizes"]["train"] == 30


def test_held_out_problems_stay_out_of_training_data():
    heldout = heldout_dialogs(60, seed=0)
    keys = set().union(*(dialog.keys for dialog in heldout))
    assert len(keys) > 60
    assert sum(d.style is not None for d in heldout) == 24 and sum(len(d.tasks) == 3 for d in heldout) == 36
    train = training_dialogs(300, seed=0, stream="train", exclude=keys)
    assert not set().union(*(dialog.keys for dialog in train)) & keys
    assert {len(d.tasks) for d in train} == {1, 2, 3} and {d.style for d in train} == {
        None,
        "capitals",
        "question",
        "sure",
    }


RATING_OF_GRADE = {"cosmetic": "negligibly_better", "slight": "slightly_better", "unstyled": "better",
                   "wrong": "better", "nonsense": "significantly_better"}  # fmt: skip


def _numbers(text):
    return [int(n) for n in re.findall(r"-?\d+", text)]


def test_ratings_follow_how_wrong_the_rejected_answer_is():
    rng = random.Random(11)
    grades = set()
    for _ in range(400):
        pair = draw_pair(rng)
        task = pair.dialog.tasks[-1]
        check, kind = task.check, task.check["type"]
        grades.add(pair.grade)
        assert pair.record()["rating"] == RATING_OF_GRADE[pair.grade]
        assert check_answer(pair.chosen, check)
        if pair.dialog.style:
            assert get_style(pair.dialog.style).follows(pair.chosen)
        right = check_answer(pair.rejected, check)
        if pair.grade == "cosmetic":
            assert right and len(pair.rejected) == len(pair.chosen) - 1
            assert pair.rejected.count(".") == pair.chosen.count(".") - 1
        elif pair.grade == "unstyled":
            assert right and not get_style(pair.dialog.style).follows(pair.rejected)
        else:
            assert not right
        if pair.grade in ("slight", "wrong") and kind in ("arithmetic", "count"):
            error = abs(_numbers(pair.rejected)[-1] - check["expected"])
            assert error == 1 if pair.grade == "slight" else error >= 2
        if pair.grade in ("slight", "wrong") and kind == "sort":
            items = [w.strip(".").lower() for w in re.findall(r"[\w]+", pair.rejected)]
            expected = [str(x).lower() for x in check["expected"]]
            items = [x for x in items if x in expected]
            wrong_places = [i for i, (a, b) in enumerate(zip(items, expected, strict=True)) if a != b]
            if pair.grade == "slight":
                assert len(wrong_places) == 2 and wrong_places[1] == wrong_places[0] + 1
            else:
                assert items == expected[::-1]
        if pair.grade == "wrong" and kind == "lookup":
            values = {v.lower() for v in TABLES[check["table"]].values()}
            assert len(set(re.findall(r"[a-z]+", pair.rejected.lower())) & values) == 1
    assert grades == set(RATING_OF_GRADE)


def test_parse_sizes():
    sizes = parse_sizes("train=5, heldout=3")
    assert (sizes["train"], sizes["heldout"], sizes["corpus"]) == (5, 3, 20000)
    with pytest.raises(Llama2MLXError, match="unknown name 'bogus'"):
        parse_sizes("bogus=1")
    with pytest.raises(Llama2MLXError, match="train must be a whole number"):
        parse_sizes("train=many")


def test_world_command(tmp_path):
    sizes = ",".join(f"{k}={v}" for k, v in SMALL.items())
    result = CliRunner().invoke(cli, ["world", "--out", str(tmp_path / "w"), "--seed", "1", "--sizes", sizes])
    assert result.exit_code == 0, result.output
    assert f"{tmp_path / 'w' / 'heldout.jsonl'}: 20 lines" in result.output
    again = CliRunner().invoke(cli, ["world", "--out", str(tmp_path / "w")])
    assert again.exit_code == 1 and "already exists" in again.output
    examples = CliRunner().invoke(cli, ["world", "--examples", "--out", str(tmp_path / "e")])
    assert examples.exit_code == 0
    assert len((tmp_path / "e" / "preferences.jsonl").read_text().splitlines()) == 6
    both = CliRunner().invoke(
        cli, ["world", "--examples", "--sizes", "train=3", "--out", str(tmp_path / "e")]
    )
    assert both.exit_code == 2 and "--examples writes a fixed few lines" in both.output


def test_all_dialog_kinds_render_as_messages():
    rng = random.Random(2)
    for kind in KINDS:
        messages = draw_dialog(kind, rng).messages()
        assert messages[-1]["role"] == "assistant"
