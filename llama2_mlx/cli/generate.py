"""`llama2-mlx generate` (one answer) and `llama2-mlx chat` (an interactive, streaming REPL)."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import click

from llama2_mlx.errors import Llama2MLXError

CHAT_HELP = "commands: /reset (new conversation), /system TEXT (new system prompt; empty clears it), /exit"


def _sampling_options(command: Callable) -> Callable:
    """Flags shared by both commands, with mlx-lm's spellings as aliases. Defaults are the Python API's
    (`llama2_mlx.generate`): greedy; Meta's chat sampled with --temperature 0.6 --top-p 0.9."""
    options = [
        click.option("--model", "model_option", type=click.Path(path_type=Path), default=None,
                     help="The model folder, as the MODEL argument (mlx-lm's spelling)."),
        click.option("--max-tokens", type=click.IntRange(min=1), default=256, show_default=True,
                     help="Most tokens to generate per answer."),
        click.option("--temperature", "--temp", type=click.FloatRange(min=0), default=0.0, show_default=True,
                     help="Sampling temperature; 0 = greedy (Meta's chat: 0.6)."),
        click.option("--top-p", type=click.FloatRange(min=0, max=1, min_open=True), default=1.0,
                     show_default=True, help="Nucleus sampling mass (Meta's chat: 0.9)."),
        click.option("--top-k", type=click.IntRange(min=0), default=0, show_default=True,
                     help="Keep only the K most likely tokens (0 = off)."),
        click.option("--seed", type=int, default=None,
                     help="Random seed, to repeat a sampled answer (default: a fresh seed each run)."),
        click.option("--adapter", "--adapter-path", type=click.Path(path_type=Path), default=None,
                     help="LoRA adapter folder to apply on top of the model."),
        click.option("--dtype", type=click.Choice(["float32", "float16", "bfloat16"]), default=None,
                     help="Compute dtype (default: float32 on the CPU, the checkpoint's on a GPU)."),
        click.option("--verbose", is_flag=True, help="Print prompt/generation tokens per second and peak memory."),
    ]  # fmt: skip
    for option in reversed(options):
        command = option(command)
    return command


def _load(model: Path | None, model_option: Path | None, adapter: Path | None, dtype: str | None):
    from llama2_mlx.loading import demo_model_path, load
    from llama2_mlx.model_folder import parse_dtype

    if model is not None and model_option is not None and model != model_option:
        raise click.UsageError(f"two models given: MODEL {model} and --model {model_option}")
    model = model or model_option
    if model is None:
        model = demo_model_path()
        if not model.is_dir():
            raise Llama2MLXError(f"{model}: the demo model is missing; pass a MODEL folder")
    return load(model, adapter, dtype=parse_dtype(dtype))


def _stream(chunks: Iterator, verbose: bool) -> None:
    """Print an answer as it arrives, without the whitespace around it (Meta's format ends answers with a space);
    with --verbose, its statistics on stderr."""
    chunk, started, held = None, False, ""
    for chunk in chunks:
        text = held + chunk.text
        if not started:
            text = text.lstrip()
            started = bool(text)
        shown = text.rstrip()
        held = text[len(shown) :]  # trailing whitespace waits for more text
        click.echo(shown, nl=False)
        sys.stdout.flush()
    click.echo()
    if chunk is not None and chunk.stats.dropped_turns:
        click.echo(f"[context full: dropped the oldest {chunk.stats.dropped_turns} exchange(s)]", err=True)
    if verbose and chunk is not None:
        click.echo(chunk.stats.summary(), err=True)


@click.command()
@click.argument("model", type=click.Path(path_type=Path), required=False)
@click.option(
    "--prompt",
    required=True,
    help="The user message (or, with --raw, the text to continue); - reads it from standard input.",
)
@click.option("--system", "--system-prompt", default=None, help="System prompt (chat format).")
@click.option("--raw", is_flag=True, help="Continue the text as is (BOS + text), without the chat format.")
@_sampling_options
def generate(
    model,
    prompt,
    system,
    raw,
    model_option,
    max_tokens,
    temperature,
    top_p,
    top_k,
    seed,
    adapter,
    dtype,
    verbose,
):
    """Answer one prompt with MODEL (default: the shipped demo model), streaming the text."""
    from llama2_mlx.generation import stream_generate

    if prompt == "-":
        prompt = sys.stdin.read().removesuffix("\n")  # `echo TEXT |` adds a newline that is not part of TEXT
    if raw and system is not None:
        raise click.UsageError("--system has no meaning with --raw")
    messages = ([{"role": "system", "content": system}] if system is not None else []) + [
        {"role": "user", "content": prompt}
    ]
    net, tok = _load(model, model_option, adapter, dtype)
    chunks = stream_generate(
        net, tok, prompt if raw else messages, max_tokens=max_tokens, temperature=temperature, top_p=top_p,
        top_k=top_k, seed=seed,
    )  # fmt: skip
    _stream(chunks, verbose)


@click.command()
@click.argument("model", type=click.Path(path_type=Path), required=False)
@click.option("--system", "--system-prompt", default=None, help="System prompt for the conversation.")
@_sampling_options
def chat(model, system, model_option, max_tokens, temperature, top_p, top_k, seed, adapter, dtype, verbose):
    """Chat with MODEL (default: the shipped demo model). Ctrl-C stops an answer; Ctrl-D or /exit quits."""
    from llama2_mlx.chat import ChatSession

    net, tok = _load(model, model_option, adapter, dtype)
    session = ChatSession(net, tok, system, max_tokens, temperature, top_p, top_k, seed)
    prompt = ""
    if hasattr(
        sys.stdin, "reconfigure"
    ):  # a line that is not UTF-8 must not end the session: the tokenizer refuses it
        sys.stdin.reconfigure(errors="surrogateescape")
    if sys.stdin.isatty():
        import readline  # noqa: F401  (line editing and history for input())

        prompt = ">>> "
        click.echo(CHAT_HELP, err=True)
    while True:
        try:
            text = input(prompt).strip()
        except KeyboardInterrupt:
            click.echo()
            continue
        except EOFError:  # end of input (Ctrl-D)
            if prompt:
                click.echo()
            return
        if not text:
            continue
        if text in ("/exit", "/quit"):
            return
        try:
            if text == "/reset":
                session.reset()
                click.echo("[new conversation]", err=True)
            elif text == "/system" or text.startswith("/system "):
                session.set_system(text[len("/system") :].strip())
                click.echo("[system prompt set; new conversation]", err=True)
            elif text.startswith("/"):
                click.echo(f"unknown command {text.split()[0]}; {CHAT_HELP}", err=True)
            else:
                _answer(session, text, verbose)
        except Llama2MLXError as error:  # a bad message ends that turn, not the session
            click.echo(f"error: {error}", err=True)


def _answer(session, text: str, verbose: bool) -> None:
    chunks = session.ask(text)
    try:
        _stream(chunks, verbose)
    except KeyboardInterrupt:
        click.echo("\n[stopped]", err=True)
    finally:
        chunks.close()


COMMANDS: list[click.Command] = [generate, chat]
