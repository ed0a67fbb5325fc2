"""OpenAI's Responses API: POST /v1/responses, text and function tools, whole or streamed as its typed events.

A Responses body is read into the chat-completions request it stands for (instructions as the system message,
input items as messages, earlier function calls and their outputs as the chat's tool calls and tool messages,
`text.format` as response_format, flat function tools as chat tools) and runs the chat door's one path
(openai_api: settings, tools, messages, generations). Nothing is stored: `previous_response_id` and `store`
are refused, so a conversation is sent whole, as with chat completions.
"""

from __future__ import annotations

import json
import time
import uuid

from fastapi import APIRouter, Request

from ..params import door_fields
from . import generation as gen
from . import openai_api
from .errors import ApiError, invalid
from .fields import Fields

router = APIRouter()

# The sampling settings of the chat door that a Responses body may carry too (vLLM reads them there as well)
KNOWN = set(door_fields("openai").values()) | {
    "model", "input", "instructions", "tools", "tool_choice", "parallel_tool_calls", "max_output_tokens", "stream",
    "text", "store", "metadata", "user", "previous_response_id", "reasoning", "truncation", "include", "background",
    "service_tier", "max_tool_calls", "top_logprobs", "prompt_cache_key", "safety_identifier", "stop_token_ids",
    "logit_bias"}
ROLES = {"user": "user", "system": "system", "developer": "system", "assistant": "assistant"}


def _refuse_unimplemented(body: Fields) -> None:
    body.refuse("previous_response_id", "responses are not stored: send the whole conversation in 'input'")
    body.refuse("store", "responses are not stored (send store: false, or leave it out)", unless=lambda v: not v)
    body.refuse("background", "background responses are not implemented", unless=lambda v: not v)
    body.refuse("reasoning", "reasoning models are not served here", unless=lambda v: not v)
    body.refuse("include", "no extra output data is implemented", unless=lambda v: not v)
    body.refuse("truncation", "inputs are not truncated", unless=lambda v: v in (None, "disabled"))
    body.refuse("service_tier", "one service tier", unless=lambda v: v in (None, "auto", "default"))
    body.refuse("top_logprobs", "log-probabilities are given by /v1/chat/completions", unless=lambda v: not v)
    body.refuse("max_tool_calls", "only built-in limits on tool calls", unless=lambda v: v is None)


def _text(part_field: str, content) -> str:
    """An input item's content: a string, or a list of input_text / output_text parts."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise invalid(part_field, f"'{part_field}' must be a string or a list of text parts")
    texts = []
    for j, part in enumerate(content):
        if not isinstance(part, dict) or part.get("type") not in ("input_text", "output_text", "text") or \
                not isinstance(part.get("text"), str):
            raise invalid(f"{part_field}[{j}]", f"'{part_field}[{j}]' must be a text part {{\"type\": "
                                                "\"input_text\", \"text\": ...}} (only text is served)")
        texts.append(part["text"])
    return "".join(texts)


def input_messages(body: Fields) -> list[dict]:
    """instructions and input -> the chat's messages (OpenAI chat format, tool calls included)."""
    messages = []
    instructions = body.text("instructions")
    if instructions:
        messages.append({"role": "system", "content": instructions})
    items = body.values.get("input")
    if isinstance(items, str):
        return messages + [{"role": "user", "content": items}]
    if not isinstance(items, list) or not items:
        raise invalid("input", "'input' is required: a string, or a non-empty list of input items")
    for i, item in enumerate(items):
        field = f"input[{i}]"
        if not isinstance(item, dict):
            raise invalid(field, f"'{field}' must be an input item (an object)")
        kind = item.get("type", "message")
        if kind == "message":
            role = item.get("role")
            if role not in ROLES:
                raise invalid(f"{field}.role", f"'{field}.role' must be one of {sorted(ROLES)}, got {role!r:.40}")
            messages.append({"role": ROLES[role], "content": _text(f"{field}.content", item.get("content"))})
        elif kind == "function_call":
            call = {"id": item.get("call_id"), "type": "function",
                    "function": {"name": item.get("name"), "arguments": item.get("arguments", "{}")}}
            if messages and messages[-1]["role"] == "assistant" and messages[-1].get("tool_calls"):
                messages[-1]["tool_calls"].append(call)  # calls made together stay one turn
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "function_call_output":
            output = item.get("output")
            messages.append({"role": "tool", "tool_call_id": item.get("call_id"),
                             "content": output if isinstance(output, str) else json.dumps(output)})
        else:
            raise invalid(f"{field}.type", f"'{field}.type' must be message, function_call or "
                                           f"function_call_output, got {kind!r:.40}")
    return messages


def chat_body(body: Fields) -> dict:
    """The chat-completions body a Responses body stands for."""
    chat = {k: v for k, v in body.values.items() if k in door_fields("openai").values() or
            k in ("model", "parallel_tool_calls", "stop_token_ids", "logit_bias")}
    chat["messages"] = input_messages(body)
    max_tokens = body.integer("max_output_tokens", low=1)
    if max_tokens is not None:
        chat["max_tokens"] = max_tokens
    tools = body.values.get("tools")
    if tools is not None:
        if not isinstance(tools, list):
            raise invalid("tools", "'tools' must be a list of function tools")
        for i, tool in enumerate(tools):
            if not isinstance(tool, dict) or tool.get("type") != "function":
                raise invalid(f"tools[{i}]", f"'tools[{i}]' must be a function tool {{\"type\": \"function\", "
                                             "\"name\": ...}} (built-in tools are not served)")
        chat["tools"] = [{"type": "function", "function": {k: v for k, v in t.items() if k != "type"}}
                         for t in tools]
    choice = body.values.get("tool_choice")
    if isinstance(choice, dict) and choice.get("type") == "function":
        choice = {"type": "function", "function": {"name": choice.get("name")}}
    if choice is not None:
        chat["tool_choice"] = choice
    text_format = body.obj("text").obj("format")
    if text_format.values:
        kind = text_format.text("type", choices=("text", "json_object", "json_schema"))
        if kind == "json_schema":
            chat["response_format"] = {"type": "json_schema", "json_schema": {
                "name": text_format.values.get("name"), "schema": text_format.values.get("schema")}}
        elif kind == "json_object":
            chat["response_format"] = {"type": "json_object"}
    return chat


# What the chat path calls a field -> the Responses body's name for it (errors raised on the way name these)
RENAMES = ((".function.", "."), ("response_format.json_schema.schema", "text.format.schema"),
           ("response_format", "text.format"), ("max_tokens", "max_output_tokens"), ("messages", "input"))


def _in_responses_terms(error: ApiError) -> ApiError:
    """An error the chat path raised, naming the Responses body's fields."""
    param, message = error.param, error.message
    for old, new in RENAMES:
        param = param.replace(old, new) if param else param
        message = message.replace(old, new)
    return ApiError(error.status, message, param=param, kind=error.kind, code=error.code, headers=error.headers)


@router.post("/v1/responses")
async def responses(request: Request):
    body, model = await openai_api.read_body(request, KNOWN, _refuse_unimplemented)
    triton = request.app.state.triton
    try:
        chat = Fields(chat_body(body))
        settings = {**await openai_api.request_settings(chat, triton, model), **openai_api.method_settings(body)}
        tools, messages = await openai_api.chat_request(request, chat, settings, model)
    except ApiError as exc:
        raise _in_responses_terms(exc) from None
    names = {"max_tokens": "max_output_tokens", "structured_outputs": "text.format"}
    generation = gen.Generation(model=model, messages=messages, settings=settings, names=names)
    rid, created = f"resp_{uuid.uuid4().hex}", int(time.time())
    head = {"id": rid, "object": "response", "created_at": created, "model": model,
            "instructions": body.values.get("instructions"), "max_output_tokens": body.values.get("max_output_tokens"),
            "metadata": body.values.get("metadata") or {}, "parallel_tool_calls": body.boolean("parallel_tool_calls", True),
            "temperature": body.values.get("temperature"), "top_p": body.values.get("top_p"),
            "tool_choice": body.values.get("tool_choice", "auto"), "tools": body.values.get("tools") or [],
            "text": body.values.get("text") or {"format": {"type": "text"}}, "store": False, "error": None}

    def finished(result_reason: str, output: list, prompt_tokens: int, completion_tokens: int) -> dict:
        cut = result_reason == "length"
        return {**head, "status": "incomplete" if cut else "completed", "output": output,
                "incomplete_details": {"reason": "max_output_tokens"} if cut else None,
                "usage": {"input_tokens": prompt_tokens, "output_tokens": completion_tokens,
                          "total_tokens": prompt_tokens + completion_tokens,
                          "input_tokens_details": {"cached_tokens": 0},
                          "output_tokens_details": {"reasoning_tokens": 0}}}

    if not body.boolean("stream", False):
        result = await gen.unless_disconnected(request.receive, gen.complete(triton, generation))
        content, calls = tools.parse(result.text) if tools else (result.text, [])
        output = [_call_item(c["id"], c["function"]["name"], c["function"]["arguments"]) for c in calls] \
            if calls else [_message_item(f"msg_{uuid.uuid4().hex}", content or "", "completed")]
        return finished(result.reason, output, result.prompt_tokens, result.completion_tokens)
    chunks = await gen.unless_disconnected(request.receive, gen.primed(gen.stream(triton, generation)))
    return openai_api.event_stream(_events(chunks, head, tools, finished), typed=True)


def _message_item(item_id: str, text: str, status: str) -> dict:
    return {"type": "message", "id": item_id, "status": status, "role": "assistant",
            "content": [{"type": "output_text", "text": text, "annotations": []}] if status == "completed" else []}


def _call_item(call_id: str, name: str, arguments: str, status: str = "completed") -> dict:
    return {"type": "function_call", "id": f"fc_{call_id.removeprefix('call_')}", "call_id": call_id, "name": name,
            "arguments": arguments, "status": status}


async def _events(chunks, head: dict, tools, finished):
    """The stream's typed events: response.created, then per output item its added / delta / done events, then
    response.completed (or .incomplete) with the whole response."""
    sequence = 0

    def event(kind: str, **fields) -> dict:
        nonlocal sequence
        sequence += 1
        return {"type": kind, "sequence_number": sequence - 1, **fields}

    yield event("response.created", response={**head, "status": "in_progress", "output": []})
    yield event("response.in_progress", response={**head, "status": "in_progress", "output": []})
    output: list[dict] = []
    message = None           # the open message item: [output index, id, text so far]
    calls: dict[int, list] = {}  # tool-call index -> [output index, call item]
    tool_stream = tools.stream() if tools else None
    last = None

    def open_message():
        nonlocal message
        message = [len(output), f"msg_{uuid.uuid4().hex}", ""]
        output.append(None)
        return [event("response.output_item.added", output_index=message[0],
                      item=_message_item(message[1], "", "in_progress")),
                event("response.content_part.added", item_id=message[1], output_index=message[0], content_index=0,
                      part={"type": "output_text", "text": "", "annotations": []})]

    def text_events(text: str):
        out = open_message() if message is None else []
        message[2] += text
        return out + [event("response.output_text.delta", item_id=message[1], output_index=message[0],
                            content_index=0, delta=text)]

    async for chunk in chunks:
        last = chunk
        deltas = []
        if tool_stream is None:
            if chunk.text:
                for e in text_events(chunk.text):
                    yield e
        else:
            deltas = tool_stream.feed(chunk.text) + (tool_stream.finish()[0] if chunk.reason else [])
        for delta in deltas:
            if delta.content is not None:
                for e in text_events(delta.content):
                    yield e
            elif delta.id is not None:
                item = _call_item(delta.id, delta.name, "", "in_progress")
                calls[delta.index] = [len(output), item]
                output.append(item)
                yield event("response.output_item.added", output_index=len(output) - 1, item=item)
            else:
                index, item = calls[delta.index]
                item["arguments"] += delta.arguments
                yield event("response.function_call_arguments.delta", item_id=item["id"], output_index=index,
                            delta=delta.arguments)
    if message is None and not calls:
        for e in open_message():
            yield e
    if message is not None:
        index, item_id, text = message
        yield event("response.output_text.done", item_id=item_id, output_index=index, content_index=0, text=text)
        yield event("response.content_part.done", item_id=item_id, output_index=index, content_index=0,
                    part={"type": "output_text", "text": text, "annotations": []})
        output[index] = _message_item(item_id, text, "completed")
        yield event("response.output_item.done", output_index=index, item=output[index])
    for index, item in calls.values():
        item["status"] = "completed"
        yield event("response.function_call_arguments.done", item_id=item["id"], output_index=index,
                    arguments=item["arguments"])
        yield event("response.output_item.done", output_index=index, item=item)
    response = finished(last.reason if last else "length", output, last.prompt_tokens if last else 0,
                        last.completion_tokens if last else 0)
    yield event("response.incomplete" if response["status"] == "incomplete" else "response.completed",
                response=response)
