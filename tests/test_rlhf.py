"""PPO and DPO on one base model: the reward shaping, GAE, the DPO loss, the reference, the CLIs and resume."""

from __future__ import annotations

import json
import math
import os
import random
import signal
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from click.testing import CliRunner

from llama2_mlx.cli import cli
from llama2_mlx.dpo import answer_logprobs, dpo_loss
from llama2_mlx.loading import demo_model_path, load
from llama2_mlx.lora import LoRAConfig, adapters_disabled, apply_lora, lora_parameters
from llama2_mlx.ppo import ActorCritic, gae, logit, ppo_loss, whiten
from llama2_mlx.trainer import MetricsFile
from llama2_mlx.world.skills import draw_task
from tests.conftest import arithmetic_prompts


def test_whiten_and_logit_on_hand_values():
    values = np.array([1.0, 2.0, 3.0, 6.0])
    std = math.sqrt(((values - 3) ** 2).mean())  # mean 3, population std sqrt(3.5)
    assert whiten(values) == pytest.approx((values - 3) / std, rel=1e-6)
    assert whiten(np.array([2.0, 2.0])) == pytest.approx([0.0, 0.0])
    assert logit(np.array([0.5, 0.8807970779778823, 0.11920292202211755])) == pytest.approx([0.0, 2.0, -2.0])


def test_gae_on_a_hand_made_trajectory():
    rewards = np.array([0.0, -0.1, 1.0])
    values = np.array([0.5, 0.2, 0.4])
    gamma, lam = 0.9, 0.8
    deltas = [0.0 + 0.9 * 0.2 - 0.5, -0.1 + 0.9 * 0.4 - 0.2, 1.0 + 0 - 0.4]
    a2 = deltas[2]
    a1 = deltas[1] + gamma * lam * a2
    a0 = deltas[0] + gamma * lam * a1
    advantages, returns = gae(rewards, values, gamma, lam)
    assert advantages == pytest.approx([a0, a1, a2])
    assert returns == pytest.approx(np.array([a0, a1, a2]) + values)


@pytest.mark.parametrize("frozen_head", [True, False])
def test_dpo_loss_matches_hand_computation(tiny_model_dir, frozen_head):
    """Both log-prob paths (chunked with a frozen head as LoRA has it, whole logits with a trainable one) give
    the DPO losses computed by hand from the model's logits."""
    model, _ = load(tiny_model_dir)
    if frozen_head:
        model.freeze()
    tokens = np.array([[1, 20, 30, 40, 2], [1, 40, 5, 21, 2], [1, 20, 31, 11, 2], [1, 33, 33, 7, 2]])
    mask = np.array([[0, 0, 1, 1, 1], [0, 1, 1, 1, 0], [0, 0, 1, 1, 1], [0, 1, 1, 0, 0]], bool)
    reference = np.array([-3.0, -4.0, -3.5, -2.0], np.float32)
    logits = np.array(model(mx.array(tokens[:, :-1])))
    log_softmax = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    sums = [sum(log_softmax[r, t - 1, tokens[r, t]] for t in range(1, 5) if mask[r, t]) for r in range(4)]
    counts = mask[:, 1:].sum(1)
    args = (mx.array(tokens), mx.array([0.0, 0.5]), mx.array(mask), mx.array(reference))
    got_sums, got_counts = answer_logprobs(model, mx.array(tokens), mx.array(mask))
    assert got_sums.tolist() == pytest.approx(sums, rel=1e-4) and got_counts.tolist() == list(counts)
    beta = 0.3
    h = [(sums[i] - reference[i]) - (sums[i + 2] - reference[i + 2]) for i in (0, 1)]
    sigmoid = sum(-math.log(1 / (1 + math.exp(-(beta * h[i] - m)))) for i, m in enumerate([0.0, 0.5]))
    total, weight = dpo_loss(model, *args, beta=beta, loss="sigmoid")
    assert weight.item() == 2 and total.item() == pytest.approx(sigmoid, rel=1e-4)
    nll = -sum(sums[i] / counts[i] for i in (0, 1))  # the chosen rows' mean NLL per token (--nll-coef)
    total, _ = dpo_loss(model, *args, beta=beta, loss="sigmoid", nll_coef=0.2)
    assert total.item() == pytest.approx(sigmoid + 0.2 * nll, rel=1e-4)
    ratio = [(sums[r] - reference[r]) / counts[r] for r in range(4)]
    ipo = sum((ratio[i] - ratio[i + 2] - 1 / (2 * beta)) ** 2 for i in (0, 1))
    total, _ = dpo_loss(model, *args, beta=beta, loss="ipo")
    assert total.item() == pytest.approx(ipo, rel=1e-4)


def test_reference_with_the_adapter_off_is_the_base_model(tiny_model_dir):
    base, _ = load(tiny_model_dir)
    policy, _ = load(tiny_model_dir)
    mx.random.seed(3)
    apply_lora(policy, LoRAConfig(rank=4, targets=["q", "v", "down"]))
    # LoRA's B starts at zero (the adapter equals the base); give it weights that change the output
    for name, array in lora_parameters(policy).items():
        if name.endswith("lora_b"):
            policy.load_weights([(name, mx.random.normal(array.shape) * 0.5)], strict=False)
    tokens = mx.array([[1, 5, 9, 20, 30, 2, 7]])
    assert not np.allclose(policy(tokens), base(tokens), atol=1e-3)  # the adapter changes the output
    with adapters_disabled(policy):
        assert np.allclose(policy(tokens), base(tokens), atol=1e-6)
    assert not np.allclose(policy(tokens), base(tokens), atol=1e-3)  # and is back on afterwards


def test_ppo_ptx_adds_the_sft_loss_per_answer_token(tiny_model_dir):
    """PPO-ptx: the loss with an SFT batch is the PPO loss plus coef * answer tokens * the batch's mean next-token
    loss, computed here by hand from the logits."""
    network = ActorCritic(load(tiny_model_dir)[0])
    rng = np.random.default_rng(0)
    tokens = mx.array([[1, 20, 30, 40, 2], [1, 40, 5, 21, 2]])
    mask = mx.array([[0, 1, 1, 1], [0, 0, 1, 0]], dtype=mx.bool_)
    old_logp, advantages, returns, old_values = (
        mx.array(rng.normal(size=(2, 4)), dtype=mx.float32) for _ in range(4)
    )
    rollout = (
        tokens,
        mask,
        old_logp,
        advantages,
        returns,
        old_values,
        mx.array([0.5, 1.0]),
        mx.array([0.0, 0.1]),
    )
    sft_tokens = np.array([[1, 33, 12, 7, 2, 0], [1, 8, 9, 2, 0, 0]])
    sft_mask = np.array([[0, 0, 1, 1, 1, 0], [0, 1, 1, 1, 0, 0]], bool)
    positions = np.flatnonzero(sft_mask[:, 1:]).astype(np.int32)
    ptx = (mx.array(sft_tokens), mx.array(sft_mask), None, mx.array(positions))
    logits = np.array(network.policy(mx.array(sft_tokens[:, :-1])))
    log_softmax = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    nll = [-log_softmax[r, t - 1, sft_tokens[r, t]] for r in range(2) for t in range(1, 6) if sft_mask[r, t]]
    plain, count, _ = ppo_loss(network, *rollout)
    total, count_ptx, metrics = ppo_loss(network, *rollout, *ptx, ptx_coef=0.5)
    assert count.item() == count_ptx.item() == 4
    assert total.item() == pytest.approx(plain.item() + 0.5 * 4 * np.mean(nll), rel=1e-4)
    ptx_sum, ptx_tokens = metrics["ptx_loss"]
    assert ptx_tokens.item() == len(nll) and ptx_sum.item() == pytest.approx(sum(nll), rel=1e-4)


def ppo(prompts: Path, out: Path, *extra: str):
    args = ["ppo", str(demo_model_path()), "--prompts", str(prompts), "--out", str(out),
            "--reward-fn", "llama2_mlx.world.verifier:reward", "--batch-size", "8", "--minibatch-size", "4",
            "--max-tokens", "12", "--lr", "1e-3", "--no-progress", *extra]  # fmt: skip
    return CliRunner().invoke(cli, args)


def records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_ppo_kl_is_zero_on_the_first_rollout_and_the_output_is_an_adapter(tmp_path):
    out = tmp_path / "ppo"
    result = ppo(arithmetic_prompts(tmp_path / "p.jsonl", 8, seed=7), out, "--iters", "2")
    assert result.exit_code == 0, result.output
    steps = records(out)
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    assert steps[0]["kl"] == 0.0 and steps[1]["kl"] == 0.0  # the policy starts equal to the reference
    assert steps[2]["kl"] != 0.0  # the second rollout comes from an updated policy
    for record in steps:
        assert {"reward", "kl", "value_loss", "clip_fraction"} <= record.keys()
        assert 0 <= record["reward"] <= 1 and 0 <= record["clip_fraction"] <= 1
    assert (out / "adapters.safetensors").is_file() and (out / "value_head.safetensors").is_file()
    answer = CliRunner().invoke(cli, ["generate", str(demo_model_path()), "--adapter", str(out),
                                      "--prompt", "What is 2 + 2?", "--temperature", "0"])  # fmt: skip
    assert answer.exit_code == 0 and answer.output.strip()


def test_ppo_from_an_sft_adapter_has_zero_kl_to_it(tmp_path):
    sft_data = tmp_path / "sft.jsonl"
    sft_data.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"What is {i} + 1?"},
                        {"role": "assistant", "content": f"{i} + 1 = {i + 1}."}]}) + "\n" for i in range(8)))  # fmt: skip
    adapter = tmp_path / "sft"
    trained = CliRunner().invoke(cli, ["sft", str(demo_model_path()), "--data", str(sft_data), "--out", str(adapter),
                                       "--iters", "3", "--batch-size", "4", "--lr", "1e-2", "--no-progress"])  # fmt: skip
    assert trained.exit_code == 0, trained.output
    out = tmp_path / "ppo"
    result = ppo(
        arithmetic_prompts(tmp_path / "p.jsonl", 8, seed=7), out, "--iters", "1", "--adapter", str(adapter)
    )
    assert result.exit_code == 0, result.output
    assert [r["kl"] for r in records(out)] == [0.0, 0.0]


def test_ppo_ctrl_c_then_resume_equals_an_uninterrupted_run(tmp_path, monkeypatch):
    """Also with PPO-ptx: the SFT batches continue where they stopped."""
    prompts = arithmetic_prompts(tmp_path / "p.jsonl", 8, seed=7)
    sft_data = tmp_path / "sft.jsonl"
    sft_data.write_text("".join(json.dumps({"prompt": f"What is {i} + 2?", "completion": f"{i} + 2 = {i + 2}."})
                                + "\n" for i in range(12)))  # fmt: skip
    flags = ("--iters", "2", "--ppo-epochs", "2", "--ptx-data", str(sft_data))  # 4 steps per rollout
    straight = tmp_path / "straight"
    assert ppo(prompts, straight, *flags).exit_code == 0
    split = tmp_path / "split"
    report = MetricsFile.on_report

    def ctrl_c_at_step_6(self, record):
        report(self, record)
        if record.get("step") == 6:
            os.kill(os.getpid(), signal.SIGINT)

    with monkeypatch.context() as patch:
        patch.setattr(MetricsFile, "on_report", ctrl_c_at_step_6)
        assert ppo(prompts, split, *flags).exit_code == 130
    refused = ppo(prompts, split, *flags, "--kl-coef", "0.5", "--resume")
    assert refused.exit_code == 1 and "kl_coef (0.01 -> 0.5)" in refused.output
    resumed = ppo(prompts, split, *flags, "--resume")
    assert resumed.exit_code == 0, resumed.output
    assert [r["loss"] for r in records(straight)] == [r["loss"] for r in records(split)]
    assert (
        len({r["ptx_loss"] for r in records(straight)}) == 8
    )  # a different SFT batch (or model) at each step
    a, b = mx.load(str(straight / "adapters.safetensors")), mx.load(str(split / "adapters.safetensors"))
    assert all(np.array_equal(a[k], b[k]) for k in a)


def test_dpo_cli_trains_an_adapter_and_reports_reward_accuracy(tmp_path):
    rng = random.Random(1)
    rows = []
    for _ in range(24):
        task = draw_task("arithmetic", rng)
        rows.append(
            {"prompt": task.question, "chosen": task.answer, "rejected": task.answer.replace("=", "is")}
        )
    data = tmp_path / "prefs.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))  # no rating: DPO does not need one
    out = tmp_path / "dpo"
    args = ["dpo", str(demo_model_path()), "--data", str(data), "--out", str(out), "--iters", "6", "--batch-size", "8",
            "--lr", "1e-3", "--valid-fraction", "0.25", "--no-progress"]  # fmt: skip
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert "reward accuracy" in result.output
    evaluations = [r for r in records(out) if "val_accuracy" in r]
    assert evaluations[0]["step"] == 0 and evaluations[0]["val_reward_margin"] == pytest.approx(0.0, abs=1e-6)
    assert evaluations[-1]["val_accuracy"] > 0.5 and evaluations[-1]["val_reward_margin"] > 0
    answer = CliRunner().invoke(cli, ["generate", str(demo_model_path()), "--adapter", str(out),
                                      "--prompt", "What is 2 + 2?", "--temperature", "0"])  # fmt: skip
    assert answer.exit_code == 0
    again = CliRunner().invoke(cli, args)
    assert again.exit_code == 1 and "use --resume" in again.output


def test_actor_critic_chunked_logprobs_equal_whole_logits(tiny_model_dir):
    """PPO's policy log-probs come one chunk of vocabulary logits at a time (LoRA: frozen head); they equal the
    log-softmax of the whole logits, and the values come from the same hidden states."""
    from llama2_mlx.ppo import ActorCritic, token_logprobs

    policy, _ = load(tiny_model_dir)
    apply_lora(policy, LoRAConfig(rank=4))
    network = ActorCritic(policy)
    network.value_head.weight = mx.ones_like(network.value_head.weight) * 0.1
    tokens = mx.array([[1, 5, 9, 20, 30, 2, 7], [1, 8, 8, 3, 40, 41, 2]])
    logp, values = network(tokens)
    whole = token_logprobs(policy(tokens[:, :-1]), tokens[:, 1:])
    assert logp.shape == values.shape == (2, 6)
    assert np.allclose(logp, whole, atol=1e-5)
    assert np.allclose(values, 0.1 * policy.model(tokens[:, :-1]).sum(-1), atol=1e-4)
