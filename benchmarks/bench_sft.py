"""LoRA SFT throughput and peak memory: our trainer (unpacked and packed) vs mlx-lm's tuner, in one run.

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3 python benchmarks/bench_sft.py

Both train the same weights (an mlx-lm Llama loaded with our model's tensors) with LoRA of the same rank, scale,
targets and layers, the same AdamW, the same batch size and maximum length, on the same token ids: single-turn
examples of mixed lengths whose loss covers the answer (mlx-lm: the (tokens, offset) form of its datasets).
Each run trains `--epochs` passes over the data, timed by wall clock including compilation; "tokens/s" counts the
real (non-padding) tokens of the data processed per second, the same count for every run.
"""

from __future__ import annotations

import argparse
import gc
import sys
import tempfile
import time
from pathlib import Path

import mlx.core as mx
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
from llama2_mlx.trainer import TrainConfig, train  # noqa: E402


def make_data(count: int, max_len: int, vocab: int, seed: int = 0) -> list[tuple[list[int], int]]:
    """(token ids, prompt length): prompts of 8-64 tokens, answers log-uniform in 8..max_len - prompt."""
    rng = np.random.default_rng(seed)
    data = []
    for _ in range(count):
        prompt = int(rng.integers(8, 65))
        answer = int(np.exp(rng.uniform(np.log(8), np.log(max_len - prompt))))
        ids = [1] + rng.integers(3, vocab, size=prompt + answer - 1).tolist()
        data.append((ids, prompt))
    return data


def fresh_memory() -> None:
    gc.collect()
    mx.clear_cache()
    mx.reset_peak_memory()


def run_ours(args: ModelArgs, weights, data, opts, packing: bool) -> tuple[float, float]:
    fresh_memory()
    model = Llama(args)
    model.load_weights(weights)
    mx.random.seed(0)
    apply_lora(
        model,
        LoRAConfig(
            rank=opts.rank, alpha=opts.rank * opts.scale, targets=opts.targets, layers=opts.lora_layers
        ),
    )
    examples = [Example(ids, [False] * prompt + [True] * (len(ids) - prompt)) for ids, prompt in data]
    batches = Batcher(examples, opts.batch_size, opts.seq_len, packing=packing, seed=0)
    iters = len(batches) * opts.epochs
    config = TrainConfig(iters=iters, report_every=iters, eval_every=None, save_every=None, progress=False)
    optimizer = optim.AdamW(learning_rate=1e-4, betas=[0.9, 0.95], eps=1e-5, weight_decay=0.1)
    start = time.perf_counter()
    train(model, optimizer, next_token_loss, batches, config)
    return time.perf_counter() - start, mx.get_peak_memory()


def run_mlx_lm(args: ModelArgs, weights, data, opts, adapter_file: Path) -> tuple[float, float]:
    import mlx_lm.models.llama as mlx_lm_llama
    from mlx_lm.tuner.trainer import TrainingArgs
    from mlx_lm.tuner.trainer import train as mlx_lm_train
    from mlx_lm.tuner.utils import linear_to_lora_layers

    fresh_memory()
    model = mlx_lm_llama.Model(
        mlx_lm_llama.ModelArgs.from_dict({"model_type": "llama", **args.to_hf_config()})
    )
    model.load_weights(weights)
    model.freeze()
    mx.random.seed(0)
    lora = {
        "rank": opts.rank,
        "scale": opts.scale,
        "dropout": 0.0,
        "keys": [TARGET_MODULES[t] for t in opts.targets],
    }
    linear_to_lora_layers(model, opts.lora_layers or args.n_layers, lora)
    iters = len(data) // opts.batch_size * opts.epochs
    training = TrainingArgs(batch_size=opts.batch_size, iters=iters, steps_per_report=iters, steps_per_eval=10**9,
                            steps_per_save=10**9, max_seq_length=opts.seq_len, adapter_file=str(adapter_file))  # fmt: skip
    optimizer = optim.AdamW(learning_rate=1e-4, betas=[0.9, 0.95], eps=1e-5, weight_decay=0.1)
    start = time.perf_counter()
    mlx_lm_train(model, optimizer, data, None, args=training)
    return time.perf_counter() - start, mx.get_peak_memory()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--examples", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--scale", type=float, default=2.0, help="alpha / rank")
    parser.add_argument("--targets", default="q,v")
    parser.add_argument("--lora-layers", type=int, default=None, help="last N layers (default: all)")
    opts = parser.parse_args()
    opts.targets = opts.targets.split(",")
    opts.examples -= opts.examples % opts.batch_size  # mlx-lm drops an incomplete last batch

    args = ModelArgs(dim=opts.dim, n_layers=opts.layers, n_heads=opts.heads, n_kv_heads=opts.kv_heads,
                     vocab_size=opts.vocab, hidden_dim=ffn_hidden_dim(opts.dim, 256), max_seq_len=opts.seq_len)  # fmt: skip
    mx.random.seed(0)
    reference = Llama(args)
    weights = [(k, mx.array(np.array(v))) for k, v in tree_flatten(reference.parameters())]
    del reference
    data = make_data(opts.examples, opts.seq_len, opts.vocab)
    tokens = sum(len(ids) for ids, _ in data) * opts.epochs
    lengths = [len(ids) for ids, _ in data]
    print(f"machine: {machine()}")
    print(f"model: dim {opts.dim}, {opts.layers} layers, {opts.heads}/{opts.kv_heads} heads, vocab {opts.vocab}; "
          f"LoRA rank {opts.rank} scale {opts.scale} on {','.join(opts.targets)}, layers {opts.lora_layers or 'all'}")  # fmt: skip
    print(f"data: {len(data)} examples, lengths {min(lengths)}-{max(lengths)} (mean {np.mean(lengths):.0f}), "
          f"batch {opts.batch_size}, seq-len {opts.seq_len}, {opts.epochs} epochs = {tokens} tokens")  # fmt: skip

    with tempfile.TemporaryDirectory() as tmp:
        results = {"mlx-lm": run_mlx_lm(args, weights, data, opts, Path(tmp) / "adapters.safetensors")}
    results["ours"] = run_ours(args, weights, data, opts, packing=False)
    results["ours --pack"] = run_ours(args, weights, data, opts, packing=True)

    base_seconds, base_memory = results["mlx-lm"]
    print("\n| run | seconds | tokens/s | peak memory GB | tokens/s vs mlx-lm | memory vs mlx-lm |")
    print("|---|---|---|---|---|---|")
    for name, (seconds, memory) in results.items():
        print(f"| {name} | {seconds:.1f} | {tokens / seconds:.0f} | {memory / 1e9:.2f} | "
              f"{base_seconds / seconds:.2f} | {memory / base_memory:.2f} |")  # fmt: skip


if __name__ == "__main__":
    main()
