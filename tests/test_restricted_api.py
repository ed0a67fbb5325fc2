"""tritonserver's admin APIs closed behind the admin key (mstriton.serve, as `make run`, the images and the KServe
runtime start it): the real tritonserver refuses the model repository, model config, statistics, trace, logging and
shared-memory APIs without the key over HTTP (403) and gRPC (UNAVAILABLE) and answers them with it, while
inference, health and metadata stay open; the HTTP frontend, which reads the repository index and the model configs,
works with the key; and mstriton.serve's own command line."""

from __future__ import annotations

import asyncio
import json
import os
import re
import secrets
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from tritonclient.utils import InferenceServerException

from conftest import save_streaming_checkpoint
from mstriton import serve, supervisor
from mstriton.server_process import free_port, running_frontend, running_server, terminate, wait_until_healthy


def grpc_client(url: str):
    # imported here: tritonclient.grpc loads protobuf's C implementation, and mindspore, imported later by the
    # converter, then fails to load its own _pb2 modules
    import tritonclient.grpc as grpcclient

    return grpcclient.InferenceServerClient(url)

KEY = secrets.token_urlsafe(24)
MODEL = "tiny"

# (method, path) of every HTTP route of the closed groups that only reads: each must answer 200 with the key.
HTTP_ADMIN_READS = {
    "model-repository": ("POST", "/v2/repository/index"),
    "model-config": ("GET", f"/v2/models/{MODEL}/config"),
    "statistics": ("GET", f"/v2/models/{MODEL}/stats"),
    "trace": ("GET", "/v2/trace/setting"),
    "logging": ("GET", "/v2/logging"),
    "shared-memory": ("GET", "/v2/systemsharedmemory/status"),
}
# Routes that change the server: refused without the key (never sent with it: they would unload or reconfigure).
HTTP_ADMIN_WRITES = [("POST", f"/v2/repository/models/{MODEL}/unload", {}),
                     ("POST", "/v2/logging", {"log_verbose_level": 1}),
                     ("POST", "/v2/trace/setting", {"trace_level": ["TIMESTAMPS"]}),
                     ("POST", "/v2/systemsharedmemory/unregister", {})]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The real tritonserver with the admin APIs closed behind KEY, serving the smallest converted model."""
    from mstriton.convert import convert

    root = tmp_path_factory.mktemp("restricted")
    convert(save_streaming_checkpoint(root), MODEL, root / "repo", max_batch_size=1, max_seq_len=64,
            progress=lambda _: None)
    with running_server(root / "repo", root / "server.log", admin_key=KEY) as triton:
        yield triton


def http(method: str, url: str, body: dict | None = None, headers: dict | None = None) -> tuple[int, dict | list]:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            status, text = response.status, response.read()
    except urllib.error.HTTPError as error:
        status, text = error.code, error.read()
    return status, json.loads(text) if text else {}


def grpc_status(call) -> str:
    """'OK', or the status code of tritonserver's refusal."""
    try:
        call()
        return "OK"
    except InferenceServerException as exc:
        return f"{exc.status()}: {exc.message()}"


REFUSED_HTTP = {"error": f"This API is restricted, expecting header '{serve.ADMIN_HEADER}'"}
REFUSED_GRPC = f"StatusCode.UNAVAILABLE: This protocol is restricted, expecting header '{serve.GRPC_ADMIN_HEADER}'"


# ---- HTTP ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("group", sorted(HTTP_ADMIN_READS))
def test_http_admin_api_refused_without_the_key_and_answered_with_it(server, group):
    method, path = HTTP_ADMIN_READS[group]
    url = f"http://{server.http}{path}"
    assert http(method, url) == (403, REFUSED_HTTP)
    assert http(method, url, headers={serve.ADMIN_HEADER: "not-" + KEY}) == (403, REFUSED_HTTP)
    # the gRPC spelling of the header does not open HTTP
    assert http(method, url, headers={serve.GRPC_ADMIN_HEADER: KEY}) == (403, REFUSED_HTTP)
    status, body = http(method, url, headers=serve.http_admin_headers(KEY))
    assert status == 200, body
    if group == "model-repository":
        assert {m["name"] for m in body} >= {MODEL, f"{MODEL}_unary", f"{MODEL}_decode"}
    if group == "model-config":
        assert body["name"] == MODEL and body["model_transaction_policy"]["decoupled"] is True


@pytest.mark.parametrize("method,path,body", HTTP_ADMIN_WRITES)
def test_http_admin_changes_refused_without_the_key(server, method, path, body):
    assert http(method, f"http://{server.http}{path}", body) == (403, REFUSED_HTTP)


def test_http_inference_health_and_metadata_open_without_the_key(server):
    base = f"http://{server.http}"
    for path in ("/v2/health/live", "/v2/health/ready", f"/v2/models/{MODEL}/ready"):
        assert http("GET", base + path)[0] == 200, path
    status, metadata = http("GET", base + "/v2")
    assert status == 200 and metadata["name"] == "triton"
    status, metadata = http("GET", f"{base}/v2/models/{MODEL}")
    assert status == 200 and "text_input" in {i["name"] for i in metadata["inputs"]}
    # min_tokens: a random model may pick its end id at once
    status, answer = http("POST", f"{base}/v2/models/{MODEL}_unary/generate",
                          {"text_input": "The quick", "max_tokens": 4, "min_tokens": 4})
    assert status == 200 and answer["num_output_tokens"] == 4 and answer["text_output"], answer
    with urllib.request.urlopen(f"http://localhost:{server.metrics_port}/metrics", timeout=10) as response:
        assert b"mstriton_generation_tokens_total" in response.read()


# ---- gRPC ---------------------------------------------------------------------------------------------


def grpc_admin_reads(client) -> dict:
    """A read of each closed group: headers -> the call."""
    return {
        "model-repository": lambda h: client.get_model_repository_index(headers=h),
        "model-config": lambda h: client.get_model_config(MODEL, headers=h),
        "statistics": lambda h: client.get_inference_statistics(MODEL, headers=h),
        "trace": lambda h: client.get_trace_settings(headers=h),
        "logging": lambda h: client.get_log_settings(headers=h),
        "shared-memory": lambda h: client.get_system_shared_memory_status(headers=h),
    }


@pytest.fixture(scope="module")
def grpc(server):
    client = grpc_client(server.grpc)
    yield client
    client.close()


@pytest.mark.parametrize("group", serve.ADMIN_APIS)
def test_grpc_admin_protocol_refused_without_the_key_and_answered_with_it(grpc, group):
    call = grpc_admin_reads(grpc)[group]
    assert grpc_status(lambda: call(None)) == REFUSED_GRPC
    assert grpc_status(lambda: call(serve.grpc_admin_headers("not-" + KEY))) == REFUSED_GRPC
    # tritonserver looks for the key under its gRPC prefix: the HTTP header's name does not open gRPC
    assert grpc_status(lambda: call(serve.http_admin_headers(KEY))) == REFUSED_GRPC
    assert grpc_status(lambda: call(serve.grpc_admin_headers(KEY))) == "OK"


def test_grpc_admin_changes_refused_without_the_key(grpc):
    for change in (lambda: grpc.unload_model(MODEL), lambda: grpc.update_log_settings({"log_verbose_level": 1}),
                   lambda: grpc.unregister_system_shared_memory()):
        assert grpc_status(change) == REFUSED_GRPC
    assert grpc.is_model_ready(MODEL)  # the refused unload did nothing


def test_grpc_inference_health_and_metadata_open_without_the_key(grpc):
    import tritonclient.grpc as grpcclient

    assert grpc.is_server_live() and grpc.is_server_ready() and grpc.is_model_ready(f"{MODEL}_unary")
    assert grpc.get_server_metadata().name == "triton"
    assert "text_input" in {i.name for i in grpc.get_model_metadata(MODEL).inputs}
    inputs = []
    for name, value, dtype in (("text_input", np.array([[b"The quick"]], np.object_), "BYTES"),
                               ("max_tokens", np.array([[4]], np.int32), "INT32"),
                               ("min_tokens", np.array([[4]], np.int32), "INT32")):
        tensor = grpcclient.InferInput(name, list(value.shape), dtype)
        tensor.set_data_from_numpy(value)
        inputs.append(tensor)
    result = grpc.infer(f"{MODEL}_unary", inputs)
    assert int(result.as_numpy("num_output_tokens").reshape(-1)[0]) == 4
    assert result.as_numpy("text_output").reshape(-1)[0]


# ---- the HTTP frontend --------------------------------------------------------------------------------


def test_frontend_reads_the_models_only_with_the_key(server):
    from mstriton.frontend.errors import ApiError
    from mstriton.frontend.triton import Triton

    async def llms(admin_key):
        triton = Triton(server.grpc, admin_key=admin_key)
        try:
            return await triton.llms(), (await triton.info(MODEL)).max_seq_len
        finally:
            await triton.close()

    with pytest.raises(ApiError) as refused:
        asyncio.run(llms(None))
    assert refused.value.status == 503 and "restricted" in str(refused.value.message)
    assert asyncio.run(llms(KEY)) == ([MODEL], 64)


def test_frontend_started_beside_a_closed_server_is_healthy_and_lists_the_model(server, tmp_path):
    # FrontendServer hands the server's key to the frontend as mstriton.serve does (MSTRITON_ADMIN_KEY); its
    # /health needs the repository index
    with running_frontend(server, tmp_path / "frontend.log") as frontend:
        status, models = http("GET", f"{frontend.url}/v1/models")
    assert status == 200 and [(m["id"], m["max_model_len"]) for m in models["data"]] == [(MODEL, 64)]


# ---- mstriton.serve's command line --------------------------------------------------------------------


def test_restricted_api_args_close_every_admin_group_on_both_protocols():
    assert serve.restricted_api_args("k-1") == [
        "--http-restricted-api=model-repository,model-config,shared-memory,statistics,trace,logging:admin-key=k-1",
        "--grpc-restricted-protocol=model-repository,model-config,shared-memory,statistics,trace,logging:admin-key=k-1"]
    assert serve.restricted_api_args("k", ["statistics", "trace"]) == [
        "--http-restricted-api=model-repository,model-config,shared-memory,logging:admin-key=k",
        "--grpc-restricted-protocol=model-repository,model-config,shared-memory,logging:admin-key=k"]
    assert serve.restricted_api_args("k", serve.ADMIN_APIS) == []
    assert serve.restricted_api_args("", serve.ADMIN_APIS, inference_key="a-1") == [
        "--http-restricted-api=inference:authorization=Bearer a-1",
        "--grpc-restricted-protocol=inference:authorization=Bearer a-1"]
    for bad in ("", "two words", "tab\tkey", "ключ"):
        with pytest.raises(ValueError):
            serve.restricted_api_args(bad)
        with pytest.raises(ValueError):
            serve.restricted_api_args("k", inference_key=bad or " ")


ADMIN_PLACEHOLDER = serve.argv_secrets.placeholder(serve.SECRET_VARIABLES["admin"])


def restriction(argv, capsys, environ=None):
    """(key, tritonserver's restriction options, what was printed) for mstriton.serve's `argv`."""
    saved = os.environ.pop(serve.ADMIN_KEY_VARIABLE, None)
    os.environ.update(environ or {})
    try:
        args, passthrough = serve.parse_args(argv)
        key, options = serve.admin_restriction(args)
    finally:
        os.environ.pop(serve.ADMIN_KEY_VARIABLE, None)
        if saved is not None:
            os.environ[serve.ADMIN_KEY_VARIABLE] = saved
    return key, options, capsys.readouterr().out


def test_serve_makes_a_key_and_prints_it_once_when_none_is_given(capsys):
    key, options, out = restriction([], capsys)
    # tritonserver's options hold a placeholder that argv_secrets fills in its process, never the key
    assert len(key) >= 32 and options == serve.restricted_api_args(ADMIN_PLACEHOLDER) and key not in str(options)
    assert out.count(key) == 1 and serve.ADMIN_HEADER in out and serve.GRPC_ADMIN_HEADER in out
    assert restriction([], capsys)[0] != key  # a new one each start


def test_serve_takes_the_key_from_a_file_or_the_environment_and_does_not_print_it(capsys, tmp_path):
    (tmp_path / "admin.key").write_text("given-1\n")
    for argv, environ in ((["--admin-key-file", str(tmp_path / "admin.key")], {}),
                          ([], {serve.ADMIN_KEY_VARIABLE: "given-1"}),
                          (["--admin-key-file", str(tmp_path / "admin.key")], {serve.ADMIN_KEY_VARIABLE: "other"})):
        key, options, out = restriction(argv, capsys, environ)
        assert key == "given-1" and options == serve.restricted_api_args(ADMIN_PLACEHOLDER)
        assert "given-1" not in out and "admin key" in out


@pytest.mark.parametrize("parse, option", [(serve.parse_args, "--admin-key"), (serve.parse_args, "--api-key"),
                                           (lambda argv: frontend_main(argv), "--triton-admin-key"),
                                           (lambda argv: frontend_main(argv), "--api-key")])
def test_serve_and_frontend_refuse_a_key_on_their_command_line(parse, option, capsys):
    if True:
        with pytest.raises(SystemExit):
            parse([option, "on-the-command-line"])
        err = capsys.readouterr().err
        assert f"{option} would put the key on the command line" in err and f"{option}-file" in err, err


def frontend_main(argv):
    from mstriton.frontend.__main__ import main
    return main(argv)


def test_key_files_that_cannot_serve_are_named(tmp_path):
    (tmp_path / "empty").write_text("\n")
    (tmp_path / "spaced").write_text("two words\n")
    for name, says in (("empty", "is empty"), ("spaced", "printable ASCII without spaces"), ("missing", "cannot read")):
        with pytest.raises(ValueError, match=says) as error:
            serve.read_key(tmp_path / name, serve.API_KEY_VARIABLE, "the API key")
        assert str(tmp_path / name) in str(error.value)


def test_serve_open_api(capsys):
    key, options, _ = restriction(["--open-api", "statistics,trace", "--open-api", "logging"], capsys)
    assert options == serve.restricted_api_args(ADMIN_PLACEHOLDER, ["statistics", "trace", "logging"])
    assert restriction(["--open-api", "all"], capsys)[:2] == (None, [])
    for bad in ("everything", "inference", "statistics,,bogus"):
        with pytest.raises(SystemExit):
            serve.parse_args(["--open-api", bad])


def test_serve_passes_unknown_options_to_tritonserver_and_the_keys_to_the_frontend_only(monkeypatch):
    monkeypatch.setenv(serve.ADMIN_KEY_VARIABLE, "env-key")
    args, passthrough = serve.parse_args(["--model-repository", "repo", "--http-port=1", "--log-verbose=1",
                                          "--exit-timeout-secs", "5"])
    assert passthrough == ["--log-verbose=1", "--exit-timeout-secs", "5"]
    command = serve.triton_command(args, ["--restricted"], passthrough)
    assert command[0] == str(Path(sys.prefix) / "bin" / "tritonserver")
    # beside the frontend, tritonserver listens on loopback only
    assert command[1:] == ["--model-repository", "repo", "--http-port", "1", "--grpc-port", "8001",
                           "--metrics-port", "8002", "--http-address", "127.0.0.1", "--grpc-address", "127.0.0.1",
                           "--metrics-address", "127.0.0.1", "--restricted", "--log-verbose=1",
                           "--exit-timeout-secs", "5"]
    triton_env, frontend_env = serve.environments("the-key", "api-key")
    assert serve.ADMIN_KEY_VARIABLE not in triton_env and serve.API_KEY_VARIABLE not in triton_env
    assert triton_env[serve.SECRET_VARIABLES["admin"]] == "the-key"  # for argv_secrets, which removes it
    assert triton_env[serve.SECRET_VARIABLES["api"]] == "api-key"
    assert frontend_env[serve.ADMIN_KEY_VARIABLE] == "the-key" and frontend_env[serve.API_KEY_VARIABLE] == "api-key"
    assert "the-key" not in serve.frontend_command(args)  # not on a command line every local user can list


@pytest.mark.parametrize("argv, exposed", [
    ([], False), (["--expose-triton"], True), (["--no-frontend"], True),
    (["--http-address", "0.0.0.0"], True), (["--grpc-address=127.0.0.1"], False),
    (["--metrics-address", "10.1.2.3"], True)])
def test_tritonserver_listens_beyond_loopback_only_when_asked(argv, exposed):
    args, passthrough = serve.parse_args(argv)
    assert serve.triton_exposed(args, passthrough) == exposed
    command = serve.triton_command(args, [], passthrough)
    for option in serve.ADDRESS_OPTIONS:  # each address option once: ours (loopback) unless the caller gave one
        assert command.count(option) + sum(a.startswith(option + "=") for a in command) == (
            int(not exposed or any(a.startswith(option) for a in passthrough))), command


def start_serve(tmp_path, *options, environ=None):
    """`python -m mstriton.serve` on an empty model repository (tritonserver alone starts in seconds)."""
    (tmp_path / "repo").mkdir()
    ports = {"http": free_port(), "grpc": free_port(), "metrics": free_port(), "frontend": free_port()}
    env = {k: v for k, v in os.environ.items() if k != serve.ADMIN_KEY_VARIABLE}
    log = tmp_path / "serve.log"
    process = subprocess.Popen(
        [sys.executable, "-m", "mstriton.serve", "--model-repository", str(tmp_path / "repo"),
         *(f"--{kind}-port={port}" for kind, port in ports.items()), *options],
        stdout=open(log, "wb"), stderr=subprocess.STDOUT, env={**env, **(environ or {})}, start_new_session=True)
    wait_until_healthy(process, f"http://127.0.0.1:{ports['http']}/v2/health/ready", "mstriton.serve",
                       lambda: log.read_text(errors="replace")[-3000:], timeout=120)
    return process, ports, log


def printed_key(log: Path) -> str:
    return re.search(r"this one was made for this run: (\S+)", log.read_text()).group(1)


def test_serve_runs_tritonserver_with_the_printed_key_and_gives_it_to_the_frontend(tmp_path):
    """`make run`'s command: the key printed at start opens the admin APIs, and the frontend (which lists the models
    from the repository index) answers, so it was given the key."""
    process, ports, log = start_serve(tmp_path)
    try:
        key = printed_key(log)
        index = f"http://127.0.0.1:{ports['http']}/v2/repository/index"
        assert http("POST", index) == (403, REFUSED_HTTP)
        assert http("POST", index, headers=serve.http_admin_headers(key)) == (200, [])
        # the frontend's first gRPC call connects lazily; give it a few seconds to come up
        deadline, answer = time.monotonic() + 60, None
        while time.monotonic() < deadline:
            try:
                answer = http("GET", f"http://127.0.0.1:{ports['frontend']}/v1/models")
                break
            except OSError:
                time.sleep(0.5)
        assert answer == (200, {"object": "list", "data": []}), log.read_text()[-2000:]
    finally:
        process.send_signal(signal.SIGTERM)
        code = process.wait(60)
    assert code == 0, log.read_text()[-2000:]


def descendants(pid: int) -> list:
    table = supervisor.processes()
    found, frontier = [], [pid]
    while frontier:
        children = [p for p in table if p.ppid in frontier]
        found += children
        frontier = [p.pid for p in children]
    return found


def listening_addresses(pid: int) -> set[str]:
    import psutil
    # gRPC binds an IPv6 socket that takes IPv4 (::ffff:127.0.0.1 is 127.0.0.1)
    return {c.laddr.ip.removeprefix("::ffff:") for c in psutil.Process(pid).net_connections(kind="inet")
            if c.status == psutil.CONN_LISTEN}


API_KEY = secrets.token_urlsafe(24)


def test_serve_keeps_every_key_off_command_lines_and_tritonserver_on_loopback(tmp_path):
    """With the frontend, tritonserver listens on 127.0.0.1 only; no key given in the environment shows on any
    command line of the processes started (tritonserver holds placeholders, filled inside it: the admin key still
    opens its admin APIs); the frontend, on every address, wants the API key."""
    (tmp_path / "api.key").write_text(API_KEY + "\n")
    process, ports, log = start_serve(tmp_path, "--api-key-file", str(tmp_path / "api.key"),
                                      environ={serve.ADMIN_KEY_VARIABLE: KEY})
    try:
        tree = descendants(process.pid)
        triton = [p for p in tree if p.argv and p.argv[0].endswith(b"/tritonserver/bin/tritonserver")]
        assert len(triton) == 1, [p.argv[:1] for p in tree]
        for p in [supervisor.process(process.pid), *tree]:
            line = Path(f"/proc/{p.pid}/cmdline").read_bytes()
            assert KEY.encode() not in line and API_KEY.encode() not in line, line
        assert listening_addresses(triton[0].pid) == {"127.0.0.1"}
        index = f"http://127.0.0.1:{ports['http']}/v2/repository/index"
        assert http("POST", index, headers=serve.http_admin_headers(KEY)) == (200, [])
        models = f"http://127.0.0.1:{ports['frontend']}/v1/models"
        deadline = time.monotonic() + 60
        while True:
            try:
                assert http("GET", models)[0] == 401
                break
            except OSError:  # not listening yet
                assert time.monotonic() < deadline, log.read_text()[-2000:]
                time.sleep(0.5)
        assert http("GET", models, headers={"Authorization": f"Bearer {API_KEY}"})[0] == 200
        frontend = [p for p in tree if b"mstriton.frontend" in b" ".join(p.argv)]
        assert len(frontend) == 1 and listening_addresses(frontend[0].pid) == {"0.0.0.0"}
        assert KEY not in log.read_text() and API_KEY not in log.read_text()
    finally:
        code = terminate(process, timeout=60)
    assert code == 0, log.read_text()[-2000:]


def test_serve_no_frontend_runs_tritonserver_alone_with_the_given_key(tmp_path):
    """The images' and the KServe runtime's command: tritonserver alone, as the child of mstriton.serve's supervisor
    (which restarts it when a model process dies, tests/test_faults.py) and gets the container's signals (SIGTERM
    below: exit 0); the key from the environment, not printed."""
    process, ports, log = start_serve(tmp_path, "--no-frontend",
                                      environ={serve.ADMIN_KEY_VARIABLE: KEY, serve.API_KEY_VARIABLE: API_KEY})
    try:
        children = [p for p in supervisor.processes() if p.ppid == process.pid]
        assert len(children) == 1 and children[0].argv[0].endswith(b"/tritonserver/bin/tritonserver"), children
        # tritonserver is the door: every address, and with an API key its inference wants it
        assert listening_addresses(children[0].pid) - {"::"} == {"0.0.0.0"}
        grpc = grpc_client(f"127.0.0.1:{ports['grpc']}")
        assert grpc_status(lambda: grpc.get_model_repository_index()) == REFUSED_GRPC
        assert grpc_status(lambda: grpc.get_model_repository_index(headers=serve.grpc_admin_headers(KEY))) == "OK"
        infer = f"http://127.0.0.1:{ports['http']}/v2/models/{MODEL}/infer"
        assert http("POST", infer, {"inputs": []})[0] == 403
        assert http("POST", infer, {"inputs": []}, headers={"Authorization": "Bearer wrong"})[0] == 403
        # past the key: the empty repository has no such model
        assert http("POST", infer, {"inputs": []}, headers={"Authorization": f"Bearer {API_KEY}"})[0] == 404
        import tritonclient.grpc as grpcclient
        text = grpcclient.InferInput("text_input", [1, 1], "BYTES")
        text.set_data_from_numpy(np.array([[b"hello"]], np.object_))
        assert grpc_status(lambda: grpc.infer(MODEL, [text])) == (
            f"StatusCode.UNAVAILABLE: This protocol is restricted, expecting header '{serve.GRPC_INFERENCE_HEADER}'")
        assert grpc_status(lambda: grpc.infer(MODEL, [text], headers=serve.grpc_inference_headers(API_KEY))
                           ).startswith("StatusCode.NOT_FOUND")
        grpc.close()
        assert KEY not in log.read_text() and API_KEY not in log.read_text()
    finally:
        code = terminate(process, timeout=60)
    assert code == 0, log.read_text()[-2000:]
