"""The world as the paper's annotators: preference pairs from a model's own samples, judged by the world's checks.

Llama 2 collected its preference data in weekly batches of answers sampled from the latest models, so that the
reward model kept up with the policy's actual mistakes. The world's graded pairs (`preferences/`) only hold the
mistakes its generator makes up (an off-by-one sum, a swapped pair); a small policy makes others ("6 + 1 = 14",
a list with an item changed), which a reward model never shown them scores high. `annotate` pairs a right answer
with a wrong one to the same prompt, from the samples `rejection-sample` writes, so a reward model can be trained
on the mistakes the policy makes.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llama2_mlx.errors import Llama2MLXError
from llama2_mlx.fileio import jsonl_records
from llama2_mlx.world.skills import check_answer
from llama2_mlx.world.styles import get_style

RATING = "better"  # the world's rating of a wrong or unstyled answer (world/preferences.py)


@dataclass(frozen=True)
class JudgedPrompt:
    """A world prompt row (`prompts.jsonl`): the prompt itself and what a right answer to it must satisfy."""

    head: dict[str, Any]  # {"prompt": ...} or {"messages": ...}
    check: dict[str, Any]
    style: str | None

    def grade(self, answer: str) -> int:
        """2 for the right content, plus 1 for following the dialog's style (always, when it has none)."""
        right = check_answer(answer, self.check)
        styled = self.style is None or get_style(self.style).follows(answer)
        return 2 * right + styled


def read_world_prompts(path: Path) -> list[JudgedPrompt]:
    """The rows of a world prompts file; a row without check data names its line (other prompts cannot be judged)."""
    prompts = []
    for where, row in jsonl_records(path, "no such prompts file"):
        if not isinstance(row, dict) or ("prompt" in row) == ("messages" in row):
            raise Llama2MLXError(f'{where}: a prompt row needs exactly one of "prompt" or "messages"')
        if not isinstance(row.get("check"), dict):
            raise Llama2MLXError(
                f"{where}: no 'check' data; annotate judges the prompts `llama2-mlx world` writes (prompts.jsonl)"
            )
        try:
            check_answer("", row["check"])  # a check the world can apply
            if row.get("style") is not None:
                get_style(row["style"])
        except Llama2MLXError as error:
            raise Llama2MLXError(f"{where}: {error}") from None
        head = {key: row[key] for key in ("prompt", "messages") if key in row}
        prompts.append(JudgedPrompt(head, row["check"], row.get("style")))
    if not prompts:
        raise Llama2MLXError(f"{path}: no prompts")
    return prompts


def read_samples(path: Path, prompts: Sequence[JudgedPrompt]) -> dict[int, list[str]]:
    """The answers of a `samples.jsonl` by prompt index, each sample checked against the prompt it names."""
    answers: dict[int, list[str]] = {}
    for where, row in jsonl_records(path, "no such samples file"):
        index = row.get("prompt_index") if isinstance(row, dict) else None
        if not isinstance(index, int) or not 0 <= index < len(prompts):
            raise Llama2MLXError(
                f"{where}: 'prompt_index' must be a line number of the prompts file (from 0)"
            )
        if not isinstance(row.get("answer"), str):
            raise Llama2MLXError(f"{where}: 'answer' must be a string")
        if {key: row.get(key) for key in prompts[index].head} != prompts[index].head:
            raise Llama2MLXError(f"{where}: its prompt is not line {index + 1} of the prompts file; were both "
                                 "written by the same run?")  # fmt: skip
        answers.setdefault(index, []).append(row["answer"])
    return answers


def annotate(
    prompts: Sequence[JudgedPrompt], answers: dict[int, list[str]], pairs_per_prompt: int, seed: int = 0
) -> tuple[list[dict[str, Any]], int]:
    """Preference rows (train-rm's format) pairing better-graded answers with worse ones to the same prompt, at
    most `pairs_per_prompt` per prompt, each answer text used once per prompt (empty answers never); and the number
    of prompts whose answers all graded the same (they teach a reward model nothing)."""
    rng = random.Random(seed)
    rows, undecided = [], 0
    for index in sorted(answers):
        prompt = prompts[index]
        by_grade: dict[int, list[str]] = {}
        for answer in dict.fromkeys(a for a in answers[index] if a.strip()):  # distinct, non-empty texts
            by_grade.setdefault(prompt.grade(answer), []).append(answer)
        if len(by_grade) < 2:
            undecided += 1
            continue
        for group in by_grade.values():
            rng.shuffle(group)
        for _ in range(pairs_per_prompt):
            grades = sorted(grade for grade, group in by_grade.items() if group)
            if len(grades) < 2:
                break
            chosen = by_grade[grades[-1]].pop()
            rejected = by_grade[rng.choice(grades[:-1])].pop()
            rows.append({**prompt.head, "chosen": chosen, "rejected": rejected, "rating": RATING})
    return rows, undecided
