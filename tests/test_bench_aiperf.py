"""The frontend benchmark's reading of aiperf: the export of a real aiperf 0.13 run (tests/data/aiperf_export/,
four streaming chat requests of 16 tokens at concurrency 1 through our frontend, after two warm-up requests;
failed_profile_export.jsonl: two requests to a port nothing listened on), the command it builds, perf_analyzer's inputs made from
aiperf's requests, and aiperf's formulas applied to other timings. aiperf itself is not needed."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from bench import aiperf
from bench.timing import RequestTiming

DATA = Path(__file__).resolve().parent / "data" / "aiperf_export"


@pytest.fixture(scope="module")
def result() -> aiperf.ProfileResult:
    return aiperf.read_artifacts(DATA)


def test_figures_are_aiperf_summary_values(result):
    figures = result.figures()
    summary = json.loads((DATA / aiperf.SUMMARY_FILE).read_text())
    assert figures["requests"] == 4 and figures["failed"] == 0
    assert figures["output_tokens"] == 64 and figures["output_tokens_avg"] == 16
    assert figures["seconds"] == pytest.approx(summary["benchmark_duration"]["avg"])  # unit "sec"
    # aiperf divides by its profiling phase's span, a few ms longer than benchmark_duration
    assert figures["output_tokens_per_s"] == pytest.approx(64 / figures["seconds"], rel=2e-3)
    assert figures["requests_per_s"] == pytest.approx(4 / figures["seconds"], rel=2e-3)
    assert figures["ttft_p50_ms"] == pytest.approx(summary["time_to_first_token"]["p50"])  # unit "ms"
    assert figures["ttft_p99_ms"] == pytest.approx(summary["time_to_first_token"]["p99"])
    assert figures["itl_p50_ms"] == pytest.approx(summary["inter_token_latency"]["p50"])
    assert figures["itl_p99_ms"] == pytest.approx(summary["inter_token_latency"]["p99"])
    # SmolLM2's chat template adds its default system prompt to aiperf's 128 tokens
    assert figures["prompt_tokens_avg"] == 158


def test_latencies_convert_to_milliseconds():
    summary = {"time_to_first_token": {"unit": "ns", "p50": 2.5e6}, "inter_token_latency": {"unit": "s", "p50": 0.02}}
    result = aiperf.ProfileResult(summary=summary, records=[], payloads=[])
    assert result.ms("time_to_first_token", "p50") == pytest.approx(2.5)
    assert result.ms("inter_token_latency", "p50") == pytest.approx(20.0)
    assert result.ms("inter_token_latency", "p99") is None


def test_records_hold_warmup_and_measured_requests(result):
    assert len(result.records) == 6
    assert [r["metadata"]["benchmark_phase"] for r in result.measured] == ["profiling"] * 4
    assert result.errors == 0 and result.first_error is None


def test_failed_requests_are_counted_with_their_reason():
    records = aiperf.read_records(DATA / "failed_profile_export.jsonl")
    failed = aiperf.ProfileResult(summary={"error_summary": []}, records=records, payloads=[])
    assert len(failed.measured) == 2 and failed.errors == 2
    assert "ConnectionRefusedError" in failed.first_error
    with pytest.raises(ValueError, match="no request_count"):
        failed.figures()


def test_payloads_are_the_measured_prompts(result):
    """inputs.json holds one body per measured request (the warm-up reused two of them)."""
    assert len(result.payloads) == 4
    measured = {r["metadata"]["conversation_id"] for r in result.measured}
    assert len(measured) == 4
    for body in result.payloads:
        assert body["stream"] is True and body["max_tokens"] == 16 and body["min_tokens"] == 16
        assert body["stream_options"] == {"include_usage": True}
        assert [m["role"] for m in body["messages"]] == ["user"]
    assert len(result.inputs_digest) == 12
    reordered = aiperf.ProfileResult(summary={}, records=[], payloads=result.payloads[::-1])
    assert reordered.inputs_digest != result.inputs_digest


def test_front_model_inputs_from_a_chat_body(result):
    body = result.payloads[0]
    entry = aiperf.front_model_inputs(body)
    assert json.loads(entry["messages"][0]) == body["messages"]
    assert entry["max_tokens"] == [16] and entry["min_tokens"] == [16] and entry["temperature"] == [0.0]
    assert entry["stream"] == [True]
    assert set(entry) == {"messages", "max_tokens", "min_tokens", "temperature", "stream"}
    newer = aiperf.front_model_inputs({"messages": body["messages"], "max_completion_tokens": 8, "top_k": 1})
    assert newer["max_tokens"] == [8] and newer["top_k"] == [1]
    assert aiperf.front_model_inputs({"messages": []}, output_tokens=32)["max_tokens"] == [32]
    # every field the frontend's OpenAI door passes on (the parameter table), with the input's type
    from mstriton.params import door_fields

    assert set(aiperf.FRONT_MODEL_FIELDS) == set(door_fields("openai").values()) >= {"temperature", "top_p", "seed"}
    more = aiperf.front_model_inputs({"messages": [], "presence_penalty": 1, "seed": 7.0, "skip_special_tokens": 0})
    assert (more["presence_penalty"], more["seed"], more["skip_special_tokens"]) == ([1.0], [7], [False])
    assert type(more["presence_penalty"][0]) is float and type(more["seed"][0]) is int
    with pytest.raises(ValueError, match="chat"):
        aiperf.front_model_inputs({"prompt": "x"})


def test_figures_of_timings_follow_aiperf_formulas(result):
    """Timings rebuilt from aiperf's own records (start, first token at TTFT, last at the request's latency) give
    back aiperf's percentiles and throughput."""
    timings = []
    for record in result.measured:
        start = record["metadata"]["request_start_ns"] / 1e9
        metrics = record["metrics"]
        first = start + metrics["time_to_first_token"]["value"] / 1e3
        last = start + metrics["request_latency"]["value"] / 1e3
        timings.append(RequestTiming(start=start, token_times=list(np.linspace(
            first, last, metrics["output_sequence_length"]["value"]))))
    ours, theirs = aiperf.figures_of_timings(timings), result.figures()
    for key in ("ttft_p50_ms", "ttft_p99_ms", "itl_p50_ms", "itl_p99_ms"):
        assert ours[key] == pytest.approx(theirs[key], rel=1e-6), key
    for key in ("output_tokens_per_s", "requests_per_s"):  # see test_figures_are_aiperf_summary_values
        assert ours[key] == pytest.approx(theirs[key], rel=2e-3), key
    assert ours["requests"] == 4 and ours["output_tokens"] == 64


def test_figures_of_timings_itl_is_per_request_mean():
    timings = [RequestTiming(start=0.0, token_times=[0.1, 0.2, 0.3]),         # 100 ms ITL
               RequestTiming(start=0.0, token_times=[0.5, 0.5, 0.5, 1.1])]    # bunched then one gap: 200 ms
    figures = aiperf.figures_of_timings(timings)
    assert figures["itl_p50_ms"] == pytest.approx(150.0)
    assert figures["ttft_p50_ms"] == pytest.approx(300.0)
    assert figures["output_tokens_per_s"] == pytest.approx(7 / 1.1)
    with pytest.raises(ValueError):
        aiperf.figures_of_timings([RequestTiming(start=0.0, token_times=[])])


def test_profile_command(tmp_path):
    run = aiperf.ProfileRun(aiperf=aiperf.ROOT / "build" / "aiperf-venv" / "bin" / "aiperf",
                            url="http://127.0.0.1:9000", model="smollm2", tokenizer=tmp_path / "tok",
                            concurrency=16, request_count=64, input_tokens=128, output_tokens=128,
                            artifact_dir=tmp_path / "out", warmup_count=16, extra_inputs={"min_tokens": 128})
    command = run.command()
    assert command[1] == "profile"
    pairs = dict(zip(command, command[1:]))
    assert pairs["--endpoint-type"] == "chat" and "--streaming" in command
    assert pairs["--concurrency"] == "16" and pairs["--request-count"] == "64"
    assert pairs["--isl"] == "128" and pairs["--isl-stddev"] == "0" and pairs["--osl"] == "128"
    assert pairs["--warmup-request-count"] == "16" and pairs["--random-seed"] == "0"
    assert json.loads(pairs["--extra-inputs"]) == {"min_tokens": 128}
    assert "--use-legacy-max-tokens" in command and "--use-server-token-count" in command
    # a request rate, so that aiperf's scheduler sleeps between tries for a free slot
    assert pairs["--request-rate"] == "100" and pairs["--arrival-pattern"] == "constant"
    assert pairs["--connection-reuse-strategy"] == "never"
    run.poll_rate = 0
    assert "--request-rate" not in run.command()
    shown = run.shell_command()
    assert shown.startswith("build/aiperf-venv/bin/aiperf profile ")
    assert "--extra-inputs '{\"min_tokens\":128}'" in shown


def test_ensure_venv_reuses_a_filled_environment(tmp_path):
    requirements = tmp_path / "requirements-aiperf.txt"
    requirements.write_text("aiperf==0.13.0\n")
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "aiperf").write_text("#!/bin/sh\n")
    import hashlib
    (venv / "mstriton-requirements.sha256").write_text(hashlib.sha256(requirements.read_bytes()).hexdigest())
    said = []
    assert aiperf.ensure_venv(venv, requirements, progress=said.append) == venv / "bin" / "aiperf"
    assert said == []  # nothing created, nothing installed


def test_requirements_pin_aiperf():
    lines = [line.strip() for line in aiperf.REQUIREMENTS.read_text().splitlines()
             if line.strip() and not line.startswith("#")]
    assert any(line.startswith("aiperf==") for line in lines), lines
