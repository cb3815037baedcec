"""`llama2-mlx serve`: an OpenAI-compatible HTTP endpoint for our model folders, by launching `mlx_lm.server`.

We write no server: our folders are mlx-lm folders (HF config keys, tokenizer_config.json with Llama 2's chat
template) and our adapters carry mlx-lm's adapter keys, so mlx-lm's server serves them as they are. The launcher
picks the demo model by default, checks the folders first (one clear line instead of a server traceback), and
hands a folder written before the template existed our template on the command line.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from llama2_mlx.errors import Llama2MLXError


def server_arguments(model: Path, adapter: Path | None, host: str, port: int) -> list[str]:
    """The `mlx_lm.server` command line for a model folder (and adapter folder)."""
    from llama2_mlx.chat_template import CHAT_TEMPLATE
    from llama2_mlx.lora import ADAPTER_CONFIG

    if not (model / "config.json").is_file():
        raise Llama2MLXError(f"{model}: not a model folder (no config.json)")
    if adapter is not None and not (adapter / ADAPTER_CONFIG).is_file():
        raise Llama2MLXError(f"{adapter}: not an adapter folder (no {ADAPTER_CONFIG})")
    arguments = ["--model", str(model), "--host", host, "--port", str(port)]
    if adapter is not None:
        arguments += ["--adapter-path", str(adapter)]
    if not _has_chat_template(model):
        arguments += ["--chat-template", CHAT_TEMPLATE]
    return arguments


def _has_chat_template(model: Path) -> bool:
    config_path = model / "tokenizer_config.json"
    if (model / "chat_template.jinja").is_file():
        return True
    try:
        return bool(json.loads(config_path.read_text()).get("chat_template"))
    except (OSError, ValueError, AttributeError):
        return False


@click.command()
@click.argument("model", type=click.Path(path_type=Path), required=False)
@click.option(
    "--adapter",
    "--adapter-path",
    type=click.Path(path_type=Path),
    default=None,
    help="LoRA adapter folder (from sft) to serve on top of MODEL.",
)
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option(
    "--port", type=click.IntRange(1, 65535), default=8080, show_default=True, help="Port to listen on."
)
def serve(model: Path | None, adapter: Path | None, host: str, port: int) -> None:
    """Serve MODEL (default: the shipped demo model) over HTTP with mlx_lm.server's OpenAI-compatible API.

    POST /v1/chat/completions with {"messages": [...]} gets answers in Llama 2's chat format; sampling settings
    (temperature, top_p, max_tokens, seed) come with each request. For mlx_lm.server's other flags run
    `python -m mlx_lm.server --model MODEL ...` directly: our folders need nothing more.
    """
    from llama2_mlx.loading import demo_model_path

    arguments = server_arguments(model or demo_model_path(), adapter, host, port)
    from mlx_lm import server

    click.echo(f"serving {model or demo_model_path()} at http://{host}:{port}/v1/chat/completions", err=True)
    sys.argv = ["mlx_lm.server", *arguments]  # mlx_lm.server reads its flags from sys.argv
    server.main()


COMMANDS: list[click.Command] = [serve]
