"""`ModelArgs`: the shape of a Llama 2 network, read from Meta's params.json, a Hugging Face config.json or a preset.

Field names follow Meta's `ModelArgs` (dim, n_layers, ...); `to_hf_config` writes the Hugging Face keys that model
folders (and mlx-lm) use. Every problem with a config is a `Llama2MLXError` naming the field.
"""

from __future__ import annotations

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
        if not self.norm_eps > 0:
            raise Llama2MLXError(f"config field 'norm_eps' must be positive, got {self.norm_eps!r}")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @classmethod
    def from_meta_params(
        cls, params: dict[str, Any], vocab_size: int | None = None, source: str = "params.json"
    ) -> ModelArgs:
        """Meta's params.json. `vocab_size: -1` there is resolved from `vocab_size` (embedding rows or tokenizer)."""
        _require(params, ("dim", "n_layers", "n_heads", "norm_eps"), source)
        file_vocab = params.get("vocab_size", -1)
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
        dim = params["dim"]
        return cls(
            dim=dim,
            n_layers=params["n_layers"],
            n_heads=params["n_heads"],
            n_kv_heads=params.get("n_kv_heads") or params["n_heads"],
            vocab_size=file_vocab,
            hidden_dim=ffn_hidden_dim(dim, params.get("multiple_of", 256), params.get("ffn_dim_multiplier")),
            norm_eps=float(params["norm_eps"]),
            rope_theta=float(params.get("rope_theta", 10000.0)),
            max_seq_len=params.get("max_seq_len", 4096),
        )

    @classmethod
    def from_hf_config(cls, config: dict[str, Any], source: str = "config.json") -> ModelArgs:
        """A Hugging Face LlamaConfig dict (the format of our model folders' config.json)."""
        if config.get("model_type", "llama") != "llama":
            raise Llama2MLXError(f"{source}: model_type is {config['model_type']!r}, expected 'llama'")
        _require(
            config,
            ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size"),
            source,
        )
        if config.get("rope_scaling"):
            raise Llama2MLXError(f"{source}: rope_scaling {config['rope_scaling']!r} is not part of Llama 2")
        head_dim = config.get("head_dim")
        if head_dim is not None and head_dim * config["num_attention_heads"] != config["hidden_size"]:
            raise Llama2MLXError(f"{source}: head_dim {head_dim} x num_attention_heads != hidden_size")
        rope_theta = config.get("rope_theta") or (config.get("rope_parameters") or {}).get(
            "rope_theta", 10000.0
        )
        return cls(
            dim=config["hidden_size"],
            n_layers=config["num_hidden_layers"],
            n_heads=config["num_attention_heads"],
            n_kv_heads=config.get("num_key_value_heads") or config["num_attention_heads"],
            vocab_size=config["vocab_size"],
            hidden_dim=config["intermediate_size"],
            norm_eps=float(config.get("rms_norm_eps", 1e-5)),
            rope_theta=float(rope_theta),
            max_seq_len=config.get("max_position_embeddings", 4096),
            tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
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


def _require(config: dict[str, Any], keys: tuple[str, ...], source: str) -> None:
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
