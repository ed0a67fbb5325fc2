"""Host memory for weights and the KV cache: page-aligned and backed by transparent huge pages.

MindSpore's CPU matmul read numpy-allocated weights (16-byte aligned, 4 KiB pages) about 10% slower than its own
Parameters; weights placed in a 2 MiB-aligned arena with MADV_HUGEPAGE matched them (benchmarks/engine.md).
The graphs take these arrays as zero-copy inputs (``Tensor.from_numpy``).
"""

from __future__ import annotations

import mmap

import numpy as np

HUGE_PAGE = 2 << 20


def aligned_zeros(shape, dtype, prefault: bool = False) -> np.ndarray:
    """A zero-filled array in its own anonymous mapping, aligned to a huge page and advised to use them.
    `prefault`: touch every page now (resident from the start) instead of when first written."""
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    mapping = mmap.mmap(-1, max(nbytes, 1) + HUGE_PAGE)
    if hasattr(mmap, "MADV_HUGEPAGE"):
        mapping.madvise(mmap.MADV_HUGEPAGE)
    raw = np.frombuffer(mapping, np.uint8)
    start = (-raw.ctypes.data) % HUGE_PAGE
    array = raw[start:start + nbytes]
    if prefault:
        array.fill(0)  # a write faults each page in; a read would map the shared zero page
    # The view keeps `raw` (and so the mapping) alive through its .base chain.
    return array.view(dtype).reshape(shape)


def aligned_copy(array: np.ndarray) -> np.ndarray:
    out = aligned_zeros(array.shape, array.dtype)
    out[...] = array
    return out
