"""LoRA by module swap: zero-init identity, only adapters train, QLoRA, fuse equality, adapter folders."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

from llama2_mlx.errors import Llama2MLXError
from llama2_mlx.loading import load
from llama2_mlx.lora import (
    LoRAConfig,
    LoRALinear,
    apply_adapter,
    apply_lora,
    fuse,
    fuse_adapter,
    lora_parameters,
    save_adapters,
    write_adapter_config,
)
from llama2_mlx.losses import next_token_loss
from llama2_mlx.model_folder import load_model, save_model
from llama2_mlx.optim import OptimizerConfig, make_optimizer
from llama2_mlx.trainer import Batch, TrainConfig, train
from tests.conftest import random_model, tiny_args

TOKENS = mx.array([[1, 17, 42, 99, 7, 250, 3, 64]])


def randomize_b(model: nn.Module, seed: int = 1) -> None:
    """Trained adapters have B != 0; make the update visible for fuse tests."""
    mx.random.seed(seed)
    for _, module in model.named_modules():
        if isinstance(module, LoRALinear):
            module.lora_b = 0.05 * mx.random.normal(module.lora_b.shape)


def quantized_model() -> nn.Module:
    model = random_model(tiny_args())
    nn.quantize(model, group_size=32, bits=4)
    mx.eval(model.parameters())
    return model


def test_step_zero_equals_base_and_only_chosen_modules_wrapped():
    model = random_model(tiny_args())
    before = model(TOKENS)
    apply_lora(model, LoRAConfig(rank=4, targets=["q", "v", "down"], layers=1))
    assert mx.array_equal(model(TOKENS), before)
    names = sorted(lora_parameters(model))
    assert names == sorted(
        f"model.layers.1.{path}.{ab}"
        for path in ("self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj")
        for ab in ("lora_a", "lora_b")
    )
    assert sorted(k for k, _ in tree_flatten(model.trainable_parameters())) == names
    assert model.layers[1].self_attn.q_proj.lora_a.shape == (64, 4)
    assert model.layers[1].mlp.down_proj.lora_b.shape == (4, 64)
    assert model.layers[1].self_attn.q_proj.scale == 16 / 4


def test_bad_config_is_a_clear_error():
    with pytest.raises(Llama2MLXError, match="choose from q,k,v,o,gate,up,down"):
        LoRAConfig(targets="q,wq")
    with pytest.raises(Llama2MLXError, match="only 2 layers"):
        apply_lora(random_model(tiny_args()), LoRAConfig(layers=3))


@pytest.mark.parametrize("quantize", [False, True])
def test_only_lora_parameters_change(quantize):
    model = quantized_model() if quantize else random_model(tiny_args())
    apply_lora(model, LoRAConfig(rank=4, targets=["q", "k", "v", "o", "gate", "up", "down"]))
    before = {k: np.array(v) for k, v in tree_flatten(model.parameters())}
    tokens = mx.array(np.random.default_rng(0).integers(3, 384, size=(2, 16)), dtype=mx.int32)

    def batches(start):
        while True:
            yield Batch((tokens, mx.ones(tokens.shape, dtype=mx.bool_)), 32)

    config = TrainConfig(iters=3, report_every=1, progress=False)
    result = train(model, make_optimizer(OptimizerConfig(lr=1e-2), 3), next_token_loss, batches, config)
    assert result.history[-1]["loss"] < result.history[0]["loss"]
    after = dict(tree_flatten(model.parameters()))
    changed = sorted(k for k, v in after.items() if not np.array_equal(np.array(v), before[k]))
    assert changed and all(k.endswith(("lora_a", "lora_b")) for k in changed)
    assert all(k in changed for k in after if k.endswith("lora_b"))


@pytest.mark.parametrize("quantize,dequantize", [(False, False), (True, True), (True, False)])
def test_fuse_equals_base_plus_adapter(quantize, dequantize):
    model = quantized_model() if quantize else random_model(tiny_args())
    apply_lora(model, LoRAConfig(rank=4, targets=["q", "v", "up"]))
    randomize_b(model)
    expected = model(TOKENS)
    fuse(model, dequantize=dequantize)
    assert not any(isinstance(m, LoRALinear) for _, m in model.named_modules())
    quantized = any(isinstance(m, nn.QuantizedLinear) for _, m in model.named_modules())
    assert quantized == (quantize and not dequantize)
    got = model(TOKENS)
    if quantize and not dequantize:  # re-quantizing W + delta rounds it to 4 bits again
        assert np.corrcoef(np.array(got).ravel(), np.array(expected).ravel())[0, 1] > 0.99
    else:
        np.testing.assert_allclose(np.array(got), np.array(expected), atol=1e-4)


def test_adapter_folder_round_trip_and_fuse_command(tmp_path, tiny_model_dir):
    model = load_model(tiny_model_dir)
    config = LoRAConfig(rank=4, alpha=8, targets=["q", "o", "gate"], layers=1)
    apply_lora(model, config)
    randomize_b(model)
    expected = np.array(model(TOKENS))
    adapter = tmp_path / "adapter"
    save_adapters(model, adapter)
    write_adapter_config(adapter, config, n_layers=2, base_model=str(tiny_model_dir))

    loaded, _ = load(tiny_model_dir, adapter=adapter)
    np.testing.assert_allclose(np.array(loaded(TOKENS)), expected, atol=1e-5)

    fused_dir = fuse_adapter(tiny_model_dir, adapter, tmp_path / "fused")
    fused = load_model(fused_dir)
    assert not any(isinstance(m, LoRALinear) for _, m in fused.named_modules())
    np.testing.assert_allclose(np.array(fused(TOKENS)), expected, atol=1e-4)
    assert (fused_dir / "tokenizer.model").is_file()

    # mlx-lm reads the same adapter folder
    from mlx_lm.tuner.utils import load_adapters
    from mlx_lm.utils import load_model as mlx_lm_load_model

    theirs, _ = mlx_lm_load_model(tiny_model_dir)
    load_adapters(theirs, str(adapter))
    np.testing.assert_allclose(np.array(theirs(TOKENS)), expected, atol=1e-4)


def test_fuse_dequantize_writes_a_float_folder(tmp_path, tokenizer_dir):
    base = save_model(quantized_model(), tmp_path / "q4", tokenizer_dir=tokenizer_dir)
    model = load_model(base)
    config = LoRAConfig(rank=4, targets=["v", "down"])
    apply_lora(model, config)
    randomize_b(model)
    expected = np.array(model(TOKENS))
    save_adapters(model, tmp_path / "adapter")
    write_adapter_config(tmp_path / "adapter", config, n_layers=2, base_model=str(base))
    fused = load_model(fuse_adapter(base, tmp_path / "adapter", tmp_path / "fused", dequantize=True))
    assert not any(
        isinstance(m, nn.QuantizedLinear | nn.QuantizedEmbedding) for _, m in fused.named_modules()
    )
    np.testing.assert_allclose(np.array(fused(TOKENS)), expected, atol=1e-4)


def test_adapter_that_does_not_match_is_reported(tmp_path, tiny_model_dir):
    model = load_model(tiny_model_dir)
    apply_lora(model, LoRAConfig(rank=4))
    save_adapters(model, tmp_path)
    write_adapter_config(tmp_path, LoRAConfig(rank=8), n_layers=2, base_model=None)
    with pytest.raises(Llama2MLXError, match="has shape"):
        apply_adapter(load_model(tiny_model_dir), tmp_path)


def test_fuse_cli(tmp_path, tiny_model_dir):
    from click.testing import CliRunner

    from llama2_mlx.cli import cli

    model = load_model(tiny_model_dir)
    config = LoRAConfig(rank=2, targets=["k", "down"])
    apply_lora(model, config)
    randomize_b(model, seed=4)
    expected = np.array(model(TOKENS))
    save_adapters(model, tmp_path / "a")
    write_adapter_config(tmp_path / "a", config, n_layers=2, base_model=str(tiny_model_dir))
    args = ["fuse", str(tiny_model_dir), "--adapter", str(tmp_path / "a"), "--out", str(tmp_path / "f")]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    np.testing.assert_allclose(np.array(load_model(tmp_path / "f")(TOKENS)), expected, atol=1e-4)
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 1 and "already exists" in result.output


def test_dropout_changes_train_mode_outputs_only():
    """LoRA dropout (p = 0.5) acts on the adapter's input in train mode only, and keeps its expectation.

    Guards against: LoRA dropout skipped in training mode, apply_lora ignoring the dropout setting, and dropout
    applied to the frozen base path too.
    """
    model = random_model(tiny_args())
    base = model(TOKENS)
    apply_lora(model, LoRAConfig(rank=4, dropout=0.5, targets=["q", "v"]))
    model.train()
    assert mx.array_equal(model(TOKENS), base)  # B = 0: with no adapter update, dropout changes nothing
    randomize_b(model)
    model.eval()
    adapted = model(TOKENS)
    assert mx.array_equal(model(TOKENS), adapted) and not mx.allclose(adapted, base, atol=1e-3).item()
    model.train()
    first, second = model(TOKENS), model(TOKENS)
    assert (
        not mx.allclose(first, adapted, atol=1e-3).item() and not mx.allclose(first, second, atol=1e-3).item()
    )

    layer = LoRALinear.from_linear(nn.Linear(64, 32), rank=4, alpha=8, dropout=0.5)
    layer.lora_b = mx.random.normal((4, 32), key=mx.random.key(1))
    x = mx.random.normal((1, 64), key=mx.random.key(2))
    layer.eval()
    expected = layer.linear(x) + 2 * (x @ layer.lora_a) @ layer.lora_b
    np.testing.assert_allclose(np.array(layer(x)), np.array(expected), rtol=1e-5, atol=1e-5)
    layer.train()
    draws = layer(mx.broadcast_to(x, (4000, 64)))  # inverted dropout: the mean is the eval output
    mean, spread = np.array(draws.mean(0)), np.array(draws.std(0))
    assert spread.min() > 0.05 and (np.abs(mean - np.array(expected[0])) < 4 * spread / np.sqrt(4000)).all()
