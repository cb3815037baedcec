"""A verifiable reward for the world's single questions: 1.0 when the answer is right, else 0.0.

`reward(prompt, answer)` re-reads the question (every skill's question templates in `skills.py`), rebuilds its check
data and applies the world's own checker, so rejection sampling and PPO can run on checkable skills with no reward
model: `--reward-fn llama2_mlx.world.verifier:reward`. Questions it cannot read (follow-ups, free text) score 0.0.
"""

from __future__ import annotations

import re
from typing import Any

from llama2_mlx.world.facts import TABLES
from llama2_mlx.world.skills import check_answer

_PATTERNS: list[tuple[re.Pattern, str]] = [
    (re.compile(r"^(?:What is|Compute) (\d+) ([-+*]) (\d+)[?.]$"), "arithmetic"),
    (re.compile(r"^(?:How many ([a-z]) are in ([a-z]+)\?|Count the letter ([a-z]) in ([a-z]+)\.)$"), "count"),
    (re.compile(r"^Sort (?:these: )?(.+)\.$"), "sort"),
    (re.compile(r"^(?:What is the capital of|Name the capital of) (.+)[?.]$"), "capitals"),
    (re.compile(r"^(?:What|Which) colour is (.+)\?$"), "colours"),
]


def question_check(question: str) -> dict[str, Any] | None:
    """The check data of a world question, or None when it is not one the verifier can read."""
    for pattern, kind in _PATTERNS:
        match = pattern.match(question.strip())
        if match is None:
            continue
        if kind == "arithmetic":
            a, op, b = int(match[1]), match[2], int(match[3])
            return {"type": "arithmetic", "expected": {"+": a + b, "-": a - b, "*": a * b}[op]}
        if kind == "count":
            letter, word = (match[1], match[2]) if match[1] else (match[3], match[4])
            return {"type": "count", "word": word, "letter": letter, "expected": word.count(letter)}
        if kind == "sort":
            items = [item.strip() for item in match[1].split(",")]
            values = [int(item) for item in items] if all(i.isdigit() for i in items) else items
            return {"type": "sort", "expected": sorted(values)}
        table = TABLES.get(kind, {})
        if match[1] in table:
            return {"type": "lookup", "table": kind, "key": match[1], "expected": table[match[1]]}
    return None


def reward(prompt: str, answer: str) -> float:
    """1.0 if `answer` answers the world question `prompt` correctly, else 0.0."""
    check = question_check(prompt)
    return float(check is not None and check_answer(answer, check))
