"""The one request path every door shares: a Generation (prompt or chat, settings, stop strings) -> the chunks
of text the front model streams, with stop strings applied, token details parsed and usage counted.

A door builds Generations from its body, runs them (`stream`, `complete`, `merged` for n > 1) and writes the
chunks in its own format. Leaving a stream early (a client that went away, a stop string) closes its gRPC
stream, which cancels the generation in the server. A door waits for a whole answer (or for a stream's first
chunk) through `unless_disconnected`, so that a client that hangs up before its answer is ready cancels it too:
Starlette tells a request handler nothing of a hang-up until it starts writing the response.

A method (serving/methods.py) runs its postprocess on the whole text in the server: a whole answer is asked of it in
one response (whose text postprocess's text_output replaced), a stream's last chunk carries postprocess's dict, and
stop strings, which would end its generation here before postprocess runs, are refused.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
from typing import AsyncIterator, Awaitable, TypeVar

from .errors import invalid
from .stops import StopStrings
from .triton import Triton

T = TypeVar("T")

# The server's finish reasons (the decode model's, and a stop string matched here) -> OpenAI's.
OPENAI_FINISH = {"end_id": "stop", "stop": "stop", "stop_string": "stop", "length": "length"}


@dataclasses.dataclass
class Generation:
    model: str
    prompt: str | None = None                  # a completion prompt (text_input) ...
    messages: list[dict] | None = None         # ... or a chat, rendered by the model's chat template
    settings: dict = dataclasses.field(default_factory=dict)  # front-model input name -> value
    stop: list[str] = dataclasses.field(default_factory=list)  # stop strings, matched on the text
    names: dict = dataclasses.field(default_factory=dict)     # server's parameter name -> the client's


@dataclasses.dataclass
class Chunk:
    text: str                 # new text (stop strings applied)
    tokens: list[dict]        # the new tokens' entries when settings ask return_tokens (token_details.py)
    reason: str | None        # set on the last chunk: end_id, stop, length, or stop_string
    prompt_tokens: int
    completion_tokens: int
    method_output: dict | None = None  # a method's postprocess result, on the last chunk

    @property
    def finish_reason(self) -> str | None:
        return OPENAI_FINISH.get(self.reason, self.reason) if self.reason else None


@dataclasses.dataclass
class Result:
    text: str
    tokens: list[dict]
    reason: str
    prompt_tokens: int
    completion_tokens: int
    method_output: dict | None = None  # a method's postprocess result

    @property
    def finish_reason(self) -> str:
        return OPENAI_FINISH.get(self.reason, self.reason)


def _inputs(generation: Generation) -> dict:
    inputs = {"messages": generation.messages} if generation.messages is not None \
        else {"text_input": generation.prompt}
    inputs.update(generation.settings)
    return inputs


async def stream(triton: Triton, generation: Generation, joined: bool = False) -> AsyncIterator[Chunk]:
    """The chunks of one generation, the last with its reason set. `joined`: only the whole text is wanted (a
    method then answers in one chunk, its text postprocessed)."""
    stops = StopStrings(generation.stop)
    inputs = _inputs(generation)
    method = triton.is_method(generation.model)
    if method and generation.stop:
        raise invalid("stop", f"'stop' is not supported by the method {generation.model}: its postprocess runs on "
                              "the whole generated text, which a stop string would cut short here; a method's "
                              "preprocess may set stop_words")
    if generation.stop:
        inputs["stream"] = True  # stop strings are watched on the streamed text, and end the generation early
    elif method and joined:
        inputs["stream"] = False  # one response, its text postprocess's
    responses = triton.generate(generation.model, inputs, generation.names)
    # a method's requests are its LLM's in vLLM's metrics: they wait in the same queue, for the same slots
    timer = triton.timings.start(triton.llm_of(generation.model)) if triton.timings is not None else None
    async with contextlib.aclosing(responses), _closing_timer(timer):
        async for out in responses:
            reason = out.get("finish_reason") or None
            text = stops.feed(out.get("text_output", ""), final=reason is not None)
            if stops.stopped:
                reason = "stop_string"
            tokens = json.loads(out["tokens_json"]) if out.get("tokens_json") else []
            chunk = Chunk(text=text, tokens=tokens, reason=reason, prompt_tokens=int(out.get("num_input_tokens", 0)),
                          completion_tokens=int(out.get("num_output_tokens", 0)),
                          method_output=json.loads(out["method_output"]) if out.get("method_output") else None)
            if timer is not None:
                timer.chunk(chunk.completion_tokens)
                if reason is not None:
                    timer.finished(chunk.prompt_tokens, chunk.finish_reason)
            yield chunk
            if reason is not None:
                return  # closing `responses` cancels the server's generation if it is still running


@contextlib.asynccontextmanager
async def _closing_timer(timer):
    """A request's timer stops counting it as waiting when it ends, however it ends (error, cancel)."""
    try:
        yield
    finally:
        if timer is not None:
            timer.closed()


async def complete(triton: Triton, generation: Generation) -> Result:
    """One generation, joined."""
    texts, tokens, last = [], [], None
    async with contextlib.aclosing(stream(triton, generation, joined=True)) as chunks:
        async for chunk in chunks:
            texts.append(chunk.text)
            tokens += chunk.tokens
            last = chunk
    return Result(text="".join(texts), tokens=tokens, reason=last.reason if last else "length",
                  prompt_tokens=last.prompt_tokens if last else 0,
                  completion_tokens=last.completion_tokens if last else 0,
                  method_output=last.method_output if last else None)


async def complete_all(triton: Triton, generations: list[Generation]) -> list[Result]:
    """Several generations at once (OpenAI's n and prompt lists); the first error cancels the others."""
    tasks = [asyncio.ensure_future(complete(triton, g)) for g in generations]
    try:
        return list(await asyncio.gather(*tasks))
    finally:
        for task in tasks:
            task.cancel()


async def merged(triton: Triton, generations: list[Generation]) -> AsyncIterator[tuple[int, Chunk]]:
    """The chunks of several generations as they come, each with its generation's index."""
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(index: int, generation: Generation) -> None:
        try:
            async with contextlib.aclosing(stream(triton, generation)) as chunks:
                async for chunk in chunks:
                    await queue.put((index, chunk, None))
        except Exception as exc:  # noqa: BLE001 - handed to the reader, which raises it
            await queue.put((index, None, exc))
            return
        await queue.put((index, None, None))

    tasks = [asyncio.ensure_future(pump(i, g)) for i, g in enumerate(generations)]
    try:
        remaining = len(tasks)
        while remaining:
            index, chunk, error = await queue.get()
            if error is not None:
                raise error
            if chunk is None:
                remaining -= 1
                continue
            yield index, chunk
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def primed(chunks: AsyncIterator) -> AsyncIterator:
    """`chunks` with its first item already read: errors before the first chunk (a prompt too long, a busy
    server) then become the HTTP response's status instead of an event inside a stream that began with 200."""
    try:
        first = await chunks.__anext__()
    except StopAsyncIteration:
        first = None

    async def rest():
        async with contextlib.aclosing(chunks):
            if first is not None:
                yield first
            async for item in chunks:
                yield item
    return rest()


class ClientDisconnected(Exception):
    """The HTTP client hung up before its answer was ready; the work for it has been cancelled."""


async def unless_disconnected(receive, work: Awaitable[T]) -> T:
    """The result of `work`, unless the HTTP client hangs up first: then `work` is cancelled (closing its gRPC
    streams, which stops the server's generations at their next step) and ClientDisconnected is raised.
    `receive`: the request's ASGI receive (request.receive), called only after the body has been read, when
    the next message it gives is the hang-up."""
    task = asyncio.ensure_future(work)

    async def hang_up() -> None:
        while (await receive())["type"] != "http.disconnect":
            pass

    watch = asyncio.ensure_future(hang_up())
    try:
        await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            return task.result()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        raise ClientDisconnected()
    finally:
        watch.cancel()
        if not task.done():  # this coroutine itself was cancelled
            task.cancel()
