"""The frontend's vLLM metrics (frontend/gateway_metrics.py) without a server: tritonserver's decode gauges read and
turned into the gauges the inference gateway's endpoint picker reads, and one request's timings."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, generate_latest

from mstriton.frontend.gateway_metrics import RequestTimings, decode_gauges, gateway_gauges

TRITON_METRICS = """\
# HELP mstriton_requests_running Requests generating in the decode batch
# TYPE mstriton_requests_running gauge
mstriton_requests_running{model="a_decode",version="1"} 3
mstriton_requests_running{model="b_decode",version="1"} 1
mstriton_requests_prefilling{model="a_decode",version="1"} 1
mstriton_requests_waiting{model="a_decode",version="1"} 5
mstriton_requests_waiting{model="b_decode",version="1"} 0
mstriton_kv_cache_usage_ratio{model="a_decode",version="1"} 0.5
mstriton_kv_cache_usage_ratio{model="b_decode",version="1"} 0.25
mstriton_kv_cache_blocks_total{model="a_decode",version="1"} 100
mstriton_kv_cache_blocks_total{model="b_decode",version="1"} 300
mstriton_kv_cache_block_size{model="a_decode",version="1"} 16
mstriton_kv_cache_block_size{model="b_decode",version="1"} 16
mstriton_requests_finished_total{model="a",finish_reason="length",version="1"} 7
"""


def samples(families) -> list[tuple[str, dict, float]]:
    return [(s.name, s.labels, s.value) for family in families for s in family.samples]


def test_decode_gauges_are_read_by_llm():
    gauges = decode_gauges(TRITON_METRICS)
    assert sorted(gauges) == ["a", "b"]
    assert gauges["a"] == {"mstriton_requests_running": 3, "mstriton_requests_prefilling": 1,
                           "mstriton_requests_waiting": 5, "mstriton_kv_cache_usage_ratio": 0.5,
                           "mstriton_kv_cache_blocks_total": 100, "mstriton_kv_cache_block_size": 16}


def test_the_pods_sum_comes_first_then_each_llm():
    found = samples(gateway_gauges(decode_gauges(TRITON_METRICS)))
    by_name: dict[str, list] = {}
    for name, labels, value in found:
        by_name.setdefault(name, []).append((labels, value))
    # the first series of each family has no label: an endpoint picker whose spec names none reads that one
    assert by_name["vllm:num_requests_waiting"] == [({}, 5), ({"model_name": "a"}, 5), ({"model_name": "b"}, 0)]
    assert by_name["vllm:num_requests_running"] == [({}, 5), ({"model_name": "a"}, 4), ({"model_name": "b"}, 1)]
    # blocks held over blocks in the pool, over both pools: (50 + 75) / 400
    for name in ("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc"):
        assert by_name[name] == [({}, 0.3125), ({"model_name": "a"}, 0.5), ({"model_name": "b"}, 0.25)]
    assert by_name["vllm:cache_config_info"] == [
        ({"block_size": "16", "num_gpu_blocks": "400"}, 1), ({"model_name": "a", "block_size": "16",
                                                            "num_gpu_blocks": "100"}, 1),
        ({"model_name": "b", "block_size": "16", "num_gpu_blocks": "300"}, 1)]


def test_no_llm_loaded_gives_zeros():
    found = {name: value for name, labels, value in samples(gateway_gauges({})) if not labels}
    assert found["vllm:num_requests_waiting"] == 0 and found["vllm:kv_cache_usage_perc"] == 0


def test_a_requests_timer_counts_its_first_token_gaps_and_end():
    registry = CollectorRegistry()
    timings = RequestTimings(registry)
    now = [10.0]
    timer = timings.start("a", clock=lambda: now[0])
    now[0] = 10.5
    timer.chunk(1)          # TTFT 0.5
    now[0] = 10.7
    timer.chunk(3)          # 2 tokens after 0.2 s: 2 gaps of 0.1
    timer.chunk(3)          # nothing new
    now[0] = 11.0
    timer.finished(prompt_tokens=12, reason="length")
    value = registry.get_sample_value
    assert value("vllm:time_to_first_token_seconds_count", {"model_name": "a"}) == 1
    assert value("vllm:time_to_first_token_seconds_sum", {"model_name": "a"}) == 0.5
    assert value("vllm:inter_token_latency_seconds_count", {"model_name": "a"}) == 2
    assert abs(value("vllm:inter_token_latency_seconds_sum", {"model_name": "a"}) - 0.2) < 1e-9
    assert value("vllm:e2e_request_latency_seconds_sum", {"model_name": "a"}) == 1.0
    assert value("vllm:prompt_tokens_total", {"model_name": "a"}) == 12
    assert value("vllm:generation_tokens_total", {"model_name": "a"}) == 3
    assert value("vllm:request_success_total", {"model_name": "a", "finished_reason": "length"}) == 1
    assert b"vllm:inter_token_latency_seconds_bucket" in generate_latest(registry)


def test_a_first_chunk_of_several_tokens_counts_only_its_ttft():
    registry = CollectorRegistry()
    timer = RequestTimings(registry).start("a", clock=lambda: 1.0)
    timer.chunk(256)  # a non-streamed request's first response
    assert registry.get_sample_value("vllm:inter_token_latency_seconds_count", {"model_name": "a"}) is None
    assert registry.get_sample_value("vllm:time_to_first_token_seconds_count", {"model_name": "a"}) == 1


def test_requests_sent_and_not_yet_prefilling_count_as_waiting():
    """5 requests of `a` sent by the frontend, none with a token yet: 1 is prefilling, the decode model queues 2,
    the other 2 are on their way (front model, tokenizer step): waiting is 4. Once a request has its first token,
    or has ended without one, it is no longer counted."""
    timings = RequestTimings(CollectorRegistry())
    timers = [timings.start("a") for _ in range(5)]
    gauges = {"a": {"mstriton_requests_waiting": 2, "mstriton_requests_prefilling": 1}}
    waiting = {tuple(labels.items()): value for name, labels, value in samples(gateway_gauges(gauges, timings.pending()))
               if name == "vllm:num_requests_waiting"}
    assert waiting == {(): 4, (("model_name", "a"),): 4}
    timers[0].chunk(1)
    timers[1].closed()
    timers[1].closed()  # once
    assert timings.pending() == {"a": 3}
    # a model the frontend sent requests to before tritonserver reported it: its own series
    found = samples(gateway_gauges({}, {"b": 2}))
    assert ("vllm:num_requests_waiting", {"model_name": "b"}, 2) in found
