"""LoRA (and QLoRA) by module swap: `LoRALinear` wraps a Linear or QuantizedLinear and adds a low-rank update.

`apply_lora` freezes the model and swaps the chosen projections of the chosen layers; `fuse` swaps them back for
plain layers holding W + scale * (A B)^T. An adapter folder (DESIGN.md "Formats") stores only the A/B matrices plus
adapter_config.json, whose keys are also the ones mlx-lm reads, so `mlx_lm.load(model, adapter_path=...)` works too.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

from llama2_mlx.checkpoints.safetensors_file import load_safetensors
from llama2_mlx.errors import Llama2MLXError
from llama2_mlx.fileio import read_json, save_safetensors_atomic, write_text_atomic

# Short names used on the command line -> the module path inside a TransformerBlock.
TARGET_MODULES = {
    "q": "self_attn.q_proj",
    "k": "self_attn.k_proj",
    "v": "self_attn.v_proj",
    "o": "self_attn.o_proj",
    "gate": "mlp.gate_proj",
    "up": "mlp.up_proj",
    "down": "mlp.down_proj",
}
ADAPTER_WEIGHTS = "adapters.safetensors"
ADAPTER_CONFIG = "adapter_config.json"


@dataclass
class LoRAConfig:
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: list[str] = field(default_factory=lambda: ["q", "v"])
    layers: int | None = None  # the last N transformer blocks; None = all of them

    def __post_init__(self) -> None:
        if isinstance(self.targets, str):
            self.targets = [t.strip() for t in self.targets.split(",") if t.strip()]
        if not isinstance(self.targets, list) or not all(isinstance(t, str) for t in self.targets):
            raise Llama2MLXError(f"LoRA targets must be a list of names, got {self.targets!r:.60}")
        for name in ("alpha", "dropout"):
            value = getattr(self, name)
            if not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value):
                raise Llama2MLXError(f"LoRA {name} must be a finite number, got {value!r:.60}")
        unknown = [t for t in self.targets if t not in TARGET_MODULES]
        if unknown or not self.targets:
            raise Llama2MLXError(
                f"LoRA targets {','.join(self.targets) or '(none)'}: choose from {','.join(TARGET_MODULES)}"
            )
        if not isinstance(self.rank, int) or isinstance(self.rank, bool) or self.rank <= 0:
            raise Llama2MLXError(f"LoRA rank must be a positive integer, got {self.rank!r}")
        if not 0 <= self.dropout < 1:
            raise Llama2MLXError(f"LoRA dropout must be in [0, 1), got {self.dropout}")
        if self.layers is not None and (not isinstance(self.layers, int) or self.layers <= 0):
            raise Llama2MLXError(f"LoRA layers must be a positive count (or all), got {self.layers}")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


class LoRALinear(nn.Module):
    """y = base(x) + scale * dropout(x) A B, with A [in, rank] random and B [rank, out] zero (so step 0 = base)."""

    def __init__(self, base: nn.Module, rank: int, scale: float, dropout: float = 0.0):
        super().__init__()
        out_dims, in_dims = _linear_shape(base)
        self.linear = base
        self.scale = scale
        self.dropout = nn.Dropout(p=dropout)
        bound = 1 / math.sqrt(in_dims)  # PEFT's kaiming-uniform(a=sqrt(5)) bound for A
        self.lora_a = mx.random.uniform(low=-bound, high=bound, shape=(in_dims, rank))
        self.lora_b = mx.zeros((rank, out_dims))
        self.enabled = True  # False inside `adapters_disabled`: the layer is its base alone

    @classmethod
    def from_linear(cls, base: nn.Module, rank: int, alpha: float, dropout: float = 0.0) -> LoRALinear:
        return cls(base, rank, alpha / rank, dropout)

    def __call__(self, x: mx.array) -> mx.array:
        if not self.enabled:
            return self.linear(x)
        update = (self.dropout(x) @ self.lora_a) @ self.lora_b
        return self.linear(x) + (self.scale * update).astype(x.dtype)

    def fuse(self, dequantize: bool = False) -> nn.Module:
        """A plain layer computing the same function; a quantized base is re-quantized unless `dequantize`."""
        base = self.linear
        weight = _dense_weight(base)
        delta = (self.scale * (self.lora_a @ self.lora_b)).T.astype(weight.dtype)
        fused = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
        fused.weight = weight + delta
        if isinstance(base, nn.QuantizedLinear) and not dequantize:
            return nn.QuantizedLinear.from_linear(fused, base.group_size, base.bits)
        return fused


def apply_lora(model: nn.Module, config: LoRAConfig) -> nn.Module:
    """Freeze `model` and swap the target projections of its last `config.layers` blocks for LoRALinear."""
    blocks = model.layers
    if config.layers is not None and config.layers > len(blocks):
        raise Llama2MLXError(f"LoRA layers {config.layers}: the model has only {len(blocks)} layers")
    start = len(blocks) - (config.layers or len(blocks))
    model.freeze()
    for index in range(start, len(blocks)):
        for target in config.targets:
            path = TARGET_MODULES[target]
            base = _get(blocks[index], path)
            if isinstance(base, LoRALinear):
                raise Llama2MLXError(f"layer {index} {path} already has a LoRA adapter")
            parent, _, name = path.rpartition(".")
            setattr(
                _get(blocks[index], parent),
                name,
                LoRALinear.from_linear(base, config.rank, config.alpha, config.dropout),
            )
    return model


@contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """`model` with every LoRA layer switched off: the base model, as PPO's reference policy, with no second copy
    of the weights (also inside a compiled function, which traces both settings)."""
    layers = [module for _, module in model.named_modules() if isinstance(module, LoRALinear)]
    for layer in layers:
        layer.enabled = False
    try:
        yield model
    finally:
        for layer in layers:
            layer.enabled = True


def lora_parameters(model: nn.Module) -> dict[str, mx.array]:
    """The A/B matrices by their full names (what adapters.safetensors holds)."""
    return {k: v for k, v in tree_flatten(model.parameters()) if k.endswith((".lora_a", ".lora_b"))}


def write_adapter_config(folder: Path, config: LoRAConfig, n_layers: int, base_model: str | None) -> None:
    """adapter_config.json with our keys and mlx-lm's (fine_tune_type, num_layers, lora_parameters)."""
    data = {
        **asdict(config),
        "scale": config.scale,
        "base_model": base_model,
        "fine_tune_type": "lora",
        "num_layers": config.layers or n_layers,
        "lora_parameters": {
            "rank": config.rank,
            "scale": config.scale,
            "dropout": config.dropout,
            "keys": [TARGET_MODULES[t] for t in config.targets],
        },
    }
    write_text_atomic(folder / ADAPTER_CONFIG, json.dumps(data, indent=2) + "\n")


def read_adapter_config(folder: Path) -> LoRAConfig:
    path = folder / ADAPTER_CONFIG
    data = read_json(path, "an adapter folder")
    if not isinstance(data, dict):
        raise Llama2MLXError(f"{path}: expected a JSON object")
    if data.get("fine_tune_type", "lora") != "lora":
        raise Llama2MLXError(f"{path}: fine_tune_type {data['fine_tune_type']!r} is not a LoRA adapter")
    try:
        return LoRAConfig(
            **{k: data[k] for k in ("rank", "alpha", "dropout", "targets", "layers") if k in data}
        )
    except (TypeError, Llama2MLXError) as error:
        raise Llama2MLXError(f"{path}: {error}") from None


def save_adapters(model: nn.Module, folder: Path) -> None:
    """Write adapters.safetensors atomically (temporary name, then rename)."""
    folder.mkdir(parents=True, exist_ok=True)
    save_safetensors_atomic(folder / ADAPTER_WEIGHTS, lora_parameters(model))


def apply_adapter(model: nn.Module, adapter_dir: str | os.PathLike) -> nn.Module:
    """Add the LoRA layers described by an adapter folder and load its trained A/B matrices (dropout off)."""
    folder = Path(adapter_dir)
    if not folder.is_dir():
        raise Llama2MLXError(f"{folder}: no such adapter folder")
    apply_lora(model, read_adapter_config(folder))
    path = folder / ADAPTER_WEIGHTS
    if not path.is_file():
        raise Llama2MLXError(f"{path}: missing; the adapter folder holds no trained weights yet")
    weights = load_safetensors(path, ("float32", "float16", "bfloat16"))
    expected = lora_parameters(model)
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    if missing or unexpected:
        name = (missing or unexpected)[0]
        raise Llama2MLXError(
            f"{path}: {'missing' if missing else 'unexpected'} tensor {name}; does the config match?"
        )
    for name, array in weights.items():
        if array.shape != expected[name].shape:
            raise Llama2MLXError(
                f"{path}: tensor {name} has shape {array.shape}, expected {expected[name].shape}"
            )
    model.load_weights(list(weights.items()), strict=False)
    mx.eval(model.parameters())
    model.eval()
    return model


def fuse(model: nn.Module, dequantize: bool = False) -> nn.Module:
    """Replace every LoRALinear by its fused layer; with `dequantize`, also turn every quantized layer to float."""
    swaps = [
        (name, module.fuse(dequantize))
        for name, module in model.named_modules()
        if isinstance(module, LoRALinear)
    ]
    if swaps:
        model.update_modules(tree_unflatten(swaps))
    if dequantize:
        dense = [(name, _dequantized(module)) for name, module in model.named_modules()
                 if isinstance(module, nn.QuantizedLinear | nn.QuantizedEmbedding)]  # fmt: skip
        if dense:
            model.update_modules(tree_unflatten(dense))
    model.unfreeze()
    return model


def fuse_adapter(
    model_path: str | os.PathLike,
    adapter_dir: str | os.PathLike,
    out: str | os.PathLike,
    dequantize: bool = False,
    force: bool = False,
    progress: Callable[[str, int, int], None] | None = None,
) -> Path:
    """base model folder + adapter folder -> a new model folder with the adapter merged into the weights
    (computed as it is written: `progress(tensor, bytes written, total bytes)`)."""
    from llama2_mlx.destination import atomic_folder
    from llama2_mlx.model_folder import load_model, write_model_folder

    with atomic_folder(out, force=force, inputs=[model_path, adapter_dir]) as tmp:  # claimed before the work
        model = load_model(model_path)
        apply_adapter(model, adapter_dir)
        fuse(model, dequantize=dequantize)
        write_model_folder(model, tmp, tokenizer_dir=model_path, progress=progress)
    return Path(out)


def _get(module: nn.Module, path: str) -> nn.Module:
    for part in path.split("."):
        module = getattr(module, part)
    return module


def _linear_shape(base: nn.Module) -> tuple[int, int]:
    """(out, in) of a Linear or QuantizedLinear (whose packed weight has in * bits / 32 columns)."""
    if isinstance(base, nn.QuantizedLinear):
        return base.weight.shape[0], base.weight.shape[1] * 32 // base.bits
    if isinstance(base, nn.Linear):
        return tuple(base.weight.shape)
    raise Llama2MLXError(f"LoRA applies to Linear layers, not {type(base).__name__}")


def _dense_weight(base: nn.Module) -> mx.array:
    if isinstance(base, nn.QuantizedLinear):
        return mx.dequantize(
            base.weight, base.scales, base.get("biases"), group_size=base.group_size, bits=base.bits
        )
    return base.weight


def _dequantized(module: nn.Module) -> nn.Module:
    weight = mx.dequantize(
        module.weight, module.scales, module.get("biases"), group_size=module.group_size, bits=module.bits
    )
    if isinstance(module, nn.QuantizedEmbedding):
        dense = nn.Embedding(*weight.shape)
    else:
        dense = nn.Linear(weight.shape[1], weight.shape[0], bias="bias" in module)
        if "bias" in module:
            dense.bias = module.bias
    dense.weight = weight
    return dense
