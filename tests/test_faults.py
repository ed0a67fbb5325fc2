"""A model process that dies (issue 15): `python -m mstriton.serve` (tritonserver under mstriton.supervisor, the HTTP
frontend beside it) on a tiny converted model, with real clients. For each model process in turn (front, unary,
tokenizer, prefill, sampler, decode) and for tritonserver itself: a request in flight is killed with `kill -9` of that process; the
request must end with an error within seconds (never hang), readiness (tritonserver's and the frontend's) must turn
false and new requests get 503 or "connection refused" (never tritonserver's 400 "Stub process ... is not
healthy"), the server must be back within 60 s with the same greedy text as before, and the killed server's
shared memory must be gone from /dev/shm. Then SIGTERM stops it all with status 0, leaving no shared memory. And the
supervisor's crash-loop limit, against commands that fail at once."""

from __future__ import annotations

import http.client
import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from conftest import save_streaming_checkpoint
from mstriton import serve, supervisor
from mstriton.server_process import free_port, metric_value, terminate, wait_until_healthy

MODEL = "tiny"
KEY = "faults-admin-key"
PROMPT = "The quick brown fox"
LONG = 1000    # tokens of the stream that is cut: 2-3 s on an AVX-512 machine (200 took under 1 s there, too close to
               # the kill plus the supervisor's 0.5 s poll), far longer than the time to kill it
GREEDY = 24    # tokens of the greedy text compared before and after each fault
ERROR_WITHIN = 10  # seconds from the kill to the error of the request in flight
BACK_WITHIN = 60   # seconds from the kill to ready again
RESTART_TIMES: dict[str, tuple[float, ...]] = {}  # case -> seconds from the kill to: error, ready, frontend ready


# ---- the server ---------------------------------------------------------------------------------------


class Served:
    """`python -m mstriton.serve` with the frontend, on free ports, and what the tests read from it."""

    def __init__(self, repository: Path, log: Path):
        self.ports = {kind: free_port() for kind in ("http", "grpc", "metrics", "frontend")}
        self.log = log
        env = {**os.environ, serve.ADMIN_KEY_VARIABLE: KEY}  # keys never on a command line (serve refuses them)
        self.process = subprocess.Popen(
            [sys.executable, "-m", "mstriton.serve", "--model-repository", str(repository),
             *(f"--{kind}-port={port}" for kind, port in self.ports.items()),
             # every kill below is a restart within minutes: more than the default crash-loop limit (5 in 600 s)
             "--max-restarts", "20"],
            stdout=open(log, "wb"), stderr=subprocess.STDOUT, env=env, start_new_session=True)

    @property
    def ready_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['http']}/v2/health/ready"

    @property
    def health_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['frontend']}/health"

    @property
    def grpc(self) -> str:
        return f"127.0.0.1:{self.ports['grpc']}"

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def tail(self) -> str:
        return self.text()[-4000:]

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        for url in (self.ready_url, self.health_url):
            wait_until_healthy(self.process, url, "mstriton.serve", self.tail, max(1.0, deadline - time.monotonic()))

    def triton_pid(self, timeout: float = BACK_WITHIN) -> int:
        """tritonserver's pid; while the supervisor restarts it (a test before failed midway) there is none for a
        few seconds: waits for it rather than failing every test after that one."""
        deadline = time.monotonic() + timeout
        while not (pids := [p.pid for p in supervisor.processes()
                            if p.ppid == self.process.pid and p.argv and p.argv[0].endswith(b"/tritonserver")]):
            assert time.monotonic() < deadline and self.process.poll() is None, \
                f"no tritonserver under mstriton.serve:\n{self.tail()}"
            time.sleep(0.1)
        [pid] = pids
        return pid

    def model_pids(self) -> dict[str, int]:
        """model -> pid of its (one) model process."""
        return {model: pid for pid, model in supervisor.model_processes(self.triton_pid()).items()}

    def decode_running(self) -> float:
        """Requests generating in the decode batch: the mstriton_requests_running gauge on the metrics port."""
        url = f"http://127.0.0.1:{self.ports['metrics']}/metrics"
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                text = response.read().decode()
        except OSError:
            return 0.0
        return metric_value(text, "mstriton_requests_running")

    def shm_regions(self) -> set[Path]:
        """The shared-memory regions of the running tritonserver: the one each model process was given."""
        return {supervisor.SHM / p.argv[2].decode() for p in supervisor.processes()
                if p.ppid == self.triton_pid() and supervisor.model_of(p)}


def stop_everything(served: Served) -> None:
    """After a failed test: nothing of the server may outlive it (tritonserver has a session of its own)."""
    triton = [p for p in supervisor.processes() if p.ppid == served.process.pid and p.pid != served.process.pid]
    terminate(served.process, timeout=60)
    for p in triton:
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    from mstriton.convert import convert

    root = tmp_path_factory.mktemp("faults")
    # 2 slots: a gRPC stream and an SSE stream decode side by side; 1024 tokens: room for the long stream
    convert(save_streaming_checkpoint(root, max_position_embeddings=1024), MODEL, root / "repo", max_batch_size=2,
            max_seq_len=1024, progress=lambda _: None)
    server = Served(root / "repo", root / "serve.log")
    try:
        started = time.monotonic()
        server.wait_ready(300)
        print(f"mstriton.serve ready after {time.monotonic() - started:.1f} s")
        yield server
    finally:
        if server.process.poll() is None:
            stop_everything(server)
        print(server.tail())
        print("seconds from kill -9 to (the request's error, tritonserver ready, frontend /health 200):",
              {k: tuple(round(t, 1) for t in v) for k, v in RESTART_TIMES.items()})


@pytest.fixture(scope="module")
def greedy(served) -> str:
    """The greedy text before any fault."""
    stream = GrpcStream(served.grpc, GREEDY)
    assert stream.outcome(60) == "final", stream.error
    return stream.text


# ---- clients ------------------------------------------------------------------------------------------


def grpc_inputs(max_tokens: int):
    import tritonclient.grpc as grpcclient

    inputs = []
    for name, array, dtype in (("text_input", np.array([[PROMPT.encode()]], np.object_), "BYTES"),
                               ("max_tokens", np.array([[max_tokens]], np.int32), "INT32"),
                               # a random model may pick its end token at any time: never end early
                               ("min_tokens", np.array([[max_tokens]], np.int32), "INT32"),
                               ("stream", np.array([[True]]), "BOOL")):
        tensor = grpcclient.InferInput(name, list(array.shape), dtype)
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    return inputs


class GrpcStream:
    """A greedy gRPC stream to the front model (tritonclient), read by its callback thread."""

    def __init__(self, url: str, max_tokens: int):
        import tritonclient.grpc as grpcclient

        self.events: queue.Queue = queue.Queue()
        self.pieces: list[str] = []
        self.error = None
        self.first = threading.Event()
        self.client = grpcclient.InferenceServerClient(url)
        self.client.start_stream(callback=self._received)
        self.client.async_stream_infer(MODEL, grpc_inputs(max_tokens), enable_empty_final_response=True)

    def _received(self, result, error):
        if error is None and result.as_numpy("text_output") is not None:
            self.pieces.append(result.as_numpy("text_output").reshape(-1)[0].decode())
            self.first.set()
        final = error is None and result.get_response().parameters.get("triton_final_response")
        if error is not None or (final and final.bool_param):
            self.error = error
            self.events.put("error" if error is not None else "final")

    @property
    def text(self) -> str:
        return "".join(self.pieces)

    def outcome(self, timeout: float) -> str:
        """'final', 'error', or 'hang' when neither came within `timeout` seconds. The stream is closed after."""
        try:
            result = self.events.get(timeout=timeout)
        except queue.Empty:
            result = "hang"
        # stop_stream waits for the server to close the stream: never from here when it hangs
        threading.Thread(target=lambda: (self.client.stop_stream(), self.client.close()), daemon=True).start()
        return result


class SseStream:
    """A greedy OpenAI completions stream through the HTTP frontend (plain HTTP, Server-Sent Events)."""

    def __init__(self, port: int, max_tokens: int):
        self.events: list[dict | str] = []
        self.first = threading.Event()
        self.ended: queue.Queue = queue.Queue()
        body = {"model": MODEL, "prompt": PROMPT, "max_tokens": max_tokens, "min_tokens": max_tokens,
                "temperature": 0, "stream": True}
        threading.Thread(target=self._read, args=(port, body), daemon=True).start()

    def _read(self, port: int, body: dict) -> None:
        try:
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
            connection.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
            response = connection.getresponse()
            for line in response:
                if line.startswith(b"data: "):
                    data = line[len(b"data: "):].strip().decode()
                    self.events.append(data if data == "[DONE]" else json.loads(data))
                    self.first.set()
            self.ended.put("eof")
        except OSError as exc:  # the connection closed under it: an error too
            self.ended.put(f"{type(exc).__name__}: {exc}")

    def outcome(self, timeout: float) -> str:
        """'completed' (every token, no error), the error event's code, the connection's error, or 'hang'."""
        try:
            how = self.ended.get(timeout=timeout)
        except queue.Empty:
            return "hang"
        errors = [e["error"] for e in self.events if isinstance(e, dict) and "error" in e]
        if errors:
            return f"error {errors[0]['code']}: {errors[0]['message']}"
        return "completed" if how == "eof" and "[DONE]" in self.events else how


def http_status(url: str, body: dict | None = None) -> int | None:
    """The HTTP status of a GET (or a POST of `body`), None when the connection is refused or breaks."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return None


class UnaryRequest:
    """A long KServe /generate on the unary model (plain HTTP), in a thread."""

    def __init__(self, served: Served, max_tokens: int):
        self.result: queue.Queue = queue.Queue()
        url = f"http://127.0.0.1:{served.ports['http']}/v2/models/{MODEL}_unary/generate"
        body = {"text_input": PROMPT, "max_tokens": max_tokens, "min_tokens": max_tokens}
        threading.Thread(target=lambda: self.result.put(http_status(url, body)), daemon=True).start()

    def outcome(self, timeout: float):
        try:
            return self.result.get(timeout=timeout)
        except queue.Empty:
            return "hang"


# ---- the fault and what must follow ---------------------------------------------------------------------


def kill(pid: int) -> float:
    """kill -9 `pid`; when."""
    os.kill(pid, signal.SIGKILL)
    return time.monotonic()


def assert_down_then_back(served: Served, killed_at: float, failed_at: float, case: str) -> None:
    """Readiness turns false and new requests are refused (503 or connection refused, never 400); then both
    tritonserver and the frontend are ready again within BACK_WITHIN seconds of the kill. Records the times from the
    kill to `failed_at` (when the request in flight failed) and to each ready."""
    deadline = killed_at + ERROR_WITHIN
    while http_status(served.ready_url) == 200 or http_status(served.health_url) == 200:
        assert time.monotonic() < deadline, f"still ready {ERROR_WITHIN} s after the kill:\n{served.tail()}"
        time.sleep(0.1)
    # tritonserver is down (refused); the frontend, which stays up, answers 503
    generate = f"http://127.0.0.1:{served.ports['http']}/v2/models/{MODEL}_unary/generate"
    assert http_status(generate, {"text_input": PROMPT, "max_tokens": 2}) in (None, 503)
    completion = {"model": MODEL, "prompt": PROMPT, "max_tokens": 2}
    assert http_status(f"http://127.0.0.1:{served.ports['frontend']}/v1/completions", completion) == 503
    times = [failed_at - killed_at]
    for url in (served.ready_url, served.health_url):
        wait_until_healthy(served.process, url, "mstriton.serve", served.tail,
                           max(1.0, killed_at + BACK_WITHIN - time.monotonic()))
        times.append(time.monotonic() - killed_at)
    RESTART_TIMES[case] = tuple(times)
    # the frontend reconnects within a second (its gRPC reconnect backoff is bounded): allow for a loaded machine
    assert times[2] - times[1] < 5, f"the frontend was ready {times[2] - times[1]:.1f} s after tritonserver"


def assert_same_text_and_no_shm(served: Served, greedy: str, regions: set[Path]) -> None:
    stream = GrpcStream(served.grpc, GREEDY)
    assert stream.outcome(60) == "final", stream.error
    assert stream.text == greedy
    assert regions and not [r for r in regions if r.exists()], "the killed server's shared memory is left"


def kv_regions(served: Served) -> set[Path]:
    """The prefill model's shared KV pool of the running tritonserver (engine/shared_kv.py)."""
    regions = set(supervisor.SHM.glob(f"mstriton-kv-{served.triton_pid()}-*"))
    assert regions, "no shared KV pool: the test model is not in the disaggregated shape"
    return regions


def started(*requests) -> None:
    for request in requests:
        assert request.first.wait(30), "the stream did not start"


@pytest.mark.parametrize("model", [MODEL, f"{MODEL}_tokenizer", f"{MODEL}_prefill", f"{MODEL}_sampler",
                                   f"{MODEL}_decode"])
def test_a_killed_model_process_ends_the_stream_and_the_server_comes_back(served, greedy, model):
    regions = served.shm_regions() | kv_regions(served)
    stream = GrpcStream(served.grpc, LONG)
    sse = SseStream(served.ports["frontend"], LONG) if model.endswith("_decode") else None
    started(stream, *([sse] if sse else []))
    killed_at = kill(served.model_pids()[model])
    assert stream.outcome(ERROR_WITHIN) == "error", f"the stream did not fail:\n{served.tail()}"
    failed_at = time.monotonic()
    assert len(stream.pieces) < LONG
    if sse:
        outcome = sse.outcome(ERROR_WITHIN)
        assert outcome.startswith("error 503: tritonserver at"), outcome
    assert_down_then_back(served, killed_at, failed_at, model)
    # the supervisor saw the process die, or tritonserver itself died of it first (2.51's python backend may
    # crash when a stub dies with a stream in flight): restarted either way
    [*_, restart] = [line for line in served.text().splitlines() if line.endswith("restarting tritonserver")]
    assert f"model process {model} (pid" in restart or re.search(r"tritonserver \(pid \d+\) exited with -", restart), \
        served.tail()
    assert_same_text_and_no_shm(served, greedy, regions)


def test_a_killed_unary_model_process_fails_its_request_and_the_server_comes_back(served, greedy):
    regions = served.shm_regions()
    unary = served.model_pids()[f"{MODEL}_unary"]
    request = UnaryRequest(served, LONG)
    # kill once the request generates in the decode batch (it runs for seconds: LONG tokens through BLS)
    deadline = time.monotonic() + ERROR_WITHIN
    while served.decode_running() < 1 and request.result.empty():
        assert time.monotonic() < deadline, f"the request never reached the decode batch:\n{served.tail()}"
        time.sleep(0.05)
    assert request.result.empty(), f"the request ended before the kill: {request.result.get()}\n{served.tail()}"
    killed_at = kill(unary)
    assert request.outcome(ERROR_WITHIN) in (None, 503), served.tail()  # connection closed, or refused as busy
    assert_down_then_back(served, killed_at, time.monotonic(), f"{MODEL}_unary")
    assert_same_text_and_no_shm(served, greedy, regions)


def test_a_killed_tritonserver_ends_the_streams_and_comes_back(served, greedy):
    regions = served.shm_regions()
    stream, sse = GrpcStream(served.grpc, LONG), SseStream(served.ports["frontend"], LONG)
    started(stream, sse)
    killed_at = kill(served.triton_pid())
    assert stream.outcome(ERROR_WITHIN) == "error"
    failed_at = time.monotonic()
    outcome = sse.outcome(ERROR_WITHIN)
    assert outcome.startswith("error 503: tritonserver at"), outcome
    assert_down_then_back(served, killed_at, failed_at, "tritonserver")
    assert "exited with -9; restarting tritonserver" in served.text()
    assert_same_text_and_no_shm(served, greedy, regions)


def test_refused_requests_let_their_calls_end_before_the_clients_go(served):
    """Requests refused inside the ensemble (top_p out of range, max_tokens past the prompt's room) and in the front
    model (an empty prompt), 160 through the bench harness's gRPC stream and 160 through the frontend's doors, 8 at
    a time. A gRPC stream cancelled just after its request's final response leaves tritonserver 2.51 holding the
    model (docs/limits.md): the soak's client cancelled every stream that had ended with an error, and its SIGTERM
    then waited out the exit timeout (in most runs on SmolLM2; this tiny model did not show it). So the harness
    must count an error as the request's end (a stream closed with nothing unfinished is not cancelled); each
    refusal must name its field; the next test checks the exit status."""
    from bench.harness.streams import GrpcStream, scalar

    def grpc_refusal(i: int) -> tuple[str, bool]:
        inputs = {"text_input": scalar("BYTES", "" if i % 2 else PROMPT), "max_tokens": scalar("INT32", 4),
                  "top_p": scalar("FP32", 5.0), "stream": scalar("BOOL", True)}
        with GrpcStream(served.grpc, response_timeout=60) as stream:
            return stream.generate(MODEL, inputs).error or "accepted", stream.unfinished

    def frontend_refusal(i: int) -> str:
        body = {"model": MODEL, "prompt": PROMPT * (1 + i % 3), "max_tokens": 1023}
        request = urllib.request.Request(f"http://127.0.0.1:{served.ports['frontend']}/v1/completions",
                                         data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                return f"accepted {response.status}"
        except urllib.error.HTTPError as exc:
            return f"{exc.code} {exc.read().decode()}"

    with ThreadPoolExecutor(8) as pool:
        grpc_outcomes = list(pool.map(grpc_refusal, range(160)))
        frontend_errors = list(pool.map(frontend_refusal, range(160)))
    assert all(("'text_input' must not be empty" if i % 2 else "'top_p' must be in (0, 1]") in error
               for i, (error, _) in enumerate(grpc_outcomes)), grpc_outcomes[:4]
    assert not any(unfinished for _, unfinished in grpc_outcomes)  # closed without a cancel
    assert all(error.startswith("400 ") and "max_tokens" in error for error in frontend_errors), frontend_errors[:4]


def test_sigterm_drains_and_exits_0_leaving_no_shared_memory(served):
    """The last test of the module: it stops the server."""
    regions, triton, restarts = served.shm_regions(), served.triton_pid(), served.text().count("restarting")
    served.process.send_signal(signal.SIGTERM)
    assert served.process.wait(60) == 0, served.tail()
    assert supervisor.process(triton) is None and not supervisor.model_processes(triton)
    assert regions and not [r for r in regions if r.exists()]
    assert served.text().count("restarting") == restarts and "tritonserver exited with 0; stopped" in served.tail()


# ---- the crash-loop limit, and which processes are model processes (no server) ---------------------------


def test_restart_budget_allows_limit_restarts_within_the_window():
    now = [0.0]
    budget = supervisor.RestartBudget(limit=3, window=60, clock=lambda: now[0])
    assert [budget.spend() for _ in range(3)] == [True] * 3
    assert budget.spend() is False  # the fourth within 60 s
    now[0] = 61.5  # the first four have left the window
    assert budget.spend() is True


def test_a_tritonserver_that_keeps_dying_is_restarted_then_given_up_on(tmp_path):
    """A command that exits at once, as tritonserver does when a model cannot load: started 1 + max_restarts times,
    then run() returns 1 (for the container runtime to restart the container)."""
    starts = tmp_path / "starts"
    triton = supervisor.SupervisedTriton(["sh", "-c", f"echo started >> {starts}; exit 3"], log=lambda _: None)
    lines = []
    code = supervisor.Supervisor(triton, max_restarts=2, window=60, poll=0.05, log=lines.append).run()
    assert code == 1
    assert starts.read_text().count("started") == 3
    assert sum("exited with 3; restarting tritonserver" in line for line in lines) == 3
    assert "giving up" in lines[-2]


def test_a_tritonserver_slow_to_exit_has_its_model_processes_asked_for_their_stacks():
    lines = []
    triton = supervisor.SupervisedTriton(["sh", "-c", "trap '' TERM; sleep 2"], log=lines.append)
    triton.start()
    time.sleep(0.2)  # the trap is set
    assert triton.stop(timeout=30, stacks_after=0.5) == 0
    assert lines and lines[0].startswith("tritonserver still runs 0 s after SIGTERM; the model processes still "
                                         "running print their threads' stacks: none")


def test_model_processes_are_the_serving_stubs_not_the_config_reading_one():
    def stub(*args: bytes) -> supervisor.Process:
        argv = [b"/venv/share/mstriton/backends/python/triton_python_backend_stub", *args]
        return supervisor.Process(pid=10, ppid=1, pgid=1, state="S", argv=argv)

    rest = [b"triton_python_backend_shm_region_x", b"67108864", b"67108864", b"1", b"/backends/python", b"336"]
    assert supervisor.model_of(stub(b"/r/tiny_decode/1/model.py", *rest, b"tiny_decode_0_0", b"DEFAULT")) == \
        "tiny_decode"
    assert supervisor.model_of(stub(b"rel/repo/tiny/1/model.py", *rest, b"tiny_0_0", b"DEFAULT")) == "tiny"
    # the stub tritonserver runs while loading the model, to read its config (auto_complete_config), then stops
    assert supervisor.model_of(stub(b"/r/tiny_decode/1/model.py", *rest, b"tiny_decode", b"DEFAULT")) is None
    assert supervisor.model_of(supervisor.Process(11, 1, 1, "S", [b"/bin/bash", b"-c", b"x"])) is None


def test_tritonserver_does_not_outlive_a_killed_supervisor(tmp_path):
    """tritonserver runs in a session of its own (so that one SIGKILL reaches its model processes): a supervisor
    killed itself must not leave it running on, holding the ports."""
    script = ("from mstriton import supervisor; "
              "supervisor.Supervisor(supervisor.SupervisedTriton(['sleep', '300'])).run()")
    process = subprocess.Popen([sys.executable, "-c", script], start_new_session=True)
    try:
        deadline = time.monotonic() + 30
        while not (child := [p.pid for p in supervisor.processes() if p.ppid == process.pid]):
            assert time.monotonic() < deadline and process.poll() is None
            time.sleep(0.05)
    finally:
        process.kill()
        process.wait()
    deadline = time.monotonic() + 10
    while (state := supervisor.process(child[0])) and state.state != "Z":
        assert time.monotonic() < deadline, "the child outlived its supervisor"
        time.sleep(0.05)


def test_deployment_probes_leave_a_restart_its_time():
    """The KServe probes against the supervisor's timing: readiness drops the pod quickly, liveness waits as long as
    a start may take (a restart reloads every model), and the pods' grace period covers the drain and cleanup."""
    import yaml

    kserve = Path(__file__).resolve().parents[1] / "docker" / "kserve"
    runtime = yaml.safe_load((kserve / "servingruntime.yaml").read_text())
    [container] = runtime["spec"]["containers"]

    def budget(probe):
        return probe["periodSeconds"] * probe["failureThreshold"]

    assert budget(container["readinessProbe"]) <= 10
    assert budget(container["livenessProbe"]) >= budget(container["startupProbe"])
    for path in kserve.glob("inferenceservice*.yaml"):
        predictor = yaml.safe_load(path.read_text())["spec"]["predictor"]
        assert budget(predictor["model"]["readinessProbe"]) <= 10, path.name
        assert predictor["terminationGracePeriodSeconds"] > \
            supervisor.EXIT_TIMEOUT_SECONDS + supervisor.STOP_MARGIN_SECONDS, path.name
