"""Hugging Face transformers (PyTorch, CPU) `generate` as a server would run it by hand: one worker thread that
takes the waiting requests and generates, either one request at a time or all waiting requests as one static
batch (a new request waits for the whole batch to end). Token times come from a streamer that sees each step.
"""

from __future__ import annotations

import queue
import threading
import time
from pathlib import Path

from .arrivals import next_batch
from .harness.loops import closed_loop
from .timing import RequestTiming

# The static batch's limit: padded prompt tokens per generate() call. It is the limit our prefill had until it
# moved to a budget of attention scores for a MindSpore reason (memory kept per compiled shape) that PyTorch
# does not share; transformers batches its whole generation, so its batch size is its decode batch too.
PADDED_TOKEN_BUDGET = 8192


class StepClock:
    """A generate() streamer that stamps every step: the first put() is the prompt, each later one a token
    (for every row of the batch at once)."""

    def __init__(self, timings: list[RequestTiming]):
        self.timings, self.seen_prompt = timings, False

    def put(self, value) -> None:
        if not self.seen_prompt:
            self.seen_prompt = True
            return
        now = time.perf_counter()
        for timing in self.timings:
            timing.token_times.append(now)

    def end(self) -> None:
        pass


class TransformersPeer:
    def __init__(self, checkpoint: Path, batched: bool, threads: int | None = None):
        import torch
        from transformers import LlamaForCausalLM

        if threads:
            torch.set_num_threads(threads)
        self.torch = torch
        self.model = LlamaForCausalLM.from_pretrained(checkpoint, torch_dtype=torch.float32).eval()
        self.batched = batched
        self.arrivals: queue.Queue = queue.Queue()
        self.worker = threading.Thread(target=self._serve, name="bench-transformers", daemon=True)
        self.worker.start()

    def close(self) -> None:
        self.arrivals.put(None)
        self.worker.join()

    def _serve(self) -> None:
        while True:
            # as large a batch as has arrived, within a padded-token budget (attention's score matrices of 64 long
            # prompts at once would need gigabytes)
            batch = next_batch(self.arrivals, lambda first: max(1, PADDED_TOKEN_BUDGET // len(first[0]))
                               if self.batched else 1)
            if batch[0] is None:
                return
            try:
                self._generate(batch)
                for *_, done, _ in batch:
                    done.set()
            except Exception as exc:  # noqa: BLE001 - the clients raise it
                for *_, done, errors in batch:
                    errors.append(exc)
                    done.set()

    def _generate(self, batch) -> None:
        torch = self.torch
        width = max(len(ids) for ids, *_ in batch)
        # left padding, so that every row's next token comes right after its prompt
        input_ids = torch.zeros((len(batch), width), dtype=torch.long)
        mask = torch.zeros_like(input_ids)
        for row, (ids, *_) in enumerate(batch):
            input_ids[row, width - len(ids):] = torch.tensor(ids)
            mask[row, width - len(ids):] = 1
        n = batch[0][1]
        with torch.no_grad():
            self.model.generate(input_ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                                do_sample=False, pad_token_id=0, streamer=StepClock([t for _, _, t, *_ in batch]))

    def run(self, prompts: list[list[int]], output_tokens: int, concurrency: int) -> list[RequestTiming]:
        def send(index: int, prompt: list[int]) -> RequestTiming:
            timing = RequestTiming(start=time.perf_counter(), token_times=[], prompt_tokens=len(prompt))
            done, errors = threading.Event(), []
            self.arrivals.put((prompt, output_tokens, timing, done, errors))
            done.wait()
            if errors:
                raise errors[0]
            if len(timing.token_times) != output_tokens:
                raise RuntimeError(f"request {index} gave {len(timing.token_times)} tokens, not {output_tokens}")
            return timing

        return closed_loop(prompts, concurrency, send)
