"""Supervised fine-tuning (LoRA, QLoRA or full) with the Llama 2 SFT recipe: `SFTConfig` and `run_sft`.

SFT is a configuration of the shared loop: the masked next-token loss, the SFT batcher, the paper's optimiser.
Outputs in `out`: adapter_config.json + adapters.safetensors (LoRA; an adapter folder for `load(..., adapter=)`
and `fuse`) or a full model folder (`full`), plus metrics.jsonl, sft_config.json and checkpoint/ for `resume`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from llama2_mlx.finetune import FineTuneConfig


@dataclass
class SFTConfig(FineTuneConfig):
    """Every field is a flag of `llama2-mlx sft` and a key of its -c config.yaml (defaults: the paper's SFT)."""

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
    adapter: str | None = field(
        default=None,
        metadata={
            "help": "Continue training this LoRA adapter folder (its rank, alpha, targets and layers)."
        },
    )
    loss_chunk: int = field(
        default=0,
        metadata={
            "min": 0,
            "help": "Positions per chunk of vocabulary logits in the loss (0: automatic, 128 at vocab 32000).",
        },
    )


# Fields whose change makes a checkpoint mean something else: --resume refuses them (run_folder.claim_run_folder).
SFT_MEANING_FIELDS = ("model", "data", "data_fingerprint", "rank", "alpha", "dropout", "targets", "layers", "full",
                      "lr", "warmup", "weight_decay", "clip_norm", "batch_size", "grad_accum", "seq_len", "seed",
                      "valid_fraction", "skip_bad_lines", "train_on_prompt", "pack", "pack_mask", "gatt",
                      "adapter")  # fmt: skip


def run_sft(config: SFTConfig, announce: Callable[[str], None] | None = None):
    """Fine-tune `config.model` on `config.data`; returns (TrainResult, DataReport).

    `announce` receives one line describing the data and the run before training starts (the CLI prints it).
    """
    import mlx.core as mx

    from llama2_mlx.data import Batcher, EncodeOptions, load_sft_data
    from llama2_mlx.fileio import write_model_files
    from llama2_mlx.finetune import AdapterWriter, claim_job_folder, make_trainable
    from llama2_mlx.loading import demo_model_path, load
    from llama2_mlx.losses import next_token_loss
    from llama2_mlx.optim import OptimizerConfig, make_optimizer
    from llama2_mlx.run_folder import continues_checkpoint
    from llama2_mlx.trainer import TrainConfig, train

    world = mx.distributed.init()
    mx.random.seed(config.seed)
    model_path = Path(config.model) if config.model else demo_model_path()
    out = Path(config.out)
    model, tokenizer = load(model_path)
    seq_len = min(config.seq_len, model.args.max_seq_len)  # past its context a model was never trained
    options = EncodeOptions(train_on_prompt=config.train_on_prompt, gatt=config.gatt)
    train_examples, valid_examples, report = load_sft_data(
        config.data, tokenizer, options, config.valid_fraction, config.seed, config.skip_bad_lines
    )
    batching = dict(seq_len=seq_len, packing=config.pack, document_mask=config.pack_mask == "document",
                    seed=config.seed, rank=world.rank(), world_size=world.size(), report=report)  # fmt: skip
    micro_batch = config.micro_batch
    batches = Batcher(train_examples, micro_batch, **batching)
    val_batches = None
    if valid_examples:
        val_batches = partial(Batcher(valid_examples, micro_batch, **batching).once, config.val_batches)

    lora = make_trainable(model, config, model_path, config.adapter)

    train_config = TrainConfig.from_job(config, len(batches))
    optimizer = make_optimizer(OptimizerConfig.from_job(config), train_config.iters)
    claim = claim_job_folder(config, "sft", model_path, SFT_MEANING_FIELDS, world.rank() == 0)
    with claim as run:  # every check above has passed: from here on the folder is ours
        if announce is not None and world.rank() == 0:
            if seq_len < config.seq_len:
                announce(f"warning: --seq-len {config.seq_len} is longer than {model_path}'s context "
                         f"({model.args.max_seq_len} tokens); rows are cut to {seq_len}")  # fmt: skip
            announce(
                f"data: {report.summary()}; {len(train_examples)} for training, {len(valid_examples)} for "
                f"validation; {len(batches)} batches per epoch, {train_config.iters} steps"
            )
        callbacks = [run.callback] if run is not None else []
        train_config.resume = continues_checkpoint(out, config.resume)
        callbacks += [AdapterWriter(model, out, lora, model_path)] if lora is not None else []
        loss = partial(next_token_loss, chunk=config.loss_chunk or None)
        result = train(model, optimizer, loss, batches, train_config, val_batches, callbacks)
        if config.full and world.rank() == 0:
            write_model_files(model, out, tokenizer_dir=model_path)
    return result, report
