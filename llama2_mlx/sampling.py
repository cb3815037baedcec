"""Choosing the next token: greedy, temperature, nucleus top-p exactly as Meta's `sample_top_p`, optional top-k.

Randomness comes only from an explicit `mx.random` key, so a seed makes a whole generation repeatable; without a
seed each generation draws a fresh one (`fresh_seed`), so sampling twice gives two samples.
"""

from __future__ import annotations

import secrets

import mlx.core as mx

from llama2_mlx.errors import Llama2MLXError


def check_sampling(temperature: float, top_p: float, top_k: int) -> None:
    """Reject settings that have no meaning, naming the flag (called once, before a generation starts)."""
    if not temperature >= 0:
        raise Llama2MLXError(f"temperature must be >= 0, got {temperature}")
    if not 0 < top_p <= 1:
        raise Llama2MLXError(f"top_p must be in (0, 1], got {top_p}")
    if top_k < 0:
        raise Llama2MLXError(f"top_k must be >= 0 (0 = off), got {top_k}")


def fresh_seed() -> int:
    """A new random seed from the operating system, for generations that were given none."""
    return secrets.randbits(32)


# Sorting a 32000-entry distribution costs about 3 ms a row on a CPU, more than a small model's decode step. A
# trained model's nucleus nearly always lies within its top few hundred tokens, so those are sorted first.
CANDIDATES = 1024


def nucleus(probs: mx.array, top_p: float, top_k: int = 0) -> tuple[mx.array, mx.array]:
    """The distribution Meta's `sample_top_p` draws from, in descending order: `(kept_probs, token_ids)`.

    Sort descending, drop every token whose cumulative mass *before* it exceeds `top_p` (so the token that
    crosses `top_p` stays), keep at most `top_k` tokens when `top_k > 0`, renormalise. Shapes [batch, n] with
    n <= vocab: when the top `CANDIDATES` (or top-k) tokens of every row already hold more than `top_p`, every
    other token is dropped by the rule above, so only those are sorted; otherwise the whole vocabulary is.
    """
    n = top_k if top_k > 0 else CANDIDATES
    if n < probs.shape[-1]:
        candidates = mx.argpartition(-probs, n - 1, axis=-1)[:, :n]
        candidate_probs = mx.take_along_axis(probs, candidates, axis=-1)
        if top_k > 0 or mx.all(candidate_probs.sum(axis=-1) > top_p).item():
            kept, order = _sorted_nucleus(candidate_probs, top_p, top_k)
            return kept, mx.take_along_axis(candidates, order, axis=-1)
    return _sorted_nucleus(probs, top_p, top_k)


def _sorted_nucleus(probs: mx.array, top_p: float, top_k: int) -> tuple[mx.array, mx.array]:
    order = mx.argsort(-probs, axis=-1)
    ranked = mx.take_along_axis(probs, order, axis=-1)
    if top_p < 1.0:
        ranked = mx.where(mx.cumsum(ranked, axis=-1) - ranked > top_p, 0.0, ranked)
    if 0 < top_k < probs.shape[-1]:
        ranked = mx.where(mx.arange(probs.shape[-1]) < top_k, ranked, 0.0)
    return ranked / ranked.sum(axis=-1, keepdims=True), order


def sample(
    logits: mx.array,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    key: mx.array | None = None,
) -> mx.array:
    """Next token ids [batch] (uint32) from float32 logits [batch, vocab]; argmax when `temperature` is 0."""
    if temperature == 0:
        return mx.argmax(logits, axis=-1).astype(mx.uint32)
    scaled = logits.astype(mx.float32) / temperature
    if top_p >= 1.0 and top_k == 0:
        return mx.random.categorical(scaled, axis=-1, key=key).astype(mx.uint32)
    kept, order = nucleus(mx.softmax(scaled, axis=-1), top_p, top_k)
    rank = mx.random.categorical(mx.log(kept), axis=-1, key=key)
    return mx.take_along_axis(order, rank[:, None], axis=-1)[:, 0].astype(mx.uint32)
