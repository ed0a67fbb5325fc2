"""Static shape buckets for the decode graphs.

A MindSpore CPU graph exported with dynamic dimensions ran a decode step 2-3x slower than the same graph with
static shapes, so the converter exports one decode graph per (batch, cache length) bucket. A step runs the
smallest bucket that holds it: padded batch rows cost little (the step is bound by reading the weights), and
cache buckets double, so attention reads at most twice the cache in use.
"""

from __future__ import annotations

import bisect

MIN_SEQ_BUCKET = 64


def powers_of_two_up_to(limit: int, start: int = 1) -> list[int]:
    """start, 2*start, 4*start, ... below limit, then limit itself."""
    sizes, n = [], start
    while n < limit:
        sizes.append(n)
        n *= 2
    return sizes + [limit]


def batch_buckets(max_batch_size: int) -> list[int]:
    return powers_of_two_up_to(max_batch_size)


def seq_buckets(max_seq_len: int) -> list[int]:
    return powers_of_two_up_to(max_seq_len, start=min(MIN_SEQ_BUCKET, max_seq_len))


def smallest_fitting(buckets: list[int], size: int) -> int:
    """The smallest bucket >= size; ValueError when size exceeds the largest."""
    i = bisect.bisect_left(buckets, size)
    if i == len(buckets):
        raise ValueError(f"size {size} exceeds the largest bucket {buckets[-1]}")
    return buckets[i]


# Prefill: the graph takes any (batch, length), but MindSpore compiles it anew for each shape it has not seen
# (about 0.3 s for the demo model, 2 s for a 4 x 960 batch, measured here): under serving, dynamic batches of
# every size and prompts of every length would compile again and again. Rounding the shape up to a bucket keeps
# the set of shapes small, so each compiles once. Each compiled shape also keeps memory of its own, growing with
# the square of the length (the 103M bench model at batch 1: 1.7 GB for 512 tokens, 4.9 GB for 1024): with a
# bucket every 64 tokens up to 1152, warm-up grew that model's prefill process past 18.7 GB and the kernel killed
# it. Past 256 tokens the length buckets are therefore powers of two and their midpoints (384, 512, 768, 1024,
# ...): a prompt pads by fewer than 64 tokens or by half at most, and there are 9 buckets up to 1152, not 18
# (peak 19.1 GB: the largest buckets dominate). Prompts longer than the prefill chunk (256 tokens by default)
# now prefill in chunks of the prompt instead (``LlamaPrefillChunk``), so these buckets only go up to the chunk.
PREFILL_LENGTH_STEP = 64
PREFILL_FINE_UP_TO = 256


def prefill_lengths(max_seq_len: int) -> list[int]:
    """Every length bucket up to max_seq_len, the last one max_seq_len itself (what warm-up compiles)."""
    lengths = list(range(PREFILL_LENGTH_STEP, PREFILL_FINE_UP_TO + 1, PREFILL_LENGTH_STEP))
    power = PREFILL_FINE_UP_TO
    while power < max_seq_len:
        lengths += [power * 3 // 2, power * 2]
        power *= 2
    return sorted({min(n, max_seq_len) for n in lengths})


def prefill_shape(batch: int, length: int, max_seq_len: int) -> tuple[int, int]:
    """The bucketed (batch, length) a prefill of `batch` prompts padded to `length` runs at."""
    padded_batch = 1
    while padded_batch < batch:
        padded_batch *= 2
    if length > max_seq_len:  # refused upstream; never shrink a prompt
        return padded_batch, length
    return padded_batch, smallest_fitting(prefill_lengths(max_seq_len), length)


# Chunked prefill: prompts longer than this prefill in chunks of it (the engine may run shorter chunks between
# decode steps); a chunk starting at token `start` attends to a cache of the smallest seq bucket >= start, so
# its shapes are few and each keeps memory that grows as chunk x cache, not as the square of the prompt.
DEFAULT_PREFILL_CHUNK = 256
