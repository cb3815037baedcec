"""Next-token cross-entropy with a loss mask and optional packed-document attention, in the trainer's contract.

Returns (sum of losses, number of trained tokens); the training loop divides the sums of the whole global batch,
so the loss is the mean over every trained token however the batch is split, packed or distributed.

Memory: a batch's vocabulary logits (4 x 2048 x 32,000 float32 numbers are 1 GB) and the softmax and gradient
that a plain cross-entropy builds from them would dominate a LoRA step's peak. So the output projection runs only
at the positions whose loss counts, one chunk of positions at a time, and each chunk's gradient with respect to
its hidden states (and to the head's weights when they train) is computed right there in the forward pass, as
Liger-Kernel's fused linear cross-entropy does: the chunk's logits are freed before the next chunk's exist, and no
logits are recomputed in the backward pass. Autodiff picks the precomputed gradients up through a term whose
value is exactly zero, `(x - stop_gradient(x)) * gradient`.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_map

from llama2_mlx.errors import Llama2MLXError

# One chunk of float32 logits is about this big; a chunk's softmax and gradient take a few times as much again.
LOGITS_CHUNK_BYTES = 16 * 2**20


def loss_chunk_size(vocab_size: int) -> int:
    """Positions per chunk of logits: 128 at vocab 32,000 (16 MB of logits), a multiple of 32, at least 32."""
    return max(32, LOGITS_CHUNK_BYTES // (4 * vocab_size) // 32 * 32)


def document_mask(doc_ids: mx.array) -> mx.array:
    """[B, L] document ids -> [B, 1, L, L] boolean mask: causal, and only within the same document."""
    length = doc_ids.shape[1]
    causal = mx.arange(length)[:, None] >= mx.arange(length)[None, :]
    same = doc_ids[:, :, None] == doc_ids[:, None, :]
    return mx.expand_dims(same & causal, 1)


def next_token_loss(
    model: nn.Module,
    tokens: mx.array,
    loss_mask: mx.array,
    doc_ids: mx.array | None = None,
    positions: mx.array | None = None,
    chunk: int | None = None,
) -> tuple[mx.array, mx.array]:
    """Cross-entropy of predicting tokens[:, t] from tokens[:, :t], summed where loss_mask[:, t] is True.

    `loss_mask` is aligned with `tokens` and marks TARGET tokens (an example's first token is never one, so a
    packed document is never trained to follow the previous one). With `doc_ids` attention stays inside each
    document of a packed row. `positions` (the Batcher's, from `data.loss_positions`) lists the flat indices into
    tokens[:, 1:] whose loss counts, padded with -1; without it every position is projected and the mask weighs
    them. `chunk`: positions per chunk of logits (default `loss_chunk_size(vocab)`).
    """
    inputs, targets, mask = tokens[:, :-1], tokens[:, 1:], loss_mask[:, 1:].astype(mx.float32)
    attention = document_mask(doc_ids[:, :-1]) if doc_ids is not None else None
    hidden = model.model(inputs, mask=attention)
    hidden, targets, weights = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1), mask.reshape(-1)
    if positions is not None:
        index = mx.maximum(positions, 0)
        hidden, targets = hidden[index], targets[index]
        weights = weights[index] * (positions >= 0)
    logprobs, d_hidden, d_head = _chunked_logprobs(model, hidden, targets, -weights, chunk, head_grads=True)
    total = -(logprobs * weights).sum() + _zero_with_gradient(hidden, d_hidden)
    for parameter, gradient in d_head:
        total = total + _zero_with_gradient(parameter, gradient)
    return total, mask.sum()


def token_logprobs(
    model: nn.Module,
    tokens: mx.array,
    doc_ids: mx.array | None = None,
    chunk: int | None = None,
    differentiable: bool = True,
) -> mx.array:
    """log p(tokens[:, t] | tokens[:, :t]) for t >= 1: [B, L - 1], one chunk of vocabulary logits at a time.

    For PPO and DPO: mask and sum the result as the objective needs. See `hidden_logprobs` for the gradients.
    """
    attention = document_mask(doc_ids[:, :-1]) if doc_ids is not None else None
    hidden = model.model(tokens[:, :-1], mask=attention)
    return hidden_logprobs(model, hidden, tokens[:, 1:], chunk, differentiable)


def hidden_logprobs(
    model: nn.Module,
    hidden: mx.array,
    targets: mx.array,
    chunk: int | None = None,
    differentiable: bool = True,
) -> mx.array:
    """log p(targets) from hidden states [B, L, dim] (`model.model`'s output, which a value head can share): [B, L].

    Gradients flow to everything before the output projection (LoRA); a trainable projection (full fine-tuning) is
    refused, as its gradient would need the per-position cotangents this path does not keep.
    `differentiable=False` (reference or rollout log-probs) skips computing the gradients, halving the work.
    """
    batch, length, dim = hidden.shape
    hidden, targets = hidden.reshape(-1, dim), targets.reshape(-1)
    if not differentiable:
        logprobs, _, _ = _chunked_logprobs(model, hidden, targets, None, chunk, head_grads=False)
        return logprobs.reshape(batch, length)
    if head_is_trainable(model):
        raise Llama2MLXError(
            "token_logprobs: the output projection is trainable; freeze it (LoRA) or use next_token_loss"
        )
    ones = mx.ones(targets.shape, mx.float32)
    logprobs, d_hidden, _ = _chunked_logprobs(model, hidden, targets, ones, chunk, head_grads=False)
    logprobs = logprobs + ((hidden - mx.stop_gradient(hidden)) * d_hidden).sum(-1)
    return logprobs.reshape(batch, length)


def head_is_trainable(model: nn.Module) -> bool:
    """Whether the output projection trains (full fine-tuning): then its gradient needs whole logits, and the
    chunked log-probs above cannot be used."""
    return bool(tree_flatten(_head_module(model).trainable_parameters()))


def _head_module(model: nn.Module) -> nn.Module:
    return model.model.embed_tokens if model.args.tie_word_embeddings else model.lm_head


def _chunked_logprobs(
    model: nn.Module,
    hidden: mx.array,
    targets: mx.array,
    weights: mx.array | None,
    chunk: int | None,
    head_grads: bool,
) -> tuple[mx.array, mx.array | None, list[tuple[mx.array, mx.array]]]:
    """log p(target) for each row of `hidden` [N, dim]; with `weights` also the gradient of sum(weights * logprobs)
    with respect to the rows of `hidden` and (`head_grads`) to the output projection's trainable parameters, as
    (parameter, gradient) pairs. Every result is constant to autodiff. At most one chunk of logits exists at a time:
    each chunk starts only after the previous one's results are computed (`mx.depends`), when its logits are dead.
    """
    chunk = chunk or loss_chunk_size(model.args.vocab_size)
    if chunk <= 0:
        raise Llama2MLXError(f"loss chunk must be positive (or 0 for automatic), got {chunk}")
    head = _head_module(model)
    params = head.trainable_parameters() if head_grads and weights is not None else {}
    vocab = mx.arange(model.args.vocab_size)

    def pullback(params, rows, cotangent):  # its gradient is the head's vector-Jacobian product
        head.update(params)
        return (model.head(rows) * cotangent).sum()

    pull_back = mx.grad(pullback, argnums=(0, 1) if params else 1)

    logprobs, d_rows, d_params, finished = [], [], None, []
    for start in range(0, hidden.shape[0], chunk):
        rows = mx.stop_gradient(hidden[start : start + chunk])
        if finished:
            rows = mx.depends(rows, finished)
        rows_targets = targets[start : start + chunk]
        logits = model.head(rows)
        logsumexp = mx.logsumexp(logits, axis=-1)
        chunk_logprobs = mx.take_along_axis(logits, rows_targets[:, None], axis=-1)[:, 0] - logsumexp
        finished = [chunk_logprobs]
        if weights is not None:
            # d(weights * log p(target)) / d logits = weights * (onehot(target) - softmax)
            d_logits = (vocab == rows_targets[:, None]) - mx.exp(logits - logsumexp[:, None])
            d_logits = mx.stop_gradient(d_logits * weights[start : start + chunk, None])
            if params:
                d_chunk_params, d_chunk_rows = pull_back(params, rows, d_logits)
                d_params = d_chunk_params if d_params is None else tree_map(mx.add, d_params, d_chunk_params)
                finished += [g for _, g in tree_flatten(d_params)]
            else:
                d_chunk_rows = pull_back(params, rows, d_logits)
            d_rows.append(d_chunk_rows)
            finished.append(d_chunk_rows)
        logprobs.append(chunk_logprobs)
    if params:
        head.update(params)  # `pullback` left the last chunk's arrays in the module
    head_pairs = []
    if d_params is not None:
        head_pairs = [
            (p, mx.stop_gradient(g))
            for (_, p), (_, g) in zip(tree_flatten(params), tree_flatten(d_params), strict=True)
        ]
    d_hidden = mx.stop_gradient(mx.concatenate(d_rows)) if d_rows else None
    return mx.stop_gradient(mx.concatenate(logprobs)), d_hidden, head_pairs


def _zero_with_gradient(x: mx.array, gradient: mx.array) -> mx.array:
    """Exactly 0, with `gradient` as its gradient with respect to `x`."""
    return ((x - mx.stop_gradient(x)) * gradient).sum()
