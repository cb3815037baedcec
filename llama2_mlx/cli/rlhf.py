"""RLHF commands: `rejection-sample` (the paper's iterative rejection-sampling fine-tuning), `dpo`, `ppo`."""

from __future__ import annotations

from pathlib import Path

import click

from llama2_mlx.cli.dataclass_options import build_config, dataclass_options
from llama2_mlx.cli.train import announce, finish_training
from llama2_mlx.dpo import DPOConfig
from llama2_mlx.ppo import UNUSED_FLAGS, PPOConfig
from llama2_mlx.rejection_sampling import RejectionConfig


@click.command("rejection-sample")
@click.argument("model", required=False)
@dataclass_options(RejectionConfig, skip=("model",))
@click.pass_context
def rejection_sample(ctx: click.Context, model: str | None, config_file: Path | None, **_: object) -> None:
    """Rejection-sampling fine-tuning of MODEL (default: the demo model): each iteration samples --k answers per
    prompt, scores them (--reward-model, optionally --safety-reward-model, or --reward-fn), keeps the best per
    prompt from all iterations so far (--pool all; latest for the paper's V1-V3), and fine-tunes on them with the
    sft recipe (the sft flags apply). Outputs DIR/iter-N/{samples,selected}.jsonl, adapter/, summary.json,
    figure7.png and DIR/report.md; --resume continues after the last finished iteration.
    """
    from llama2_mlx.rejection_sampling import run_rejection_sampling

    config = build_config(RejectionConfig, ctx, config_file, extra={"model": model})
    result = run_rejection_sampling(config, announce=announce)
    out = Path(config.out)
    if result.status == "interrupted":
        click.echo(f"interrupted; {len(result.summaries)} iteration(s) finished in {out}. "
                   "Continue with the same command plus --resume.", err=True)  # fmt: skip
        raise SystemExit(130)
    for summary in result.summaries:
        means = ", ".join(
            f"T={t}: mean {r['mean']:.4f} max {r['max']:.4f}" for t, r in summary["temperatures"].items()
        )
        click.echo(
            f"iteration {summary['iteration']}: {means}; selected {summary['selected_mean_reward']:.4f}"
        )
    last = result.summaries[-1]["iteration"]
    click.echo(f"done: {last} iterations; the last adapter is {out / f'iter-{last}' / 'adapter'}; report in "
               f"{out / 'report.md'}")  # fmt: skip


@click.command("dpo")
@click.argument("model", required=False)
@dataclass_options(DPOConfig, skip=("model",))
@click.pass_context
def dpo(ctx: click.Context, model: str | None, config_file: Path | None, **_: object) -> None:
    """Direct preference optimisation of MODEL (default: the demo model) on preference pairs (--data, the rows of
    train-rm; a rating is optional). The reference is the starting policy (MODEL, or MODEL + --adapter): its
    log-probabilities are computed once before training, so no second model is held, not even with --full.
    Validation reports DPO's implicit reward accuracy and margin."""
    from llama2_mlx.dpo import run_dpo

    config = build_config(DPOConfig, ctx, config_file, extra={"model": model})
    result, _, metrics = run_dpo(config, announce=announce)
    if metrics is not None and result.status == "finished":
        click.echo(f"validation: reward accuracy {metrics['val_accuracy']:.3f}, "
                   f"mean reward margin {metrics['val_reward_margin']:+.4f}")  # fmt: skip
    finish_training(result, Path(config.out), "the model folder" if config.full else "the adapter")


@click.command("ppo")
@click.argument("model", required=False)
@dataclass_options(PPOConfig, skip=("model", *UNUSED_FLAGS))
@click.pass_context
def ppo(ctx: click.Context, model: str | None, config_file: Path | None, **_: object) -> None:
    """PPO of MODEL (default: the demo model) against a reward model (or --reward-fn), as in the paper: reward
    WHITEN(LOGIT(Rc)) minus kl_coef x KL to the reference per token, GAE, the clipped objective and a value loss.
    One base holds everything: the policy is a LoRA adapter (continuing --adapter), the reference is the same base
    with the starting adapter, the reward model shares the base when it was trained on it, and the value function
    is a head on the policy's hidden state. metrics.jsonl has reward, kl, value_loss and clip_fraction per step."""
    from llama2_mlx.ppo import run_ppo, summary

    config = build_config(PPOConfig, ctx, config_file, extra={"model": model})
    result = run_ppo(config, announce=announce)
    numbers = summary(result.history)
    if numbers:
        click.echo(f"mean reward {numbers['first_reward']:+.4f} (first quarter of the steps) -> "
                   f"{numbers['last_reward']:+.4f} (last quarter), KL {numbers['last_kl']:.4f}")  # fmt: skip
    finish_training(result, Path(config.out), "the model folder" if config.full else "the policy adapter")


COMMANDS: list[click.Command] = [rejection_sample, dpo, ppo]
