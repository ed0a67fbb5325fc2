"""Continuous batching over the engine: the loop inside the decode model.

Requests arrive with their prompt's KV cache (from the prefill model) and their first token (from the sampler).
Each step admits waiting requests into free slots, runs one batched decode step over every running sequence,
chooses each sequence's next token with its own settings, and emits it. A sequence that finishes, stops or is
cancelled leaves before the next step and its slot is free at once. When every slot is busy, requests wait in a
bounded queue; past that bound, submit() refuses them with ServerBusy.
"""

from __future__ import annotations

import collections
import dataclasses
import threading
import time
from typing import Callable

import numpy as np

from ..engine.engine import Engine, Sequence
from ..engine.sampling import SamplingState, choose_tokens
from ..params import GenerationParams
from .error_marks import SERVER_BUSY


class ServerBusy(RuntimeError):
    pass


@dataclasses.dataclass
class TokenEvent:
    """One emitted token. `finish_reason` is set on the last event of a request."""
    token: int
    logprob: float
    cum_logprob: float
    output_ids: list[int]             # every token generated so far (what detokenization windows come from)
    num_input_tokens: int
    finish_reason: str | None = None  # length, stop, end_id, cancelled
    error: str | None = None
    top: list[tuple[int, float]] = dataclasses.field(default_factory=list)  # the token's top_logprobs alternatives


@dataclasses.dataclass(eq=False)
class DecodeRequest:
    key: str
    prompt_ids: list[int]
    first_token: int
    first_logprob: float
    keys: list[np.ndarray]
    values: list[np.ndarray]
    params: GenerationParams
    emit: Callable[[TokenEvent], None]
    first_top: list[tuple[int, float]] = dataclasses.field(default_factory=list)  # the first token's alternatives
    end_ids: tuple[int, ...] = ()
    stop_words: list[list[int]] = dataclasses.field(default_factory=list)
    bad_words: list[list[int]] = dataclasses.field(default_factory=list)
    arrived: float = dataclasses.field(default_factory=time.monotonic)


def final_event(request: DecodeRequest, reason: str, error: str | None = None, cum_logprob: float = 0.0,
                output_ids: list[int] | None = None) -> TokenEvent:
    """The last event of a request that ends without a new token (cancelled, refused, shut down)."""
    return TokenEvent(token=-1, logprob=0.0, cum_logprob=cum_logprob, output_ids=output_ids or [],
                      num_input_tokens=len(request.prompt_ids), finish_reason=reason, error=error)


@dataclasses.dataclass(eq=False)
class Running:
    request: DecodeRequest
    sequence: Sequence
    sampling: SamplingState
    cum_logprob: float = 0.0
    cancelled: bool = False


class Scheduler:
    def __init__(self, engine: Engine, max_waiting: int = 64,
                 on_step: Callable[["Scheduler", int, float], None] | None = None,
                 on_state: Callable[["Scheduler"], None] | None = None):
        self.engine = engine
        self.max_waiting = max_waiting
        self.on_step = on_step  # metrics hook after each decode step: (scheduler, batch size, seconds)
        # metrics hook after every pass of the loop, decode or not: a cancel that empties the batch runs no
        # decode step, and the gauges must still drop at once
        self.on_state = on_state
        self.waiting: collections.deque[DecodeRequest] = collections.deque()
        self.running: list[Running] = []
        self.cancelled_keys: set[str] = set()
        self.lock = threading.Condition()
        self.stopping = False
        self.drain_deadline: float | None = None  # set by drain(): when still unfinished requests are ended
        self.drain_reason = ""
        self.thread: threading.Thread | None = None

    # ---- called from request threads -------------------------------------------------------------------

    def submit(self, request: DecodeRequest) -> None:
        with self.lock:
            # free slots count too: requests submitted together wait a moment for the loop to admit them
            if len(self.waiting) >= self.max_waiting + self.engine.free_slots:
                raise ServerBusy(f"{SERVER_BUSY}all {self.engine.max_slots} sequence slots are generating and "
                                 f"{self.max_waiting} requests already wait; retry later")
            self.waiting.append(request)
            self.lock.notify()

    def cancel(self, key: str) -> bool:
        """Stop the request `key` at the next step (waiting or running). Returns whether it was known."""
        with self.lock:
            known = any(r.key == key for r in self.waiting) or any(r.request.key == key for r in self.running)
            if known:
                self.cancelled_keys.add(key)
                self.lock.notify()
            return known

    def stats(self) -> dict[str, float]:
        with self.lock:
            pool = self.engine.pool
            return {"running": len(self.running), "waiting": len(self.waiting),
                    "kv_slots_used": pool.n_active, "kv_slots_total": pool.max_slots,
                    "kv_tokens_used": int(pool.lengths[:pool.n_active].sum()),
                    "kv_tokens_capacity": pool.max_slots * pool.max_len}

    # ---- the loop -------------------------------------------------------------------------------------

    def start(self) -> None:
        self.thread = threading.Thread(target=self._loop, name="mstriton-decode", daemon=True)
        self.thread.start()

    def drain(self, grace_seconds: float, reason: str) -> None:
        """The server is shutting down: requests already accepted, running or waiting, go on for
        `grace_seconds`; whatever is unfinished then ends with an error saying `reason`."""
        with self.lock:
            self.drain_deadline = time.monotonic() + grace_seconds
            self.drain_reason = reason
            self.lock.notify()

    def shutdown(self, reason: str = "the server is shutting down") -> None:
        """Stop the loop; every unfinished request gets a final event with an error."""
        with self.lock:
            self.stopping = True
            self.lock.notify()
        if self.thread:
            self.thread.join()
        self._end_all(reason)

    def _end_all(self, reason: str) -> None:
        for item in list(self.running):
            self._finish(item, "cancelled", error=reason)
        while True:
            with self.lock:
                if not self.waiting:
                    return
                request = self.waiting.popleft()
            request.emit(final_event(request, "cancelled", error=reason))

    def _loop(self) -> None:
        while True:
            with self.lock:
                while not self.stopping and not self.waiting and not self.running:
                    self.lock.wait()
                if self.stopping:
                    return
            self.step()

    def step(self) -> None:
        """Admit, drop the cancelled, run one decode step, emit. Called by the loop (or by tests directly)."""
        if self.drain_deadline is not None and time.monotonic() >= self.drain_deadline:
            self._end_all(self.drain_reason)
        self._drop_cancelled()  # first, so a cancelled sequence's slot serves a waiting request in this step
        self._admit()
        if self.running:
            self._decode()
        if self.on_state:
            self.on_state(self)

    def _decode(self) -> None:
        started = time.monotonic()
        last_tokens = [0] * len(self.running)
        for item in self.running:
            last_tokens[item.sequence.slot] = item.sampling.generated[-1]
        logits = self.engine.decode(last_tokens)
        by_slot = sorted(self.running, key=lambda r: r.sequence.slot)
        tokens, logprobs, tops = choose_tokens(logits, [r.sampling for r in by_slot])
        for item, token, logprob, top in zip(by_slot, tokens, logprobs, tops):
            self._emit(item, int(token), float(logprob), top)
        if self.on_step:
            self.on_step(self, len(by_slot), time.monotonic() - started)

    def _admit(self) -> None:
        while True:
            with self.lock:
                if not self.waiting or self.engine.free_slots == 0:
                    return
                request = self.waiting.popleft()
                if request.key in self.cancelled_keys:
                    self.cancelled_keys.discard(request.key)
                    request.emit(final_event(request, "cancelled"))
                    continue
            try:
                sequence = self.engine.admit(request.keys, request.values, len(request.prompt_ids))
            except ValueError as exc:  # the prompt leaves no room: refuse this one, keep serving others
                request.emit(final_event(request, "length", error=str(exc)))
                continue
            request.keys = request.values = []  # the pool holds its own copy now
            sampling = SamplingState(params=request.params, end_ids=request.end_ids,
                                     prompt_ids=request.prompt_ids, bad_words=request.bad_words)
            if sampling.rng is not None:
                sampling.rng.random()  # the sampler model drew the first token from the same seed
            item = Running(request=request, sequence=sequence, sampling=sampling)
            self.running.append(item)
            self._emit(item, request.first_token, request.first_logprob, request.first_top)

    def _drop_cancelled(self) -> None:
        with self.lock:
            keys, self.cancelled_keys = self.cancelled_keys, set()
        for item in [r for r in self.running if r.request.key in keys]:
            self._finish(item, "cancelled")

    def _emit(self, item: Running, token: int, logprob: float, top: list[tuple[int, float]]) -> None:
        item.sampling.record(token)
        item.cum_logprob += logprob
        reason = self._finish_reason(item, token)
        event = TokenEvent(token=token, logprob=logprob, cum_logprob=item.cum_logprob,
                           output_ids=item.sampling.generated, num_input_tokens=len(item.request.prompt_ids),
                           finish_reason=reason, top=top)
        try:
            item.request.emit(event)
        except Exception:  # the client is gone: free its slot now
            reason = reason or "cancelled"
        if reason:
            self._release(item)

    def _finish_reason(self, item: Running, token: int) -> str | None:
        generated = item.sampling.generated
        params = item.request.params
        if token in item.request.end_ids and len(generated) > params.min_tokens:
            return "end_id"
        for word in item.request.stop_words:
            if word and generated[-len(word):] == word:
                return "stop"
        if len(generated) >= params.max_tokens:
            return "length"
        if self.engine.length(item.sequence) + 1 >= self.engine.pool.max_len:
            return "length"  # the next token would not fit in max_seq_len
        return None

    def _finish(self, item: Running, reason: str, error: str | None = None) -> None:
        item.request.emit(final_event(item.request, reason, error=error, cum_logprob=item.cum_logprob,
                                      output_ids=item.sampling.generated))
        self._release(item)

    def _release(self, item: Running) -> None:
        self.engine.release(item.sequence)
        self.running.remove(item)
