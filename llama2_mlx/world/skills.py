"""The world's skills: each draws a task (a question with one short, formulaic answer) and checks answers to it.

A task's `check` is plain JSON (it is written into the held-out file) and `check_answer(answer, check)` judges any
answer from that data alone. Checkers read only the content (the result after "=", the count, the order of the
items, the fact) and ignore case and the words a style adds, so task accuracy and style adherence are measured apart.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import Any

from llama2_mlx.errors import Llama2MLXError
from llama2_mlx.world.facts import COUNT_WORDS, SORT_WORDS, TABLES

SKILLS: tuple[str, ...] = ("arithmetic", "counting", "sorting", "lookup")
FOLLOW_UP = "follow_up"  # the skill label of turns that refer to an earlier turn ("And double it?")

_INTEGER = re.compile(r"-?\d+")
_RESULT = re.compile(r"=\s*(-?\d+)")
_WORD = re.compile(r"[a-z]+")
_LETTERS = sorted(set("".join(COUNT_WORDS)))


@dataclass(frozen=True)
class Task:
    """One question and its reference answer.

    `key` names the problem itself (not its phrasing) so that held-out problems can be kept out of all training
    data; it is None for facts, which form a closed table the model has to memorise.
    """

    skill: str
    question: str
    answer: str
    check: dict[str, Any]
    key: str | None = None


def draw_task(skill: str, rng: random.Random) -> Task:
    """A random task of `skill` (one of SKILLS)."""
    return _DRAWERS[skill](rng)


def follow_up(task: Task, rng: random.Random) -> Task:
    """A question that only makes sense after `task` was answered ("And double it?") and its answer."""
    check = task.check
    kind = check["type"]
    if kind == "arithmetic":
        value = check["expected"]
        moves = [("double", 2)] if 0 < value <= 50 else []
        moves.append(("add", rng.randint(1, 9)))
        if value >= 2:
            moves.append(("subtract", rng.randint(1, min(9, value))))
        move, n = rng.choice(moves)
        question = {"double": "And double it?", "add": f"Now add {n}.", "subtract": f"Now subtract {n}."}[
            move
        ]
        op = {"double": "*", "add": "+", "subtract": "-"}[move]
        return _arithmetic_task(FOLLOW_UP, question, value, op, n)
    if kind == "count":
        letter = rng.choice(sorted(set(check["word"]) - {check["letter"]}))
        return _count_task(FOLLOW_UP, f"And the letter {letter}?", check["word"], letter)
    if kind == "sort":
        items = list(reversed(check["expected"]))
        return Task(
            FOLLOW_UP, "Now in reverse order.", _list_answer(items), {"type": "sort", "expected": items}
        )
    table = check["table"]
    key = rng.choice([k for k in TABLES[table] if k != check["key"]])
    return _lookup_task(FOLLOW_UP, f"And {key}?", table, key)


def answer_with(task: Task, value: Any) -> str:
    """The task's answer in its usual form but stating `value` instead of the right one (to make wrong answers)."""
    kind = task.check["type"]
    if kind == "arithmetic":
        return f"{task.answer.rsplit('=', 1)[0]}= {value}."
    if kind == "count":
        return _INTEGER.sub(str(value), task.answer, count=1)
    if kind == "sort":
        return _list_answer(value)
    return task.answer.replace(task.check["expected"], value)


def fact_sentence(table: str, key: str) -> str:
    """The one sentence that states a fact ("The capital of Norland is Vesk.")."""
    value = TABLES[table][key]
    if table == "capitals":
        return f"The capital of {key} is {value}."
    return f"{key[0].upper()}{key[1:]} is {value}."


def check_answer(answer: str, check: dict[str, Any]) -> bool:
    """Whether `answer` gets the task described by `check` (a task's check data) right."""
    kind = check.get("type") if isinstance(check, dict) else None
    if kind not in _CHECKERS:
        raise Llama2MLXError(f"check {check!r}: 'type' must be one of {sorted(_CHECKERS)}")
    checker, fields = _CHECKERS[kind]
    missing = [field for field in fields if field not in check]
    if missing:
        raise Llama2MLXError(f"check {check!r}: missing field {missing[0]!r}")
    return checker(answer, check)


def _arithmetic_task(skill: str, question: str, a: int, op: str, b: int) -> Task:
    result = {"+": a + b, "-": a - b, "*": a * b}[op]
    expression = f"{a} {op} {b}"
    return Task(
        skill, question, f"{expression} = {result}.", {"type": "arithmetic", "expected": result},
        key=f"arithmetic:{expression}",
    )  # fmt: skip


def _count_task(skill: str, question: str, word: str, letter: str) -> Task:
    count = word.count(letter)
    return Task(
        skill, question, f"{'-'.join(word)} has {count} {letter}.",
        {"type": "count", "word": word, "letter": letter, "expected": count}, key=f"counting:{word}:{letter}",
    )  # fmt: skip


def _lookup_task(skill: str, question: str, table: str, key: str) -> Task:
    check = {"type": "lookup", "table": table, "key": key, "expected": TABLES[table][key]}
    return Task(skill, question, fact_sentence(table, key), check)


def _list_answer(items: list) -> str:
    return ", ".join(str(item) for item in items) + "."


def _draw_arithmetic(rng: random.Random) -> Task:
    op = rng.choice("+-*")
    top = 9 if op == "*" else 20
    a, b = rng.randint(0, top), rng.randint(0, top)
    if op == "-" and b > a:
        a, b = b, a
    question = rng.choice(("What is {}?", "Compute {}.")).format(f"{a} {op} {b}")
    return _arithmetic_task("arithmetic", question, a, op, b)


def _draw_counting(rng: random.Random) -> Task:
    word = rng.choice(COUNT_WORDS)
    letters = sorted(set(word)) if rng.random() < 0.8 else [c for c in _LETTERS if c not in word]
    letter = rng.choice(letters)
    question = rng.choice(("How many {} are in {}?", "Count the letter {} in {}.")).format(letter, word)
    return _count_task("counting", question, word, letter)


def _draw_sorting(rng: random.Random) -> Task:
    items: list = (
        rng.sample(range(100), rng.randint(3, 5))
        if rng.random() < 0.5
        else rng.sample(SORT_WORDS, rng.randint(3, 4))
    )
    while items == sorted(items):
        rng.shuffle(items)
    shown = ", ".join(str(item) for item in items)
    question = rng.choice(("Sort {}.", "Sort these: {}.")).format(shown)
    expected = sorted(items)
    return Task(
        "sorting",
        question,
        _list_answer(expected),
        {"type": "sort", "expected": expected},
        f"sorting:{shown}",
    )


def _draw_lookup(rng: random.Random) -> Task:
    table = rng.choice(sorted(TABLES))
    key = rng.choice(list(TABLES[table]))
    if table == "capitals":
        question = rng.choice(("What is the capital of {}?", "Name the capital of {}.")).format(key)
    else:
        question = rng.choice(("What colour is {}?", "Which colour is {}?")).format(key)
    return _lookup_task("lookup", question, table, key)


def _check_arithmetic(answer: str, check: dict[str, Any]) -> bool:
    results = _RESULT.findall(answer)
    return bool(results) and int(results[-1]) == check["expected"]


def _check_count(answer: str, check: dict[str, Any]) -> bool:
    return [int(n) for n in _INTEGER.findall(answer)] == [check["expected"]]


def _check_sort(answer: str, check: dict[str, Any]) -> bool:
    expected = check["expected"]
    if all(isinstance(item, int) for item in expected):
        return [int(n) for n in _INTEGER.findall(answer)] == expected
    wanted = {str(item).lower() for item in expected}
    return [w for w in _WORD.findall(answer.lower()) if w in wanted] == [
        str(item).lower() for item in expected
    ]


def _check_lookup(answer: str, check: dict[str, Any]) -> bool:
    table = TABLES.get(check["table"])
    if table is None:
        raise Llama2MLXError(f"check {check!r}: unknown table {check['table']!r}")
    words = set(_WORD.findall(answer.lower()))
    others = {value.lower() for value in table.values()} - {check["expected"].lower()}
    return check["expected"].lower() in words and not words & others


_DRAWERS = {
    "arithmetic": _draw_arithmetic,
    "counting": _draw_counting,
    "sorting": _draw_sorting,
    "lookup": _draw_lookup,
}
_CHECKERS = {
    "arithmetic": (_check_arithmetic, ("expected",)),
    "count": (_check_count, ("expected",)),
    "sort": (_check_sort, ("expected",)),
    "lookup": (_check_lookup, ("table", "expected")),
}
