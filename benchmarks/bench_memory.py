"""Peak memory and speed of a LoRA training step: ours vs `mlx_lm.lora`'s trainer, with and without checkpointing.

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3 python benchmarks/bench_memory.py

Every (side, length, checkpointing) runs in a child process of its own, so that one peak does not carry into the
next and mlx-lm's `grad_checkpoint` (which patches its block class for good) stays inside its run. Both sides build
the same random weights (the same seed), put LoRA of the same rank, scale and targets on every layer, use the same
AdamW, and train `--steps` steps on the same rows: 4 rows of exactly `length` input positions, the first quarter of
each a prompt whose loss is masked (mlx-lm: its (tokens, offset) form). Each side runs through its own `train`
function (ours: `trainer.train` with `next_token_loss`; mlx-lm: `mlx_lm.tuner.trainer.train` with its
`default_loss`); "ours, plain CE" is our trainer with the cross-entropy over every logit that we used before.
Peak memory is `mx.get_peak_memory()` over the whole run (weights, optimizer state and compilation included);
a step's time is the median over the steps after the first (which compiles). Speed is compared in `--rounds`
alternating rounds at one length, since other work on a shared machine shifts timings between runs.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import machine  # noqa: E402
from llama2_mlx.config import ModelArgs, ffn_hidden_dim  # noqa: E402
from llama2_mlx.data import Batcher, Example  # noqa: E402
from llama2_mlx.lora import TARGET_MODULES, LoRAConfig, apply_lora  # noqa: E402
from llama2_mlx.losses import next_token_loss  # noqa: E402
from llama2_mlx.model import Llama  # noqa: E402
from llama2_mlx.trainer import Callback, TrainConfig, train  # noqa: E402

SIDES = ("mlx-lm", "ours", "ours, plain CE")
RESULT = "RESULT "


def plain_loss(model, tokens, loss_mask, doc_ids=None, positions=None):
    """Our loss before the chunked one: logits and cross-entropy at every position, then the mask."""
    logits = model(tokens[:, :-1])
    losses = nn.losses.cross_entropy(logits, tokens[:, 1:], reduction="none")
    mask = loss_mask[:, 1:].astype(mx.float32)
    return (losses * mask).sum(), mask.sum()


def model_args(opts) -> ModelArgs:
    return ModelArgs(dim=opts.dim, n_layers=opts.layers, n_heads=opts.heads, n_kv_heads=opts.kv_heads,
                     vocab_size=opts.vocab, hidden_dim=ffn_hidden_dim(opts.dim, 256), max_seq_len=4096)  # fmt: skip


def make_rows(opts, length: int) -> list[tuple[list[int], int]]:
    """(ids, prompt length): `batch` rows of length + 1 tokens, so that `length` positions are predicted."""
    rng = np.random.default_rng(0)
    return [([1] + rng.integers(3, opts.vocab, size=length).tolist(), length // 4) for _ in range(opts.batch)]


def child(opts) -> None:
    """One side at one length: train `--steps` steps, print the peak and the step times as JSON."""
    args = model_args(opts)
    mx.random.seed(0)
    reference = Llama(args)
    weights = [(k, mx.array(np.array(v))) for k, v in tree_flatten(reference.parameters())]
    del reference
    rows = make_rows(opts, opts.length)
    optimizer = optim.AdamW(learning_rate=1e-4, betas=[0.9, 0.95], eps=1e-5, weight_decay=0.1)
    stamps: list[float] = []
    gc.collect()
    mx.clear_cache()
    mx.reset_peak_memory()
    if opts.side == "mlx-lm":
        import mlx_lm.models.llama as mlx_lm_llama
        from mlx_lm.tuner.callbacks import TrainingCallback
        from mlx_lm.tuner.trainer import TrainingArgs
        from mlx_lm.tuner.trainer import train as mlx_lm_train
        from mlx_lm.tuner.utils import linear_to_lora_layers

        model = mlx_lm_llama.Model(mlx_lm_llama.ModelArgs.from_dict({"model_type": "llama", **args.to_hf_config()}))  # fmt: skip
        model.load_weights(weights)
        model.freeze()
        mx.random.seed(0)
        lora = {
            "rank": opts.rank,
            "scale": opts.scale,
            "dropout": 0.0,
            "keys": [TARGET_MODULES[t] for t in "qv"],
        }
        linear_to_lora_layers(model, args.n_layers, lora)

        class Stamp(TrainingCallback):
            def on_train_loss_report(self, info):
                stamps.append(time.perf_counter())

        with tempfile.TemporaryDirectory() as tmp:
            training = TrainingArgs(batch_size=opts.batch, iters=opts.steps, steps_per_report=1, steps_per_eval=10**9,
                                    steps_per_save=10**9, max_seq_length=opts.length + 1,
                                    adapter_file=str(Path(tmp) / "a.safetensors"), grad_checkpoint=opts.checkpoint)  # fmt: skip
            stamps.append(time.perf_counter())
            mlx_lm_train(model, optimizer, rows, None, args=training, training_callback=Stamp())
    else:
        model = Llama(args)
        model.load_weights(weights)
        mx.random.seed(0)
        apply_lora(model, LoRAConfig(rank=opts.rank, alpha=opts.rank * opts.scale, targets="q,v"))
        examples = [Example(ids, [False] * prompt + [True] * (len(ids) - prompt)) for ids, prompt in rows]
        batches = Batcher(examples, opts.batch, opts.length + 1, seed=0)

        class Stamp(Callback):
            def on_report(self, record):
                stamps.append(time.perf_counter())

        config = TrainConfig(iters=opts.steps, report_every=1, eval_every=None, save_every=None, progress=False,
                             grad_checkpoint=opts.checkpoint)  # fmt: skip
        loss = next_token_loss if opts.side == "ours" else plain_loss
        stamps.append(time.perf_counter())
        train(model, optimizer, loss, batches, config, callbacks=[Stamp()])
    steps = [b - a for a, b in zip(stamps, stamps[1:], strict=False)]
    print(RESULT + json.dumps({"peak": mx.get_peak_memory(), "steps": steps}))


def run_child(opts, side: str, length: int, checkpoint: bool, steps: int) -> dict:
    command = [sys.executable, __file__, "--child", side, "--length", str(length), "--steps", str(steps)]
    for name in ("dim", "layers", "heads", "kv_heads", "vocab", "batch", "rank", "scale"):
        command += [f"--{name.replace('_', '-')}", str(getattr(opts, name))]
    if checkpoint:
        command.append("--checkpoint")
    out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    return json.loads(next(line for line in out.splitlines() if line.startswith(RESULT))[len(RESULT) :])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--scale", type=float, default=2.0, help="alpha / rank")
    parser.add_argument("--lengths", default="512,1024,2048", help="input positions per row")
    parser.add_argument("--steps", type=int, default=2, help="steps per memory run (the first compiles)")
    parser.add_argument("--speed-length", type=int, default=1024)
    parser.add_argument("--rounds", type=int, default=3, help="alternating speed rounds (0: none)")
    parser.add_argument("--speed-steps", type=int, default=4)
    parser.add_argument("--child", choices=SIDES, help=argparse.SUPPRESS)
    parser.add_argument("--length", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--checkpoint", action="store_true", help=argparse.SUPPRESS)
    opts = parser.parse_args()
    if opts.child:
        opts.side = opts.child
        return child(opts)

    args = model_args(opts)
    params = sum(v.size for _, v in tree_flatten(Llama(args).parameters()))
    print(f"machine: {machine()}")
    print(f"model: dim {opts.dim}, {opts.layers} layers, {opts.heads}/{opts.kv_heads} heads, vocab {opts.vocab}, "
          f"{params / 1e6:.0f}M parameters, float32; LoRA rank {opts.rank} scale {opts.scale} on q,v of every layer; "
          f"batch {opts.batch}, a quarter of each row masked as prompt")  # fmt: skip
    print("\n| positions per row | checkpointing | mlx-lm GB | ours GB | ours, plain CE GB | ours / mlx-lm |")
    print("|---|---|---|---|---|---|")
    for length in [int(x) for x in opts.lengths.split(",") if x]:  # --lengths "": speed only
        for checkpoint in (False, True):
            peaks = {side: run_child(opts, side, length, checkpoint, opts.steps)["peak"] for side in SIDES}
            print(f"| {length} | {'on' if checkpoint else 'off'} | {peaks['mlx-lm'] / 1e9:.2f} | "
                  f"{peaks['ours'] / 1e9:.2f} | {peaks['ours, plain CE'] / 1e9:.2f} | "
                  f"{peaks['ours'] / peaks['mlx-lm']:.2f} |", flush=True)  # fmt: skip
    if opts.rounds:
        tokens = opts.batch * opts.speed_length
        print(f"\nspeed at {opts.batch} x {opts.speed_length}, checkpointing on both, {opts.rounds} alternating rounds "
              f"of {opts.speed_steps} steps (median of steps 2..):")  # fmt: skip
        print("| round | mlx-lm s/step | ours s/step | ours tokens/s | mlx-lm tokens/s | ours / mlx-lm |")
        print("|---|---|---|---|---|---|")
        ratios = []
        for round_ in range(1, opts.rounds + 1):
            seconds = {}
            for side in ("mlx-lm", "ours"):
                steps = run_child(opts, side, opts.speed_length, True, opts.speed_steps)["steps"][1:]
                seconds[side] = statistics.median(steps)
            ratios.append(seconds["mlx-lm"] / seconds["ours"])
            print(f"| {round_} | {seconds['mlx-lm']:.2f} | {seconds['ours']:.2f} | {tokens / seconds['ours']:.0f} | "
                  f"{tokens / seconds['mlx-lm']:.0f} | {ratios[-1]:.2f} |", flush=True)  # fmt: skip
        print(f"median tokens/s ratio ours / mlx-lm: {statistics.median(ratios):.2f}")


if __name__ == "__main__":
    main()
