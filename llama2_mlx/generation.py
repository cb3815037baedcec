"""Text generation: one core loop (prefill with a KV cache, then token by token) under thin wrappers.

`generate_rows` is the loop. It runs a batch of prompts (left-padded, with a boolean mask that hides the pads) and
optionally K samples of each; RoPE depends only on relative positions, so a left-padded row computes the same
attention as the same prompt alone. Sequences that produce EOS leave the batch. The next step is queued on the
device before the current token is read back, so Python overhead overlaps with compute.

Wrappers: `stream_generate` (text pieces as they arrive, for the CLI), `generate` (a string, the public API),
`generate_batch` / `generate_batch_ids` (many prompts x K samples in one batch, for rejection sampling).
Chats that outgrow the context lose their oldest whole user/assistant pairs (the system prompt stays), reported in
`GenerationStats.dropped_turns`; a turn is never cut in the middle.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import mlx.core as mx

from llama2_mlx.detokenizer import StreamingDetokenizer
from llama2_mlx.errors import Llama2MLXError
from llama2_mlx.model import Llama
from llama2_mlx.sampling import check_sampling, fresh_seed, sample
from llama2_mlx.tokenizer import Message, Tokenizer

Prompt = str | Sequence[Message]


@dataclass
class GenerationStats:
    """Throughput and memory of one generation call (filled in while it runs)."""

    prompt_tokens: int = 0
    prompt_seconds: float = 0.0  # prefill, up to the first sampled token
    generation_tokens: int = 0  # sampled tokens, over all rows, EOS included
    decode_tokens: int = 0  # those sampled after the first step: the ones `generation_seconds` covers
    generation_seconds: float = 0.0  # from the first sampled token to the last
    peak_memory: int = 0  # bytes, mx.get_peak_memory()
    dropped_turns: int = 0  # user/assistant pairs dropped to fit the context

    @property
    def prompt_tps(self) -> float:
        return self.prompt_tokens / self.prompt_seconds if self.prompt_seconds else 0.0

    @property
    def generation_tps(self) -> float:
        """Tokens per second after the first step (the first token's time belongs to the prefill)."""
        return self.decode_tokens / self.generation_seconds if self.generation_seconds else 0.0

    def summary(self) -> str:
        return (
            f"prompt: {self.prompt_tokens} tokens, {self.prompt_tps:.1f} tokens/s | "
            f"generation: {self.generation_tokens} tokens, {self.generation_tps:.1f} tokens/s | "
            f"peak memory: {self.peak_memory / 1e9:.3f} GB"
        )


@dataclass(frozen=True)
class GenerationChunk:
    """One step of `stream_generate`: the text that became final, and where the generation stands."""

    text: str
    token: int | None  # None on the last chunk
    stats: GenerationStats
    finish_reason: str | None = None  # "eos" | "length" on the last chunk


def fit_dialog(tok: Tokenizer, messages: Sequence[Message], budget: int) -> tuple[list[int], int]:
    """Chat-format ids of `messages` in at most `budget` tokens, dropping the oldest whole user/assistant pairs.

    The system message (if any) stays. Returns `(ids, dropped_pairs)`; a last turn that alone is too long is an error.
    """
    messages = list(messages)
    ids = tok.encode_dialog(messages)  # also checks roles and tags before anything is dropped
    start = 1 if messages[0]["role"] == "system" else 0
    dropped = 0
    while len(ids) > budget:
        if len(messages) - start < 3:
            raise Llama2MLXError(
                f"the last message needs {len(ids)} prompt tokens but only {budget} fit in the context "
                "(max_seq_len minus room for the answer); shorten it or lower --max-tokens"
            )
        del messages[start : start + 2]
        dropped += 1
        ids = tok.encode_dialog(messages)
    return ids, dropped


def encode_prompt(tok: Tokenizer, prompt: Prompt, max_seq_len: int, max_tokens: int) -> tuple[list[int], int]:
    """Prompt ids: messages -> Llama 2 chat format (fitted to the context), a str -> BOS + text.

    Room is kept for the answer: `max_tokens`, but at most half the context. Returns `(ids, dropped_pairs)`.
    """
    budget = max_seq_len - min(max_tokens, max_seq_len // 2)
    if isinstance(prompt, str):
        ids = tok.encode(prompt, bos=True, eos=False)
        if len(ids) > budget:
            raise Llama2MLXError(f"the prompt is {len(ids)} tokens; at most {budget} fit in the context")
        return ids, 0
    return fit_dialog(tok, prompt, budget)


def generate_rows(
    model: Llama,
    prompts: Sequence[Sequence[int]],
    *,
    eos_id: int,
    max_tokens: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    seed: int | None = None,
    n_samples: int = 1,
    stats: GenerationStats | None = None,
) -> Iterator[list[tuple[int, int]]]:
    """The core loop. Yields, per step, `(row, token)` for every row still running.

    Sampling (temperature > 0) is repeatable with a `seed`; without one each call draws a fresh seed.

    Row `p * n_samples + k` is sample k of prompt p. A row stops after yielding EOS; all stop after `max_tokens`
    or when the context (`model.args.max_seq_len`) is full.
    """
    check_sampling(temperature, top_p, top_k)
    if not prompts:
        raise Llama2MLXError("no prompts to generate from")
    if any(len(p) == 0 for p in prompts):
        raise Llama2MLXError("every prompt needs at least one token")
    if n_samples < 1:
        raise Llama2MLXError(f"n_samples must be >= 1, got {n_samples}")
    stats = stats if stats is not None else GenerationStats()
    width = max(len(p) for p in prompts)
    max_tokens = min(max_tokens, model.args.max_seq_len - width)
    if max_tokens <= 0:
        return
    mx.reset_peak_memory()
    start = time.perf_counter()

    # Prefill: each distinct prompt once, left-padded; K samples then share copies of its cache rows.
    pads = [width - len(p) for p in prompts]
    tokens = mx.array([[eos_id] * pad + list(p) for pad, p in zip(pads, prompts, strict=True)])
    pad_array = mx.array(pads) if any(pads) else None
    cache = model.make_cache()
    logits = _prefill(model, tokens, pad_array, cache)
    if n_samples > 1:
        rows = mx.repeat(mx.arange(len(prompts)), n_samples)
        for layer_cache in cache:
            layer_cache.select(rows)
        logits = logits[rows]
        pad_array = pad_array[rows] if pad_array is not None else None

    key = mx.random.key(fresh_seed() if seed is None else seed)

    def next_token(logits: mx.array) -> mx.array:
        nonlocal key
        if temperature == 0:
            return sample(logits)
        key, subkey = mx.random.split(key)
        return sample(logits, temperature, top_p, top_k, subkey)

    active = list(range(len(prompts) * n_samples))
    y = next_token(logits)
    mx.async_eval(y)
    stats.prompt_tokens = sum(len(p) for p in prompts)
    for step in range(max_tokens):
        if step + 1 < max_tokens:  # queue the next step before reading this token back
            offset = cache[0].offset
            mask = left_padding_mask(pad_array, offset, offset + 1)
            next_y = next_token(model(y[:, None], mask=mask, cache=cache)[:, -1, :])
            mx.async_eval(next_y)
        ids = y.tolist()
        now = time.perf_counter()
        if step == 0:
            stats.prompt_seconds = now - start
            first = now
        stats.generation_tokens += len(ids)
        stats.decode_tokens += len(ids) if step else 0
        stats.generation_seconds = now - first
        stats.peak_memory = mx.get_peak_memory()
        yield list(zip(active, ids, strict=True))
        keep = [i for i, token in enumerate(ids) if token != eos_id]
        if step + 1 == max_tokens or not keep:
            return
        if len(keep) < len(ids):
            rows = mx.array(keep)
            for layer_cache in cache:
                layer_cache.select(rows)
            next_y = next_y[rows]
            pad_array = pad_array[rows] if pad_array is not None else None
            active = [active[i] for i in keep]
        y = next_y


def _prefill(
    model: Llama, tokens: mx.array, pads: mx.array | None, cache: list, chunk: int = 512
) -> mx.array:
    """Run the prompt into the cache in chunks; logits [batch, vocab] of the last position only.

    Only the cache of the first width-1 positions is evaluated, so the vocabulary projection is never computed
    for prompt positions whose logits nobody reads (it is the largest matmul of a small model).
    """
    width = tokens.shape[1]
    for start in range(0, width - 1, chunk):
        end = min(start + chunk, width - 1)
        model(tokens[:, start:end], mask=left_padding_mask(pads, start, end), cache=cache)
        mx.eval([c.keys for c in cache] + [c.values for c in cache])
    return model(tokens[:, -1:], mask=left_padding_mask(pads, width - 1, width), cache=cache)[:, -1, :]


def left_padding_mask(pads: mx.array | None, start: int, end: int) -> mx.array | None:
    """Mask for query positions [start, end) over keys [0, end) that also hides each row's left padding.

    [batch, 1, end - start, end], True = may attend; None (the model's causal mask) when nothing is padded.
    A pad position attends to itself only, so its unused hidden state stays finite instead of NaN.
    """
    if pads is None:
        return None
    query, key = mx.arange(start, end)[:, None], mx.arange(end)[None, :]
    real_key = (key >= pads[:, None])[:, None, :]  # [batch, 1, end]
    mask = (key <= query)[None] & (real_key | (key == query)[None])
    return mask[:, None]


def stream_generate(
    model: Llama,
    tok: Tokenizer,
    prompt: Prompt,
    max_tokens: int = 256,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    seed: int | None = None,
) -> Iterator[GenerationChunk]:
    """Text pieces of one answer as they are generated; the last chunk has `token=None` and a finish reason."""
    ids, dropped = encode_prompt(tok, prompt, model.args.max_seq_len, max_tokens)
    stats = GenerationStats(dropped_turns=dropped)
    detok = StreamingDetokenizer(tok)
    reason = "length"
    for ((_, token),) in generate_rows(
        model, [ids], eos_id=tok.eos_id, max_tokens=max_tokens, temperature=temperature, top_p=top_p,
        top_k=top_k, seed=seed, stats=stats,
    ):  # fmt: skip
        if token == tok.eos_id:
            reason = "eos"
            break
        yield GenerationChunk(detok.add(token), token, stats)
    yield GenerationChunk(detok.finish(), None, stats, reason)


def generate(
    model: Llama,
    tok: Tokenizer,
    prompt: Prompt,
    max_tokens: int = 64,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    seed: int | None = None,
) -> str:
    """The answer to `prompt` (a list of messages -> Llama 2 chat format; a str -> plain continuation of BOS + text)."""
    return "".join(
        chunk.text
        for chunk in stream_generate(model, tok, prompt, max_tokens, temperature, top_p, top_k, seed)
    )


def generate_batch_ids(
    model: Llama,
    tok: Tokenizer,
    prompts: Sequence[Prompt],
    n_samples: int = 1,
    max_tokens: int = 64,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    seed: int | None = None,
) -> tuple[list[list[list[int]]], GenerationStats]:
    """Answer token ids (EOS removed) `[prompt][sample]` for all prompts x `n_samples`, decoded in one batch."""
    encoded = [encode_prompt(tok, prompt, model.args.max_seq_len, max_tokens) for prompt in prompts]
    stats = GenerationStats(dropped_turns=sum(dropped for _, dropped in encoded))
    answers: list[list[int]] = [[] for _ in range(len(prompts) * n_samples)]
    for step in generate_rows(
        model, [ids for ids, _ in encoded], eos_id=tok.eos_id, max_tokens=max_tokens, temperature=temperature,
        top_p=top_p, top_k=top_k, seed=seed, n_samples=n_samples, stats=stats,
    ):  # fmt: skip
        for row, token in step:
            if token != tok.eos_id:
                answers[row].append(token)
    return [answers[p * n_samples : (p + 1) * n_samples] for p in range(len(prompts))], stats


def generate_batch(
    model: Llama,
    tok: Tokenizer,
    prompts: Sequence[Prompt],
    n_samples: int = 1,
    max_tokens: int = 64,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    seed: int | None = None,
) -> list[list[str]]:
    """Answers `[prompt][sample]` for many prompts x K samples, decoded together in one batch."""
    ids, _ = generate_batch_ids(model, tok, prompts, n_samples, max_tokens, temperature, top_p, top_k, seed)
    return [[tok.decode(answer) for answer in samples] for samples in ids]
