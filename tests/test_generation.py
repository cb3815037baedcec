"""Generation on the tiny random model: cache vs full recompute, batched == sequential, EOS, seeds, context fitting."""

from __future__ import annotations

import copy

import mlx.core as mx
import numpy as np
import pytest

from llama2_mlx.errors import Llama2MLXError
from llama2_mlx.generation import (
    _prefill,
    encode_prompt,
    fit_dialog,
    generate,
    generate_batch,
    generate_batch_ids,
    generate_rows,
    stream_generate,
)
from llama2_mlx.tokenizer import Tokenizer
from tests.conftest import random_model, tiny_args

PROMPTS = [
    "hello world",
    "the quick brown fox jumps over the lazy dog and what is the answer",
    "a",
    [{"role": "system", "content": "speak in french"}, {"role": "user", "content": "bonjour"}],
]


@pytest.fixture(scope="module")
def tok(tokenizer_dir) -> Tokenizer:
    return Tokenizer(tokenizer_dir / "tokenizer.model")


@pytest.fixture(scope="module")
def model():
    return random_model(tiny_args(), seed=1)


def greedy_without_cache(model, ids: list[int], n: int) -> list[int]:
    """Reference: recompute the whole sequence every step, no cache, no batching."""
    ids = list(ids)
    for _ in range(n):
        ids.append(int(mx.argmax(model(mx.array([ids]))[0, -1]).item()))
    return ids[-n:]


def rows(model, prompts, eos_id, max_tokens, **kwargs) -> list[list[int]]:
    out = [[] for _ in range(len(prompts) * kwargs.get("n_samples", 1))]
    for step in generate_rows(model, prompts, eos_id=eos_id, max_tokens=max_tokens, **kwargs):
        for row, token in step:
            out[row].append(token)
    return out


def test_cached_greedy_equals_full_recompute(model, tok):
    ids = tok.encode("the quick brown fox")
    expected = greedy_without_cache(model, ids, 12)
    assert rows(model, [ids], eos_id=-1, max_tokens=12) == [expected]


def test_batched_greedy_equals_one_at_a_time(model, tok):
    one_by_one = [generate(model, tok, prompt, max_tokens=24) for prompt in PROMPTS]
    batched = generate_batch(model, tok, PROMPTS, max_tokens=24)
    assert batched == [[answer] for answer in one_by_one]
    assert len({len(encode_prompt(tok, p, 512, 24)[0]) for p in PROMPTS}) == len(
        PROMPTS
    )  # all lengths differ


def test_rows_that_hit_eos_leave_the_batch(model, tok):
    """Use a token that row 0 produces early as 'EOS': that row stops, the others go on unchanged."""
    prompts = [tok.encode(p) for p in PROMPTS[:3]]
    free = [rows(model, [p], eos_id=-1, max_tokens=16)[0] for p in prompts]
    stop = free[0][3]
    expected = [seq[: seq.index(stop) + 1] if stop in seq else seq for seq in free]
    assert len(expected[0]) <= 4 and any(len(seq) == 16 for seq in expected)
    assert rows(model, prompts, eos_id=stop, max_tokens=16) == expected
    assert [rows(model, [p], eos_id=stop, max_tokens=16)[0] for p in prompts] == expected


def test_samples_per_prompt(model, tok):
    prompts = [tok.encode(p) for p in PROMPTS[:2]]
    greedy = rows(model, prompts, eos_id=-1, max_tokens=8, n_samples=3)
    assert greedy[:3] == [greedy[0]] * 3 and greedy[3:] == [greedy[3]] * 3
    assert greedy[0] == rows(model, prompts[:1], eos_id=-1, max_tokens=8)[0]
    kwargs = dict(eos_id=-1, max_tokens=8, n_samples=3, temperature=1.0, top_p=0.9, seed=5)
    sampled = rows(model, prompts, **kwargs)
    assert sampled == rows(model, prompts, **kwargs)  # the seed makes it repeatable
    assert len({tuple(s) for s in sampled}) == 6  # independent samples


def test_seed_and_sampling(model, tok):
    kwargs = dict(max_tokens=16, temperature=0.8, top_p=0.9, top_k=50)
    a = generate(model, tok, "hello", seed=1, **kwargs)
    assert a == generate(model, tok, "hello", seed=1, **kwargs)
    assert a != generate(model, tok, "hello", seed=2, **kwargs)
    with pytest.raises(Llama2MLXError, match="top_p"):
        generate(model, tok, "hello", top_p=0.0)


def test_stream_chunks_and_stats(model, tok):
    chunks = list(stream_generate(model, tok, "hello world", max_tokens=10))
    assert "".join(c.text for c in chunks) == generate(model, tok, "hello world", max_tokens=10)
    last = chunks[-1]
    assert last.token is None and last.finish_reason == "length" and len(chunks) == 11
    assert last.stats.prompt_tokens == len(tok.encode("hello world"))
    assert last.stats.generation_tokens == 10 and last.stats.decode_tokens == 9
    assert last.stats.prompt_tps > 0 and last.stats.generation_tps > 0 and last.stats.peak_memory > 0


def test_batch_ids_drop_eos_and_count_tokens(model, tok):
    ids, stats = generate_batch_ids(model, tok, PROMPTS[:2], n_samples=2, max_tokens=5)
    assert [len(s) for s in ids] == [2, 2] and all(len(a) == 5 for s in ids for a in s)
    assert stats.generation_tokens == 20 and stats.prompt_tokens == sum(
        len(tok.encode(p)) for p in PROMPTS[:2]
    )


def dialog(n_pairs: int) -> list[dict]:
    messages = [{"role": "system", "content": "speak in french"}]
    for i in range(n_pairs):
        messages += [{"role": "user", "content": f"what is {i} plus {i}"},
                     {"role": "assistant", "content": f"the answer is {2 * i} " * 3}]  # fmt: skip
    return messages + [{"role": "user", "content": "and the last question"}]


def test_fit_dialog_drops_oldest_whole_pairs(tok):
    messages = dialog(6)
    full = tok.encode_dialog(messages)
    without_two = tok.encode_dialog(messages[:1] + messages[5:])
    ids, dropped = fit_dialog(tok, messages, budget=len(without_two))
    assert (ids, dropped) == (without_two, 2)
    assert fit_dialog(tok, messages, budget=len(full)) == (full, 0)
    only_last = tok.encode_dialog(messages[:1] + messages[-1:])
    assert fit_dialog(tok, messages, budget=len(only_last)) == (only_last, 6)
    with pytest.raises(Llama2MLXError, match="the last message needs"):
        fit_dialog(tok, messages, budget=len(only_last) - 1)


def test_chat_outgrowing_the_context_is_reported(tok):
    small = random_model(tiny_args(max_seq_len=128), seed=2)
    messages = dialog(8)
    assert len(tok.encode_dialog(messages)) > 128
    chunks = list(stream_generate(small, tok, messages, max_tokens=16))
    stats = chunks[-1].stats
    assert stats.dropped_turns > 0 and stats.prompt_tokens <= 128 - 16
    expected, _ = fit_dialog(tok, messages, 128 - 16)
    assert stats.prompt_tokens == len(expected)
    with pytest.raises(Llama2MLXError, match="the prompt is"):
        generate(small, tok, "the answer is " * 60, max_tokens=16)


def test_chunked_prefill_with_padding_matches_full_forward(model, tok):
    """Prefill in chunks of 5 (left-padded rows included) gives the last-position logits of a plain forward."""
    prompts = [tok.encode(p) for p in PROMPTS[:3]]
    width = max(len(p) for p in prompts)
    pads = mx.array([width - len(p) for p in prompts])
    tokens = mx.array([[2] * (width - len(p)) + p for p in prompts])
    logits = _prefill(model, tokens, pads, model.make_cache(), chunk=5)
    for row, prompt in enumerate(prompts):
        expected = model(mx.array([prompt]))[0, -1]
        assert mx.allclose(logits[row], expected, atol=1e-4, rtol=1e-4).item()
    single = _prefill(model, mx.array([prompts[1]]), None, model.make_cache(), chunk=5)
    assert mx.allclose(single[0], model(mx.array([prompts[1]]))[0, -1], atol=1e-4, rtol=1e-4).item()


def test_stream_stops_at_eos(model, tok):
    """With a token the model emits greedily at step 3 standing in for EOS, the stream ends there, EOS unprinted."""
    free = rows(model, [tok.encode("hello world")], eos_id=-1, max_tokens=8)[0]
    stop = free[3]
    stopping = copy.copy(tok)
    stopping.eos_id = stop
    chunks = list(stream_generate(model, stopping, "hello world", max_tokens=8))
    shown = free[: free.index(stop)]
    assert [c.token for c in chunks] == shown + [None]
    assert chunks[-1].finish_reason == "eos" and chunks[-1].stats.generation_tokens == len(shown) + 1
    assert "".join(c.text for c in chunks) == tok.decode(shown)


def constant_distribution_model(vocab: int = 8, seed: int = 3):
    """A model whose next-token logits are the same after every prefix: every token has the same embedding, so
    each position's hidden state (attention averages identical values) is the same too."""
    model = random_model(tiny_args(vocab_size=vocab, max_seq_len=64), seed=seed)
    embedding = model.model.embed_tokens.weight
    model.model.embed_tokens.weight = mx.broadcast_to(embedding[:1] * 4, embedding.shape)
    model.lm_head.weight = model.lm_head.weight * 3  # logits a few units apart
    return model


def test_decode_steps_are_independent_draws_from_the_tempered_nucleus():
    """With one fixed next-token distribution, the tokens of every step follow it, and consecutive tokens of a row
    repeat only as often as independent draws do (sum of q^2).

    Guards against: one RNG key reused for every decode step (each row repeats its first token), and
    generate_rows not passing temperature, top_p or top_k on to the sampler.
    """
    from tests.test_sampling import assert_frequencies_match, nucleus_by_hand

    model = constant_distribution_model()
    logits = np.array(model(mx.array([[1, 2, 3]]))[0], dtype=np.float64)
    assert np.abs(logits - logits[0]).max() < 1e-4  # the same distribution at every position
    expected = nucleus_by_hand(logits[0].tolist(), temperature=0.8, top_p=0.95, top_k=5)
    assert 3 <= (expected > 0).sum() < 8
    out = rows(model, [[1]], eos_id=-1, max_tokens=40, temperature=0.8, top_p=0.95, top_k=5, seed=4,
               n_samples=64)  # fmt: skip
    tokens = np.array(out)  # [64 rows, 40 steps]
    assert_frequencies_match(tokens, expected)
    repeats = (tokens[:, 1:] == tokens[:, :-1]).mean()
    assert abs(repeats - (expected**2).sum()) < 0.05, (repeats, (expected**2).sum())


def test_generation_across_many_cache_growths_equals_full_recompute(model, tok, monkeypatch):
    """Cache buffers of 4 positions: the prefill and every fourth decode step grow them; greedy tokens of a
    left-padded batch still equal a full recompute of each prompt alone.

    Guards against: a cache growth that loses (or misplaces) the positions already cached.
    """
    from llama2_mlx.cache import KVCache

    monkeypatch.setattr(KVCache, "step", 4)
    prompts = [tok.encode(p) for p in PROMPTS[:2]]
    assert min(len(p) for p in prompts) > 4
    expected = [greedy_without_cache(model, p, 10) for p in prompts]
    assert rows(model, prompts, eos_id=-1, max_tokens=10) == expected
