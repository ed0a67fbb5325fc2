"""The engine alone: the same prefill and continuous-batching decode loop that the Triton models run, in one
process with no server, driven by closed-loop clients. Served tokens/s over these tokens/s is the serving
efficiency (what Triton, the ensemble and the Python steps cost).

As in the model repository: a prefill worker runs every prompt that has arrived as one padded batch (the
prefill model's dynamic batcher) and picks each first token (the sampler model); the Scheduler (the decode
model's loop) admits them and decodes every running sequence in one batched step.
"""

from __future__ import annotations

import queue
import threading
import time
from pathlib import Path

import numpy as np

from ..engine.engine import Engine, prefill_each, warm_up, warm_up_prefill
from ..engine.graphs import EngineGraphs
from ..engine.sampling import SamplingState, choose_tokens
from ..params import GenerationParams
from ..serving.scheduler import DecodeRequest, Scheduler, final_event
from .arrivals import next_batch
from .timing import RequestTiming, closed_loop


class EngineAlone:
    def __init__(self, repository: Path, name: str, max_slots: int):
        """Loads the engine folders of the converted models NAME_prefill and NAME_decode in `repository`."""
        self.prefill_graphs = EngineGraphs(Path(repository) / f"{name}_prefill" / "1" / "engine")
        self.graphs = EngineGraphs(Path(repository) / f"{name}_decode" / "1" / "engine")  # as two models do
        self.engine = Engine(self.graphs, max_slots=max_slots)
        warm_up(self.engine)
        warm_up_prefill(self.prefill_graphs)
        self.scheduler = Scheduler(self.engine, max_waiting=1 << 20)
        self.scheduler.start()
        self.arrivals: queue.Queue = queue.Queue()
        threading.Thread(target=self._prefill_loop, name="bench-prefill", daemon=True).start()

    def close(self) -> None:
        self.arrivals.put(None)
        self.scheduler.shutdown()

    def _prefill_loop(self) -> None:
        while True:
            batch = next_batch(self.arrivals, lambda _: self.graphs.max_batch_size)
            if batch[0] is None:
                return
            self._prefill(batch)

    def _prefill(self, batch: list[DecodeRequest]) -> None:
        try:
            results = prefill_each(self.prefill_graphs, [r.prompt_ids for r in batch])
            states = [SamplingState(params=r.params, end_ids=r.end_ids, prompt_ids=r.prompt_ids) for r in batch]
            tokens, logprobs, tops = choose_tokens(np.stack([logits for logits, _, _ in results]), states)
        except Exception as exc:  # noqa: BLE001 - end these requests with the error, keep serving
            for request in batch:
                request.emit(final_event(request, "cancelled", error=f"prefill failed: {exc}"))
            return
        for row, (request, (_, keys, values)) in enumerate(zip(batch, results)):
            request.first_token, request.first_logprob = int(tokens[row]), float(logprobs[row])
            request.first_top = tops[row]
            request.keys, request.values = keys, values
            self.scheduler.submit(request)

    def run(self, prompts: list[list[int]], output_tokens: int, concurrency: int) -> list[RequestTiming]:
        params = GenerationParams(max_tokens=output_tokens, min_tokens=output_tokens)

        def send(index: int, prompt: list[int]) -> RequestTiming:
            timing = RequestTiming(start=time.perf_counter(), token_times=[], prompt_tokens=len(prompt))
            done, errors = threading.Event(), []

            def emit(event):
                if event.error:
                    errors.append(event.error)
                if event.token >= 0:
                    timing.token_times.append(time.perf_counter())
                if event.finish_reason:
                    done.set()

            self.arrivals.put(DecodeRequest(key=f"bench-{index}", prompt_ids=prompt, first_token=-1,
                                            first_logprob=0.0, keys=[], values=[], params=params, emit=emit))
            done.wait()
            if errors:
                raise RuntimeError(errors[0])
            if len(timing.token_times) != output_tokens:
                raise RuntimeError(f"request {index} gave {len(timing.token_times)} tokens, not {output_tokens}")
            return timing

        return closed_loop(prompts, concurrency, send)


# ---- the engine alone in a process of its own ----------------------------------------------------------
# MindSpore keeps the memory of every graph it compiled for the life of the process, deleted or not (the 103M
# model's engine alone: about 12 GB at 64 slots and 1152 positions). Run in the benchmark's own process it
# would crowd out the peers measured after it, so it runs in a child process that ends when it is closed.

_ENGINE: EngineAlone | None = None


def _load(repository: Path, name: str, max_slots: int) -> None:
    global _ENGINE
    _ENGINE = EngineAlone(repository, name, max_slots)


def _run(prompts, output_tokens, concurrency) -> list[RequestTiming]:
    return _ENGINE.run(prompts, output_tokens, concurrency)


def _prefill_ms(prompt) -> float:
    started = time.perf_counter()
    prefill_each(_ENGINE.prefill_graphs, [prompt])
    return (time.perf_counter() - started) * 1e3


class EngineAloneProcess:
    """EngineAlone's run(), and the time of one prompt's prefill, served by a child process."""

    def __init__(self, repository: Path, name: str, max_slots: int):
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        self.pool = ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn"),
                                        initializer=_load, initargs=(Path(repository), name, max_slots))
        self.pool.submit(int).result()  # wait for the load; a failure to load raises here

    def run(self, prompts: list[list[int]], output_tokens: int, concurrency: int) -> list[RequestTiming]:
        return self.pool.submit(_run, prompts, output_tokens, concurrency).result()

    def prefill_ms(self, prompt: list[int]) -> float:
        return self.pool.submit(_prefill_ms, prompt).result()

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)
