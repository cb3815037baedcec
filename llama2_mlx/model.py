"""The Llama 2 network in MLX, top to bottom like Meta's `llama/model.py`.

Parameter names are the Hugging Face checkpoint keys (`model.layers.0.self_attn.q_proj.weight`, ...), which is
also what our model folders and mlx-lm store, so a folder loads with no renaming. Checkpoint quirks (Meta's
layout, sharding, the rotary permutation) are handled by the converters, not here.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from llama2_mlx.attention import QUERY_BLOCK, blocked_attention
from llama2_mlx.cache import KVCache
from llama2_mlx.config import ModelArgs

# A mask is None (causal), or an array broadcastable to [batch, n_heads, length, cached length + length]:
# boolean (True = may attend) or additive (0 / -inf) in the compute dtype.
Mask = mx.array | None


class RMSNorm(nn.Module):
    """x * rsqrt(mean(x^2) + eps) * weight; `mx.fast.rms_norm` accumulates in float32 as Meta's does."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = mx.ones((dim,))
        self.eps = eps

    def __call__(self, x: mx.array) -> mx.array:
        return mx.fast.rms_norm(x, self.weight, self.eps)


class Attention(nn.Module):
    """Multi-head attention with RoPE and grouped-query attention (each KV head serves consecutive query heads)."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        self.scale = self.head_dim**-0.5
        self.rope_theta, self.rope_traditional = args.rope_theta, args.rope_traditional
        self.q_proj = nn.Linear(args.dim, args.n_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(args.dim, args.n_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(args.dim, args.n_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(args.n_heads * self.head_dim, args.dim, bias=False)

    def rope(self, x: mx.array, offset: int) -> mx.array:
        return mx.fast.rope(
            x,
            self.head_dim,
            traditional=self.rope_traditional,
            base=self.rope_theta,
            scale=1.0,
            offset=offset,
        )

    def __call__(self, x: mx.array, mask: Mask = None, cache: KVCache | None = None) -> mx.array:
        batch, length, _ = x.shape
        # [batch, length, heads * head_dim] -> [batch, heads, length, head_dim]
        q = self.q_proj(x).reshape(batch, length, self.n_heads, self.head_dim).transpose(0, 2, 1, 3)
        k = self.k_proj(x).reshape(batch, length, self.n_kv_heads, self.head_dim).transpose(0, 2, 1, 3)
        v = self.v_proj(x).reshape(batch, length, self.n_kv_heads, self.head_dim).transpose(0, 2, 1, 3)

        offset = cache.offset if cache is not None else 0
        q, k = self.rope(q, offset), self.rope(k, offset)
        if cache is not None:
            k, v = cache.update_and_fetch(k, v)

        # K/V keep n_kv_heads: the fused kernel broadcasts them over query-head groups (no repeat_kv copy);
        # softmax runs in float32 inside it.
        if mask is None and length > 1:
            mask = "causal"
        # Without a cache (training, scoring) a long row attends in blocks of queries: see attention.py.
        long_row = cache is None and length > QUERY_BLOCK
        attend = blocked_attention if long_row else mx.fast.scaled_dot_product_attention
        out = attend(q, k, v, scale=self.scale, mask=mask)
        return self.o_proj(out.transpose(0, 2, 1, 3).reshape(batch, length, -1))


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x), named gate/up/down as in Hugging Face checkpoints."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.gate_proj = nn.Linear(args.dim, args.hidden_dim, bias=False)
        self.up_proj = nn.Linear(args.dim, args.hidden_dim, bias=False)
        self.down_proj = nn.Linear(args.hidden_dim, args.dim, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        return self.down_proj(nn.silu(self.gate_proj(x)) * self.up_proj(x))


class TransformerBlock(nn.Module):
    """Pre-norm block: h = x + attn(norm(x)); out = h + ffn(norm(h))."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.self_attn = Attention(args)
        self.mlp = FeedForward(args)
        self.input_layernorm = RMSNorm(args.dim, args.norm_eps)
        self.post_attention_layernorm = RMSNorm(args.dim, args.norm_eps)

    def __call__(self, x: mx.array, mask: Mask = None, cache: KVCache | None = None) -> mx.array:
        h = x + self.self_attn(self.input_layernorm(x), mask, cache)
        return h + self.mlp(self.post_attention_layernorm(h))


class Transformer(nn.Module):
    """Embeddings, the blocks and the final norm: hidden states [batch, length, dim].

    Shared by the language model (next-token head) and the reward model (scalar head).
    """

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.embed_tokens = nn.Embedding(args.vocab_size, args.dim)
        self.layers = [TransformerBlock(args) for _ in range(args.n_layers)]
        self.norm = RMSNorm(args.dim, args.norm_eps)

    def __call__(self, tokens: mx.array, mask: Mask = None, cache: list[KVCache] | None = None) -> mx.array:
        h = self.embed_tokens(tokens)
        for index, layer in enumerate(self.layers):
            h = layer(h, mask, cache[index] if cache is not None else None)
        return self.norm(h)


class Llama(nn.Module):
    """The causal language model: `model(tokens)` -> float32 logits [batch, length, vocab]."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.model = Transformer(args)
        if not args.tie_word_embeddings:
            self.lm_head = nn.Linear(args.dim, args.vocab_size, bias=False)

    def __call__(self, tokens: mx.array, mask: Mask = None, cache: list[KVCache] | None = None) -> mx.array:
        return self.head(self.model(tokens, mask, cache))

    def head(self, h: mx.array) -> mx.array:
        """Hidden states [..., dim] -> float32 logits [..., vocab]; the losses call it on chosen positions only."""
        if self.args.tie_word_embeddings:
            logits = self.model.embed_tokens.as_linear(h)
        else:
            logits = self.lm_head(h)
        return logits if logits.dtype == mx.float32 else logits.astype(mx.float32)

    @property
    def layers(self) -> list[TransformerBlock]:
        return self.model.layers

    def make_cache(self) -> list[KVCache]:
        """One empty KV cache per layer."""
        return [KVCache() for _ in self.model.layers]
