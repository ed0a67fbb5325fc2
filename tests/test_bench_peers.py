"""The peers benchmark's pure parts (bench/peers.py): the bodies each system gets, the usage check, the ratio of our
best system to the best peer, and the report from a fabricated run. No server is started."""

from __future__ import annotations

import json

import pytest

from bench import peers
from bench.timing import RequestTiming


def point(tokens_per_s: float, ttft: float = 100.0) -> dict:
    return {"requests": 16, "failed": 0, "output_tokens": 2048, "seconds": 2048 / tokens_per_s,
            "output_tokens_per_s": tokens_per_s, "requests_per_s": tokens_per_s / 128, "ttft_p50_ms": ttft,
            "ttft_p90_ms": ttft * 1.5, "ttft_p99_ms": ttft * 2, "itl_p50_ms": 1e3 / tokens_per_s, "itl_p99_ms": 20.0,
            "prompt_tokens_avg": 128.0, "prompt_tokens_range": [127, 129], "output_tokens_avg": 128.0,
            "usage_mismatches": 0, "load_1m": [1.0, 2.5]}


def fabricated() -> dict:
    base = peers.base_body("<one of the prompts>")
    return {
        "date": "2026-12-07", "started": "2026-12-07T10:00:00", "finished": "2026-12-07T11:00:00",
        "command": "python tools/bench_peers.py --concurrency 1,4", "machine": "Some CPU, 2 cores",
        "floors": {"read_bandwidth_gbs": {"kernels read, 2 threads": 25.0}, "isa": "avx2", "int8_isa": "avx2",
                   "threads": 2, "fma_peak_gflops": 100.0, "weights_bytes": 100_000_000, "decode_floor_ms": 4.0},
        "versions": {"mindspore": "2.9.0", "mstriton": "abc1234"},
        "systems": {s: peers.SYSTEMS[s].what for s in ("ours-q4_1", "ours-q4_1-int8", "llamacpp-q4_1", "vllm")},
        "points": {"ours-q4_1": {"1": point(100.0, 90.0), "4": point(200.0)},
                   "ours-q4_1-int8": {"1": point(120.0, 80.0), "4": {"error": "failed: RuntimeError: boom"}},
                   "llamacpp-q4_1": {"1": point(80.0, 60.0), "4": point(250.0)},
                   "vllm": {"1": point(60.0, 200.0), "4": {"error": "not run: PeerUnavailable: no venv"}}},
        "commands": {"llamacpp-q4_1": "llama-server --model x.gguf"}, "notes": ["a note of the run"],
        "settings": {"model_file": "x.gguf", "concurrency": [1, 4], "prompt_tokens": 128, "prompt_tokens_chat": 128,
                     "output_tokens": 128, "distinct_prompts": 20, "seed": 0, "requests": {"1": 16, "4": 16},
                     "base_body": base, "system_fields": {k: f(128) for k, f in peers.SYSTEM_FIELDS.items()}},
    }


def test_every_system_gets_the_same_body_plus_what_fixes_its_length():
    base = peers.base_body("Hello there", 128)
    assert base["stream"] is True and base["stream_options"] == {"include_usage": True}
    assert base["temperature"] == 0 and base["max_tokens"] == 128
    assert base["messages"] == [{"role": "user", "content": "Hello there"}]
    bodies = {system: peers.body_for(system, base) for system in peers.SYSTEMS}
    for system, body in bodies.items():
        assert {k: v for k, v in body.items() if k in base} == base, system
    assert bodies["ours-q4_1"]["min_tokens"] == 128 and bodies["ours-q4_1-int8"]["min_tokens"] == 128
    assert bodies["vllm"]["min_tokens"] == 128
    assert bodies["llamacpp-q4_1"]["ignore_eos"] is True and bodies["llamacpp-q4_1"]["cache_prompt"] is False
    assert "min_tokens" not in bodies["llamacpp-q4_1"]
    assert "ignore_eos" not in bodies["ours-q4_1"]
    assert base == peers.base_body("Hello there", 128)  # not changed in place


def test_our_systems_differ_only_by_the_activations_variable():
    assert dict(peers.SYSTEMS["ours-q4_1"].env) == {peers.ACTIVATIONS: "float32"}
    assert dict(peers.SYSTEMS["ours-q4_1-int8"].env) == {peers.ACTIVATIONS: "int8"}
    assert "vllm" in peers.SYSTEMS and "vllm" not in peers.DEFAULT_SYSTEMS


def test_usage_mismatches_name_requests_not_of_max_tokens():
    timings = [RequestTiming(0.0, [1.0] * 4, 10, completion_tokens=4, content_chunks=4),
               RequestTiming(0.0, [1.0] * 4, 10, completion_tokens=3, content_chunks=4),
               RequestTiming(0.0, [1.0] * 4, 10, completion_tokens=None, content_chunks=4)]
    found = peers.usage_mismatches(timings, 4)
    assert len(found) == 2 and found[0].startswith("request 1:") and "None" in found[1]


def test_ratio_is_our_best_over_the_best_peer():
    results = fabricated()
    by_c = peers.ratios(results)
    assert by_c["1"] == {"ours": "ours-q4_1-int8", "peer": "llamacpp-q4_1", "ratio": pytest.approx(1.5)}
    assert by_c["4"] == {"ours": "ours-q4_1", "peer": "llamacpp-q4_1", "ratio": pytest.approx(0.8)}  # failed skipped
    ttft = peers.ratios(results, "ttft_p50_ms", highest=False)
    assert ttft["1"]["ratio"] == pytest.approx(80 / 60) and ttft["1"]["ours"] == "ours-q4_1-int8"
    del results["points"]["llamacpp-q4_1"]["4"]
    assert peers.ratios(results)["4"] is None  # no peer measured at c=4
    assert peers.ratio_cells(peers.ratios(results), [1, 4]) == ["**1.50** (ours-q4_1-int8 / llamacpp-q4_1)", "n/a"]


def test_markdown_tables_rows_per_system_columns_per_concurrency():
    text = peers.markdown(fabricated())
    assert "| system | c=1 | c=4 |" in text
    assert "| ours-q4_1 | 100.0 | 200.0 |" in text
    assert "| ours-q4_1-int8 | 120.0 | failed |" in text
    assert "| llamacpp-q4_1 | 80.0 | 250.0 |" in text
    assert "| ours (best of our systems) / best peer | **1.50** (ours-q4_1-int8 / llamacpp-q4_1) | " \
           "**0.80** (ours-q4_1 / llamacpp-q4_1) |" in text
    assert "| ours-q4_1 | 90 | 100 |" in text                      # TTFT p50
    assert "| ours-q4_1-int8 | 4 | failed: RuntimeError: boom |" in text   # the error in the per-point table
    assert "read bandwidth 25.0 GB/s (kernels read, 2 threads)" in text and "`avx2`" in text
    assert "4.0 ms" in text and "Some CPU, 2 cores" in text
    assert json.dumps(fabricated()["settings"]["base_body"]) in text
    assert '"ignore_eos": true' in text and '"min_tokens": 128' in text
    assert "python tools/bench_peers.py --concurrency 1,4" in text and "llama-server --model x.gguf" in text
    assert "- a note of the run" in text


def test_report_is_written_with_its_plot(tmp_path):
    written = peers.write_report(fabricated(), tmp_path / "peers")
    assert [p.name for p in written] == ["peers.json", "peers.md", "peers.png"]
    assert json.loads((tmp_path / "peers.json").read_text())["points"]["ours-q4_1"]["1"]["output_tokens_per_s"] == 100
    assert not list(tmp_path.glob("*.partial*"))


def test_llama1b_systems_serve_its_q8_0_and_bf16_files_and_vllm_its_folder():
    model = peers.MODELS["llama1b"]
    assert model.weights == "Q8_0" and model.ours_file == "q8_0" and model.output_tokens == 64
    assert set(model.default_systems) == {"ours-q8_0", "ours-q8_0-int8", "llamacpp-q8_0", "llamacpp-bf16"}
    assert {s: model.systems[s].file for s in model.default_systems} == {
        "ours-q8_0": "q8_0", "ours-q8_0-int8": "q8_0", "llamacpp-q8_0": "q8_0", "llamacpp-bf16": "bf16"}
    assert dict(model.systems["ours-q8_0-int8"].env) == {peers.ACTIVATIONS: "int8"}
    assert model.systems["vllm"].kind == "vllm" and model.systems["vllm"].file == "hf"
    assert peers.base_body("Hi", 64, model.name)["model"] == "llama1b"
    assert peers.MODELS["smollm2"].default_systems == peers.DEFAULT_SYSTEMS  # the default run is unchanged


def test_the_report_names_the_model_of_its_run():
    results = fabricated()
    assert peers.model_of(results) is peers.SMOLLM2  # a run from before --model
    assert "SmolLM2-135M-Instruct, one GGUF file for every system (x.gguf)" in peers.markdown(results)
    results["settings"]["model"] = "llama1b"
    results["floors"]["weights_file"] = "llama1b-q8_0.gguf"
    text = peers.markdown(results)
    assert text.startswith("# Ours against llama.cpp and vLLM CPU on llama1b, ")
    assert "Llama-3.2-1B's shape" in text and "`make bench-peers-1b`" in text
    assert "the GGUF file llama1b-q8_0.gguf's 100 MB" in text
