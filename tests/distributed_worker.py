"""One rank of the data-parallel test: `mlx.launch -n 2 -- python tests/distributed_worker.py OUT` (or 1 process).

Trains a tiny LoRA model on a fixed set of examples; every rank writes the losses it saw to OUT/losses_rank{r}.json.
Then trains a fresh one for two steps with plain SGD (whose update shows any scale error in the gradient, which
AdamW would hide) and writes its trained weights to OUT/sgd_rank{r}.safetensors.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import mlx.core as mx
import mlx.optimizers as optim
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from llama2_mlx.data import Batcher, Example  # noqa: E402
from llama2_mlx.lora import LoRAConfig, apply_lora, lora_parameters  # noqa: E402
from llama2_mlx.losses import next_token_loss  # noqa: E402
from llama2_mlx.optim import OptimizerConfig, make_optimizer  # noqa: E402
from llama2_mlx.trainer import TrainConfig, train  # noqa: E402
from tests.conftest import random_model, tiny_args  # noqa: E402

ITERS = 4


def examples(seed: int) -> list[Example]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(16):
        ids = [1] + rng.integers(3, 384, size=int(rng.integers(5, 30))).tolist()
        out.append(Example(ids, [False] + (rng.random(len(ids) - 1) < 0.5).tolist()))
    return out


def main(out: Path) -> None:
    world = mx.distributed.init()
    model = random_model(tiny_args())
    mx.random.seed(0)
    apply_lora(model, LoRAConfig(rank=4, targets=["q", "v", "down"]))
    batching = dict(seq_len=64, seed=1, rank=world.rank(), world_size=world.size())
    batches = Batcher(examples(0), batch_size=4, **batching)
    valid = Batcher(examples(1), batch_size=4, **batching)
    config = TrainConfig(
        iters=ITERS, report_every=1, eval_every=2, save_every=2, out_dir=out / "run", progress=False
    )
    result = train(
        model, make_optimizer(OptimizerConfig(lr=1e-2), ITERS), next_token_loss, batches, config, valid.once
    )
    (out / f"losses_rank{world.rank()}.json").write_text(json.dumps(result.history))

    model = random_model(tiny_args())
    mx.random.seed(0)
    apply_lora(model, LoRAConfig(rank=4, targets=["q", "v", "down"]))
    config = TrainConfig(iters=2, grad_accum=2, clip_norm=None, progress=False)
    train(
        model,
        optim.SGD(learning_rate=1.0),
        next_token_loss,
        Batcher(examples(2), batch_size=2, **batching),
        config,
    )
    mx.save_safetensors(str(out / f"sgd_rank{world.rank()}.safetensors"), lora_parameters(model))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
