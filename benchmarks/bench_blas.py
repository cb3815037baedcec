"""What the in-package OpenBLAS (llama2_mlx/openblas.py) buys on Linux: sft, pretrain, eval and the test suite,
each run in a child process with it (the default) and with LLAMA2_MLX_NO_OPENBLAS=1 (MLX's bundled BLAS), in one
run, alternating, with LD_PRELOAD removed so that only the package decides.

    python benchmarks/bench_blas.py [--skip-suite]

Workloads (small, on the demo model's shape and the synthetic world): LoRA sft of the demo model, 30 steps of
batch 8 x 256 tokens; pretraining the demo architecture from scratch, 30 steps of batch 8 x 256; eval on the
world's first 100 held-out dialogs (greedy); the whole pytest suite. Seconds are the child's wall time, imports
included.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import llama2_mlx  # noqa: E402, F401  (first: loads OpenBLAS before mlx.core, for this process's report)
from benchmarks.common import machine  # noqa: E402
from llama2_mlx.openblas import OPT_OUT  # noqa: E402

CLI = [sys.executable, str(ROOT / "cli.py")]


def workloads(work: Path, skip_suite: bool) -> dict[str, list[str]]:
    world = work / "world"
    subprocess.run([*CLI, "world", "--out", str(world)], check=True, capture_output=True)
    heldout = work / "heldout100.jsonl"
    heldout.write_text("".join((world / "heldout.jsonl").read_text().splitlines(keepends=True)[:100]))
    common = ["--iters", "30", "--batch-size", "8", "--seq-len", "256", "--no-progress"]
    jobs = {
        "sft (LoRA, 30 steps)": [*CLI, "sft", str(ROOT / "weights" / "demo"), "--data",
                                 str(world / "sft" / "train.jsonl"), "--out", str(work / "sft-{mode}"), "--lr", "1e-4",
                                 *common],
        "pretrain (30 steps)": [*CLI, "pretrain", "--config", str(ROOT / "examples" / "demo_params.json"), "--data",
                                str(world / "corpus.txt"), "--tokenizer", str(ROOT / "weights" / "demo"), "--out",
                                str(work / "pretrain-{mode}"), *common],
        "eval (100 dialogs)": [*CLI, "eval", "--prompts", str(heldout)],
    }  # fmt: skip
    if not skip_suite:
        jobs["test suite"] = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider"]
    return jobs


def run(command: list[str], openblas: bool) -> tuple[float, str]:
    environment = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", OPT_OUT)}
    if not openblas:
        environment[OPT_OUT] = "1"
    command = [part.replace("{mode}", "openblas" if openblas else "reference") for part in command]
    start = time.perf_counter()
    result = subprocess.run(command, cwd=ROOT, env=environment, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    last = (result.stdout.strip().splitlines() or [""])[-1]
    if result.returncode != 0:
        raise SystemExit(
            f"{' '.join(command)} failed (openblas={openblas}):\n{result.stdout}\n{result.stderr}"
        )
    return seconds, last


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--skip-suite", action="store_true", help="Leave out the test suite (the longest part)."
    )
    args = parser.parse_args()
    print(machine())
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, command in workloads(Path(tmp), args.skip_suite).items():
            for openblas in (True, False):
                seconds, last = run(command, openblas)
                results.setdefault(name, {})["openblas" if openblas else "reference"] = seconds
                print(
                    f"{name:24} {'OpenBLAS ' if openblas else 'reference'} {seconds:8.1f} s   {last}",
                    flush=True,
                )
    print("\n| workload | OpenBLAS s | MLX's bundled BLAS s | speed-up |\n|---|---|---|---|")
    for name, times in results.items():
        print(f"| {name} | {times['openblas']:.1f} | {times['reference']:.1f} | "
              f"{times['reference'] / times['openblas']:.2f}x |")  # fmt: skip
    print(json.dumps(results))


if __name__ == "__main__":
    main()
