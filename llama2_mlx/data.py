"""SFT data: JSON Lines in the three formats of DESIGN.md -> token ids with a loss mask -> batches for the trainer.

Formats, one encoder each: {"text"} trains every token; {"prompt", "completion"} trains the completion (BOS+prompt,
completion+EOS, plain tokenizer as mlx-lm's completions); {"messages"} uses Llama 2's chat format and trains the
assistant answers only (the paper's SFT recipe). Every bad line is reported as file:line with what is wrong.

Batches either hold one example per row, sorted by length so rows of a batch pad little, or pack whole examples
back to back into rows of `seq_len` tokens (the paper's packing) with per-token document ids, from which the loss
builds a block-diagonal causal attention mask.
"""

from __future__ import annotations

import bisect
import json
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from llama2_mlx.errors import Llama2MLXError
from llama2_mlx.trainer import Batch


@dataclass
class Example:
    """Token ids and a loss mask marking the TARGET tokens that are trained (never the first token)."""

    ids: list[int]
    mask: list[bool]


@dataclass
class EncodeOptions:
    train_on_prompt: bool = False  # train every token of prompts/dialogs too
    gatt: bool = False  # Ghost Attention: only the last answer of a dialog is trained


@dataclass
class DataReport:
    """What reading and batching did to the data, for the user to see."""

    examples: int = 0
    skipped: list[str] = field(default_factory=list)  # "file:line: what is wrong" of skipped lines
    truncated: int = 0
    dropped: int = 0  # examples left out because they did not fill a last batch

    def summary(self) -> str:
        parts = [f"{self.examples} examples"]
        if self.skipped:
            parts.append(f"{len(self.skipped)} bad lines skipped (first: {self.skipped[0]})")
        if self.truncated:
            parts.append(f"{self.truncated} truncated to the sequence length")
        if self.dropped:
            parts.append(f"{self.dropped} left out of an incomplete last batch")
        return ", ".join(parts)


def encode_text(row: dict[str, Any], tokenizer, options: EncodeOptions) -> Example:
    text = _string(row, "text")
    ids = tokenizer.encode(text, bos=True, eos=True)
    return Example(ids, [False] + [True] * (len(ids) - 1))


def encode_completion(row: dict[str, Any], tokenizer, options: EncodeOptions) -> Example:
    prompt = _string(row, "prompt", allow_empty=True)
    completion = _string(row, "completion")
    prompt_ids = tokenizer.encode(prompt, bos=True, eos=False)
    completion_ids = tokenizer.encode(completion, bos=False, eos=True)
    mask = [False] + [options.train_on_prompt] * (len(prompt_ids) - 1) + [True] * len(completion_ids)
    return Example(prompt_ids + completion_ids, mask)


def encode_messages(row: dict[str, Any], tokenizer, options: EncodeOptions) -> Example:
    messages = row["messages"]
    if not isinstance(messages, list) or not messages:
        raise Llama2MLXError("'messages' must be a non-empty list")
    for index, message in enumerate(messages):
        if (
            isinstance(message, dict)
            and isinstance(message.get("content"), str)
            and not message["content"].strip()
        ):
            raise Llama2MLXError(f"message {index}: empty content")
    ids, mask = tokenizer.encode_dialog_with_mask(messages, train_on="last" if options.gatt else "all")
    if options.train_on_prompt and not options.gatt:
        mask = [True] * len(ids)
    mask[0] = False
    return Example(ids, mask)


def _string(row: dict[str, Any], key: str, allow_empty: bool = False) -> str:
    value = row[key]
    if not isinstance(value, str):
        raise Llama2MLXError(f"'{key}' must be a string, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise Llama2MLXError(f"'{key}' is empty")
    return value


# Detected by the keys a row has, most specific first.
FORMATS: list[tuple[frozenset[str], Callable[[dict[str, Any], Any, EncodeOptions], Example]]] = [
    (frozenset({"messages"}), encode_messages),
    (frozenset({"prompt", "completion"}), encode_completion),
    (frozenset({"text"}), encode_text),
]


def encode_row(row: Any, tokenizer, options: EncodeOptions) -> Example:
    if not isinstance(row, dict):
        raise Llama2MLXError(f"expected a JSON object, got {type(row).__name__}")
    for keys, encode in FORMATS:
        if keys <= row.keys():
            return encode(row, tokenizer, options)
    raise Llama2MLXError(
        f'unknown shape with keys {sorted(row)}; expected {{"text"}}, {{"prompt", "completion"}} '
        'or {"messages"}'
    )


def read_examples(
    path: Path, tokenizer, options: EncodeOptions, report: DataReport, skip_bad_lines: bool = False
) -> list[Example]:
    """Encode every line of a .jsonl file; a bad line raises `Llama2MLXError("file:line: ...")` or is counted."""
    if not path.is_file():
        raise Llama2MLXError(f"{path}: no such data file")
    examples = []
    with path.open(encoding="utf-8") as file:
        for number, line in enumerate(file, start=1):
            if not line.strip():
                continue
            try:
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as error:
                    raise Llama2MLXError(f"not valid JSON ({error.msg} at column {error.colno})") from None
                examples.append(encode_row(row, tokenizer, options))
            except Llama2MLXError as error:
                message = f"{path}:{number}: {error}"
                if not skip_bad_lines:
                    raise Llama2MLXError(message + " (use --skip-bad-lines to skip such lines)") from None
                report.skipped.append(message)
    if not examples:
        raise Llama2MLXError(f"{path}: no usable examples")
    report.examples += len(examples)
    return examples


def load_sft_data(
    path: str | Path,
    tokenizer,
    options: EncodeOptions,
    valid_fraction: float = 0.0,
    seed: int = 0,
    skip_bad_lines: bool = False,
) -> tuple[list[Example], list[Example], DataReport]:
    """(train, valid, report) from a .jsonl file or a folder with train.jsonl and optional valid.jsonl.

    Without a valid.jsonl, `valid_fraction` of the training examples (chosen with `seed`) is held out.
    """
    path = Path(path)
    report = DataReport()
    if path.is_dir():
        train = read_examples(path / "train.jsonl", tokenizer, options, report, skip_bad_lines)
        valid_file = path / "valid.jsonl"
        if valid_file.is_file():
            valid = read_examples(valid_file, tokenizer, options, report, skip_bad_lines)
            return train, valid, report
    else:
        train = read_examples(path, tokenizer, options, report, skip_bad_lines)
    if not 0 <= valid_fraction < 1:
        raise Llama2MLXError(f"valid fraction must be in [0, 1), got {valid_fraction}")
    n_valid = int(round(len(train) * valid_fraction))
    if n_valid == 0:
        return train, [], report
    order = list(range(len(train)))
    random.Random(seed).shuffle(order)
    held = set(order[:n_valid])
    return [e for i, e in enumerate(train) if i not in held], [train[i] for i in sorted(held)], report


def truncate(examples: list[Example], seq_len: int, report: DataReport) -> list[Example]:
    out = []
    for example in examples:
        if len(example.ids) > seq_len:
            report.truncated += 1
            example = Example(example.ids[:seq_len], example.mask[:seq_len])
        out.append(example)
    return out


def pack(lengths: list[int], seq_len: int) -> list[list[int]]:
    """Rows of example indices whose lengths sum to at most `seq_len` (best-fit decreasing: each example, longest
    first, goes to the fullest row it still fits in), so little of each row is left as padding."""
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (free space, row number), sorted
    for index in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        slot = bisect.bisect_left(free, (lengths[index], -1))
        if slot == len(free):
            rows.append([index])
            space, row = seq_len - lengths[index], len(rows) - 1
        else:
            space, row = free.pop(slot)
            rows[row].append(index)
            space -= lengths[index]
        bisect.insort(free, (space, row))
    return rows


class Batcher:
    """A restartable stream of training batches (the trainer's `batches(start)`), shuffled per epoch with `seed`.

    A global batch holds `batch_size` rows; with several ranks each rank takes rows rank, rank + size, ...
    Rows are single examples sorted by length (padded to a multiple of `pad_to`), or packed examples.
    """

    def __init__(
        self,
        examples: list[Example],
        batch_size: int,
        seq_len: int,
        packing: bool = False,
        document_mask: bool = True,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        pad_to: int = 32,
        report: DataReport | None = None,
    ):
        if batch_size % world_size:
            raise Llama2MLXError(
                f"batch size {batch_size} is not divisible by the number of processes {world_size}"
            )
        report = report if report is not None else DataReport()
        self.examples = truncate(examples, seq_len, report)
        self.seq_len, self.seed, self.pad_to = seq_len, seed, pad_to
        self.rank, self.world_size = rank, world_size
        self.document_ids = packing and document_mask
        lengths = [len(e.ids) for e in self.examples]
        if packing:
            rows = pack(lengths, seq_len)
        else:
            rows = [[i] for i in sorted(range(len(lengths)), key=lambda i: lengths[i])]
        self.batches = [rows[i : i + batch_size] for i in range(0, len(rows), batch_size)]
        if self.batches and len(self.batches[-1]) < world_size:  # every rank needs at least one row
            report.dropped += sum(len(row) for row in self.batches.pop())
        if not self.batches:
            raise Llama2MLXError(f"{len(self.examples)} examples are too few for {world_size} processes")

    def __len__(self) -> int:
        return len(self.batches)

    def __call__(self, start: int = 0) -> Iterator[Batch]:
        """Endless epochs from global micro-batch index `start`; epoch e visits the batches in a seeded order."""
        epoch, offset = divmod(start, len(self.batches))
        while True:
            order = np.random.default_rng([self.seed, epoch]).permutation(len(self.batches))
            for index in order[offset:]:
                yield self.make_batch(self.batches[index])
            epoch, offset = epoch + 1, 0

    def once(self, limit: int = 0) -> Iterator[Batch]:
        """Every batch once, in order (validation); with `limit`, that many spread evenly over the lengths."""
        chosen = range(len(self.batches))
        if 0 < limit < len(self.batches):
            chosen = sorted({round(i * (len(self.batches) - 1) / max(limit - 1, 1)) for i in range(limit)})
        for index in chosen:
            yield self.make_batch(self.batches[index])

    def make_batch(self, rows: list[list[int]]) -> Batch:
        import mlx.core as mx

        mine = rows[self.rank :: self.world_size]
        fills = [sum(len(self.examples[i].ids) for i in row) for row in mine]
        width = min(-(-max(fills) // self.pad_to) * self.pad_to, self.seq_len)
        tokens = np.zeros((len(mine), width), np.int32)
        mask = np.zeros((len(mine), width), bool)
        docs = np.full((len(mine), width), -1, np.int32)
        for r, row in enumerate(mine):
            position = 0
            for d, index in enumerate(row):
                example = self.examples[index]
                end = position + len(example.ids)
                tokens[r, position:end] = example.ids
                mask[r, position:end] = example.mask
                docs[r, position:end] = d
                position = end
        docs = mx.array(docs) if self.document_ids else None
        inputs = (mx.array(tokens), mx.array(mask), docs, mx.array(loss_positions(mask)))
        return Batch(inputs, int(sum(fills)))


def loss_positions(mask: np.ndarray, multiple: int = 64) -> np.ndarray:
    """Flat indices into mask[:, 1:] (the targets) of the positions whose loss counts, padded with -1 to a multiple
    of `multiple` so that the compiled training step sees few distinct shapes; `next_token_loss` projects only
    these positions onto the vocabulary."""
    positions = np.flatnonzero(mask[:, 1:]).astype(np.int32)
    padded = np.full(max(multiple, -(-len(positions) // multiple) * multiple), -1, np.int32)
    padded[: len(positions)] = positions
    return padded
