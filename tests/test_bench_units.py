"""The serving benchmark's own logic, without servers: the figures from request timings, the closed loop, the
exact-length prompts, perf_analyzer's export, and the report."""

from __future__ import annotations

import json
import subprocess
import threading
import time

import pytest

from conftest import REPO_ROOT
from bench import report
from bench.harness.loops import closed_loop
from bench.timing import RequestTiming, summarize
from bench.triton_run import ServerDied, input_data, run_watching, timings_from_profile


def test_summarize_computes_throughput_ttft_and_inter_token_gaps():
    timings = [RequestTiming(start=0.0, token_times=[0.1, 0.2, 0.4]),
               RequestTiming(start=1.0, token_times=[1.3, 1.4, 1.5])]
    point = summarize(timings)
    assert point.output_tokens == 6 and point.requests == 2
    assert point.seconds == pytest.approx(1.5) and point.tokens_per_s == pytest.approx(4.0)
    assert point.ttft_p50_ms == pytest.approx(200.0)          # 100 ms and 300 ms
    assert point.itl_p50_ms == pytest.approx(100.0)           # gaps 100, 200, 100, 100
    assert point.itl_p99_ms == pytest.approx(197.0)


def test_closed_loop_keeps_at_most_concurrency_requests_in_flight_and_sends_each_once():
    in_flight, peak, sent, lock = [0], [0], [], threading.Lock()

    def send(index, prompt):
        with lock:
            in_flight[0] += 1
            peak[0] = max(peak[0], in_flight[0])
            sent.append(prompt)
        time.sleep(0.01)
        with lock:
            in_flight[0] -= 1
        return RequestTiming(start=0.0, token_times=[1.0])

    timings = closed_loop(list(range(20)), 3, send)
    assert len(timings) == 20 and sorted(sent) == list(range(20)) and peak[0] == 3


def test_closed_loop_raises_the_first_error():
    def send(index, prompt):
        raise RuntimeError(f"refused {prompt}")

    with pytest.raises(RuntimeError, match="refused"):
        closed_loop(["a", "b"], 2, send)


def test_prompts_have_exactly_the_asked_token_count(tmp_path):
    from conftest import train_byte_fallback_tokenizer
    from bench.workload import make_prompts
    from mstriton.tokenizer import load_tokenizer

    tokenizer_file = train_byte_fallback_tokenizer(tmp_path / "tokenizer.model")
    prompts = make_prompts(tokenizer_file, 5, 40, seed=1)
    assert len(set(prompts)) == 5
    assert [len(load_tokenizer(tokenizer_file).encode(p)) for p in prompts] == [40] * 5


def test_perf_analyzer_input_and_profile_export():
    data = input_data(["hello"], 8)["data"][0]
    assert data == {"text_input": ["hello"], "max_tokens": [8], "min_tokens": [8], "stream": [True]}
    profile = {"experiments": [{"requests": [{"timestamp": 1_000_000_000,
                                              "response_timestamps": [1_100_000_000, 1_150_000_000]}]}]}
    [timing] = timings_from_profile(profile, 2)
    assert timing.start == pytest.approx(1.0) and timing.token_times == pytest.approx([1.1, 1.15])
    assert input_data(["hello"], 8, stream_interval=4)["data"][0]["stream_interval"] == [4]


def test_grouped_responses_give_each_token_its_response_time():
    from bench.triton_run import tokens_per_response

    assert tokens_per_response(10, 4) == [1, 4, 4, 1] and tokens_per_response(5, 4) == [1, 4]
    assert tokens_per_response(3, 1) == [1, 1, 1] and tokens_per_response(1, 4) == [1]
    profile = {"experiments": [{"requests": [
        {"timestamp": 0, "response_timestamps": [1_000_000_000, 2_000_000_000, 3_000_000_000]},
        {"timestamp": 0, "response_timestamps": [1_000_000_000]}]}]}
    grouped, short = timings_from_profile(profile, 6, stream_interval=4)
    assert grouped.token_times == pytest.approx([1, 2, 2, 2, 2, 3])
    assert len(short.token_times) == 1  # not the expected grouping: left for the count check to refuse


def test_long_shape_is_shortened_to_the_models_position_limit():
    bench = _bench_serving()
    long = bench.SHAPES[1]
    assert bench.fit_shape(long, 2048) is long
    fitted = bench.fit_shape(long, 1024)
    assert (fitted.prompt_tokens, fitted.output_tokens, fitted.name) == (960, 64, "960 in / 64 out")


def test_report_states_the_ratios_and_marks_failed_points(tmp_path):
    results = report.Results(date="2026-11-24", machine="test machine", versions={"x": "1"},
                             tools={report.OURS: "perf_analyzer"}, prefill_ms={"m": {"s": 10.0}})
    point = dict(requests=4, output_tokens=400, seconds=1.0, tokens_per_s=400.0, requests_per_s=4.0,
                 ttft_p50_ms=15.0, ttft_p99_ms=20.0, itl_p50_ms=2.0, itl_p99_ms=3.0)
    for c, scale in ((1, 1.0), (16, 9.0)):
        results.put("m", "s", report.OURS, c, {**point, "tokens_per_s": 400.0 * scale})
        results.put("m", "s", report.ENGINE, c, {**point, "tokens_per_s": 500.0 * scale})
    results.put("m", "s", report.HF_SEQUENTIAL, 16, {"error": "not run: one request at a time"})
    text = report.markdown(results, [1, 16])
    assert "| serving efficiency = ours / engine alone (>= 0.9) | 0.80 | 0.80 |" in text
    assert "**9.00x** (target >= 8x)" in text and "**1.50x** (target <= 2x)" in text
    assert "not run: one request at a time" in text
    results.save_json(tmp_path / "r.json")
    assert json.loads((tmp_path / "r.json").read_text())["points"]["m"]["s"][report.OURS]["16"]["tokens_per_s"] == 3600.0


def test_runs_merge_into_one_report(tmp_path):
    point = dict(requests=4, output_tokens=400, seconds=1.0, tokens_per_s=400.0, requests_per_s=4.0,
                 ttft_p50_ms=15.0, ttft_p99_ms=20.0, itl_p50_ms=2.0, itl_p99_ms=3.0)
    runs = []
    for i, (shape, concurrency) in enumerate((("short", 1), ("long", 4))):
        run = report.Results(date="2026-11-24", machine="m", versions={}, tools={},
                             prefill_ms={"m": {shape: 10.0 * (i + 1)}}, notes=[f"note {i}"])
        run.put("m", shape, report.OURS, concurrency, {**point, "tokens_per_s": 100.0 * (i + 1)})
        run.save_json(tmp_path / f"run{i}.json")
        runs.append(tmp_path / f"run{i}.json")
    import subprocess
    import sys

    result = subprocess.run([sys.executable, str(REPO_ROOT / "tools" / "bench_report.py"), "--out",
                             str(tmp_path / "merged"), *map(str, runs)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    merged = report.Results.load(tmp_path / "merged.json")
    assert merged.get("m", "short", report.OURS, 1)["tokens_per_s"] == 100.0
    assert merged.get("m", "long", report.OURS, 4)["tokens_per_s"] == 200.0
    assert merged.prefill_ms == {"m": {"short": 10.0, "long": 20.0}} and merged.notes == ["note 0", "note 1"]
    assert merged.concurrencies() == [1, 4]
    text = (tmp_path / "merged.md").read_text()
    assert "## m, short" in text and "## m, long" in text
    assert (tmp_path / "merged_throughput.png").exists() and (tmp_path / "merged_ttft.png").exists()


def test_every_bench_module_imports():
    """The benchmark's modules run only under `make bench`; an import that breaks must fail here, not there."""
    import importlib
    import pkgutil

    import bench

    for module in pkgutil.walk_packages(bench.__path__, "bench."):
        importlib.import_module(module.name)


def _bench_serving():
    from bench import serving

    return serving


def test_prompts_have_exactly_the_asked_token_count_of_a_tokenizer_json(tmp_path):
    from conftest import copy_test_hf_tokenizer
    from bench.workload import make_prompts
    from mstriton.tokenizer import load_tokenizer

    copy_test_hf_tokenizer(tmp_path)
    tokenizer = load_tokenizer(tmp_path / "tokenizer.json")
    prompts = make_prompts(tokenizer, 4, 50, seed=2)
    assert len(set(prompts)) == 4 and [len(tokenizer.encode(p)) for p in prompts] == [50] * 4
    assert make_prompts(tmp_path, 4, 50, seed=2) == prompts  # the folder, loaded by make_prompts itself


def test_each_weight_format_is_a_system_of_its_own_repository():
    bench = _bench_serving()
    assert {"ours-q4_1", "ours-bf16", "ours-f32", "engine-q4_1", "llamacpp-q4_1", "llamacpp-f16",
            "llamacpp-f32"} <= set(bench.ALL_SYSTEMS)
    assert set(bench.SYSTEMS) <= set(bench.ALL_SYSTEMS) and len(set(bench.ALL_SYSTEMS)) == len(bench.ALL_SYSTEMS)
    assert set(bench.DEFAULT_SYSTEMS["smollm2"]) == {"ours-q4_1", "ours-bf16", "ours-f32", "llamacpp-q4_1",
                                                     "llamacpp-f16", "llamacpp-f32", "vllm", "hf-batched",
                                                     "hf-sequential"}
    assert {"vllm", "vllm-bf16", "vllm-f32"} <= set(bench.ALL_SYSTEMS)
    runs = bench.ours_runs("smollm2", ["llamacpp-q4_1", "ours-q4_1", "engine-bf16", "ours-bf16", "hf-batched"])
    assert [(r.weights, r.plain, r.engine) for r in runs] == [
        ("Q4_1", "mstriton Q4_1 (tritonserver)", None),
        ("bfloat16", "mstriton bfloat16 (tritonserver)", "engine alone bfloat16")]
    assert runs[1].prefill_key == "smollm2 bfloat16"
    [default] = bench.ours_runs("demo", bench.SYSTEMS)  # the existing systems: one float32 repository, as before
    assert (default.weights, default.plain, default.grouped, default.engine, default.prefill_key) == (
        "float32", report.OURS, report.OURS_GROUPED, report.ENGINE, "demo")


def test_llamacpp_types_a_model_cannot_have_are_not_run(tmp_path):
    from bench.models import BenchModel

    bench = _bench_serving()
    folder = BenchModel("demo", tmp_path, tmp_path, 1024, lambda: tmp_path)
    gguf = BenchModel("smollm2", tmp_path / "m.gguf", tmp_path, 8192, lambda: tmp_path, gguf=tmp_path / "m.gguf",
                      gguf_type="q4_1")
    assert bench.applicable(folder, "llamacpp-f16") is None and bench.applicable(gguf, "llamacpp-f32") is None
    assert bench.applicable(gguf, "llamacpp-q4_1") is None
    assert "no Q4_1 GGUF" in bench.applicable(folder, "llamacpp-q4_1")
    assert bench.llamacpp_gguf(gguf, "q4_1") == tmp_path / "m.gguf"  # served as it is, nothing converted


def test_report_puts_each_format_beside_llamacpp_on_the_same_weights():
    bench = _bench_serving()
    results = report.Results(date="2026-12-05", machine="m", versions={}, tools={}, prefill_ms={})
    point = dict(requests=4, output_tokens=400, seconds=1.0, tokens_per_s=100.0, requests_per_s=4.0,
                 ttft_p50_ms=15.0, ttft_p99_ms=20.0, itl_p50_ms=2.0, itl_p99_ms=3.0)
    shape = "128 in / 128 out"
    speeds = {"mstriton Q4_1 (tritonserver)": 60.0, "llama.cpp server Q4_1": 80.0,
              "mstriton bfloat16 (tritonserver)": 50.0, "llama.cpp server f16": 100.0,
              "llama.cpp server f32": 40.0, report.HF_BATCHED: 25.0}
    for c in (1, 4):
        for system, speed in speeds.items():
            results.put("smollm2", shape, system, c, {**point, "tokens_per_s": speed * c})
    results.put("smollm2", shape, "llama.cpp server Q4_1", 4, {"error": "failed: x"})
    results.prefill_ms["smollm2 Q4_1"] = {shape: 42.0}
    text = bench.markdown(results, [1, 4])
    assert "| Q4_1 | **ours Q4_1 / llama.cpp Q4_1, tokens/s** | **0.75** | **n/a** |" in text
    assert "| bfloat16 | **ours bfloat16 / llama.cpp f16, tokens/s** | **0.50** | **0.50** |" in text
    assert "| Q4_1 | ours Q4_1 / transformers, static batch (float32), tokens/s | 2.40 | 2.40 |" in text
    assert "| Q4_1 | TTFT p50 ms, ours / llama.cpp Q4_1 | 15 / 15 | 15 / n/a |" in text
    assert "| float32 | transformers, static batch, tokens/s | 25.0 | 100.0 |" in text
    assert "| f32 | llama.cpp server f32, tokens/s | 40.0 | 160.0 |" in text  # no ours float32 was run
    assert "Q4_1 42 ms" in text
    # report.py's own ratios are all against the default conversion, not run here: replaced
    assert "serving efficiency = ours / engine alone" not in text and "ours / llama.cpp server Q4_1" not in text
    assert text.index("## smollm2, 128 in / 128 out") < text.index("| weights |") < text.index("| system |")
    assert "| llama.cpp server Q4_1 | 4 | failed: x |" in text


def test_smollm2_prompts_are_cut_with_the_tokenizer_our_converter_writes(tmp_path):
    from bench import models
    from mstriton.model.gguf_tokenizer import tokenizer_files
    from mstriton.tokenizer import load_tokenizer

    try:
        model = models.smollm2(tmp_path)
    except FileNotFoundError as exc:
        pytest.skip(str(exc))
    assert (model.checkpoint, model.gguf, model.gguf_type, model.max_positions) == (
        model.gguf, model.gguf, "q4_1", 8192)
    written = tokenizer_files(models.gguf_metadata(model.gguf))  # what gguf_source gives the converter
    assert {p.name: p.read_text(encoding="utf-8") for p in model.tokenizer.iterdir()} == written
    assert load_tokenizer(model.tokenizer).encode("Hello world") == [19556, 905]  # no BOS, as llama.cpp
    made = (model.tokenizer / "tokenizer.json").stat().st_mtime_ns
    assert (models.smollm2(tmp_path).tokenizer / "tokenizer.json").stat().st_mtime_ns == made  # not rewritten


def test_a_perf_analyzer_run_stops_when_the_server_dies_under_it():
    """perf_analyzer's streams waited forever on a dead tritonserver; the run must end within a second or two."""
    server = subprocess.Popen(["sleep", "1"])
    started = time.monotonic()
    with pytest.raises(ServerDied, match="exited with status 0"):
        run_watching(["sleep", "60"], server, timeout=120)
    assert time.monotonic() - started < 10
    finished = run_watching(["sh", "-c", "echo out; echo err >&2; exit 3"], None, timeout=10)
    assert (finished.returncode, finished.stdout, finished.stderr) == (3, "out\n", "err\n")
    with pytest.raises(RuntimeError, match="ran over 1 s"):
        run_watching(["sleep", "60"], None, timeout=1)


def test_the_soak_report_shows_memory_growth_over_the_second_half_of_the_run():
    from bench import soak

    results = [soak.Result(door="grpc_stream", kind="greedy", outcome="ok", start=0.0, times=[0.1, 0.2], end=0.2,
                           matches=True),
               soak.Result(door="openai_chat", kind="invalid", outcome="refused", start=0.0, times=[], end=0.1,
                           message="HTTP 400: 'top_p' must be a number in (0, 1], got 5.0")]
    series = [(30.0, {"decode": 3100.0}), (60.0, {"decode": 3900.0}), (90.0, {"decode": 4000.0})]
    report = soak.summary(results, {"decode": 3000.0}, {"decode": 4050.0}, {"model": "m", "minutes": 2,
                          "slots": 4, "queue": 8, "max_tokens": 8, "timeout_s": 10, "server_exit": 0}, series)
    memory = report["memory"]["decode"]
    # the middle sample is the one nearest half of the last sample's time (45 s): 30 s, the first
    assert (memory["growth_mib"], memory["middle_mib"], memory["second_half_growth_mib"]) == (1050, 3100, 950)
    text = soak.markdown(report)
    assert "| decode | 3000 | 3100 | 4050 | 1050 | 950 |" in text and "at 30 s MiB" in text
    assert report["requests"] == 2 and report["doors"]["openai_chat"]["refused"] == 1
