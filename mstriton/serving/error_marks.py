"""Marks at the start of error messages that say what kind of failure an error is, where its code is lost.

tritonserver 2.51 loses an error's code on the way out of an ensemble (INVALID_ARG from a step arrives as
INTERNAL) and its gRPC stream carries only the message. The models put these marks in the message; the front and
unary models give the code back by them, and the HTTP frontend chooses its status by them.
"""

INVALID_REQUEST = "invalid request: "   # the client's request is wrong: INVALID_ARG, HTTP 400
SERVER_BUSY = "server busy: "           # every slot and queue place is taken: UNAVAILABLE, HTTP 503, retry later
INTERNAL_ERROR = "internal error: "     # a method's user function failed (serving/methods.py): INTERNAL, HTTP 500
