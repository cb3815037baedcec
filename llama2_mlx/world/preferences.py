"""Preference pairs whose rating grows with how wrong the rejected answer is (for the reward model).

Grades of wrongness, least to most, and the Llama 2 rating each gives (how much better the chosen answer is):
- cosmetic -> negligibly_better: the right content, untidy form (the final period dropped);
- slight -> slightly_better: off by one (a number one away, two neighbouring items swapped);
- unstyled -> better: the right content that ignores the system prompt's style instruction;
- wrong -> better: clearly wrong (a number two or more away, the list in reverse, another fact of the table);
- nonsense -> significantly_better: the answer to an unrelated question.
"""

from __future__ import annotations

import random
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

from llama2_mlx.world.dialogs import KINDS, Dialog, draw_dialog
from llama2_mlx.world.facts import TABLES
from llama2_mlx.world.skills import SKILLS, Task, answer_with, check_answer, draw_task
from llama2_mlx.world.styles import STYLES

RATINGS: dict[str, str] = {
    "cosmetic": "negligibly_better",
    "slight": "slightly_better",
    "unstyled": "better",
    "wrong": "better",
    "nonsense": "significantly_better",
}


@dataclass(frozen=True)
class Pair:
    """Two answers to the last turn of `dialog` (whose earlier turns are the prompt) and how wrong `rejected` is."""

    dialog: Dialog
    chosen: str
    rejected: str
    grade: str

    @property
    def rating(self) -> str:
        return RATINGS[self.grade]

    def record(self) -> dict[str, Any]:
        """DESIGN.md's preference format: a bare prompt when there is one turn and no system prompt."""
        prompt = self.dialog.messages()[:-1]
        head: dict[str, Any] = {"prompt": prompt[0]["content"]} if len(prompt) == 1 else {"messages": prompt}
        return {**head, "chosen": self.chosen, "rejected": self.rejected, "rating": self.rating}


def draw_pair(rng: random.Random, exclude: Collection[str] = ()) -> Pair:
    """A random dialog and a rejected last answer of a random grade of wrongness."""
    dialog = draw_dialog(rng.choice(KINDS), rng, exclude)
    task = dialog.tasks[-1]
    grades = ["cosmetic", "wrong", "nonsense"]
    if task.check["type"] != "lookup":
        grades.append("slight")
    if dialog.style is not None:
        grades.append("unstyled")
    grade = rng.choice(sorted(grades))
    rejected = task.answer if grade == "unstyled" else _corrupt(task, grade, rng)
    if dialog.style is None:
        return Pair(dialog, task.answer, rejected, grade)
    style = STYLES[dialog.style]
    seed = rng.getrandbits(32)  # both answers get the same styling (e.g. the same closing question)
    chosen = style.restyle(task.answer, random.Random(seed))
    if grade != "unstyled":
        rejected = style.restyle(rejected, random.Random(seed))
    return Pair(dialog, chosen, rejected, grade)


def _corrupt(task: Task, grade: str, rng: random.Random) -> str:
    """A plain answer to `task` that is wrong by `grade`."""
    if grade == "cosmetic":
        return task.answer.removesuffix(".")
    if grade == "nonsense":
        while True:
            other = draw_task(rng.choice(SKILLS), rng)
            if other.check["type"] != task.check["type"] and not check_answer(other.answer, task.check):
                return other.answer
    check = task.check
    expected = check["expected"]
    if check["type"] == "sort":
        if grade == "wrong":
            return answer_with(task, list(reversed(expected)))
        i = rng.randrange(len(expected) - 1)
        return answer_with(task, expected[:i] + [expected[i + 1], expected[i]] + expected[i + 2 :])
    if check["type"] == "lookup":
        return answer_with(task, rng.choice([v for v in TABLES[check["table"]].values() if v != expected]))
    if grade == "slight":
        return answer_with(task, expected + 1 if expected == 0 or rng.random() < 0.5 else expected - 1)
    offsets = [d for d in (-5, -4, -3, -2, 2, 3, 4, 5) if expected + d >= 0]
    return answer_with(task, expected + rng.choice(offsets))
