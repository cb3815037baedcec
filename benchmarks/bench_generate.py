"""Generation speed: llama2-mlx vs mlx-lm on the same model folder and prompt, in one run; batched K-sampling.

    python benchmarks/bench_generate.py            # about 2 minutes on 2 CPU cores (MLX CPU backend)

Builds its own model folder (random weights, a tokenizer trained here) in a temporary directory, float32 and a
4-bit copy (`nn.quantize`, group 64: mlx-lm's layout, so `mlx_lm.load` reads the same folder). For each it
times, alternating rounds of the two libraries after a warm-up each:

* our `stream_generate` (what `llama2-mlx generate` runs) vs `mlx_lm.stream_generate`, greedy, the same prompt
  ids, both measured here around the iterators, the same way: prompt tokens/s = prompt length / time to the first
  token (best round), decode tokens/s = 1 / the median interval between consecutive tokens over all rounds;
* K answers of one prompt sampled in one batch (`generate_batch_ids`, n_samples=K) vs K sequential generations,
  at temperature 0.8 with top-p off (plain temperature sampling, as Llama 2's rejection sampling) and top-p 0.95
  (whose exact nucleus needs a full sort of the vocabulary per row and step when the distribution is flat, as a
  random-weight model's is: a cost batching cannot share);
* the cost of one top-p nucleus on flat and on peaked logits, ours vs a full sort.

On a machine shared with other work, bursts of load hit single rounds and single tokens: the best round and the
median token interval of interleaved rounds are the steadiest estimates of what each library can do.
The EOS row of the output projection is zeroed so that greedy decoding never stops early and both libraries
produce exactly `--gen-tokens` tokens (checked, and the token ids of the two libraries are compared).
"""

from __future__ import annotations

import argparse
import platform
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx_lm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from llama2_mlx.config import ModelArgs  # noqa: E402
from llama2_mlx.generation import generate_batch_ids, stream_generate  # noqa: E402
from llama2_mlx.loading import load  # noqa: E402
from llama2_mlx.model import Llama  # noqa: E402
from llama2_mlx.model_folder import save_model  # noqa: E402
from llama2_mlx.sampling import CANDIDATES, _sorted_nucleus, nucleus  # noqa: E402
from llama2_mlx.tokenizer_training import train_tokenizer  # noqa: E402


def synthetic_corpus(n_lines: int, seed: int = 0) -> list[str]:
    """Made-up words from syllables: enough distinct text for a 32000-piece BPE vocabulary."""
    rng = random.Random(seed)
    syllables = [c + v for c in "bcdfghjklmnprstvwz" for v in "aeiou"] + list("aeiou")
    words = ["".join(rng.choice(syllables) for _ in range(rng.randint(1, 4))) for _ in range(60000)]
    return [" ".join(rng.choice(words) for _ in range(20)) for _ in range(n_lines)]


def build_folders(root: Path, args: argparse.Namespace) -> tuple[Path, Path, str]:
    corpus = synthetic_corpus(30000)
    train_tokenizer(corpus, args.vocab, root / "tokenizer")
    config = ModelArgs(dim=args.dim, n_layers=args.layers, n_heads=args.heads, n_kv_heads=args.heads,
                       vocab_size=args.vocab, hidden_dim=args.hidden, max_seq_len=4096)  # fmt: skip
    mx.random.seed(0)
    model = Llama(config)
    model.lm_head.weight[2] = 0.0  # EOS logit is always 0, never the argmax: fixed-length greedy runs
    mx.eval(model.parameters())
    save_model(model, root / "float32", tokenizer_dir=root / "tokenizer")
    nn.quantize(model, group_size=64, bits=4)
    save_model(model, root / "q4", tokenizer_dir=root / "tokenizer")
    return root / "float32", root / "q4", " ".join(corpus[:200])


def time_stream(responses, prompt_tokens: int) -> tuple[float, list[float], list[int]]:
    """(prompt tokens/s, the intervals between consecutive tokens, token ids) measured around an iterator."""
    start = time.perf_counter()
    tokens, stamps = [], []
    for token in responses:
        stamps.append(time.perf_counter())
        tokens.append(token)
    return (
        prompt_tokens / (stamps[0] - start),
        [b - a for a, b in zip(stamps, stamps[1:], strict=False)],
        tokens,
    )


def ours_stream(model, tok, text: str, n: int):
    for chunk in stream_generate(model, tok, text, max_tokens=n, temperature=0.0):
        if chunk.token is not None:
            yield chunk.token


def mlx_lm_stream(model, tokenizer, ids: list[int], n: int):
    for response in mlx_lm.stream_generate(model, tokenizer, ids, max_tokens=n):
        yield response.token


def compare(folder: Path, text: str, args: argparse.Namespace) -> dict[str, float]:
    ours, tok = load(folder)
    theirs, tokenizer = mlx_lm.load(str(folder))
    text = tok.decode(tok.encode(text)[: args.prompt_tokens])
    ids = tok.encode(text)  # exactly what our stream_generate encodes (BOS + text)
    runs = {"ours": [], "mlx_lm": []}
    for round_ in range(args.rounds + 1):  # round 0 is the warm-up
        for name in ("ours", "mlx_lm") if round_ % 2 else ("mlx_lm", "ours"):
            stream = ours_stream(ours, tok, text, args.gen_tokens) if name == "ours" else \
                mlx_lm_stream(theirs, tokenizer, ids, args.gen_tokens)  # fmt: skip
            result = time_stream(stream, len(ids))
            if round_:
                runs[name].append(result)
    tokens = {name: results[0][2] for name, results in runs.items()}
    if any(len(t) != args.gen_tokens for t in tokens.values()):
        raise SystemExit(f"a run stopped early: {[len(t) for t in tokens.values()]} tokens")
    out = {"same_tokens": tokens["ours"] == tokens["mlx_lm"], "prompt": len(ids)}
    for name, results in runs.items():
        out[f"{name}_prompt_tps"] = max(r[0] for r in results)
        out[f"{name}_decode_tps"] = 1 / statistics.median(dt for r in results for dt in r[1])
    return out


def batched_vs_sequential(
    folder: Path, text: str, top_p: float, args: argparse.Namespace
) -> dict[str, float]:
    model, tok = load(folder)
    prompt = tok.decode(tok.encode(text)[: args.batch_prompt_tokens])
    settings = dict(max_tokens=args.batch_gen_tokens, temperature=0.8, top_p=top_p)
    generate_batch_ids(model, tok, [prompt], n_samples=2, **settings)  # warm-up
    start = time.perf_counter()
    ids, _ = generate_batch_ids(model, tok, [prompt], n_samples=args.k, seed=0, **settings)
    batched_seconds = time.perf_counter() - start
    batched_tokens = sum(len(answer) for answer in ids[0])
    start = time.perf_counter()
    sequential_tokens = 0
    for k in range(args.k):
        ids, _ = generate_batch_ids(model, tok, [prompt], n_samples=1, seed=k, **settings)
        sequential_tokens += len(ids[0][0])
    sequential_seconds = time.perf_counter() - start
    return {"batched_tps": batched_tokens / batched_seconds, "sequential_tps": sequential_tokens / sequential_seconds,
            "batched_tokens": batched_tokens, "sequential_tokens": sequential_tokens}  # fmt: skip


def sampler_costs(vocab: int) -> list[tuple[int, str, float, float, float]]:
    """ms per call of the top-p 0.9 nucleus at T 0.8: ours (candidate shortcut) vs sorting the whole vocabulary.

    "flat" logits are like a random-weight model's; "peaked" (4x wider logits) put nearly all mass in the top
    1024 tokens, as a trained model's do.
    """

    def ms(fn, n: int = 20) -> float:
        mx.eval(fn())
        start = time.perf_counter()
        for _ in range(n):
            mx.eval(fn())
        return (time.perf_counter() - start) / n * 1e3

    rows = []
    for batch in (1, 8):
        for name, width in (("flat", 1.0), ("peaked", 4.0)):
            logits = mx.random.normal((batch, vocab), key=mx.random.key(0)) * width
            probs = mx.softmax(logits / 0.8, axis=-1)
            mass = mx.sort(probs, axis=-1)[:, -CANDIDATES:].sum(axis=-1).min().item()
            ours = ms(lambda probs=probs: nucleus(probs, 0.9))
            full = ms(lambda probs=probs: _sorted_nucleus(probs, 0.9, 0))
            rows.append((batch, name, mass, ours, full))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--heads", type=int, default=6)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--prompt-tokens", type=int, default=192)
    parser.add_argument("--batch-prompt-tokens", type=int, default=64)
    parser.add_argument("--batch-gen-tokens", type=int, default=32)
    parser.add_argument("--gen-tokens", type=int, default=48)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--k", type=int, default=8)
    args = parser.parse_args()

    print(f"machine: {platform.machine()} {platform.system()}, MLX {mx.__version__} ({mx.default_device()}), "
          f"mlx-lm {mlx_lm.__version__}")  # fmt: skip
    print(f"model: dim {args.dim}, {args.layers} layers, {args.heads} heads, hidden {args.hidden}, "
          f"vocab {args.vocab}; prompt {args.prompt_tokens} tokens, {args.gen_tokens} generated, "
          f"{args.rounds} interleaved rounds")  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        float32, q4, text = build_folders(Path(tmp), args)
        print(
            "\n| weights | prompt tok/s ours | mlx-lm | ratio | decode tok/s ours | mlx-lm | ratio | same ids |"
        )
        print("|---|---|---|---|---|---|---|---|")
        for name, folder in (("float32", float32), ("4-bit", q4)):
            r = compare(folder, text, args)
            print(f"| {name} | {r['ours_prompt_tps']:.1f} | {r['mlx_lm_prompt_tps']:.1f} | "
                  f"{r['ours_prompt_tps'] / r['mlx_lm_prompt_tps']:.2f} | {r['ours_decode_tps']:.1f} | "
                  f"{r['mlx_lm_decode_tps']:.1f} | {r['ours_decode_tps'] / r['mlx_lm_decode_tps']:.2f} | "
                  f"{r['same_tokens']} |", flush=True)  # fmt: skip
        print(f"\nK={args.k} answers to one {args.batch_prompt_tokens}-token prompt, {args.batch_gen_tokens} tokens "
              "each, temperature 0.8, float32: one batch vs K sequential generations")  # fmt: skip
        print("\n| top-p | batched tok/s | sequential tok/s | ratio |")
        print("|---|---|---|---|")
        for top_p in (1.0, 0.95):
            b = batched_vs_sequential(float32, text, top_p, args)
            print(
                f"| {top_p} | {b['batched_tps']:.1f} | {b['sequential_tps']:.1f} | "
                f"{b['batched_tps'] / b['sequential_tps']:.2f}x |",
                flush=True,
            )
    print(f"\nTop-p 0.9 nucleus, vocab {args.vocab}: ours (top-{CANDIDATES} shortcut) vs a full sort")
    print("\n| rows | logits | top-1024 mass | ours ms | full sort ms | full / ours |")
    print("|---|---|---|---|---|---|")
    for batch, name, mass, ours, full in sampler_costs(args.vocab):
        print(f"| {batch} | {name} | {mass:.3f} | {ours:.2f} | {full:.2f} | {full / ours:.2f}x |")


if __name__ == "__main__":
    main()
