"""What `make install` (tools/install.sh) promises, checked against the real programs it installs:

- `.venv/bin/tritonserver` starts Triton with the python backend running this environment's Python, so a
  model.py that imports mindspore loads, becomes ready and answers a KServe v2 HTTP inference;
- `.venv/bin/perf_analyzer` measures that model and reports its throughput;
- the server shuts down cleanly on SIGTERM.

No mocks: one real tritonserver process (module-scoped) on free loopback ports, with a one-model repository
written into a temporary folder.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

VENV_BIN = Path(sys.prefix) / "bin"
READY_TIMEOUT_S = 240  # the stub imports mindspore, which takes a while on 2 busy cores
MODEL = "identity"

IDENTITY_CONFIG = """\
name: "identity"
backend: "python"
max_batch_size: 8
input [ { name: "INPUT0" data_type: TYPE_FP32 dims: [ 4 ] } ]
output [
  { name: "OUTPUT0" data_type: TYPE_FP32 dims: [ 4 ] },
  { name: "RUNTIME" data_type: TYPE_STRING dims: [ 1 ] }
]
instance_group [ { kind: KIND_CPU count: 1 } ]
"""

# Returns its input through a MindSpore tensor, and tells which Python and MindSpore run it.
IDENTITY_MODEL = '''\
import json
import sys

import mindspore
import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        self.runtime = json.dumps({"prefix": sys.prefix, "mindspore": mindspore.__version__,
                                   "mindspore_file": mindspore.__file__}).encode()

    def execute(self, requests):
        responses = []
        for request in requests:
            x = pb_utils.get_input_tensor_by_name(request, "INPUT0").as_numpy()
            y = mindspore.Tensor(x).asnumpy().astype(np.float32)
            runtime = np.array([[self.runtime]] * x.shape[0], dtype=np.object_)
            responses.append(pb_utils.InferenceResponse(output_tensors=[
                pb_utils.Tensor("OUTPUT0", y), pb_utils.Tensor("RUNTIME", runtime)]))
        return responses
'''


def venv_tool(name: str) -> str:
    """The tool as installed in the virtual environment these tests run in (not any other on PATH)."""
    path = shutil.which(name, path=str(VENV_BIN))
    assert path is not None, f"{name} is not in {VENV_BIN}: run `make install` (tools/install.sh)"
    return path


def free_ports(count: int) -> list[int]:
    socks = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


class Server:
    def __init__(self, proc: subprocess.Popen, http_port: int, log_path: Path):
        self.proc = proc
        self.http_port = http_port
        self.log_path = log_path

    @property
    def url(self) -> str:
        return f"localhost:{self.http_port}"

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://{self.url}/v2/health/ready", timeout=2) as r:
                return r.status == 200
        except (urllib.error.URLError, OSError):
            return False


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tritonserver = venv_tool("tritonserver")
    root = tmp_path_factory.mktemp("triton")
    repo = root / "model_repository"
    (repo / MODEL / "1").mkdir(parents=True)
    (repo / MODEL / "config.pbtxt").write_text(IDENTITY_CONFIG)
    (repo / MODEL / "1" / "model.py").write_text(IDENTITY_MODEL)

    http_port, grpc_port, metrics_port = free_ports(3)
    log_path = root / "tritonserver.log"
    env = dict(os.environ, GLOG_v="3")
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [tritonserver, "--model-repository", str(repo), "--http-port", str(http_port),
             "--grpc-port", str(grpc_port), "--metrics-port", str(metrics_port),
             "--exit-timeout-secs", "20"],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, cwd=root)
    srv = Server(proc, http_port, log_path)
    try:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while not srv.ready():
            if proc.poll() is not None:
                pytest.fail(f"tritonserver exited with {proc.returncode} before it was ready:\n{srv.log_tail()}")
            if time.monotonic() > deadline:
                pytest.fail(f"tritonserver not ready after {READY_TIMEOUT_S}s:\n{srv.log_tail()}")
            time.sleep(0.5)
        yield srv
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def test_kserve_v2_http_infer(server):
    import tritonclient.http as httpclient

    client = httpclient.InferenceServerClient(url=server.url)
    try:
        assert client.is_server_live() and client.is_server_ready()
        assert client.is_model_ready(MODEL)
        assert "triton" in client.get_server_metadata()["name"]

        x = np.arange(8, dtype=np.float32).reshape(2, 4) * 1.5 - 3.0
        inp = httpclient.InferInput("INPUT0", list(x.shape), "FP32")
        inp.set_data_from_numpy(x)
        result = client.infer(MODEL, [inp], outputs=[httpclient.InferRequestedOutput("OUTPUT0"),
                                                      httpclient.InferRequestedOutput("RUNTIME")])
        np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), x)
        assert result.get_response()["model_name"] == MODEL
    finally:
        client.close()

    # The stub ran this virtual environment's Python, and the model imported its mindspore.
    import json

    import mindspore

    runtime = json.loads(result.as_numpy("RUNTIME")[0][0])
    assert Path(runtime["prefix"]).resolve() == Path(sys.prefix).resolve(), runtime
    assert runtime["mindspore"] == mindspore.__version__
    assert Path(runtime["mindspore_file"]).resolve() == Path(mindspore.__file__).resolve()


def test_perf_analyzer_reports_throughput(server, tmp_path):
    perf_analyzer = venv_tool("perf_analyzer")
    csv_path = tmp_path / "perf.csv"
    cmd = [perf_analyzer, "-m", MODEL, "-u", server.url, "-i", "http",
           "--measurement-interval", "1000", "--concurrency-range", "1:2",
           # a busy 2-core machine: accept a wide spread rather than retrying for stability
           "--stability-percentage", "100", "--max-trials", "5", "-f", str(csv_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180, stdin=subprocess.DEVNULL)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"perf_analyzer exited with {proc.returncode}:\n{output[-3000:]}"

    reported = {int(c): float(t) for c, t in
                re.findall(r"Concurrency: (\d+), throughput: ([0-9.]+) infer/sec", output)}
    assert set(reported) == {1, 2}, output[-3000:]
    assert all(t > 0 for t in reported.values()), reported

    header, *rows = csv_path.read_text().strip().splitlines()
    columns = header.split(",")
    assert "Inferences/Second" in columns, header
    throughputs = [float(row.split(",")[columns.index("Inferences/Second")]) for row in rows]
    assert len(throughputs) == 2 and min(throughputs) > 0, rows


def test_server_shuts_down_cleanly(server):
    """Last in this module: SIGTERM makes tritonserver unload the model and exit 0 (the wrapper execs the
    server, so the signal reaches it directly)."""
    assert server.proc.poll() is None, f"tritonserver died early:\n{server.log_tail()}"
    server.proc.send_signal(signal.SIGTERM)
    try:
        returncode = server.proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        pytest.fail(f"tritonserver still running 60s after SIGTERM:\n{server.log_tail()}")
    assert returncode == 0, f"tritonserver exited with {returncode}:\n{server.log_tail()}"
    log = server.log_path.read_text(errors="replace")
    assert f"successfully unloaded '{MODEL}'" in log, server.log_tail()
