"""Supervised fine-tuning (LoRA, QLoRA or full) with the Llama 2 SFT recipe: `SFTConfig` and `run_sft`.

SFT is a configuration of the shared loop: the masked next-token loss, the SFT batcher, the paper's optimiser.
Outputs in `out`: adapter_config.json + adapters.safetensors (LoRA; an adapter folder for `load(..., adapter=)`
and `fuse`) or a full model folder (`full`), plus metrics.jsonl, sft_config.json and checkpoint/ for `resume`.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path

from llama2_mlx.errors import Llama2MLXError


@dataclass
class SFTConfig:
    """Every field is a flag of `llama2-mlx sft` and a key of its -c config.yaml (defaults: the paper's SFT)."""

    data: str = field(metadata={"help": "A .jsonl file, or a folder with train.jsonl (and valid.jsonl)."})
    out: str = field(metadata={"help": "Output folder (adapter or model, metrics.jsonl, checkpoint/)."})
    model: str | None = field(
        default=None, metadata={"help": "Model folder (default: the shipped demo model)."}
    )
    rank: int = field(default=8, metadata={"help": "LoRA rank."})
    alpha: float = field(default=16.0, metadata={"help": "LoRA alpha; the update is scaled by alpha / rank."})
    dropout: float = field(default=0.0, metadata={"help": "Dropout on the LoRA input."})
    targets: str = field(default="q,v", metadata={"help": "LoRA projections, any of q,k,v,o,gate,up,down."})
    layers: str = field(default="all", metadata={"help": "LoRA on the last N layers, or 'all'."})
    full: bool = field(default=False, metadata={"help": "Full fine-tuning instead of LoRA."})
    grad_checkpoint: bool = field(default=False, metadata={"help": "Recompute activations to save memory."})
    grad_accum: int = field(default=1, metadata={"help": "Micro-batches per optimizer step."})
    loss_chunk: int = field(
        default=0,
        metadata={
            "help": "Positions per chunk of vocabulary logits in the loss (0: automatic, 128 at vocab 32000)."
        },
    )
    lr: float = field(
        default=2e-5, metadata={"help": "Peak learning rate (paper: 2e-5; LoRA usually wants 1e-4)."}
    )
    warmup: int = field(default=0, metadata={"help": "Linear warmup steps before the cosine decay to 10%."})
    weight_decay: float = field(default=0.1, metadata={"help": "AdamW weight decay."})
    clip_norm: float = field(default=1.0, metadata={"help": "Clip gradients to this global norm (0: off)."})
    batch_size: int = field(
        default=64, metadata={"help": "Sequences per optimizer step, all processes together."}
    )
    seq_len: int = field(
        default=4096, metadata={"help": "Tokens per sequence; longer examples are truncated."}
    )
    iters: int | None = field(default=None, metadata={"help": "Optimizer steps (default: from --epochs)."})
    epochs: float = field(
        default=2.0, metadata={"help": "Passes over the training data when --iters is not set."}
    )
    seed: int = field(
        default=0, metadata={"help": "Seed for LoRA init, shuffling, dropout and the valid split."}
    )
    save_every: int = field(default=100, metadata={"help": "Checkpoint every N steps (and at the end)."})
    eval_every: int = field(default=200, metadata={"help": "Validation loss every N steps (and at the end)."})
    val_batches: int = field(
        default=0, metadata={"help": "Validation batches per evaluation (0: all of them)."}
    )
    report_every: int = field(default=10, metadata={"help": "Training loss report every N steps."})
    valid_fraction: float = field(
        default=0.0, metadata={"help": "Hold out this fraction when there is no valid.jsonl."}
    )
    skip_bad_lines: bool = field(
        default=False, metadata={"help": "Skip (and count) bad data lines instead of failing."}
    )
    train_on_prompt: bool = field(
        default=False, metadata={"help": "Train on prompt tokens too, not only answers."}
    )
    pack: bool = field(
        default=False, metadata={"help": "Pack whole examples back to back into --seq-len rows."}
    )
    pack_mask: str = field(
        default="document",
        metadata={"help": "With --pack: 'document' (no attention across examples) or 'none' (plain concatenation).",
                  "choices": ["document", "none"]},
    )  # fmt: skip
    gatt: bool = field(
        default=False, metadata={"help": "Ghost Attention: train only the last answer of each dialog."}
    )
    resume: bool = field(default=False, metadata={"help": "Continue from the checkpoint in --out."})
    progress: bool = field(default=True, metadata={"help": "Show the progress bar."})

    def __post_init__(self) -> None:
        if self.pack_mask not in ("document", "none"):
            raise Llama2MLXError(f"pack_mask must be 'document' or 'none', got {self.pack_mask!r}")
        if self.layers != "all" and not str(self.layers).isdigit():
            raise Llama2MLXError(f"layers must be a number or 'all', got {self.layers!r}")
        if self.loss_chunk < 0:
            raise Llama2MLXError(f"loss_chunk must be 0 (automatic) or positive, got {self.loss_chunk}")
        for name in ("batch_size", "seq_len", "grad_accum"):
            if getattr(self, name) <= 0:
                raise Llama2MLXError(f"{name} must be positive, got {getattr(self, name)}")
        if self.seq_len < 2:
            raise Llama2MLXError("seq_len must be at least 2")


def run_sft(config: SFTConfig, announce: Callable[[str], None] | None = None):
    """Fine-tune `config.model` on `config.data`; returns (TrainResult, DataReport).

    `announce` receives one line describing the data and the run before training starts (the CLI prints it).
    """
    import mlx.core as mx
    import mlx.nn as nn

    from llama2_mlx.data import Batcher, EncodeOptions, load_sft_data
    from llama2_mlx.fileio import write_model_files, write_text_atomic
    from llama2_mlx.loading import demo_model_path, load
    from llama2_mlx.lora import LoRAConfig, apply_lora, save_adapters, write_adapter_config
    from llama2_mlx.losses import next_token_loss
    from llama2_mlx.optim import OptimizerConfig, make_optimizer
    from llama2_mlx.trainer import Callback, TrainConfig, train

    world = mx.distributed.init()
    mx.random.seed(config.seed)
    model_path = Path(config.model) if config.model else demo_model_path()
    out = Path(config.out)
    model, tokenizer = load(model_path)

    options = EncodeOptions(train_on_prompt=config.train_on_prompt, gatt=config.gatt)
    train_examples, valid_examples, report = load_sft_data(
        config.data, tokenizer, options, config.valid_fraction, config.seed, config.skip_bad_lines
    )
    batching = dict(seq_len=config.seq_len, packing=config.pack, document_mask=config.pack_mask == "document",
                    seed=config.seed, rank=world.rank(), world_size=world.size(), report=report)  # fmt: skip
    if config.batch_size % config.grad_accum:
        raise Llama2MLXError(
            f"batch_size {config.batch_size} is not divisible by grad_accum {config.grad_accum}"
        )
    micro_batch = config.batch_size // config.grad_accum
    batches = Batcher(train_examples, micro_batch, **batching)
    val_batches = None
    if valid_examples:
        val_batches = partial(Batcher(valid_examples, micro_batch, **batching).once, config.val_batches)

    lora = None
    if config.full:
        if any(isinstance(m, nn.QuantizedLinear) for _, m in model.named_modules()):
            raise Llama2MLXError(f"{model_path}: full fine-tuning needs a float model; use LoRA (QLoRA) here")
        model.unfreeze()
    else:
        layers = None if config.layers == "all" else int(config.layers)
        lora = LoRAConfig(
            rank=config.rank,
            alpha=config.alpha,
            dropout=config.dropout,
            targets=config.targets,
            layers=layers,
        )
        apply_lora(model, lora)

    class SaveAdapters(Callback):
        def on_checkpoint(self, step: int, folder: Path) -> None:
            save_adapters(model, out)

    if world.rank() == 0:
        out.mkdir(parents=True, exist_ok=True)
        write_text_atomic(out / "sft_config.json", json.dumps(asdict(config), indent=2) + "\n")
        if lora is not None:
            write_adapter_config(out, lora, len(model.layers), str(model_path))

    train_config = TrainConfig.from_job(config, len(batches))
    if announce is not None and world.rank() == 0:
        announce(
            f"data: {report.summary()}; {len(train_examples)} for training, {len(valid_examples)} for validation;"
            f" {len(batches)} batches per epoch, {train_config.iters} steps"
        )
    optimizer = make_optimizer(OptimizerConfig.from_job(config), train_config.iters)
    callbacks = [SaveAdapters()] if lora is not None else []
    result = train(
        model,
        optimizer,
        partial(next_token_loss, chunk=config.loss_chunk or None),
        batches,
        train_config,
        val_batches,
        callbacks,
    )
    if config.full and world.rank() == 0:
        write_model_files(model, out, tokenizer_dir=model_path)
    return result, report
