"""The engine alone: the same scheduler the decode model runs (paged KV cache, prefill beside decode, continuous
batching), in one process with no server, driven by closed-loop clients. Served tokens/s over these tokens/s is
the serving efficiency (what Triton, the ensemble, the tokenizer and front models and their hops cost).
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

from mstriton.engine.engine import Engine, warm_up, warm_up_prefill
from mstriton.engine.graphs import EngineGraphs
from mstriton.params import GenerationParams
from mstriton.serving.scheduler import DecodeRequest, Scheduler
from .harness.loops import closed_loop
from .timing import RequestTiming


class EngineAlone:
    def __init__(self, repository: Path, name: str, max_slots: int):
        """Loads the engine of the converted model NAME_decode in `repository`, as the decode model does."""
        self.graphs = EngineGraphs(Path(repository) / f"{name}_decode" / "1" / "engine")
        self.engine = Engine(self.graphs, max_slots=max_slots)
        warm_up_prefill(self.engine)
        warm_up(self.engine)
        self.scheduler = Scheduler(self.engine, max_waiting=1 << 20)
        self.scheduler.start()

    def close(self) -> None:
        self.scheduler.shutdown()

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

            self.scheduler.submit(DecodeRequest(key=f"bench-{index}", prompt_ids=list(prompt), params=params,
                                                emit=emit))
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
    """One prompt's prefill, computed whole (not from the prefix cache)."""
    engine = _ENGINE.engine  # its scheduler is idle between the benchmark's runs
    engine.blocks.enable_prefix_caching = False
    try:
        started = time.perf_counter()
        sequence = engine.add(prompt)
        engine.prefill([(sequence, sequence.to_compute)])
        elapsed = time.perf_counter() - started
        engine.release(sequence)
    finally:
        engine.blocks.enable_prefix_caching = True
    return elapsed * 1e3


def spawn_with_python_environment() -> None:
    """Make the C-level environment, which a spawned child inherits, what Python's os.environ says for the
    variables importing MindSpore sets with C's setenv (harness.servers.python_environment): the engine alone must
    run as the decode model does under tritonserver. Spawned from a process that had imported MindSpore, it ran
    MindSpore's own CPU operators (prefill attention, among others) on one thread (OMP_NUM_THREADS=1), which
    made it slower than the served path at 16 streams."""
    from .harness.servers import MINDSPORE_C_VARIABLES, python_environment

    wanted = python_environment()
    for key in MINDSPORE_C_VARIABLES:
        if key in wanted:
            os.environ[key] = wanted[key]
        else:
            os.unsetenv(key)


class EngineAloneProcess:
    """EngineAlone's run(), and the time of one prompt's prefill, served by a child process."""

    def __init__(self, repository: Path, name: str, max_slots: int):
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        spawn_with_python_environment()
        self.pool = ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn"),
                                        initializer=_load, initargs=(Path(repository), name, max_slots))
        self.pool.submit(int).result()  # wait for the load; a failure to load raises here

    def run(self, prompts: list[list[int]], output_tokens: int, concurrency: int) -> list[RequestTiming]:
        return self.start_run(prompts, output_tokens, concurrency).result()

    def start_run(self, prompts: list[list[int]], output_tokens: int, concurrency: int):
        """run() in the background: a future of its timings, for measuring the process while it runs."""
        return self.pool.submit(_run, prompts, output_tokens, concurrency)

    def prefill_ms(self, prompt: list[int]) -> float:
        return self.pool.submit(_prefill_ms, prompt).result()

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)
