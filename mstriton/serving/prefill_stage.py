"""The prefill model's work, testable without Triton: the prompts of a batch of requests (what Triton's dynamic
batcher merged) computed in one engine call into the shared pool, each prompt's blocks leased to the decode model
(engine/shared_kv.py), and the logits of each prompt's last token for the sampler.

A prompt this stage cannot take (longer than the pool allows, no free blocks or lease slots, a failed graph call)
gets no handover: the decode model then computes it itself, as the colocated shape always does, and refuses it
there with the numbers when it can never fit. So this stage only ever makes a request faster, never fails it.
"""

from __future__ import annotations

import dataclasses
import logging
import threading

import numpy as np

from ..engine.engine import Engine, PromptTooLong
from ..engine.shared_kv import LEASE_SECONDS, LeaseBook, SharedKV, encode_handover

NO_HANDOVER = np.zeros(0, np.int32)
NO_LOGITS = np.zeros(0, np.float32)


@dataclasses.dataclass
class Prefilled:
    """One request's outputs: its handover ([slot, generation, blocks...], empty for none) and its last token's
    logits [V] (empty with no handover)."""
    handover: np.ndarray = dataclasses.field(default_factory=lambda: NO_HANDOVER)
    logits: np.ndarray = dataclasses.field(default_factory=lambda: NO_LOGITS)


class PrefillStage:
    def __init__(self, engine: Engine, region: SharedKV, lease_seconds: float = LEASE_SECONDS):
        if engine.pool is not region.pool:
            raise ValueError("the prefill engine must compute into the shared region's pool")
        self.engine, self.region = engine, region
        self.book = LeaseBook(region, engine.release, lease_seconds)
        self.lock = threading.Lock()  # run() and the reaper thread's reap() share the engine

    def run(self, prompts: list[list[int] | None]) -> list[Prefilled]:
        """Prefill every prompt (None: a request refused upstream, passed over) in one engine call."""
        with self.lock:
            self.book.reap()
            results = [Prefilled() for _ in prompts]
            added = {}
            for i, prompt in enumerate(prompts):
                if not prompt:
                    continue
                try:
                    sequence = self.engine.add(prompt)
                except PromptTooLong:
                    continue  # decode refuses it, naming the numbers of its own pool
                if sequence is not None:
                    added[i] = sequence
            if not added:
                return results
            try:
                logits = self.engine.prefill([(s, s.to_compute) for s in added.values()])
            except Exception:  # noqa: BLE001 - decode computes these prompts itself
                logging.getLogger(__name__).exception("prefill failed; the decode model computes the batch")
                for sequence in added.values():
                    self.engine.release(sequence)
                return results
            for i, sequence in added.items():
                lease = self.book.lease(sequence)
                if lease is None:
                    self.engine.release(sequence)
                    continue
                results[i] = Prefilled(handover=encode_handover(*lease, sequence.blocks),
                                       logits=np.asarray(logits[sequence], np.float32))
            return results

    def reap(self) -> int:
        with self.lock:
            return self.book.reap()

    def stats(self) -> dict[str, int]:
        with self.lock:
            usage = self.engine.blocks.usage()
            return {"leases": len(self.book), "leases_expired": self.book.expired,
                    "kv_blocks_used": usage.used, "kv_blocks_total": usage.total,
                    "prefix_cache_queries": usage.prefix_queries, "prefix_cache_hits": usage.prefix_hits}
