"""`llama2-mlx score`: a reward model's accuracy on preference pairs, or its rewards added to prompt/response rows.

The file's kind is read from its rows: `{"chosen", "rejected", ...}` rows are preference pairs (accuracy per rating,
the paper's Table 8); `{"prompt" | "messages", "response"}` rows get a `"reward"` field and go to a new file.
Every row is checked before the first one is scored, and the output is written in one atomic step.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from llama2_mlx.data import DataReport, read_rows
from llama2_mlx.errors import Llama2MLXError
from llama2_mlx.preferences import AccuracyReport, Pair, encode_pair, evaluate_pairs
from llama2_mlx.reward_model import RewardScorer


def is_pair_file(path: Path) -> bool:
    """True when the first row of a .jsonl file is a preference pair (has "chosen" and "rejected")."""
    from llama2_mlx.fileio import jsonl_records

    for _, row in jsonl_records(path, "no such data file"):
        return isinstance(row, dict) and "chosen" in row and "rejected" in row
    raise Llama2MLXError(f"{path}: no rows")


def score_pairs(
    rm: RewardScorer,
    path: Path,
    batch_size: int = 16,
    skip_bad_lines: bool = False,
    on_batch: Callable[[int], None] | None = None,
) -> tuple[AccuracyReport, DataReport]:
    """Accuracy of `rm` on the pairs of `path`; pairs longer than its context are left out and counted."""
    report = DataReport()
    pairs: list[Pair] = read_rows(path, lambda row: encode_pair(row, rm.tokenizer), report, skip_bad_lines)
    fitting = [pair for pair in pairs if len(pair) <= rm.network.args.max_seq_len]
    report.too_long = len(pairs) - len(fitting)
    if not fitting:
        raise Llama2MLXError(f"{path}: every pair is longer than the reward model's context")
    return evaluate_pairs(rm.network, fitting, batch_size, on_batch), report


def score_responses(
    rm: RewardScorer,
    path: Path,
    out: Path,
    batch_size: int = 16,
    skip_bad_lines: bool = False,
    force: bool = False,
    on_batch: Callable[[int], None] | None = None,
) -> tuple[int, DataReport]:
    """Write `path`'s rows with a `"reward"` field to `out`; returns (rows written, report)."""
    from llama2_mlx.fileio import write_text_atomic

    if out.exists() and not force:
        raise Llama2MLXError(f"{out}: already exists (use --force to overwrite)")
    if out.resolve() == path.resolve():
        raise Llama2MLXError(f"{out}: is the input file; write the scores to another file")
    report = DataReport()
    rows = read_rows(path, lambda row: (row, rm.encode(*_prompt_and_response(row))), report, skip_bad_lines)
    rewards = rm.score_batch_ids([ids for _, ids in rows], batch_size, on_batch)
    lines = [json.dumps({**row, "reward": reward}, ensure_ascii=False) + "\n" for (row, _), reward in
             zip(rows, rewards, strict=True)]  # fmt: skip
    out.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out, "".join(lines))
    return len(lines), report


def _prompt_and_response(row: Any) -> tuple[Any, str]:
    if not isinstance(row, dict):
        raise Llama2MLXError(f"expected a JSON object, got {type(row).__name__}")
    if ("prompt" in row) == ("messages" in row):
        raise Llama2MLXError('a row to score needs exactly one of "prompt" or "messages", and "response"')
    prompt = row.get("prompt", row.get("messages"))
    if not isinstance(prompt, str | list) or not prompt:
        raise Llama2MLXError("'prompt' must be a non-empty string ('messages' a non-empty list)")
    if not isinstance(row.get("response"), str):
        raise Llama2MLXError("'response' must be a string")
    return prompt, row["response"]
