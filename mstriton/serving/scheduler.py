"""Continuous batching over the engine: the loop inside the decode model, which owns the paged KV cache.

Requests arrive as prompt token ids. Each step of the loop:
1. ends cancelled requests and frees their blocks;
2. admits waiting requests in arrival order while a decode slot and the blocks of the prompt (beyond what the
   prefix cache already holds) are free: the KV cache is admitted by blocks, not by worst-case length. A request
   under a grammar waits until its grammar is compiled (off this loop); the requests behind it go on meanwhile;
3. prefills: with no stream decoding, every admitted prompt in full; beside running streams only a budget of
   prompt tokens (chunks of the prompts, oldest first), so that a long prompt costs each stream a bounded delay
   per token instead of a stall (chunked prefill beside decode, as in vLLM and MindIE's SplitFuse). The budget
   is a number of tokens, or by default (0) the tokens that take PREFILL_TIME_SHARE of the last decode steps'
   time, from the prefill time per token measured so far: the delay is then the same share of a step whether
   4 or 64 streams run, and a big batch (slow steps) takes prompts in faster. A prompt
   whose tokens are all computed gets its first token (the request's own sampling settings) and joins the batch;
4. gives every decoding sequence room for its next token; when blocks run out, the newest sequence is preempted:
   its blocks go back (full ones stay in the prefix cache), it waits at the head of the queue, and on its turn
   is recomputed from its prompt and the tokens it has generated, then goes on where it stopped (its client sees
   only a pause);
5. runs one batched decode step, chooses each sequence's next token with its own settings, and emits it.
A request that could never fit (longer than max_seq_len, or than the whole pool) is refused at once, with the
numbers. Past the bounded queue, submit() refuses with ServerBusy.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import logging
import threading
import time
from typing import Callable

import numpy as np

from ..engine.engine import Engine, PromptTooLong, Sequence
from ..engine.shared_kv import Handover
from .first_token import FirstToken
from ..engine.ngram import NgramDrafter
from .speculation import Speculation
from ..engine.sampling import SamplingState, choose_tokens
from ..params import DEFAULT_PREFILL_BUDGET, GenerationParams
from .error_marks import INVALID_REQUEST, SERVER_BUSY

# Beside running streams, prefill per step may take this share of a decode step's time (auto budget): the gap
# between two tokens of a stream is then at most about 1 + share decode steps.
PREFILL_TIME_SHARE = 1.5
SMOOTHING = 0.2  # weight of the newest measurement in the running averages of step and prefill times


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
    params: GenerationParams
    emit: Callable[[TokenEvent], None]
    end_ids: tuple[int, ...] = ()
    stop_words: list[list[int]] = dataclasses.field(default_factory=list)
    bad_words: list[list[int]] = dataclasses.field(default_factory=list)
    arrived: float = dataclasses.field(default_factory=time.monotonic)
    # its grammar's matcher, being compiled (structured_output.GrammarCompiler); None: no grammar
    grammar: concurrent.futures.Future | None = None
    # its prompt computed by the prefill model (the disaggregated shape): the lease on its blocks in the shared
    # pool, and the first token the sampler chose. None: this loop computes the prompt (the colocated shape).
    handover: Handover | None = None
    first: FirstToken | None = None

    @property
    def ready(self) -> bool:
        return self.grammar is None or self.grammar.done()


def final_event(request: DecodeRequest, reason: str, error: str | None = None, cum_logprob: float = 0.0,
                output_ids: list[int] | None = None) -> TokenEvent:
    """The last event of a request that ends without a new token (cancelled, refused, shut down)."""
    return TokenEvent(token=-1, logprob=0.0, cum_logprob=cum_logprob, output_ids=output_ids or [],
                      num_input_tokens=len(request.prompt_ids), finish_reason=reason, error=error)


@dataclasses.dataclass(eq=False)
class Running:
    """An admitted request: prefilling (sequence.slot < 0) or decoding."""
    request: DecodeRequest
    sequence: Sequence
    sampling: SamplingState
    cum_logprob: float = 0.0
    resumed: bool = False  # recomputing after a preemption: its next token is already known
    drafter: NgramDrafter | None = None  # its prompt and output, for speculative steps (None: it drafts nothing)


class Scheduler:
    def __init__(self, engine: Engine, max_waiting: int = 64,
                 on_step: Callable[["Scheduler", int, float], None] | None = None,
                 on_state: Callable[["Scheduler"], None] | None = None,
                 prefill_budget: int = DEFAULT_PREFILL_BUDGET, speculation: Speculation | None = None):
        self.engine = engine
        if speculation is not None and not engine.can_verify_drafts:
            raise ValueError("speculative decoding needs the CPU kernels' decode steps (a packed weight format: "
                             "bf16, int8, q8_0, q4_0, q4_1); this engine runs MindSpore's float32 ops")
        self.speculation = speculation
        self.drafted_tokens = 0   # drafted tokens verified so far, and those of them accepted (vLLM's counters)
        self.accepted_tokens = 0
        self.adopted_prompts = 0  # prompts the prefill model computed (disaggregated shape), adopted here
        self.max_waiting = max_waiting
        self.prefill_budget = prefill_budget  # tokens per step beside decode; 0: auto (PREFILL_TIME_SHARE)
        self.decode_seconds: float | None = None         # running average of a decode step
        self.prefill_token_seconds: float | None = None  # running average of prefill time per prompt token
        self.on_step = on_step  # metrics hook after each decode step: (scheduler, batch size, seconds)
        # metrics hook after every pass of the loop, decode or not: a cancel that empties the batch runs no
        # decode step, and the gauges must still drop at once
        self.on_state = on_state
        # requests not admitted: new ones (DecodeRequest) and preempted ones (Running, at the front)
        self.waiting: collections.deque[DecodeRequest | Running] = collections.deque()
        self.running: list[Running] = []  # admitted: prefilling, then decoding
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
            if len(self.waiting) >= self.max_waiting + self.engine.max_slots - len(self.running):
                raise ServerBusy(f"{SERVER_BUSY}all {self.engine.max_slots} sequence slots are generating and "
                                 f"{self.max_waiting} requests already wait; retry later")
            self.waiting.append(request)
            self.lock.notify()
        if request.grammar is not None:  # the loop may be asleep with only this request waiting
            request.grammar.add_done_callback(lambda _: self._wake())

    def _wake(self) -> None:
        with self.lock:
            self.lock.notify()

    def cancel(self, key: str) -> bool:
        """Stop the request `key` at the next step (waiting or running). Returns whether it was known."""
        with self.lock:
            known = any(_request(r).key == key for r in self.waiting) or \
                any(r.request.key == key for r in self.running)
            if known:
                self.cancelled_keys.add(key)
                self.lock.notify()
            return known

    def stats(self) -> dict[str, float]:
        with self.lock:
            blocks = self.engine.blocks.usage()
            decoding = [r for r in self.running if r.sequence.slot >= 0]
            return {"running": len(decoding), "prefilling": len(self.running) - len(decoding),
                    "waiting": len(self.waiting),
                    "kv_blocks_used": blocks.used, "kv_blocks_total": blocks.total,
                    "kv_block_size": blocks.block_size,
                    "kv_tokens_used": sum(r.sequence.computed for r in self.running),
                    "spec_draft_tokens": self.drafted_tokens, "spec_accepted_tokens": self.accepted_tokens,
                    "prompts_adopted": self.adopted_prompts,
                    "prefix_cache_queries": blocks.prefix_queries,
                    "prefix_cache_hits": blocks.prefix_hits,
                    "preemptions": blocks.preemptions}

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
                entry = self.waiting.popleft()
            self._end_waiting(entry, "cancelled", error=reason)

    def _loop(self) -> None:
        while True:
            with self.lock:
                while not self.stopping and not self.running and not any(map(self._admissible, self.waiting)):
                    self.lock.wait()
                if self.stopping:
                    return
            try:
                self.step()
            except Exception as exc:  # noqa: BLE001 - the loop must outlive any one step: its thread serves everyone
                # What a step was doing cannot be trusted to go on: every request admitted or waiting ends with the
                # error, and the loop serves the next ones (a dead loop thread hung every later request).
                logging.getLogger(__name__).exception("decode loop step failed")
                try:
                    self._end_all(f"internal error in the decode loop: {type(exc).__name__}: {exc}")
                except Exception:  # noqa: BLE001
                    logging.getLogger(__name__).exception("ending the requests of the failed step failed too")

    def step(self) -> None:
        """Drop the cancelled, admit, prefill within the budget, make room, decode, emit. Called by the loop
        (or by tests directly)."""
        if self.drain_deadline is not None and time.monotonic() >= self.drain_deadline:
            self._end_all(self.drain_reason)
        self._drop_cancelled()  # first, so a cancelled sequence's blocks serve a waiting request in this step
        self._admit()
        self._prefill()
        self._make_room()
        if any(r.sequence.slot >= 0 for r in self.running):
            self._decode()
        if self.on_state:
            self.on_state(self)

    def _admissible(self, entry: DecodeRequest | Running) -> bool:
        """Whether _admit can take `entry` now: admit it, or end it (cancelled). Called holding the lock."""
        return _ready(entry) or _request(entry).key in self.cancelled_keys

    def _admit(self) -> None:
        while True:
            with self.lock:
                if len(self.running) >= self.engine.max_slots:
                    return
                entry = next(filter(self._admissible, self.waiting), None)
                if entry is None:
                    return
                request = _request(entry)
                if request.key in self.cancelled_keys:
                    self.waiting.remove(entry)
                    self.cancelled_keys.discard(request.key)
                    self._end_waiting(entry, "cancelled")
                    continue
            matcher = None
            if isinstance(entry, DecodeRequest) and entry.grammar is not None:
                try:
                    matcher = entry.grammar.result()
                except Exception as exc:  # noqa: BLE001 - its grammar did not compile: refuse this one only
                    with self.lock:
                        self.waiting.remove(entry)
                    self._end_waiting(entry, "cancelled", error=f"{INVALID_REQUEST}{exc}")
                    continue
            if isinstance(entry, Running):  # preempted: recompute its prompt and what it generated before the last
                tokens = request.prompt_ids + entry.sampling.generated[:-1]
            else:
                tokens = request.prompt_ids
            try:
                sequence = self.engine.add(tokens)
            except PromptTooLong as exc:  # it could never fit: refuse this one, keep serving others
                with self.lock:
                    self.waiting.remove(entry)
                self._end_waiting(entry, "length", error=str(exc))
                continue
            if sequence is None:
                return  # too few free blocks now: it keeps its place in the queue
            with self.lock:
                self.waiting.remove(entry)
            if isinstance(entry, Running):  # resumed; one preempted before its first token starts over
                entry.sequence, entry.resumed = sequence, bool(entry.sampling.generated)
                self.running.append(entry)
                continue
            sampling = SamplingState(params=request.params, end_ids=request.end_ids,
                                     prompt_ids=request.prompt_ids, bad_words=request.bad_words, matcher=matcher)
            drafter = None
            if self.speculation and request.params.speculative:
                drafter = NgramDrafter(request.prompt_ids, self.speculation.ngram_max, self.speculation.ngram_min,
                                       capacity=self.engine.max_len)
            item = Running(request=request, sequence=sequence, sampling=sampling, drafter=drafter)
            self.running.append(item)
            if request.handover is not None:
                self._adopt(item)

    def _adopt(self, item: Running) -> None:
        """A prompt the prefill model computed: copy its blocks from the shared pool (those the prefix cache here
        does not hold), emit the sampler's first token, and join the decode batch. A lease that ran out, or a
        handover that does not fit, leaves the prompt to _prefill, as if no handover had come."""
        request = item.request
        try:
            if request.first is None or not request.handover.claim():
                return
            try:
                self.engine.adopt(item.sequence, request.handover.region.pool, request.handover.blocks)
            except ValueError:
                logging.getLogger(__name__).exception("a handover did not fit; computing the prompt here")
                return
        finally:
            request.handover.give_back()
        first = request.first
        if first.chosen:
            token, logprob, top = first.token, first.logprob, first.top
            if first.sampled:  # the sampler drew it from the request's seed: this generator goes on after that draw
                item.sampling.rng.random()
        else:  # left to this model (a grammar's request): chosen from the prefill's logits
            [token], [logprob], [top] = choose_tokens(first.logits[None], [item.sampling])
        self.adopted_prompts += 1
        self.engine.start_decoding(item.sequence)
        self._emit(item, int(token), float(logprob), top)

    def _prefill(self) -> None:
        prefilling = [r for r in self.running if r.sequence.slot < 0]
        if not prefilling:
            return
        decoding = len(prefilling) < len(self.running)
        budget = self.budget() if decoding else None  # nobody waits for a token: run the prompts whole
        work = []
        for item in prefilling:
            count = item.sequence.to_compute if budget is None else min(item.sequence.to_compute, budget)
            if count < item.sequence.to_compute:
                count = self._aligned_piece(item.sequence.computed, count, first=not work)
            if count <= 0:
                break
            work.append((item, count))
            if budget is not None:
                budget -= count
        started = time.monotonic()
        done = self.engine.prefill([(item.sequence, count) for item, count in work])
        self.prefill_token_seconds = _average(self.prefill_token_seconds,
                                              (time.monotonic() - started) / sum(c for _, c in work))
        fresh = [item for item, _ in work if item.sequence in done and not item.resumed]
        for item, _ in work:
            if item.sequence in done and item.resumed:  # it goes on with the token it had chosen
                item.resumed = False
                self.engine.start_decoding(item.sequence)
        if not fresh:
            return
        logits = np.stack([done[item.sequence] for item in fresh])
        tokens, logprobs, tops = choose_tokens(logits, [item.sampling for item in fresh])
        for item, token, logprob, top in zip(fresh, tokens, logprobs, tops):
            self.engine.start_decoding(item.sequence)
            self._emit(item, int(token), float(logprob), top)

    def _aligned_piece(self, computed: int, count: int, first: bool) -> int:
        """A piece of a prompt that does not finish it ends on a multiple of the KV block size. The chunked-prefill
        graph lays a piece's keys after the earlier ones padded to a bucket's width, so a key at position p sits in
        a column that depends on where its piece began; MindSpore's CPU softmax sums in 8-wide lanes, so a piece
        that began off a multiple of 8 gave attention probabilities 1 ulp apart, which int8 activations grew into
        different greedy tokens (a soak's greedy answers under load: 30 of 441 unlike their solo run). Pieces on
        block boundaries are bit for bit the whole prompt's, as prefix-cache hits (whole blocks) always were.
        The first prompt in line still moves when the budget is under one block."""
        block = self.engine.blocks.block_size
        aligned = (computed + count) // block * block - computed
        return aligned if aligned > 0 or not first else count

    def budget(self) -> int:
        """Prompt tokens to prefill in this step beside running streams: the configured number, or (0) what
        takes PREFILL_TIME_SHARE of a decode step, at least one chunk."""
        if self.prefill_budget:
            return self.prefill_budget
        least = self.engine.graphs.continuation
        if not self.decode_seconds or not self.prefill_token_seconds:
            return least
        tokens = int(PREFILL_TIME_SHARE * self.decode_seconds / self.prefill_token_seconds)
        return max(least, tokens // least * least)

    def _make_room(self) -> None:
        """A block for every decoding sequence's next token, preempting the newest admitted requests while none
        is free."""
        for item in sorted([r for r in self.running if r.sequence.slot >= 0], key=self.running.index):
            while item in self.running and not self.engine.grow(item.sequence):
                self._preempt(self.running[-1])

    def _preempt(self, item: Running) -> None:
        self.engine.preempt(item.sequence)
        self.running.remove(item)
        item.resumed = False
        with self.lock:
            self.waiting.appendleft(item)

    def _decode(self) -> None:
        started = time.monotonic()
        by_slot = sorted([r for r in self.running if r.sequence.slot >= 0], key=lambda r: r.sequence.slot)
        drafts = self._drafts(by_slot)
        logits, starts = self.engine.decode_with_drafts([r.sampling.generated[-1] for r in by_slot], drafts)
        # every sequence's own row first, in one call, as a plain step chooses
        tokens, logprobs, tops = choose_tokens(logits[starts], [r.sampling for r in by_slot])
        for item, start, drafted, token, logprob, top in zip(by_slot, starts, drafts, tokens, logprobs, tops):
            token = int(token)
            ended = self._emit(item, token, float(logprob), top)
            # A drafted token stays when the token chosen before it is that token: then its row's logits are those
            # the next plain step would give, and the next token is chosen from them, with the request's own
            # settings and random numbers, as it would have been. Greedy or sampled, the output is the one the
            # request gets without speculation.
            accepted = 0
            while not ended and accepted < len(drafted) and token == drafted[accepted]:
                accepted += 1
                [token], [logprob], [top] = choose_tokens(logits[start + accepted][None], [item.sampling])
                token = int(token)
                ended = self._emit(item, token, float(logprob), top)
            if drafted:
                self.drafted_tokens += len(drafted)
                self.accepted_tokens += accepted
            if not ended:
                self.engine.accept(item.sequence, drafted[:accepted])
        self.decode_seconds = _average(self.decode_seconds, time.monotonic() - started)
        if self.on_step:
            self.on_step(self, len(by_slot), time.monotonic() - started)

    def _drafts(self, by_slot: list[Running]) -> list[list[int]]:
        """Tokens drafted for each decoding sequence (slot order), within the step's rows and each one's room."""
        drafts: list[list[int]] = [[] for _ in by_slot]
        if self.speculation is None:
            return drafts
        rows = min(self.speculation.max_rows, max(self.engine.graphs.batch_buckets)) - len(by_slot)
        for i, item in enumerate(by_slot):
            if rows <= 0:
                break
            if item.drafter is None:
                continue
            # no use drafting past the request's last token: the one after the drafts is chosen anyway
            left = item.request.params.max_tokens - len(item.sampling.generated) - 1
            drafted = item.drafter.draft(min(self.speculation.tokens, rows, left))
            drafted = drafted[:self.engine.draft_room(item.sequence, len(drafted))]
            drafts[i] = drafted
            rows -= len(drafted)
        return drafts

    def _drop_cancelled(self) -> None:
        with self.lock:
            keys, self.cancelled_keys = self.cancelled_keys, set()
        for item in [r for r in self.running if r.request.key in keys]:
            self._finish(item, "cancelled")
        if keys:  # preempted requests waiting to resume
            with self.lock:
                gone = [e for e in self.waiting if isinstance(e, Running) and e.request.key in keys]
                for entry in gone:
                    self.waiting.remove(entry)
            for entry in gone:
                self._end_waiting(entry, "cancelled")
            with self.lock:  # new requests still waiting: ended when _admit reaches them
                self.cancelled_keys |= {k for k in keys if any(_request(e).key == k for e in self.waiting)}

    def _end_waiting(self, entry, reason: str, error: str | None = None) -> None:
        if isinstance(entry, DecodeRequest) and entry.handover is not None:
            entry.handover.give_back()  # its blocks in the prefill model's pool were never needed
        if isinstance(entry, Running):
            entry.request.emit(final_event(entry.request, reason, error=error, cum_logprob=entry.cum_logprob,
                                           output_ids=entry.sampling.generated))
        else:
            entry.emit(final_event(entry, reason, error=error))

    def _emit(self, item: Running, token: int, logprob: float, top: list[tuple[int, float]]) -> bool:
        """Record and send `token`; whether the request ended with it (its blocks are then released)."""
        item.sampling.record(token)
        if item.drafter is not None:
            item.drafter.extend([token])
        item.cum_logprob += logprob
        reason = self._finish_reason(item, token)
        event = TokenEvent(token=token, logprob=logprob, cum_logprob=item.cum_logprob,
                           output_ids=item.sampling.generated, num_input_tokens=len(item.request.prompt_ids),
                           finish_reason=reason, top=top)
        try:
            item.request.emit(event)
        except Exception:  # the client is gone: free its blocks now
            reason = reason or "cancelled"
        if reason:
            self._release(item)
        return bool(reason)

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
        if len(item.request.prompt_ids) + len(generated) >= self.engine.max_len:
            return "length"  # the next token would not fit in max_seq_len
        return None

    def _finish(self, item: Running, reason: str, error: str | None = None) -> None:
        item.request.emit(final_event(item.request, reason, error=error, cum_logprob=item.cum_logprob,
                                      output_ids=item.sampling.generated))
        self._release(item)

    def _release(self, item: Running) -> None:
        self.engine.release(item.sequence)
        self.running.remove(item)


def _average(previous: float | None, value: float) -> float:
    return value if previous is None else previous + SMOOTHING * (value - previous)


def _ready(entry: DecodeRequest | Running) -> bool:
    return isinstance(entry, Running) or entry.ready


def _request(entry: DecodeRequest | Running) -> DecodeRequest:
    return entry.request if isinstance(entry, Running) else entry
