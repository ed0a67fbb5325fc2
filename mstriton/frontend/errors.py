"""Errors every door answers with: a status, a message, and the parameter it is about.

Triton's gRPC stream carries an error's message only, never its code; the models mark their messages
(serving/error_marks.py) and `from_triton` reads the kind back from the mark.
"""

from __future__ import annotations

import re

from ..serving.error_marks import INVALID_REQUEST, SERVER_BUSY

# Seconds a client told to come back later (503) should wait.
RETRY_AFTER_SECONDS = 1
_QUOTED_NAME = re.compile(r"'([A-Za-z_][A-Za-z0-9_.]*)'")


class ApiError(Exception):
    """An error response: `status` (HTTP), `message`, the request field `param` it names, OpenAI's `kind`."""

    def __init__(self, status: int, message: str, *, param: str | None = None, kind: str | None = None,
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.kind = kind or {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
                             413: "invalid_request_error", 503: "server_busy"}.get(status, "server_error")
        self.headers = headers or {}


def invalid(param: str, message: str) -> ApiError:
    return ApiError(400, message, param=param)


def busy(message: str) -> ApiError:
    return ApiError(503, message, headers={"Retry-After": str(RETRY_AFTER_SECONDS)})


def from_triton(message: str, names: dict[str, str] | None = None) -> ApiError:
    """A failed generation's message -> the ApiError to answer with. `names`: the server's parameter names ->
    what this client called them, so that the error names the field the client sent."""
    names = names or {}
    if INVALID_REQUEST in message:
        text = message[message.index(INVALID_REQUEST) + len(INVALID_REQUEST):]
        match = _QUOTED_NAME.search(text)
        param = match.group(1) if match else None
        if param in names:
            text = text.replace(f"'{param}'", f"'{names[param]}'", 1)
            param = names[param]
        return invalid(param, text)
    if "unknown model" in message.lower():
        return ApiError(404, message, code="model_not_found")
    if SERVER_BUSY in message:
        return busy(message)
    # A model process that is down or restarting, a server shutting down: come back later.
    if any(s in message for s in ("not healthy", "shutting down", "UNAVAILABLE", "unavailable")):
        return busy(message)
    return ApiError(500, message)
