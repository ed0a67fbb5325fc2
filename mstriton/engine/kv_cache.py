"""The KV-cache pool for continuous batching.

One K and one V array per layer, shaped for the decode graph:
    K^T: [slots, kv_heads, head_dim, capacity]      V: [slots, kv_heads, capacity, head_dim]
Running sequences always occupy slots 0..n-1. A decode step of batch bucket B then passes ``k[:B]``, a contiguous
view (no copy) whose last dimension is the graph's cache length: the pool's capacity always equals one of the seq
buckets. When a sequence leaves, the last running sequence moves into its slot (one sequence's rows copied, once)
so the running set stays a prefix. When the longest sequence outgrows the capacity, or the long ones have left,
the arrays are re-laid at the next bucket, copying only running rows: amortized over the bucket's length.
"""

from __future__ import annotations

import numpy as np

from .buckets import smallest_fitting
from .memory import aligned_zeros


class PoolFull(RuntimeError):
    """No free slot: the caller must queue the request."""


class KVCachePool:
    def __init__(self, n_layers: int, n_kv_heads: int, head_dim: int, max_slots: int, seq_buckets: list[int],
                 dtype=np.float32, rows: int | None = None):
        """`rows` (>= max_slots) is the first dimension of the arrays: the largest batch bucket a step may run,
        whose padding rows must exist even when fewer slots may be used."""
        self.n_layers, self.n_kv_heads, self.head_dim = n_layers, n_kv_heads, head_dim
        self.max_slots, self.seq_buckets, self.dtype = max_slots, list(seq_buckets), np.dtype(dtype)
        self.rows = max(rows or max_slots, max_slots)
        self.lengths = np.zeros(self.rows, np.int32)  # tokens stored per slot
        self.n_active = 0
        self.capacity = 0
        self.keys: list[np.ndarray] = []
        self.values: list[np.ndarray] = []
        self._relayout(self.seq_buckets[0])

    @property
    def max_len(self) -> int:
        return self.seq_buckets[-1]

    def bytes_in_use(self) -> int:
        """Bytes of cache a decode step over the running sequences reads (their rows, at the capacity)."""
        per_slot = 2 * self.n_layers * self.n_kv_heads * self.head_dim * self.capacity * self.dtype.itemsize
        return per_slot * self.n_active

    def _relayout(self, capacity: int) -> None:
        n, keep = self.n_active, min(self.capacity, capacity)
        keys = [aligned_zeros((self.rows, self.n_kv_heads, self.head_dim, capacity), self.dtype)
                for _ in range(self.n_layers)]
        values = [aligned_zeros((self.rows, self.n_kv_heads, capacity, self.head_dim), self.dtype)
                  for _ in range(self.n_layers)]
        for old, new in zip(self.keys, keys):
            new[:n, :, :, :keep] = old[:n, :, :, :keep]
        for old, new in zip(self.values, values):
            new[:n, :, :keep] = old[:n, :, :keep]
        self.keys, self.values, self.capacity = keys, values, capacity

    def reserve(self, needed: int) -> None:
        """Make the capacity the smallest bucket that holds `needed` positions (grow, or shrink when long
        sequences have left)."""
        bucket = smallest_fitting(self.seq_buckets, needed)
        if bucket != self.capacity:
            self._relayout(bucket)

    def add(self, keys: list[np.ndarray], values: list[np.ndarray], length: int) -> int:
        """Store a prompt's cache (per layer K^T [Hkv, D, T>=length], V [Hkv, T, D]); returns its slot."""
        if self.n_active == self.max_slots:
            raise PoolFull(f"all {self.max_slots} KV-cache slots are in use")
        if length >= self.max_len:
            raise ValueError(f"prompt of {length} tokens leaves no room below max_seq_len {self.max_len}")
        # One more position than the prompt: the first decode step's token must fit as well.
        self.reserve(max(length + 1, self.required()))
        slot = self.n_active
        for layer in range(self.n_layers):
            self.keys[layer][slot, :, :, :length] = keys[layer][:, :, :length]
            self.values[layer][slot, :, :length] = values[layer][:, :length]
        self.lengths[slot] = length
        self.n_active += 1
        return slot

    def remove(self, slot: int) -> int | None:
        """Free `slot`. Returns the slot whose sequence moved into it (the old last slot), or None."""
        if not 0 <= slot < self.n_active:
            raise IndexError(f"slot {slot} is not running (running: 0..{self.n_active - 1})")
        last = self.n_active - 1
        moved = None
        if slot != last:
            n = int(self.lengths[last])
            for layer in range(self.n_layers):
                self.keys[layer][slot, :, :, :n] = self.keys[layer][last, :, :, :n]
                self.values[layer][slot, :, :n] = self.values[layer][last, :, :n]
            self.lengths[slot] = n
            moved = last
        self.lengths[last] = 0
        self.n_active = last
        return moved

    def required(self) -> int:
        """Positions the next decode step needs: the longest running sequence plus its new token."""
        return int(self.lengths[:self.n_active].max()) + 1 if self.n_active else self.seq_buckets[0]

    def views(self, batch: int) -> list[np.ndarray]:
        """K^T views of all layers, then V views: the first `batch` slots, contiguous."""
        return [k[:batch] for k in self.keys] + [v[:batch] for v in self.values]

    def append(self, new_keys: list[np.ndarray], new_values: list[np.ndarray]) -> None:
        """Store each running sequence's new token (per layer [>=n, Hkv, D]) at its current length."""
        n = self.n_active
        rows, positions = np.arange(n), self.lengths[:n]
        for layer in range(self.n_layers):
            self.keys[layer][rows, :, :, positions] = new_keys[layer][:n]
            self.values[layer][rows, :, positions] = new_values[layer][:n]
        self.lengths[:n] += 1
