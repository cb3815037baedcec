"""Iterative rejection-sampling fine-tuning, the paper's RLHF V1-V4 (`llama2-mlx rejection-sample`).

Each iteration samples K answers per prompt from the latest policy (every prompt batch x K rows through the one
batched generation loop), scores them (a reward model, a helpfulness + safety pair with the paper's rule, or a
Python function for verifiable tasks), keeps the best answer per prompt from the pool of ALL iterations so far
(the paper's fix for regressions; `pool="latest"` is V1-V3), and fine-tunes on the selected set with the SFT
recipe (`sft.run_sft`; only the new answer is trained). The next iteration samples from the new adapter.

Each iteration is built in a hidden temporary folder and renamed to DIR/iter-N when complete, so an interrupted
iteration leaves nothing half-written and `--resume` continues after the last finished one.
"""

from __future__ import annotations

import json
import math
import shutil
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from math import comb
from pathlib import Path
from typing import Any

from llama2_mlx.errors import Llama2MLXError
from llama2_mlx.finetune import FineTuneConfig
from llama2_mlx.prompts import PromptRow, read_prompts
from llama2_mlx.rewards import RewardFlags, reward_source

REPORT_FILE = "report.md"


@dataclass
class RejectionConfig(FineTuneConfig, RewardFlags):
    """Every field is a flag of `llama2-mlx rejection-sample` and a key of its -c config.yaml."""

    data: str = field(
        metadata={"flag": "prompts", "help": 'Prompts: .jsonl of {"prompt"} or {"messages"} (ending with a user '
                                             'turn), optionally "safety": true.'}
    )  # fmt: skip
    out: str = field(metadata={"help": "Output folder: iter-N/ per iteration, report.md."})
    adapter: str | None = field(
        default=None, metadata={"help": "The starting policy's LoRA adapter (e.g. from sft); training continues it."}
    )  # fmt: skip
    student: str | None = field(
        default=None,
        metadata={
            "help": "Distillation: fine-tune this model on the selected answers; sampling stays with MODEL."
        },
    )
    k: int = field(
        default=8, metadata={"min": 1, "help": "Samples per prompt (per temperature) in each iteration."}
    )
    iterations: int = field(default=2, metadata={"min": 1, "help": "Rejection-sampling iterations."})
    temperature: str = field(
        default="1.0",
        metadata={
            "help": "Sampling temperature, or several comma-separated (K samples at each; paper: 1.2-1.3)."
        },
    )
    top_p: float = field(
        default=1.0, metadata={"above": 0, "max": 1, "help": "Nucleus sampling mass (1.0: off)."}
    )
    max_tokens: int = field(default=128, metadata={"min": 1, "help": "Longest sampled answer."})
    pool: str = field(
        default="all",
        metadata={"help": "Select the best answer among the samples of all iterations so far, or the latest only.",
                  "choices": ["all", "latest"]},
    )  # fmt: skip
    sample_batch: int = field(default=16, metadata={"min": 1, "help": "Prompts sampled together (x K rows)."})
    pack: bool = field(default=False, metadata={"help": "Pack the selected examples into --seq-len rows."})

    def __post_init__(self) -> None:
        super().__post_init__()
        _ = self.temperatures  # parsed here so a bad list fails before anything runs
        self.check_rewards()

    @property
    def temperatures(self) -> list[float]:
        try:
            values = [float(t) for t in str(self.temperature).split(",") if t.strip()]
        except ValueError:
            raise Llama2MLXError(
                f"temperature must be numbers separated by commas, got {self.temperature!r}"
            ) from None
        if not values or not all(math.isfinite(t) and t > 0 for t in values):
            raise Llama2MLXError(f"every temperature must be a positive number, got {self.temperature!r}")
        return values


# ---------------------------------------------------------------- statistics


def expected_order_statistic(values: Sequence[float], n: int, j: int) -> float:
    """E[the j-th smallest of n values drawn without replacement from `values`] (exact, 1 <= j <= n <= len)."""
    ordered = sorted(values)
    total = len(ordered)
    return sum(v * comb(i, j - 1) * comb(total - 1 - i, n - j) for i, v in enumerate(ordered)) / comb(
        total, n
    )


def best_of_n_curve(rewards: Sequence[Sequence[float]]) -> dict[str, list[float]]:
    """The paper's Figure 7 from K samples per prompt: for N = 1..K, the expected max and median reward among N
    samples, averaged over prompts (exact expectations over every N-subset of the K samples)."""
    k = min(len(r) for r in rewards)
    curve: dict[str, list[float]] = {"n": list(range(1, k + 1)), "max": [], "median": []}
    for n in curve["n"]:
        maxes = [expected_order_statistic(r, n, n) for r in rewards]
        middle = [(n + 1) // 2, n // 2 + 1]  # one order statistic for odd n, the mean of two for even n
        medians = [sum(expected_order_statistic(r, n, j) for j in middle) / 2 for r in rewards]
        curve["max"].append(statistics.fmean(maxes))
        curve["median"].append(statistics.fmean(medians))
    return curve


@dataclass
class Sample:
    prompt: int  # index into the prompt list
    answer: str
    reward: float
    temperature: float
    iteration: int
    finished: bool  # ended with EOS (not cut at --max-tokens)

    def record(self, prompts: Sequence[PromptRow]) -> dict[str, Any]:
        return {**prompts[self.prompt].record(), "answer": self.answer, "reward": self.reward,
                "temperature": self.temperature, "iteration": self.iteration, "finished": self.finished}  # fmt: skip


def select_best(pool: Sequence[Sample], n_prompts: int) -> list[Sample]:
    """The highest-reward sample of each prompt (ties: the earliest); empty answers are never selected (there is
    nothing to train on), and prompts without a usable sample are left out."""
    best: dict[int, Sample] = {}
    for sample in pool:
        if not sample.answer:
            continue
        if sample.prompt not in best or sample.reward > best[sample.prompt].reward:
            best[sample.prompt] = sample
    return [best[i] for i in range(n_prompts) if i in best]


def iteration_stats(samples: Sequence[Sample], selected: Sequence[Sample], n_prompts: int) -> dict[str, Any]:
    """Mean, median and max reward over each prompt's K samples (averaged over prompts), the selected set's mean
    reward, and the Figure 7 curve, per temperature."""
    stats: dict[str, Any] = {"selected_mean_reward": statistics.fmean(s.reward for s in selected)}
    by_temperature: dict[str, Any] = {}
    for temperature in sorted({s.temperature for s in samples}):
        rewards: list[list[float]] = [[] for _ in range(n_prompts)]
        for sample in samples:
            if sample.temperature == temperature:
                rewards[sample.prompt].append(sample.reward)
        rewards = [r for r in rewards if r]
        by_temperature[str(temperature)] = {
            "mean": statistics.fmean(statistics.fmean(r) for r in rewards),
            "median": statistics.fmean(statistics.median(r) for r in rewards),
            "max": statistics.fmean(max(r) for r in rewards),
            "best_of_n": best_of_n_curve(rewards),
        }
    stats["temperatures"] = by_temperature
    stats["best_temperature"] = max(by_temperature, key=lambda t: by_temperature[t]["max"])
    return stats


# ---------------------------------------------------------------- the loop


@dataclass
class RejectionResult:
    status: str  # "finished" | "interrupted"
    summaries: list[dict[str, Any]] = field(default_factory=list)  # one per iteration run now or before


def finished_iterations(out: Path) -> list[int]:
    """Numbers of the complete iterations in `out` (iter-N folders are renamed into place only when complete)."""
    numbers = [
        int(p.name[5:]) for p in out.glob("iter-*") if p.name[5:].isdigit() and (p / "summary.json").is_file()
    ]
    return sorted(numbers)


def run_rejection_sampling(
    config: RejectionConfig, announce: Callable[[str], None] | None = None
) -> RejectionResult:
    """Run `config.iterations` rejection-sampling iterations into `config.out` (see the module docstring).

    Everything is checked (flags, models, tokenizers, prompts, the reward function) before anything is written.
    """
    from llama2_mlx.finetune import claim_job_folder, meaning_fields
    from llama2_mlx.loading import demo_model_path, load
    from llama2_mlx.model_folder import read_config

    say = announce or (lambda line: None)
    model_path = Path(config.model) if config.model else demo_model_path()
    out = Path(config.out)
    if config.student is not None:
        read_config(Path(config.student))  # a model folder, checked now rather than after the first sampling

    policy, tokenizer = load(model_path, adapter=config.adapter)
    prompts = read_prompts(Path(config.data), tokenizer, policy.args.max_seq_len, config.max_tokens,
                           config.skip_bad_lines)  # fmt: skip
    rewards = reward_source(config, model_path, policy, tokenizer, prompts, say)
    # every check has passed: claim DIR (locked while the run lasts), then write
    resumable = {"iterations", "sample_batch", "score_batch"}
    with claim_job_folder(config, "rs", model_path, meaning_fields(config, resumable)) as run:
        run.callback.on_start(0)
        done = finished_iterations(out)
        pool = [s for n in done for s in _read_samples(out / f"iter-{n}" / "samples.jsonl")]
        summaries = [json.loads((out / f"iter-{n}" / "summary.json").read_text()) for n in done]
        result = RejectionResult("finished", summaries)
        for iteration in range(len(done) + 1, config.iterations + 1):
            if iteration > 1 and config.student is None:  # sample from the policy the last iteration trained
                del policy
                policy, _ = load(model_path, adapter=out / f"iter-{iteration - 1}" / "adapter")
            summary = _run_iteration(
                config, iteration, model_path, policy, tokenizer, prompts, rewards, pool, say
            )
            if summary is None:
                result.status = "interrupted"
                break
            result.summaries.append(summary)
            _append_report(out, summary)
    return result


def sample_answers(
    policy, tokenizer, prompts: Sequence[PromptRow], config: RejectionConfig, iteration: int,
    progress: Callable[[int], None] | None = None,
) -> tuple[list[Sample], list[list[int]], int]:  # fmt: skip
    """K answers per prompt at each temperature, `sample_batch` prompts x K rows per batched generation.

    Returns (samples without rewards, their token ids with EOS when finished, sampled tokens)."""
    from llama2_mlx.generation import generate_batch_ids

    samples, answer_ids, tokens = [], [], 0
    for start in range(0, len(prompts), config.sample_batch):
        chunk = prompts[start : start + config.sample_batch]
        for t_index, temperature in enumerate(config.temperatures):
            seed = config.seed * 1_000_003 + iteration * 10_007 + start * 101 + t_index
            ids, stats = generate_batch_ids(
                policy, tokenizer, [p.messages for p in chunk], n_samples=config.k, max_tokens=config.max_tokens,
                temperature=temperature, top_p=config.top_p, seed=seed,
            )  # fmt: skip
            tokens += stats.generation_tokens
            for offset, answers in enumerate(ids):
                for answer in answers:
                    finished = len(answer) < config.max_tokens
                    samples.append(Sample(start + offset, tokenizer.decode(answer).strip(), 0.0, temperature,
                                          iteration, finished))  # fmt: skip
                    answer_ids.append(answer + [tokenizer.eos_id] * finished)
        if progress is not None:
            progress(len(chunk))
    return samples, answer_ids, tokens


def _run_iteration(config, iteration, model_path, policy, tokenizer, prompts, rewards, pool, say):
    """One iteration into a hidden folder renamed to iter-N when complete; None if training was interrupted."""
    from llama2_mlx.fileio import write_text_atomic
    from llama2_mlx.sft import SFTConfig, run_sft

    out = Path(config.out)
    tmp = out / f".iter-{iteration}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)  # what a killed run left
    tmp.mkdir()
    try:
        clock = time.perf_counter()
        done = [0]

        def progress(count: int) -> None:
            done[0] += count
            say(
                f"iteration {iteration}: sampled {done[0]}/{len(prompts)} prompts x {config.k * len(config.temperatures)}"
            )

        samples, answer_ids, tokens = sample_answers(policy, tokenizer, prompts, config, iteration, progress)
        sampling = time.perf_counter() - clock
        clock = time.perf_counter()
        scores = rewards([prompts[s.prompt] for s in samples], [s.answer for s in samples], answer_ids)
        for sample, reward in zip(samples, scores, strict=True):
            sample.reward = reward
        scoring = time.perf_counter() - clock
        pool.extend(samples)
        selected = select_best(pool if config.pool == "all" else samples, len(prompts))
        if not selected:
            raise Llama2MLXError(
                f"iteration {iteration}: every sampled answer is empty; nothing to fine-tune on"
            )
        _write_jsonl(
            tmp / "samples.jsonl", [{"prompt_index": s.prompt, **s.record(prompts)} for s in samples]
        )
        _write_jsonl(tmp / "selected.jsonl", [
            {"messages": prompts[s.prompt].dialog(s.answer), "reward": s.reward, "iteration": s.iteration}
            for s in selected
        ])  # fmt: skip
        stats = iteration_stats(samples, selected, len(prompts))
        say(f"iteration {iteration}: mean reward {_mean_over_temperatures(stats, 'mean'):.4f}, "
            f"selected {stats['selected_mean_reward']:.4f}; fine-tuning on {len(selected)} answers")  # fmt: skip

        clock = time.perf_counter()
        common = {name: getattr(config, name) for name in FineTuneConfig.__dataclass_fields__}
        sft = SFTConfig(**{**common, "data": str(tmp / "selected.jsonl"), "out": str(tmp / "adapter"),
                           "model": config.student or str(model_path), "resume": False, "gatt": True,
                           "pack": config.pack, "adapter": None if config.student else config.adapter})  # fmt: skip
        trained, _ = run_sft(sft, announce=lambda line: say(f"iteration {iteration}: {line}"))
        if trained.status != "finished":
            shutil.rmtree(tmp, ignore_errors=True)
            return None
        training = time.perf_counter() - clock
        summary = {
            "iteration": iteration, "prompts": len(prompts), "samples": len(samples), "pool": config.pool,
            **stats, "train_loss": trained.train_loss,
            "seconds": {"sampling": sampling, "scoring": scoring, "training": training},
            "sampled_tokens_per_sec": tokens / sampling if sampling else 0.0,
        }  # fmt: skip
        write_text_atomic(tmp / "summary.json", json.dumps(summary, indent=2) + "\n")
        _plot_best_of_n(stats, tmp / "figure7.png", iteration)
        tmp.rename(out / f"iter-{iteration}")
        return summary
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _mean_over_temperatures(stats: dict[str, Any], key: str) -> float:
    return statistics.fmean(t[key] for t in stats["temperatures"].values())


def _read_samples(path: Path) -> list[Sample]:
    samples = []
    for line in path.read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        samples.append(Sample(row["prompt_index"], row["answer"], row["reward"], row["temperature"],
                              row["iteration"], row["finished"]))  # fmt: skip
    return samples


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")


def _plot_best_of_n(stats: dict[str, Any], path: Path, iteration: int) -> None:
    """The paper's Figure 7 (max and median reward among N samples) as a PNG, one colour per temperature."""
    try:
        import matplotlib
    except ImportError:  # an optional extra: the numbers are in summary.json and report.md anyway
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6, 4))
    for temperature, curve in stats["temperatures"].items():
        points = curve["best_of_n"]
        line = axes.plot(points["n"], points["max"], "o-", label=f"max, T={temperature}")[0]
        axes.plot(
            points["n"], points["median"], "--", color=line.get_color(), label=f"median, T={temperature}"
        )
    axes.set_xlabel("N samples")
    axes.set_ylabel("reward")
    axes.set_title(f"iteration {iteration}: best of N (Figure 7)")
    axes.legend(fontsize=8)
    axes.grid(alpha=0.3)
    figure.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(figure)


def report_section(summary: dict[str, Any]) -> str:
    """Markdown for one iteration: rewards per temperature, then the best-of-N curve."""
    lines = [f"## Iteration {summary['iteration']}", "",
             f"{summary['prompts']} prompts, {summary['samples']} samples, pool: {summary['pool']}; selected set mean "
             f"reward {summary['selected_mean_reward']:.4f}; seconds: " +
             ", ".join(f"{k} {v:.1f}" for k, v in summary["seconds"].items()), "",
             "| temperature | mean | median | max (over K) |", "|---|---|---|---|"]  # fmt: skip
    for temperature, row in summary["temperatures"].items():
        lines.append(f"| {temperature} | {row['mean']:.4f} | {row['median']:.4f} | {row['max']:.4f} |")
    lines += ["", f"Best temperature (highest max reward): {summary['best_temperature']}", "",
              "Best of N (Figure 7): expected max / median reward among N samples", "",
              "| N | " + " | ".join(f"max T={t} | median T={t}" for t in summary["temperatures"]) + " |",
              "|---|" + "---|---|" * len(summary["temperatures"])]  # fmt: skip
    curves = [row["best_of_n"] for row in summary["temperatures"].values()]
    for i, n in enumerate(curves[0]["n"]):
        lines.append(
            f"| {n} | " + " | ".join(f"{c['max'][i]:.4f} | {c['median'][i]:.4f}" for c in curves) + " |"
        )
    return "\n".join(lines) + f"\n\n![Figure 7](iter-{summary['iteration']}/figure7.png)\n\n"


def _append_report(out: Path, summary: dict[str, Any]) -> None:
    from llama2_mlx.fileio import write_text_atomic

    path = out / REPORT_FILE
    previous = path.read_text(encoding="utf-8") if path.is_file() else "# Rejection sampling\n\n"
    write_text_atomic(path, previous + report_section(summary))
