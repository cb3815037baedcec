"""Training commands: `sft`, `fuse`, `pretrain`, `plot`. Each parses flags into a config and calls the library."""

from __future__ import annotations

from pathlib import Path

import click

from llama2_mlx.cli.dataclass_options import build_config, dataclass_options
from llama2_mlx.pretrain import PretrainConfig
from llama2_mlx.sft import SFTConfig


def announce(line: str) -> None:
    click.echo(line, err=True)


def finish_training(result, out: Path, what: str) -> None:
    """The last lines of a training command (rank 0 only): where things are, or how to resume after Ctrl-C."""
    import mlx.core as mx

    if mx.distributed.init().rank() != 0:
        raise SystemExit(130 if result.status == "interrupted" else 0)
    if result.status == "interrupted":
        click.echo(f"interrupted at step {result.step}; checkpoint saved in {result.checkpoint}. "
                   f"Continue with the same command plus --resume.", err=True)  # fmt: skip
        raise SystemExit(130)
    losses = f"last step's loss {result.train_loss:.4f}" if result.train_loss is not None else "no steps"
    if result.val_loss is not None:
        losses += f", validation loss {result.val_loss:.4f}"
    click.echo(f"done: {result.step} steps, {losses}; {what} in {out}")


@click.command("sft")
@click.argument("model", required=False)
@dataclass_options(SFTConfig, skip=("model",))
@click.pass_context
def sft(ctx: click.Context, model: str | None, config_file: Path | None, **_: object) -> None:
    """Supervised fine-tuning of MODEL (LoRA/QLoRA by default, --full for all weights) on --data.

    Defaults are the Llama 2 paper's SFT recipe (lr 2e-5, cosine to 10%, weight decay 0.1, batch 64, 4096 tokens,
    2 epochs, loss on answers only). For LoRA a higher learning rate such as --lr 1e-4 usually works better.
    Run on several machines with `mlx.launch ... llama2-mlx sft ...`: the batch is split across processes.
    """
    from llama2_mlx.sft import run_sft

    config = build_config(SFTConfig, ctx, config_file, extra={"model": model})
    result, _ = run_sft(config, announce=announce)
    finish_training(result, Path(config.out), "the model folder" if config.full else "the adapter")


@click.command("fuse")
@click.argument("model", required=False)
@click.option(
    "--adapter",
    type=click.Path(exists=True, file_okay=False),
    help="Adapter folder from sft (not needed when MODEL is a LoRA reward-model folder, which holds its own).",
)
@click.option("--out", required=True, type=click.Path(), help="New model folder to write.")
@click.option("--dequantize", is_flag=True, help="Write float weights even if MODEL is quantized.")
@click.option("--force", is_flag=True, help="Replace --out if it exists.")
def fuse(model: str | None, adapter: str | None, out: str, dequantize: bool, force: bool) -> None:
    """Merge a LoRA adapter into MODEL's weights and write a standalone model folder.

    MODEL may also be a LoRA reward-model folder from train-rm: the result is a standalone reward model.
    """
    from llama2_mlx.loading import demo_model_path
    from llama2_mlx.lora import fuse_adapter
    from llama2_mlx.progress import Progress
    from llama2_mlx.reward_model import fuse_reward_model, is_reward_folder

    model_path = Path(model) if model else demo_model_path()
    if is_reward_folder(model_path):
        if adapter is not None:
            raise click.UsageError("a reward-model folder holds its own adapter; drop --adapter")
        path = fuse_reward_model(model_path, out, dequantize=dequantize, force=force)
    elif adapter is None:
        raise click.UsageError("Missing option '--adapter' (needed unless MODEL is a reward-model folder).")
    else:
        with Progress("writing", " MB", scale=10**6) as progress:
            path = fuse_adapter(model_path, adapter, out, dequantize=dequantize, force=force,
                                progress=progress.tensor)  # fmt: skip
    click.echo(f"fused model written to {path}")


@click.command("pretrain")
@dataclass_options(PretrainConfig)
@click.pass_context
def pretrain(ctx: click.Context, config_file: Path | None, **_: object) -> None:
    """Train a new model from random weights (--config PRESET|params.json) on a text corpus (--data).

    The paper's pretraining optimiser: AdamW 0.9/0.95/1e-5, weight decay 0.1, clip 1.0, lr 3e-4, 2000 warmup
    steps, cosine to 10%. --out becomes a model folder that every other command takes.
    """
    from llama2_mlx.pretrain import run_pretrain

    config = build_config(PretrainConfig, ctx, config_file)
    finish_training(run_pretrain(config, announce=announce), Path(config.out), "the model folder")


@click.command("plot")
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--out", type=click.Path(dir_okay=False), help="PNG to write (default: RUN_DIR/loss.png).")
def plot(run_dir: str, out: str | None) -> None:
    """Draw the training and validation loss curves of RUN_DIR/metrics.jsonl to a PNG."""
    from llama2_mlx.plot import plot_run

    click.echo(f"wrote {plot_run(run_dir, out)}")


@click.command("gatt-data")
@click.argument("model", required=False)
@click.option(
    "--dialogs",
    required=True,
    type=click.Path(exists=True, dir_okay=False),
    help='Dialogs (.jsonl of {"messages"}); their user messages are kept, answers re-sampled.',
)
@click.option(
    "--instructions",
    required=True,
    type=click.Path(exists=True, dir_okay=False),
    help='Instructions: .txt one a line, or .jsonl of {"instruction", "short"}.',
)
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="Output .jsonl for sft --gatt.")
@click.option("--adapter", type=click.Path(exists=True, file_okay=False), help="LoRA adapter on MODEL.")
@click.option("--max-tokens", default=128, show_default=True, help="Longest sampled answer.")
@click.option("--temperature", default=0.6, show_default=True, help="Sampling temperature (Meta's default).")
@click.option("--top-p", default=0.9, show_default=True, help="Nucleus sampling mass (Meta's default).")
@click.option("--seed", default=0, show_default=True, help="Seed for instruction choice and sampling.")
@click.option("--batch-size", default=16, show_default=True, help="Dialogs sampled together.")
@click.option("--force", is_flag=True, help="Replace --out if it exists.")
def gatt_data(model, dialogs, instructions, out, adapter, force, **sampling) -> None:  # fmt: skip
    """Build Ghost Attention dialogs: answers sampled with the instruction on every user message, kept only as
    the first turn's system message in the output (train with `sft --gatt`)."""
    from llama2_mlx.gatt import run_gatt_data
    from llama2_mlx.progress import Progress

    with Progress("sampling", " answers") as progress:
        count = run_gatt_data(
            model,
            dialogs,
            instructions,
            out,
            adapter=adapter,
            force=force,
            progress=progress.update,
            **sampling,
        )
    click.echo(f"wrote {count} dialogs to {out}")


COMMANDS: list[click.Command] = [sft, fuse, pretrain, plot, gatt_data]
