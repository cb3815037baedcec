"""Commands of the demo model's pipeline: the synthetic world's data, tokenizer training and evaluation."""

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
        if sizes or force:
            raise click.UsageError(
                "--examples writes a fixed few lines of each format and always replaces --out"
            )
        counts = write_examples(out, seed)
    else:
        counts = write_world(out, seed, parse_sizes(sizes), force=force)
    for name, count in counts.items():
        click.echo(f"{out / name}: {count} lines")


@click.command("annotate")
@click.argument("samples", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option(
    "--prompts",
    required=True,
    type=click.Path(path_type=Path),
    help="The world prompts file the samples answer (`world` writes prompts.jsonl, with each prompt's check).",
)
@click.option("--out", "out", required=True, type=click.Path(path_type=Path), help="Preference pairs .jsonl.")
@click.option(
    "--pairs-per-prompt",
    default=2,
    show_default=True,
    type=click.IntRange(min=1),
    help="Most pairs per prompt.",
)
@click.option("--seed", default=0, show_default=True, help="Seed of the pairing.")
@click.option("--force", is_flag=True, help="Replace an existing --out file.")
def annotate(samples: tuple[Path, ...], prompts: Path, out: Path, pairs_per_prompt: int, seed: int,
             force: bool) -> None:  # fmt: skip
    """Judge sampled answers (rejection-sample's samples.jsonl) with the world's checks and write preference pairs
    of a right answer over a wrong one to the same prompt: the paper's annotators, for the policy's own mistakes."""
    import json

    from llama2_mlx.destination import atomic_file
    from llama2_mlx.world.annotate import annotate as pair_up
    from llama2_mlx.world.annotate import read_samples, read_world_prompts

    rows = read_world_prompts(prompts)
    answers: dict[int, list[str]] = {}
    for path in samples:
        for index, texts in read_samples(path, rows).items():
            answers.setdefault(index, []).extend(texts)
    pairs, undecided = pair_up(rows, answers, pairs_per_prompt, seed)
    if not pairs:
        raise click.ClickException(
            f"no pairs: the answers to each of the {len(answers)} prompts were all right or all wrong"
        )
    with atomic_file(out, force=force, inputs=[prompts, *samples]) as tmp:
        tmp.write_text("".join(json.dumps(pair, ensure_ascii=False) + "\n" for pair in pairs))
    click.echo(
        f"{out}: {len(pairs)} pairs from {len(answers) - undecided} prompts "
        f"({undecided} of {len(answers)} had answers all right or all wrong)"
    )


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


@click.command("eval")
@click.argument("model", required=False, type=click.Path(path_type=Path))
@click.option(
    "--prompts",
    type=click.Path(path_type=Path),
    default=None,
    help="Held-out prompts jsonl (`world` writes heldout.jsonl); default: the world's own held-out set.",
)
@click.option("--seed", type=int, default=None, help="World seed of the default held-out set (default 0).")
@click.option(
    "--data",
    type=click.Path(path_type=Path),
    default=None,
    help="Instead: loss and perplexity on this SFT-format .jsonl, masked as sft trains (answers only).",
)
@click.option(
    "--max-tokens", type=click.IntRange(min=1), default=48, show_default=True, help="Most tokens per answer."
)
@click.option(
    "--batch-size",
    type=click.IntRange(min=1),
    default=64,
    show_default=True,
    help="Dialogs answered together.",
)
@click.option(
    "--adapter", type=click.Path(path_type=Path), default=None, help="LoRA adapter folder to apply."
)
@click.option(
    "--json",
    "json_out",
    type=click.Path(path_type=Path),
    default=None,
    help="Also write the scores to this JSON file.",
)
def eval_command(model: Path | None, prompts: Path | None, seed: int | None, data: Path | None, max_tokens: int,
                 batch_size: int, adapter: Path | None, json_out: Path | None) -> None:  # fmt: skip
    """Score MODEL (default: the demo model) on held-out world prompts with greedy decoding, or on your data.

    Prints task accuracy per skill and, for dialogs under a system style instruction, the share of answers that
    follow it at each turn (the model's own earlier answers are fed back). With --data, prints the loss and
    perplexity of MODEL on that file instead.
    """
    import dataclasses
    import json

    from llama2_mlx.evaluation import evaluate, format_report, read_heldout, world_heldout
    from llama2_mlx.fileio import write_text_atomic
    from llama2_mlx.loading import demo_model_path, load
    from llama2_mlx.progress import Progress

    if prompts is not None and seed is not None:
        raise click.UsageError("--seed chooses the world's own held-out set; it cannot apply to --prompts")
    if data is not None:
        if prompts is not None or seed is not None:
            raise click.UsageError("--data scores a data file; --prompts and --seed choose held-out dialogs")
        from llama2_mlx.evaluation import score_data

        loaded, tok = load(model or demo_model_path(), adapter)
        result = score_data(loaded, tok, data, batch_size=batch_size)
        click.echo(result.summary())
        if json_out is not None:
            write_text_atomic(json_out, json.dumps(dataclasses.asdict(result), indent=2) + "\n")
        return
    items = read_heldout(prompts) if prompts is not None else world_heldout(seed or 0)
    loaded, tok = load(model or demo_model_path(), adapter)
    with Progress("answering", " answers") as progress:
        report = evaluate(
            loaded, tok, items, max_tokens=max_tokens, batch_size=batch_size, progress=progress.update
        )
    click.echo(format_report(report))
    if json_out is not None:
        write_text_atomic(json_out, json.dumps(report.to_json(), indent=2) + "\n")


@click.command("demo")
@click.option(
    "--out",
    type=click.Path(path_type=Path),
    default=Path("runs/recipe"),
    show_default=True,
    help="Folder for every stage's output and report.md.",
)
@click.option("--quick", is_flag=True, help="Smaller sizes: about ten minutes on 2 CPU cores with OpenBLAS.")
@click.option(
    "--size",
    type=click.Choice(["tiny", "quick", "full"]),
    default=None,
    help="Sizes by name (tiny: a smoke test in about a minute); --quick is --size quick.",
)
@click.option(
    "--from-stage",
    type=click.Choice(["pretrain", "sft", "reward", "rejection", "gatt", "dpo"]),
    default=None,
    help="Rerun from this stage, using the earlier stages' folders in --out.",
)
@click.option("--seed", default=0, show_default=True, help="Seed of the world and every stage.")
def demo(out: Path, quick: bool, size: str | None, from_stage: str | None, seed: int) -> None:
    """The Llama 2 recipe in miniature, from nothing, on the synthetic world: pretraining -> SFT -> reward models
    (margin none vs large) -> rejection sampling -> Ghost Attention -> DPO, each stage's tables printed and
    appended to OUT/report.md, plots beside it."""  # fmt: skip
    from llama2_mlx.demo import run_demo

    if quick and size not in (None, "quick"):
        raise click.UsageError("--quick is --size quick; give one of them")
    report = run_demo(out, quick=quick, from_stage=from_stage, seed=seed, size=size,
                      say=lambda line: click.echo(line, err=True))  # fmt: skip
    click.echo(f"done: the report is {report}")


COMMANDS: list[click.Command] = [world, annotate, train_tokenizer, eval_command, demo]
