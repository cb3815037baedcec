"""Reward-model commands: `train-rm` (train one on preference pairs) and `score` (accuracy, or rewards of rows)."""

from __future__ import annotations

import json
from pathlib import Path

import click

from llama2_mlx.cli.dataclass_options import build_config, dataclass_options
from llama2_mlx.cli.train import announce, finish_training
from llama2_mlx.reward_training import RewardConfig


@click.command("train-rm")
@click.argument("model", required=False)
@dataclass_options(RewardConfig, skip=("model",))
@click.option("--json", "as_json", is_flag=True, help="Print the final validation report as JSON.")
@click.pass_context
def train_rm(
    ctx: click.Context, model: str | None, config_file: Path | None, as_json: bool, **_: object
) -> None:
    """Train a reward model from the chat MODEL on preference pairs (--data): the paper's scalar head and
    ranking loss with the rating margin (--margin none|small|large), LoRA on the backbone by default.

    Defaults are the paper's: 1 epoch, lr 1e-5 with --full (1e-4 for LoRA), warmup 3% of the steps (at least 5),
    cosine to 10%. Validation accuracy per rating (the paper's Table 8) is printed at the end and written to
    metrics.jsonl at every evaluation.
    """
    from llama2_mlx.reward_training import run_train_rm

    config = build_config(RewardConfig, ctx, config_file, extra={"model": model})
    result, _, accuracy = run_train_rm(config, announce=announce)
    if accuracy is not None and result.status == "finished":
        click.echo(json.dumps(accuracy.to_dict(), indent=2) if as_json else accuracy.table())
    finish_training(result, Path(config.out), "the reward model")


@click.command("score")
@click.argument("reward_model", required=False, type=click.Path(path_type=Path))
@click.option(
    "--data",
    required=True,
    type=click.Path(path_type=Path, dir_okay=False),
    help='Preference pairs (accuracy per rating), or {"prompt"|"messages", "response"} rows to score.',
)
@click.option(
    "--out",
    type=click.Path(path_type=Path, dir_okay=False),
    help='With prompt/response rows: the .jsonl to write them to, each with a "reward".',
)
@click.option(
    "--batch-size", default=16, show_default=True, type=click.IntRange(min=1), help="Rows per forward pass."
)
@click.option("--json", "as_json", is_flag=True, help="Print the accuracy report as JSON.")
@click.option("--skip-bad-lines", is_flag=True, help="Skip (and count) bad data lines instead of failing.")
@click.option("--force", is_flag=True, help="Replace --out if it exists.")
def score(reward_model: Path | None, data: Path, out: Path | None, batch_size: int, as_json: bool,
          skip_bad_lines: bool, force: bool) -> None:  # fmt: skip
    """Score --data with REWARD_MODEL (default: the shipped demo reward model): accuracy per rating bucket on
    preference pairs, or a reward for each prompt/response row written to --out."""
    from llama2_mlx.loading import demo_reward_model_path
    from llama2_mlx.progress import Progress
    from llama2_mlx.reward_model import load_reward_model
    from llama2_mlx.scoring import is_pair_file, score_pairs, score_responses

    pairs = is_pair_file(data)
    if pairs and out is not None:
        raise click.UsageError("--out is for prompt/response rows; preference pairs give an accuracy report")
    if not pairs and out is None:
        raise click.UsageError("prompt/response rows need --out FILE for the rows with their rewards")
    rm = load_reward_model(reward_model or demo_reward_model_path())
    total, done = _count_rows(data) * (2 if pairs else 1), [0]
    with Progress("scoring", " answers") as progress:  # draws nothing before the first scored batch

        def advance(count: int) -> None:
            done[0] += count
            progress.update(done[0], total)

        if pairs:
            accuracy, report = score_pairs(rm, data, batch_size, skip_bad_lines, advance)
        else:
            written, report = score_responses(rm, data, out, batch_size, skip_bad_lines, force, advance)
    if report.skipped or report.too_long:
        click.echo(f"data: {report.summary()}", err=True)
    if pairs:
        click.echo(json.dumps(accuracy.to_dict(), indent=2) if as_json else accuracy.table())
    else:
        click.echo(f"wrote {written} scored rows to {out}")


def _count_rows(path: Path) -> int:
    with path.open("rb") as file:
        return sum(1 for line in file if line.strip())


COMMANDS: list[click.Command] = [train_rm, score]
