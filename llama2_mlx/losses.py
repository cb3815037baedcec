"""Next-token cross-entropy with a loss mask and optional packed-document attention, in the trainer's contract.

Returns (sum of losses, number of trained tokens); the training loop divides the sums of the whole global batch,
so the loss is the mean over every trained token however the batch is split, packed or distributed.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn


def document_mask(doc_ids: mx.array) -> mx.array:
    """[B, L] document ids -> [B, 1, L, L] boolean mask: causal, and only within the same document."""
    length = doc_ids.shape[1]
    causal = mx.arange(length)[:, None] >= mx.arange(length)[None, :]
    same = doc_ids[:, :, None] == doc_ids[:, None, :]
    return mx.expand_dims(same & causal, 1)


def next_token_loss(
    model: nn.Module, tokens: mx.array, loss_mask: mx.array, doc_ids: mx.array | None = None
) -> tuple[mx.array, mx.array]:
    """Cross-entropy of predicting tokens[:, t] from tokens[:, :t], summed where loss_mask[:, t] is True.

    `loss_mask` is aligned with `tokens` and marks TARGET tokens (an example's first token is never one, so a
    packed document is never trained to follow the previous one). With `doc_ids` attention stays inside each
    document of a packed row.
    """
    inputs, targets, mask = tokens[:, :-1], tokens[:, 1:], loss_mask[:, 1:]
    attention = None
    if doc_ids is not None:
        attention = document_mask(doc_ids[:, :-1])
    logits = model(inputs, mask=attention)
    losses = nn.losses.cross_entropy(logits, targets, reduction="none")
    mask = mask.astype(mx.float32)
    return (losses * mask).sum(), mask.sum()
