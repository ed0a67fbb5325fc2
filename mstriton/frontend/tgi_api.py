"""Hugging Face TGI's API: POST /generate, /generate_stream and / (its compatibility route), GET /info, with
TGI's response and event JSON (huggingface_hub's InferenceClient.text_generation reads them)."""

from __future__ import annotations

import json

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from ..params import door_fields
from .. import __version__
from . import generation as gen
from . import structured
from .errors import ApiError
from .fields import Fields, door_settings, inputs_body, limits

router = APIRouter()

# TGI's names for the server's finish reasons
FINISH = {"end_id": "eos_token", "stop": "stop_sequence", "stop_string": "stop_sequence", "length": "length"}
# Triton input -> TGI's parameter, as params.PARAMETERS maps them (read by door_settings)
FIELDS = door_fields("tgi")
# ... and the parameters read here: for the response (details, return_full_text), stop strings, and those refused
PARAMETERS = set(FIELDS.values()) | {"adapter_id", "best_of", "decoder_input_details", "details", "grammar",
                                     "return_full_text", "stop", "truncate", "typical_p", "watermark"}
DEFAULT_MAX_NEW_TOKENS = 100  # TGI's


async def read_generation(request: Request, model: str) -> tuple[gen.Generation, Fields, bool]:
    """The body {"inputs", "parameters", "stream"} -> (the Generation, its parameters, whether to stream)."""
    inputs, p, stream = await inputs_body(request, PARAMETERS)
    p.refuse("best_of", "only best_of = 1", unless=lambda v: v in (None, 1))
    p.refuse("decoder_input_details", "the prompt's log-probabilities are not computed", unless=lambda v: not v)
    p.refuse("truncate", "prompts are not truncated; send a shorter one")
    p.refuse("typical_p", "typical sampling is not implemented", unless=lambda v: v in (None, 1.0))
    p.refuse("watermark", "watermarking is not implemented", unless=lambda v: not v)
    p.refuse("adapter_id", "adapters are not served")
    # read when the response is written, after the generation: checked now, so a wrong one is refused first
    p.boolean("details")
    p.boolean("return_full_text")
    settings = door_settings(p, "tgi")
    spec = structured.from_tgi(p)
    if spec is not None:
        settings["structured_outputs"] = json.dumps(spec)
    max_new = settings.get("max_tokens")
    settings["return_tokens"] = True
    if max_new is not None or not request.app.state.triton.is_method(model):  # a method's preprocess chooses its own
        settings.update(max_tokens=max_new if max_new is not None else DEFAULT_MAX_NEW_TOKENS,
                        fit_max_tokens=max_new is None)
    names = {**{k: f"parameters.{k}" for k in PARAMETERS}, **{k: f"parameters.{v}" for k, v in FIELDS.items()},
             "text_input": "inputs", "structured_outputs": "parameters.grammar"}
    generation = gen.Generation(model=model, prompt=inputs, settings=settings,
                                stop=p.texts("stop", max_items=limits(request).max_words,
                                                     max_item_bytes=limits(request).max_word_bytes), names=names)
    return generation, p, stream


async def default_model(request: Request) -> str:
    triton = request.app.state.triton
    chosen = request.app.state.default_model
    if chosen:
        await triton.require(chosen)
        return chosen
    llms = await triton.llms()
    if not llms:
        raise ApiError(503, "tritonserver serves no LLM yet", headers={"Retry-After": "1"})
    return llms[0]


def _token(entry: dict, text: str) -> dict:
    # special tokens (the end token) keep their own text; others carry the streamed text, which joins to
    # generated_text exactly
    return {"id": entry["id"], "text": entry["text"] if entry["special"] else text, "logprob": entry["logprob"],
            "special": entry["special"]}


def _top_tokens(entry: dict) -> list[dict]:
    return [{"id": t["id"], "text": t["text"], "logprob": t["logprob"], "special": False}
            for t in entry.get("top_logprobs", [])]


def _details(result: gen.Result, p: Fields, top: bool) -> dict:
    details = {"finish_reason": FINISH.get(result.reason, result.reason), "generated_tokens": result.completion_tokens,
               "seed": p.integer("seed"), "prefill": [],
               "tokens": [_token(t, t["text"]) for t in result.tokens]}
    if top:
        details["top_tokens"] = [_top_tokens(t) for t in result.tokens]
    return details


async def _respond(request: Request, generation: gen.Generation, p: Fields, stream: bool, as_list: bool):
    triton = request.app.state.triton
    top = bool(p.integer("top_n_tokens"))
    # return_full_text: generated_text begins with the prompt (the token events do not)
    prefix = generation.prompt if p.boolean("return_full_text", False) else ""
    if not stream:
        result = await gen.unless_disconnected(request.receive, gen.complete(triton, generation))
        response = {"generated_text": prefix + result.text}
        if p.boolean("details", False):
            response["details"] = _details(result, p, top)
        return [response] if as_list else response
    chunks = await gen.unless_disconnected(request.receive, gen.primed(gen.stream(triton, generation)))

    async def events():
        index, texts = 0, []
        try:
            async for chunk in chunks:
                texts.append(chunk.text)
                # one event per token; a chunk of several tokens (stream_interval > 1) gives its text to its last
                entries = chunk.tokens or []
                for i, entry in enumerate(entries):
                    last_of_stream = chunk.reason is not None and i == len(entries) - 1
                    index += 1
                    event = {"index": index, "token": _token(entry, chunk.text if i == len(entries) - 1 else ""),
                             "generated_text": None, "details": None}
                    if top:
                        event["top_tokens"] = _top_tokens(entry)
                    if last_of_stream:
                        event["generated_text"] = prefix + "".join(texts)
                        if p.boolean("details", False):
                            event["details"] = {"finish_reason": FINISH.get(chunk.reason, chunk.reason),
                                                "generated_tokens": chunk.completion_tokens,
                                                "seed": p.integer("seed"), "input_length": chunk.prompt_tokens}
                    yield f"data:{json.dumps(event, ensure_ascii=False)}\n\n".encode()
        except Exception as exc:  # noqa: BLE001 - the stream has begun: the error goes in it
            error = exc if isinstance(exc, ApiError) else ApiError(500, str(exc))
            yield f"data:{json.dumps({'error': error.message, 'error_type': error.kind})}\n\n".encode()
    return StreamingResponse(events(), media_type="text/event-stream")


async def _route(request: Request, stream: bool | None, as_list: bool = False):
    """stream None: as the body's `stream` says (TGI's compatibility route, which also answers a list)."""
    generation, p, body_stream = await read_generation(request, await default_model(request))
    return await _respond(request, generation, p, stream=body_stream if stream is None else stream, as_list=as_list)


@router.post("/generate")
async def generate(request: Request):
    return await _route(request, stream=False)


@router.post("/generate_stream")
async def generate_stream(request: Request):
    return await _route(request, stream=True)


@router.post("/")
async def compat_generate(request: Request):
    return await _route(request, stream=None, as_list=True)


@router.get("/info")
async def info(request: Request):
    model = await default_model(request)
    llm = await request.app.state.triton.info(model)
    return {"model_id": model, "model_dtype": "float32", "model_device_type": "cpu",
            "model_pipeline_tag": "text-generation", "max_concurrent_requests": llm.slots + llm.max_waiting,
            "max_best_of": 1, "max_stop_sequences": limits(request).max_words, "max_input_tokens": llm.max_seq_len - 1,
            "max_total_tokens": llm.max_seq_len, "validation_workers": 1, "max_client_batch_size": 1,
            "router": "mstriton", "version": __version__, "sha": None, "docker_label": None}
