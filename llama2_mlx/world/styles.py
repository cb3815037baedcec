"""System-prompt style instructions (Ghost-Attention style) and the checks of whether an answer follows them.

Each style is one instruction that must hold at every turn of a dialog ("Answer in capitals."); `follows` judges a
single answer, so adherence can be measured turn by turn. An instruction comes in a long and a short phrasing, as
Llama 2's GAtt data shortened half of its instructions.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

from llama2_mlx.errors import Llama2MLXError

CLOSING_QUESTIONS: tuple[str, ...] = ("Anything else?", "Want another one?", "Shall I go on?")


@dataclass(frozen=True)
class Style:
    """An instruction, how to restyle a plain answer to follow it, and the check that an answer does."""

    name: str
    instructions: tuple[str, ...]
    restyle: Callable[[str, random.Random], str]
    follows: Callable[[str], bool]


def _capitals(answer: str) -> bool:
    return any(c.isalpha() for c in answer) and answer == answer.upper()


STYLES: dict[str, Style] = {
    style.name: style
    for style in (
        Style(
            "capitals",
            ("Answer in capitals.", "Capitals only."),
            lambda answer, rng: answer.upper(),
            _capitals,
        ),
        Style(
            "question",
            ("End every answer with a question.", "End with a question."),
            lambda answer, rng: f"{answer} {rng.choice(CLOSING_QUESTIONS)}",
            lambda answer: answer.rstrip().endswith("?"),
        ),
        Style(
            "sure",
            ("Start every answer with 'Sure:'.", "Begin with 'Sure:'."),
            lambda answer, rng: f"Sure: {answer}",
            lambda answer: answer.lstrip().startswith("Sure:"),
        ),
    )
}


def get_style(name: str) -> Style:
    """The style called `name`; an unknown name is the user's error (e.g. a bad held-out file)."""
    if name not in STYLES:
        raise Llama2MLXError(f"unknown style {name!r}; known styles: {', '.join(STYLES)}")
    return STYLES[name]
