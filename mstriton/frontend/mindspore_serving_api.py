"""MindSpore Serving's REST API, as its LLM server answers it (../shared/seed: the client's
{"inputs", "parameters", "stream"} body): POST /models/{model}, /models/{model}/generate and
/models/{model}/generate_stream; GET /serving/get_bs and /serving/get_request_numbers.

Response formats, as the seed writes them:
- full: one line `{"generated_text": ...}`;
- stream, return_protocol "sse" (its default): SSE events whose data is `{"event": "message", "retry": 30000,
  "data": TEXT}`, one per token, then the whole text when return_full_text is set;
- stream, any other return_protocol: lines `data:{"token": {"text", "index"}}`, then `data:{"generated_text"}`
  when return_full_text is set.
Where the seed silently clamps a bad value (top_k < 0 to 0, top_p < 0.01 to 0.01, top_p > 1 to 1), the value is
refused here with 400 naming it.
"""

from __future__ import annotations

import json

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from ..params import door_fields
from . import generation as gen
from .fields import Fields, door_settings, inputs_body

router = APIRouter()

# Triton input -> the seed's parameter, as params.PARAMETERS maps them (read by door_settings, with the seed's
# defaults: do_sample false, repetition_penalty 1, and top_k 3, top_p 1, temperature 1 when sampling)
FIELDS = door_fields("mindspore_serving")
PARAMETERS = set(FIELDS.values()) | {"return_full_text", "return_protocol"}
# the settings that apply only when sampling
SAMPLING = ("top_k", "top_p", "temperature")
DEFAULT_MAX_NEW_TOKENS = 300  # the seed's
SSE_RETRY_MS = 30000


async def _read(request: Request, model: str) -> tuple[gen.Generation, Fields, bool]:
    triton = request.app.state.triton
    await triton.require(model)
    inputs, p, stream = await inputs_body(request, PARAMETERS)
    settings = door_settings(p, "mindspore_serving")
    if not settings["do_sample"]:  # the sampling settings are checked whether sampling or not
        for name in SAMPLING:
            del settings[name]
    max_new = settings.get("max_tokens")
    if max_new is not None or not triton.is_method(model):  # a method's preprocess chooses its own
        settings.update(max_tokens=max_new if max_new is not None else DEFAULT_MAX_NEW_TOKENS,
                        fit_max_tokens=max_new is None)
    p.text("return_protocol")
    p.boolean("return_full_text")  # used by the streamed formats only, checked for every route
    names = {**{k: f"parameters.{k}" for k in PARAMETERS}, **{k: f"parameters.{v}" for k, v in FIELDS.items()},
             "text_input": "inputs"}
    return gen.Generation(model=model, prompt=inputs, settings=settings, names=names), p, stream


async def _respond(request: Request, model: str, stream: bool | None):
    generation, p, body_stream = await _read(request, model)
    triton = request.app.state.triton
    if not (body_stream if stream is None else stream):
        result = await gen.unless_disconnected(request.receive, gen.complete(triton, generation))
        return StreamingResponse(iter([(json.dumps({"generated_text": result.text}, ensure_ascii=False) + "\n")
                                       .encode()]), media_type="application/json")
    sse = p.text("return_protocol", "sse") == "sse"
    full_text = p.boolean("return_full_text", False)
    chunks = await gen.unless_disconnected(request.receive, gen.primed(gen.stream(triton, generation)))

    async def events():
        texts, index = [], 0
        async for chunk in chunks:
            if not chunk.text and chunk.reason:
                continue  # the end without new text: the seed sends nothing for it
            texts.append(chunk.text)
            index += 1
            yield _sse_message(chunk.text) if sse else _data_line({"token": {"text": chunk.text, "index": index}})
        if full_text:
            whole = "".join(texts)
            yield _sse_message(whole) if sse else _data_line({"generated_text": whole})
    return StreamingResponse(events(), media_type="text/event-stream" if sse else "text/plain")


def _sse_message(data) -> bytes:
    payload = json.dumps({"event": "message", "retry": SSE_RETRY_MS, "data": data}, ensure_ascii=False)
    return f"data: {payload}\r\n\r\n".encode()


def _data_line(payload: dict) -> bytes:
    return ("data:" + json.dumps(payload, ensure_ascii=False) + "\n").encode()


@router.post("/models/{model}")
async def generate_by_body(request: Request, model: str):
    return await _respond(request, model, stream=None)


@router.post("/models/{model}/generate")
async def generate_full(request: Request, model: str):
    return await _respond(request, model, stream=False)


@router.post("/models/{model}/generate_stream")
async def generate_stream(request: Request, model: str):
    return await _respond(request, model, stream=True)


async def _gauge_event(request: Request, gauge: str):
    values = await request.app.state.triton.gauges()
    total = int(sum(values[gauge].values()))

    async def one():
        yield _sse_message(total)
    return StreamingResponse(one(), media_type="text/event-stream")


@router.get("/serving/get_bs")
async def get_batch_size(request: Request):
    """Sequences generating now, over every model (the seed's batch size)."""
    return await _gauge_event(request, "mstriton_requests_running")


@router.get("/serving/get_request_numbers")
async def get_request_numbers(request: Request):
    """Requests queued for a free slot, over every model."""
    return await _gauge_event(request, "mstriton_requests_waiting")
