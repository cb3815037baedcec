"""Commands of the demo model's pipeline: the synthetic world's data and tokenizer training."""

from __future__ import annotations

from pathlib import Path

import click


@click.command("world")
@click.option(
    "--out", "out", required=True, type=click.Path(path_type=Path), help="Folder to write the data into."
)
@click.option("--seed", default=0, show_default=True, help="Random seed; the same seed gives the same files.")
@click.option("--sizes", default="", help='Lines per file, e.g. "corpus=20000,train=4000,heldout=400".')
@click.option(
    "--examples", is_flag=True, help="Write a few lines of every data format instead (examples/data)."
)
@click.option("--force", is_flag=True, help="Replace an existing --out folder.")
def world(out: Path, seed: int, sizes: str, examples: bool, force: bool) -> None:
    """Write the synthetic small-assistant world: corpus, SFT dialogs, preferences, held-out prompts."""
    from llama2_mlx.world import parse_sizes, write_examples, write_world

    if examples:
        counts = write_examples(out, seed)
    else:
        counts = write_world(out, seed, parse_sizes(sizes), force=force)
    for name, count in counts.items():
        click.echo(f"{out / name}: {count} lines")


@click.command("train-tokenizer")
@click.option(
    "--corpus", required=True, type=click.Path(path_type=Path), help="Text file, one sentence a line."
)
@click.option("--vocab-size", required=True, type=click.IntRange(min=1), help="Number of pieces.")
@click.option(
    "--out", "out", required=True, type=click.Path(path_type=Path), help="Folder for tokenizer.model."
)
def train_tokenizer(corpus: Path, vocab_size: int, out: Path) -> None:
    """Train a sentencepiece BPE tokenizer with Llama 2's settings (split digits, byte fallback, no pad)."""
    from llama2_mlx.tokenizer_training import train_tokenizer as train

    click.echo(train(corpus, vocab_size, out))


COMMANDS: list[click.Command] = [world, train_tokenizer]
