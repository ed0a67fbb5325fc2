"""The unary model (NAME_unary: KServe v2 /infer, HTTP /generate, gRPC ModelInfer) against the real tritonserver
2.51, on the tiny streaming test model:

- a gRPC ModelInfer that its client cancels frees its decode slot at once: the running gauge
  (mstriton_requests_running) is at zero within FREED_WITHIN, and the front model counts the generation cancelled;
- an HTTP client (/generate, /infer) that hangs up gives the model no sign in tritonserver 2.51 (it stops reading
  the connection while the request runs, so it finds it closed only when it writes the answer): the generation
  runs to its end. These tests say so, and fail the day a tritonserver passes the hang-up on;
- unary requests do not wait for each other: a short one answers while a long one generates (tritonserver gives a
  non-decoupled instance its next batch only when execute() returns, so execute() must not wait for generations).
"""

from __future__ import annotations

import json
import socket
import threading
import time
import urllib.request

import numpy as np
import pytest

from conftest import save_streaming_checkpoint
from mstriton.server_process import metric_value, running_server

MODEL = "tiny"
PROMPT = "The quick brown fox"
LONG = 200  # tokens of the generation the client leaves (max_seq_len 256 leaves 236 after the prompt): seconds here
FREED_WITHIN = 2.0  # seconds from the cancel to the running gauge at zero (measured 67-80 ms on a busy machine)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from mstriton.convert import convert

    root = tmp_path_factory.mktemp("unary")
    convert(save_streaming_checkpoint(root), MODEL, root / "repo", max_batch_size=4, max_seq_len=256,
            progress=lambda _: None)
    with running_server(root / "repo", root / "server.log") as triton:
        yield triton


def metric(server, name: str, **labels) -> float:
    return metric_value(server.metrics(), name, **labels)


def running(server) -> float:
    return metric(server, "mstriton_requests_running")


def wait_for(condition, timeout: float, what: str, server) -> float:
    """Polls `condition` every 10 ms; the seconds it took. Fails with the server log's tail after `timeout`."""
    started = time.monotonic()
    while not condition():
        assert time.monotonic() - started < timeout, f"{what}: not within {timeout} s\n{server.tail()}"
        time.sleep(0.01)
    return time.monotonic() - started


def leave_mid_generation(server, send, leave) -> tuple[float, float, bool]:
    """Starts a LONG generation with `send` and `leave`s as soon as it decodes. Returns the seconds from then until
    the running gauge is at zero (at most 60), the tokens it generated and whether it was counted cancelled."""
    wait_for(lambda: running(server) == 0, 30, "an idle server", server)
    cancelled = metric(server, "mstriton_requests_finished_total", model=MODEL, finish_reason="cancelled")
    finished = metric(server, "mstriton_requests_finished_total", model=MODEL)
    generated = metric(server, "mstriton_generation_tokens_total", model=MODEL)
    handle = send()
    wait_for(lambda: running(server) >= 1, 60, "the generation decoding", server)
    leave(handle)
    left = time.monotonic()
    assert running(server) >= 1, "the generation ended before its client left: make LONG longer"
    freed = wait_for(lambda: running(server) == 0, 60, "the generation's end", server)
    wait_for(lambda: metric(server, "mstriton_requests_finished_total", model=MODEL) > finished, 10,
             "the generation counted", server)
    made = metric(server, "mstriton_generation_tokens_total", model=MODEL) - generated
    was_cancelled = metric(server, "mstriton_requests_finished_total", model=MODEL,
                           finish_reason="cancelled") > cancelled
    print(f"slot freed {(time.monotonic() - left) * 1e3:.0f} ms after the client left; {made:.0f} of {LONG} tokens, "
          f"{'cancelled' if was_cancelled else 'not cancelled'}")
    return freed, made, was_cancelled


def http_request(server, path: str, body: dict) -> socket.socket:
    """A POST sent on a raw socket, its answer never read."""
    sock = socket.create_connection(("127.0.0.1", server.http_port), timeout=10)
    data = json.dumps(body).encode()
    sock.sendall(f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                 f"Content-Length: {len(data)}\r\n\r\n".encode() + data)
    return sock


def long_body() -> dict:
    return {"text_input": PROMPT, "max_tokens": LONG, "min_tokens": LONG}


def kserve_body() -> dict:
    inputs = [{"name": "text_input", "datatype": "BYTES", "shape": [1, 1], "data": [PROMPT]}]
    inputs += [{"name": name, "datatype": "INT32", "shape": [1, 1], "data": [LONG]}
               for name in ("max_tokens", "min_tokens")]
    return {"inputs": inputs}


def test_grpc_model_infer_cancelled_frees_its_slot(server):
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(server.grpc)
    inputs = []
    for name, value, datatype in (("text_input", np.array([[PROMPT.encode()]], np.object_), "BYTES"),
                                  ("max_tokens", np.array([[LONG]], np.int32), "INT32"),
                                  ("min_tokens", np.array([[LONG]], np.int32), "INT32")):
        tensor = grpcclient.InferInput(name, [1, 1], datatype)
        tensor.set_data_from_numpy(value)
        inputs.append(tensor)
    try:
        freed, made, cancelled = leave_mid_generation(
            server, lambda: client.async_infer(f"{MODEL}_unary", inputs, callback=lambda result, error: None),
            lambda call: call.cancel())
    finally:
        client.close()
    assert cancelled and made < LONG and freed < FREED_WITHIN, (freed, made, cancelled)


@pytest.mark.parametrize("path, body", [("generate", long_body), ("infer", kserve_body)])
def test_an_http_client_hanging_up_gives_the_unary_model_no_sign(server, path, body):
    """tritonserver 2.51's limit, not ours: the generation of a client gone runs to its end (through the frontend,
    the public door, a hang-up cancels)."""
    freed, made, cancelled = leave_mid_generation(
        server, lambda: http_request(server, f"/v2/models/{MODEL}_unary/{path}", body()), lambda sock: sock.close())
    assert not cancelled and made == LONG, "tritonserver passed the hang-up on: test_unary.py and the docs can say so"


def test_a_short_unary_request_does_not_wait_for_a_long_one(server):
    """Both through /generate: the short answer comes while the long generation still runs."""
    done: dict[str, float] = {}

    def generate(name: str, body: dict) -> None:
        request = urllib.request.Request(f"http://{server.http}/v2/models/{MODEL}_unary/generate",
                                         json.dumps(body).encode(), {"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=120) as response:
            assert response.status == 200
            json.loads(response.read())
        done[name] = time.monotonic()

    wait_for(lambda: running(server) == 0, 30, "an idle server", server)
    long = threading.Thread(target=generate, args=("long", long_body()))
    long.start()
    wait_for(lambda: running(server) >= 1, 60, "the long generation decoding", server)
    short = threading.Thread(target=generate, args=("short", {"text_input": PROMPT, "max_tokens": 2}))
    short.start()
    short.join(120)
    long.join(120)
    assert done["short"] < done["long"], "the short request waited for the long one"


# ---- CancelWatch (serving/cancel_watch.py), without a server ----------------------------------------------------


def test_the_cancel_watch_asks_each_watched_request_until_it_cancels_or_is_forgotten():
    from mstriton.serving.cancel_watch import CancelWatch

    seen, asked, lock = [], {"a": 0, "b": 0}, threading.Lock()
    answers = {"a": False, "b": False}

    def ask_of(key):
        def is_cancelled():
            with lock:
                asked[key] += 1
            return answers[key]
        return is_cancelled

    watch = CancelWatch(0.01, seen.append)
    try:
        watch.watch("a", ask_of("a"))
        watch.watch("b", ask_of("b"))
        deadline = time.monotonic() + 5
        while min(asked.values()) < 3:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        answers["a"] = True
        while not seen:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert seen == ["a"] and watch.count() == 1  # a cancelled request is asked no more, and told once
        assert watch.forget("a") is True and watch.forget("b") is False
        with lock:
            after = dict(asked)
        time.sleep(0.1)
        assert asked == after and seen == ["a"]  # forgotten: never asked again
    finally:
        watch.close()


def test_forget_waits_for_an_ask_under_way_of_the_same_request():
    """The unary model asks a request's is_cancelled itself right after forget (to let finished streams go): the
    watch's own ask of it must be over by then, never two at once."""
    from mstriton.serving.cancel_watch import CancelWatch

    inside, release = threading.Event(), threading.Event()
    overlaps = []

    def slow_is_cancelled():
        inside.set()
        release.wait(5)
        overlaps.append(threading.current_thread().name)
        return False

    watch = CancelWatch(0.01, lambda key: None)
    try:
        watch.watch("a", slow_is_cancelled)
        assert inside.wait(5)
        forgotten = threading.Thread(target=watch.forget, args=("a",))
        forgotten.start()
        forgotten.join(0.2)
        assert forgotten.is_alive()  # waits for the ask under way
        release.set()
        forgotten.join(5)
        assert not forgotten.is_alive()
    finally:
        watch.close()
