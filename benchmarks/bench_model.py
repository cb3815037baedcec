"""Forward pass and one decode step: our Llama vs mlx-lm's Llama on the same weights, in one run.

    python benchmarks/bench_model.py [--dim 512 --layers 8 --prompt 128]

Prints seconds for each and the ratio mlx-lm time / our time (>= 1 means ours is as fast or faster).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import machine, time_pair  # noqa: E402
from llama2_mlx.config import ModelArgs, ffn_hidden_dim  # noqa: E402
from llama2_mlx.model import Llama  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--batch", type=int, default=1)
    opts = parser.parse_args()

    import mlx_lm.models.llama as mlx_lm_llama
    from mlx_lm.models.cache import make_prompt_cache

    args = ModelArgs(dim=opts.dim, n_layers=opts.layers, n_heads=opts.heads, n_kv_heads=opts.kv_heads,
                     vocab_size=opts.vocab, hidden_dim=ffn_hidden_dim(opts.dim, 256))  # fmt: skip
    mx.random.seed(0)
    ours = Llama(args)
    theirs = mlx_lm_llama.Model(
        mlx_lm_llama.ModelArgs.from_dict({"model_type": "llama", **args.to_hf_config()})
    )
    theirs.load_weights(tree_flatten(ours.parameters()))
    mx.eval(ours.parameters(), theirs.parameters())

    prompt = mx.random.randint(0, opts.vocab, (opts.batch, opts.prompt))
    token = prompt[:, -1:]

    def decode_step(model, cache):
        """One new token after the prompt; trimming back keeps every timed step identical."""
        mx.eval(model(prompt, cache=cache))

        def step():
            logits = model(token, cache=cache)
            mx.eval(logits)
            for layer in cache:
                layer.trim(1)
            return logits

        return step

    results = {
        "forward (prompt)": time_pair(lambda: ours(prompt), lambda: theirs(prompt)),
        "decode step": time_pair(
            decode_step(ours, ours.make_cache()), decode_step(theirs, make_prompt_cache(theirs)), repeats=20
        ),
    }
    params = sum(v.size for _, v in tree_flatten(ours.parameters()))
    print(f"machine: {machine()}")
    print(
        f"model: dim {opts.dim}, {opts.layers} layers, {opts.heads} heads / {opts.kv_heads} KV heads, "
        f"vocab {opts.vocab} ({params / 1e6:.0f}M params, float32); batch {opts.batch}, prompt {opts.prompt}"
    )
    print(f"{'':18} {'ours ms':>9} {'mlx-lm ms':>10} {'mlx-lm/ours':>12}")
    for name, (t_ours, t_theirs) in results.items():
        print(f"{name:18} {t_ours * 1e3:9.2f} {t_theirs * 1e3:10.2f} {t_theirs / t_ours:12.2f}")


if __name__ == "__main__":
    main()
