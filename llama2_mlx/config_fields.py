"""The one check of a job config's fields (SFTConfig, PretrainConfig, ...), from their type hints and metadata.

Flags, YAML files and library callers all build the same dataclass, so checking it in `__post_init__` covers
every way in. Each field is checked against its type (an int is accepted for a float, never a bool for a number),
floats must be finite (no nan, no inf), and `metadata` may bound it: "min"/"max" (inclusive), "above" (exclusive
lower bound), "choices". Errors name the field as the YAML key and the flag, so the user finds it either way.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from typing import Any

from llama2_mlx.errors import Llama2MLXError

SEED_RANGE = {"min": 0, "max": 2**32 - 1}  # numpy's, MLX's and Python's seeds all accept this range


def field_type(annotation: Any) -> tuple[type, bool]:
    """`int | None` -> (int, True); `float` -> (float, False)."""
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        args = typing.get_args(annotation)
        return next(arg for arg in args if arg is not type(None)), type(None) in args
    return annotation, False


def validate_fields(config: Any) -> None:
    """Raise `Llama2MLXError` for the first field of the dataclass `config` that breaks its type or bounds;
    ints given for float fields become floats."""
    hints = typing.get_type_hints(type(config))
    for f in dataclasses.fields(config):
        kind, optional = field_type(hints[f.name])
        value = getattr(config, f.name)
        name = f"{f.name} (--{f.name.replace('_', '-')})"
        if value is None:
            if optional:
                continue
            raise Llama2MLXError(f"{name} must be set")
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
            object.__setattr__(config, f.name, value)
        if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
            raise Llama2MLXError(f"{name} must be {_KIND_NAMES.get(kind, kind.__name__)}, got {value!r}")
        if kind is float and not math.isfinite(value):
            raise Llama2MLXError(f"{name} must be a finite number, got {value}")
        meta = _bounds(type(config), f.name)
        if "min" in meta and value < meta["min"]:
            raise Llama2MLXError(f"{name} must be at least {meta['min']}, got {value}")
        if "max" in meta and value > meta["max"]:
            raise Llama2MLXError(f"{name} must be at most {meta['max']}, got {value}")
        if "above" in meta and not value > meta["above"]:
            raise Llama2MLXError(f"{name} must be greater than {meta['above']}, got {value}")
        if "choices" in meta and value not in meta["choices"]:
            raise Llama2MLXError(
                f"{name} must be one of {', '.join(map(str, meta['choices']))}, got {value!r}"
            )


def _bounds(cls: type, name: str) -> dict[str, Any]:
    """A field's metadata merged down the class hierarchy: a job config that overrides a shared field's default
    or help (e.g. train-rm's --batch-size) keeps the bounds the base class declared for it."""
    merged: dict[str, Any] = {}
    for klass in reversed(cls.__mro__):
        declared = getattr(klass, "__dataclass_fields__", {}).get(name)
        if declared is not None:
            merged.update(declared.metadata)
    return merged


_KIND_NAMES = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}
