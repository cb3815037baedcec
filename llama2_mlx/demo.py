"""`llama2-mlx demo`: the whole Llama 2 recipe in miniature, on the synthetic world, with the paper's tables.

Stages (each writes an ordinary folder under DIR, and a section of DIR/report.md; `from_stage` reruns from one):
1. pretrain: the world, a tokenizer, pretraining from random weights;
2. sft: supervised fine-tuning (masked, packed), held-out task accuracy against the pretrained model;
3. reward: two reward models (`--margin none` and `large`), accuracy per rating (Tables 8 and 28 in miniature);
4. rejection: two rejection-sampling iterations with the RM, the best-of-N curves (Figure 7), held-out reward;
5. gatt: Ghost Attention, instruction adherence by turn with and without it (Table 30 in miniature);
6. dpo: DPO on the world's preference pairs from the SFT model, held-out accuracy and reward.

The SFT data keeps each styled dialog's first turn only, and also shows the style instruction inside the user
message: so without GAtt the model follows a system style at turn 1 and forgets it later, and it can follow an
instruction appended to a user message, which is how GAtt samples its answers (the paper's setup).
"""

from __future__ import annotations

import json
import random
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llama2_mlx.errors import Llama2MLXError

STAGES = ("pretrain", "sft", "reward", "rejection", "gatt", "dpo")
REPORT = "report.md"


@dataclass(frozen=True)
class DemoSize:
    """How big each stage is: 'tiny' for the test suite, 'quick' for ten minutes on 2 cores, 'full' for the rest."""

    world: str  # `world --sizes`
    vocab: int
    model: dict[str, Any]  # params.json keys
    seq_len: int
    pretrain_epochs: float
    sft_iters: int
    rm_iters: int
    rs_prompts: int
    rs_k: int
    rs_iters: int  # fine-tuning steps per rejection-sampling iteration
    gatt_dialogs: int
    gatt_iters: int
    dpo_iters: int
    heldout: int  # held-out dialogs evaluated


SIZES: dict[str, DemoSize] = {
    "tiny": DemoSize(
        "corpus=1000,corpus_valid=40,train=400,valid=20,preferences=120,preferences_valid=40,prompts=16,heldout=40",
        400,
        {"dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "multiple_of": 32},
        128,
        1,
        60,
        10,
        8,
        2,
        4,
        8,
        4,
        4,
        40,
    ),
    "quick": DemoSize(
        "corpus=6000,corpus_valid=200,train=3000,valid=100,preferences=2000,preferences_valid=200,"
        "prompts=48,heldout=60",
        512,
        {"dim": 96, "n_layers": 3, "n_heads": 4, "n_kv_heads": 2, "multiple_of": 32},
        256,
        1,
        160,
        60,
        48,
        4,
        16,
        48,
        30,
        30,
        60,
    ),
    "full": DemoSize(
        "corpus=40000",
        512,
        {"dim": 128, "n_layers": 4, "n_heads": 4, "n_kv_heads": 2, "multiple_of": 32},
        256,
        2,
        1200,
        400,
        200,
        8,
        60,
        400,
        150,
        150,
        400,
    ),  # fmt: skip
}


class Demo:
    """The pipeline's state: its folder, size, seed, the report, and how to say things."""

    def __init__(self, out: Path, size: DemoSize, seed: int, say: Callable[[str], None]):
        self.out, self.size, self.seed, self.say = out, size, seed, say

    def path(self, *parts: str) -> Path:
        return self.out.joinpath(*parts)

    def section(self, stage: str, text: str) -> None:
        """Print a stage's tables and append them to report.md (replacing an older section of that stage)."""
        from llama2_mlx.fileio import write_text_atomic

        self.say(text)
        report = self.path(REPORT)
        kept = (
            report.read_text(encoding="utf-8").split("\n## ")
            if report.is_file()
            else ["# The recipe in miniature"]
        )
        kept = [kept[0]] + [s for s in kept[1:] if not s.startswith(f"{stage}:")]
        write_text_atomic(report, "\n## ".join(kept).rstrip() + f"\n\n## {stage}: {text.strip()}\n")

    def evaluate(self, model_dir: Path, adapter: Path | None = None):
        from llama2_mlx.evaluation import evaluate, read_heldout
        from llama2_mlx.loading import load

        model, tok = load(model_dir, adapter)
        return evaluate(model, tok, read_heldout(self.path("world", "heldout.jsonl")), max_tokens=40)

    def answer_loss(self, model_dir: Path) -> float:
        """Mean next-token loss on the answers of the held-out SFT dialogs (prompt tokens masked, as sft trains)."""
        from llama2_mlx.data import Batcher, DataReport, EncodeOptions, read_examples
        from llama2_mlx.loading import load
        from llama2_mlx.losses import next_token_loss

        model, tok = load(model_dir)
        examples = read_examples(
            self.path("world", "sft_demo", "valid.jsonl"), tok, EncodeOptions(), DataReport()
        )
        total = weight = 0.0
        for batch in Batcher(examples, 16, self.size.seq_len).once():
            batch_total, batch_weight = next_token_loss(model, *batch.inputs)
            total, weight = total + batch_total.item(), weight + batch_weight.item()
        return total / weight

    def mean_reward(self, model_dir: Path, adapter: Path | None = None) -> float:
        """Mean reward (the 'large' RM) of the model's greedy answers to the held-out first questions."""
        from llama2_mlx.generation import generate_batch
        from llama2_mlx.loading import load
        from llama2_mlx.reward_model import load_reward_model

        rm = load_reward_model(self.path("rm-large"))
        model, tok = load(model_dir, adapter)
        prompts = [
            json.loads(line)["messages"]
            for line in self.path("world", "heldout.jsonl").read_text().splitlines()
        ]
        answers = [a[0].strip() for a in generate_batch(model, tok, prompts, max_tokens=40)]
        scores = rm.score_batch(prompts, answers)
        return sum(scores) / len(scores)


def run_demo(out: str | Path, quick: bool = False, from_stage: str | None = None, seed: int = 0,
             size: str | None = None, say: Callable[[str], None] = print) -> Path:  # fmt: skip
    """Run the stages from `from_stage` (default: all) into `out`; returns the report's path."""
    out = Path(out)
    start = STAGES.index(from_stage) if from_stage else 0
    if from_stage and from_stage not in STAGES:
        raise Llama2MLXError(f"--from-stage {from_stage!r}: choose one of {', '.join(STAGES)}")
    if start == 0 and out.exists() and any(out.iterdir()):
        raise Llama2MLXError(
            f"{out}: already exists; choose a new --out, or --from-stage to rerun stages in it"
        )
    if start > 0 and not out.is_dir():
        raise Llama2MLXError(f"{out}: no demo run to continue from stage {from_stage}")
    demo = Demo(out, SIZES[size or ("quick" if quick else "full")], seed, say)
    clock = time.perf_counter()
    for stage in STAGES[start:]:
        tic = time.perf_counter()
        say(f"== stage {stage}")
        for name in STAGE_OUTPUTS[
            stage
        ]:  # a rerun replaces what the stage wrote before (DIR is the demo's own)
            target = demo.path(name)
            shutil.rmtree(target) if target.is_dir() else target.unlink(missing_ok=True)
        STAGE_FUNCTIONS[stage](demo)
        say(f"== stage {stage} done in {time.perf_counter() - tic:.0f} s")
    demo.section("timing", f"all stages from {STAGES[start]} took {time.perf_counter() - clock:.0f} s")
    return demo.path(REPORT)


def stage_pretrain(demo: Demo) -> None:
    from llama2_mlx.fileio import write_text_atomic
    from llama2_mlx.pretrain import PretrainConfig, run_pretrain
    from llama2_mlx.tokenizer_training import train_tokenizer
    from llama2_mlx.world import parse_sizes, write_world

    size = demo.size
    write_world(demo.path("world"), demo.seed, parse_sizes(size.world), force=True)
    _write_demo_sft_data(demo)
    train_tokenizer(demo.path("world", "corpus.txt"), size.vocab, demo.path("tokenizer"))
    params = demo.path("params.json")
    write_text_atomic(params, json.dumps({**size.model, "norm_eps": 1e-5, "vocab_size": -1}) + "\n")
    run_pretrain(PretrainConfig(
        config=str(params), data=str(demo.path("world", "corpus.txt")), tokenizer=str(demo.path("tokenizer")),
        out=str(demo.path("pretrained")), valid=str(demo.path("world", "corpus_valid.txt")), seq_len=size.seq_len,
        batch_size=32, lr=2e-3, warmup=min(30, 5), epochs=size.pretrain_epochs, eval_every=10_000,
        save_every=100_000, seed=demo.seed, progress=False,
    ), announce=demo.say)  # fmt: skip
    report = demo.evaluate(demo.path("pretrained"))
    curves = _loss_curves(demo, "pretrained", "pretrain_loss.png")
    demo.section(
        "pretrain", f"pretrained from random weights\n\n{_accuracy_table({'pretrained': report})}{curves}"
    )


def stage_sft(demo: Demo) -> None:
    from llama2_mlx.sft import SFTConfig, run_sft

    run_sft(SFTConfig(
        data=str(demo.path("world", "sft_demo")), out=str(demo.path("sft")), model=str(demo.path("pretrained")),
        full=True, pack=True, seq_len=demo.size.seq_len, batch_size=32, lr=3e-3, warmup=10,
        iters=demo.size.sft_iters, eval_every=10_000, save_every=100_000, seed=demo.seed, progress=False,
    ), announce=demo.say)  # fmt: skip
    reports = {"pretrained": demo.evaluate(demo.path("pretrained")), "sft": demo.evaluate(demo.path("sft"))}
    losses = {name: demo.answer_loss(demo.path(name)) for name in reports}
    accuracy = {name: report.overall.rate for name, report in reports.items()}
    if accuracy["sft"] != accuracy["pretrained"]:
        better, measure = accuracy["sft"] > accuracy["pretrained"], "held-out task accuracy"
    else:  # too small to answer anything right: the answer loss still shows the direction
        better, measure = losses["sft"] < losses["pretrained"], "held-out answer loss (accuracies are equal)"
    verdict = f"SFT {'beats' if better else 'does NOT beat'} the pretrained model on {measure}"
    loss_line = ", ".join(f"{name} {loss:.3f}" for name, loss in losses.items())
    curves = _loss_curves(demo, "sft", "sft_loss.png")
    demo.section("sft", f"supervised fine-tuning (masked, packed): {verdict}\n\n{_accuracy_table(reports)}{curves}\n\n"
                        f"Answer loss on held-out dialogs: {loss_line}")  # fmt: skip


def stage_reward(demo: Demo) -> None:
    from llama2_mlx.reward_training import RewardConfig, run_train_rm

    accuracies = {}
    for margin in ("none", "large"):
        _, _, accuracy = run_train_rm(RewardConfig(
            data=str(demo.path("world", "preferences")), out=str(demo.path(f"rm-{margin}")),
            model=str(demo.path("sft")), margin=margin, batch_size=32, lr=2e-3, rank=16,
            targets="q,k,v,o,gate,up,down", iters=demo.size.rm_iters, seq_len=demo.size.seq_len,
            eval_every=10_000, save_every=100_000, seed=demo.seed, progress=False,
        ), announce=demo.say)  # fmt: skip
        accuracies[margin] = accuracy
    buckets = sorted(set(accuracies["none"].buckets) | set(accuracies["large"].buckets))
    rows = ["| margin | " + " | ".join(b.replace("_", " ") for b in buckets) + " | all |",
            "|---|" + "---|" * (len(buckets) + 1)]  # fmt: skip
    for margin, report in accuracies.items():
        cells = [
            f"{report.buckets[b].summary()['accuracy']:.3f}" if b in report.buckets else "-" for b in buckets
        ]
        rows.append(f"| {margin} | " + " | ".join(cells) + f" | {report.accuracy:.3f} |")
    key = "significantly_better"
    helps = (key in accuracies["large"].buckets and key in accuracies["none"].buckets and
             accuracies["large"].buckets[key].summary()["accuracy"] > accuracies["none"].buckets[key].summary()["accuracy"])  # fmt: skip
    verdict = ("the large margin helps on significantly-better pairs" if helps else
               "the large margin does NOT help on significantly-better pairs at this size")  # fmt: skip
    demo.section(
        "reward", f"reward models, accuracy per rating on held-out pairs: {verdict}\n\n" + "\n".join(rows)
    )


def stage_rejection(demo: Demo) -> None:
    from llama2_mlx.rejection_sampling import RejectionConfig, run_rejection_sampling

    prompts = demo.path("world", "rs_prompts.jsonl")
    lines = demo.path("world", "prompts.jsonl").read_text().splitlines()[: demo.size.rs_prompts]
    prompts.write_text("\n".join(lines) + "\n")
    result = run_rejection_sampling(RejectionConfig(
        data=str(prompts), out=str(demo.path("rejection")), model=str(demo.path("sft")),
        reward_model=str(demo.path("rm-large")), k=demo.size.rs_k, iterations=2, temperature="0.8,1.2",
        max_tokens=40, iters=demo.size.rs_iters, batch_size=16, lr=5e-4, rank=16, seq_len=demo.size.seq_len,
        save_every=100_000, eval_every=10_000, seed=demo.seed, progress=False,
    ), announce=demo.say)  # fmt: skip
    rows = ["| iteration | " + " | ".join(f"mean T={t} | max T={t}" for t in result.summaries[0]["temperatures"])
            + " | selected |", "|---|" + "---|---|" * len(result.summaries[0]["temperatures"]) + "---|"]  # fmt: skip
    for s in result.summaries:
        cells = " | ".join(f"{r['mean']:.3f} | {r['max']:.3f}" for r in s["temperatures"].values())
        rows.append(f"| {s['iteration']} | {cells} | {s['selected_mean_reward']:.3f} |")
    first, last = (statistics_mean(s) for s in (result.summaries[0], result.summaries[-1]))
    adapter = demo.path("rejection", f"iter-{len(result.summaries)}", "adapter")
    sft_report, rs_report = demo.evaluate(demo.path("sft")), demo.evaluate(demo.path("sft"), adapter)
    held = {
        "sft": demo.mean_reward(demo.path("sft")),
        "rejection sampling": demo.mean_reward(demo.path("sft"), adapter),
    }
    verdict = ("rejection sampling raises the mean sample reward" if last > first else
               "rejection sampling does NOT raise the mean sample reward at this size")  # fmt: skip
    demo.section("rejection", f"rejection sampling, 2 iterations: {verdict}\n\n" + "\n".join(rows) +
                 "\n\nHeld-out mean reward (RM large): " + ", ".join(f"{k} {v:.3f}" for k, v in held.items()) +
                 f"\n\n{_accuracy_table({'sft': sft_report, 'rejection sampling': rs_report})}\n\n"
                 f"Figure 7: {', '.join(_figure7_copies(demo, len(result.summaries)))}")  # fmt: skip


def statistics_mean(summary: dict[str, Any]) -> float:
    values = [row["mean"] for row in summary["temperatures"].values()]
    return sum(values) / len(values)


def stage_gatt(demo: Demo) -> None:
    from llama2_mlx.gatt import run_gatt_data
    from llama2_mlx.sft import SFTConfig, run_sft
    from llama2_mlx.world.styles import STYLES

    instructions = demo.path("world", "gatt_instructions.txt")
    instructions.write_text("".join(f"{style.instructions[0]}\n" for style in STYLES.values()))
    dialogs = demo.path("world", "gatt_dialogs.jsonl")
    rows = [json.loads(line) for line in demo.path("world", "sft", "train.jsonl").read_text().splitlines()]
    multi = [r for r in rows if r["messages"][0]["role"] != "system" and len(r["messages"]) >= 4]
    dialogs.write_text("".join(json.dumps(r) + "\n" for r in multi[: demo.size.gatt_dialogs]))
    data = demo.path("gatt-data.jsonl")
    run_gatt_data(demo.path("sft"), dialogs, instructions, data, max_tokens=40, temperature=0.6, top_p=0.9,
                  seed=demo.seed, batch_size=32)  # fmt: skip
    run_sft(SFTConfig(
        data=str(data), out=str(demo.path("gatt")), model=str(demo.path("sft")), gatt=True, rank=16,
        targets="q,k,v,o,gate,up,down", seq_len=demo.size.seq_len, batch_size=16, lr=1e-3,
        iters=demo.size.gatt_iters, eval_every=10_000, save_every=100_000, seed=demo.seed, progress=False,
    ), announce=demo.say)  # fmt: skip
    without, with_gatt = demo.evaluate(demo.path("sft")), demo.evaluate(demo.path("sft"), demo.path("gatt"))
    turns = sorted(set(without.style_turns) | set(with_gatt.style_turns))
    table = ["| adherence at turn | " + " | ".join(map(str, turns)) + " |", "|---|" + "---|" * len(turns)]
    for name, report in (("without GAtt", without), ("with GAtt", with_gatt)):
        table.append(f"| {name} | " + " | ".join(f"{report.style_turns[t].rate:.2f}" for t in turns) + " |")
    later = [t for t in turns if t >= 3] or turns[-1:]
    helps = sum(with_gatt.style_turns[t].rate for t in later) > sum(
        without.style_turns[t].rate for t in later
    )
    verdict = (
        "GAtt raises adherence at turn 3+"
        if helps
        else "GAtt does NOT raise adherence at turn 3+ at this size"
    )
    _plot_adherence(demo.path("adherence.png"), turns, without, with_gatt)
    demo.section("gatt", f"Ghost Attention (Table 30 in miniature): {verdict}\n\n" + "\n".join(table) +
                 "\n\nadherence.png")  # fmt: skip


def stage_dpo(demo: Demo) -> None:
    from llama2_mlx.dpo import DPOConfig, run_dpo

    _, _, metrics = run_dpo(DPOConfig(
        data=str(demo.path("world", "preferences")), out=str(demo.path("dpo")), model=str(demo.path("sft")),
        iters=demo.size.dpo_iters, batch_size=16, lr=5e-4, rank=16, seq_len=demo.size.seq_len,
        eval_every=10_000, save_every=100_000, seed=demo.seed, progress=False,
    ), announce=demo.say)  # fmt: skip
    reports = {
        "sft": demo.evaluate(demo.path("sft")),
        "dpo": demo.evaluate(demo.path("sft"), demo.path("dpo")),
    }
    held = {
        "sft": demo.mean_reward(demo.path("sft")),
        "dpo": demo.mean_reward(demo.path("sft"), demo.path("dpo")),
    }
    accuracy = f"{metrics['val_accuracy']:.3f}" if metrics else "-"
    demo.section("dpo", f"DPO from the SFT model: implicit-reward accuracy on held-out pairs {accuracy}; held-out "
                 "mean reward (RM large): " + ", ".join(f"{k} {v:.3f}" for k, v in held.items()) +
                 f"\n\n{_accuracy_table(reports)}")  # fmt: skip


STAGE_OUTPUTS: dict[str, tuple[str, ...]] = {
    "pretrain": ("world", "tokenizer", "params.json", "pretrained", "pretrain_loss.png"), "sft": ("sft", "sft_loss.png"),
    "reward": ("rm-none", "rm-large"), "rejection": ("rejection", "figure7_iter1.png", "figure7_iter2.png"), "gatt": ("gatt", "gatt-data.jsonl", "adherence.png"),
    "dpo": ("dpo",),
}  # fmt: skip
STAGE_FUNCTIONS: dict[str, Callable[[Demo], None]] = {
    "pretrain": stage_pretrain, "sft": stage_sft, "reward": stage_reward, "rejection": stage_rejection,
    "gatt": stage_gatt, "dpo": stage_dpo,
}  # fmt: skip


def _write_demo_sft_data(demo: Demo) -> None:
    """The world's SFT dialogs with each styled dialog cut to its first turn, and each also shown with its style
    instruction inside the user message (see the module docstring)."""
    folder = demo.path("world", "sft_demo")
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(demo.seed)
    for name in ("train.jsonl", "valid.jsonl"):
        rows = []
        for line in demo.path("world", "sft", name).read_text().splitlines():
            messages = json.loads(line)["messages"]
            if messages[0]["role"] == "system":
                system, user, answer = messages[:3]
                rows.append({"messages": [system, user, answer]})
                inline = f"{user['content']} {system['content']}" if rng.random() < 0.5 else user["content"]
                rows.append({"messages": [{"role": "user", "content": inline}, answer]})
            else:
                rows.append({"messages": messages})
        (folder / name).write_text("".join(json.dumps(row) + "\n" for row in rows))


def _accuracy_table(reports: dict[str, Any]) -> str:
    skills = sorted(set().union(*(r.skills for r in reports.values())))
    lines = ["| task accuracy | " + " | ".join(skills) + " | all |", "|---|" + "---|" * (len(skills) + 1)]
    for name, report in reports.items():
        cells = [f"{report.skills[s].rate:.3f}" if s in report.skills else "-" for s in skills]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {report.overall.rate:.3f} |")
    return "\n".join(lines)


def _loss_curves(demo: Demo, run: str, name: str) -> str:
    """DIR/`name`: the loss curves of a stage's run folder (matplotlib is optional: without it, no PNG)."""
    from llama2_mlx.plot import plot_run

    try:
        plot_run(demo.path(run), demo.path(name))
    except Llama2MLXError as error:  # no matplotlib, or no loss records
        return f"\n\n(no loss curves: {error})"
    return f"\n\nLoss curves: {name}"


def _figure7_copies(demo: Demo, iterations: int) -> list[str]:
    """The best-of-N plots of each rejection-sampling iteration, copied beside report.md."""
    names = []
    for n in range(1, iterations + 1):
        source = demo.path("rejection", f"iter-{n}", "figure7.png")
        if source.is_file():
            shutil.copyfile(source, demo.path(f"figure7_iter{n}.png"))
            names.append(f"figure7_iter{n}.png")
    return names


def _plot_adherence(path: Path, turns: list[int], without, with_gatt) -> None:
    try:
        import matplotlib
    except ImportError:
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(5, 3.5))
    for name, report in (("without GAtt", without), ("with GAtt", with_gatt)):
        axes.plot(turns, [report.style_turns[t].rate for t in turns], "o-", label=name)
    axes.set_xlabel("turn")
    axes.set_ylabel("instruction adherence")
    axes.set_ylim(0, 1.05)
    axes.legend()
    axes.grid(alpha=0.3)
    figure.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(figure)
