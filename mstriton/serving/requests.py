"""Client request -> validated GenerationParams, independent of Triton.

Inputs are read by name through a `get(name)` callable returning a numpy array or None, so this module is
tested without a server. The names are tensorrtllm_backend's; aliases cover its older names and what MindSpore
Serving and TGI users send. Request parameters (HTTP generate's "parameters" object, KServe request
parameters) are read as well; an input tensor wins over a parameter of the same name.

Sizes are checked first (params.RequestLimits): a prompt, a chat or a list of words above its limit is refused
from its length in bytes, before it is decoded, parsed or sent on, so an oversized request costs no more than
its arrival.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Callable

import numpy as np

from ..params import (LIMITS, SETTINGS, GenerationParams, ParameterError, RequestLimits, check_text_size,
                      check_words)
from ..tokenizer import validate_messages

# input name -> (GenerationParams field, kind): every setting of params.PARAMETERS under its name and its aliases
# (the name first: it wins over an alias sent beside it)
INPUTS = {name: (p.name, p.kind) for p in SETTINGS for name in (p.name, *p.aliases)}
# Inputs whose meaning is the negation of a field.
NEGATED = {name: p.name for p in SETTINGS for name in p.negated}
# stop_words and bad_words: lists of words, read (and their sizes checked) before anything else
WORD_INPUTS = tuple(p.name for p in SETTINGS if p.kind is list and p.item_kind is str)
# lists of token ids (stop_token_ids)
ID_INPUTS = tuple(p.name for p in SETTINGS if p.kind is list and p.item_kind is int)
MAX_IDS = 1024  # the most items an id list is read with (its own limit, checked by validate, is lower)


@dataclasses.dataclass
class ParsedRequest:
    text: str                          # the prompt; "" when the request is a chat (messages)
    params: GenerationParams
    stop: bool = False
    messages: list[dict] | None = None  # a chat request: rendered by the tokenizer step's chat template


def _scalar(name: str, array: np.ndarray):
    flat = np.asarray(array).reshape(-1)
    if flat.size != 1:
        raise ParameterError(f"'{name}' must hold one value, got shape {list(np.shape(array))}")
    return flat[0]


def _as_text(name: str, value) -> str:
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ParameterError(f"'{name}' is not valid UTF-8 text (byte {exc.start})") from None
    if isinstance(value, str):
        return value
    raise ParameterError(f"'{name}' must be a string (BYTES), got {type(value).__name__}")


def _words(name: str, value, limits: RequestLimits) -> list[str]:
    """stop_words / bad_words: a BYTES tensor (or a parameter) of words, each item one word or several joined by
    commas. Counted and measured before anything is decoded."""
    values = value if isinstance(value, (list, tuple, np.ndarray)) else [value]
    items = np.asarray(values, dtype=object).reshape(-1)
    if items.size > limits.max_words:
        raise ParameterError(f"'{name}' may hold at most {limits.max_words} words, got {items.size}")
    words = []
    for item in items:
        if isinstance(item, (bytes, str)):
            # the most an item of at most max_words words, joined by commas, may take; each word is checked below
            check_text_size(name, item, limits.max_words * (limits.max_word_bytes + 1))
            words += [w for w in _as_text(name, item).split(",") if w]
    check_words(name, words, limits.max_words, limits.max_word_bytes)
    return words


def _ids(name: str, value) -> list[int]:
    """A list of token ids: an INT32 tensor, or a parameter's list (or one id)."""
    items = np.asarray(value if isinstance(value, (list, tuple, np.ndarray)) else [value], dtype=object).reshape(-1)
    if items.size > MAX_IDS:
        raise ParameterError(f"'{name}' may hold at most {MAX_IDS} ids, got {items.size}")
    return [_convert(f"{name}[{i}]", int, item) for i, item in enumerate(items)]


def _convert(name: str, kind, value):
    if isinstance(value, np.ndarray):
        value = _scalar(name, value)
    if kind is str:  # a JSON text (structured_outputs, logit_bias): its content is checked by validate
        if isinstance(value, (dict, list)):  # an HTTP generate / KServe parameter given as JSON itself
            return json.dumps(value)
        return _as_text(name, value)
    if isinstance(value, (bytes, str)):
        raise ParameterError(f"'{name}' must be a {kind.__name__}, got text {value!r:.80}")
    if kind is bool:
        if not isinstance(value, (bool, np.bool_, int, np.integer)) or value not in (0, 1):
            raise ParameterError(f"'{name}' must be a boolean, got {value!r}")
        return bool(value)
    if kind is int:
        if isinstance(value, (bool, np.bool_)) or not float(value).is_integer():
            raise ParameterError(f"'{name}' must be an integer, got {value!r}")
        return int(value)
    return float(value)


def _text_value(name: str, value, limits: RequestLimits):
    """A prompt-sized text input's value (bytes or str), its size checked before anything else reads it."""
    if isinstance(value, np.ndarray):
        value = _scalar(name, value)
    if isinstance(value, (bytes, str)):
        check_text_size(name, value, limits.max_prompt_bytes)
    return value


def parse_request(get: Callable[[str], np.ndarray | None], parameters: dict | None = None,
                  limits: RequestLimits = LIMITS) -> ParsedRequest:
    """Read and validate types and sizes; ranges are checked by GenerationParams.validate once the prompt is
    tokenized."""
    parameters = dict(parameters or {})
    text_array, messages_array = get("text_input"), get("messages")
    # sizes first: the prompt, the chat, the words
    text_value = _text_value("text_input", text_array if text_array is not None else
                             parameters.get("text_input") or parameters.get("inputs"), limits)
    messages_value = _text_value("messages", messages_array if messages_array is not None else
                                 parameters.get("messages"), limits)

    def given(name: str):
        """An input's value: its tensor, else the request parameter of that name (None: neither)."""
        array = get(name)
        return array if array is not None else parameters.get(name)

    lists = {}  # stop_words, bad_words (measured before they are decoded), stop_token_ids
    for name in WORD_INPUTS + ID_INPUTS:
        value = given(name)
        if value is not None:
            lists[name] = _words(name, value, limits) if name in WORD_INPUTS else _ids(name, value)
    stop_input = get("stop")
    stop = bool(_convert("stop", bool, stop_input)) if stop_input is not None else bool(parameters.get("stop"))
    messages = validate_messages(messages_value, limits.max_messages) if messages_value is not None else None
    if text_value is None and messages is None and not stop:
        raise ParameterError("'text_input' is required (a BYTES tensor holding the prompt), or 'messages' "
                             "(a JSON list of {\"role\", \"content\"} objects) for a chat")
    text = _as_text("text_input", text_value or "")
    if messages is not None and text:
        raise ParameterError("send either 'text_input' or 'messages', not both")
    if messages is None and not text.strip() and not stop:
        raise ParameterError("'text_input' must not be empty")
    fields = dict(lists)  # the lists' inputs are the fields' own names
    for name, (field, kind) in INPUTS.items():
        if kind is list:
            continue  # read above
        value = given(name)
        if value is not None and field not in fields:
            if kind is str:  # a JSON text: measured before it is decoded
                value = _text_value(name, value, limits)
            fields[field] = _convert(name, kind, value)
    for name, field in NEGATED.items():
        value = given(name)
        if value is not None:
            fields[field] = not _convert(name, bool, value)
    return ParsedRequest(text=text, params=GenerationParams(**fields), stop=stop, messages=messages)
