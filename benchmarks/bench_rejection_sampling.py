"""Rejection sampling: K answers of one prompt in one batch vs K sequential generations, and where an iteration of
`llama2-mlx rejection-sample` spends its time.

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3 python benchmarks/bench_rejection_sampling.py

1. Sampled tokens/s of `generate_batch_ids(..., n_samples=K)` (one prefill, its cache copied to the K rows, one
   batched decode: what every rejection-sampling iteration runs) vs K calls with n_samples=1, for one chat prompt
   (a world arithmetic question), at the command's default temperature 1.0, top-p off, on `--model` (default: the
   demo model). Fixed seeds, so every call samples the same tokens; each side is timed in alternating rounds
   (`common.time_pair`, medians) so drifting load from other work hits both alike. Tokens counted are the answer
   tokens actually sampled (EOS ends a row), the same measure as `summary.json`'s sampled_tokens_per_sec.
2. A real run of the command (`llama2-mlx rejection-sample`, this checkout's code) on `--prompts` world arithmetic
   questions with the world verifier as reward (`--reward-fn llama2_mlx.world.verifier:reward`), then the seconds
   per iteration split into sampling, scoring and training, read from its iter-N/summary.json; then the same run
   with a reward model instead (`--reward-model`: a LoRA reward model on the same base, trained briefly here with
   `train-rm` on the world's preference pairs), whose scoring is a batched forward pass.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
from pathlib import Path

import mlx.core as mx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.common import machine, time_pair  # noqa: E402
from llama2_mlx.generation import generate_batch_ids  # noqa: E402
from llama2_mlx.loading import demo_model_path, load  # noqa: E402
from llama2_mlx.world.skills import draw_task  # noqa: E402

VERIFIER = "llama2_mlx.world.verifier:reward"


def arithmetic_questions(count: int, seed: int = 5) -> list[str]:
    rng = random.Random(seed)
    return [draw_task("arithmetic", rng).question for _ in range(count)]


def batched_vs_sequential(model_path: Path, opts: argparse.Namespace) -> dict[str, float]:
    model, tok = load(model_path)
    dialog = [{"role": "user", "content": arithmetic_questions(1, seed=opts.seed)[0]}]
    settings = dict(max_tokens=opts.max_tokens, temperature=opts.temperature)
    tokens = {}

    def batched():
        answers, _ = generate_batch_ids(model, tok, [dialog], n_samples=opts.k, seed=0, **settings)
        tokens["batched"] = sum(len(a) for a in answers[0])
        return mx.array(tokens["batched"])

    def sequential():
        count = 0
        for k in range(opts.k):
            answers, _ = generate_batch_ids(model, tok, [dialog], n_samples=1, seed=k, **settings)
            count += len(answers[0][0])
        tokens["sequential"] = count
        return mx.array(count)

    batched_seconds, sequential_seconds = time_pair(batched, sequential, rounds=opts.rounds, repeats=3)
    return {"batched_tps": tokens["batched"] / batched_seconds, "sequential_tps": tokens["sequential"] / sequential_seconds,
            "batched_tokens": tokens["batched"], "sequential_tokens": tokens["sequential"],
            "batched_seconds": batched_seconds, "sequential_seconds": sequential_seconds}  # fmt: skip


def cli_run(args: list[str]) -> None:
    """Run `llama2-mlx ARGS` with this checkout's code (the console script imports the installed package; `-c` from
    this checkout's root imports this checkout's)."""
    run = subprocess.run([sys.executable, "-c", "from llama2_mlx.cli import main; main()", *args], cwd=ROOT,
                         capture_output=True, text=True)  # fmt: skip
    if run.returncode:
        raise SystemExit(f"llama2-mlx {args[0]} failed:\n{run.stdout}\n{run.stderr}")


def world_reward_model(model_path: Path, root: Path, opts: argparse.Namespace) -> Path:
    """A LoRA reward model on `model_path`, trained briefly on the world's preference pairs (its scores only need
    to cost what a reward model costs)."""
    sizes = "corpus=10,corpus_valid=10,train=10,valid=10,preferences=256,preferences_valid=10,prompts=10,heldout=10"
    cli_run(["world", "--out", str(root / "world"), "--sizes", sizes])
    cli_run(["train-rm", str(model_path), "--data", str(root / "world" / "preferences"), "--out", str(root / "rm"),
             "--iters", str(opts.iters), "--batch-size", "8", "--no-progress"])  # fmt: skip
    return root / "rm"


def command_run(
    model_path: Path, opts: argparse.Namespace, root: Path, reward: list[str]
) -> tuple[list[str], list[dict]]:
    prompts = root / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": q}) + "\n" for q in arithmetic_questions(opts.prompts)))
    out = root / f"rs{len(list(root.glob('rs*')))}"
    args = ["rejection-sample", str(model_path), "--prompts", str(prompts), "--out", str(out), *reward,
            "--k", str(opts.k), "--iterations", str(opts.iterations), "--max-tokens", str(opts.max_tokens),
            "--iters", str(opts.iters), "--batch-size", "8", "--lr", "1e-3", "--no-progress"]  # fmt: skip
    cli_run(args)
    return args, [
        json.loads((out / f"iter-{n}" / "summary.json").read_text()) for n in range(1, opts.iterations + 1)
    ]


def print_iterations(args: list[str], summaries: list[dict], tmp: str) -> None:
    print(f"\ncommand: llama2-mlx {' '.join(args).replace(tmp, '$TMP')}")
    print(
        "\n| iteration | samples | sampled tok/s | sampling s | scoring s | training s | total s | mean reward |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for s in summaries:
        seconds = s["seconds"]
        mean = sum(t["mean"] for t in s["temperatures"].values()) / len(s["temperatures"])
        print(f"| {s['iteration']} | {s['samples']} | {s['sampled_tokens_per_sec']:.1f} | {seconds['sampling']:.2f} | "
              f"{seconds['scoring']:.2f} | {seconds['training']:.2f} | {sum(seconds.values()):.2f} | {mean:.3f} |",
              flush=True)  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", type=Path, default=None, help="model folder (default: the demo model)")
    parser.add_argument("--k", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0, help="which arithmetic question part 1 samples")
    parser.add_argument("--prompts", type=int, default=32, help="prompts of the command run")
    parser.add_argument("--iterations", type=int, default=2)
    parser.add_argument("--iters", type=int, default=16, help="SFT steps per iteration")
    opts = parser.parse_args()
    model_path = opts.model or demo_model_path()
    model_args = load(model_path)[0].args

    print(f"machine: {machine()}")
    print(
        f"model: {model_path} (dim {model_args.dim}, {model_args.n_layers} layers, vocab {model_args.vocab_size})"
    )
    r = batched_vs_sequential(model_path, opts)
    print(f"\nK={opts.k} answers to one arithmetic question, up to {opts.max_tokens} tokens, temperature "
          f"{opts.temperature}, {opts.rounds} alternating rounds (medians)")  # fmt: skip
    print("\n| run | sampled tokens | seconds | tok/s |")
    print("|---|---|---|---|")
    print(
        f"| one batch, n_samples={opts.k} | {r['batched_tokens']} | {r['batched_seconds']:.3f} | {r['batched_tps']:.1f} |"
    )
    print(f"| {opts.k} sequential, n_samples=1 | {r['sequential_tokens']} | {r['sequential_seconds']:.3f} | "
          f"{r['sequential_tps']:.1f} |")  # fmt: skip
    ratio = r["batched_tps"] / r["sequential_tps"]
    print(f"\nbatched / sequential tokens/s: {ratio:.2f}x (target >= 4x: {'met' if ratio >= 4 else 'missed'})",
          flush=True)  # fmt: skip

    with tempfile.TemporaryDirectory() as tmp:
        print_iterations(*command_run(model_path, opts, Path(tmp), ["--reward-fn", VERIFIER]), tmp)
        rm = world_reward_model(model_path, Path(tmp), opts)
        print_iterations(*command_run(model_path, opts, Path(tmp), ["--reward-model", str(rm)]), tmp)


if __name__ == "__main__":
    main()
