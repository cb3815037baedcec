"""Writing the world's files: pretraining corpus, SFT dialogs, preference pairs, prompts and held-out prompts.

Every file comes from its own random stream derived from the seed, so the output is the same for the same seed and
sizes, and changing one size leaves the other files alone (the held-out size aside: its problems are kept out of
every other file).
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from llama2_mlx.errors import Llama2MLXError
from llama2_mlx.world.corpus import documents
from llama2_mlx.world.dialogs import KINDS, Dialog, draw_dialog
from llama2_mlx.world.formats import (
    heldout_record,
    messages_record,
    prompt_completion_record,
    prompt_record,
    text_record,
)
from llama2_mlx.world.preferences import draw_pair

DEFAULT_SIZES: dict[str, int] = {
    "corpus": 20000,
    "corpus_valid": 500,
    "train": 4000,
    "valid": 200,
    "preferences": 2000,
    "preferences_valid": 200,
    "prompts": 200,
    "heldout": 400,
}
HELDOUT_TURNS = 3
# The held-out set cycles through these kinds: 2/5 single questions, 1/5 follow-up chains, 2/5 styled dialogs.
_HELDOUT_KINDS = ("single", "follow_up", "style", "single", "style")


def parse_sizes(text: str) -> dict[str, int]:
    """DEFAULT_SIZES updated from "name=count,name=count" (the --sizes flag)."""
    sizes = dict(DEFAULT_SIZES)
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, _, count = item.partition("=")
        if name not in sizes:
            raise Llama2MLXError(f"--sizes: unknown name {name!r}; known: {', '.join(DEFAULT_SIZES)}")
        if not count.isdigit():
            raise Llama2MLXError(f"--sizes: {name} must be a whole number, got {count!r}")
        sizes[name] = int(count)
    return sizes


def heldout_dialogs(count: int, seed: int) -> list[Dialog]:
    """The held-out evaluation dialogs (multi-turn ones have HELDOUT_TURNS turns)."""
    rng = random.Random(f"{seed}:heldout")
    kinds = [_HELDOUT_KINDS[i % len(_HELDOUT_KINDS)] for i in range(count)]
    return [draw_dialog(kind, rng, turns=None if kind == "single" else HELDOUT_TURNS) for kind in kinds]


def training_dialogs(count: int, seed: int, stream: str, exclude: set[str]) -> list[Dialog]:
    """`count` dialogs of every kind for one file (`stream` names it), none touching a held-out problem."""
    rng = random.Random(f"{seed}:{stream}")
    return [draw_dialog(rng.choice(KINDS), rng, exclude) for _ in range(count)]


def preference_records(count: int, seed: int, stream: str, exclude: set[str]) -> list[dict[str, Any]]:
    """`count` preference pairs for one file, none touching a held-out problem."""
    rng = random.Random(f"{seed}:{stream}")
    return [draw_pair(rng, exclude).record() for _ in range(count)]


def write_world(out_dir: str | os.PathLike, seed: int = 0, sizes: dict[str, int] | None = None,
                force: bool = False) -> dict[str, int]:  # fmt: skip
    """Write the whole world into `out_dir`; returns the number of lines of each file (by relative path).

    Layout: corpus.txt, corpus_valid.txt (pretraining), sft/{train,valid}.jsonl (chat format),
    preferences/{train,valid}.jsonl, prompts.jsonl, heldout.jsonl, world.json (seed and sizes).
    """
    from llama2_mlx.destination import atomic_folder

    sizes = {**DEFAULT_SIZES, **(sizes or {})}
    heldout = heldout_dialogs(sizes["heldout"], seed)
    exclude = set().union(*(dialog.keys for dialog in heldout))
    files: dict[str, list[Any]] = {
        "corpus.txt": documents(sizes["corpus"], random.Random(f"{seed}:corpus"), exclude),
        "corpus_valid.txt": documents(sizes["corpus_valid"], random.Random(f"{seed}:corpus_valid"), exclude),
        "sft/train.jsonl": [
            messages_record(d) for d in training_dialogs(sizes["train"], seed, "train", exclude)
        ],
        "sft/valid.jsonl": [
            messages_record(d) for d in training_dialogs(sizes["valid"], seed, "valid", exclude)
        ],
        "preferences/train.jsonl": preference_records(sizes["preferences"], seed, "preferences", exclude),
        "preferences/valid.jsonl": preference_records(
            sizes["preferences_valid"], seed, "preferences_valid", exclude
        ),
        "prompts.jsonl": [
            prompt_record(d) for d in training_dialogs(sizes["prompts"], seed, "prompts", exclude)
        ],
        "heldout.jsonl": [heldout_record(dialog) for dialog in heldout],
    }
    with atomic_folder(out_dir, force=force) as tmp:
        for name, lines in files.items():
            _write_lines(tmp / name, lines)
        (tmp / "world.json").write_text(json.dumps({"seed": seed, "sizes": sizes}, indent=2) + "\n")
    return {name: len(lines) for name, lines in files.items()}


def write_examples(out_dir: str | os.PathLike, seed: int = 0, count: int = 6) -> dict[str, int]:
    """A few lines of every DESIGN.md data format (examples/data), plus held-out prompts for `eval`."""
    from llama2_mlx.destination import atomic_folder

    rng = random.Random(f"{seed}:examples")
    singles = [draw_dialog("single", rng) for _ in range(count)]
    dialogs = [draw_dialog(KINDS[i % len(KINDS)], rng) for i in range(count)]
    files: dict[str, list[Any]] = {
        "sft_text.jsonl": [text_record(d) for d in dialogs],
        "sft_prompt_completion.jsonl": [prompt_completion_record(d) for d in singles],
        "sft_messages.jsonl": [messages_record(d) for d in dialogs],
        "preferences.jsonl": [draw_pair(rng).record() for _ in range(count)],
        "prompts.jsonl": [prompt_record(d) for d in dialogs],
        "heldout.jsonl": [heldout_record(d) for d in heldout_dialogs(count, seed)],
    }
    with atomic_folder(out_dir, force=True) as tmp:
        for name, lines in files.items():
            _write_lines(tmp / name, lines)
    return {name: len(lines) for name, lines in files.items()}


def _write_lines(path: Path, lines: Iterable[Any]) -> None:
    """One line per item: text as is, anything else as JSON."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for line in lines:
            f.write((line if isinstance(line, str) else json.dumps(line, ensure_ascii=False)) + "\n")
