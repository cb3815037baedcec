"""The Llama 2 optimiser and learning-rate schedule (LLAMA2_RECIPE.md, "Pretraining optimiser").

AdamW with beta1 0.9, beta2 0.95, eps 1e-5, weight decay 0.1, and a linear warmup followed by a cosine decay to
10% of the peak. (Clipping to global norm 1.0 is done by the training loop: `TrainConfig.clip_norm`.) Every trainer here (SFT, pretraining, the reward model)
starts from these numbers and overrides only what its recipe changes (the peak LR, the warmup).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any

import mlx.core as mx
import mlx.optimizers as optim

from llama2_mlx.errors import Llama2MLXError


@dataclass
class OptimizerConfig:
    lr: float = 3e-4
    warmup: int = 0
    min_lr_fraction: float = 0.1
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-5

    def __post_init__(self) -> None:
        if not self.lr > 0:
            raise Llama2MLXError(f"learning rate must be positive, got {self.lr}")
        if self.warmup < 0:
            raise Llama2MLXError(f"warmup must be >= 0 steps, got {self.warmup}")
        if not 0 <= self.min_lr_fraction <= 1:
            raise Llama2MLXError(f"min_lr_fraction must be in [0, 1], got {self.min_lr_fraction}")
        if self.weight_decay < 0:
            raise Llama2MLXError(f"weight decay must be >= 0, got {self.weight_decay}")

    @classmethod
    def from_job(cls, job: Any, **overrides: Any) -> OptimizerConfig:
        """Take the same-named fields of a job's config (SFTConfig, PretrainConfig, ...), then `overrides`."""
        values = {f.name: getattr(job, f.name) for f in fields(cls) if hasattr(job, f.name)}
        return cls(**{**values, **overrides})


def warmup_cosine(
    peak: float, warmup: int, total: int, min_fraction: float = 0.1
) -> Callable[[mx.array], mx.array]:
    """LR at optimizer step s: linear from peak/warmup up to peak over `warmup` steps, then cosine to min_fraction*peak.

    Steps count from 0 (MLX's optimizers use schedule(0) for the first update); the warmup starts at peak/warmup
    rather than 0 so that the first update is not wasted, and the last step (total - 1) runs at min_fraction*peak.
    """
    decay_steps = max(total - warmup - 1, 1)
    cosine = optim.cosine_decay(peak, decay_steps, peak * min_fraction)
    if warmup == 0:
        return cosine
    ramp = (
        optim.linear_schedule(peak / warmup, peak, warmup - 1)
        if warmup > 1
        else (lambda step: mx.array(peak))
    )
    return optim.join_schedules([ramp, cosine], [warmup])


def make_optimizer(config: OptimizerConfig, total_steps: int) -> optim.AdamW:
    """AdamW with bias correction (as in PyTorch's AdamW, which the paper used) on the warmup+cosine schedule.

    Gradient clipping is done by the training loop, which sees the gradients averaged over accumulation and ranks.
    """
    schedule = warmup_cosine(config.lr, config.warmup, total_steps, config.min_lr_fraction)
    return optim.AdamW(
        learning_rate=schedule,
        betas=[config.beta1, config.beta2],
        eps=config.eps,
        weight_decay=config.weight_decay,
        bias_correction=True,
    )
