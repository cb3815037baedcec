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
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from llama2_mlx.errors import Llama2MLXError
from llama2_mlx.fileio import utf8_lines
from llama2_mlx.trainer import Batch

T = TypeVar("T")


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
    untrained: int = 0  # examples left out because truncation cut away every trained token
    dropped: int = 0  # examples left out because they did not fill a last batch
    too_long: int = 0  # preference pairs left out because an answer would be cut by the sequence length

    def summary(self) -> str:
        parts = [f"{self.examples} examples"]
        if self.skipped:
            parts.append(f"{len(self.skipped)} bad lines skipped (first: {self.skipped[0]})")
        if self.truncated:
            parts.append(f"{self.truncated} truncated to the sequence length")
        if self.too_long:
            parts.append(f"{self.too_long} left out: longer than --seq-len (never compared truncated)")
        if self.untrained:
            parts.append(f"{self.untrained} left out: --seq-len cut away all of their answer")
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


def read_rows(
    path: Path, encode: Callable[[Any], T], report: DataReport, skip_bad_lines: bool = False
) -> list[T]:
    """`encode` every line of a .jsonl file; a bad line raises `Llama2MLXError("file:line: ...")` or is counted.

    `encode(row)` turns one parsed JSON value into an item or raises `Llama2MLXError` saying what is wrong.
    """
    if not path.is_file():
        raise Llama2MLXError(f"{path}: no such data file")
    items = []
    for number, line in utf8_lines(path):
        if line is not None and not line.strip():
            continue
        try:
            if line is None:
                raise Llama2MLXError("not UTF-8 text")
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise Llama2MLXError(f"not valid JSON ({error.msg} at column {error.colno})") from None
            except RecursionError:
                raise Llama2MLXError("not valid JSON (nested too deeply)") from None
            items.append(encode(row))
        except Llama2MLXError as error:
            message = f"{path}:{number}: {error}"
            if not skip_bad_lines:
                raise Llama2MLXError(message + " (use --skip-bad-lines to skip such lines)") from None
            report.skipped.append(message)
    if not items:
        raise Llama2MLXError(f"{path}: no usable examples")
    report.examples += len(items)
    return items


def read_examples(
    path: Path, tokenizer, options: EncodeOptions, report: DataReport, skip_bad_lines: bool = False
) -> list[Example]:
    """SFT examples of every line of a .jsonl file (see `read_rows` for bad lines)."""
    return read_rows(path, lambda row: encode_row(row, tokenizer, options), report, skip_bad_lines)


def load_rows(
    path: str | Path,
    encode: Callable[[Any], T],
    valid_fraction: float = 0.0,
    seed: int = 0,
    skip_bad_lines: bool = False,
) -> tuple[list[T], list[T], DataReport]:
    """(train, valid, report) from a .jsonl file or a folder with train.jsonl and optional valid.jsonl.

    Without a valid.jsonl, `valid_fraction` of the training items (chosen with `seed`) is held out.
    """
    path = Path(path)
    report = DataReport()
    if not 0 <= valid_fraction < 1:
        raise Llama2MLXError(f"valid fraction must be in [0, 1), got {valid_fraction}")
    if path.is_dir():
        train = read_rows(path / "train.jsonl", encode, report, skip_bad_lines)
        valid_file = path / "valid.jsonl"
        if valid_file.is_file():
            return train, read_rows(valid_file, encode, report, skip_bad_lines), report
    else:
        train = read_rows(path, encode, report, skip_bad_lines)
    n_valid = int(round(len(train) * valid_fraction))
    if n_valid == 0:
        return train, [], report
    order = list(range(len(train)))
    random.Random(seed).shuffle(order)
    held = set(order[:n_valid])
    return [e for i, e in enumerate(train) if i not in held], [train[i] for i in sorted(held)], report


def load_sft_data(
    path: str | Path,
    tokenizer,
    options: EncodeOptions,
    valid_fraction: float = 0.0,
    seed: int = 0,
    skip_bad_lines: bool = False,
) -> tuple[list[Example], list[Example], DataReport]:
    """(train, valid, report) SFT examples; see `load_rows`."""
    encode = partial(encode_row, tokenizer=tokenizer, options=options)
    return load_rows(path, encode, valid_fraction, seed, skip_bad_lines)


def truncate(examples: list[Example], seq_len: int, report: DataReport) -> list[Example]:
    """Cut examples to `seq_len` tokens; one left with no trained token (its answer cut away) is left out and
    counted, since its loss would be 0/0; if that leaves nothing, the error names --seq-len."""
    out = []
    for example in examples:
        if len(example.ids) > seq_len:
            report.truncated += 1
            example = Example(example.ids[:seq_len], example.mask[:seq_len])
            if not any(example.mask):
                report.untrained += 1
                continue
        out.append(example)
    if examples and not out:
        raise Llama2MLXError(
            f"--seq-len {seq_len} cuts away the trained part (the answer) of every example; raise --seq-len"
        )
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


def epoch_order(n_batches: int, seed: int, start: int = 0) -> Iterator[int]:
    """Batch indices of endless epochs from global index `start`: epoch e is the permutation seeded by (seed, e)."""
    epoch, offset = divmod(start, n_batches)
    while True:
        yield from np.random.default_rng([seed, epoch]).permutation(n_batches)[offset:].tolist()
        epoch, offset = epoch + 1, 0


def spread(n_batches: int, limit: int = 0) -> list[int]:
    """All batch indices in order, or `limit` of them spread evenly (batches are sorted by length)."""
    if 0 < limit < n_batches:
        return sorted({round(i * (n_batches - 1) / max(limit - 1, 1)) for i in range(limit)})
    return list(range(n_batches))


class BatchStream:
    """A restartable stream of batches for the trainer (`batches(start)`), over fixed groups `self.batches` that a
    subclass forms and turns into a `Batch` with `make_batch`; epoch e visits the groups in the order seeded by
    (seed, e)."""

    batches: list
    seed: int

    def __len__(self) -> int:
        return len(self.batches)

    def __call__(self, start: int = 0) -> Iterator[Batch]:
        """Endless epochs from global micro-batch index `start`; epoch e visits the batches in a seeded order."""
        for index in epoch_order(len(self.batches), self.seed, start):
            yield self.make_batch(self.batches[index])

    def once(self, limit: int = 0) -> Iterator[Batch]:
        """Every batch once, in order (validation); with `limit`, that many spread evenly over the lengths."""
        for index in spread(len(self.batches), limit):
            yield self.make_batch(self.batches[index])

    def make_batch(self, group) -> Batch:
        raise NotImplementedError


class Batcher(BatchStream):
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
