"""Methods, as MindSpore Serving has them: the client names the model and the method, and the user writes the
pre- and post-processing around the generation.

A method is one Python file with two functions (the contract, docs/methods.md):

    def preprocess(request: dict) -> dict
        `request`: the client's fields by name (the inputs it sent, `text_input` as a str, `messages` as a list of
        {"role", "content"} dicts, numbers as numbers; its request parameters; the fields of the JSON object in
        `method_fields`). Returns the request to generate: `text_input` (a prompt) or `messages` (a chat), and any
        generation settings under the names of docs/inputs.md; other keys are ignored.
    def postprocess(text: str, request: dict) -> dict
        `text`: the whole generated text; `request`: the same fields preprocess was given. Returns the response's
        fields: a `text_output` (a str) replaces the text, and the whole dict goes back to the client as the JSON
        object `method_output`.

It is registered at conversion (`tools/convert.py --method NAME=FILE`), which checks it here (`load_method`) and
copies it into the repository as NAME_METHOD/1/method.py, beside the tokenizer files of the front model that
serves it (`NAME_METHOD`, and `NAME_METHOD_unary` for one response per request). The front model calls preprocess
before it sends the request into NAME_pipeline, and postprocess on the joined text before its last response: no
process of its own, nothing on the token path.

A user function that raises or returns the wrong thing fails that request only, with an error naming the method
and the function: a ValueError it raises (a request it refuses) is an invalid request (HTTP 400, INVALID_ARG),
anything else an internal error (HTTP 500). The functions run one call at a time in a thread of their own, beside
the front model's event loop, so a slow one never holds other requests' tokens back.
"""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import importlib.util
import inspect
import json
import re
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import numpy as np

from ..params import LIMITS, ParameterError, RequestLimits, check_text_size
from ..tokenizer import validate_messages
from .requests import ParsedRequest, _as_text, _convert, parse_request

# The file a method is copied to, in its front model's version folder.
METHOD_FILE = "method.py"
# The front model's extra input (a JSON object of the client's own fields) and extra output (postprocess's dict).
FIELDS_INPUT = "method_fields"
OUTPUT = "method_output"
FUNCTIONS = ("preprocess", "postprocess")
_NAME = re.compile(r"[A-Za-z0-9_]+")
# Names a method cannot take: NAME_METHOD would be one of the LLM's own models (now or as earlier versions
# wrote them), or NAME_METHOD_unary another method's.
RESERVED = ("unary", "pipeline", "tokenizer", "decode", "detokenizer", "prefill", "sampler")


class MethodError(Exception):
    """A method that cannot be loaded, or whose function failed for a request: the message names the method and
    the function."""


class MethodRefused(MethodError, ParameterError):
    """The request as the method made it is refused (a ValueError the function raised, or settings out of range):
    an invalid request (INVALID_ARG, HTTP 400)."""


class MethodFailed(MethodError, RuntimeError):
    """The method's function failed (it raised, or returned the wrong type): an internal error (HTTP 500)."""


class MethodFileError(MethodError, ValueError):
    """A method file that cannot be served (at conversion: the error names the --method flag)."""


def check_method_name(name: str) -> None:
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise MethodFileError(f"a method's name must be letters, digits or '_', got {name!r}")
    if name in RESERVED or name.endswith("_unary"):
        raise MethodFileError(f"a method cannot be named {name!r}: NAME_{name} would be the name of one of the "
                              f"LLM's own models or of a method's unary entry (reserved: {', '.join(RESERVED)}, "
                              f"and names ending in _unary)")


def parse_method_flag(flag: str) -> tuple[str, Path]:
    """`--method NAME=FILE` -> (NAME, FILE), the name checked."""
    name, sep, path = flag.partition("=")
    if not sep or not path:
        raise MethodFileError(f"--method {flag}: must be NAME=FILE (a Python file with preprocess and "
                              f"postprocess), e.g. summarize=client_examples/methods/summarize.py")
    try:
        check_method_name(name)
    except MethodFileError as exc:
        raise MethodFileError(f"--method {flag}: {exc}") from None
    return name, Path(path)


@dataclasses.dataclass
class Method:
    name: str
    preprocess: Callable[[dict], dict]
    postprocess: Callable[[str, dict], dict]
    path: Path


def load_method(path: str | Path, name: str) -> Method:
    """The method `name` from its Python file: imported (its top-level code runs), its two functions checked to
    take the arguments they are given. MethodFileError says what is wrong."""
    check_method_name(name)
    path = Path(path)
    if not path.is_file():
        raise MethodFileError(f"method {name}: {path} is not a file")
    if path.suffix != ".py":
        raise MethodFileError(f"method {name}: {path} must be a Python file (.py)")
    module_name = f"mstriton_method_{name}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except BaseException as exc:  # noqa: BLE001 - a user's file: SyntaxError, ImportError, SystemExit, ...
        if isinstance(exc, KeyboardInterrupt):
            raise
        raise MethodFileError(f"method {name}: importing {path} failed: {type(exc).__name__}: {exc}") from None
    arguments = {"preprocess": ({},), "postprocess": ("", {})}
    functions = {}
    for function, args in arguments.items():
        value = getattr(module, function, None)
        if not callable(value):
            raise MethodFileError(f"method {name}: {path} must define {function}() (a method file has "
                                  f"preprocess(request) and postprocess(text, request)), "
                                  f"{'found ' + type(value).__name__ if value is not None else 'found none'}")
        if inspect.iscoroutinefunction(value):
            raise MethodFileError(f"method {name}: {function} must be a plain function, not async")
        try:
            inspect.signature(value).bind(*args)
        except TypeError as exc:
            expected = "preprocess(request)" if function == "preprocess" else "postprocess(text, request)"
            raise MethodFileError(f"method {name}: {function} must take the arguments of {expected}: {exc}") from None
        except ValueError:  # no signature to read (a builtin): called as it is
            pass
        functions[function] = value
    sys.modules.pop(module_name, None)  # nothing else imports it
    return Method(name=name, preprocess=functions["preprocess"], postprocess=functions["postprocess"], path=path)


# ---- a request's fields, as preprocess and postprocess get them ---------------------------------------------------

def _plain(name: str, array, limits: RequestLimits):
    """An input tensor's value as plain Python: one item as it is, several as a list; text decoded."""
    flat = np.asarray(array).reshape(-1)
    if flat.dtype == np.object_ or flat.dtype.kind in "SU":
        # measured in all before any item is decoded
        total = sum(len(item) for item in flat if isinstance(item, (bytes, str)))
        if total > limits.max_prompt_bytes:
            raise ParameterError(f"'{name}' must be at most {limits.max_prompt_bytes} bytes of UTF-8 text, got "
                                 f"{total}")
        items = [_as_text(name, item) if isinstance(item, (bytes, str)) else str(item) for item in flat]
    else:
        items = flat.tolist()
    return items[0] if len(items) == 1 else items


def _checked_parameter(name: str, value, limits: RequestLimits):
    if isinstance(value, (bytes, str)):
        check_text_size(name, value, limits.max_prompt_bytes)
        return _as_text(name, value)
    return value


def request_fields(get: Callable[[str], np.ndarray | None], input_names: list[str], parameters: dict | None = None,
                   limits: RequestLimits = LIMITS) -> dict:
    """The request as a method sees it: the client's request parameters, then the fields of the JSON object in
    `method_fields`, then its input tensors (each later one wins over an earlier one of the same name), as plain
    Python values. `messages` is given as a list of {"role", "content"} dicts (checked as for any chat). Sizes are
    checked before anything is decoded."""
    fields = {name: _checked_parameter(name, value, limits) for name, value in (parameters or {}).items()}
    custom = get(FIELDS_INPUT)
    if custom is None and isinstance(fields.get(FIELDS_INPUT), str):
        custom = fields[FIELDS_INPUT]
    fields.pop(FIELDS_INPUT, None)
    if custom is not None:
        text = _plain(FIELDS_INPUT, custom, limits) if isinstance(custom, np.ndarray) else custom
        try:
            values = json.loads(text)
        except (TypeError, ValueError, RecursionError) as exc:
            raise ParameterError(f"'{FIELDS_INPUT}' must be a JSON object of the method's fields: {exc}") from None
        if not isinstance(values, dict):
            raise ParameterError(f"'{FIELDS_INPUT}' must be a JSON object of the method's fields, got "
                                 f"{type(values).__name__}")
        fields.update(values)
    for name in input_names:
        if name == FIELDS_INPUT:
            continue
        array = get(name)
        if array is not None:
            fields[name] = _plain(name, array, limits)
    if fields.get("messages") is not None:
        messages = fields["messages"]
        if isinstance(messages, str):
            check_text_size("messages", messages, limits.max_prompt_bytes)
        fields["messages"] = validate_messages(messages, limits.max_messages)
    return fields


def wants_stop(fields: dict) -> bool:
    """tensorrtllm_backend's explicit stop (`stop` true): it stops a running request, and is no method's business."""
    value = fields.get("stop")
    return value is not None and bool(_convert("stop", bool, value))


# ---- calling the user's functions ---------------------------------------------------------------------------------

def _call(method: Method, function: str, *args):
    try:
        return getattr(method, function)(*args)
    except Exception as exc:  # noqa: BLE001 - the user's code: its error is this request's
        kind = MethodRefused if isinstance(exc, ValueError) else MethodFailed
        raise kind(f"method {method.name}: {function} raised {type(exc).__name__}: {exc}") from exc
    except SystemExit as exc:  # a user's sys.exit() must not take the model with it
        raise MethodFailed(f"method {method.name}: {function} raised SystemExit({exc.code!r})") from None


def preprocessed(method: Method, fields: dict, limits: RequestLimits = LIMITS) -> ParsedRequest:
    """preprocess(fields) as the request to generate: checked as any client's request is. The transport fields
    (`stream`, `stop`) stay the client's, whatever preprocess returns."""
    result = _call(method, "preprocess", copy.deepcopy(fields))  # a copy: postprocess gets the client's fields
    if not isinstance(result, dict):
        raise MethodFailed(f"method {method.name}: preprocess returned {type(result).__name__}, not a dict (the "
                           f"request to generate: text_input or messages, and settings)")
    request = {k: v for k, v in result.items() if k not in ("stream", "stop")}
    if "stream" in fields:
        request["stream"] = fields["stream"]
    try:
        parsed = parse_request(lambda _: None, request, limits)
    except ParameterError as exc:
        raise MethodRefused(f"method {method.name}: preprocess returned a request that is refused: {exc}") from None
    except (TypeError, AttributeError) as exc:  # a value of a type no field takes (a dict for a number, ...)
        raise MethodRefused(f"method {method.name}: preprocess returned a request that is refused: "
                            f"{type(exc).__name__}: {exc}") from None
    return parsed


def postprocessed(method: Method, text: str, fields: dict) -> tuple[str | None, str]:
    """postprocess(text, fields) -> (its text_output or None, its whole dict as JSON text)."""
    result = _call(method, "postprocess", text, fields)
    if not isinstance(result, dict):
        raise MethodFailed(f"method {method.name}: postprocess returned {type(result).__name__}, not a dict (the "
                           f"response's fields, e.g. {{\"text_output\": ...}})")
    text_output = result.get("text_output")
    if text_output is not None and not isinstance(text_output, str):
        raise MethodFailed(f"method {method.name}: postprocess returned a text_output of type "
                           f"{type(text_output).__name__}, not str")
    try:
        encoded = json.dumps(result, ensure_ascii=False)
    except (TypeError, ValueError, RecursionError) as exc:
        raise MethodFailed(f"method {method.name}: postprocess returned a dict that is not JSON: {exc}") from None
    return text_output, encoded


class MethodCalls:
    """A method's functions as a model calls them: from the event loop, each call in the method's own thread (one
    call at a time), its errors MethodError. `error`: why the method could not be loaded (every request gets it)."""

    def __init__(self, method: Method | None, error: str | None = None, limits: RequestLimits = LIMITS):
        self.method, self.error, self.limits = method, error, limits
        self.name = method.name if method else None
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mstriton-method")

    @classmethod
    def load(cls, path: Path, name: str) -> "MethodCalls":
        """The method at `path`; one that cannot be loaded gives every request the reason, and the model serves on."""
        try:
            return cls(load_method(path, name))
        except MethodError as exc:
            return cls(None, error=str(exc))

    def _check(self) -> Method:
        if self.method is None:
            raise MethodFailed(self.error or "the method is not loaded")
        return self.method

    async def preprocess(self, fields: dict) -> ParsedRequest:
        method = self._check()
        return await asyncio.get_running_loop().run_in_executor(self._thread, preprocessed, method, fields,
                                                                self.limits)

    async def postprocess(self, text: str, fields: dict) -> tuple[str | None, str]:
        method = self._check()
        return await asyncio.get_running_loop().run_in_executor(self._thread, postprocessed, method, text, fields)

    def close(self) -> None:
        self._thread.shutdown(wait=False, cancel_futures=True)
