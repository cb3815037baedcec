"""The reward model: network, loss with the rating margin, data, training (train-rm), loading and scoring."""

from __future__ import annotations

import json
import math
import os
import signal
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from click.testing import CliRunner
from mlx.utils import tree_flatten

import llama2_mlx as L
from llama2_mlx.cli import cli
from llama2_mlx.errors import Llama2MLXError
from llama2_mlx.preferences import MARGINS, Pair, PairBatcher, encode_pair, load_pairs, preference_loss
from llama2_mlx.reward_model import (
    RewardModel,
    encode_response,
    load_reward_models,
    pad_rows,
    reward_model_from_chat,
)
from llama2_mlx.tokenizer import Tokenizer
from llama2_mlx.trainer import MetricsFile
from tests.conftest import tiny_args

PAIRS = [
    {"prompt": "what is the answer", "chosen": "the answer is two", "rejected": "dog", "rating": "significantly_better"},
    {"prompt": "sort list", "chosen": "a b c", "rejected": "c b a", "rating": "better"},
    {"messages": [{"role": "system", "content": "speak in french"}, {"role": "user", "content": "hello"}],
     "chosen": "bonjour monde", "rejected": "hello world", "rating": "slightly_better"},
    {"prompt": "count letters", "chosen": "three.", "rejected": "three", "rating": "unsure"},
    {"messages": [{"role": "user", "content": "what is 2 + 3"}, {"role": "assistant", "content": "5"},
                  {"role": "user", "content": "plus 4"}], "chosen": "9", "rejected": "8", "margin": 0.25},
]  # fmt: skip


def random_reward_model(seed: int = 0, **overrides) -> RewardModel:
    mx.random.seed(seed)
    network = RewardModel(tiny_args(**overrides))
    network.score.weight = mx.random.normal((1, network.args.dim)) * 0.1
    mx.eval(network.parameters())
    return network


def write_pairs(path: Path, rows: list[dict], repeat: int = 1) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for _ in range(repeat) for row in rows))
    return path


@pytest.fixture(scope="module")
def tok(tokenizer_dir) -> Tokenizer:
    return Tokenizer(tokenizer_dir / "tokenizer.model")


class FixedRewards:
    """A stand-in network returning given rewards, to check the loss by hand."""

    def __init__(self, rewards):
        self.rewards = mx.array(rewards, dtype=mx.float32)

    def __call__(self, tokens, last):
        return self.rewards


@pytest.mark.parametrize("scheme", ["none", "small", "large"])
def test_loss_matches_hand_computation_for_each_margin_scheme(tok, scheme):
    pairs = [encode_pair(row, tok) for row in PAIRS]
    chosen, rejected = [1.5, -0.2, 0.3, 2.0, 0.1], [0.5, 0.4, -1.0, 1.9, 0.6]
    margins = [pair.margin_for(scheme) for pair in pairs]
    expected_margins = {
        "none": [0, 0, 0, 0, 0.25],
        "small": [1, 2 / 3, 1 / 3, 0, 0.25],  # a row's numeric margin wins over any scheme
        "large": [3, 2, 1, 0, 0.25],
    }[scheme]
    assert margins == pytest.approx(expected_margins)
    total, weight = preference_loss(FixedRewards(chosen + rejected), None, None, mx.array(margins), 0.01)
    by_hand = sum(
        -math.log(1 / (1 + math.exp(-(c - r - m)))) + 0.01 * (c + r) ** 2
        for c, r, m in zip(chosen, rejected, expected_margins, strict=True)
    )
    assert weight.item() == 5
    assert total.item() == pytest.approx(by_hand, rel=1e-6)


def test_table_27_margins():
    assert MARGINS["small"] == pytest.approx(
        {"significantly_better": 1, "better": 2 / 3, "slightly_better": 1 / 3, "negligibly_better": 0}
    )
    assert MARGINS["large"] == {
        "significantly_better": 3,
        "better": 2,
        "slightly_better": 1,
        "negligibly_better": 0,
    }


def test_head_gradient_matches_finite_differences(tok):
    network = random_reward_model(1)
    batch = next(PairBatcher([encode_pair(row, tok) for row in PAIRS], 5, margin="large").once())
    network.freeze()
    network.score.unfreeze()

    def loss(model):
        total, weight = preference_loss(model, *batch.inputs, center_coef=0.1)
        return total / weight

    grad = nn.value_and_grad(network, loss)(network)[1]["score"]["weight"]
    weight = np.array(network.score.weight)
    eps = 1e-2
    for index in [0, 7, 31, 63]:
        values = []
        for sign in (1, -1):
            shifted = weight.copy()
            shifted[0, index] += sign * eps
            network.score.weight = mx.array(shifted)
            values.append(loss(network).item())
        network.score.weight = mx.array(weight)
        numeric = (values[0] - values[1]) / (2 * eps)
        assert grad[0, index].item() == pytest.approx(numeric, rel=2e-2, abs=1e-4)


def test_reward_is_read_at_the_last_real_token_with_left_or_right_padding():
    network = random_reward_model(2)
    rows = [[1, 5, 9, 20, 30, 2], [1, 7, 2], [1, 11, 12, 13, 14, 15, 16, 17, 2]]
    alone = [network(mx.array([row])).item() for row in rows]
    for side in ("right", "left"):
        tokens, last, mask = pad_rows(rows, side)
        assert np.allclose(network(tokens, last, mask).tolist(), alone, atol=1e-5), side
    # the padding token itself never decides: other pad ids give the same rewards
    tokens, last, _ = pad_rows(rows, "right")
    other = mx.where(mx.arange(tokens.shape[1])[None] > last[:, None], 99, tokens)
    assert np.allclose(network(other, last).tolist(), alone, atol=1e-5)


def test_reward_model_has_no_vocabulary_head(tiny_model_dir):
    network = reward_model_from_chat(tiny_model_dir)
    names = [name for name, _ in tree_flatten(network.parameters())]
    assert "score.weight" in names and not any(name.startswith("lm_head") for name in names)
    assert network.score.weight.shape == (1, network.args.dim)
    assert not network.score.weight.any().item()  # a new head starts at zero


def test_encode_response_is_the_sft_dialog(tok):
    ids = encode_response(tok, "hello there", "general kenobi")
    expected, mask = tok.encode_dialog_with_mask(
        [{"role": "user", "content": "hello there"}, {"role": "assistant", "content": "general kenobi"}]
    )
    assert ids == expected and ids[-1] == tok.eos_id and mask[-1]


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({"prompt": "x", "chosen": "a", "rating": "better"}, "missing 'rejected'"),
        ({"prompt": "x", "chosen": "a", "rejected": "b"}, "needs a 'rating' or a numeric 'margin'"),
        ({"prompt": "x", "chosen": "a", "rejected": "b", "rating": "much_better"}, "'rating' 'much_better'"),
        ({"prompt": "x", "chosen": "a", "rejected": "b", "margin": "1"}, "'margin' must be a finite number"),
        ({"prompt": "x", "chosen": "a", "rejected": "b", "margin": float("nan")}, "finite number"),
        ({"prompt": "x", "messages": [], "chosen": "a", "rejected": "b", "margin": 1}, "exactly one of"),
        ({"prompt": "x", "chosen": "", "rejected": "b", "margin": 1}, "'chosen' must be a non-empty string"),
        ({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}], "chosen": "a",
          "rejected": "b", "margin": 1}, "expected 'user'"),
    ],
)  # fmt: skip
def test_bad_rows_name_the_field(tok, row, message):
    with pytest.raises(Llama2MLXError, match=message):
        encode_pair(row, tok)


def test_bad_lines_are_file_line_errors_or_skipped(tmp_path, tok):
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps(PAIRS[0]) + "\n{not json\n" + json.dumps({"prompt": "x"}) + "\n")
    with pytest.raises(Llama2MLXError, match=rf"{path}:2: not valid JSON"):
        load_pairs(path, tok, 512)
    train, valid, report = load_pairs(path, tok, 512, skip_bad_lines=True)
    assert len(train) == 1 and not valid
    assert [line.split(": ")[0] for line in report.skipped] == [f"{path}:2", f"{path}:3"]


def test_pairs_cut_by_seq_len_are_left_out_and_counted(tmp_path, tok):
    long = {"prompt": "the quick brown fox " * 20, "chosen": "a", "rejected": "b", "rating": "better"}
    path = write_pairs(tmp_path / "pairs.jsonl", [PAIRS[0], long])
    train, _, report = load_pairs(path, tok, 64)
    assert len(train) == 1 and report.too_long == 1 and "longer than --seq-len" in report.summary()
    with pytest.raises(Llama2MLXError, match="raise --seq-len"):
        load_pairs(write_pairs(tmp_path / "long.jsonl", [long]), tok, 64)


def test_batches_hold_both_sides_of_each_pair(tok):
    pairs = [encode_pair(row, tok) for row in PAIRS]
    batcher = PairBatcher(pairs, 2, margin="large", seed=0)
    seen = []
    for batch in batcher.once():
        tokens, last, margins = batch.inputs
        n = margins.shape[0]
        assert tokens.shape[0] == 2 * n
        for row in range(n):
            chosen = tokens[row, : last[row].item() + 1].tolist()
            rejected = tokens[n + row, : last[n + row].item() + 1].tolist()
            pair = next(p for p in pairs if p.chosen == chosen)
            assert pair.rejected == rejected and margins[row].item() == pytest.approx(
                pair.margin_for("large")
            )
            seen.append(chosen)
    assert len(seen) == len(pairs)


def test_each_epoch_visits_the_pairs_in_a_new_order(tok):
    pairs = [Pair([1, i, 2], [1, i, 3], "better") for i in range(4, 40)]
    batcher = PairBatcher(pairs, 4, seed=3)
    stream = batcher(0)
    epochs = [[next(stream).inputs[0][0, 1].item() for _ in range(len(batcher))] for _ in range(2)]
    assert sorted(epochs[0]) == sorted(epochs[1]) and epochs[0] != epochs[1]


def train_rm(tmp_path, model_dir, out, *extra, data=None):
    data = data or write_pairs(tmp_path / "pairs.jsonl", PAIRS, repeat=4)
    args = ["train-rm", str(model_dir), "--data", str(data), "--out", str(out), "--batch-size", "4",
            "--seq-len", "128", "--lr", "1e-3", "--no-progress", *map(str, extra)]  # fmt: skip
    return CliRunner().invoke(cli, args)


def test_train_rm_cli_writes_a_small_reward_model_that_loads(tmp_path, tiny_model_dir):
    out = tmp_path / "rm"
    data = write_pairs(tmp_path / "pairs.jsonl", PAIRS, repeat=4)
    result = train_rm(tmp_path, tiny_model_dir, out, "--iters", "6", "--margin", "large", "--valid-fraction", "0.25",
                      data=data)  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "accuracy" in result.output and "done: 6 steps" in result.output
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlamaForSequenceClassification"] and config["num_labels"] == 1
    assert (out / "tokenizer.model").is_file() and (out / "score.safetensors").is_file()
    assert not (out / "model.safetensors").exists()  # LoRA: adapter + head only
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evaluations = [r for r in records if "val_accuracy" in r]
    assert evaluations[0]["step"] == 0 and evaluations[-1]["step"] == 6
    assert set(evaluations[-1]["val_buckets"]) <= {"significantly_better", "better", "slightly_better",
                                                    "negligibly_better", "unrated"}  # fmt: skip

    rm = L.load_reward_model(out)
    assert rm.base_path is not None and rm.base_path.resolve() == tiny_model_dir.resolve()
    prompts = [row.get("prompt") or row.get("messages") for row in PAIRS]
    answers = [row["chosen"] for row in PAIRS]
    batched = rm.score_batch(prompts, answers, batch_size=3)
    alone = [rm(p, a) for p, a in zip(prompts, answers, strict=True)]
    assert np.allclose(batched, alone, atol=1e-5)
    assert len(set(np.round(batched, 5))) > 1  # the trained head separates answers

    # the folder moves with its base as long as their relative position stays
    scored = CliRunner().invoke(cli, ["score", str(out), "--data", str(data), "--json"])
    assert scored.exit_code == 0, scored.output
    report = json.loads(scored.output[scored.output.index("{") :])
    assert report["pairs"] == 20 and set(report["buckets"]) == {
        "significantly_better", "better", "slightly_better", "negligibly_better", "unrated"}  # fmt: skip


def test_first_loss_is_log_2_with_a_zero_head(tmp_path, tiny_model_dir):
    out = tmp_path / "rm"
    result = train_rm(tmp_path, tiny_model_dir, out, "--iters", "1", "--report-every", "1")
    assert result.exit_code == 0, result.output
    first = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-6)


def test_full_reward_model_is_a_standalone_folder(tmp_path, tiny_model_dir):
    out = tmp_path / "rm-full"
    result = train_rm(tmp_path, tiny_model_dir, out, "--iters", "3", "--full")
    assert result.exit_code == 0, result.output
    config = json.loads((out / "config.json").read_text())
    assert "base_model" not in config and config["architectures"] == ["LlamaForSequenceClassification"]
    rm = L.load_reward_model(out)
    assert rm.base_path is None and rm("sort list", "a b c") != 0.0


def test_ctrl_c_then_resume_equals_an_uninterrupted_run(tmp_path, tiny_model_dir, monkeypatch):
    straight, split = tmp_path / "straight", tmp_path / "split"
    data = write_pairs(tmp_path / "pairs.jsonl", PAIRS, repeat=4)
    flags = ("--iters", "6", "--report-every", "1", "--dropout", "0.1")
    assert train_rm(tmp_path, tiny_model_dir, straight, *flags, data=data).exit_code == 0

    report = MetricsFile.on_report

    def ctrl_c_at_step_3(self, record):
        report(self, record)
        if record.get("step") == 3 and "loss" in record:
            os.kill(os.getpid(), signal.SIGINT)

    with monkeypatch.context() as patch:
        patch.setattr(MetricsFile, "on_report", ctrl_c_at_step_3)
        interrupted = train_rm(tmp_path, tiny_model_dir, split, *flags, data=data)
    assert interrupted.exit_code == 130 and "interrupted at step 3" in interrupted.output
    refused = train_rm(tmp_path, tiny_model_dir, split, *flags, "--rank", "4", "--resume", data=data)
    assert refused.exit_code == 1 and "rank (8 -> 4)" in refused.output
    again = train_rm(tmp_path, tiny_model_dir, split, *flags, data=data)
    assert again.exit_code == 1 and "use --resume" in again.output
    resumed = train_rm(tmp_path, tiny_model_dir, split, *flags, "--resume", data=data)
    assert resumed.exit_code == 0, resumed.output
    for name in ("adapters.safetensors", "score.safetensors"):
        a, b = mx.load(str(straight / name)), mx.load(str(split / name))
        assert a.keys() == b.keys()
        for key in a:
            assert np.array_equal(a[key], b[key]), (name, key)
    losses = [[r["loss"] for r in map(json.loads, (folder / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
              for folder in (straight, split)]  # fmt: skip
    assert losses[0] == losses[1] and len(losses[0]) == 6


def test_score_adds_rewards_to_prompt_response_rows(tmp_path, tiny_model_dir):
    out = tmp_path / "rm"
    assert train_rm(tmp_path, tiny_model_dir, out, "--iters", "2").exit_code == 0
    rows = [{"prompt": "sort list", "response": "a b c", "id": 1},
            {"messages": [{"role": "user", "content": "hello"}], "response": "bonjour"}]  # fmt: skip
    data = write_pairs(tmp_path / "rows.jsonl", rows)
    scored_file = tmp_path / "scored.jsonl"
    result = CliRunner().invoke(cli, ["score", str(out), "--data", str(data), "--out", str(scored_file)])
    assert result.exit_code == 0, result.output
    scored = [json.loads(line) for line in scored_file.read_text().splitlines()]
    rm = L.load_reward_model(out)
    assert scored[0]["id"] == 1
    assert [row["reward"] for row in scored] == pytest.approx(
        [rm("sort list", "a b c"), rm([{"role": "user", "content": "hello"}], "bonjour")], abs=1e-5
    )
    again = CliRunner().invoke(cli, ["score", str(out), "--data", str(data), "--out", str(scored_file)])
    assert again.exit_code == 1 and "already exists" in again.output
    missing_out = CliRunner().invoke(cli, ["score", str(out), "--data", str(data)])
    assert missing_out.exit_code == 2 and "--out" in missing_out.output


def test_two_reward_models_on_one_base_share_its_weights(tmp_path, tiny_model_dir):
    data = write_pairs(tmp_path / "pairs.jsonl", PAIRS, repeat=4)
    for name in ("helpful", "safe"):
        assert train_rm(tmp_path, tiny_model_dir, tmp_path / name, "--iters", "2", data=data).exit_code == 0
    helpful, safe = load_reward_models(tmp_path / "helpful", tmp_path / "safe")
    assert helpful.network.model.embed_tokens.weight is safe.network.model.embed_tokens.weight
    a = helpful.network.model.layers[0].self_attn.q_proj.linear.weight
    assert a is safe.network.model.layers[0].self_attn.q_proj.linear.weight
    assert helpful.network.score.weight is not safe.network.score.weight
    assert helpful("sort list", "a b c") == pytest.approx(
        L.load_reward_model(tmp_path / "helpful")("sort list", "a b c")
    )


def test_train_rm_refuses_bad_input_before_writing(tmp_path, tiny_model_dir):
    out = tmp_path / "rm"
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(PAIRS[0]) + "\n" + json.dumps({"prompt": "x", "chosen": "a"}) + "\n")
    result = train_rm(tmp_path, tiny_model_dir, out, "--iters", "2", data=bad)
    assert result.exit_code == 1 and f"{bad}:2: missing 'rejected'" in result.output
    assert not out.exists()
    # --batch-size and --lr override FineTuneConfig's defaults, not its bounds (config_fields merges them)
    cases = [(["--margin", "huge"], "huge"), (["--center-coef", "-1"], "center_coef"),
             (["--batch-size", "0"], "batch_size (--batch-size) must be at least 1"),
             (["--lr", "-1"], "lr (--lr) must be greater than 0")]  # fmt: skip
    for flags, message in cases:
        result = train_rm(tmp_path, tiny_model_dir, out, "--iters", "2", *flags)
        assert result.exit_code != 0 and message in result.output and not out.exists()
    chat = CliRunner().invoke(cli, ["score", str(tiny_model_dir), "--data", str(bad)])
    assert chat.exit_code == 1 and "not a reward model" in chat.output
