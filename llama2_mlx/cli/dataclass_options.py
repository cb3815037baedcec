"""Click options generated from a config dataclass, merged with a -c config.yaml: no field is copied by hand.

Each dataclass field becomes `--field-name` (bools become on/off flags) with the field's `metadata["help"]`;
`metadata["flag"]` names the flag (and config-file key) differently, e.g. a job's `data` field as `--prompts`.
Values come from the dataclass defaults, then the YAML file (same keys as the flags, - or _), then the flags the
user actually typed, so a flag always wins over the file.
"""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path
from typing import Any

import click

from llama2_mlx.config_fields import field_type
from llama2_mlx.errors import Llama2MLXError

_CLICK_TYPES = {int: click.INT, float: click.FLOAT, str: click.STRING}


def _fields(cls: type, skip: tuple[str, ...]) -> list[tuple[dataclasses.Field, type]]:
    hints = typing.get_type_hints(cls)
    return [(f, field_type(hints[f.name])[0]) for f in dataclasses.fields(cls) if f.name not in skip]


def _flag(f: dataclasses.Field) -> str:
    return f.metadata.get("flag", f.name).replace("_", "-")


def dataclass_options(cls: type, skip: tuple[str, ...] = ()):
    """Decorator adding one click option per field of `cls` (except `skip`) and `-c/--config-file FILE`."""

    def decorate(command):
        for f, kind in reversed(_fields(cls, skip)):
            flag = _flag(f)
            help_text = f.metadata.get("help", "")
            if kind is bool:
                default = f.default if f.default is not dataclasses.MISSING else False
                decl = f"--{flag}/--no-{flag}" if default else f"--{flag}"
                command = click.option(decl, f.name, is_flag=True, default=default, help=help_text)(command)
                continue
            required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
            choices = f.metadata.get("choices")
            command = click.option(
                f"--{flag}",
                f.name,
                type=click.Choice(choices) if choices else _CLICK_TYPES[kind],
                default=None if required else f.default,
                show_default=not required and f.default is not None,
                help=help_text + (" [required]" if required else ""),
            )(command)
        return click.option(
            "-c", "--config-file", "config_file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
            help="YAML file with the same keys as the flags; flags given on the command line win.",
        )(command)  # fmt: skip

    return decorate


def build_config(
    cls: type, ctx: click.Context, config_file: Path | None, extra: dict[str, Any] | None = None
):
    """An instance of `cls` from defaults < config file < the flags typed on the command line (< `extra`)."""
    known = {f.name: kind for f, kind in _fields(cls, ())}
    fields = {f.name: f for f in dataclasses.fields(cls)}
    values: dict[str, Any] = {}
    if config_file is not None:
        aliases = {_flag(f).replace("-", "_"): name for name, f in fields.items()}
        values.update(_read_yaml(config_file, known, aliases))
    for name, value in ctx.params.items():
        if name in known and ctx.get_parameter_source(name) not in (None, click.core.ParameterSource.DEFAULT):
            values[name] = value
        elif name in known and name not in values:
            values[name] = value
    values.update({k: v for k, v in (extra or {}).items() if v is not None})
    missing = [n for n, f in ((f.name, f) for f in dataclasses.fields(cls)) if f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING and values.get(n) is None]  # fmt: skip
    if missing:
        raise click.UsageError(
            f"missing --{_flag(fields[missing[0]])} (or '{_flag(fields[missing[0]])}' in the config file)"
        )
    return cls(**{k: v for k, v in values.items() if k in known})


def _read_yaml(path: Path, known: dict[str, type], aliases: dict[str, str]) -> dict[str, Any]:
    import yaml

    try:
        data = yaml.safe_load(path.read_bytes().decode("utf-8")) or {}
    except UnicodeDecodeError as error:
        raise Llama2MLXError(f"{path}: not UTF-8 text (byte {error.start})") from None
    except yaml.YAMLError as error:
        raise Llama2MLXError(f"{path}: not valid YAML ({' '.join(str(error).split())})") from None
    if not isinstance(data, dict):
        raise Llama2MLXError(f"{path}: expected a mapping of option names to values")
    values = {}
    for key, value in data.items():
        name = aliases.get(str(key).replace("-", "_"), str(key).replace("-", "_"))
        if name not in known:
            raise Llama2MLXError(f"{path}: unknown key '{key}'")
        kind = known[name]
        if kind in (int, float) and isinstance(value, str):  # PyYAML reads `lr: 1e-4` as a string
            try:
                value = kind(value)
            except ValueError:
                raise Llama2MLXError(f"{path}: '{key}' must be a number, got {value!r}") from None
        if value is not None and kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if kind is str and isinstance(value, list):  # e.g. targets: [q, v]
            value = ",".join(map(str, value))
        if kind is str and isinstance(value, int | float) and not isinstance(value, bool):  # e.g. layers: 4
            value = str(value)
        if value is not None and (
            not isinstance(value, kind) or (kind is not bool and isinstance(value, bool))
        ):
            raise Llama2MLXError(f"{path}: '{key}' must be {kind.__name__}, got {value!r}")
        values[name] = value
    return values
