"""The chunked, masked-positions-only loss equals the plain cross-entropy over every logit, in value and gradient."""

from __future__ import annotations

from functools import partial

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten, tree_unflatten

from llama2_mlx.data import Batcher, EncodeOptions, Example, encode_messages
from llama2_mlx.errors import Llama2MLXError
from llama2_mlx.lora import LoRAConfig, apply_lora
from llama2_mlx.losses import (
    document_mask,
    hidden_logprobs,
    loss_chunk_size,
    next_token_loss,
    token_logprobs,
)
from llama2_mlx.tokenizer import Tokenizer
from tests.conftest import random_model, tiny_args


def plain_loss(model, tokens, loss_mask, doc_ids=None, positions=None):
    """The unchunked reference: every position's logits, cross-entropy, mask."""
    attention = document_mask(doc_ids[:, :-1]) if doc_ids is not None else None
    logits = model(tokens[:, :-1], mask=attention)
    losses = nn.losses.cross_entropy(logits, tokens[:, 1:], reduction="none")
    mask = loss_mask[:, 1:].astype(mx.float32)
    return (losses * mask).sum(), mask.sum()


def add_lora(model, targets="q,v"):
    """LoRA with a random (not zero) B, so that every LoRA matrix has a gradient to compare."""
    apply_lora(model, LoRAConfig(rank=4, alpha=8, targets=targets))
    mx.random.seed(2)
    model.update(
        tree_unflatten(
            [(k, mx.random.normal(v.shape) * 0.1) for k, v in tree_flatten(model.trainable_parameters())]
        )
    )


def loss_and_grads(model, loss_fn, inputs, **kwargs):
    (total, weight), grads = nn.value_and_grad(model, loss_fn)(model, *inputs, **kwargs)
    return total.item(), weight.item(), dict(tree_flatten(grads))


def assert_same_loss_and_grads(model, inputs, **kwargs):
    total, weight, grads = loss_and_grads(model, next_token_loss, inputs, **kwargs)
    ref_total, ref_weight, ref_grads = loss_and_grads(model, plain_loss, inputs)
    assert weight == ref_weight and total == pytest.approx(ref_total, rel=1e-5)
    assert grads.keys() == ref_grads.keys() and grads
    for name, grad in grads.items():
        scale = mx.abs(ref_grads[name]).max().item()
        assert scale > 0, name
        assert mx.abs(grad - ref_grads[name]).max().item() <= 1e-4 * scale, name


def random_examples(count: int, seed: int = 0) -> list[Example]:
    """Prompt (untrained) then answer (trained), mixed lengths."""
    rng = np.random.default_rng(seed)
    examples = []
    for _ in range(count):
        prompt, answer = int(rng.integers(2, 9)), int(rng.integers(1, 20))
        ids = rng.integers(3, tiny_args().vocab_size, size=prompt + answer).tolist()
        examples.append(Example(ids, [False] * prompt + [True] * answer))
    return examples


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("lora", [False, True])
@pytest.mark.parametrize("packing", [False, True])
def test_chunked_loss_equals_plain_cross_entropy(tied, lora, packing):
    model = random_model(tiny_args(tie_word_embeddings=tied))
    if lora:
        add_lora(model, "q,v,down")
    batch = next(Batcher(random_examples(12), 4, 48, packing=packing, seed=0).once())
    tokens, mask, docs, positions = batch.inputs
    assert (docs is not None) == packing and int((positions >= 0).sum()) == int(mask[:, 1:].sum())
    assert_same_loss_and_grads(model, batch.inputs, chunk=32)  # several chunks, positions only
    assert_same_loss_and_grads(model, batch.inputs[:3])  # every position, mask-weighted, one chunk


def test_gatt_mask_trains_only_the_last_answer(tokenizer_dir):
    tok = Tokenizer(tokenizer_dir / "tokenizer.model")
    dialog = {"messages": [{"role": "system", "content": "speak in french"}, {"role": "user", "content": "hello"},
                           {"role": "assistant", "content": "bonjour monde"}, {"role": "user", "content": "count"},
                           {"role": "assistant", "content": "the quick brown fox"}]}  # fmt: skip
    example = encode_messages(dialog, tok, EncodeOptions(gatt=True))
    everything = encode_messages(dialog, tok, EncodeOptions())
    assert 0 < sum(example.mask) < sum(everything.mask)
    model = random_model(tiny_args())
    add_lora(model)
    batch = next(Batcher([example, everything], 2, 128, packing=True, seed=0).once())
    assert_same_loss_and_grads(model, batch.inputs, chunk=32)


def test_quantized_head_with_lora():
    model = random_model(tiny_args(dim=64, hidden_dim=128))
    nn.quantize(model, group_size=32, bits=4)
    assert isinstance(model.lm_head, nn.QuantizedLinear)
    add_lora(model)
    batch = next(Batcher(random_examples(8, seed=1), 4, 48, seed=0).once())
    assert_same_loss_and_grads(model, batch.inputs, chunk=32)


def test_token_logprobs_equal_log_softmax_and_their_gradient():
    model = random_model(tiny_args())
    add_lora(model)
    mx.random.seed(1)
    tokens = mx.random.randint(0, tiny_args().vocab_size, (2, 40))
    weights = mx.random.normal((2, 39))  # any per-token cotangent, as PPO/DPO objectives make

    def reference(model, tokens):
        logits = model(tokens[:, :-1])
        picked = mx.take_along_axis(logits, tokens[:, 1:, None], axis=-1)[..., 0]
        return picked - mx.logsumexp(logits, axis=-1)

    expected = reference(model, tokens)
    assert mx.allclose(token_logprobs(model, tokens, chunk=32), expected, atol=1e-5)
    assert mx.allclose(token_logprobs(model, tokens, differentiable=False), expected, atol=1e-5)
    hidden = model.model(tokens[:, :-1])
    assert mx.allclose(hidden_logprobs(model, hidden, tokens[:, 1:], chunk=16), expected, atol=1e-5)
    _, ref_grads = nn.value_and_grad(model, lambda m, t: (reference(m, t) * weights).sum())(model, tokens)
    _, grads = nn.value_and_grad(model, lambda m, t: (token_logprobs(m, t, chunk=32) * weights).sum())(
        model, tokens
    )
    for (name, grad), (_, ref) in zip(tree_flatten(grads), tree_flatten(ref_grads), strict=True):
        assert mx.abs(grad - ref).max().item() <= 1e-4 * mx.abs(ref).max().item(), name


def test_negative_chunk_is_refused():
    model = random_model(tiny_args())
    with pytest.raises(Llama2MLXError, match="loss chunk must be positive"):
        next_token_loss(model, mx.array([[1, 5, 7]]), mx.array([[False, True, True]]), chunk=-4)


def test_token_logprobs_refuse_a_trainable_head():
    model = random_model(tiny_args())
    with pytest.raises(Llama2MLXError, match="output projection is trainable"):
        token_logprobs(model, mx.array([[1, 5, 7]]))


def test_at_most_a_few_chunks_of_logits_exist():
    """4096 positions x vocab 8000: the plain loss holds several 131 MB arrays, the chunked one a few 4 MB chunks
    (about three chunks are in flight at once, each with its softmax and gradient)."""
    model = random_model(tiny_args(dim=32, hidden_dim=64, n_layers=1, vocab_size=8000))
    apply_lora(model, LoRAConfig(rank=4, alpha=8, targets="q,v"))
    mx.random.seed(0)
    tokens = mx.random.randint(0, 8000, (32, 129))  # short rows: attention scores stay small
    mask = mx.ones(tokens.shape, dtype=mx.bool_)
    mx.eval(model.parameters(), tokens, mask)
    peaks = {}
    for name, loss in (("plain", plain_loss), ("chunked", partial(next_token_loss, chunk=128))):
        mx.clear_cache()
        mx.reset_peak_memory()
        base = mx.get_active_memory()
        mx.eval(nn.value_and_grad(model, loss)(model, tokens, mask))
        peaks[name] = mx.get_peak_memory() - base
    assert loss_chunk_size(8000) == 512 and loss_chunk_size(32000) == 128
    assert peaks["plain"] > 4 * 131e6 and peaks["chunked"] < peaks["plain"] / 6, peaks
