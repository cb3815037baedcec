"""Blocked attention equals MLX's fused attention in values and gradients, for the causal and document masks."""

from __future__ import annotations

import mlx.core as mx
import pytest

from llama2_mlx.attention import QUERY_BLOCK, blocked_attention
from llama2_mlx.losses import document_mask, next_token_loss
from tests.conftest import random_model, tiny_args


@pytest.mark.parametrize("masking", ["causal", "documents", "additive"])
def test_blocked_attention_equals_fused_attention(masking):
    length = 2 * QUERY_BLOCK + 44  # two whole blocks and a partial one
    mx.random.seed(0)
    q = mx.random.normal((2, 4, length, 16))
    k, v = mx.random.normal((2, 2, length, 16)), mx.random.normal((2, 2, length, 16))  # grouped-query heads
    mask = "causal"
    if masking != "causal":
        docs = mx.array([[0] * 100 + [1] * 150 + [2] * (length - 250), [0] * length])
        mask = document_mask(docs)
        if masking == "additive":
            mask = mx.where(mask, 0.0, -mx.inf)
    weights = mx.random.normal(q.shape)

    def objective(attend):
        return lambda q, k, v: (attend(q, k, v, scale=0.25, mask=mask) * weights).sum()

    fused = mx.value_and_grad(objective(mx.fast.scaled_dot_product_attention), argnums=(0, 1, 2))(q, k, v)
    blocked = mx.value_and_grad(objective(blocked_attention), argnums=(0, 1, 2))(q, k, v)
    assert blocked[0].item() == pytest.approx(fused[0].item(), rel=1e-5, abs=1e-3)
    for ours, reference in zip(blocked[1], fused[1], strict=True):
        assert mx.abs(ours - reference).max().item() <= 1e-5 * mx.abs(reference).max().item()


def test_long_rows_use_blocks_and_keep_the_model_output():
    model = random_model(tiny_args())
    tokens = mx.random.randint(0, tiny_args().vocab_size, (1, QUERY_BLOCK + 40))
    cache = model.make_cache()
    stepped = mx.concatenate(
        [model(tokens[:, :100], cache=cache), model(tokens[:, 100:], cache=cache)], axis=1
    )
    assert mx.allclose(model(tokens), stepped, atol=1e-4)  # blocks without a cache == fused kernel with one
    total, weight = next_token_loss(model, tokens, mx.ones(tokens.shape, dtype=mx.bool_))
    assert weight.item() == tokens.shape[1] - 1 and 0 < total.item() / weight.item() < 10
