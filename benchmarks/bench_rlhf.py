"""Peak memory and seconds per optimizer step of PPO and DPO on one base, against an SFT step of the same model.

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3 python benchmarks/bench_rlhf.py

Builds a model folder in a temporary directory (random weights, a 32000-piece BPE tokenizer trained here; the EOS
row of the output projection is zeroed so every sampled answer has exactly `--answer` tokens) and measures, each in
its own fresh child process (so no run inherits another's buffers or cache), with LoRA of the same rank on the same
projections and the same AdamW, every step through the shared loop's compiled step (`trainer.train`):

* sft: `next_token_loss` on `--rows` rows of prompt + answer tokens (loss on the answer);
* dpo: `dpo.dpo_loss` on the same rows as `--rows` / 2 pairs (chosen, rejected), reference log-probs computed once
  beforehand by the starting policy, as `llama2-mlx dpo` does (no second model);
* ppo: one rollout of `--rows` prompts (one answer each), then its minibatch updates with `ppo.ppo_loss` on an
  `ppo.ActorCritic` (value head on the policy's hidden state), the rollout being the trainer's batch source
  (`ppo.RolloutSource`), as `llama2-mlx ppo` runs it. A LoRA reward model on the same base is resident throughout,
  sharing the base weights through `reward_model.BaseCache` as `rewards.reward_source` sets it up; the reference is
  the policy with its adapters switched off. The rollout (sampling, scoring, old/ref log-probs and values) is timed
  and its peak memory measured separately from the update steps;
* ppo-ptx: the same with `--ptx-data` (InstructGPT's PPO-ptx): every update also takes the next-token loss of an SFT
  minibatch of `--rows` rows of the same width, as `llama2-mlx ppo --ptx-data` adds one to each step.

All of them train on rows of the same width (the PPO rollout's: chat-formatted prompt + answer), so the activations
are the same size. Peak memory is `mx.get_peak_memory()` after `mx.reset_peak_memory()`; seconds per step are the
median of the trainer's per-step times after the first (compiling) step.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import mlx.core as mx
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.bench_generate import synthetic_corpus  # noqa: E402
from benchmarks.common import machine  # noqa: E402
from llama2_mlx import generation  # noqa: E402
from llama2_mlx.config import ModelArgs, ffn_hidden_dim  # noqa: E402
from llama2_mlx.loading import load  # noqa: E402
from llama2_mlx.lora import LoRAConfig, apply_lora  # noqa: E402
from llama2_mlx.model import Llama  # noqa: E402
from llama2_mlx.model_folder import save_model  # noqa: E402
from llama2_mlx.prompts import PromptRow  # noqa: E402
from llama2_mlx.tokenizer import Tokenizer  # noqa: E402
from llama2_mlx.tokenizer_training import train_tokenizer  # noqa: E402
from llama2_mlx.trainer import Batch, TrainConfig, train  # noqa: E402

KINDS = ("sft", "sft-logsumexp", "dpo", "ppo", "ppo-ptx")


def build_folder(root: Path, opts: argparse.Namespace) -> Path:
    corpus = synthetic_corpus(30000)
    train_tokenizer(corpus, opts.vocab, root / "tokenizer")
    config = ModelArgs(dim=opts.dim, n_layers=opts.layers, n_heads=opts.heads, n_kv_heads=opts.kv_heads,
                       vocab_size=opts.vocab, hidden_dim=ffn_hidden_dim(opts.dim, 256), max_seq_len=1024)  # fmt: skip
    mx.random.seed(0)
    model = Llama(config)
    model.lm_head.weight[2] = 0.0  # EOS logit always 0: every answer runs to --answer tokens
    mx.eval(model.parameters())
    save_model(model, root / "model", tokenizer_dir=root / "tokenizer")
    return root / "model"


def make_prompts(tokenizer: Tokenizer, count: int, length: int) -> list[str]:
    """`count` prompts of made-up words whose chat-formatted encoding is exactly `length` tokens."""
    rng = random.Random(0)
    words = " ".join(synthetic_corpus(200, seed=1)).split()

    def encoded_length(text: str) -> int:
        return len(tokenizer.encode_dialog([{"role": "user", "content": text}]))

    shortest = min(encoded_length(word) for word in set(words))
    if shortest > length:  # the chat template alone is longer: no prompt could ever land exactly
        raise SystemExit(f"--prompt {length}: a one-word chat-formatted prompt is already {shortest} tokens")
    prompts: list[str] = []
    while len(prompts) < count:  # grow a random run of words to `length` tokens; keep it if it lands exactly
        start, n = rng.randrange(len(words) - 200), 1
        while encoded_length(" ".join(words[start : start + n])) < length:
            n += 1
        text = " ".join(words[start : start + n])
        if encoded_length(text) == length:
            prompts.append(text)
    return prompts


def lora_config(opts: argparse.Namespace) -> LoRAConfig:
    return LoRAConfig(rank=opts.rank, alpha=2.0 * opts.rank, targets=opts.targets)


def optimizer() -> optim.Optimizer:
    return optim.AdamW(learning_rate=1e-5, betas=[0.9, 0.95], eps=1e-5, weight_decay=0.1)


def timed_train(model, loss, batches, steps: int) -> dict[str, float]:
    """Peak memory of `steps` optimizer steps (from here) and the median seconds of the steps after the first."""
    mx.clear_cache()
    mx.reset_peak_memory()
    config = TrainConfig(iters=steps, report_every=1, eval_every=None, save_every=None, progress=False)
    history = train(model, optimizer(), loss, batches, config).history
    # one record per step, whose seconds are its tokens / its tokens per second
    trained = [0] + [r["trained_tokens"] for r in history]
    seconds = [(b - a) / r["tokens_per_sec"] for a, b, r in zip(trained, trained[1:], history, strict=False)]
    return {
        "peak": max(r["peak_memory_gb"] for r in history) * 1e9,
        "step_seconds": statistics.median(seconds[1:]),
    }


def synthetic_rows(opts: argparse.Namespace, tokenizer: Tokenizer) -> tuple[np.ndarray, np.ndarray]:
    """`--rows` rows of the PPO rollout's width: a chat-formatted prompt, then `--answer` random answer tokens."""
    rng = np.random.default_rng(0)
    prompts = make_prompts(tokenizer, opts.rows, opts.prompt)
    tokens = np.array(
        [tokenizer.encode_dialog([{"role": "user", "content": p}]) + rng.integers(3, opts.vocab, opts.answer).tolist()
         for p in prompts], np.int32,
    )  # fmt: skip
    answer = np.zeros(tokens.shape, bool)
    answer[:, opts.prompt :] = True
    return tokens, answer


def sft_batch(opts: argparse.Namespace, tokenizer: Tokenizer) -> Batch:
    """The synthetic rows as an SFT batch (tokens, loss mask on the answer), as sft and PPO-ptx train on them."""
    tokens, answer = synthetic_rows(opts, tokenizer)
    return Batch((mx.array(tokens), mx.array(answer)), int(tokens.size))


def repeat(batch: Batch):
    def source(start: int = 0):
        while True:
            yield batch

    return source


def child_sft(folder: Path, opts: argparse.Namespace, loss=None) -> dict[str, float]:
    from llama2_mlx.losses import next_token_loss

    model, tokenizer = load(folder)
    apply_lora(model, lora_config(opts))
    return timed_train(model, loss or next_token_loss, repeat(sft_batch(opts, tokenizer)), opts.steps + 1)


def logsumexp_token_loss(model, tokens, loss_mask):
    """`next_token_loss` written as PPO's and DPO's log-probs are (logsumexp - picked logit, `ppo.token_logprobs`)
    rather than with `nn.losses.cross_entropy`: the same values, a like-for-like memory baseline."""
    from llama2_mlx.ppo import token_logprobs

    mask = loss_mask[:, 1:].astype(mx.float32)
    return -(token_logprobs(model(tokens[:, :-1]), tokens[:, 1:]) * mask).sum(), mask.sum()


def child_dpo(folder: Path, opts: argparse.Namespace) -> dict[str, float]:
    from llama2_mlx.dpo import answer_logprobs, dpo_loss

    model, tokenizer = load(folder)
    apply_lora(model, lora_config(opts))
    tokens, answer = synthetic_rows(opts, tokenizer)  # rows i and rows / 2 + i: chosen and rejected of pair i
    tokens, answer = mx.array(tokens), mx.array(answer)
    model.eval()
    reference = answer_logprobs(model, tokens, answer)[0]  # once, before training, as `llama2-mlx dpo` does
    mx.eval(reference)
    model.train()
    margins = mx.zeros((opts.rows // 2,))
    batch = Batch((tokens, margins, answer, reference), int(tokens.size))
    return timed_train(model, dpo_loss, repeat(batch), opts.steps + 1)


def child_ppo(folder: Path, opts: argparse.Namespace, ptx: bool = False) -> dict[str, float]:
    from llama2_mlx.lora import adapters_disabled
    from llama2_mlx.ppo import ActorCritic, PPOConfig, RolloutSource, _reference_call, ppo_loss
    from llama2_mlx.reward_model import BaseCache, RewardScorer, reward_model_from_chat
    from llama2_mlx.rewards import model_rewards

    policy, tokenizer = load(folder)
    bases = BaseCache()
    bases.add(folder, policy)  # as rewards.reward_source: the reward model shares the policy's base weights
    rm = reward_model_from_chat(folder, bases=bases)
    apply_lora(rm, lora_config(opts))
    rm.score.weight = mx.random.normal(rm.score.weight.shape, key=mx.random.key(1)) * 0.05
    mx.eval(rm.parameters())
    rewards = model_rewards(RewardScorer(rm, tokenizer, folder, folder), batch_size=opts.rows)
    apply_lora(policy, lora_config(opts))
    network = ActorCritic(policy)
    prompts = [PromptRow(p) for p in make_prompts(tokenizer, opts.rows, opts.prompt)]
    config = PPOConfig(data="-", out="-", model=str(folder), reward_model=str(folder), batch_size=opts.rows,
                       minibatch_size=opts.rows, ppo_epochs=opts.steps + 1, max_tokens=opts.answer)  # fmt: skip
    reference = _reference_call(partial(adapters_disabled, policy))
    seconds = {"sampling": 0.0, "scoring": 0.0}

    def timed(name, fn):
        def call(*args, **kwargs):
            start = time.perf_counter()
            result = fn(*args, **kwargs)
            seconds[name] += time.perf_counter() - start
            return result

        return call

    generation.generate_batch_ids = timed("sampling", generation.generate_batch_ids)  # looked up by collect()
    # with ptx, an SFT minibatch beside every PPO minibatch, as `ppo --ptx-data` feeds `RolloutSource`
    sft_batches = repeat(sft_batch(opts, tokenizer)) if ptx else None
    source = RolloutSource(
        network, tokenizer, prompts, timed("scoring", rewards), config, reference, ptx=sft_batches
    )
    measured = {}

    def rollout_then_updates(start: int = 0):
        """The first minibatch is drawn after the rollout: measure it, then restart the peak for the updates."""
        batches = source(start)
        mx.clear_cache()
        mx.reset_peak_memory()
        begin = time.perf_counter()
        first = next(batches)
        measured["rollout_seconds"] = time.perf_counter() - begin
        measured["rollout_peak"] = mx.get_peak_memory()
        mx.clear_cache()
        mx.reset_peak_memory()
        assert first.inputs[0].shape == (opts.rows, opts.prompt + opts.answer), first.inputs[0].shape
        yield first
        yield from batches

    loss = partial(ppo_loss, clip=config.clip, value_clip=config.value_clip, vf_coef=config.vf_coef)
    measured.update(timed_train(network, loss, rollout_then_updates, config.steps_per_rollout))
    measured["sampling_seconds"], measured["scoring_seconds"] = seconds["sampling"], seconds["scoring"]
    return measured


def child(kind: str, folder: Path, opts: argparse.Namespace) -> None:
    runner = {
        "sft": child_sft,
        "sft-logsumexp": partial(child_sft, loss=logsumexp_token_loss),
        "dpo": child_dpo,
        "ppo": child_ppo,
        "ppo-ptx": partial(child_ppo, ptx=True),
    }[kind]
    result = runner(folder, opts)
    model = load(folder)[0]
    result["weights"] = sum(a.nbytes for _, a in tree_flatten(model.parameters()))
    print("RESULT " + json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument(
        "--rows", type=int, default=8, help="rows per step (PPO: prompts per rollout; DPO: 2 x pairs)"
    )
    parser.add_argument("--prompt", type=int, default=64, help="prompt tokens per row (chat-formatted)")
    parser.add_argument("--answer", type=int, default=64, help="answer tokens per row")
    parser.add_argument("--steps", type=int, default=3, help="timed steps after the first (compiling) one")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--targets", default="q,v")
    parser.add_argument("--child", choices=KINDS, help=argparse.SUPPRESS)
    parser.add_argument("--folder", type=Path, help=argparse.SUPPRESS)
    opts = parser.parse_args()
    if opts.child:
        child(opts.child, opts.folder, opts)
        return

    print(f"machine: {machine()}")
    print(f"model: dim {opts.dim}, {opts.layers} layers, {opts.heads}/{opts.kv_heads} heads, vocab {opts.vocab}, "
          f"float32; LoRA rank {opts.rank} on {opts.targets}; {opts.rows} rows of {opts.prompt} prompt + "
          f"{opts.answer} answer tokens per step", flush=True)  # fmt: skip
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        folder = build_folder(Path(tmp), opts)
        for kind in KINDS:
            flags = [
                f"--{k.replace('_', '-')}={v}"
                for k, v in vars(opts).items()
                if v is not None and k not in ("child", "folder")
            ]
            run = subprocess.run([sys.executable, __file__, *flags, f"--child={kind}", f"--folder={folder}"],
                                 capture_output=True, text=True)  # fmt: skip
            line = next((x for x in run.stdout.splitlines() if x.startswith("RESULT ")), None)
            if run.returncode or line is None:
                raise SystemExit(f"{kind} failed:\n{run.stdout}\n{run.stderr}")
            results[kind] = json.loads(line[len("RESULT ") :])
            print(f"{kind}: {results[kind]}", flush=True)
    report(results)


def report(results: dict[str, dict[str, float]]) -> None:
    gb = 1e9
    sft, lse, dpo, ppo, ppo_ptx = (results[k] for k in KINDS)
    weights = sft["weights"]
    print(f"\nbase weights: {weights / gb:.3f} GB")
    print("\n| step | peak memory GB | vs sft | vs sft (logsumexp) | seconds/step | vs sft |")
    print("|---|---|---|---|---|---|")
    rows = (("sft (LoRA, `next_token_loss`)", sft), ("sft (LoRA, loss as logsumexp - picked logit)", lse),
            ("dpo (LoRA, reference precomputed)", dpo), ("ppo update (LoRA policy + value head, RM resident)", ppo),
            ("ppo update with --ptx-data (+ an SFT minibatch of the same rows)", ppo_ptx))  # fmt: skip
    for name, r in rows:
        print(f"| {name} | {r['peak'] / gb:.3f} | {r['peak'] / sft['peak']:.2f}x | {r['peak'] / lse['peak']:.2f}x | "
              f"{r['step_seconds']:.2f} | {r['step_seconds'] / sft['step_seconds']:.2f}x |")  # fmt: skip
    rollout = ppo["rollout_seconds"]
    evaluate = rollout - ppo["sampling_seconds"] - ppo["scoring_seconds"]
    print(f"| ppo rollout (sampling {ppo['sampling_seconds']:.2f} s, scoring {ppo['scoring_seconds']:.2f} s, "
          f"old/ref log-probs + values + GAE {evaluate:.2f} s) | {ppo['rollout_peak'] / gb:.3f} | "
          f"{ppo['rollout_peak'] / sft['peak']:.2f}x | {ppo['rollout_peak'] / lse['peak']:.2f}x | {rollout:.2f} | "
          f"{rollout / sft['step_seconds']:.2f}x |")  # fmt: skip
    print()
    for name, r, target in (("PPO", ppo, 1.5), ("PPO-ptx", ppo_ptx, 1.5), ("DPO", dpo, 1.3)):
        ratio, like = r["peak"] / sft["peak"], r["peak"] / lse["peak"]
        print(f"{name}/sft peak {ratio:.2f}x ({like:.2f}x vs the logsumexp sft step); target <= {target}x: "
              f"{'met' if max(ratio, like) <= target else 'missed'}")  # fmt: skip
    print(f"Separate networks (arithmetic, not measured): PPO holding its own reference, reward and value networks "
          f"adds 3 copies of the base weights: >= {(sft['peak'] + 3 * weights) / gb:.3f} GB = "
          f"{(sft['peak'] + 3 * weights) / sft['peak']:.2f}x sft (the value network's own activations not counted); "
          f"DPO with a reference copy: {(sft['peak'] + weights) / gb:.3f} GB = "
          f"{(sft['peak'] + weights) / sft['peak']:.2f}x sft")  # fmt: skip


if __name__ == "__main__":
    main()
