"""Block accounting for the paged KV cache: which pool blocks each sequence holds, and the prefix cache.

The pool (``kv_pool.py``) is a fixed number of blocks of `block_size` token positions. A sequence holds the blocks
its length needs, in order (its block table), and takes one more when its last block is full. A block is
referenced by every sequence whose table holds it: sequences that share a prompt prefix share its blocks.

Prefix caching: a block full of prompt or generated tokens is named by a chained key, (hash of the key of the
block before it, its own tokens): equal keys mean the same tokens at the same positions after the same prefix,
hence the same K/V. A block nobody references any more keeps its key and contents and waits in the free list,
least recently used first; a new prompt takes the longest run of cached blocks that matches its start, and only
when a block is allocated from the free list is its cached content forgotten (evicted). Block 0 is never handed
out: it is the scratch block that padding rows of a batch read and write.

The manager owns every count: the engine and the scheduler change blocks only through its per-sequence API
(after vLLM's kv_cache_manager over its block_pool):

- allocate_prompt(tokens): a BlockTable for a new or resumed prompt, its start taken from the prefix cache;
  None when too few blocks are free now;
- make_room(table, positions): one more block when the next token starts a new one; False when none is free;
- cache_full_blocks(table, tokens, computed): enter the blocks filled so far in the prefix cache;
- free(table), preempt(table): give a sequence's blocks back (a preemption is counted);
- usage(): what the metrics read.

Below them, match_prefix / take / allocate / register / release work on block ids (the unit tests call them).
"""

from __future__ import annotations

import collections
import dataclasses

SCRATCH_BLOCK = 0


class OutOfBlocks(RuntimeError):
    """Fewer free blocks than asked for: the caller waits, preempts or refuses."""


BlockKey = tuple  # (parent hash, tokens of the block)


def block_keys(tokens, block_size: int, parent: int | None = None) -> list[BlockKey]:
    """The chained keys of every full block of `tokens` (the partial last block has none)."""
    keys, previous = [], parent
    for start in range(0, len(tokens) - block_size + 1, block_size):
        key = (previous, tuple(int(t) for t in tokens[start:start + block_size]))
        keys.append(key)
        previous = hash(key)
    return keys


@dataclasses.dataclass
class BlockStats:
    """Counters in tokens and blocks, since start (the metrics read them)."""
    prefix_queries: int = 0  # prompt tokens looked up in the prefix cache
    prefix_hits: int = 0     # of those, tokens found cached
    evictions: int = 0       # cached blocks whose contents were dropped to be reused
    preemptions: int = 0     # sequences that gave their blocks back mid-generation


@dataclasses.dataclass(eq=False)
class BlockTable:
    """The blocks one sequence holds, in position order, and what the prefix cache knows of them. The manager
    alone changes it; the engine reads `blocks` (the pool's copies, the decode graph's block tables)."""
    blocks: list[int] = dataclasses.field(default_factory=list)
    keys: list[BlockKey] = dataclasses.field(default_factory=list)  # chained keys of its full blocks so far
    registered: int = 0   # leading full blocks entered in the prefix cache
    cached_tokens: int = 0  # tokens at its start found in the prefix cache when it was allocated


@dataclasses.dataclass(frozen=True)
class BlockUsage:
    """A snapshot for the metrics: blocks now, and the counters since start (in tokens, or events)."""
    used: int
    total: int
    block_size: int
    prefix_queries: int
    prefix_hits: int
    evictions: int
    preemptions: int


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        if num_blocks < 2:
            raise ValueError(f"the KV pool needs at least 2 blocks (one is the scratch block), got {num_blocks}")
        self.num_blocks, self.block_size = num_blocks, block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_counts = [0] * num_blocks
        self.keys: list[BlockKey | None] = [None] * num_blocks  # the cached key of each block, if any
        self.cached: dict[BlockKey, int] = {}                   # key -> block holding those K/V
        # Unreferenced blocks, in the order they are to be reused: blocks holding nothing first, then cached
        # blocks least recently freed first. (An OrderedDict: taking a cached block back out is O(1).)
        self.free_list: collections.OrderedDict[int, None] = collections.OrderedDict(
            (b, None) for b in range(1, num_blocks))
        self.stats = BlockStats()

    # ---- what is free ----------------------------------------------------------------------------------

    @property
    def usable_blocks(self) -> int:
        return self.num_blocks - 1

    @property
    def num_free(self) -> int:
        """Blocks that can be allocated now (cached unreferenced blocks included: they are evicted on use)."""
        return len(self.free_list)

    @property
    def num_used(self) -> int:
        return self.usable_blocks - self.num_free

    def blocks_for(self, tokens: int) -> int:
        """Blocks a sequence of `tokens` positions needs."""
        return -(-tokens // self.block_size)

    # ---- per sequence: what the engine and the scheduler call ------------------------------------------

    def allocate_prompt(self, tokens: list[int]) -> BlockTable | None:
        """The blocks `tokens` need, and one more position (for the first generated token), reusing the longest
        cached run of full blocks at their start (at least the last token is left to compute: its logits are
        needed). None, and nothing taken, when too few blocks are free now. Counts the prefix-cache lookup."""
        found, keys = self.match_prefix(tokens)
        if len(found) * self.block_size >= len(tokens):  # every token cached: the last must still run
            found = found[:-1]
        need = self.blocks_for(len(tokens) + 1) - len(found)
        # cached blocks nobody holds are in the free list: taking them leaves fewer to allocate from
        if need > self.num_free - sum(self.ref_counts[b] == 0 for b in found):
            return None
        self.take(found)
        blocks = found + self.allocate(need)
        cached_tokens = len(found) * self.block_size
        self.stats.prefix_queries += len(tokens)
        self.stats.prefix_hits += cached_tokens
        return BlockTable(blocks=blocks, keys=keys, registered=len(found), cached_tokens=cached_tokens)

    def make_room(self, table: BlockTable, positions: int) -> bool:
        """Make sure `table` holds the blocks of `positions` token positions (a decoding sequence: its computed
        tokens and the next one). False, and nothing taken, when too few blocks are free (the caller preempts)."""
        need = self.blocks_for(positions) - len(table.blocks)
        if need <= 0:
            return True
        if need > self.num_free:
            return False
        table.blocks += self.allocate(need)
        return True

    def trim(self, table: BlockTable, positions: int) -> None:
        """Give back the blocks past those of `positions` token positions: a speculative step took blocks for
        drafted tokens that were rejected. They were never entered in the prefix cache (only blocks full of
        accepted tokens are)."""
        keep = max(self.blocks_for(positions), table.registered)
        if len(table.blocks) > keep:
            extra, table.blocks = table.blocks[keep:], table.blocks[:keep]
            self.release(extra)

    def cache_full_blocks(self, table: BlockTable, tokens: list[int], computed: int) -> None:
        """The first `computed` of `tokens` have their K/V in `table`'s blocks: enter the blocks they fill that
        are not entered yet in the prefix cache (the keys of blocks filled by decoding are chained on from the
        last known one)."""
        full = computed // self.block_size
        if full <= table.registered:
            return
        if len(table.keys) < full:
            parent = hash(table.keys[-1]) if table.keys else None
            start = len(table.keys) * self.block_size
            table.keys += block_keys(tokens[start:full * self.block_size], self.block_size, parent)
        for i in range(table.registered, full):
            self.register(table.blocks[i], table.keys[i])
        table.registered = full

    def free(self, table: BlockTable) -> None:
        """Give back every block of `table` (its full ones stay in the prefix cache until their memory is
        needed); the table is empty afterwards."""
        self.release(table.blocks)
        table.blocks, table.registered = [], 0

    def preempt(self, table: BlockTable) -> None:
        """free(), counted as a preemption: the sequence gives its blocks back mid-generation, to be recomputed."""
        self.stats.preemptions += 1
        self.free(table)

    def usage(self) -> BlockUsage:
        return BlockUsage(used=self.num_used, total=self.usable_blocks, block_size=self.block_size,
                          prefix_queries=self.stats.prefix_queries, prefix_hits=self.stats.prefix_hits,
                          evictions=self.stats.evictions, preemptions=self.stats.preemptions)

    # ---- prefix cache -----------------------------------------------------------------------------------

    def match_prefix(self, tokens) -> tuple[list[int], list[BlockKey]]:
        """The cached blocks of the longest run of full blocks matching the start of `tokens`, and the keys of
        every full block of `tokens` (to register the rest once computed). Takes no reference."""
        keys = block_keys(tokens, self.block_size)
        found = []
        if self.enable_prefix_caching:
            for key in keys:
                block = self.cached.get(key)
                if block is None:
                    break
                found.append(block)
        return found, keys

    def register(self, block: int, key: BlockKey) -> None:
        """`block` now holds the K/V of the full block named `key`. If another block already holds them, this one
        stays unnamed (it is freed as plain memory)."""
        if not self.enable_prefix_caching or self.keys[block] is not None or key in self.cached:
            return
        self.keys[block] = key
        self.cached[key] = block

    # ---- references -------------------------------------------------------------------------------------

    def take(self, blocks: list[int]) -> None:
        """Reference cached blocks a prompt matched (taking them off the free list when nobody held them)."""
        for block in blocks:
            if self.ref_counts[block] == 0:
                del self.free_list[block]
            self.ref_counts[block] += 1

    def allocate(self, count: int) -> list[int]:
        """`count` blocks for new K/V, each referenced once; OutOfBlocks (and nothing taken) if fewer are free."""
        if count > len(self.free_list):
            raise OutOfBlocks(f"{count} KV blocks asked for, {len(self.free_list)} free of {self.usable_blocks}")
        blocks = []
        for _ in range(count):
            block, _ = self.free_list.popitem(last=False)
            key = self.keys[block]
            if key is not None:  # evict: its contents are about to be overwritten
                del self.cached[key]
                self.keys[block] = None
                self.stats.evictions += 1
            self.ref_counts[block] = 1
            blocks.append(block)
        return blocks

    def release(self, blocks: list[int]) -> None:
        """Drop one reference to each block. A block left unreferenced goes to the free list: at the end (reused
        last) when it is cached, at the front when it holds nothing worth keeping. Blocks are released last
        first, so of one sequence the blocks of its end are evicted before those of its start, which a later
        prompt is likelier to share."""
        for block in reversed(blocks):
            if block == SCRATCH_BLOCK:
                continue
            count = self.ref_counts[block] - 1
            if count < 0:
                raise RuntimeError(f"KV block {block} released more often than it was taken")
            self.ref_counts[block] = count
            if count == 0:
                self.free_list[block] = None
                if self.keys[block] is None:
                    self.free_list.move_to_end(block, last=False)

    def check(self) -> None:
        """Invariants (tests call this): free blocks are exactly the unreferenced ones, the cache index agrees
        with the blocks' keys."""
        unreferenced = {b for b in range(1, self.num_blocks) if self.ref_counts[b] == 0}
        assert unreferenced == set(self.free_list), (unreferenced ^ set(self.free_list))
        assert all(self.keys[b] == k for k, b in self.cached.items())
        assert sum(k is not None for k in self.keys) == len(self.cached)
