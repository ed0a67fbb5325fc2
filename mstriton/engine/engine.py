"""Prefill and batched decode over the paged KV cache: the loop the decode model and the benchmarks run.

The engine knows sequences, blocks and tokens; which token comes next (sampling), when a sequence ends (stop
conditions) and which sequence runs when (admission, prefill budget, preemption) belong to its callers
(``serving/scheduler.py``).

A sequence's life: add() matches its prompt against the prefix cache and gives it the blocks the rest needs
(or None: not enough free blocks now); prefill() computes its uncomputed tokens, all or a chunk at a time, and
hands back the logits of its last token once every token is in the cache; start_decoding() puts it in the
decode batch, where each decode() step appends one token; release() gives its blocks back (the full ones stay
in the prefix cache until their memory is needed), and preempt() does so mid-generation. Blocks, reference
counts and the prefix cache change only through the block manager's per-sequence API (``block_manager.py``).
"""

from __future__ import annotations

import dataclasses
import gc

import numpy as np

from .block_manager import SCRATCH_BLOCK, BlockManager, BlockTable, OutOfBlocks
from .buckets import smallest_fitting
from .graphs import EngineGraphs, blocks_for, prefill_call_shapes
from .kv_pool import KVPool, default_pool_bytes


@dataclasses.dataclass(eq=False)
class Sequence:
    """A sequence in the cache. `tokens` are those whose K/V are in the pool or about to be (the prompt, then
    each decoded step's input token); the first `computed` of them are there, in the blocks of `table`."""
    tokens: list[int]
    table: BlockTable
    computed: int
    slot: int = -1       # its row in the decode batch (index in Engine.running); -1 while not decoding

    @property
    def blocks(self) -> list[int]:
        """The pool blocks it holds, in position order (read-only: the block manager changes them)."""
        return self.table.blocks

    @property
    def to_compute(self) -> int:
        return len(self.tokens) - self.computed


class PromptTooLong(ValueError):
    """A prompt that could never fit: longer than max_seq_len allows, or than the whole pool."""


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
# allows 8 prompts of 128 tokens, 2 of 256, 32 of 64 per call; larger batches run as several calls, at little
# cost on a CPU, where 1024 tokens in one call already keep the matmuls busy.
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


def pool_blocks(graphs: EngineGraphs, kv_cache_bytes: int | None, max_slots: int) -> int:
    """Blocks (the scratch block included) of a pool of `kv_cache_bytes` (default: default_pool_bytes(), at most
    a few times what `max_slots` sequences of max_seq_len hold)."""
    c = graphs.config
    block = KVPool.block_bytes(c.num_hidden_layers, c.num_key_value_heads, c.head_dim, graphs.block_size,
                               graphs.np_dtype)
    need = max_slots * blocks_for(graphs.max_seq_len, graphs.block_size) * block
    return max(2, (kv_cache_bytes or default_pool_bytes(need)) // block)


class Engine:
    def __init__(self, graphs: EngineGraphs, max_slots: int | None = None, kv_cache_bytes: int | None = None,
                 enable_prefix_caching: bool = True, prefault_kv_cache: bool = False, pool: KVPool | None = None):
        """`max_slots`: sequences decoding at once (at most the exported max_batch_size); `kv_cache_bytes`: the
        pool's size; `prefault_kv_cache`: make the pool resident now (see kv_pool.py); `pool`: a pool made
        elsewhere (the prefill model's, in shared memory), in place of one of `kv_cache_bytes`."""
        self.graphs = graphs
        c = graphs.config
        self.max_slots = max_slots or graphs.max_batch_size
        if self.max_slots > graphs.max_batch_size:
            raise ValueError(f"max_slots {self.max_slots} exceeds the exported max_batch_size "
                             f"{graphs.max_batch_size}")
        num_blocks = pool.num_blocks if pool is not None else pool_blocks(graphs, kv_cache_bytes, self.max_slots)
        self.blocks = BlockManager(num_blocks, graphs.block_size, enable_prefix_caching)
        self.pool = pool or KVPool(c.num_hidden_layers, c.num_key_value_heads, c.head_dim, num_blocks,
                                   graphs.block_size, graphs.np_dtype, prefault=prefault_kv_cache)
        self.batch_rows = smallest_fitting(graphs.batch_buckets, self.max_slots)
        # Where the padding rows of a decode batch bucket write: the CPU kernels (packed weight formats) skip rows
        # at position -1 altogether; MindSpore's ops (float32) compute them at position 0 of the scratch block.
        self.padding_position = 0 if graphs.weights_format == "float32" else -1
        self.running: list[Sequence] = []  # the decode batch; index = slot

    @property
    def max_len(self) -> int:
        return self.graphs.max_seq_len

    @property
    def free_slots(self) -> int:
        return self.max_slots - len(self.running)

    # ---- admission --------------------------------------------------------------------------------------

    def check_fits(self, length: int) -> None:
        """PromptTooLong if a prompt of `length` tokens could never run (with room for one generated token)."""
        if length < 1:
            raise PromptTooLong("the prompt is empty")
        if length >= self.max_len:
            raise PromptTooLong(f"prompt of {length} tokens leaves no room below max_seq_len {self.max_len}")
        need = self.blocks.blocks_for(length + 1)
        if need > self.blocks.usable_blocks:
            raise PromptTooLong(f"prompt of {length} tokens needs {need} KV blocks of {self.blocks.block_size} "
                                f"tokens; the whole pool has {self.blocks.usable_blocks} (kv_cache_bytes)")

    def add(self, tokens) -> Sequence | None:
        """Give `tokens` the blocks they need (and one more position, for the first generated token), reusing
        the longest cached prefix. None when too few blocks are free now; PromptTooLong if they never will be."""
        tokens = [int(t) for t in tokens]
        self.check_fits(len(tokens))
        table = self.blocks.allocate_prompt(tokens)
        if table is None:
            return None
        return Sequence(tokens=tokens, table=table, computed=table.cached_tokens)

    def _register_full_blocks(self, sequence: Sequence) -> None:
        """Enter the sequence's newly filled blocks in the prefix cache."""
        self.blocks.cache_full_blocks(sequence.table, sequence.tokens, sequence.computed)

    # ---- prefill ----------------------------------------------------------------------------------------

    def prefill(self, work: list[tuple[Sequence, int]]) -> dict[Sequence, np.ndarray]:
        """Compute the next `count` uncomputed tokens of each sequence. Returns the last-token logits [V] of
        each sequence whose tokens are now all computed. Fresh prompts that fit one chunk run together as one
        padded batch; the rest one chunk at a time against the cache before it (the prefix cache's blocks,
        earlier chunks)."""
        limit = self.graphs.chunk_length
        whole, pieces = [], []
        for sequence, count in work:
            count = min(count, sequence.to_compute)
            if sequence.computed == 0 and count == sequence.to_compute and count <= limit:
                whole.append(sequence)
            else:
                pieces.append((sequence, count))
        done: dict[Sequence, np.ndarray] = {}
        for batch in prefill_batches([len(s.tokens) for s in whole]):
            rows = [whole[i] for i in batch]
            logits, keys, values = self.graphs.prefill(*pad_prompts([s.tokens for s in rows]))
            for row, sequence in enumerate(rows):
                self.pool.write(sequence.blocks, 0, [k[row] for k in keys], [v[row] for v in values],
                                len(sequence.tokens))
                sequence.computed = len(sequence.tokens)
                self._register_full_blocks(sequence)
                done[sequence] = logits[row]
        for sequence, count in pieces:
            while count > 0:
                n = min(count, limit if sequence.computed == 0 else self.graphs.continuation)
                logits = self._prefill_piece(sequence, n)
                count -= n
            if sequence.to_compute == 0:
                done[sequence] = logits
        return done

    def adopt(self, sequence: Sequence, source: KVPool, source_blocks: list[int]) -> None:
        """Take a prompt computed elsewhere (the prefill model's pool, blocks `source_blocks` in position order):
        copy the blocks this sequence did not find in its own prefix cache; then every token is computed."""
        block_size = self.blocks.block_size
        first = sequence.computed // block_size  # the prefix cache's hits are whole blocks
        count = self.blocks.blocks_for(len(sequence.tokens)) - first
        if len(source_blocks) < first + count:
            raise ValueError(f"the handover names {len(source_blocks)} blocks; the prompt of "
                             f"{len(sequence.tokens)} tokens fills {first + count}")
        self.pool.copy_blocks(source, source_blocks[first:first + count], sequence.blocks[first:first + count])
        sequence.computed = len(sequence.tokens)
        self._register_full_blocks(sequence)

    def _prefill_piece(self, sequence: Sequence, count: int) -> np.ndarray:
        """The next `count` tokens: from the start as a whole prompt (up to chunk_length), after it through the
        chunk graph (up to graphs.continuation)."""
        start = sequence.computed
        piece = np.asarray(sequence.tokens[start:start + count], np.int32)
        if start == 0 and count > self.graphs.continuation:
            logits, keys, values = self.graphs.prefill(piece[None], np.array([count], np.int32))
            logits, keys, values = logits[0], [k[0] for k in keys], [v[0] for v in values]
        else:
            width = smallest_fitting(self.graphs.seq_buckets, max(start, 1))  # start 0: nothing before, all masked
            past_keys, past_values = self.pool.gather(sequence.blocks, start, width)
            logits, keys, values = self.graphs.prefill_chunk(piece, start, past_keys, past_values)
        self.pool.write(sequence.blocks, start, keys, values, count)
        sequence.computed += count
        self._register_full_blocks(sequence)
        return logits

    # ---- decode -----------------------------------------------------------------------------------------

    def start_decoding(self, sequence: Sequence) -> None:
        if sequence.to_compute:
            raise ValueError(f"{sequence.to_compute} tokens of the sequence are not computed yet")
        if not self.free_slots:
            raise ValueError(f"all {self.max_slots} decode slots are in use")
        sequence.slot = len(self.running)
        self.running.append(sequence)

    def grow(self, sequence: Sequence) -> bool:
        """Make sure the sequence has a block for its next token; False if none is free (the caller preempts)."""
        return self.blocks.make_room(sequence.table, sequence.computed + 1)

    def decode(self, next_tokens: dict[Sequence, int] | list[int]) -> np.ndarray:
        """One decode step for every running sequence. `next_tokens` gives each sequence's newest token (by
        sequence, or as a list in slot order). Every sequence must have room for it (grow()). Returns logits
        [n_running, V] in slot order."""
        if isinstance(next_tokens, dict):
            ordered = [0] * len(self.running)
            for sequence, token in next_tokens.items():
                ordered[sequence.slot] = token
            next_tokens = ordered
        logits, _ = self.decode_with_drafts(next_tokens, [[] for _ in self.running])
        return logits

    @property
    def can_verify_drafts(self) -> bool:
        """Whether a decode step can verify drafted tokens: the CPU kernels' steps write every row's K/V into the
        pool before any row attends (kernels/csrc/attention.h), so rows of one sequence at consecutive positions
        see each other. MindSpore's own ops (float32 weights) attend to the pool and then store: they cannot."""
        return bool(self.graphs.manifest.get("decode_writes_cache"))

    def draft_room(self, sequence: Sequence, drafts: int) -> int:
        """How many of `drafts` tokens the sequence can verify in the next step: blocks permitting (taken from
        the free ones, never by preempting) and below max_seq_len."""
        drafts = min(drafts, self.max_len - 1 - sequence.computed - 1)
        while drafts > 0 and not self.blocks.make_room(sequence.table, sequence.computed + 1 + drafts):
            drafts -= 1
        return max(drafts, 0)

    def decode_with_drafts(self, next_tokens: list[int], drafts: list[list[int]]) -> tuple[np.ndarray, list[int]]:
        """A decode step in which each running sequence (slot order) runs its newest token and, after it, the
        tokens drafted for it, each at the next position, in one batch: the logits of every row, and the first
        row of each sequence. A row's logits are those a plain step would give once the drafts before it were
        accepted. Each sequence keeps its newest token; accept() keeps the drafts that proved right. Every
        sequence must have room for its tokens (grow(), draft_room())."""
        n = len(self.running)
        if any(drafts) and not self.can_verify_drafts:
            raise ValueError("this engine's decode steps cannot verify drafted tokens (float32 MindSpore ops)")
        counts = [1 + len(d) for d in drafts]
        starts = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(int).tolist()
        rows = sum(counts)
        batch = smallest_fitting(self.graphs.batch_buckets, rows)
        tokens = np.zeros(batch, np.int32)
        positions = np.full(batch, self.padding_position, np.int32)
        for sequence, start, token, drafted in zip(self.running, starts, next_tokens, drafts):
            if not self.blocks.make_room(sequence.table, sequence.computed + 1 + len(drafted)):
                raise OutOfBlocks("no free KV block for a running sequence's next token (preempt first)")
            tokens[start:start + 1 + len(drafted)] = [token, *drafted]
            positions[start:start + 1 + len(drafted)] = range(sequence.computed, sequence.computed + 1 + len(drafted))
        seq = smallest_fitting(self.graphs.seq_buckets, int(positions[:rows].max()) + 1)
        tables = np.full((batch, blocks_for(seq, self.blocks.block_size)), SCRATCH_BLOCK, np.int32)
        for sequence, start, count in zip(self.running, starts, counts):
            tables[start:start + count, :len(sequence.blocks)] = sequence.blocks[:tables.shape[1]]
        logits, new_keys, new_values = self.graphs.decode(tokens, positions, self.pool.keys, self.pool.values,
                                                          self.pool.block_index(tables))
        if new_keys is not None:  # MindSpore's ops: the host stores the new K/V (no drafts here)
            self.pool.write_tokens([s.blocks for s in self.running], positions[:n].tolist(), new_keys, new_values)
        for sequence, start in zip(self.running, starts):
            self._append(sequence, [int(tokens[start])])
        return logits[:rows], starts

    def accept(self, sequence: Sequence, drafted: list[int]) -> None:
        """After decode_with_drafts: the first `drafted` tokens proved right, their K/V stays; the blocks taken for
        the rest go back."""
        self._append(sequence, drafted)
        self.blocks.trim(sequence.table, sequence.computed + 1)

    def _append(self, sequence: Sequence, tokens: list[int]) -> None:
        """Tokens whose K/V the last step put in the pool: now part of the sequence (full blocks into the prefix
        cache)."""
        if not tokens:
            return
        before = sequence.computed // self.blocks.block_size
        sequence.tokens += tokens
        sequence.computed += len(tokens)
        if sequence.computed // self.blocks.block_size > before:
            self._register_full_blocks(sequence)

    def release(self, sequence: Sequence) -> None:
        """Give the sequence's blocks back; if it was decoding, the last running sequence moves into its slot."""
        self.blocks.free(sequence.table)
        self._leave_batch(sequence)

    def preempt(self, sequence: Sequence) -> None:
        """release(), counted as a preemption (the caller recomputes the sequence later, as a new one)."""
        self.blocks.preempt(sequence.table)
        self._leave_batch(sequence)

    def _leave_batch(self, sequence: Sequence) -> None:
        if sequence.slot >= 0:
            last = self.running.pop()
            if last is not sequence:
                last.slot = sequence.slot
                self.running[sequence.slot] = last
            sequence.slot = -1

    # ---- the whole of it, for tools and tests -----------------------------------------------------------

    def prefill_prompts(self, prompts: list[list[int]]) -> tuple[list[Sequence], np.ndarray]:
        """Add, prefill and start decoding each prompt at once. Returns the sequences and the logits of each
        prompt's last token [N, V]. ValueError if the slots or blocks do not suffice."""
        if len(prompts) > self.free_slots:
            raise ValueError(f"{len(prompts)} prompts but only {self.free_slots} free slots")
        sequences = []
        for prompt in prompts:
            sequence = self.add(prompt)
            if sequence is None:
                for added in sequences:
                    self.release(added)
                raise OutOfBlocks(f"not enough free KV blocks for {len(prompts)} prompts")
            sequences.append(sequence)
        done = self.prefill([(s, s.to_compute) for s in sequences])
        for sequence in sequences:
            self.start_decoding(sequence)
        return sequences, np.stack([done[s] for s in sequences])


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
            sequences, logits = engine.prefill_prompts([prompts[i] for i in joining])
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
    """Compile every decode graph now (a few hundred ms each), so no request waits for a compile. The steps read
    and write only the scratch block."""
    graphs = engine.graphs
    for batch in graphs.batch_buckets:
        if batch > engine.batch_rows:
            continue
        for seq in graphs.seq_buckets:
            tables = np.full((batch, blocks_for(seq, graphs.block_size)), SCRATCH_BLOCK, np.int32)
            graphs.decode(np.zeros(batch, np.int32), np.zeros(batch, np.int32), engine.pool.keys, engine.pool.values,
                          engine.pool.block_index(tables))
    settle_heap()


def warm_up_prefill(engine: Engine) -> None:
    """Compile the prefill graph at every shape a call of whole prompts runs at (graphs.prefill_call_shapes: each
    length bucket alone, and the batches of short prompts; a fraction of a second each), and the chunked-prefill
    graph against every cache length, so that the first prompts are not slow and the memory MindSpore keeps for
    each shape is taken now, not under load (graphs.PREFILL_CALL_TOKENS)."""
    graphs = engine.graphs
    c = graphs.config
    for rows, length in prefill_call_shapes(min(graphs.chunk_length, graphs.max_seq_len), graphs.max_seq_len):
        graphs.prefill(np.ones((rows, length), np.int32), np.full(rows, length, np.int32))
    for width in graphs.seq_buckets:
        past_keys = [np.zeros((1, c.num_key_value_heads, c.head_dim, width), graphs.np_dtype)] * c.num_hidden_layers
        past_values = [np.zeros((1, c.num_key_value_heads, width, c.head_dim), graphs.np_dtype)] * c.num_hidden_layers
        graphs.prefill_chunk(np.ones(graphs.continuation, np.int32), 1, past_keys, past_values)
    settle_heap()
