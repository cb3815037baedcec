"""The key/value cache for incremental decoding.

Keys and values live in buffers that grow in steps of `step` positions, so decoding one token writes into
pre-allocated memory instead of concatenating a new array per token. One cache per layer; a batch of sequences
shares the buffers (its rows are the batch).
"""

from __future__ import annotations

import mlx.core as mx


class KVCache:
    step = 256

    def __init__(self) -> None:
        self.keys: mx.array | None = None
        self.values: mx.array | None = None
        self.offset = 0

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        """Append `keys`/`values` [batch, n_kv_heads, length, head_dim]; return everything cached so far."""
        start, length = self.offset, keys.shape[2]
        if self.keys is None or start + length > self.keys.shape[2]:
            self._grow(keys, values, start + length)
        self.offset = start + length
        self.keys[..., start : self.offset, :] = keys
        self.values[..., start : self.offset, :] = values
        return self.keys[..., : self.offset, :], self.values[..., : self.offset, :]

    def _grow(self, keys: mx.array, values: mx.array, needed: int) -> None:
        batch, n_kv_heads, _, head_dim = keys.shape
        capacity = ((needed + self.step - 1) // self.step) * self.step
        new_keys = mx.zeros((batch, n_kv_heads, capacity, head_dim), keys.dtype)
        new_values = mx.zeros((batch, n_kv_heads, capacity, values.shape[3]), values.dtype)
        if self.keys is not None and self.offset:
            new_keys[..., : self.offset, :] = self.keys[..., : self.offset, :]
            new_values[..., : self.offset, :] = self.values[..., : self.offset, :]
        self.keys, self.values = new_keys, new_values

    def trim(self, n: int) -> int:
        """Forget the last `n` positions (e.g. to re-run a turn); returns how many were dropped."""
        n = min(self.offset, n)
        self.offset -= n
        return n

    def reset(self) -> None:
        """Empty the cache but keep its buffers for reuse."""
        self.offset = 0

    def select(self, rows: mx.array) -> None:
        """Keep only the given batch rows (e.g. drop finished sequences from a batch)."""
        if self.keys is not None:
            self.keys, self.values = self.keys[rows], self.values[rows]

    @property
    def nbytes(self) -> int:
        return 0 if self.keys is None else self.keys.nbytes + self.values.nbytes
