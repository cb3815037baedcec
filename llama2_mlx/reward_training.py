"""Training the reward model (`llama2-mlx train-rm`): `RewardConfig` and `run_train_rm`, on the shared loop.

The paper's recipe (LLAMA2_RECIPE.md, "Reward model"): the chat model with a scalar head, the binary ranking loss
with the rating margin of Table 27, one epoch, the pretraining optimiser with peak LR 1e-5, warmup 3% of the steps
(at least 5) and cosine down to 10%. LoRA on the backbone is the default (the head always trains); `--full`
trains every weight. Outputs in `out`: a reward-model folder (`reward_model` module docstring), plus
reward_config.json, metrics.jsonl (with validation accuracy per rating) and checkpoint/ for `--resume`.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from llama2_mlx.finetune import FineTuneConfig

FULL_LR, LORA_LR = 1e-5, 1e-4


@dataclass
class RewardConfig(FineTuneConfig):
    """Every field is a flag of `llama2-mlx train-rm` and a key of its -c config.yaml (defaults: the paper's)."""

    data: str = field(
        metadata={"help": "Preference pairs: a .jsonl file, or a folder with train.jsonl (and valid.jsonl)."}
    )
    out: str = field(metadata={"help": "Output reward-model folder (plus metrics.jsonl, checkpoint/)."})
    margin: str = field(
        default="none",
        metadata={"help": "Rating margin of the paper's Table 27: none, small (1, 2/3, 1/3, 0) or large (3, 2, 1, 0).",
                  "choices": ["none", "small", "large"]},
    )  # fmt: skip
    center_coef: float = field(
        default=0.0,
        metadata={"min": 0, "help": "Add C * mean((r_chosen + r_rejected)^2) to keep rewards centred (TRL: 0.01)."},
    )  # fmt: skip
    lr: float | None = field(
        default=None,
        metadata={"help": f"Peak learning rate (default: the paper's {FULL_LR:g} with --full, {LORA_LR:g} for "
                          "LoRA, whose low-rank update starts from zero and needs larger steps)."},
    )  # fmt: skip
    warmup: int | None = field(
        default=None, metadata={"help": "Warmup steps (default: 3% of the steps, at least 5, at most half)."}
    )
    batch_size: int = field(
        default=64, metadata={"help": "Pairs per optimizer step, all processes together."}
    )
    epochs: float = field(
        default=1.0, metadata={"help": "Passes over the pairs when --iters is not set (paper: 1; more over-fits)."}
    )  # fmt: skip
    eval_every: int = field(
        default=50, metadata={"help": "Validation loss and accuracy every N steps (and at the end)."}
    )

    @property
    def peak_lr(self) -> float:
        if self.lr is not None:
            return self.lr
        return FULL_LR if self.full else LORA_LR

    def warmup_steps(self, iters: int) -> int:
        if self.warmup is not None:
            return self.warmup
        return min(max(5, math.ceil(0.03 * iters)), iters // 2)


def run_train_rm(config: RewardConfig, announce: Callable[[str], None] | None = None):
    """Train a reward model from `config.model` on `config.data`; returns (TrainResult, DataReport, AccuracyReport
    on the validation pairs or None).

    Everything is checked (flags, model, data, --out) before anything is written.
    """
    import mlx.core as mx

    from llama2_mlx.fileio import save_safetensors_atomic, write_model_files, write_text_atomic
    from llama2_mlx.finetune import claim_job_folder, make_trainable, meaning_fields
    from llama2_mlx.loading import demo_model_path
    from llama2_mlx.lora import save_adapters, write_adapter_config
    from llama2_mlx.model_folder import copy_tokenizer
    from llama2_mlx.optim import OptimizerConfig, make_optimizer
    from llama2_mlx.preferences import PairBatcher, evaluate_pairs, load_pairs, preference_loss
    from llama2_mlx.reward_model import HEAD_FILE, reward_config, reward_model_from_chat
    from llama2_mlx.run_folder import continues_checkpoint
    from llama2_mlx.tokenizer import Tokenizer
    from llama2_mlx.trainer import Callback, TrainConfig, train

    world = mx.distributed.init()
    model_path = Path(config.model) if config.model else demo_model_path()
    out = Path(config.out)
    mx.random.seed(config.seed)
    tokenizer = Tokenizer(model_path / "tokenizer.model")
    train_pairs, valid_pairs, report = load_pairs(
        config.data, tokenizer, config.seq_len, config.valid_fraction, config.seed, config.skip_bad_lines
    )
    batching = dict(margin=config.margin, seed=config.seed, rank=world.rank(), world_size=world.size())
    batches = PairBatcher(train_pairs, config.micro_batch, **batching)
    val_batches = val_metrics = None
    if valid_pairs:
        val_batches = PairBatcher(valid_pairs, config.micro_batch, **batching).once

        def val_metrics(network) -> dict[str, Any]:  # every rank scores all validation pairs; rank 0 reports
            accuracy = evaluate_pairs(network, valid_pairs, config.micro_batch)
            return {"val_accuracy": accuracy.accuracy, "val_buckets": accuracy.to_dict()["buckets"]}

    network = reward_model_from_chat(model_path)
    lora = make_trainable(network, config, model_path)
    network.score.unfreeze()  # the head always trains
    train_config = TrainConfig.from_job(config, len(batches))
    optimizer = make_optimizer(
        OptimizerConfig.from_job(config, lr=config.peak_lr, warmup=config.warmup_steps(train_config.iters)),
        train_config.iters,
    )
    base_model = os.path.relpath(model_path.resolve(), out.resolve()) if lora is not None else None
    folder_config = reward_config(network.args, base_model)

    class SaveRewardModel(Callback):
        def on_start(self, step: int) -> None:  # the folder is claimed: its fixed files are written first
            if lora is not None:
                config_json = {**network.args.to_hf_config(), **folder_config}
                write_text_atomic(out / "config.json", json.dumps(config_json, indent=2) + "\n")
                write_adapter_config(out, lora, len(network.layers), str(model_path))
                copy_tokenizer(model_path, out)

        def on_checkpoint(self, step: int, folder: Path) -> None:
            if lora is None:
                write_model_files(network, out, tokenizer_dir=model_path, config_extra=folder_config)
                return
            save_adapters(network, out)
            save_safetensors_atomic(out / HEAD_FILE, {"score.weight": network.score.weight})

    with claim_job_folder(config, "reward", model_path, meaning_fields(config), world.rank() == 0) as run:
        if announce is not None and world.rank() == 0:
            announce(
                f"data: {report.summary()}; {len(train_pairs)} pairs for training, {len(valid_pairs)} for "
                f"validation; {len(batches)} batches per epoch, {train_config.iters} steps; margin {config.margin}"
            )
        train_config.resume = continues_checkpoint(out, config.resume)
        callbacks = ([run.callback] if run is not None else []) + [SaveRewardModel()]
        loss = partial(preference_loss, center_coef=config.center_coef)
        result = train(network, optimizer, loss, batches, train_config, val_batches, callbacks, val_metrics)
    accuracy = None
    if valid_pairs:
        network.eval()
        accuracy = evaluate_pairs(network, valid_pairs, config.micro_batch)
    return result, report, accuracy
