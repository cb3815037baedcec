"""Causal attention over a long row in blocks of queries, so that training never holds a whole score matrix.

On MLX's CPU backend `mx.fast.scaled_dot_product_attention` computes the full [length x length] scores, and its
backward pass several arrays that size (softmax, its gradient): 4 rows x 8 heads at 1024 positions took 0.46 GB
per layer, 4x that at 2048, more than the LoRA weights, the optimizer and the checkpointed activations together.
Here each block of queries attends only to the keys before its end (the causal mask zeroes the rest, so about half
the work is skipped), and a custom vjp walks the blocks one after another (`mx.depends`), so the backward pass holds
one block's scores at a time. Masks must be causal, as every mask this project builds is.
"""

from __future__ import annotations

import mlx.core as mx

QUERY_BLOCK = 128


def blocked_attention(
    q: mx.array, k: mx.array, v: mx.array, scale: float, mask: mx.array | str | None = None
) -> mx.array:
    """Exactly `mx.fast.scaled_dot_product_attention(q, k, v, scale, mask)` for a causal `mask` ("causal", None, or
    a boolean/additive array [..., length, length]) and no cache: q [B, H, L, D], k and v [B, KV heads, L, D]."""
    length = q.shape[2]
    blocks = [(start, min(length, start + QUERY_BLOCK)) for start in range(0, length, QUERY_BLOCK)]

    def attend_block(start, end, q_block, k, v):
        if isinstance(mask, mx.array):
            block_mask = mask[..., start:end, :end]
        else:
            block_mask = mx.arange(start, end)[:, None] >= mx.arange(end)[None, :]
        return mx.fast.scaled_dot_product_attention(
            q_block, k[:, :, :end], v[:, :, :end], scale=scale, mask=block_mask
        )

    @mx.custom_function
    def attend(q, k, v):
        outputs = []
        for start, end in blocks:
            q_block = q[:, :, start:end]
            if outputs:
                q_block = mx.depends(q_block, outputs[-1])
            outputs.append(attend_block(start, end, q_block, k, v))
        return mx.concatenate(outputs, axis=2)

    @attend.vjp
    def attend_vjp(primals, cotangent, output):
        q, k, v = primals
        d_q, d_k, d_v = [], mx.zeros_like(k), mx.zeros_like(v)
        for start, end in blocks:
            q_block = q[:, :, start:end]
            if d_q:
                q_block = mx.depends(q_block, [d_q[-1], d_k, d_v])
            _, (d_q_block, d_k_block, d_v_block) = mx.vjp(
                lambda a, b, c, start=start, end=end: attend_block(start, end, a, b, c),
                [q_block, k[:, :, :end], v[:, :, :end]],
                [cotangent[:, :, start:end]],
            )
            pad = [(0, 0), (0, 0), (0, length - end), (0, 0)]
            d_k, d_v = d_k + mx.pad(d_k_block, pad), d_v + mx.pad(d_v_block, pad)
            d_q.append(d_q_block)
        return mx.concatenate(d_q, axis=2), d_k, d_v

    return attend(q, k, v)
