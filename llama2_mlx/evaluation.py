"""Scoring a model on the world's held-out prompts: task accuracy per skill, style adherence per turn.

Each held-out dialog is answered turn by turn with greedy decoding, all dialogs of a turn in one batch, and the
model's own answers are fed back as the history of the next turn, as in a real chat. An answer is cut at a chat
template tag ("[INST]" etc.): the model has started to write the next turn itself, and the tag could not be fed back.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llama2_mlx.errors import Llama2MLXError
from llama2_mlx.fileio import jsonl_records
from llama2_mlx.tokenizer import SPECIAL_TAGS, Message
from llama2_mlx.world.formats import heldout_record
from llama2_mlx.world.skills import check_answer
from llama2_mlx.world.styles import get_style

if TYPE_CHECKING:
    from llama2_mlx.model import Llama
    from llama2_mlx.tokenizer import Tokenizer


@dataclass(frozen=True)
class Turn:
    user: str
    skill: str
    check: dict[str, Any]


@dataclass(frozen=True)
class HeldOut:
    """One held-out dialog: the messages before the first user turn (a system prompt or nothing), then its turns."""

    context: tuple[Message, ...]
    turns: tuple[Turn, ...]
    style: str | None = None


@dataclass
class Tally:
    right: int = 0
    total: int = 0

    def add(self, ok: bool) -> None:
        self.right += ok
        self.total += 1

    @property
    def rate(self) -> float:
        return self.right / self.total if self.total else 0.0


@dataclass
class EvalReport:
    """Task accuracy per skill (and over all turns) and style adherence per turn number (1 = first answer)."""

    skills: dict[str, Tally] = field(default_factory=dict)
    style_turns: dict[int, Tally] = field(default_factory=dict)

    @property
    def overall(self) -> Tally:
        return Tally(sum(t.right for t in self.skills.values()), sum(t.total for t in self.skills.values()))

    def to_json(self) -> dict[str, Any]:
        def tally(t: Tally) -> dict[str, Any]:
            return {"right": t.right, "total": t.total, "accuracy": t.rate}

        return {
            "task_accuracy": {skill: tally(t) for skill, t in sorted(self.skills.items())},
            "task_accuracy_overall": tally(self.overall),
            "style_adherence_by_turn": {str(turn): tally(t) for turn, t in sorted(self.style_turns.items())},
        }


def read_heldout(path: str | os.PathLike) -> list[HeldOut]:
    """Held-out dialogs from a jsonl file in the world's held-out format (llama2_mlx/world/formats.py)."""
    path = Path(path)
    items = []
    for where, record in jsonl_records(path, "held-out prompts file not found"):
        try:
            items.append(parse_heldout(record))
        except Llama2MLXError as error:
            raise Llama2MLXError(f"{where}: {error}") from None
    if not items:
        raise Llama2MLXError(f"{path}: no held-out prompts")
    return items


def parse_heldout(record: Any) -> HeldOut:
    """One held-out record, checked: messages ending with the first user turn, check data, an optional style."""
    if not isinstance(record, dict):
        raise Llama2MLXError("a held-out record must be a JSON object")
    messages = record.get("messages")
    if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
        raise Llama2MLXError("'messages' must be a non-empty list of message objects")
    if messages[-1].get("role") != "user" or not isinstance(messages[-1].get("content"), str):
        raise Llama2MLXError("'messages' must end with a user message")
    follow_ups = record.get("follow_ups", [])
    if not isinstance(follow_ups, list) or not all(isinstance(f, dict) for f in follow_ups):
        raise Llama2MLXError("'follow_ups' must be a list of objects")
    raw = [{"content": messages[-1]["content"], "skill": record.get("skill"), "check": record.get("check")}]
    turns = []
    for index, turn in enumerate(raw + follow_ups):
        where = "the first turn" if index == 0 else f"follow_ups[{index - 1}]"
        if not isinstance(turn.get("content"), str) or not isinstance(turn.get("skill"), str):
            raise Llama2MLXError(f"{where}: needs a string 'content' and a string 'skill'")
        check_answer("", turn.get("check"))  # the check data is complete
        turns.append(Turn(turn["content"], turn["skill"], turn["check"]))
    style = record.get("style")
    if style is not None:
        get_style(style)
    return HeldOut(tuple(messages[:-1]), tuple(turns), style)


def world_heldout(seed: int = 0, count: int | None = None) -> list[HeldOut]:
    """The world's own held-out set (the one `llama2-mlx world --seed` keeps out of the training data)."""
    from llama2_mlx.world.writer import DEFAULT_SIZES, heldout_dialogs

    dialogs = heldout_dialogs(DEFAULT_SIZES["heldout"] if count is None else count, seed)
    return [parse_heldout(heldout_record(dialog)) for dialog in dialogs]


def score(items: Sequence[HeldOut], answers: Sequence[Sequence[str]]) -> EvalReport:
    """Score answers (`answers[i][t]`: the answer to turn t of item i) against the items' checks and styles."""
    report = EvalReport()
    for item, item_answers in zip(items, answers, strict=True):
        for number, (turn, answer) in enumerate(zip(item.turns, item_answers, strict=True), start=1):
            report.skills.setdefault(turn.skill, Tally()).add(check_answer(answer, turn.check))
            if item.style is not None:
                report.style_turns.setdefault(number, Tally()).add(get_style(item.style).follows(answer))
    return report


def answer_heldout(
    model: Llama,
    tok: Tokenizer,
    items: Sequence[HeldOut],
    max_tokens: int = 48,
    batch_size: int = 64,
    progress: Callable[[int, int], None] | None = None,
) -> list[list[str]]:
    """Greedy answers to every turn of every item, each turn seeing the model's own earlier answers;
    `progress(answers done, answers in all)` after each batch."""
    from llama2_mlx.generation import generate_batch

    total, done = sum(len(item.turns) for item in items), 0
    histories: list[list[Message]] = [list(item.context) for item in items]
    answers: list[list[str]] = [[] for _ in items]
    for turn in range(max(len(item.turns) for item in items)):
        active = [i for i, item in enumerate(items) if turn < len(item.turns)]
        for i in active:
            histories[i].append({"role": "user", "content": items[i].turns[turn].user})
        for start in range(0, len(active), batch_size):
            rows = active[start : start + batch_size]
            outputs = generate_batch(model, tok, [histories[i] for i in rows], max_tokens=max_tokens)
            for i, (text,) in zip(rows, outputs, strict=True):
                answer = _cut_at_tag(text).strip()
                answers[i].append(answer)
                histories[i].append({"role": "assistant", "content": answer})
            done += len(rows)
            if progress is not None:
                progress(done, total)
    return answers


def evaluate(
    model: Llama,
    tok: Tokenizer,
    items: Sequence[HeldOut],
    max_tokens: int = 48,
    batch_size: int = 64,
    progress: Callable[[int, int], None] | None = None,
) -> EvalReport:
    """Answer the held-out dialogs and score the answers."""
    return score(items, answer_heldout(model, tok, items, max_tokens, batch_size, progress))


@dataclass(frozen=True)
class DataScore:
    """Loss on a data file, as `sft` trains: mean cross-entropy per answer token (per token for plain text)."""

    loss: float
    perplexity: float
    tokens: int
    examples: int

    def summary(self) -> str:
        return (
            f"loss {self.loss:.4f}, perplexity {self.perplexity:.3f} over {self.tokens} scored tokens "
            f"in {self.examples} examples"
        )


def score_data(
    model: Llama, tok: Tokenizer, path: str | os.PathLike, batch_size: int = 8, seq_len: int | None = None
) -> DataScore:
    """Masked next-token loss and perplexity of a jsonl file in any SFT format, masked exactly as sft masks it
    (answers only; plain text whole); examples longer than `seq_len` (default: the context) are cut."""
    import math

    import mlx.core as mx

    from llama2_mlx.data import Batcher, DataReport, EncodeOptions, read_examples
    from llama2_mlx.losses import next_token_loss

    examples = read_examples(Path(path), tok, EncodeOptions(), DataReport())
    batches = Batcher(examples, batch_size, seq_len or model.args.max_seq_len)
    total, weight = mx.array(0.0), mx.array(0.0)
    for batch in batches.once():
        batch_total, batch_weight = next_token_loss(model, *batch.inputs)
        total, weight = total + batch_total, weight + batch_weight
        mx.eval(total, weight)
    if weight.item() == 0:
        raise Llama2MLXError(f"{path}: no tokens to score (every example's loss mask is empty)")
    loss = (total / weight).item()
    return DataScore(loss, math.exp(loss), int(weight.item()), len(batches.examples))


def format_report(report: EvalReport) -> str:
    """A small table: task accuracy per skill, then style adherence per turn."""
    lines = [f"{'task accuracy':<22}{'rate':>7}{'right/total':>14}"]
    rows = sorted(report.skills.items()) + [("all", report.overall)]
    lines += [f"  {name:<20}{t.rate:>7.3f}{f'{t.right}/{t.total}':>14}" for name, t in rows]
    if report.style_turns:
        lines.append(f"{'style adherence':<22}{'rate':>7}{'right/total':>14}")
        lines += [
            f"  turn {n:<15}{t.rate:>7.3f}{f'{t.right}/{t.total}':>14}"
            for n, t in sorted(report.style_turns.items())
        ]
    return "\n".join(lines)


def _cut_at_tag(text: str) -> str:
    cut = min((text.find(tag) for tag in SPECIAL_TAGS if tag in text), default=len(text))
    return text[:cut]
