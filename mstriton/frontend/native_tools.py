"""Tool calls in the syntax a model's own chat template teaches it (tokenizer/chat.py's tool_format_of), for
models that have one: the tools go to the template (the `tools` input), earlier calls stay in OpenAI's form for
the template to write, and the answer is read back from the model's syntax:

    hermes       <tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>, once per call, text maybe around
    llama3_json  {"name": ..., "parameters": {...}} as the whole answer (after <|python_tag|>, a special token)

`tool_choice` "required" and a named function are held by a grammar (Lark, with each call's JSON schema inline)
to calls in that syntax; "auto" leaves the model free and reads calls where it wrote them. Templates whose
syntax is not one of these get the generic JSON format (tools.py).
"""

from __future__ import annotations

import json

from ..engine.structured_output import COMPACT_JSON
from .tools import MAX_PARALLEL_CALLS, Delta, Tool, ToolRequest, call_id, value_end


def _json_rule(schema: dict) -> str:
    """A Lark rule body matching one JSON value of `schema`, written as json.dumps writes (', ', ': ')."""
    return "%json " + json.dumps({**schema, "x-guidance": COMPACT_JSON})


def _call_deltas(index: int, call: dict) -> list[Delta]:
    """A whole call streamed: its id and name, then its arguments."""
    function = call["function"]
    return [Delta(index=index, id=call["id"], name=function["name"], arguments=""),
            Delta(index=index, arguments=function["arguments"])]


def with_template_calls(message: dict) -> dict:
    """An assistant message carrying OpenAI tool_calls, as templates with tool syntax read it (and as vLLM gives it
    to them): content "" instead of null, each call's arguments a JSON object instead of its text."""
    calls = message.get("tool_calls") if isinstance(message, dict) else None
    if not calls or not isinstance(calls, list):
        return message
    written = []
    for call in calls:
        function = call.get("function") if isinstance(call, dict) else None
        if isinstance(function, dict) and isinstance(function.get("arguments"), str):
            try:
                function = {**function, "arguments": json.loads(function["arguments"])}
            except ValueError:
                pass  # left as text: the template writes what it is given
            call = {**call, "function": function}
        written.append(call)
    return {**message, "content": message.get("content") or "", "tool_calls": written}


class TemplateToolRequest(ToolRequest):
    """Tools a model's own template writes: the generic format's request, its prompt, grammar and reading
    replaced."""

    def template_tools(self) -> list[dict]:
        """The tools as the template is given them (all of them: a named choice narrows the grammar, not what the
        model is told it has)."""
        return [{"type": "function", "function": {"name": t.name, "description": t.description,
                                                   "parameters": t.parameters}} for t in self.tools]

    def messages(self, messages: list[dict]) -> list[dict]:
        return messages  # the template describes the tools itself

    def structured_outputs(self) -> dict | None:
        if self.choice == "auto":
            return None
        return {"grammar": self.grammar()}

    def grammar(self) -> str:
        raise NotImplementedError

    def _call_schemas(self, arguments_key: str) -> dict:
        calls = [{"type": "object", "properties": {"name": {"const": t.name}, arguments_key: t.parameters},
                  "required": ["name", arguments_key], "additionalProperties": False} for t in self.callable]
        return calls[0] if len(calls) == 1 else {"anyOf": calls}


HERMES_OPEN, HERMES_CLOSE = "<tool_call>", "</tool_call>"


def _hermes_block(text: str, at: int) -> tuple[int, int | None, dict | None] | None:
    """The first <tool_call> block at or after `at`: (its start, its end or None while it is not closed, its call
    or None when it holds no call); None when no block begins there. The call's JSON is read for its own end, so
    a "</tool_call>" inside one of its strings does not close the block."""
    start = text.find(HERMES_OPEN, at)
    if start < 0:
        return None
    i = start + len(HERMES_OPEN)
    while i < len(text) and text[i].isspace():
        i += 1
    if i == len(text):
        return start, None, None
    if text[i] == "{":
        end = value_end(text, i)
        if end is None:
            return start, None, None  # the call's JSON is still coming
        after = end
        while after < len(text) and text[after].isspace():
            after += 1
        if text.startswith(HERMES_CLOSE, after):
            return start, after + len(HERMES_CLOSE), _named_call(text[i:end], "arguments")
        if HERMES_CLOSE.startswith(text[after:]):
            return start, None, None  # the closing tag is still coming
    close = text.find(HERMES_CLOSE, i)  # something else between the tags: no call
    return start, (close + len(HERMES_CLOSE) if close >= 0 else None), None


class HermesToolRequest(TemplateToolRequest):
    def grammar(self) -> str:
        return "\n".join([
            f"start: call (\"\\n\" call){{0,{MAX_PARALLEL_CALLS - 1}}}" if self.parallel else "start: call",
            f"call: \"{HERMES_OPEN}\\n\" body \"\\n{HERMES_CLOSE}\"",
            f"body: {_json_rule(self._call_schemas('arguments'))}"])

    def parse(self, text: str) -> tuple[str | None, list[dict]]:
        """(the words outside the blocks, the calls); the whole text as words when a block holds no call or is
        never closed (as the model wrote it, nothing lost)."""
        calls, words, at = [], [], 0
        while (block := _hermes_block(text, at)) is not None:
            start, end, call = block
            if end is None or call is None:
                return text, []
            words.append(text[at:start])
            calls.append(call)
            at = end
        if not calls:
            return text, []
        content = "".join(words + [text[at:]]).strip()
        return content or None, calls

    def stream(self) -> "HermesStream":
        return HermesStream()


def _named_call(text: str, arguments_key: str) -> dict | None:
    """OpenAI's tool call of a {"name": ..., arguments_key: {...}} JSON text, or None if it is not one."""
    try:
        value = json.loads(text)
    except ValueError:
        return None
    if not isinstance(value, dict) or not isinstance(value.get("name"), str):
        return None
    arguments = value.get(arguments_key, {})
    if not isinstance(arguments, dict):
        return None
    return {"id": call_id(), "type": "function",
            "function": {"name": value["name"], "arguments": json.dumps(arguments, ensure_ascii=False)}}


class HermesStream:
    """Words as they come until a <tool_call> begins (a tail that may be its beginning held back); then each
    call once its block is closed: its id and name, then its arguments. A block that holds no call goes out as
    words."""

    def __init__(self):
        self.text = ""
        self.sent = 0          # characters of text given out, as words or calls
        self.calls: list[dict] = []

    def feed(self, piece: str) -> list[Delta]:
        self.text += piece
        deltas = []
        while True:
            block = _hermes_block(self.text, self.sent)
            if block is None:
                safe = len(self.text) - _partial_tag(self.text[self.sent:])
                if safe > self.sent:
                    deltas.append(Delta(content=self.text[self.sent:safe]))
                    self.sent = safe
                return deltas
            start, end, call = block
            if start > self.sent:
                deltas.append(Delta(content=self.text[self.sent:start]))
                self.sent = start
            if end is None:
                return deltas  # not closed yet
            if call:
                deltas += _call_deltas(len(self.calls), call)
                self.calls.append(call)
            else:
                deltas.append(Delta(content=self.text[start:end]))
            self.sent = end

    def finish(self) -> tuple[list[Delta], bool]:
        """The text held back (a block never closed, a partial "<tool_call>") as words; whether it called."""
        left = self.text[self.sent:]
        self.sent = len(self.text)
        return ([Delta(content=left)] if left else []), bool(self.calls)


def _partial_tag(text: str) -> int:
    """How many characters at the end of `text` could be the beginning of "<tool_call>"."""
    for k in range(min(len(HERMES_OPEN) - 1, len(text)), 0, -1):
        if HERMES_OPEN.startswith(text[-k:]):
            return k
    return 0


PYTHON_TAG = "<|python_tag|>"  # Llama 3's special token before a call: in the text when special tokens are kept


class Llama3JsonToolRequest(TemplateToolRequest):
    """Llama 3.1-3.3's JSON tool calls: one call, the whole answer. (The template also knows built-in tools,
    written as Python after <|python_tag|>: not function tools, not read.)"""

    def __init__(self, tools: list[Tool], choice: str, parallel: bool):
        super().__init__(tools, choice, False)  # one call per answer

    def grammar(self) -> str:
        return f"start: {_json_rule(self._call_schemas('parameters'))}"

    def parse(self, text: str) -> tuple[str | None, list[dict]]:
        stripped = text.strip().removeprefix(PYTHON_TAG).strip()
        call = _named_call(stripped, "parameters") if stripped.startswith("{") else None
        return (text, []) if call is None else (None, [call])

    def stream(self) -> "Llama3JsonStream":
        return Llama3JsonStream(self)


class Llama3JsonStream:
    """Content as it comes unless the answer begins with "{": then all of it is held to the end and read as
    a call (or given out as content if it is not one)."""

    def __init__(self, request: Llama3JsonToolRequest):
        self.request = request
        self.text = ""
        self.holding: bool | None = None   # None until the first character that is not a space
        self.calls: list[dict] = []

    def feed(self, piece: str) -> list[Delta]:
        self.text += piece
        if self.holding is None:
            begun = self.text.lstrip()
            if PYTHON_TAG.startswith(begun):
                return []  # maybe the tag, still coming
            begun = begun.removeprefix(PYTHON_TAG).lstrip()
            if not begun:
                return []
            self.holding = begun.startswith("{")
            piece = self.text
        return [] if self.holding or not piece else [Delta(content=piece)]

    def finish(self) -> tuple[list[Delta], bool]:
        if not self.holding:
            return ([Delta(content=self.text)] if self.holding is None and self.text else []), False
        content, calls = self.request.parse(self.text)
        if not calls:
            return [Delta(content=content)], False
        self.calls = calls
        return _call_deltas(0, calls[0]), True


FORMATS: dict[str, type[ToolRequest]] = {"generic": ToolRequest, "hermes": HermesToolRequest,
                                         "llama3_json": Llama3JsonToolRequest}


def in_format(request: ToolRequest, tool_format: str) -> ToolRequest:
    """The request in the model's tool format (tokenizer/chat.py's TOOL_FORMATS)."""
    return FORMATS.get(tool_format, ToolRequest)(request.tools, request.choice, request.parallel)
