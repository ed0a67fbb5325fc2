"""The examples of client_examples/, run as a user runs them (subprocesses: python with this interpreter, shell
scripts with bash) against a tritonserver of this module's own, whose LLM is named `demo` like `make run`'s so
that the examples' default model names hold. The model is a small random LLaMA, so the text is gibberish, but
greedy generation makes it deterministic: every client must print the same text for the same prompt."""

from __future__ import annotations

import json
import os
import random
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO_ROOT, serving_streaming_checkpoint
from mstriton.server_process import metric_value

EXAMPLES = REPO_ROOT / "client_examples"
PROMPTS = ["Streaming keeps every space", 'A "quoted" word,\ta tab and a back\\slash']


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with serving_streaming_checkpoint(tmp_path_factory.mktemp("examples"), {"demo": 4}) as triton:
        yield triton


@pytest.fixture(scope="module")
def frontend(server, tmp_path_factory):
    from mstriton.server_process import running_frontend

    with running_frontend(server, tmp_path_factory.mktemp("examples-frontend") / "frontend.log") as fe:
        server.frontend_url = fe.url
        yield fe


def environment(server) -> dict:
    return {**os.environ, "TRITON_HTTP": server.http, "PYTHONIOENCODING": "utf-8",
            "MSTRITON_FRONTEND": getattr(server, "frontend_url", "")}


def run(server, *command: str, timeout: float = 60) -> tuple[str, str]:
    """Run an example; its stdout and stderr as text (bytes decoded here: no newline translation)."""
    program = [sys.executable, str(EXAMPLES / command[0])] if command[0].endswith(".py") \
        else ["bash", str(EXAMPLES / command[0])]
    result = subprocess.run(program + list(command[1:]), capture_output=True, timeout=timeout, cwd=REPO_ROOT,
                            env=environment(server))
    stdout, stderr = result.stdout.decode("utf-8"), result.stderr.decode("utf-8")
    assert result.returncode == 0, f"{command} exited with {result.returncode}:\n{stdout}\n{stderr}"
    return stdout, stderr


@pytest.mark.parametrize("prompt", PROMPTS)
def test_streamed_text_equals_the_unary_text_in_every_client(server, prompt):
    generated = json.loads(run(server, "generate.sh", prompt, "12")[0])
    want = generated["text_output"]
    assert generated["model_name"] == "demo_unary" and generated["num_output_tokens"] == 12 and want

    stdout, stderr = run(server, "grpc_stream.py", "--url", server.grpc, "--max-tokens", "12", prompt)
    assert stdout == want + "\n"
    assert re.search(r"\[12 tokens, finish reason: length, time to first token: [0-9.]+ ms, total: [0-9.]+ ms, "
                     r"[0-9.]+ tokens/s", stderr), stderr

    events = [json.loads(line[len("data: "):]) for line in run(server, "sse_stream.sh", prompt, "12")[0].splitlines()
              if line.startswith("data: ")]
    assert len(events) == 12 and "".join(e["text_output"] for e in events) == want
    assert [e["finish_reason"] for e in events] == [""] * 11 + ["length"]

    stdout, _ = run(server, "kserve_infer.py", "--url", server.http, "--max-tokens", "12", prompt)
    assert f"tritonclient.http: {want!r}\n" in stdout and f"urllib: {want!r}\n" in stdout
    assert "same text from both: True" in stdout
    body = json.loads(stdout[stdout.index("\n{\n") + 1:stdout.index("\n}\n") + 2])  # the printed v2 request
    assert body["inputs"][0] == {"name": "text_input", "shape": [1, 1], "datatype": "BYTES", "data": [prompt]}


def test_grpc_stream_options_and_echo(server):
    prompt = PROMPTS[0]
    stdout, stderr = run(server, "grpc_stream.py", "--url", server.grpc, "--max-tokens", "6", "--echo", prompt)
    plain, _ = run(server, "grpc_stream.py", "--url", server.grpc, "--max-tokens", "6", prompt)
    # The prompt, then the same generated text (the space between them is the tokenizer's business).
    assert stdout.startswith(prompt) and stdout[len(prompt):].lstrip(" ") == plain.lstrip(" ")
    sampled = [run(server, "grpc_stream.py", "--url", server.grpc, "--max-tokens", "16", "--temperature", "1.0",
                   "--top-k", "50", "--top-p", "0.95", "--seed", str(seed), prompt)[0] for seed in (1, 1, 2)]
    assert sampled[0] == sampled[1] != sampled[2]


def test_grpc_stream_ctrl_c_cancels_the_request(server):
    before = metric_value(server.metrics(), "mstriton_requests_finished_total", model="demo",
                          finish_reason="cancelled")
    process = subprocess.Popen([sys.executable, str(EXAMPLES / "grpc_stream.py"), "--url", server.grpc,
                                "--max-tokens", "110", "a"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               env=environment(server))
    try:
        assert os.read(process.stdout.fileno(), 64), "no streamed text"  # the first piece has arrived
        process.send_signal(signal.SIGINT)
        stdout, stderr = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    stderr = stderr.decode("utf-8")
    assert process.returncode == 130, stderr
    tokens = int(re.search(r"\[(\d+) tokens, finish reason: cancelled \(Ctrl-C\)", stderr).group(1))
    assert 1 <= tokens < 110
    deadline = time.monotonic() + 10
    while metric_value(server.metrics(), "mstriton_requests_finished_total", model="demo",
                       finish_reason="cancelled") <= before:
        assert time.monotonic() < deadline, "the server did not count the request as cancelled"
        time.sleep(0.2)


def recipe_command() -> list[str]:
    """The perf_analyzer command of perf_analyzer.md, as written there."""
    text = (EXAMPLES / "perf_analyzer.md").read_text()
    block = re.search(r"^    (\.venv/bin/perf_analyzer .*?)\n\n", text, re.S | re.M).group(1)
    # the recipe's admin key from the environment, as a shell would expand it (this test's server is open)
    return [os.path.expandvars(word) for word in shlex.split(block.replace("\\\n", " "))]


def test_perf_analyzer_recipe_and_ttft_itl(server, tmp_path):
    command = recipe_command()
    assert command[:3] == [".venv/bin/perf_analyzer", "-m", "demo"] and "--streaming" in command
    assert command[command.index("--input-data") + 1] == "client_examples/perf_analyzer_input.json"
    profile = tmp_path / "profile.json"
    command[0] = str(Path(sys.prefix) / "bin" / "perf_analyzer")
    command[command.index("--concurrency-range") + 1] = "1:2"  # shorter than the recipe's 1:4
    command[command.index("--profile-export-file") + 1] = str(profile)
    command += ["-u", server.grpc, "--measurement-interval", "1500", "--stability-percentage", "999"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=REPO_ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Request concurrency: 2" in result.stdout

    table, _ = run(server, "ttft_itl.py", str(profile))
    lines = table.splitlines()
    assert lines[0].split()[:2] == ["concurrency", "requests"] and "TTFT p50 ms" in lines[0]
    assert [line.split()[0] for line in lines[1:]] == ["1", "2"]
    rows = [json.loads(line) for line in run(server, "ttft_itl.py", "--json", str(profile))[0].splitlines()]
    for row, concurrency in zip(rows, (1, 2)):
        assert row["mode"] == "concurrency" and row["value"] == concurrency and row["requests"] > 0
        assert row["tokens_per_request"] == 32  # max_tokens of perf_analyzer_input.json
        assert 0 < row["ttft_p50_ms"] <= row["ttft_p99_ms"] and 0 < row["itl_p50_ms"] <= row["itl_p99_ms"]
        assert row["tokens_per_s"] > 0
    every = [json.loads(line) for line in run(server, "ttft_itl.py", "--json", "--windows", "0",
                                               str(profile))[0].splitlines()]
    assert all(a["requests"] >= b["requests"] for a, b in zip(every, rows))


def test_ttft_itl_percentiles_match_numpy():
    sys.path.insert(0, str(EXAMPLES))
    try:
        import ttft_itl
    finally:
        sys.path.remove(str(EXAMPLES))
    rng = random.Random(3)
    values = [rng.uniform(0, 100) for _ in range(57)]
    for q in (0, 1, 50, 90, 99, 100):
        assert ttft_itl.percentile(values, q) == pytest.approx(np.percentile(values, q))
    experiment = {"experiment": {"mode": "concurrency", "value": 1}, "window_boundaries": [0, 100, 200, 300, 400],
                  "requests": [{"timestamp": 50, "response_timestamps": [60, 70]},  # before the last 3 windows
                               {"timestamp": 110, "response_timestamps": [2_000_110, 3_000_110, 5_000_110]}]}
    row = ttft_itl.summarize(experiment)
    assert row["requests"] == 1 and row["ttft_p50_ms"] == 2.0 and row["itl_p50_ms"] == 1.5
    assert ttft_itl.summarize(experiment, windows=0)["requests"] == 2


def test_the_frontend_examples_print_the_unary_text(server, frontend):
    """The OpenAI SDK, huggingface_hub and MindSpore Serving's bodies, through the HTTP frontend: the same greedy
    text as Triton's own generate."""
    prompt = PROMPTS[0]
    want = json.loads(run(server, "generate.sh", prompt, "12")[0])["text_output"]
    stdout, stderr = run(server, "openai_client.py", "--max-tokens", "12", prompt)
    assert stdout == want + "\n"
    assert "[finish reason: length, prompt tokens: " in stderr and "completion tokens: 12]" in stderr
    stdout, _ = run(server, "openai_client.py", "--max-tokens", "12", "--no-stream", "--logprobs", "2", prompt)
    lines = stdout.splitlines()
    assert lines[0] == want and len(lines) == 13  # the text, then a line per token with its 2 alternatives
    stdout, stderr = run(server, "tgi_client.py", "--max-new-tokens", "12", prompt)
    assert stdout == want + "\n" and "[finish reason: length, generated tokens: 12]" in stderr
    stdout, _ = run(server, "mindspore_serving.sh", prompt, "12")
    lines = stdout.splitlines()
    assert json.loads(lines[0]) == {"generated_text": want}
    events = [json.loads(line[len("data: "):])["data"] for line in lines if line.startswith("data: ")]
    assert "".join(events[:-2]) == want and events[-2] == want  # tokens, the whole text, then get_bs
    assert events[-1] == 0
