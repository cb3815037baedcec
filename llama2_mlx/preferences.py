"""Preference pairs for the reward model (and DPO): rows -> token ids -> batches, the margin, the accuracy report.

A row (DESIGN.md "Formats") is `{"prompt": str | "messages": [..., user], "chosen": str, "rejected": str}` with a
`"rating"` (how much better chosen is; the paper's four levels, "unsure" read as the last) or a numeric `"margin"`.
Both answers are encoded as `reward_model.encode_response` does: the prompt in the Llama 2 chat format, then the
answer and EOS. A pair longer than `seq_len` is left out and counted, never compared on truncated text.

A batch holds the chosen answers of its pairs in its first rows and the rejected ones after them, so both sides of
a pair go through the network together.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from llama2_mlx.data import BatchStream, DataReport, load_rows
from llama2_mlx.errors import Llama2MLXError
from llama2_mlx.tokenizer import as_dialog
from llama2_mlx.trainer import Batch

RATINGS = ("significantly_better", "better", "slightly_better", "negligibly_better")
RATING_ALIASES = {"unsure": "negligibly_better"}
# The paper's Table 27: the margin m(rating) in -log(sigmoid(r_chosen - r_rejected - m)).
MARGINS: dict[str, dict[str, float]] = {
    "none": dict.fromkeys(RATINGS, 0.0),
    "small": {
        "significantly_better": 1.0,
        "better": 2 / 3,
        "slightly_better": 1 / 3,
        "negligibly_better": 0.0,
    },
    "large": {"significantly_better": 3.0, "better": 2.0, "slightly_better": 1.0, "negligibly_better": 0.0},
}
UNRATED = "unrated"  # report bucket of rows that give a numeric margin and no rating


@dataclass
class Pair:
    """A preference pair as token ids: prompt + chosen answer + EOS, prompt + rejected answer + EOS."""

    chosen: list[int]
    rejected: list[int]
    rating: str | None = None
    margin: float | None = None  # the row's own numeric margin, which wins over its rating
    prompt_len: int = 0  # tokens of the shared prompt; the answers start there (DPO scores only answers)

    def margin_for(self, scheme: str) -> float:
        if self.margin is not None:
            return self.margin
        return MARGINS[scheme][self.rating] if self.rating is not None else 0.0

    @property
    def bucket(self) -> str:
        return self.rating or UNRATED

    def __len__(self) -> int:
        return max(len(self.chosen), len(self.rejected))


def encode_pair(row: Any, tokenizer, require_rating: bool = True) -> Pair:
    """One preference row -> `Pair`; a bad row raises `Llama2MLXError` saying which field is wrong.

    The reward model needs a rating or margin on every row; DPO (`require_rating=False`) does not."""
    from llama2_mlx.reward_model import encode_response

    if not isinstance(row, dict):
        raise Llama2MLXError(f"expected a JSON object, got {type(row).__name__}")
    if ("prompt" in row) == ("messages" in row):
        raise Llama2MLXError('a preference row needs exactly one of "prompt" or "messages"')
    prompt = row.get("prompt", row.get("messages"))
    if "prompt" in row and (not isinstance(prompt, str) or not prompt.strip()):
        raise Llama2MLXError("'prompt' must be a non-empty string")
    if "messages" in row and (not isinstance(prompt, list) or not prompt):
        raise Llama2MLXError("'messages' must be a non-empty list ending with a user message")
    answers = []
    for key in ("chosen", "rejected"):
        if key not in row:
            raise Llama2MLXError(f"missing '{key}'")
        if not isinstance(row[key], str) or not row[key].strip():
            raise Llama2MLXError(f"'{key}' must be a non-empty string")
        answers.append(row[key])
    rating = row.get("rating")
    if rating is not None:
        rating = RATING_ALIASES.get(rating, rating)
        if rating not in RATINGS:
            raise Llama2MLXError(f"'rating' {row['rating']!r} is not one of {', '.join(RATINGS)}, unsure")
    margin = row.get("margin")
    if margin is not None:
        if isinstance(margin, bool) or not isinstance(margin, int | float) or not math.isfinite(margin):
            raise Llama2MLXError(f"'margin' must be a finite number, got {margin!r}")
        margin = float(margin)
    if require_rating and rating is None and margin is None:
        raise Llama2MLXError("needs a 'rating' or a numeric 'margin'")
    chosen, rejected = (encode_response(tokenizer, prompt, answer) for answer in answers)
    return Pair(chosen, rejected, rating, margin, len(tokenizer.encode_dialog(as_dialog(prompt))))


def load_pairs(
    path: str | Path,
    tokenizer,
    seq_len: int,
    valid_fraction: float = 0.0,
    seed: int = 0,
    skip_bad_lines: bool = False,
    require_rating: bool = True,
) -> tuple[list[Pair], list[Pair], DataReport]:
    """(train, valid, report) pairs from a .jsonl file or a folder with train.jsonl (and valid.jsonl).

    Pairs longer than `seq_len` are left out and counted in `report.too_long`.
    """
    train, valid, report = load_rows(
        path, lambda row: encode_pair(row, tokenizer, require_rating), valid_fraction, seed, skip_bad_lines
    )
    train, valid = (_fitting(pairs, seq_len, report) for pairs in (train, valid))
    if not train:
        raise Llama2MLXError(
            f"{path}: every training pair is longer than --seq-len {seq_len}; raise --seq-len"
        )
    return train, valid, report


def _fitting(pairs: list[Pair], seq_len: int, report: DataReport) -> list[Pair]:
    kept = [pair for pair in pairs if len(pair) <= seq_len]
    report.too_long += len(pairs) - len(kept)
    return kept


class PairBatcher(BatchStream):
    """A restartable stream of pair batches (the trainer's `batches(start)`), shuffled per epoch with `seed`.

    Pairs are grouped by length so rows pad little; a global batch holds `batch_size` pairs, rank r of `world_size`
    takes pairs r, r + size, .... Inputs: tokens [2n, width] (n chosen rows, then n rejected), the index of each
    row's last token [2n], and each pair's margin [n].
    """

    def __init__(
        self,
        pairs: list[Pair],
        batch_size: int,
        margin: str = "none",
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        pad_to: int = 32,
    ):
        if margin not in MARGINS:
            raise Llama2MLXError(f"margin must be one of {', '.join(MARGINS)}, got {margin!r}")
        if batch_size % world_size:
            raise Llama2MLXError(
                f"batch size {batch_size} is not divisible by the number of processes {world_size}"
            )
        self.pairs, self.seed, self.pad_to = pairs, seed, pad_to
        self.rank, self.world_size = rank, world_size
        self.margins = [pair.margin_for(margin) for pair in pairs]
        order = sorted(range(len(pairs)), key=lambda i: len(pairs[i]))
        self.batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
        if self.batches and len(self.batches[-1]) < world_size:  # every rank needs at least one pair
            self.batches.pop()
        if not self.batches:
            raise Llama2MLXError(f"{len(pairs)} pairs are too few for {world_size} processes")

    def make_batch(self, indices: list[int]) -> Batch:
        import mlx.core as mx

        mine = indices[self.rank :: self.world_size]
        rows = [self.pairs[i].chosen for i in mine] + [self.pairs[i].rejected for i in mine]
        width = -(-max(len(row) for row in rows) // self.pad_to) * self.pad_to
        tokens = np.zeros((len(rows), width), np.int32)
        for r, row in enumerate(rows):
            tokens[r, : len(row)] = row
        last = mx.array([len(row) - 1 for row in rows])
        margins = mx.array([self.margins[i] for i in mine], dtype=mx.float32)
        return Batch((mx.array(tokens), last, margins), sum(len(row) for row in rows))


def preference_loss(model, tokens, last, margin, center_coef: float = 0.0):
    """The paper's ranking loss with margin, in the trainer's (sum, weight) contract.

    Per pair: -log(sigmoid(r_chosen - r_rejected - m)) + center_coef * (r_chosen + r_rejected)^2 (TRL's term that
    keeps rewards centred); the weight is the number of pairs, so the step's loss is the mean over pairs.
    """
    import mlx.core as mx
    import mlx.nn as nn

    rewards = model(tokens, last)
    n = margin.shape[0]
    chosen, rejected = rewards[:n], rewards[n:]
    losses = -nn.log_sigmoid(chosen - rejected - margin)
    if center_coef:
        losses = losses + center_coef * mx.square(chosen + rejected)
    return losses.sum(), mx.array(n, dtype=mx.float32)


@dataclass
class Bucket:
    pairs: int = 0
    correct: int = 0
    gap_sum: float = 0.0

    def add(self, gap: float) -> None:
        self.pairs += 1
        self.correct += gap > 0
        self.gap_sum += gap

    def summary(self) -> dict[str, float]:
        return {
            "pairs": self.pairs,
            "accuracy": self.correct / self.pairs if self.pairs else float("nan"),
            "mean_gap": self.gap_sum / self.pairs if self.pairs else float("nan"),
        }


@dataclass
class AccuracyReport:
    """Accuracy (r_chosen > r_rejected) per rating bucket and overall, with counts and mean reward gaps: the
    layout of the paper's Table 8."""

    buckets: dict[str, Bucket] = field(default_factory=dict)

    @classmethod
    def from_gaps(cls, pairs: Sequence[Pair], gaps: Sequence[float]) -> AccuracyReport:
        report = cls({name: Bucket() for name in (*RATINGS, UNRATED)})
        for pair, gap in zip(pairs, gaps, strict=True):
            report.buckets[pair.bucket].add(gap)
        report.buckets = {name: bucket for name, bucket in report.buckets.items() if bucket.pairs}
        return report

    @property
    def overall(self) -> Bucket:
        total = Bucket()
        for bucket in self.buckets.values():
            total.pairs += bucket.pairs
            total.correct += bucket.correct
            total.gap_sum += bucket.gap_sum
        return total

    @property
    def accuracy(self) -> float:
        return self.overall.summary()["accuracy"]

    def to_dict(self) -> dict[str, Any]:
        return {
            "accuracy": self.accuracy,
            "pairs": self.overall.pairs,
            "buckets": {name: bucket.summary() for name, bucket in self.buckets.items()},
        }

    def table(self) -> str:
        """A plain-text table: one column per rating bucket, then all pairs."""
        columns = [*((name, bucket) for name, bucket in self.buckets.items()), ("all", self.overall)]
        header = ["rating"] + [name.replace("_", " ") for name, _ in columns]
        lines = [
            ["pairs"] + [str(b.pairs) for _, b in columns],
            ["accuracy"] + [f"{b.summary()['accuracy']:.3f}" for _, b in columns],
            ["mean gap"] + [f"{b.summary()['mean_gap']:+.3f}" for _, b in columns],
        ]
        widths = [max(len(row[i]) for row in [header, *lines]) for i in range(len(header))]
        return "\n".join(
            "  ".join(cell.ljust(width) if i == 0 else cell.rjust(width) for i, (cell, width) in
                      enumerate(zip(row, widths, strict=True)))
            for row in [header, *lines]
        )  # fmt: skip


def evaluate_pairs(
    network, pairs: Sequence[Pair], batch_size: int = 16, on_batch: Callable[[int], None] | None = None
) -> AccuracyReport:
    """Score both answers of every pair and report accuracy per rating bucket."""
    from llama2_mlx.reward_model import score_rows

    rows = [pair.chosen for pair in pairs] + [pair.rejected for pair in pairs]
    rewards = score_rows(network, rows, batch_size, on_batch)
    n = len(pairs)
    return AccuracyReport.from_gaps(pairs, [c - r for c, r in zip(rewards[:n], rewards[n:], strict=True)])
