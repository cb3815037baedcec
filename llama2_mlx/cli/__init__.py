"""The `llama2-mlx` command line: a click group whose commands parse flags and call one library function each.

Every command lives in a module of this package, grouped by area, and is registered below. Heavy imports
(mlx, the model) happen inside the commands so that `--help` stays instant.
"""

from __future__ import annotations

import sys

import click

from llama2_mlx import __version__
from llama2_mlx.errors import Llama2MLXError


class _Group(click.Group):
    """The one error path: `Llama2MLXError` and operating-system errors (read-only folder, disk full, a file where
    a folder should be) become one line on stderr and exit code 1 (a traceback only with --debug)."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except (Llama2MLXError, OSError) as error:
            if ctx.params.get("debug"):
                raise
            message = str(error) if isinstance(error, Llama2MLXError) else _os_error_line(error)
            # some messages are quoted verbatim and already begin with "Error:"
            click.echo(message if message.startswith("Error:") else f"error: {message}", err=True)
            ctx.exit(1)


def _os_error_line(error: OSError) -> str:
    """`path: reason` (`path -> other: reason` for a rename), the path first as in every other message."""
    reason = error.strerror or str(error)
    if error.filename is None:
        return reason
    if error.filename2 is not None:
        return f"{error.filename} -> {error.filename2}: {reason}"
    return f"{error.filename}: {reason}"


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="llama2-mlx")
@click.option("--debug", is_flag=True, help="Show full tracebacks on errors.")
def cli(debug: bool) -> None:
    """Train and run Llama 2 on your own computer, in MLX."""


# Each area's module exposes COMMANDS, a list of click commands; add new modules to this tuple.
_COMMAND_MODULES: tuple[str, ...] = (
    "convert",
    "generate",
    "train",
    "demo",
    "reward",
    "rlhf",
    "serve",
    "doctor",
)


def _register_commands() -> None:
    import importlib

    for name in _COMMAND_MODULES:
        for command in importlib.import_module(f"llama2_mlx.cli.{name}").COMMANDS:
            cli.add_command(command)


_register_commands()


def main() -> None:
    """Console-script entry point."""
    cli(prog_name="llama2-mlx", args=sys.argv[1:])
