"""Reading a JSON request body field by field: each value is checked for its type and range, and a wrong one is
refused with an ApiError naming the field as the client spelled it (`parameters.top_p`, `messages[1].role`).
Sizes are checked as the Triton doors check them (params.RequestLimits, the same functions): the body before it
is parsed, prompts and stop strings before they go anywhere."""

from __future__ import annotations

import json
import math
import reprlib

from ..params import (LIMITS, MAX_JSON_DEPTH, PARAMETERS, ParameterError, RequestLimits, check_text_size,
                      check_words, json_depth_exceeds)
from .errors import ApiError, invalid

# Values quoted in error messages: short, and never walked deeper than a few levels.
_SHOWN = reprlib.Repr()
_SHOWN.maxstring, _SHOWN.maxother, _SHOWN.maxlevel = 80, 80, 3


def limits(request) -> RequestLimits:
    return request.app.state.limits


def too_large(limit: int, size: int | None = None) -> ApiError:
    got = f", got {size} bytes" if size is not None else ""
    return ApiError(413, f"the request body must be at most {limit} bytes{got}", param="body",
                    kind="invalid_request_error", code="request_too_large")


def checked(param: str, check, *args) -> None:
    """One of params.py's checks (it raises ParameterError naming `param`), as a 400 naming `param`."""
    try:
        check(param, *args)
    except ParameterError as exc:
        raise invalid(param, str(exc)) from None


async def json_body(request) -> dict:
    """The request's body as a JSON object, or a 400 saying what is wrong with it. A body larger than the limit
    gets 413 from its Content-Length before any of it is read, or, sent without one, as soon as more than the
    limit has arrived: an oversized body is never held whole."""
    limit = limits(request).max_body_bytes
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_large(limit, int(declared))
    raw = bytearray()
    async for chunk in request.stream():
        raw += chunk
        if len(raw) > limit:
            raise too_large(limit)
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise invalid("body", f"the request body is not valid JSON: {exc}") from None
    except RecursionError:  # Python's json parses recursively: a body of ten thousand '[' ends here
        raise invalid("body", f"the request body must not nest lists and objects more than {MAX_JSON_DEPTH} "
                              "deep") from None
    if not isinstance(body, dict):
        raise invalid("body", f"the request body must be a JSON object, got {type(body).__name__}")
    if json_depth_exceeds(body, MAX_JSON_DEPTH):
        raise invalid("body", f"the request body must not nest lists and objects more than {MAX_JSON_DEPTH} deep")
    return body


def check_prompt(request, param: str, text: str) -> str:
    """A prompt text within the prompt limit (as text_input's at the Triton doors), else a 400 naming `param`."""
    checked(param, check_text_size, text, limits(request).max_prompt_bytes)
    return text


async def inputs_body(request, parameters: set[str]) -> tuple[str, "Fields", bool]:
    """The body MindSpore Serving and TGI share, {"inputs", "parameters", "stream"}: (the prompt, the
    parameters, whether the body asks to stream). Unknown fields and parameters are refused."""
    body = Fields(await json_body(request))
    body.refuse_unknown({"inputs", "parameters", "stream"})
    inputs = body.text("inputs")
    if not inputs:
        raise invalid("inputs", "'inputs' is required: the prompt, a non-empty string")
    check_prompt(request, "inputs", inputs)
    p = body.obj("parameters")
    p.refuse_unknown(parameters)
    return inputs, p, bool(body.boolean("stream", False))


def door_settings(fields: "Fields", door: str) -> dict:
    """The settings a door reads from its body as params.PARAMETERS maps them (each parameter's DoorField for
    `door`): Triton input -> value, read by the input's type within the door's bounds, under the client's field
    name (which an error names). Fields the client left out get the door's default, or are left out."""
    settings = {}
    for p in PARAMETERS:
        field = p.doors.get(door)
        if field is None:
            continue
        key = field.name or p.name
        if p.kind is bool:
            value = fields.boolean(key, field.default)
        elif p.kind is int:
            value = fields.integer(key, field.default, low=field.low, high=field.high)
        else:
            value = fields.number(key, field.default, low=field.low, high=field.high, low_open=field.low_open)
        if value is not None:
            settings[p.name] = value
    return settings


class Fields:
    """Typed access to a JSON object's fields; `prefix` is how error messages name the object."""

    def __init__(self, values: dict | None, prefix: str = ""):
        self.values, self.prefix = values or {}, prefix

    def name(self, key: str) -> str:
        return f"{self.prefix}{key}"

    def has(self, key: str) -> bool:
        return self.values.get(key) is not None

    def _fail(self, key: str, allowed: str):
        shown = _SHOWN.repr(self.values.get(key))
        raise invalid(self.name(key), f"'{self.name(key)}' must be {allowed}, got {shown}")

    def number(self, key: str, default=None, *, low: float | None = None, high: float | None = None,
               integer: bool = False, low_open: bool = False):
        value = self.values.get(key)
        if value is None:
            return default
        kind = "an integer" if integer else "a number"
        span = _span(low, high, low_open)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            self._fail(key, kind + span)
        # Python's JSON reads integers of any size and NaN / Infinity: a float() of 10**400 overflows, and an
        # integer is compared as it is
        if isinstance(value, float) and (not math.isfinite(value) or (integer and not value.is_integer())):
            self._fail(key, kind + span)
        if (low is not None and (value < low or (low_open and value == low))) or (high is not None and value > high):
            self._fail(key, kind + span)
        if integer:
            return int(value)
        try:
            return float(value)
        except OverflowError:
            self._fail(key, kind + span)

    def integer(self, key: str, default=None, *, low: int | None = None, high: int | None = None):
        return self.number(key, default, low=low, high=high, integer=True)

    def boolean(self, key: str, default=None):
        value = self.values.get(key)
        if value is None:
            return default
        if not isinstance(value, bool):
            self._fail(key, "true or false")
        return value

    def text(self, key: str, default=None, *, choices: tuple[str, ...] | None = None):
        value = self.values.get(key)
        if value is None:
            return default
        if not isinstance(value, str) or (choices and value not in choices):
            self._fail(key, f"one of {', '.join(repr(c) for c in choices)}" if choices else "a string")
        return value

    def texts(self, key: str, *, max_items: int, max_item_bytes: int = LIMITS.max_word_bytes) -> list[str]:
        """A string or a list of strings (OpenAI's and TGI's `stop`), at most `max_items` of at most
        `max_item_bytes` bytes each (the Triton doors' limits on stop words, params.check_words)."""
        value = self.values.get(key)
        if value is None:
            return []
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, list) or not all(isinstance(s, str) and s for s in items):
            self._fail(key, "a non-empty string or a list of them")
        checked(self.name(key), check_words, items, max_items, max_item_bytes)
        return items

    def obj(self, key: str) -> "Fields":
        value = self.values.get(key)
        if value is not None and not isinstance(value, dict):
            self._fail(key, "an object")
        return Fields(value, prefix=f"{self.name(key)}.")

    def refuse(self, key: str, reason: str, *, unless=lambda value: value is None) -> None:
        """Refuse a field we do not implement, unless its value asks for nothing (`unless`)."""
        if key in self.values and not unless(self.values[key]):
            raise invalid(self.name(key), f"'{self.name(key)}' is not supported by this server: {reason}")

    def refuse_unknown(self, known: set[str]) -> None:
        unknown = sorted(set(self.values) - known)
        if unknown:
            raise invalid(self.name(unknown[0]), f"unknown field '{self.name(unknown[0])}'; this server reads "
                                                 f"{', '.join(sorted(known))}")


def _span(low, high, low_open) -> str:
    if low is not None and high is not None:
        return f" in {'(' if low_open else '['}{low:g}, {high:g}]"
    if low is not None:
        return f" {'>' if low_open else '>='} {low:g}"
    if high is not None:
        return f" <= {high:g}"
    return ""
