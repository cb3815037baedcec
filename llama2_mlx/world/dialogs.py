"""Dialogs of the world: single questions, chains of follow-ups, and dialogs under a system style instruction.

A dialog keeps its tasks (for checking) beside the answers as shown (the style applied), so one object yields SFT
messages, preference pairs, pretraining transcripts and held-out prompts alike.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Collection
from dataclasses import dataclass

from llama2_mlx.errors import Llama2MLXError
from llama2_mlx.world.skills import SKILLS, Task, draw_task, follow_up
from llama2_mlx.world.styles import STYLES, Style

KINDS: tuple[str, ...] = ("single", "follow_up", "style")
NEUTRAL_SYSTEM = "You are a small assistant."
_MAX_DRAWS = 10_000


@dataclass(frozen=True)
class Dialog:
    """User questions (as tasks) with the reference answers as shown; an optional system prompt and style name."""

    tasks: tuple[Task, ...]
    answers: tuple[str, ...]
    system: str | None = None
    style: str | None = None

    def messages(self, turns: int | None = None) -> list[dict[str, str]]:
        """The chat messages of the first `turns` turns (all by default), each answer included."""
        messages = [{"role": "system", "content": self.system}] if self.system else []
        for task, answer in list(zip(self.tasks, self.answers, strict=True))[:turns]:
            messages += [{"role": "user", "content": task.question}, {"role": "assistant", "content": answer}]
        return messages

    @property
    def keys(self) -> set[str]:
        return {task.key for task in self.tasks if task.key is not None}


def draw_dialog(
    kind: str, rng: random.Random, exclude: Collection[str] = (), turns: int | None = None
) -> Dialog:
    """A random dialog of `kind` (one of KINDS) none of whose problems is in `exclude` (held-out task keys).

    `turns` fixes the number of turns (the held-out set uses a fixed length); by default it is drawn.
    """
    makers: dict[str, Callable[[], Dialog]] = {
        "single": lambda: _single(rng),
        "follow_up": lambda: _follow_ups(rng, turns or rng.randint(2, 3)),
        "style": lambda: _styled(rng, STYLES[rng.choice(sorted(STYLES))], turns or rng.randint(1, 3)),
    }
    held_out = set(exclude)
    for _ in range(_MAX_DRAWS):
        dialog = makers[kind]()
        if not dialog.keys & held_out:
            return dialog
    raise Llama2MLXError(
        f"could not draw a {kind} dialog outside the held-out set; ask for fewer held-out prompts"
    )


def _single(rng: random.Random) -> Dialog:
    task = draw_task(rng.choice(SKILLS), rng)
    return Dialog((task,), (task.answer,), system=NEUTRAL_SYSTEM if rng.random() < 0.1 else None)


def _follow_ups(rng: random.Random, turns: int) -> Dialog:
    tasks = [draw_task(rng.choice(SKILLS), rng)]
    while len(tasks) < turns:
        tasks.append(follow_up(tasks[-1], rng))
    system = NEUTRAL_SYSTEM if rng.random() < 0.1 else None
    return Dialog(tuple(tasks), tuple(task.answer for task in tasks), system=system)


def _styled(rng: random.Random, style: Style, turns: int) -> Dialog:
    """A dialog under `style`'s instruction: every answer follows it, and none would without it.

    Half the later turns follow up on the turn before, half ask something new.
    """
    tasks: list[Task] = []
    answers: list[str] = []
    while len(tasks) < turns:
        if tasks and rng.random() < 0.5:
            task = follow_up(tasks[-1], rng)
        else:
            task = draw_task(rng.choice(SKILLS), rng)
        answer = style.restyle(task.answer, rng)
        if style.follows(answer) and not style.follows(task.answer):
            tasks.append(task)
            answers.append(answer)
    return Dialog(tuple(tasks), tuple(answers), system=rng.choice(style.instructions), style=style.name)
