"""A reward-model training step vs an SFT training step on the same model and the same tokens: pairs/s and memory.

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3 python benchmarks/bench_reward.py

The reward model is the chat model's backbone plus a scalar head: it never computes the [rows, length, vocab]
logits that SFT's next-token loss needs, so its step should be faster and its peak memory lower, by a margin that
grows with the vocabulary. Both sides train through `trainer.train` (the compiled step every job uses) with LoRA of
the same rank on the same projections and AdamW; the reward model's backbone holds the very same weight arrays
as the SFT model. The batch is one batch of `--pairs` preference pairs made by `PairBatcher` (chosen rows, then
rejected rows, padded to a multiple of 32); SFT trains on exactly those token rows, with the loss on each row's
answer. Rounds alternate the two sides so drifting load from other work hits both alike; in each round a side runs
`--steps` + 1 steps, the first (compilation) untimed, and its peak memory is `mx.get_peak_memory()` after
`mx.reset_peak_memory()` (weights of both models are resident throughout, so "step memory" = peak minus the memory
in use before the round is what the step itself needs).
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from functools import partial
from itertools import repeat
from pathlib import Path

import mlx.core as mx
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import machine  # noqa: E402
from llama2_mlx.config import ModelArgs, ffn_hidden_dim  # noqa: E402
from llama2_mlx.lora import LoRAConfig, apply_lora  # noqa: E402
from llama2_mlx.losses import next_token_loss  # noqa: E402
from llama2_mlx.model import Llama  # noqa: E402
from llama2_mlx.preferences import Pair, PairBatcher, preference_loss  # noqa: E402
from llama2_mlx.reward_model import RewardModel  # noqa: E402
from llama2_mlx.trainer import Batch, Callback, TrainConfig, train  # noqa: E402


def make_pairs(
    count: int, min_len: int, max_len: int, vocab: int, seed: int = 0
) -> tuple[list[Pair], list[int]]:
    """Pairs sharing a prompt of 32-128 tokens, each answer making its row `min_len`..`max_len` tokens long."""
    rng = np.random.default_rng(seed)
    pairs, prompt_lengths = [], []
    for _ in range(count):
        prompt = [1] + rng.integers(3, vocab, size=int(rng.integers(31, 128))).tolist()
        rows = [prompt + rng.integers(3, vocab, size=int(rng.integers(min_len, max_len + 1)) - len(prompt) - 1).tolist()
                + [2] for _ in range(2)]  # fmt: skip
        pairs.append(Pair(rows[0], rows[1], "better"))
        prompt_lengths.append(len(prompt))
    return pairs, prompt_lengths


def sft_batch(rm_batch: Batch, prompt_lengths: list[int]) -> Batch:
    """The same token rows as SFT inputs: the loss on each row's answer and EOS, never on its prompt or padding."""
    tokens, last, _ = rm_batch.inputs
    positions = mx.arange(tokens.shape[1])[None]
    starts = mx.array(prompt_lengths * 2)[:, None]  # chosen rows, then rejected rows, of the same pairs
    loss_mask = (positions >= starts) & (positions <= last[:, None])
    return Batch((tokens, loss_mask), rm_batch.tokens)


class StepClock(Callback):
    """Wall-clock time of each report; with report_every=1, consecutive differences are step times."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def on_report(self, record: dict) -> None:
        self.times.append(time.perf_counter())


def run_round(model, optimizer, loss_fn, batch: Batch, steps: int) -> tuple[float, float, float]:
    """(median seconds per step after the first, peak memory, memory in use before) of `steps` + 1 steps."""
    gc.collect()
    mx.clear_cache()
    before = mx.get_active_memory()
    mx.reset_peak_memory()
    clock = StepClock()
    config = TrainConfig(iters=steps + 1, report_every=1, eval_every=None, save_every=None, progress=False)
    train(model, optimizer, loss_fn, lambda start: repeat(batch), config, callbacks=[clock])
    return statistics.median(np.diff(clock.times)), mx.get_peak_memory(), before


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--pairs", type=int, default=2, help="Preference pairs per step (2 rows each).")
    parser.add_argument("--min-len", type=int, default=512)
    parser.add_argument("--max-len", type=int, default=1024)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--targets", default="q,v")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--steps", type=int, default=2, help="Timed steps per side and round (after one untimed)."
    )
    opts = parser.parse_args()
    if not 129 < opts.min_len <= opts.max_len:
        parser.error("rows need --min-len > 129 (prompts are up to 128 tokens) and <= --max-len")

    args = ModelArgs(dim=opts.dim, n_layers=opts.layers, n_heads=opts.heads, n_kv_heads=opts.kv_heads,
                     vocab_size=opts.vocab, hidden_dim=ffn_hidden_dim(opts.dim, 256), max_seq_len=opts.max_len)  # fmt: skip
    mx.random.seed(0)
    sft_model = Llama(args)
    reward_model = RewardModel(args)
    reward_model.score.weight = mx.random.normal((1, args.dim)) * 0.02
    backbone = [(k, v) for k, v in tree_flatten(sft_model.parameters()) if k.startswith("model.")]
    reward_model.load_weights(backbone, strict=False)  # the same arrays: one copy of the base in memory
    mx.eval(sft_model.parameters(), reward_model.parameters())
    lora = LoRAConfig(rank=opts.rank, alpha=2.0 * opts.rank, targets=opts.targets)
    for model in (sft_model, reward_model):
        mx.random.seed(1)  # the same LoRA initialisation on both sides
        apply_lora(model, lora)
    reward_model.score.unfreeze()  # as train-rm: the head always trains

    pairs, prompt_lengths = make_pairs(opts.pairs, opts.min_len, opts.max_len, opts.vocab)
    batcher = PairBatcher(pairs, opts.pairs)
    (indices,) = batcher.batches  # one batch of every pair, in the batcher's (length-sorted) order
    rm_batch = batcher.make_batch(indices)
    sft = sft_batch(rm_batch, [prompt_lengths[i] for i in indices])

    sides = {
        "sft": (sft_model, next_token_loss, sft),
        "reward model": (reward_model, partial(preference_loss, center_coef=0.0), rm_batch),
    }
    optimizers = {
        name: optim.AdamW(learning_rate=1e-5, betas=[0.9, 0.95], eps=1e-5, weight_decay=0.1) for name in sides
    }
    lengths = [len(row) for pair in pairs for row in (pair.chosen, pair.rejected)]
    print(f"machine: {machine()}")
    print(f"model: dim {opts.dim}, {opts.layers} layers, {opts.heads}/{opts.kv_heads} heads, vocab {opts.vocab}; "
          f"LoRA rank {opts.rank} on {opts.targets}, all layers (+ the reward head)")  # fmt: skip
    print(f"batch: {opts.pairs} pairs = {2 * opts.pairs} rows of {min(lengths)}-{max(lengths)} tokens "
          f"({rm_batch.tokens} tokens), padded to {rm_batch.inputs[0].shape[1]}; {opts.rounds} alternating rounds "
          f"of 1 + {opts.steps} steps per side")  # fmt: skip
    results = {name: [] for name in sides}
    for round_index in range(opts.rounds):
        for name, (model, loss_fn, batch) in sides.items():
            seconds, peak, before = run_round(model, optimizers[name], loss_fn, batch, opts.steps)
            results[name].append((seconds, peak, before))
            print(f"  round {round_index + 1} {name}: {seconds:.2f} s/step, peak {peak / 1e9:.3f} GB "
                  f"(step {(peak - before) / 1e9:.3f} GB)", flush=True)  # fmt: skip

    print("\n| step | s/step | pairs/s | peak memory GB | step memory GB |")
    print("|---|---|---|---|---|")
    summary = {}
    for name, rounds in results.items():
        seconds = statistics.median(r[0] for r in rounds)
        peak = max(r[1] for r in rounds)
        step_memory = max(r[1] - r[2] for r in rounds)
        summary[name] = (seconds, peak, step_memory)
        print(
            f"| {name} | {seconds:.2f} | {opts.pairs / seconds:.3f} | {peak / 1e9:.3f} | {step_memory / 1e9:.3f} |"
        )
    (sft_s, sft_peak, sft_step), (rm_s, rm_peak, rm_step) = summary["sft"], summary["reward model"]
    print(f"\nreward model / sft: pairs/s {sft_s / rm_s:.2f}x, peak memory {rm_peak / sft_peak:.2f}, "
          f"step memory {rm_step / sft_step:.2f}")  # fmt: skip
    print("reward-model peak below sft's:", "yes" if rm_peak < sft_peak else "NO")


if __name__ == "__main__":
    main()
