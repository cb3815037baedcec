"""Ghost Attention data (LLAMA2_RECIPE.md "GAtt"): dialogs whose answers were sampled with an instruction.

For each dialog [u1, a1, ..., un, an] an instruction is drawn; every answer is re-sampled from the model with the
instruction appended to EVERY user message so far (turn by turn, all dialogs of a turn in one batch). The written
dialog keeps the instruction only once, as the system message of the first turn, with the original user messages
and the sampled answers; `llama2-mlx sft --gatt` then trains only the last answer of each.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from llama2_mlx.errors import Llama2MLXError
from llama2_mlx.fileio import jsonl_records
from llama2_mlx.tokenizer import Message


@dataclass
class Instruction:
    text: str
    short: str | None = None  # the paper uses a shortened form half the time ("Figure: Napoleon")


def read_instructions(path: Path) -> list[Instruction]:
    """A .txt with one instruction a line, or a .jsonl of {"instruction", optional "short"}."""
    if path.suffix == ".jsonl":
        instructions = [
            _instruction(where, row) for where, row in jsonl_records(path, "no such instructions file")
        ]
    else:
        if not path.is_file():
            raise Llama2MLXError(f"{path}: no such instructions file")
        lines = path.read_text(encoding="utf-8").splitlines()
        instructions = [Instruction(line.strip()) for line in lines if line.strip()]
    if not instructions:
        raise Llama2MLXError(f"{path}: no instructions")
    return instructions


def _instruction(where: str, row) -> Instruction:
    if (
        not isinstance(row, dict)
        or not isinstance(row.get("instruction"), str)
        or not row["instruction"].strip()
    ):
        raise Llama2MLXError(f'{where}: expected {{"instruction": "...", "short": "..." (optional)}}')
    return Instruction(row["instruction"].strip(), row.get("short"))


def read_user_turns(path: Path) -> list[list[str]]:
    """The user messages of each {"messages": [...]} dialog (system messages and old answers are dropped)."""
    dialogs = []
    for where, row in jsonl_records(path, "no such dialogs file"):
        try:
            users = [m["content"] for m in row["messages"] if m["role"] == "user"]
        except (KeyError, TypeError):
            raise Llama2MLXError(f'{where}: expected {{"messages": [{{"role", "content"}}, ...]}}') from None
        if not users or not all(isinstance(u, str) and u.strip() for u in users):
            raise Llama2MLXError(f"{where}: the dialog needs non-empty user messages")
        dialogs.append(users)
    if not dialogs:
        raise Llama2MLXError(f"{path}: no dialogs")
    return dialogs


def build_gatt_dialogs(
    model,
    tokenizer,
    dialogs: list[list[str]],
    instructions: list[Instruction],
    max_tokens: int = 128,
    temperature: float = 0.6,
    top_p: float = 0.9,
    seed: int = 0,
    batch_size: int = 16,
    progress: Callable[[int, int], None] | None = None,
) -> list[list[Message]]:
    """Sample every answer with the instruction on every user message; return the dialogs to train on.
    `progress(answers done, answers in all)` follows the sampling."""
    from llama2_mlx.generation import generate_batch

    total, done = sum(len(users) for users in dialogs), 0
    rng = random.Random(seed)
    chosen = []
    for _ in dialogs:
        instruction = rng.choice(instructions)
        use_short = instruction.short is not None and rng.random() < 0.5
        chosen.append(instruction.short if use_short else instruction.text)
    answers: list[list[str]] = [[] for _ in dialogs]
    for turn in range(max(len(users) for users in dialogs)):
        active = [i for i, users in enumerate(dialogs) if len(users) > turn]
        for start in range(0, len(active), batch_size):
            rows = active[start : start + batch_size]
            prompts = [_sampling_prompt(dialogs[i][: turn + 1], answers[i], chosen[i]) for i in rows]
            samples = generate_batch(model, tokenizer, prompts, max_tokens=max_tokens, temperature=temperature,
                                     top_p=top_p, seed=seed + 1000 * turn + start)  # fmt: skip
            for i, sample in zip(rows, samples, strict=True):
                answers[i].append(sample[0].strip() or "...")
            done += len(rows)
            if progress is not None:
                progress(done, total)
    return [_training_dialog(users, answers[i], chosen[i]) for i, users in enumerate(dialogs)]


def _sampling_prompt(users: list[str], answers: list[str], instruction: str) -> list[Message]:
    messages: list[Message] = []
    for index, user in enumerate(users):
        messages.append({"role": "user", "content": f"{user} {instruction}"})
        if index < len(answers):
            messages.append({"role": "assistant", "content": answers[index]})
    return messages


def _training_dialog(users: list[str], answers: list[str], instruction: str) -> list[Message]:
    messages: list[Message] = [{"role": "system", "content": instruction}]
    for user, answer in zip(users, answers, strict=True):
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
    return messages


def run_gatt_data(
    model_path: str | os.PathLike | None,
    dialogs_path: str | os.PathLike,
    instructions_path: str | os.PathLike,
    out: str | os.PathLike,
    adapter: str | os.PathLike | None = None,
    force: bool = False,
    **sampling,
) -> int:
    """Read the files, sample, write `out` (.jsonl of {"messages"}) atomically; returns the number of dialogs.

    `out` is claimed before any sampling: an existing file is refused without `force`, an input file always."""
    from llama2_mlx.destination import atomic_file
    from llama2_mlx.loading import demo_model_path, load

    if sampling.get("max_tokens", 1) < 1:
        raise Llama2MLXError(f"--max-tokens must be at least 1, got {sampling['max_tokens']}")
    with atomic_file(out, force=force, inputs=[dialogs_path, instructions_path]) as tmp:
        dialogs = read_user_turns(Path(dialogs_path))
        instructions = read_instructions(Path(instructions_path))
        model, tokenizer = load(model_path or demo_model_path(), adapter=adapter)
        built = build_gatt_dialogs(model, tokenizer, dialogs, instructions, **sampling)
        text = "".join(json.dumps({"messages": m}, ensure_ascii=False) + "\n" for m in built)
        tmp.write_text(text, encoding="utf-8")
    return len(built)
