"""Prefill and batched decode over the KV-cache pool: the loop the decode model and the benchmarks run.

The engine knows sequences, slots and tokens; which token comes next (sampling) and when a sequence ends (stop
conditions) belong to its callers.
"""

from __future__ import annotations

import dataclasses
import gc

import numpy as np

from .buckets import prefill_lengths, smallest_fitting
from .graphs import EngineGraphs
from .kv_cache import KVCachePool


@dataclasses.dataclass(eq=False)
class Sequence:
    """A running sequence: its slot in the pool and how many tokens its cache holds."""
    slot: int
    prompt_len: int


def pad_prompts(prompts) -> tuple[np.ndarray, np.ndarray]:
    """Prompts of different lengths as one right-padded batch: tokens [B, T] and lengths [B], int32."""
    lengths = np.array([len(p) for p in prompts], np.int32)
    tokens = np.zeros((len(prompts), int(lengths.max())), np.int32)
    for row, prompt in enumerate(prompts):
        tokens[row, :len(prompt)] = prompt
    return tokens, lengths


# Attention scores one prefill graph call may hold: prompts x longest^2. Each compiled (batch, length) shape keeps
# buffers in proportion to it for the life of the process (see buckets.py): with a budget of 8192 padded tokens,
# batches of 64 x 128 tokens took the 103M model's engine alone past 21 GB and the kernel killed it. This budget
# allows 8 prompts of 128 tokens, 2 of 256, 32 of 64 per call; larger dynamic batches run as several calls, at
# little cost on a CPU, where 1024 tokens in one call already keep the matmuls busy.
PREFILL_SCORE_BUDGET = 8 * 128 * 128


def prefill_batches(lengths: list[int], budget: int = PREFILL_SCORE_BUDGET) -> list[range]:
    """Consecutive index ranges whose scores (count x longest^2) stay within `budget` (one prompt at least)."""
    chunks, start, longest = [], 0, 0
    for i, length in enumerate(lengths):
        longest_with = max(longest, length)
        if i > start and longest_with ** 2 * (i - start + 1) > budget:
            chunks.append(range(start, i))
            start, longest_with = i, length
        longest = longest_with
    if lengths:
        chunks.append(range(start, len(lengths)))
    return chunks


def prefill_each(graphs: EngineGraphs, prompts) -> list[tuple[np.ndarray, list[np.ndarray], list[np.ndarray]]]:
    """Prefill any number of prompts: those longer than the engine's prefill chunk one at a time in chunks, the
    others as padded batches within PREFILL_SCORE_BUDGET. Returns, per prompt in order, its last-position
    logits [V], keys [L][Hkv, D, >=len] and values [L][Hkv, >=len, D]."""
    limit = graphs.chunk_length or graphs.max_seq_len
    short = [i for i, p in enumerate(prompts) if len(p) <= limit]
    results = {i: graphs.prefill_long(p) for i, p in enumerate(prompts) if len(p) > limit}
    for batch in prefill_batches([len(prompts[i]) for i in short]):
        rows = [short[j] for j in batch]
        logits, keys, values = graphs.prefill(*pad_prompts([prompts[i] for i in rows]))
        results.update({i: (logits[row], [k[row] for k in keys], [v[row] for v in values])
                        for row, i in enumerate(rows)})
    return [results[i] for i in range(len(prompts))]


class Engine:
    def __init__(self, graphs: EngineGraphs, max_slots: int | None = None):
        self.graphs = graphs
        c = graphs.config
        self.max_slots = max_slots or graphs.max_batch_size
        if self.max_slots > graphs.max_batch_size:
            raise ValueError(f"max_slots {self.max_slots} exceeds the exported max_batch_size "
                             f"{graphs.max_batch_size}")
        self.pool = KVCachePool(c.num_hidden_layers, c.num_key_value_heads, c.head_dim, self.max_slots,
                                graphs.seq_buckets, graphs.np_dtype,
                                rows=smallest_fitting(graphs.batch_buckets, self.max_slots))
        self.running: list[Sequence] = []  # index = slot

    @property
    def free_slots(self) -> int:
        return self.max_slots - len(self.running)

    def prefill(self, prompts: list[list[int]]) -> tuple[list[Sequence], np.ndarray]:
        """Run the prompts as one padded batch and give each a slot. Returns the sequences and the logits of
        each prompt's last token [N, V]. The caller checks lengths and free slots first."""
        if len(prompts) > self.free_slots:
            raise ValueError(f"{len(prompts)} prompts but only {self.free_slots} free slots")
        results = prefill_each(self.graphs, prompts)
        sequences = [self.admit(keys, values, len(prompt)) for prompt, (_, keys, values) in zip(prompts, results)]
        return sequences, np.stack([logits for logits, _, _ in results])

    def admit(self, keys: list[np.ndarray], values: list[np.ndarray], length: int) -> Sequence:
        """Give a prompt whose cache was computed elsewhere (the prefill model) a slot: per layer K^T
        [Hkv, D, >=length] and V [Hkv, >=length, D]."""
        sequence = Sequence(slot=self.pool.add(keys, values, length), prompt_len=length)
        self.running.append(sequence)
        return sequence

    def decode(self, next_tokens: dict[Sequence, int] | list[int]) -> np.ndarray:
        """One decode step for every running sequence. `next_tokens` gives each sequence's newest token (by
        sequence, or as a list in slot order). Returns logits [n_running, V] in slot order."""
        n = len(self.running)
        batch = smallest_fitting(self.graphs.batch_buckets, n)
        tokens = np.zeros(batch, np.int32)
        if isinstance(next_tokens, dict):
            for sequence, token in next_tokens.items():
                tokens[sequence.slot] = token
        else:
            tokens[:n] = next_tokens
        self.pool.reserve(self.pool.required())
        positions = np.zeros(batch, np.int32)
        positions[:n] = self.pool.lengths[:n]
        logits, new_keys, new_values = self.graphs.decode(tokens, positions, self.pool.views(batch))
        if new_keys is None:  # the graph stored them in the pool's arrays itself
            self.pool.lengths[:n] += 1
        else:
            self.pool.append(new_keys, new_values)
        return logits[:n]

    def length(self, sequence: Sequence) -> int:
        return int(self.pool.lengths[sequence.slot])

    def release(self, sequence: Sequence) -> None:
        """Free the sequence's slot at once; the last running sequence moves into it."""
        moved = self.pool.remove(sequence.slot)
        last = self.running.pop()
        if moved is not None:
            last.slot = sequence.slot
            self.running[sequence.slot] = last


def greedy_generate(engine: Engine, prompts: list[list[int]], max_new_tokens: list[int] | int) -> list[list[int]]:
    """Greedy continuation of every prompt with continuous batching: prompts join as slots free up, and each
    sequence leaves after its own number of new tokens. Returns the new tokens of each prompt."""
    if isinstance(max_new_tokens, int):
        max_new_tokens = [max_new_tokens] * len(prompts)
    outputs: list[list[int]] = [[] for _ in prompts]
    waiting = list(range(len(prompts)))
    owner: dict[Sequence, int] = {}
    while waiting or owner:
        if waiting and engine.free_slots:
            joining = waiting[:engine.free_slots]
            del waiting[:len(joining)]
            sequences, logits = engine.prefill([prompts[i] for i in joining])
            for sequence, i, row in zip(sequences, joining, logits):
                owner[sequence] = i
                outputs[i].append(int(row.argmax()))
        for sequence, i in list(owner.items()):
            if len(outputs[i]) >= max_new_tokens[i]:
                engine.release(sequence)
                del owner[sequence]
        if not owner:
            continue
        logits = engine.decode({s: outputs[i][-1] for s, i in owner.items()})
        for sequence, i in owner.items():
            outputs[i].append(int(logits[sequence.slot].argmax()))
    return outputs


def settle_heap() -> None:
    """Move every object alive now (the loaded graphs' many Python objects) out of the garbage collector's
    reach: its full collections traversed them and took about a tenth of each decode step (measured with perf on
    SmolLM2). Called once loading and warm-up are done."""
    gc.collect()
    gc.freeze()


def warm_up(engine: Engine) -> None:
    """Compile every decode graph now (a few hundred ms each), so no request waits for a compile."""
    graphs = engine.graphs
    c = graphs.config
    for batch in graphs.batch_buckets:
        if batch > engine.pool.rows:
            continue
        for seq in graphs.seq_buckets:
            caches = [np.zeros((batch, c.num_key_value_heads, c.head_dim, seq), graphs.np_dtype)
                      for _ in range(c.num_hidden_layers)]
            caches += [np.zeros((batch, c.num_key_value_heads, seq, c.head_dim), graphs.np_dtype)
                       for _ in range(c.num_hidden_layers)]
            graphs.decode(np.zeros(batch, np.int32), np.zeros(batch, np.int32), caches)
    settle_heap()


def warm_up_prefill(graphs: EngineGraphs) -> None:
    """Compile the prefill graph for one prompt of every length bucket now (a fraction of a second each), and
    the chunked-prefill graph for every cache length a chunk attends to, so that the first prompts are not slow;
    other batch sizes compile once, when first used."""
    whole_up_to = min(graphs.chunk_length or graphs.max_seq_len, graphs.max_seq_len)
    for length in prefill_lengths(whole_up_to):
        graphs.prefill(np.ones((1, length), np.int32), np.array([length], np.int32))
    if graphs.chunk_length:  # the longest prompt passes every chunk start, so it compiles every cache length
        graphs.prefill_long(np.ones(graphs.max_seq_len - 1, np.int32))
    settle_heap()
