"""The paged KV-cache pool: the memory the block manager's blocks name.

Two arrays hold every layer's blocks, layer-major, so that a decode graph takes the whole cache as two inputs
(each graph input costs about 11 us per call on this CPU; per-layer arrays made 60 of them for SmolLM2):
    K^T: [L * N, Hkv, D, block_size]      V: [L * N, Hkv, block_size, D]
Row l * N + b is block b of layer l. Within a block, K is stored transposed as the decode attention reads it
(positions contiguous for one dimension), V by position. The decode graphs read the blocks in place through a
block index [L, B, blocks] (block ids plus each layer's offset) and, on the CPU kernels, write the new token's K/V
into them; prefill results are copied in here.

The pool is sized in bytes. Its pages are touched either as blocks fill (the default, cheap for tests and tools
that make many engines) or all at start (`prefault`, what the served decode model does): a server's memory is then
reserved and resident from the start, a pool too big for the machine fails at load rather than under load, and
its RSS stays flat. Without it the RSS climbs for as long as new blocks are first used: the block manager hands
out never-used blocks before evicting cached ones, so a 20-minute soak on SmolLM2 touched the 2.4 GB pool a block
at a time (benchmarks/soak.md).
"""

from __future__ import annotations

import os

import numpy as np

from .memory import aligned_zeros

DEFAULT_BLOCK_SIZE = 16
# Without a configured size the pool takes this share of the machine's memory, within the bounds below.
DEFAULT_MEMORY_SHARE = 0.1
DEFAULT_MAX_BYTES = 4 << 30
# ... and no more than this many times what every decode slot at max_seq_len holds (the rest of a default pool
# would only ever hold prefix-cache blocks; a small test model needs megabytes, not a share of the machine)
DEFAULT_SLOT_MULTIPLE = 2


def machine_memory_bytes() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def default_pool_bytes(need_bytes: int | None = None) -> int:
    """The pool's size when none is configured; `need_bytes`: what every decode slot at max_seq_len holds."""
    share = int(min(machine_memory_bytes() * DEFAULT_MEMORY_SHARE, DEFAULT_MAX_BYTES))
    return share if need_bytes is None else min(share, DEFAULT_SLOT_MULTIPLE * need_bytes)


class KVPool:
    def __init__(self, n_layers: int, n_kv_heads: int, head_dim: int, num_blocks: int,
                 block_size: int = DEFAULT_BLOCK_SIZE, dtype=np.float32, prefault: bool = False,
                 arrays: tuple[np.ndarray, np.ndarray] | None = None):
        """`arrays`: the K^T and V arrays, when the pool lives in memory of another's making (shared_kv.py)."""
        self.n_layers, self.n_kv_heads, self.head_dim = n_layers, n_kv_heads, head_dim
        self.num_blocks, self.block_size, self.dtype = num_blocks, block_size, np.dtype(dtype)
        rows = n_layers * num_blocks
        if arrays is None:
            arrays = (aligned_zeros((rows, n_kv_heads, head_dim, block_size), self.dtype, prefault),
                      aligned_zeros((rows, n_kv_heads, block_size, head_dim), self.dtype, prefault))
        self.keys, self.values = arrays
        self.layer_offsets = (np.arange(n_layers, dtype=np.int32) * num_blocks).reshape(-1, 1, 1)

    @staticmethod
    def block_bytes(n_layers: int, n_kv_heads: int, head_dim: int, block_size: int, dtype=np.float32) -> int:
        """Bytes of one block across all layers, K and V."""
        return 2 * n_layers * n_kv_heads * head_dim * block_size * np.dtype(dtype).itemsize

    @property
    def nbytes(self) -> int:
        return self.keys.nbytes + self.values.nbytes

    def block_index(self, tables: np.ndarray) -> np.ndarray:
        """Block tables [B, blocks] (block ids) -> the rows of every layer [L, B, blocks], int32."""
        return np.ascontiguousarray(tables[None] + self.layer_offsets, dtype=np.int32)

    def write(self, blocks: list[int], start: int, keys: list[np.ndarray], values: list[np.ndarray],
              count: int, source_start: int = 0) -> None:
        """Store `count` positions from `start` on, of a sequence whose block table is `blocks`: per layer K^T
        [Hkv, D, >= source_start + count] and V [Hkv, >= ..., D], read from `source_start`."""
        bs, position, end = self.block_size, start, start + count
        while position < end:
            block, offset = blocks[position // bs], position % bs
            n = min(bs - offset, end - position)
            src = source_start + position - start
            for layer in range(self.n_layers):
                row = layer * self.num_blocks + block
                self.keys[row, :, :, offset:offset + n] = keys[layer][:, :, src:src + n]
                self.values[row, :, offset:offset + n] = values[layer][:, src:src + n]
            position += n

    def write_tokens(self, tables: list[list[int]], positions: list[int], keys: list[np.ndarray],
                     values: list[np.ndarray]) -> None:
        """Store one new token per sequence (row i at positions[i]): per layer K [>= n, Hkv, D], V the same."""
        bs = self.block_size
        rows = np.array([t[p // bs] for t, p in zip(tables, positions)], np.int64)
        offsets = np.array([p % bs for p in positions], np.int64)
        n = len(rows)
        for layer in range(self.n_layers):
            layer_rows = rows + layer * self.num_blocks
            self.keys[layer_rows, :, :, offsets] = keys[layer][:n]
            self.values[layer_rows, :, offsets] = values[layer][:n]

    def copy_blocks(self, source: "KVPool", source_blocks: list[int], blocks: list[int]) -> None:
        """Copy whole blocks of `source` (a pool of the same shape) into this pool's `blocks`, every layer."""
        if (source.n_layers, source.n_kv_heads, source.head_dim, source.block_size, source.dtype) != \
                (self.n_layers, self.n_kv_heads, self.head_dim, self.block_size, self.dtype):
            raise ValueError("the two KV pools differ in layers, heads, head_dim, block size or dtype")
        if not blocks:
            return
        rows = (np.arange(self.n_layers)[:, None] * self.num_blocks + np.asarray(blocks)[None]).reshape(-1)
        source_rows = (np.arange(source.n_layers)[:, None] * source.num_blocks
                       + np.asarray(source_blocks)[None]).reshape(-1)
        self.keys[rows] = source.keys[source_rows]
        self.values[rows] = source.values[source_rows]

    def gather(self, blocks: list[int], length: int, width: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """The first `length` positions of a sequence as contiguous per-layer K^T [1, Hkv, D, width] and V
        [1, Hkv, width, D] (zero past `length`): what the chunked-prefill graph attends to. Block by block:
        plain slice copies, no index arrays or transposed temporaries."""
        bs = self.block_size
        keys, values = [], []
        for layer in range(self.n_layers):
            base = layer * self.num_blocks
            k = np.zeros((1, self.n_kv_heads, self.head_dim, width), self.dtype)
            v = np.zeros((1, self.n_kv_heads, width, self.head_dim), self.dtype)
            for i, start in enumerate(range(0, length, bs)):
                n = min(bs, length - start)
                k[0, :, :, start:start + n] = self.keys[base + blocks[i], :, :, :n]
                v[0, :, start:start + n] = self.values[base + blocks[i], :, :n]
            keys.append(k)
            values.append(v)
        return keys, values
