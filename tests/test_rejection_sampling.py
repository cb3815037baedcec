"""Rejection-sampling fine-tuning: selection, statistics, the safety rule, the loop, resume and bad input."""

from __future__ import annotations

import json
import os
import signal
import statistics
from itertools import combinations
from pathlib import Path

import pytest
from click.testing import CliRunner

from llama2_mlx.cli import cli
from llama2_mlx.errors import Llama2MLXError
from llama2_mlx.loading import demo_model_path
from llama2_mlx.rejection_sampling import (
    Sample,
    best_of_n_curve,
    expected_order_statistic,
    iteration_stats,
    select_best,
)
from llama2_mlx.rewards import combine_safety
from llama2_mlx.trainer import MetricsFile
from tests.conftest import arithmetic_prompts


def sample(prompt: int, reward: float, iteration: int, answer: str = "") -> Sample:
    return Sample(prompt, answer or f"p{prompt} r{reward} i{iteration}", reward, 1.0, iteration, True)


def test_pool_all_keeps_the_best_of_every_iteration_and_latest_only_the_last():
    first = [sample(0, 0.9, 1), sample(0, 0.1, 1), sample(1, 0.2, 1), sample(1, 0.3, 1)]
    second = [sample(0, 0.5, 2), sample(0, 0.4, 2), sample(1, 0.8, 2), sample(1, 0.8, 2, "later tie")]
    best_all = select_best(first + second, 2)
    assert [(s.prompt, s.reward, s.iteration) for s in best_all] == [(0, 0.9, 1), (1, 0.8, 2)]
    assert best_all[1].answer != "later tie"  # ties keep the earliest sample
    best_latest = select_best(second, 2)
    assert [(s.prompt, s.reward, s.iteration) for s in best_latest] == [(0, 0.5, 2), (1, 0.8, 2)]
    assert select_best([sample(1, 0.3, 1)], 3)[0].prompt == 1  # prompts without samples are left out
    empty = Sample(0, "", 5.0, 1.0, 1, True)
    assert select_best([empty, sample(0, 0.1, 1)], 1)[0].reward == 0.1  # an empty answer is never selected


def test_safety_rule_on_hand_made_scores():
    # helpfulness 2.0 unless the prompt is a safety prompt or sigmoid(safety) < 0.15 (safety < -1.7346)
    assert combine_safety(2.0, 0.5, False) == 2.0
    assert combine_safety(2.0, 0.5, True) == 0.5
    assert combine_safety(2.0, -1.8, False) == -1.8
    assert combine_safety(2.0, -1.7, False) == 2.0
    assert combine_safety(2.0, -1.7, False, threshold=0.2) == -1.7


def test_best_of_n_statistics_equal_brute_force_over_subsets():
    values = [0.3, -1.0, 2.0, 0.7, 0.7]
    for n in range(1, 6):
        subsets = list(combinations(values, n))
        assert expected_order_statistic(values, n, n) == pytest.approx(statistics.fmean(map(max, subsets)))
        assert expected_order_statistic(values, n, 1) == pytest.approx(statistics.fmean(map(min, subsets)))
    curve = best_of_n_curve([[1, 2, 3, 4], [0, 0, 0, 8]])
    # prompt 1: E[max of 2] = (2+3+4+3+4+4)/6; median of 2 = mean of the pair = 2.5
    # prompt 2: E[max of 2] = 8 * 3/6; median of 2 = 8/2 * 3/6
    assert curve["n"] == [1, 2, 3, 4]
    assert curve["max"][1] == pytest.approx((20 / 6 + 4) / 2)
    assert curve["median"][1] == pytest.approx((2.5 + 2) / 2)
    assert curve["max"][0] == pytest.approx(curve["median"][0]) == pytest.approx((2.5 + 2) / 2)
    assert curve["median"][2] == pytest.approx((2.5 + 0) / 2)  # median of 3 of [0,0,0,8] is always 0
    assert curve["max"][3] == pytest.approx((4 + 8) / 2)


def test_iteration_stats_per_temperature():
    samples = [Sample(0, "a", r, t, 1, True) for r, t in [(1, 0.5), (3, 0.5), (0, 1.2), (5, 1.2)]]
    samples += [Sample(1, "b", r, t, 1, True) for r, t in [(2, 0.5), (2, 0.5), (1, 1.2), (1, 1.2)]]
    stats = iteration_stats(samples, select_best(samples, 2), 2)
    assert stats["temperatures"]["0.5"]["mean"] == pytest.approx((2 + 2) / 2)
    assert stats["temperatures"]["1.2"]["max"] == pytest.approx((5 + 1) / 2)
    assert stats["selected_mean_reward"] == pytest.approx((5 + 2) / 2)
    assert stats["best_temperature"] == "1.2"


def rejection_sample(prompts: Path, out: Path, *extra: str):
    args = ["rejection-sample", str(demo_model_path()), "--prompts", str(prompts), "--out", str(out),
            "--reward-fn", "llama2_mlx.world.verifier:reward", "--k", "8", "--max-tokens", "16",
            "--batch-size", "8", "--lr", "1e-3", "--no-progress", *extra]  # fmt: skip
    return CliRunner().invoke(cli, args)


def summaries(out: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(out.glob("iter-*/summary.json"))]


def test_verifiable_reward_rises_over_three_iterations(tmp_path):
    out = tmp_path / "rs"
    result = rejection_sample(
        arithmetic_prompts(tmp_path / "p.jsonl", 16), out, "--iterations", "3", "--iters", "15"
    )
    assert result.exit_code == 0, result.output
    means = [s["temperatures"]["1.0"]["mean"] for s in summaries(out)]
    assert means[2] > means[0], f"mean sample reward by iteration: {means}"
    for n in (1, 2, 3):
        folder = out / f"iter-{n}"
        assert {p.name for p in folder.iterdir()} >= {
            "samples.jsonl",
            "selected.jsonl",
            "adapter",
            "summary.json",
        }
        assert len((folder / "samples.jsonl").read_text().splitlines()) == 16 * 8
    assert "## Iteration 3" in (out / "report.md").read_text()
    # selected.jsonl trains as is with sft (--gatt: only the new answer, as the iteration did)
    selected = json.loads((out / "iter-3" / "selected.jsonl").read_text().splitlines()[0])
    assert selected["messages"][-1]["role"] == "assistant" and selected["reward"] >= 0
    chat = CliRunner().invoke(cli, ["generate", str(demo_model_path()), "--adapter", str(out / "iter-3" / "adapter"),
                                    "--prompt", "What is 2 + 2?", "--temperature", "0", "--max-tokens", "12"])  # fmt: skip
    assert chat.exit_code == 0 and "=" in chat.output


def test_interrupted_iteration_leaves_nothing_and_resume_gives_the_same_selection(tmp_path, monkeypatch):
    prompts = arithmetic_prompts(tmp_path / "p.jsonl", 6)
    flags = ("--iterations", "2", "--iters", "4", "--report-every", "1")
    straight = tmp_path / "straight"
    assert rejection_sample(prompts, straight, *flags).exit_code == 0

    resumed = tmp_path / "resumed"
    report = MetricsFile.on_report
    calls = []

    def ctrl_c_in_the_second_iteration(self, record):
        report(self, record)
        calls.append(record)
        if "iter-2" in str(self.path) and record.get("step") == 2:
            os.kill(os.getpid(), signal.SIGINT)

    with monkeypatch.context() as patch:
        patch.setattr(MetricsFile, "on_report", ctrl_c_in_the_second_iteration)
        interrupted = rejection_sample(prompts, resumed, *flags)
    assert interrupted.exit_code == 130, interrupted.output
    assert sorted(p.name for p in resumed.iterdir()) == ["iter-1", "report.md", "rs_config.json"]
    changed = rejection_sample(prompts, resumed, *flags, "--k", "4", "--resume")
    assert changed.exit_code == 1 and "k (8 -> 4)" in changed.output
    finished = rejection_sample(prompts, resumed, *flags, "--resume")
    assert finished.exit_code == 0, finished.output
    for n in (1, 2):
        for name in ("samples.jsonl", "selected.jsonl"):
            assert (straight / f"iter-{n}" / name).read_text() == (resumed / f"iter-{n}" / name).read_text()


def test_bad_input_fails_before_sampling(tmp_path):
    good = arithmetic_prompts(tmp_path / "p.jsonl", 2)
    cases = []
    (tmp_path / "empty.jsonl").write_text("\n")
    cases.append((["--prompts", str(tmp_path / "empty.jsonl")], "no usable examples"))
    (tmp_path / "bad.jsonl").write_text('{"prompt": "What is 1 + 1?"}\n{"answer": "x"}\n')
    cases.append((["--prompts", str(tmp_path / "bad.jsonl")], f"{tmp_path / 'bad.jsonl'}:2:"))
    (tmp_path / "long.jsonl").write_text(json.dumps({"prompt": "What is 1 + 1? " * 200}) + "\n")
    cases.append((["--prompts", str(tmp_path / "long.jsonl")], "fit in the context"))
    cases.append((["--prompts", str(good), "--k", "0"], "k (--k) must be at least 1, got 0"))
    cases.append((["--prompts", str(good), "--temperature", "0.5,x"], "temperature must be numbers"))
    (tmp_path / "not_float.py").write_text("def reward(prompt, answer):\n    return 'high'\n")
    cases.append((["--prompts", str(good), "--reward-fn", "not_float:reward"], "not a finite float"))
    cases.append((["--prompts", str(good), "--reward-fn", "no_such_module:reward"], "cannot import it"))
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        for flags, message in cases:
            out = tmp_path / "out"
            args = ["rejection-sample", str(demo_model_path()), "--out", str(out), "--k", "2",
                    "--reward-fn", "llama2_mlx.world.verifier:reward", *flags]  # fmt: skip
            result = CliRunner().invoke(cli, args)
            assert result.exit_code != 0 and message in result.output, (flags, result.output)
            assert not out.exists(), flags
    finally:
        os.chdir(cwd)


def test_reward_model_with_another_tokenizer_is_refused(tmp_path, tiny_model_dir):
    rm = tmp_path / "rm"
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(
        json.dumps({"prompt": "sort list", "chosen": "a b", "rejected": "b a", "rating": "better"}) + "\n"
    )
    trained = CliRunner().invoke(cli, ["train-rm", str(tiny_model_dir), "--data", str(pairs), "--out", str(rm),
                                       "--iters", "1", "--batch-size", "1", "--no-progress"])  # fmt: skip
    assert trained.exit_code == 0, trained.output
    result = CliRunner().invoke(cli, ["rejection-sample", str(demo_model_path()), "--reward-model", str(rm),
                                      "--prompts", str(arithmetic_prompts(tmp_path / "p.jsonl", 2)),
                                      "--out", str(tmp_path / "out")])  # fmt: skip
    assert result.exit_code == 1 and "tokenizer differs" in result.output
    assert not (tmp_path / "out").exists()


def test_reward_fn_must_be_module_colon_function():
    from llama2_mlx.rewards import load_reward_fn

    with pytest.raises(Llama2MLXError, match="expected module:function"):
        load_reward_fn("llama2_mlx.world.verifier")


def test_student_is_fine_tuned_on_the_teachers_selection(tmp_path, tiny_model_dir):
    out = tmp_path / "rs"
    prompts = arithmetic_prompts(tmp_path / "p.jsonl", 4)
    result = rejection_sample(prompts, out, "--iterations", "2", "--iters", "2", "--k", "2", "--student",
                              str(tiny_model_dir), "--seq-len", "128")  # fmt: skip
    assert result.exit_code == 0, result.output
    for n in (1, 2):
        adapter = json.loads((out / f"iter-{n}" / "adapter" / "adapter_config.json").read_text())
        assert adapter["base_model"] == str(
            tiny_model_dir
        )  # the student was trained, on the teacher's samples
        assert adapter["rank"] == 8
