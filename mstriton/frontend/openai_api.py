"""OpenAI's API: /v1/models, /v1/completions and /v1/chat/completions, streamed (SSE, then `data: [DONE]`) or
not, with vLLM's extensions for the same settings (top_k, min_p, repetition_penalty, min_tokens, stop_token_ids,
structured_outputs and guided_*). Structured output (response_format) and tools (tools.py) are held by a grammar.
A parameter this server does not implement is refused with 400 naming it, never ignored.

A method (model NAME_METHOD, docs/methods.md) takes the body's fields this door does not read as its own (they go to
its preprocess in `method_fields`); its postprocess's dict comes back as each choice's `method_output`."""

from __future__ import annotations

import json
import time
import uuid

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from ..params import MAX_TOP_LOGPROBS, ParameterError, door_fields
from ..tokenizer import validate_messages
from . import generation as gen
from . import structured
from .errors import ApiError, invalid
from .fields import Fields, check_prompt, door_settings, json_body, limits
from .native_tools import in_format, with_template_calls
from .tools import ToolRequest, with_generic_calls
from .triton import not_found

router = APIRouter()

# The settings read as params.PARAMETERS maps them (door_settings); max_tokens, n, stop, logprobs and echo below
SAMPLING = set(door_fields("openai").values())
COMMON = SAMPLING | structured.OPENAI_FIELDS | {"model", "max_tokens", "n", "stream", "stream_options", "stop",
                                                "user", "logprobs", "logit_bias", "best_of", "stop_token_ids"}
COMPLETIONS = COMMON | {"prompt", "echo", "suffix"}
CHAT = COMMON | {"messages", "max_completion_tokens", "top_logprobs", "tools", "tool_choice", "parallel_tool_calls",
                 "response_format", "functions", "function_call", "audio", "modalities", "prediction", "store",
                 "metadata", "service_tier", "reasoning_effort", "web_search_options"}
# Generations one request may start (n, times the prompts of a list): each is a stream of its own to the server.
MAX_N = 16


def _refuse_unimplemented(body: Fields) -> None:
    """The parameters we know and do not implement: refused unless their value asks for nothing."""
    body.refuse("best_of", "only best_of = 1", unless=lambda v: v in (None, 1))
    body.refuse("suffix", "insertion (a suffix after the completion) is not implemented", unless=lambda v: not v)
    body.refuse("functions", "the deprecated functions: send them as 'tools'", unless=lambda v: not v)
    body.refuse("function_call", "the deprecated function_call: send 'tool_choice'",
                unless=lambda v: v in (None, "none"))
    body.refuse("audio", "audio output is not implemented")
    body.refuse("modalities", "only text", unless=lambda v: v in (None, ["text"]))
    body.refuse("prediction", "predicted outputs are not implemented")
    body.refuse("store", "stored completions are not implemented", unless=lambda v: not v)
    body.refuse("reasoning_effort", "reasoning models are not served here")
    body.refuse("web_search_options", "web search is not implemented")
    body.refuse("service_tier", "one service tier", unless=lambda v: v in (None, "auto", "default"))


async def read_body(request: Request, known: set[str], refuse_unimplemented=_refuse_unimplemented
                    ) -> tuple[Fields, str]:
    """The body (unknown fields and what we do not implement refused) and its served model (404 otherwise). For a
    method, the unknown fields are its own: they leave the body for `method_settings`."""
    body = Fields(await json_body(request))
    model = body.values.get("model")
    served = await request.app.state.triton.served() if isinstance(model, str) and model else {}
    body.method_fields = {}
    if isinstance(model, str) and served.get(model, model) != model:  # a method's
        body.method_fields = {key: body.values.pop(key) for key in sorted(set(body.values) - known)}
    body.refuse_unknown(known)
    refuse_unimplemented(body)
    model = body.text("model")
    if not model:
        raise invalid("model", "'model' is required: one of the names GET /v1/models lists")
    if model not in served:
        raise not_found(model, served)
    return body, model


def method_settings(body: Fields) -> dict:
    """A method's own fields of the body (read_body), as its front model's input."""
    fields = getattr(body, "method_fields", None)
    return {"method_fields": json.dumps(fields, ensure_ascii=False)} if fields else {}


async def _read(request: Request, known: set[str]) -> tuple[Fields, dict, str]:
    body, model = await read_body(request, known)
    settings = await request_settings(body, request.app.state.triton, model)
    return body, {**settings, **method_settings(body)}, model


async def request_settings(body: Fields, triton, model: str) -> dict:
    """The front model's inputs for the body's sampling settings (ranges the server checks, named back)."""
    settings = door_settings(body, "openai")
    if settings.get("top_k") == -1:  # vLLM's "no top-k cut"
        settings["top_k"] = 0
    if body.has("logit_bias"):
        settings["logit_bias"] = _logit_bias(body)
    if body.has("stop_token_ids"):
        ids = body.values["stop_token_ids"]
        if not isinstance(ids, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
            raise invalid("stop_token_ids", "'stop_token_ids' must be a list of token ids (integers)")
        settings["stop_token_ids"] = ids
    spec, _ = structured.from_openai(body)
    if spec is not None:
        settings["structured_outputs"] = json.dumps(spec)
    max_tokens = body.integer("max_completion_tokens", body.integer("max_tokens"), low=1)
    if max_tokens is not None:
        settings["max_tokens"] = max_tokens
    elif not triton.is_method(model):  # as vLLM: up to the end of the context (a method's preprocess chooses its own)
        settings["max_tokens"] = (await triton.info(model)).max_seq_len
        settings["fit_max_tokens"] = True
    return settings


def _logit_bias(body: Fields) -> str:
    """OpenAI's logit_bias, {token id (text): bias in [-100, 100]}, as the JSON text the server reads (which checks
    the ids against the vocabulary)."""
    value = body.values["logit_bias"]
    if not isinstance(value, dict):
        raise invalid("logit_bias", "'logit_bias' must be an object of token id -> bias in [-100, 100]")
    biases = Fields(value, prefix="logit_bias.")
    for key in value:
        if not key.lstrip("-").isdigit():
            raise invalid("logit_bias", f"'logit_bias' keys must be token ids, got {key!r:.40}")
        biases.number(key, low=-100, high=100)
    return json.dumps(value)


def _names(body: Fields, **names) -> dict:
    """The server's parameter names -> the client's, for errors that name one."""
    field = structured.source_field(body)
    return {**names, **({"structured_outputs": field} if field else {})}


def _generations(request: Request, body: Fields, model: str, settings: dict, names: dict, **prompt
                 ) -> list[gen.Generation]:
    n = body.integer("n", 1, low=1, high=MAX_N)
    stop = body.texts("stop", max_items=limits(request).max_words, max_item_bytes=limits(request).max_word_bytes)
    out = []
    for i in range(n):
        own = dict(settings)
        if "seed" in own:  # n generations, each with its own seed (one seed would give n equal samples)
            own["seed"] = (own["seed"] + i) % 2 ** 63
        out.append(gen.Generation(model=model, settings=own, stop=stop, names=names, **prompt))
    return out


def _stream_options(body: Fields) -> bool:
    options = body.obj("stream_options")
    if options.values and not body.boolean("stream", False):
        raise invalid("stream_options", "'stream_options' is only allowed with 'stream': true")
    options.refuse_unknown({"include_usage", "continuous_usage_stats"})
    return bool(options.boolean("include_usage", False))


def _method_output(output: dict | None) -> dict:
    """A method's postprocess result, as a choice's `method_output` (nothing for other models)."""
    return {"method_output": output} if output is not None else {}


def _usage(results) -> dict:
    prompt = sum(r.prompt_tokens for r in results)
    completion = sum(r.completion_tokens for r in results)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _sse(payload, typed: bool = False) -> bytes:
    """One server-sent event; `typed`: named by its payload's type (the Responses API's events)."""
    name = f"event: {payload.get('type', 'error')}\n" if typed else ""
    return f"{name}data: {json.dumps(payload, ensure_ascii=False)}\n\n".encode()


def _error_event(exc: Exception, typed: bool = False) -> bytes:
    error = exc if isinstance(exc, ApiError) else ApiError(500, f"{type(exc).__name__}: {exc}")
    if typed:  # the Responses API's error event
        return _sse({"type": "error", "code": error.code or str(error.status), "message": error.message,
                     "param": error.param}, typed)
    return _sse({"error": {"message": error.message, "type": error.kind, "param": error.param,
                           "code": error.code or error.status}})


def event_stream(payloads, typed: bool = False) -> StreamingResponse:
    """The chunks an async generator yields, as SSE, then `data: [DONE]` (`typed`: events named by their type, with
    no [DONE], as the Responses API streams); an error once the stream has begun (with status 200) goes into it as
    an error object."""
    async def events():
        try:
            async for payload in payloads:
                yield _sse(payload, typed)
        except Exception as exc:  # noqa: BLE001 - the stream has begun: the error goes in it
            yield _error_event(exc, typed)
        if not typed:
            yield b"data: [DONE]\n\n"
    return StreamingResponse(events(), media_type="text/event-stream")


def _chunk(head: dict, choices: list, include_usage: bool, usage: dict | None = None) -> dict:
    """A streamed chunk: `head` (id, object, created, model), its choices, and with include_usage a `usage`
    (null but on the last chunk, as OpenAI streams it)."""
    chunk = {**head, "choices": choices}
    if include_usage:
        chunk["usage"] = usage
    return chunk


# ---- /v1/models ------------------------------------------------------------------------------------------

def _model_card(name: str, info, llm: str) -> dict:
    """`llm`: the LLM the model runs on (itself, or a method's: its `parent`, as vLLM names a LoRA adapter's base)."""
    card = {"id": name, "object": "model", "created": 0, "owned_by": "mstriton", "max_model_len": info.max_seq_len}
    return card if llm == name else {**card, "parent": llm}


@router.get("/v1/models")
async def list_models(request: Request):
    triton = request.app.state.triton
    served = await triton.served()
    return {"object": "list", "data": [_model_card(n, await triton.info(n), served[n]) for n in sorted(served)]}


@router.get("/v1/models/{model}")
async def get_model(request: Request, model: str):
    triton = request.app.state.triton
    llm = await triton.require(model)
    return _model_card(model, await triton.info(model), llm)


# ---- /v1/completions -------------------------------------------------------------------------------------

def _completion_logprobs(tokens: list[dict], offset: int) -> dict:
    """OpenAI's completions logprobs object for `tokens`; `offset`: text length before them."""
    out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for token in tokens:
        out["tokens"].append(token["text"])
        out["token_logprobs"].append(token["logprob"])
        out["top_logprobs"].append({t["text"]: t["logprob"] for t in token.get("top_logprobs", [])})
        out["text_offset"].append(offset)
        offset += len(token["text"])
    return out


@router.post("/v1/completions")
async def completions(request: Request):
    body, settings, model = await _read(request, COMPLETIONS)
    prompt = body.values.get("prompt")
    prompts = [prompt] if isinstance(prompt, str) else prompt
    if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) for p in prompts):
        raise invalid("prompt", "'prompt' must be a string or a non-empty list of strings (token-id prompts are "
                                "not supported)")
    n = body.integer("n", 1, low=1, high=MAX_N)
    if len(prompts) * n > MAX_N:
        raise invalid("prompt", f"'prompt' and 'n' may ask for at most {MAX_N} generations in all, got "
                                f"{len(prompts)} prompts x n={n}")
    for i, text in enumerate(prompts):
        check_prompt(request, "prompt" if isinstance(prompt, str) else f"prompt[{i}]", text)
    logprobs = body.integer("logprobs", low=0, high=MAX_TOP_LOGPROBS)
    echo = body.boolean("echo", False)
    if echo and logprobs is not None:
        raise invalid("echo", "'echo' with 'logprobs' needs the prompt's log-probabilities, which this server does "
                              "not compute: send one of them")
    if logprobs is not None:
        settings.update(return_tokens=True, top_logprobs=logprobs)
    if echo:
        settings["exclude_input_in_output"] = False
    names = _names(body, max_tokens="max_tokens", text_input="prompt")
    generations = [g for p in prompts for g in _generations(request, body, model, settings, names, prompt=p)]
    triton = request.app.state.triton
    created, rid = int(time.time()), f"cmpl-{uuid.uuid4().hex}"

    def choice(index, text, tokens, finish, offset=0, method_output=None):
        return {"index": index, "text": text, "finish_reason": finish,
                "logprobs": _completion_logprobs(tokens, offset) if logprobs is not None else None,
                **_method_output(method_output)}

    include_usage = _stream_options(body)  # checked before anything runs, streamed or not
    if not body.boolean("stream", False):
        results = await gen.unless_disconnected(request.receive, gen.complete_all(triton, generations))
        return {"id": rid, "object": "text_completion", "created": created, "model": model,
                "choices": [choice(i, r.text, r.tokens, r.finish_reason, 0, r.method_output)
                            for i, r in enumerate(results)],
                "usage": _usage(results)}
    chunks = await gen.unless_disconnected(request.receive, gen.primed(gen.merged(triton, generations)))
    head = {"id": rid, "object": "text_completion", "created": created, "model": model}

    async def payloads():
        offsets, finals = [0] * len(generations), {}
        async for index, chunk in chunks:
            yield _chunk(head, [choice(index, chunk.text, chunk.tokens, chunk.finish_reason, offsets[index],
                                       chunk.method_output)], include_usage)
            offsets[index] += len(chunk.text)
            if chunk.reason:
                finals[index] = chunk
        if include_usage:
            yield _chunk(head, [], include_usage, _usage(finals.values()))
    return event_stream(payloads())


# ---- /v1/chat/completions --------------------------------------------------------------------------------

def _chat_logprobs(tokens: list[dict]) -> dict:
    def entry(t):
        return {"token": t["text"], "logprob": t["logprob"], "bytes": list(t["text"].encode("utf-8"))}
    return {"content": [{**entry(t), "top_logprobs": [entry(a) for a in t.get("top_logprobs", [])]}
                        for t in tokens]}


def chat_messages(body: Fields, request: Request, tools: ToolRequest | None, tool_format: str) -> list[dict]:
    """The body's messages as the model gets them: earlier tool calls as the model's template writes them (or, in
    the generic format, as the assistant's content), and with generic tools, their instruction in the system
    message."""
    raw = body.values.get("messages")
    if isinstance(raw, list):
        if tool_format == "generic":  # an assistant's tool_calls (its content null) become its content
            raw = [with_generic_calls(m) if isinstance(m, dict) and m.get("content") is None else m for m in raw]
        else:
            raw = [with_template_calls(m) for m in raw]
    try:
        messages = validate_messages(raw, limits(request).max_messages)
    except ParameterError as exc:
        raise invalid("messages", str(exc)) from None
    return tools.messages(messages) if tools else messages


def chat_tools(body: Fields, settings: dict, tool_format: str) -> ToolRequest | None:
    """The request's tools in the model's tool format; the tools its template is given and their answer's grammar
    go into `settings`."""
    tools = ToolRequest.from_body(body)
    if tools is None:
        return None
    tools = in_format(tools, tool_format)
    if "structured_outputs" in settings:
        raise invalid("tools", f"'tools' and '{structured.source_field(body)}' both constrain the answer: send one")
    if (grammar := tools.structured_outputs()) is not None:
        settings["structured_outputs"] = json.dumps(structured.checked(grammar, "tools"))
    if (template_tools := tools.template_tools()) is not None:
        settings["tools"] = json.dumps(template_tools, ensure_ascii=False)
    return tools


async def chat_request(request: Request, body: Fields, settings: dict, model: str
                       ) -> tuple[ToolRequest | None, list[dict]]:
    """A chat body's tools (their settings added) and messages, in the model's tool format."""
    tool_format = (await request.app.state.triton.info(model)).tool_format
    tools = chat_tools(body, settings, tool_format)
    return tools, chat_messages(body, request, tools, tool_format)


def _tool_call_delta(delta) -> dict:
    call = {"index": delta.index}
    if delta.id is not None:
        call.update(id=delta.id, type="function", function={"name": delta.name, "arguments": delta.arguments})
    else:
        call["function"] = {"arguments": delta.arguments}
    return call


@router.post("/v1/chat/completions")
async def chat_completions(request: Request):
    body, settings, model = await _read(request, CHAT)
    tools, messages = await chat_request(request, body, settings, model)
    logprobs = body.boolean("logprobs", False)
    top_logprobs = body.integer("top_logprobs", low=0, high=MAX_TOP_LOGPROBS)
    if top_logprobs and not logprobs:
        raise invalid("top_logprobs", "'top_logprobs' needs 'logprobs': true")
    if logprobs:
        settings.update(return_tokens=True, top_logprobs=top_logprobs or 0)
    names = _names(body, max_tokens="max_completion_tokens" if body.has("max_completion_tokens") else "max_tokens")
    generations = _generations(request, body, model, settings, names, messages=messages)
    triton = request.app.state.triton
    created, rid = int(time.time()), f"chatcmpl-{uuid.uuid4().hex}"

    def message(result) -> tuple[dict, str]:
        if tools is None:
            return {"role": "assistant", "content": result.text}, result.finish_reason
        content, calls = tools.parse(result.text)
        if not calls:
            return {"role": "assistant", "content": content}, result.finish_reason
        return {"role": "assistant", "content": None, "tool_calls": calls}, "tool_calls"

    include_usage = _stream_options(body)  # checked before anything runs, streamed or not
    if not body.boolean("stream", False):
        results = await gen.unless_disconnected(request.receive, gen.complete_all(triton, generations))
        choices = []
        for i, r in enumerate(results):
            answer, finish = message(r)
            choices.append({"index": i, "message": answer, "logprobs": _chat_logprobs(r.tokens) if logprobs else None,
                            "finish_reason": finish, **_method_output(r.method_output)})
        return {"id": rid, "object": "chat.completion", "created": created, "model": model, "choices": choices,
                "usage": _usage(results)}
    chunks = await gen.unless_disconnected(request.receive, gen.primed(gen.merged(triton, generations)))
    head = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model}

    async def payloads():
        finals = {}
        streams = [tools.stream() if tools else None for _ in generations]

        def choice(index, delta, chunk_logprobs=None, finish=None, method_output=None):
            return _chunk(head, [{"index": index, "delta": delta, "logprobs": chunk_logprobs,
                                  "finish_reason": finish, **_method_output(method_output)}], include_usage)

        # the assistant's role first, as OpenAI streams it
        for index in range(len(generations)):
            yield choice(index, {"role": "assistant", "content": ""})
        async for index, chunk in chunks:
            tool_stream = streams[index]
            chunk_logprobs = _chat_logprobs(chunk.tokens) if logprobs else None
            if tool_stream is None:
                if chunk.text or chunk.tokens:
                    yield choice(index, {"content": chunk.text}, chunk_logprobs)
            else:
                deltas = tool_stream.feed(chunk.text)
                if chunk.reason:
                    left, _ = tool_stream.finish()
                    deltas += left
                for delta in deltas:
                    if delta.content is not None:
                        yield choice(index, {"content": delta.content}, chunk_logprobs)
                    else:
                        yield choice(index, {"tool_calls": [_tool_call_delta(delta)]}, chunk_logprobs)
                    chunk_logprobs = None  # a chunk's log-probabilities go with its first delta
            if chunk.reason:
                finals[index] = chunk
                called = tool_stream is not None and tool_stream.calls and chunk.finish_reason == "stop"
                finish = "tool_calls" if called else chunk.finish_reason
                yield choice(index, {}, None, finish, chunk.method_output)
        if include_usage:
            yield _chunk(head, [], include_usage, _usage(finals.values()))
    return event_stream(payloads())
