"""Chat messages -> prompt text, through a jinja2 chat template rendered as transformers'
`apply_chat_template(messages, add_generation_prompt=True)` renders it: the same sandboxed environment settings
(trim_blocks, lstrip_blocks, loop controls), the same helpers (`raise_exception`, `strftime_now`, a `tojson`
that keeps non-ASCII text) and the same variables (messages, add_generation_prompt, the special tokens).

Named templates, for models without a template of their own or to override it at conversion (`--template`):
`chatml`, and `llama2` and `internlm`, whose rendering of one user message is exactly the text template they
always were ("[INST] {prompt} [/INST]", "<|User|>:{prompt}<eoh>\\n<|Bot|>:"). They write no BOS/EOS strings:
the tokenizer adds BOS (sentencepiece cannot parse control tokens written in text).
"""

from __future__ import annotations

import datetime
import json

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

from ..params import LIMITS, MAX_JSON_DEPTH, ParameterError, json_depth_exceeds

NAMED_TEMPLATES = {
    "chatml": (
        "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
        "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"),
    "llama2": (
        "{% if messages[0]['role'] == 'system' %}{% set system = messages[0]['content'] %}"
        "{% set messages = messages[1:] %}{% endif %}"
        "{% for message in messages %}"
        "{% if message['role'] == 'user' %}{% if not loop.first %} {% endif %}[INST] "
        "{% if loop.first and system is defined %}<<SYS>>\n{{ system }}\n<</SYS>>\n\n{% endif %}"
        "{{ message['content'] }} [/INST]"
        "{% elif message['role'] == 'assistant' %} {{ message['content'] }}{% endif %}"
        "{% endfor %}"),
    "internlm": (
        "{% for message in messages %}"
        "{% if message['role'] == 'system' %}<|System|>:{{ message['content'] }}\n"
        "{% elif message['role'] == 'user' %}<|User|>:{{ message['content'] }}<eoh>\n"
        "{% elif message['role'] == 'assistant' %}<|Bot|>:{{ message['content'] }}<eoa>\n{% endif %}"
        "{% endfor %}{% if add_generation_prompt %}<|Bot|>:{% endif %}"),
}
ROLES = ("system", "user", "assistant", "tool")
# How a model writes a tool call, by what its chat template shows it (frontend/native_tools.py reads each back):
#   hermes       <tool_call>{"name": ..., "arguments": {...}}</tool_call>, once per call (Qwen2.5/3, Hermes 2/3)
#   llama3_json  {"name": ..., "parameters": {...}}, after <|python_tag|> or alone (Llama 3.1-3.3)
#   generic      the template has no tool syntax: the frontend's own JSON format (frontend/tools.py)
TOOL_FORMATS = ("generic", "hermes", "llama3_json")


def tool_format_of(source: str | None) -> str:
    """The tool-call format a chat template teaches its model; "generic" when it renders no `tools` or writes
    them in a syntax this server does not read back."""
    if not source or "tools" not in source:
        return "generic"
    if "<tool_call>" in source:
        return "hermes"
    if "<|python_tag|>" in source or "<|eom_id|>" in source:
        return "llama3_json"
    return "generic"


class TemplateError(ValueError):
    """A chat template that cannot be compiled or rendered."""


def _raise_exception(message):
    raise TemplateError(message)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(format_string):
    return datetime.datetime.now().strftime(format_string)


def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = _tojson
    env.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now)
    return env


class ChatTemplate:
    def __init__(self, source: str, special_tokens: dict[str, str] | None = None):
        try:
            self.template = _environment().from_string(source)
        except jinja2.TemplateError as exc:
            raise TemplateError(f"the chat template does not compile: {exc}") from exc
        self.source = source
        self.special_tokens = dict(special_tokens or {})

    @classmethod
    def named(cls, name: str, special_tokens: dict[str, str] | None = None) -> "ChatTemplate":
        if name not in NAMED_TEMPLATES:
            raise TemplateError(f"chat template must be one of {sorted(NAMED_TEMPLATES)}, got {name!r}")
        return cls(NAMED_TEMPLATES[name], special_tokens)

    def render(self, messages: list[dict], add_generation_prompt: bool = True, tools: list[dict] | None = None) -> str:
        """`tools`: OpenAI's function tools ({"type": "function", "function": {...}}), given to the template as
        transformers' apply_chat_template(tools=...) gives them; templates that know no tools ignore them."""
        extra = {"tools": tools} if tools else {}
        try:
            return self.template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                        **self.special_tokens, **extra)
        except TemplateError as exc:  # the template's own raise_exception: it refuses these messages
            raise ParameterError(f"'messages' refused by the model's chat template: {exc}") from None
        except jinja2.TemplateError as exc:
            raise ParameterError(f"'messages' could not be rendered by the chat template: {exc}") from None


def validate_messages(value, max_messages: int = LIMITS.max_messages) -> list[dict]:
    """A chat request's `messages`: a JSON list (text, or an already parsed list) of {"role", "content"} objects.
    Content is a string, or OpenAI's list of parts of which the text parts are joined. Errors name the field.
    (The size of the JSON text is the caller's to check, before it is parsed: params.RequestLimits.)"""
    if isinstance(value, (bytes, str)):
        try:
            value = json.loads(value)
        except (ValueError, UnicodeDecodeError) as exc:
            raise ParameterError(f"'messages' must be a JSON list of {{\"role\", \"content\"}} objects: {exc}") \
                from None
        except RecursionError:  # Python's json parses recursively
            raise ParameterError(f"'messages' must not nest lists and objects more than {MAX_JSON_DEPTH} deep") \
                from None
    if not isinstance(value, list) or not value:
        raise ParameterError("'messages' must be a non-empty list of {\"role\", \"content\"} objects")
    if len(value) > max_messages:
        raise ParameterError(f"'messages' may hold at most {max_messages} messages, got {len(value)}")
    # The fields beside role and content go to the template as they are (name, tool_calls, ...): nothing that a
    # recursive walk (json.dumps on the way to the tokenizer step, the template) could choke on.
    if json_depth_exceeds(value, MAX_JSON_DEPTH):
        raise ParameterError(f"'messages' must not nest lists and objects more than {MAX_JSON_DEPTH} deep")
    messages = []
    for i, message in enumerate(value):
        if not isinstance(message, dict):
            raise ParameterError(f"'messages[{i}]' must be an object with 'role' and 'content', got "
                                 f"{type(message).__name__}")
        role = message.get("role")
        if not isinstance(role, str) or role not in ROLES:
            raise ParameterError(f"'messages[{i}].role' must be one of {list(ROLES)}, got {role!r:.80}")
        if "content" not in message or message["content"] is None:
            raise ParameterError(f"'messages[{i}].content' is required")
        content = message["content"]
        if isinstance(content, list):
            parts = []
            for j, part in enumerate(content):
                if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise ParameterError(f"'messages[{i}].content[{j}]' must be a text part "
                                         "{\"type\": \"text\", \"text\": ...}")
                parts.append(part["text"])
            content = "".join(parts)
        if not isinstance(content, str):
            raise ParameterError(f"'messages[{i}].content' must be a string, got {type(content).__name__}")
        messages.append({**{k: v for k, v in message.items() if k not in ("role", "content")},
                         "role": role, "content": content})
    try:  # JSON's "\\ud800" escapes give Python lone surrogates, which no tokenizer can take
        json.dumps(messages, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ParameterError(f"'messages' is not valid UTF-8 text (a lone surrogate: {exc.object[exc.start]!r})") \
            from None
    return messages
