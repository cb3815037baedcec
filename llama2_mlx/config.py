"""`ModelArgs`: the shape of a Llama 2 network, read from Meta's params.json, a Hugging Face config.json or a preset.

Field names follow Meta's `ModelArgs` (dim, n_layers, ...); `to_hf_config` writes the Hugging Face keys that model
folders (and mlx-lm) use. Every problem with a config is a `Llama2MLXError` naming the field.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from llama2_mlx.errors import Llama2MLXError


def ffn_hidden_dim(dim: int, multiple_of: int, ffn_dim_multiplier: float | None = None) -> int:
    """The SwiGLU hidden size exactly as Meta's `FeedForward` computes it (11008 for 7B, 28672 for 70B)."""
    hidden = int(2 * (4 * dim) / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


@dataclass(frozen=True)
class ModelArgs:
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    vocab_size: int
    hidden_dim: int
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    # Meta's weights rotate adjacent pairs (2i, 2i+1); Hugging Face weights (and our folders) are permuted for
    # rotate-half. The converters permute Meta weights, so models built from folders use False.
    rope_traditional: bool = False
    max_seq_len: int = 4096
    tie_word_embeddings: bool = False

    def __post_init__(self) -> None:
        for name in ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "hidden_dim", "max_seq_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise Llama2MLXError(f"config field '{name}' must be a positive integer, got {value!r}")
        if self.dim % self.n_heads:
            raise Llama2MLXError(f"config: dim {self.dim} is not divisible by n_heads {self.n_heads}")
        if self.n_heads % self.n_kv_heads:
            raise Llama2MLXError(
                f"config: n_heads {self.n_heads} is not divisible by n_kv_heads {self.n_kv_heads}"
            )
        if self.head_dim % 2:
            raise Llama2MLXError(f"config: head_dim {self.head_dim} (dim / n_heads) must be even for RoPE")
        for name in ("norm_eps", "rope_theta"):
            value = getattr(self, name)
            if not (isinstance(value, float) and math.isfinite(value) and value > 0):
                raise Llama2MLXError(f"config field '{name}' must be a positive number, got {value!r}")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @classmethod
    def from_meta_params(
        cls, params: dict[str, Any], vocab_size: int | None = None, source: str = "params.json"
    ) -> ModelArgs:
        """Meta's params.json. `vocab_size: -1` there is resolved from `vocab_size` (embedding rows or tokenizer)."""
        _require(params, ("dim", "n_layers", "n_heads", "norm_eps"), source)
        get = _Reader(params, source)
        file_vocab = get.int("vocab_size", -1, allow_negative=True)
        if file_vocab is None or file_vocab <= 0:
            if vocab_size is None:
                raise Llama2MLXError(
                    f"{source}: vocab_size is {file_vocab!r}; it must come from the weights or tokenizer"
                )
            file_vocab = vocab_size
        elif vocab_size is not None and vocab_size != file_vocab:
            raise Llama2MLXError(
                f"{source}: vocab_size {file_vocab} disagrees with the weights/tokenizer ({vocab_size})"
            )
        dim = get.int("dim")
        return _build(
            cls,
            source,
            {},
            dim=dim,
            n_layers=get.int("n_layers"),
            n_heads=get.int("n_heads"),
            n_kv_heads=get.int("n_kv_heads") or get.int("n_heads"),
            vocab_size=file_vocab,
            hidden_dim=ffn_hidden_dim(
                dim, get.int("multiple_of", 256, positive=True), get.float("ffn_dim_multiplier")
            ),
            norm_eps=get.float("norm_eps"),
            rope_theta=get.float("rope_theta", 10000.0),
            max_seq_len=get.int("max_seq_len", 4096),
        )

    @classmethod
    def from_hf_config(cls, config: dict[str, Any], source: str = "config.json") -> ModelArgs:
        """A Hugging Face LlamaConfig dict (the format of our model folders' config.json)."""
        _require(
            config,
            ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size"),
            source,
        )
        if config.get("model_type", "llama") != "llama":
            raise Llama2MLXError(f"{source}: model_type is {config['model_type']!r}, expected 'llama'")
        if config.get("rope_scaling"):
            raise Llama2MLXError(f"{source}: rope_scaling {config['rope_scaling']!r} is not part of Llama 2")
        get = _Reader(config, source)
        heads, hidden = get.int("num_attention_heads"), get.int("hidden_size")
        head_dim = get.int("head_dim")
        if None not in (head_dim, heads, hidden) and head_dim * heads != hidden:  # a null is named below
            raise Llama2MLXError(f"{source}: head_dim {head_dim} x num_attention_heads != hidden_size")
        rope_parameters = config.get("rope_parameters") or {}
        if not isinstance(rope_parameters, dict):
            raise Llama2MLXError(
                f"{source}: 'rope_parameters' must be an object, got {rope_parameters!r:.60}"
            )
        rope_theta = get.float("rope_theta")
        if rope_theta is None:
            rope_theta = _Reader(rope_parameters, f"{source} rope_parameters").float("rope_theta", 10000.0)
        return _build(
            cls,
            source,
            HF_KEYS,
            dim=hidden,
            n_layers=get.int("num_hidden_layers"),
            n_heads=heads,
            n_kv_heads=get.int("num_key_value_heads") or heads,
            vocab_size=get.int("vocab_size"),
            hidden_dim=get.int("intermediate_size"),
            norm_eps=get.float("rms_norm_eps", 1e-5),
            rope_theta=rope_theta,
            max_seq_len=get.int("max_position_embeddings", 4096),
            tie_word_embeddings=get.bool("tie_word_embeddings", False),
        )

    def to_hf_config(self) -> dict[str, Any]:
        """The config.json of a model folder: Hugging Face LlamaConfig keys, readable by mlx-lm and transformers."""
        return {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_size": self.dim,
            "num_hidden_layers": self.n_layers,
            "num_attention_heads": self.n_heads,
            "num_key_value_heads": self.n_kv_heads,
            "intermediate_size": self.hidden_dim,
            "rms_norm_eps": self.norm_eps,
            "rope_theta": self.rope_theta,
            "vocab_size": self.vocab_size,
            "max_position_embeddings": self.max_seq_len,
            "tie_word_embeddings": self.tie_word_embeddings,
            "hidden_act": "silu",
            "attention_bias": False,
            "mlp_bias": False,
            "bos_token_id": 1,
            "eos_token_id": 2,
        }

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ModelArgs field -> the config.json key it comes from, so errors name what the user sees in the file
HF_KEYS = {"dim": "hidden_size", "n_layers": "num_hidden_layers", "n_heads": "num_attention_heads",
           "n_kv_heads": "num_key_value_heads", "hidden_dim": "intermediate_size", "norm_eps": "rms_norm_eps",
           "max_seq_len": "max_position_embeddings"}  # fmt: skip


def _build(cls, source: str, keys: dict[str, str], **fields: Any) -> ModelArgs:
    """`cls(**fields)`, its errors restated with the file's name and its own key names."""
    try:
        return cls(**fields)
    except Llama2MLXError as error:
        message = re.sub(r"^config( field)?:? ?", "", str(error))
        message = re.sub(r"\b(\w+)\b", lambda m: keys.get(m.group(1), m.group(1)), message)
        raise Llama2MLXError(f"{source}: {message}") from None


class _Reader:
    """Typed reads of a config file's keys; a wrong type is one error naming the key as written in the file."""

    MAX_INT = 2**31  # no Llama dimension comes near; larger values are corrupt files, not models

    def __init__(self, config: dict[str, Any], source: str):
        self.config, self.source = config, source

    def int(self, key: str, default: Any = None, allow_negative: bool = False, positive: bool = False) -> Any:
        value = self.config.get(key, default)
        if value is None:
            return default
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if not isinstance(value, int) or isinstance(value, bool) or not (allow_negative or value >= positive):
            kind = "a positive" if positive else "a non-negative"
            raise Llama2MLXError(f"{self.source}: '{key}' must be {kind} integer, got {value!r:.60}")
        if value > self.MAX_INT:
            raise Llama2MLXError(f"{self.source}: '{key}' is {value}, absurdly large")
        return value

    def float(self, key: str, default: Any = None) -> Any:
        value = self.config.get(key, default)
        if value is None:
            return default
        if not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value):
            raise Llama2MLXError(f"{self.source}: '{key}' must be a number, got {value!r:.60}")
        return float(value)

    def bool(self, key: str, default: bool) -> bool:
        value = self.config.get(key, default)
        if value is None:
            return default
        if not isinstance(value, bool):
            raise Llama2MLXError(f"{self.source}: '{key}' must be true or false, got {value!r:.60}")
        return value


def _require(config: dict[str, Any], keys: tuple[str, ...], source: str) -> None:
    if not isinstance(config, dict):
        raise Llama2MLXError(f"{source}: expected a JSON object, got {type(config).__name__}")
    missing = [key for key in keys if key not in config]
    if missing:
        raise Llama2MLXError(f"{source}: missing required field(s) {', '.join(missing)}")


# Size presets as zero-argument functions (the torchtune habit): the published Llama 2 shapes plus tiny test sizes.
def llama_2_7b() -> ModelArgs:
    return ModelArgs.from_meta_params(
        {"dim": 4096, "n_layers": 32, "n_heads": 32, "multiple_of": 256, "norm_eps": 1e-5}, 32000
    )


def llama_2_13b() -> ModelArgs:
    return ModelArgs.from_meta_params(
        {"dim": 5120, "n_layers": 40, "n_heads": 40, "multiple_of": 256, "norm_eps": 1e-5}, 32000
    )


def llama_2_70b() -> ModelArgs:
    params = {"dim": 8192, "n_layers": 80, "n_heads": 64, "n_kv_heads": 8, "multiple_of": 4096,
              "ffn_dim_multiplier": 1.3, "norm_eps": 1e-5}  # fmt: skip
    return ModelArgs.from_meta_params(params, 32000)


def tiny() -> ModelArgs:
    """Multi-head attention, small enough for unit tests."""
    return ModelArgs(
        dim=64, n_layers=2, n_heads=4, n_kv_heads=4, vocab_size=512, hidden_dim=176, max_seq_len=256
    )


def tiny_gqa() -> ModelArgs:
    """Grouped-query attention (8 query heads sharing 2 KV heads), small enough for unit tests."""
    return ModelArgs(
        dim=64, n_layers=2, n_heads=8, n_kv_heads=2, vocab_size=512, hidden_dim=176, max_seq_len=256
    )


PRESETS: dict[str, Callable[[], ModelArgs]] = {
    "llama-2-7b": llama_2_7b,
    "llama-2-13b": llama_2_13b,
    "llama-2-70b": llama_2_70b,
    "tiny": tiny,
    "tiny-gqa": tiny_gqa,
}


def preset(name: str) -> ModelArgs:
    """A named size preset; the error lists the known names."""
    if name not in PRESETS:
        raise Llama2MLXError(f"unknown model preset {name!r}; known presets: {', '.join(PRESETS)}")
    return PRESETS[name]()
