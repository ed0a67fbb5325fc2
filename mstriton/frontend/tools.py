"""Tool calling in a generic JSON format, for chat templates that have no tool syntax of their own (SmolLM2's
ChatML; llama.cpp serves such models the same way): the tools are described to the model in a system
instruction, and its answer is held by a grammar (structured_outputs) to one JSON object:

    {"tool_call": {"name": ..., "arguments": {...}}}           one call (parallel_tool_calls false)
    {"tool_calls": [{"name": ..., "arguments": {...}}, ...]}   one or more calls (parallel_tool_calls true)
    {"response": "..."}                                        an answer in words (tool_choice "auto" only)

`tool_choice` "required" and a named function leave only the calls (of that function) in the grammar; "auto"
leaves both; "none" leaves the chat as it is. Each call's arguments follow the function's own JSON schema.
The object is read back into OpenAI's `tool_calls` (parse), or, streamed, into content and tool-call deltas as
it grows (ToolStream: a call's id and name first, then its arguments' text in fragments).
"""

from __future__ import annotations

import dataclasses
import json
import re
import uuid

from .errors import invalid
from .fields import Fields

NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
MAX_TOOLS = 128
# Calls in one answer with parallel_tool_calls: a small model sampling freely can list calls until max_tokens, and
# an answer cut short has none
MAX_PARALLEL_CALLS = 8
# The object's beginnings, as the grammar writes them (json.dumps' separators, no other whitespace)
RESPONSE_HEAD = '{"response": "'
ONE_HEAD = '{"tool_call": '
MANY_HEAD = '{"tool_calls": ['
CALL_HEAD = '{"name": "'
ARGUMENTS_HEAD = ', "arguments": '


@dataclasses.dataclass
class Tool:
    name: str
    description: str
    parameters: dict


@dataclasses.dataclass
class ToolRequest:
    tools: list[Tool]
    choice: str            # "auto", "required", or the name of the function it must call
    parallel: bool

    @classmethod
    def from_body(cls, body: Fields) -> "ToolRequest | None":
        """The request's tools, or None when it has none or tool_choice is "none". Errors name the field."""
        raw = body.values.get("tools")
        choice = body.values.get("tool_choice")
        if raw is None or raw == []:
            if choice not in (None, "none", "auto"):
                raise invalid("tool_choice", "'tool_choice' needs 'tools'")
            return None
        if not isinstance(raw, list) or len(raw) > MAX_TOOLS:
            raise invalid("tools", f"'tools' must be a list of at most {MAX_TOOLS} function tools")
        tools = []
        for i, item in enumerate(raw):
            entry = Fields(item if isinstance(item, dict) else None, prefix=f"tools[{i}].")
            if not isinstance(item, dict) or entry.text("type") != "function":
                raise invalid(f"tools[{i}]", f"'tools[{i}]' must be {{\"type\": \"function\", \"function\": {{...}}}}")
            function = entry.obj("function")
            name = function.text("name")
            if not name or not NAME.match(name):
                raise invalid(function.name("name"), f"'{function.name('name')}' must be 1 to 64 letters, digits, "
                                                     f"'_' or '-', got {name!r:.80}")
            if any(t.name == name for t in tools):
                raise invalid(function.name("name"), f"'{function.name('name')}': two tools are named {name!r}")
            parameters = function.values.get("parameters")
            if parameters is not None and not isinstance(parameters, dict):
                raise invalid(function.name("parameters"), f"'{function.name('parameters')}' must be a JSON schema "
                                                           "(an object)")
            tools.append(Tool(name, function.text("description", "") or "", parameters or {"type": "object"}))
        parallel = body.boolean("parallel_tool_calls", True)
        if choice is None or choice == "auto":
            return cls(tools, "auto", parallel)
        if choice == "none":
            return None
        if choice == "required":
            return cls(tools, "required", parallel)
        named = Fields(choice if isinstance(choice, dict) else None, prefix="tool_choice.")
        if not isinstance(choice, dict) or named.text("type") != "function":
            raise invalid("tool_choice", "'tool_choice' must be 'none', 'auto', 'required' or "
                                         "{\"type\": \"function\", \"function\": {\"name\": ...}}")
        name = named.obj("function").text("name")
        if name not in {t.name for t in tools}:
            raise invalid("tool_choice.function.name", f"'tool_choice.function.name' must name one of the tools "
                                                       f"({', '.join(t.name for t in tools)}), got {name!r:.80}")
        return cls(tools, name, False)

    # ---- what the model is given ------------------------------------------------------------------------

    @property
    def callable(self) -> list[Tool]:
        """The tools tool_choice lets the model call: all of them, or the one it names."""
        return [t for t in self.tools if self.choice in ("auto", "required", t.name)]

    def schema(self) -> dict:
        """The JSON schema of the model's answer."""
        calls = [{"type": "object", "properties": {"name": {"const": t.name}, "arguments": t.parameters},
                  "required": ["name", "arguments"], "additionalProperties": False} for t in self.callable]
        call = calls[0] if len(calls) == 1 else {"anyOf": calls}
        if self.parallel:
            envelope = _object("tool_calls", {"type": "array", "items": call, "minItems": 1,
                                              "maxItems": MAX_PARALLEL_CALLS})
        else:
            envelope = _object("tool_call", call)
        if self.choice != "auto":
            return envelope
        return {"anyOf": [envelope, _object("response", {"type": "string"})]}

    def structured_outputs(self) -> dict | None:
        """The grammar of the answer (None: the model is left free)."""
        return {"json": self.schema()}

    def template_tools(self) -> list[dict] | None:
        """The tools as the chat template is given them: none, the instruction describes them."""
        return None

    def parse(self, text: str) -> tuple[str | None, list[dict]]:
        return parse(text)

    def stream(self) -> "ToolStream":
        return ToolStream()

    def instruction(self) -> str:
        described = [{"name": t.name, "description": t.description, "parameters": t.parameters}
                     for t in self.callable]
        key = "tool_calls" if self.parallel else "tool_call"
        call = '{"name": "<tool name>", "arguments": {<its arguments>}}'
        shape = f'{{"{key}": [{call}, ...]}}' if self.parallel else f'{{"{key}": {call}}}'
        lines = ["You can call these tools:", json.dumps(described, ensure_ascii=False), "",
                 f"To call {'tools' if self.parallel else 'a tool'}, answer with a JSON object {shape}."]
        if self.choice == "auto":
            lines.append('To answer the user directly, answer with {"response": "<your answer>"}.')
        else:
            lines.append("You must call a tool now.")
        lines.append("Answer with that JSON object only.")
        return "\n".join(lines)

    def messages(self, messages: list[dict]) -> list[dict]:
        """The chat as the model sees it: the instruction in the system message (added first or appended to the
        first), the assistant's earlier calls written in the generic format."""
        out = [with_generic_calls(m) for m in messages]
        if out and out[0].get("role") == "system" and isinstance(out[0].get("content"), str):
            out[0] = {**out[0], "content": out[0]["content"] + "\n\n" + self.instruction()}
        else:
            out.insert(0, {"role": "system", "content": self.instruction()})
        return out


def _object(key: str, value: dict) -> dict:
    return {"type": "object", "properties": {key: value}, "required": [key], "additionalProperties": False}


def with_generic_calls(message: dict) -> dict:
    """An assistant message carrying OpenAI tool_calls, with them written as its content in the generic format
    (what the model would have answered), so that the template shows them; other messages as they are."""
    calls = message.get("tool_calls") if isinstance(message, dict) else None
    if not calls or not isinstance(calls, list):
        return message
    written = []
    for call in calls:
        function = call.get("function", {}) if isinstance(call, dict) else {}
        arguments = function.get("arguments", "{}")
        try:
            arguments = json.loads(arguments) if isinstance(arguments, str) else arguments
        except ValueError:
            pass
        written.append({"name": function.get("name"), "arguments": arguments})
    content = json.dumps({"tool_calls": written} if len(written) > 1 else {"tool_call": written[0]},
                         ensure_ascii=False)
    return {**{k: v for k, v in message.items() if k != "tool_calls"}, "content": content}


def call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def parse(text: str) -> tuple[str | None, list[dict]]:
    """The model's answer -> (content, OpenAI tool_calls). Text that is not a whole answer object (cut by
    max_tokens) is returned as content."""
    try:
        value = json.loads(text)
    except ValueError:
        return text, []
    if isinstance(value, dict) and isinstance(value.get("response"), str):
        return value["response"], []
    calls = value.get("tool_calls") if isinstance(value, dict) else None
    if calls is None and isinstance(value, dict) and isinstance(value.get("tool_call"), dict):
        calls = [value["tool_call"]]
    if not isinstance(calls, list):
        return text, []
    return None, [{"id": call_id(), "type": "function",
                   "function": {"name": c.get("name"), "arguments": json.dumps(c.get("arguments", {}),
                                                                               ensure_ascii=False)}}
                  for c in calls if isinstance(c, dict)]


# ---- streamed -------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Delta:
    content: str | None = None        # words of a {"response": ...}
    index: int | None = None          # a tool call's index, with its id and name (first) or arguments' text
    id: str | None = None
    name: str | None = None
    arguments: str | None = None


class ToolStream:
    """The answer object read as it grows: deltas of its response's words, or of its calls (id and name once the
    name is whole, then the arguments' JSON text as it comes). The object's form is the grammar's, so its
    beginnings are known exactly."""

    def __init__(self):
        self.text = ""
        self.sent_content = ""      # the response's words sent so far
        self.calls: list[dict] = []  # {"id", "name", "start", "sent", "end"} per call found
        self.saw_calls = False

    def feed(self, piece: str) -> list[Delta]:
        self.text += piece
        if self.text.startswith(RESPONSE_HEAD):
            words = _string_prefix(self.text[len(RESPONSE_HEAD):])
            new = words[len(self.sent_content):]
            self.sent_content = words
            return [Delta(content=new)] if new else []
        if self.text.startswith(ONE_HEAD) or self.text.startswith(MANY_HEAD):
            self.saw_calls = True
            return self._call_deltas()
        return []

    def _call_deltas(self) -> list[Delta]:
        deltas = []
        at = len(MANY_HEAD) if self.text.startswith(MANY_HEAD) else len(ONE_HEAD)
        while True:
            if self.calls and self.calls[-1]["end"] is None:  # the last call's arguments are still coming
                call = self.calls[-1]
            else:
                if self.calls:
                    at = self.calls[-1]["end"]
                start = self.text.find(CALL_HEAD, at)
                if start < 0:
                    break
                name_start = start + len(CALL_HEAD)
                name_end = _string_end(self.text, name_start)
                if name_end is None or not self.text.startswith(ARGUMENTS_HEAD, name_end + 1):
                    break
                name = json.loads(self.text[name_start - 1:name_end + 1])
                call = {"id": call_id(), "name": name, "start": name_end + 1 + len(ARGUMENTS_HEAD), "sent": 0,
                        "end": None}
                self.calls.append(call)
                deltas.append(Delta(index=len(self.calls) - 1, id=call["id"], name=name, arguments=""))
            end = value_end(self.text, call["start"])
            arguments = self.text[call["start"]:end if end is not None else len(self.text)]
            if len(arguments) > call["sent"]:
                deltas.append(Delta(index=self.calls.index(call), arguments=arguments[call["sent"]:]))
                call["sent"] = len(arguments)
            call["end"] = end
            if end is None:
                break
        return deltas

    def finish(self) -> tuple[list[Delta], bool]:
        """At the end of the stream: (the text left as content when it never became an answer object, e.g. cut by
        max_tokens before its form was known), whether it called tools."""
        if self.saw_calls or self.text.startswith(RESPONSE_HEAD) or not self.text:
            return [], bool(self.calls)
        return [Delta(content=self.text)], False


def _string_end(text: str, start: int) -> int | None:
    """The index of the quote closing a JSON string whose characters begin at `start`, or None if not yet."""
    i = start
    while i < len(text):
        if text[i] == "\\":
            i += 2
            continue
        if text[i] == '"':
            return i
        i += 1
    return None


def _string_prefix(body: str) -> str:
    """The decoded text of a JSON string's characters `body` (maybe unfinished), up to its closing quote, leaving
    out an escape not yet whole and a high surrogate whose pair has not come."""
    end = _string_end(body, 0)
    body = body if end is None else body[:end]
    cut = len(body)
    backslash = body.rfind("\\", max(0, len(body) - 6))
    if backslash >= 0:
        escaping = len(body[:backslash + 1]) - len(body[:backslash + 1].rstrip("\\"))
        need = 6 if body[backslash + 1:backslash + 2] == "u" else 2
        if escaping % 2 == 1 and len(body) - backslash < need:  # an escape begun, not yet whole
            cut = backslash
    try:
        text = json.loads('"' + body[:cut] + '"')
    except ValueError:
        return ""
    return text[:-1] if text and "\ud800" <= text[-1] <= "\udbff" else text


def value_end(text: str, start: int) -> int | None:
    """The index just after the JSON object or array beginning at `start`, or None while it is unfinished."""
    depth, i = 0, start
    while i < len(text):
        c = text[i]
        if c == '"':
            end = _string_end(text, i + 1)
            if end is None:
                return None
            i = end + 1
            continue
        if c in "{[":
            depth += 1
        elif c in "}]":
            depth -= 1
            if depth == 0:
                return i + 1
        i += 1
    return None
