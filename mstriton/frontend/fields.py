"""Reading a JSON request body field by field: each value is checked for its type and range, and a wrong one is
refused with an ApiError naming the field as the client spelled it (`parameters.top_p`, `messages[1].role`)."""

from __future__ import annotations

import json
import math

from .errors import invalid


async def json_body(request) -> dict:
    """The request's body as a JSON object, or a 400 saying what is wrong with it."""
    raw = await request.body()
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise invalid("body", f"the request body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise invalid("body", f"the request body must be a JSON object, got {type(body).__name__}")
    return body


async def inputs_body(request, parameters: set[str]) -> tuple[str, "Fields", bool]:
    """The body MindSpore Serving and TGI share, {"inputs", "parameters", "stream"}: (the prompt, the
    parameters, whether the body asks to stream). Unknown fields and parameters are refused."""
    body = Fields(await json_body(request))
    body.refuse_unknown({"inputs", "parameters", "stream"})
    inputs = body.text("inputs")
    if not inputs:
        raise invalid("inputs", "'inputs' is required: the prompt, a non-empty string")
    p = body.obj("parameters")
    p.refuse_unknown(parameters)
    return inputs, p, bool(body.boolean("stream", False))


class Fields:
    """Typed access to a JSON object's fields; `prefix` is how error messages name the object."""

    def __init__(self, values: dict | None, prefix: str = ""):
        self.values, self.prefix = values or {}, prefix

    def name(self, key: str) -> str:
        return f"{self.prefix}{key}"

    def has(self, key: str) -> bool:
        return self.values.get(key) is not None

    def _fail(self, key: str, allowed: str):
        value = self.values.get(key)
        shown = repr(value) if len(repr(value)) <= 80 else repr(value)[:77] + "..."
        raise invalid(self.name(key), f"'{self.name(key)}' must be {allowed}, got {shown}")

    def number(self, key: str, default=None, *, low: float | None = None, high: float | None = None,
               integer: bool = False, low_open: bool = False):
        value = self.values.get(key)
        if value is None:
            return default
        kind = "an integer" if integer else "a number"
        span = _span(low, high, low_open)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            self._fail(key, kind + span)
        if integer and not float(value).is_integer():
            self._fail(key, kind + span)
        if (low is not None and (value < low or (low_open and value == low))) or (high is not None and value > high):
            self._fail(key, kind + span)
        return int(value) if integer else float(value)

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

    def texts(self, key: str, *, max_items: int) -> list[str]:
        """A string or a list of strings (OpenAI's and TGI's `stop`)."""
        value = self.values.get(key)
        if value is None:
            return []
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, list) or not all(isinstance(s, str) and s for s in items) \
                or len(items) > max_items:
            self._fail(key, f"a non-empty string or a list of at most {max_items} of them")
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
