"""The shared training loop: masked loss by hand, schedule, accumulation, checkpointing, NaN and Ctrl-C handling."""

from __future__ import annotations

import json
import math
import os
import signal

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
import pytest

from llama2_mlx.errors import Llama2MLXError
from llama2_mlx.lora import LoRAConfig, apply_lora, lora_parameters
from llama2_mlx.losses import document_mask, next_token_loss
from llama2_mlx.optim import OptimizerConfig, make_optimizer, warmup_cosine
from llama2_mlx.trainer import Batch, Callback, TrainConfig, train
from tests.conftest import random_model, tiny_args


def random_batches(batch_size: int, length: int = 12, seed: int = 0):
    """An endless deterministic stream of random token rows; restartable at any micro-batch index."""

    def source(start: int):
        index = start
        while True:
            rng = np.random.default_rng([seed, index])
            tokens = mx.array(rng.integers(3, 384, size=(batch_size, length)), dtype=mx.int32)
            mask = mx.array(rng.random((batch_size, length)) < 0.7)
            yield Batch((tokens, mask), int(tokens.size))
            index += 1

    return source


class Recorder(Callback):
    def __init__(self):
        self.losses, self.vals = {}, {}

    def on_report(self, record):
        if "val_loss" in record:
            self.vals[record["step"]] = record["val_loss"]
        else:
            self.losses[record["step"]] = record["loss"]


def run(model, batches, iters=4, lr=1e-3, callbacks=(), **config):
    recorder = Recorder()
    optimizer = make_optimizer(OptimizerConfig(lr=lr, warmup=1), iters)
    cfg = TrainConfig(iters=iters, report_every=1, progress=False, **config)
    result = train(model, optimizer, next_token_loss, batches, cfg, callbacks=[recorder, *callbacks])
    return result, recorder


def test_masked_cross_entropy_by_hand():
    """A 3-token example whose middle target is masked: the loss is -log softmax of the one trained target."""
    model = random_model(tiny_args(vocab_size=16, dim=16, n_heads=2, n_kv_heads=1, hidden_dim=32, n_layers=1))
    tokens = mx.array([[1, 5, 7]])
    logits = np.array(model(tokens[:, :2]), dtype=np.float64)[0]
    expected = -(logits[1, 7] - math.log(np.exp(logits[1]).sum()))
    total, weight = next_token_loss(model, tokens, mx.array([[False, False, True]]))
    assert weight.item() == 1
    assert total.item() == pytest.approx(expected, rel=1e-5)
    total, weight = next_token_loss(model, tokens, mx.array([[True, True, True]]))
    both = expected - (logits[0, 5] - math.log(np.exp(logits[0]).sum()))
    assert weight.item() == 2 and total.item() == pytest.approx(both, rel=1e-5)


def test_document_mask_is_block_causal():
    mask = np.array(document_mask(mx.array([[0, 0, 1, 1, 1]])))[0, 0]
    expected = np.array(
        [[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [0, 0, 1, 0, 0], [0, 0, 1, 1, 0], [0, 0, 1, 1, 1]], bool
    )
    assert (mask == expected).all()


def test_warmup_then_cosine_to_ten_percent():
    schedule = warmup_cosine(1e-3, warmup=4, total=14)  # steps 0..13
    values = [schedule(mx.array(s)).item() for s in range(14)]
    assert values[:4] == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3])
    assert values[4] == pytest.approx(1e-3)
    assert values[7] == pytest.approx(1e-4 + 0.9e-3 * 0.5 * (1 + math.cos(math.pi * 3 / 9)))
    assert values[13] == pytest.approx(1e-4)


def test_paper_optimizer_steps_equal_pytorch_adamw_by_hand():
    """Three steps of make_optimizer's AdamW equal the paper's AdamW computed by hand (PyTorch's formula: decoupled
    weight decay, bias correction, beta1 0.9, beta2 0.95, eps 1e-5, cosine schedule); a weight with no gradient
    shrinks by (1 - lr * 0.1) a step.

    Guards against: weight decay not passed (MLX's default is 0.01), wrong betas or eps, no bias correction.
    """
    gradients = np.array([[0.5, -2e-5, 3.0], [-0.25, 1e-5, 3.0], [1.0, -3e-5, -1.0]])  # 2e-5 is near eps
    optimizer = make_optimizer(OptimizerConfig(lr=1e-2), 3)
    params = {"w": mx.array([1.0, -2.0, 0.5]), "frozen_grad": mx.array([2.0, -4.0])}
    w, still, m, v = np.array([1.0, -2.0, 0.5]), np.array([2.0, -4.0]), np.zeros(3), np.zeros(3)
    for step, g in enumerate(gradients, start=1):
        params = optimizer.apply_gradients({"w": mx.array(g, mx.float32), "frozen_grad": mx.zeros(2)}, params)
        lr = 1e-3 + 0.9e-2 * 0.5 * (1 + math.cos(math.pi * (step - 1) / 2))  # cosine over steps 0..2 to 10%
        m, v = 0.9 * m + 0.1 * g, 0.95 * v + 0.05 * g**2
        w = w * (1 - lr * 0.1) - lr * (m / (1 - 0.9**step)) / (np.sqrt(v / (1 - 0.95**step)) + 1e-5)
        still = still * (1 - lr * 0.1)
        np.testing.assert_allclose(np.array(params["w"]), w, rtol=1e-6)
        np.testing.assert_allclose(np.array(params["frozen_grad"]), still, rtol=1e-6)


def test_loss_falls_and_metrics_written(tmp_path):
    fixed = random_batches(2)(0)
    batch = next(fixed)

    def same_batch(start):
        while True:
            yield batch

    model = random_model(tiny_args())
    result, recorder = run(model, same_batch, iters=8, lr=3e-3, out_dir=tmp_path)
    assert recorder.losses[8] < recorder.losses[1] - 0.5
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 9))
    assert {"loss", "lr", "tokens_per_sec", "trained_tokens", "peak_memory_gb"} <= set(records[0])
    assert records[-1]["trained_tokens"] == 8 * 24
    assert (tmp_path / "checkpoint" / "trainer_state.json").is_file()


def test_grad_accumulation_equals_big_batch():
    """2 micro-batches of 2 rows == 1 batch of 4 rows: the same tokens, the same mean, the same updates."""
    big = random_batches(4, seed=3)

    def halves(start):
        for batch in big(start // 2):
            tokens, mask = batch.inputs
            yield Batch((tokens[:2], mask[:2]), 24)
            yield Batch((tokens[2:], mask[2:]), 24)

    _, whole = run(random_model(tiny_args()), big)
    _, accumulated = run(random_model(tiny_args()), halves, grad_accum=2)
    assert list(whole.losses.values()) == pytest.approx(list(accumulated.losses.values()), rel=1e-5)


@pytest.mark.parametrize("lora", [False, True])
def test_gradient_checkpointing_same_losses(lora):
    def model_():
        model = random_model(tiny_args())
        if lora:
            mx.random.seed(1)
            apply_lora(model, LoRAConfig(rank=4, targets=["q", "v", "up"]))
        return model

    _, plain = run(model_(), random_batches(2))
    model = model_()
    _, checkpointed = run(model, random_batches(2), grad_checkpoint=True)
    assert list(plain.losses.values()) == pytest.approx(list(checkpointed.losses.values()), rel=1e-5)
    assert plain.losses[4] != pytest.approx(plain.losses[1], rel=1e-3)  # the weights did move
    assert type(model.layers[0]).__name__ == "TransformerBlock"  # restored after training


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    good = random_batches(2)

    def poisoned(start):
        for index, batch in enumerate(good(start), start=start):
            yield batch
            if index == 2:  # from step 4 on, the model's weights are NaN
                break
        model.model.norm.weight = model.model.norm.weight * float("nan")
        yield from good(start + 3)

    model = random_model(tiny_args())
    with pytest.raises(
        Llama2MLXError, match=r"stopped at step 4: the loss is nan.*not applied.*last good checkpoint"
    ):
        run(model, poisoned, iters=6, save_every=2, out_dir=tmp_path)
    state = json.loads((tmp_path / "checkpoint" / "trainer_state.json").read_text())
    assert state["step"] == 2


def test_ctrl_c_saves_a_checkpoint(tmp_path):
    class Interrupt(Callback):
        def on_report(self, record):
            if record.get("step") == 2 and "loss" in record:
                os.kill(os.getpid(), signal.SIGINT)

    result, recorder = run(
        random_model(tiny_args()), random_batches(2), iters=6, out_dir=tmp_path, callbacks=[Interrupt()]
    )
    assert result.status == "interrupted" and result.step == 2
    assert json.loads((tmp_path / "checkpoint" / "trainer_state.json").read_text())["data_position"] == 2


def test_validation_reported_before_and_after():
    val = random_batches(2, seed=9)

    def val_batches():
        source = val(0)
        return [next(source) for _ in range(2)]

    model = random_model(tiny_args())
    optimizer = make_optimizer(OptimizerConfig(lr=1e-3), 4)
    recorder = Recorder()
    cfg = TrainConfig(iters=4, eval_every=2, progress=False)
    result = train(model, optimizer, next_token_loss, random_batches(2), cfg, val_batches, [recorder])
    assert sorted(recorder.vals) == [0, 2, 4]
    direct_total = sum(next_token_loss(model, *b.inputs)[0].item() for b in val_batches())
    direct_weight = sum(next_token_loss(model, *b.inputs)[1].item() for b in val_batches())
    assert result.val_loss == pytest.approx(direct_total / direct_weight, rel=1e-5)
    assert isinstance(model.layers[0].self_attn.q_proj, nn.Linear)


def weighted_squares(model, x, y, w):
    """sum_i w_i * |model(x_i) - y_i|^2 and sum_i w_i: the trainer's (loss sum, weight) contract, w_i = tokens."""
    return (((model(x) - y) ** 2).sum(-1) * w).sum(), w.sum()


def regression_micro_batches(n: int, seed: int = 0) -> list[Batch]:
    """Micro-batches of 2 rows with unequal weights (one row weighs 0), so that means per micro-batch, per row
    and per token all differ."""
    rng = np.random.default_rng(seed)
    out = []
    for index in range(n):
        x, y = rng.normal(size=(2, 4)), rng.normal(size=(2, 3))
        w = np.array([index % 3, 1 + 2 * index], dtype=np.float32)
        out.append(Batch((mx.array(x, mx.float32), mx.array(y, mx.float32), mx.array(w)), int(w.sum())))
    return out


def sgd_by_hand(weight, bias, micro_batches, grad_accum, lr, clip_norm):
    """Plain SGD on the token mean of each step's whole batch: g = sum of gradients / sum of weights, clipped."""
    weight, bias = weight.astype(np.float64), bias.astype(np.float64)
    for start in range(0, len(micro_batches), grad_accum):
        grad_w, grad_b, total = np.zeros_like(weight), np.zeros_like(bias), 0.0
        for batch in micro_batches[start : start + grad_accum]:
            x, y, w = (np.array(a, np.float64) for a in batch.inputs)
            residual = 2 * w[:, None] * (x @ weight.T + bias - y)  # d/d(output) of the weighted squares
            grad_w, grad_b, total = grad_w + residual.T @ x, grad_b + residual.sum(0), total + w.sum()
        grad_w, grad_b = grad_w / total, grad_b / total
        norm = math.sqrt((grad_w**2).sum() + (grad_b**2).sum())
        if clip_norm and norm > clip_norm:
            grad_w, grad_b = grad_w * clip_norm / norm, grad_b * clip_norm / norm
        weight, bias = weight - lr * grad_w, bias - lr * grad_b
    return weight, bias


@pytest.mark.parametrize(("grad_accum", "clip_norm"), [(1, None), (3, None), (1, 0.05), (3, 0.05), (3, 1e3)])
def test_sgd_update_equals_the_hand_computed_step_on_the_full_batch_gradient(grad_accum, clip_norm):
    """Two SGD steps with a custom loss: the applied update is -lr * clip(sum of gradients / sum of weights).

    AdamW hides a uniform scale of the gradient, so plain SGD is used to see it. Guards against: gradient
    accumulation dividing by the weight twice, gradients not normalised by the token count, accumulation that
    averages per-micro-batch means, and the clip-norm setting ignored.
    """
    micro_batches = regression_micro_batches(2 * grad_accum, seed=grad_accum)
    mx.random.seed(0)
    model = nn.Linear(4, 3)
    start = np.array(model.weight), np.array(model.bias)
    expected = sgd_by_hand(*start, micro_batches, grad_accum, 0.3, clip_norm)
    if clip_norm is not None:  # 0.05 bites, 1e3 does not
        unclipped = sgd_by_hand(*start, micro_batches, grad_accum, 0.3, None)
        assert np.allclose(unclipped[0], expected[0]) == (clip_norm > 1)
    config = TrainConfig(iters=2, grad_accum=grad_accum, clip_norm=clip_norm, progress=False)
    result = train(model, optim.SGD(learning_rate=0.3), weighted_squares, lambda start: iter(micro_batches[start:]),
                   config)  # fmt: skip
    assert result.step == 2
    np.testing.assert_allclose(np.array(model.weight), expected[0], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.array(model.bias), expected[1], rtol=1e-5, atol=1e-6)


def test_training_steps_use_dropout_and_validation_does_not():
    """A LoRA model with dropout, handed over in eval mode (as loading leaves it): training steps see dropout,
    validation sees the deterministic model. The learning rate is 0, so the weights stay put.

    Guards against: the loop not switching the model to train mode (LoRA dropout silently off in SFT), and
    validation run with dropout on.
    """
    model = random_model(tiny_args())
    mx.random.seed(1)
    apply_lora(model, LoRAConfig(rank=4, dropout=0.5, targets=["q", "v", "up"]))
    mx.random.seed(2)
    for name, value in lora_parameters(model).items():  # trained-looking adapters, so that dropout matters
        if name.endswith("lora_b"):
            model.load_weights([(name, 0.5 * mx.random.normal(value.shape))], strict=False)
    batch = next(random_batches(2, seed=4)(0))
    model.eval()
    total, weight = next_token_loss(model, *batch.inputs)
    deterministic = (total / weight).item()

    def same_batch(start):
        while True:
            yield batch

    config = TrainConfig(iters=2, report_every=1, progress=False)
    for validation in (None, lambda: [batch]):
        model.eval()
        result = train(model, optim.SGD(learning_rate=0.0), next_token_loss, same_batch, config, validation)
        train_losses = [r["loss"] for r in result.history if "loss" in r]
        val_losses = [r["val_loss"] for r in result.history if "val_loss" in r]
        assert val_losses == pytest.approx([deterministic] * 2 if validation else [], rel=1e-6)
        assert all(abs(loss - deterministic) > 1e-3 for loss in train_losses)
        assert train_losses[0] != pytest.approx(train_losses[1], rel=1e-6)  # a fresh mask every step
