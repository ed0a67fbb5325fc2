"""A KV block pool in shared memory, and the leases by which the prefill model hands a prompt's blocks to decode.

The prefill model (NAME_prefill) computes prompts into a pool of its own that lives in a named POSIX shared-memory
file, /dev/shm/mstriton-kv-<tritonserver pid>-<llm>, and the decode model (NAME_decode) maps the same file. What
travels through Triton is a handover: a lease (a slot of the lease table below and its generation) and the ids of
the prompt's blocks. The KV itself never does.

Every block has one owner at every moment:
- the prefill model's block manager owns its pool (its prefix cache included); a leased prompt's blocks stay
  pinned (held by the leased sequence) until the lease ends;
- the decode model owns its own pool. At admission it claims the lease, copies the prompt's blocks it does not
  already hold in its own prefix cache, and returns the lease; a request that ends before admission (cancelled,
  refused, shut down) returns its lease unclaimed.
- the prefill model releases the blocks of returned leases, and of leases nobody claimed within LEASE_SECONDS (a
  lost handover: decode then recomputes the prompt itself, as it does when no lease came at all).

A lease's state lives in the shared table; an fcntl lock on the file guards every change of it. The kernel drops
that lock when its holder dies, so a killed process never leaves the other waiting. When either model process
dies, the supervisor restarts tritonserver and removes the file (supervisor.py): nothing in it outlives the server
that made it.
"""

from __future__ import annotations

import dataclasses
import fcntl
import mmap
import os
import threading
import time
from pathlib import Path

import numpy as np

from .kv_pool import KVPool

SHM = Path("/dev/shm")
REGION_PREFIX = "mstriton-kv-"
MAGIC = 0x6D73_6B76  # "mskv"
HEADER_WORDS = 16
LEASE_SLOTS = 1024
# A lease not claimed within this long is taken back (its request was lost between the models); decode recomputes
# such a prompt. Every normal path returns a lease within a request's queueing time.
LEASE_SECONDS = 300.0
PAGE = mmap.PAGESIZE
DTYPES = {0: np.dtype(np.float32), 1: np.dtype(np.float16)}

# lease states
FREE, LEASED, CLAIMED, RETURNED = 0, 1, 2, 3


def region_path(llm: str, server_pid: int | None = None) -> Path:
    """The shared pool of LLM `llm` under the tritonserver of `server_pid` (default: this model process's parent,
    tritonserver itself)."""
    return SHM / f"{REGION_PREFIX}{server_pid if server_pid is not None else os.getppid()}-{llm}"


def _layout(n_layers, n_kv_heads, head_dim, num_blocks, block_size, dtype) -> tuple[int, int, int]:
    """Byte offsets of the lease table and the two pool arrays, and the file's size."""
    lease_bytes = LEASE_SLOTS * 2 * 8
    keys_at = -(-(HEADER_WORDS * 8 + lease_bytes) // PAGE) * PAGE
    half = n_layers * num_blocks * n_kv_heads * head_dim * block_size * np.dtype(dtype).itemsize
    return keys_at, keys_at + half, keys_at + 2 * half


@dataclasses.dataclass
class SharedKV:
    """One mapping of a region: its pool and its lease table."""
    path: Path
    pool: KVPool
    leases: np.ndarray   # [LEASE_SLOTS, 2] int64: generation, state
    fd: int

    # ---- making and opening ---------------------------------------------------------------------------

    @classmethod
    def create(cls, path: Path, n_layers: int, n_kv_heads: int, head_dim: int, num_blocks: int, block_size: int,
               dtype=np.float32, prefault: bool = False) -> "SharedKV":
        """A new region at `path` (one left by an earlier process of the same name is replaced)."""
        dtype = np.dtype(dtype)
        code = next(c for c, d in DTYPES.items() if d == dtype)
        fields = [MAGIC, n_layers, n_kv_heads, head_dim, num_blocks, block_size, code]
        _, _, size = _layout(n_layers, n_kv_heads, head_dim, num_blocks, block_size, dtype)
        path.unlink(missing_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        os.ftruncate(fd, size)
        os.pwrite(fd, np.array(fields, np.int64).tobytes(), 0)  # the header an opener reads
        return cls._map(path, fd, fields, prefault)

    @classmethod
    def for_graphs(cls, path: Path, graphs, num_blocks: int, prefault: bool = False) -> "SharedKV":
        """A new region whose pool has `num_blocks` blocks of the shape the engine `graphs` compute."""
        c = graphs.config
        return cls.create(path, c.num_hidden_layers, c.num_key_value_heads, c.head_dim, num_blocks,
                          graphs.block_size, graphs.np_dtype, prefault=prefault)

    @classmethod
    def open(cls, path: Path) -> "SharedKV":
        """The region the prefill model made (FileNotFoundError when there is none)."""
        fd = os.open(path, os.O_RDWR)
        header = np.frombuffer(os.pread(fd, HEADER_WORDS * 8, 0), np.int64)
        if header[0] != MAGIC:
            os.close(fd)
            raise ValueError(f"{path} is not an mstriton KV region")
        return cls._map(path, fd, header[:7].tolist(), False)

    @classmethod
    def _map(cls, path: Path, fd: int, fields: list[int], prefault: bool) -> "SharedKV":
        _, n_layers, n_kv_heads, head_dim, num_blocks, block_size, code = (int(f) for f in fields)
        dtype = DTYPES[code]
        keys_at, values_at, size = _layout(n_layers, n_kv_heads, head_dim, num_blocks, block_size, dtype)
        mapping = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        raw = np.frombuffer(mapping, np.uint8)
        leases = raw[HEADER_WORDS * 8:HEADER_WORDS * 8 + LEASE_SLOTS * 16].view(np.int64).reshape(LEASE_SLOTS, 2)
        rows = n_layers * num_blocks
        keys = raw[keys_at:values_at].view(dtype).reshape(rows, n_kv_heads, head_dim, block_size)
        values = raw[values_at:size].view(dtype).reshape(rows, n_kv_heads, block_size, head_dim)
        if prefault:
            keys.fill(0)
            values.fill(0)
        pool = KVPool(n_layers, n_kv_heads, head_dim, num_blocks, block_size, dtype, arrays=(keys, values))
        return cls(path=path, pool=pool, leases=leases, fd=fd)

    def close(self) -> None:
        os.close(self.fd)

    def unlink(self) -> None:
        self.path.unlink(missing_ok=True)

    # ---- the lease table ------------------------------------------------------------------------------

    def locked(self) -> "_FileLock":
        return _FileLock(self.fd)

    def outstanding(self) -> int:
        """Leases given out and not yet taken back by the prefill model."""
        return int(np.count_nonzero(self.leases[:, 1] != FREE))


class _FileLock:
    """The region's fcntl lock (between processes) and a thread lock (fcntl locks are per process)."""
    _threads = threading.Lock()

    def __init__(self, fd: int):
        self.fd = fd

    def __enter__(self):
        self._threads.acquire()
        fcntl.lockf(self.fd, fcntl.LOCK_EX, 1, 0)

    def __exit__(self, *exc):
        fcntl.lockf(self.fd, fcntl.LOCK_UN, 1, 0)
        self._threads.release()


class LeaseBook:
    """The prefill model's side: gives leases out and takes them back. Holds each leased sequence (its blocks
    pinned in the prefill engine) until its lease comes back or runs out."""

    def __init__(self, region: SharedKV, release, lease_seconds: float = LEASE_SECONDS):
        """`release(sequence)`: give a sequence's blocks back to the prefill engine."""
        self.region, self.release, self.lease_seconds = region, release, lease_seconds
        self.held: dict[int, tuple[object, float]] = {}  # slot -> (sequence, deadline)
        self.free_slots = list(range(LEASE_SLOTS - 1, -1, -1))
        self.expired = 0  # leases taken back unclaimed (counted for the logs and tests)

    def lease(self, sequence) -> tuple[int, int] | None:
        """A lease on `sequence`'s blocks: (slot, generation); None when every slot is out."""
        if not self.free_slots:
            return None
        slot = self.free_slots.pop()
        with self.region.locked():
            generation = int(self.region.leases[slot, 0]) + 1
            self.region.leases[slot] = (generation, LEASED)
        self.held[slot] = (sequence, time.monotonic() + self.lease_seconds)
        return slot, generation

    def reap(self) -> int:
        """Take back returned leases and those past their deadline; their blocks go back. Returns how many."""
        now, taken = time.monotonic(), []
        with self.region.locked():
            for slot, (sequence, deadline) in self.held.items():
                state = int(self.region.leases[slot, 1])
                if state == RETURNED or (state == LEASED and now > deadline):
                    self.expired += state == LEASED
                    self.region.leases[slot, 1] = FREE
                    taken.append(slot)
        for slot in taken:
            sequence, _ = self.held.pop(slot)
            self.release(sequence)
            self.free_slots.append(slot)
        return len(taken)

    def __len__(self) -> int:
        return len(self.held)


@dataclasses.dataclass(eq=False)
class Handover:
    """The decode model's side of one lease: the prompt's blocks in the shared pool, for one claim."""
    region: SharedKV
    slot: int
    generation: int
    blocks: list[int]
    ended: bool = False

    def claim(self) -> bool:
        """Whether the blocks are still leased to this request (then they stay so until give_back())."""
        if self.ended:
            return False
        with self.region.locked():
            if tuple(self.region.leases[self.slot]) != (self.generation, LEASED):
                self.ended = True  # taken back: its deadline passed
                return False
            self.region.leases[self.slot, 1] = CLAIMED
        return True

    def give_back(self) -> None:
        """End the lease (claimed or not): the prefill model may reuse the blocks. Idempotent."""
        if self.ended:
            return
        self.ended = True
        with self.region.locked():
            if int(self.region.leases[self.slot, 0]) == self.generation and \
                    int(self.region.leases[self.slot, 1]) in (LEASED, CLAIMED):
                self.region.leases[self.slot, 1] = RETURNED


def encode_handover(slot: int, generation: int, blocks: list[int]) -> np.ndarray:
    """What the prefill model sends: [slot, generation, block ids...] (empty: no lease, decode computes)."""
    return np.array([slot, generation, *blocks], np.int32)


def decode_handover(region: SharedKV | None, data: np.ndarray | None) -> Handover | None:
    values = [] if data is None else data.reshape(-1).tolist()
    if region is None or len(values) < 3:
        return None
    return Handover(region=region, slot=values[0], generation=values[1], blocks=values[2:])


class RegionOpener:
    """The decode model maps the prefill model's region at its first handover (the prefill model may load after
    it)."""

    def __init__(self, path: Path):
        self.path = path
        self.region: SharedKV | None = None

    def get(self) -> SharedKV | None:
        if self.region is None:
            try:
                self.region = SharedKV.open(self.path)
            except (FileNotFoundError, ValueError):
                return None
        return self.region
