"""What every fine-tuning job shares (SFT, the reward model, rejection sampling, DPO, PPO): its flags and its
trainable part.

`FineTuneConfig` holds the flags common to those jobs (model, LoRA or full, optimiser, schedule, batching,
checkpoints); each job's config subclasses it, adds its own fields and overrides the defaults its recipe changes,
so `llama2-mlx COMMAND --help` and `-c config.yaml` stay the same across commands without copying fields.
`make_trainable` turns a loaded network into the job's trainable model: LoRA (QLoRA on a quantized base) or full.
"""

from __future__ import annotations

from collections.abc import Iterable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import mlx.nn as nn

from llama2_mlx.config_fields import SEED_RANGE, validate_fields
from llama2_mlx.errors import Llama2MLXError
from llama2_mlx.lora import (
    LoRAConfig,
    apply_adapter,
    apply_lora,
    read_adapter_config,
    save_adapters,
    write_adapter_config,
)
from llama2_mlx.trainer import Callback


@dataclass
class FineTuneConfig:
    """Every field is a flag of the fine-tuning commands and a key of their -c config.yaml."""

    data: str = field(metadata={"help": "A .jsonl file, or a folder with train.jsonl (and valid.jsonl)."})
    out: str = field(metadata={"help": "Output folder (adapter or model, metrics.jsonl, checkpoint/)."})
    model: str | None = field(
        default=None, metadata={"help": "Model folder (default: the shipped demo model)."}
    )
    rank: int = field(default=8, metadata={"min": 1, "help": "LoRA rank."})
    alpha: float = field(
        default=16.0, metadata={"above": 0, "help": "LoRA alpha; the update is scaled by alpha / rank."}
    )
    dropout: float = field(
        default=0.0, metadata={"min": 0, "max": 0.999, "help": "Dropout on the LoRA input."}
    )
    targets: str = field(default="q,v", metadata={"help": "LoRA projections, any of q,k,v,o,gate,up,down."})
    layers: str = field(default="all", metadata={"help": "LoRA on the last N layers, or 'all'."})
    full: bool = field(default=False, metadata={"help": "Full fine-tuning instead of LoRA."})
    grad_checkpoint: bool = field(default=False, metadata={"help": "Recompute activations to save memory."})
    grad_accum: int = field(default=1, metadata={"min": 1, "help": "Micro-batches per optimizer step."})
    lr: float = field(
        default=2e-5,
        metadata={"above": 0, "help": "Peak learning rate (paper: 2e-5; LoRA usually wants 1e-4)."},
    )
    warmup: int = field(
        default=0, metadata={"min": 0, "help": "Linear warmup steps before the cosine decay to 10%."}
    )
    weight_decay: float = field(default=0.1, metadata={"min": 0, "help": "AdamW weight decay."})
    clip_norm: float = field(
        default=1.0, metadata={"min": 0, "help": "Clip gradients to this global norm (0: off)."}
    )
    batch_size: int = field(
        default=64, metadata={"min": 1, "help": "Sequences per optimizer step, all processes together."}
    )
    seq_len: int = field(
        default=4096, metadata={"min": 2, "help": "Tokens per sequence; longer examples are truncated."}
    )
    iters: int | None = field(
        default=None, metadata={"min": 1, "help": "Optimizer steps (default: from --epochs)."}
    )
    epochs: float = field(
        default=2.0, metadata={"above": 0, "help": "Passes over the training data when --iters is not set."}
    )
    seed: int = field(
        default=0,
        metadata={**SEED_RANGE, "help": "Seed for LoRA init, shuffling, dropout and the valid split."},
    )
    save_every: int = field(
        default=100, metadata={"min": 0, "help": "Checkpoint every N steps (and at the end)."}
    )
    eval_every: int = field(
        default=200, metadata={"min": 0, "help": "Validation every N steps (and at the end)."}
    )
    val_batches: int = field(
        default=0, metadata={"min": 0, "help": "Validation batches per evaluation (0: all of them)."}
    )
    report_every: int = field(default=10, metadata={"min": 1, "help": "Training loss report every N steps."})
    valid_fraction: float = field(
        default=0.0,
        metadata={"min": 0, "max": 0.99, "help": "Hold out this fraction when there is no valid.jsonl."},
    )
    skip_bad_lines: bool = field(
        default=False, metadata={"help": "Skip (and count) bad data lines instead of failing."}
    )
    resume: bool = field(default=False, metadata={"help": "Continue from the checkpoint in --out."})
    force: bool = field(
        default=False, metadata={"help": "Start over in a non-empty --out (its contents are deleted)."}
    )
    progress: bool = field(default=True, metadata={"help": "Show the progress bar."})

    def __post_init__(self) -> None:
        validate_fields(self)  # types, finite floats, the bounds in each field's metadata
        if self.layers != "all" and not (self.layers.isdigit() and int(self.layers) > 0):
            raise Llama2MLXError(f"layers (--layers) must be a positive number or 'all', got {self.layers!r}")
        if self.batch_size % self.grad_accum:
            raise Llama2MLXError(
                f"batch_size {self.batch_size} is not divisible by grad_accum {self.grad_accum}"
            )

    @property
    def micro_batch(self) -> int:
        """Sequences (or pairs) per forward pass, all processes together."""
        return self.batch_size // self.grad_accum

    def lora(self) -> LoRAConfig | None:
        """The LoRA settings, or None for full fine-tuning."""
        if self.full:
            return None
        layers = None if self.layers == "all" else int(self.layers)
        return LoRAConfig(
            rank=self.rank, alpha=self.alpha, dropout=self.dropout, targets=self.targets, layers=layers
        )


def make_trainable(
    model: nn.Module, config: FineTuneConfig, model_path: object, adapter: str | None = None
) -> LoRAConfig | None:
    """Make `model`'s trainable part what `config` asks for: LoRA layers (returned), or every weight (`--full`).

    With `adapter`, training continues that LoRA adapter folder (its rank, alpha, targets and layers, which take
    the place of the job's LoRA flags). A quantized model can only be trained through LoRA (QLoRA): its packed
    weights have no gradient.
    """
    if adapter is not None:
        if config.full:
            raise Llama2MLXError("--adapter continues a LoRA adapter; it cannot be combined with --full")
        apply_adapter(model, adapter)
        return read_adapter_config(Path(adapter))
    lora = config.lora()
    if lora is None:
        if any(isinstance(m, nn.QuantizedLinear) for _, m in model.named_modules()):
            raise Llama2MLXError(f"{model_path}: full fine-tuning needs a float model; use LoRA (QLoRA) here")
        model.unfreeze()
    else:
        apply_lora(model, lora)
    return lora


# Flags that may change on --resume in every job: they change how long or how verbosely a run goes, or how it
# computes, not what it computes. Jobs add their own (e.g. rejection sampling's number of iterations).
RESUMABLE_FLAGS = frozenset({"iters", "epochs", "save_every", "eval_every", "report_every", "val_batches",
                             "progress", "resume", "force", "grad_checkpoint"})  # fmt: skip


def meaning_fields(config: FineTuneConfig, resumable: Iterable[str] = ()) -> tuple[str, ...]:
    """The flags --resume may not change (every one but the resumable), plus the data's fingerprint."""
    allowed = RESUMABLE_FLAGS | set(resumable)
    return (*(f.name for f in fields(config) if f.name not in allowed), "data_fingerprint")


def claim_job_folder(
    config: FineTuneConfig, job: str, model_path: Path, meaning: Iterable[str], is_main: bool = True
) -> AbstractContextManager:
    """`run_folder.claim_run_folder` for a fine-tuning job (rank 0 only; other ranks get a null context): records
    the flags with the model and data as absolute paths and the data's fingerprint in `<job>_config.json`.

    Call it after every other check has passed; inside the `with`, the folder is the job's to write."""
    from llama2_mlx.run_folder import claim_run_folder, fingerprint

    if not is_main:
        return nullcontext()
    recorded = {**asdict(config), "model": str(model_path.resolve()), "data": str(Path(config.data).resolve()),
                "data_fingerprint": fingerprint(config.data)}  # fmt: skip
    return claim_run_folder(
        config.out, job, recorded, config.resume, config.force, meaning, inputs=[model_path, config.data]
    )


class AdapterWriter(Callback):
    """Keeps a LoRA job's --out an adapter folder: adapter_config.json once the folder is claimed, the trained A/B
    matrices at every checkpoint (what `load(..., adapter=)`, `chat --adapter` and `fuse` read)."""

    def __init__(self, model: nn.Module, out: Path, lora: LoRAConfig, base_model: Path):
        self.model, self.out, self.lora, self.base_model = model, Path(out), lora, base_model

    def on_start(self, step: int) -> None:
        write_adapter_config(self.out, self.lora, len(self.model.layers), str(self.base_model))

    def on_checkpoint(self, step: int, folder: Path) -> None:
        save_adapters(self.model, self.out)
