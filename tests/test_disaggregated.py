"""The disaggregated shape served by the real tritonserver (issue 31): tokenizer -> NAME_prefill -> NAME_sampler ->
NAME_decode, the prompt's KV handed over in shared memory. One server holds the same checkpoint in both shapes:
greedy answers are equal token for token; Triton's dynamic batcher merges concurrent prompts on the prefill and
sampler models (its statistics show batches > 1); every lease comes back and no block stays held after a burst
with cancellations; a prompt the prefill model's pool cannot take is still served (decode computes it)."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from conftest import serving_streaming_checkpoint
from mstriton.server_process import metric_value
from test_server import grpc_stream

PROMPTS = ["The quick brown fox", "Streaming keeps every space", "MindSpore 图模式 🚀", "Numbers 3.14159 and",
           "a", "  leading spaces, double  spaces and a tab\there and a longer prompt to vary the length"]


# The tiny model prefills a prompt in about a millisecond, less than the time between two arrivals of a burst: the
# batchers wait this long for more requests, as a user would set them for a model whose prompts arrive in bursts.
QUEUE_DELAY_US = 20000


def wait_longer(config) -> None:
    config.dynamic_batching.max_queue_delay_microseconds = QUEUE_DELAY_US


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with serving_streaming_checkpoint(tmp_path_factory.mktemp("disaggregated"), {"tiny": 8, "tinyc": 8},
                                      shapes={"tiny": "disaggregated", "tinyc": "colocated"},
                                      edits={"tiny_prefill": wait_longer, "tiny_sampler": wait_longer}) as triton:
        yield triton


def texts(server, model: str, prompts, max_tokens: int = 24, concurrency: int = 8, **inputs) -> list[str]:
    def one(prompt):
        pieces, reasons, error = grpc_stream(server, model, prompt, max_tokens, **inputs)
        assert error is None, error
        return "".join(pieces)

    with ThreadPoolExecutor(concurrency) as pool:
        return list(pool.map(one, prompts))


def test_the_disaggregated_pipeline_has_prefill_and_sampler_steps(server):
    from mstriton.repository import read_config

    steps = [s.model_name for s in read_config(server.repository / "tiny_pipeline").ensemble_scheduling.step]
    assert steps == ["tiny_tokenizer", "tiny_prefill", "tiny_sampler", "tiny_decode"]
    colocated = [s.model_name for s in read_config(server.repository / "tinyc_pipeline").ensemble_scheduling.step]
    assert colocated == ["tinyc_tokenizer", "tinyc_decode"]


def test_greedy_answers_equal_the_colocated_shape_alone_and_under_concurrency(server):
    prompts = PROMPTS * 2
    adopted = metric_value(server.metrics(), "mstriton_prompts_adopted_total", model="tiny_decode")
    colocated = texts(server, "tinyc", prompts, concurrency=1)
    assert texts(server, "tiny", prompts, concurrency=1) == colocated
    assert texts(server, "tiny", prompts, concurrency=8) == colocated
    # every prompt was computed by the prefill model and adopted: none by the decode model
    text = server.metrics()
    assert metric_value(text, "mstriton_prompts_adopted_total", model="tiny_decode") - adopted == 2 * len(prompts)
    assert metric_value(text, "mstriton_prompts_adopted_total", model="tinyc_decode") == 0


def test_the_dynamic_batcher_merges_prompts_on_prefill_and_sampler(server):
    import tritonclient.http as httpclient

    def statistics(model):
        client = httpclient.InferenceServerClient(server.http)
        try:  # closed at once: an open connection keeps tritonserver from exiting until its timeout
            return client.get_inference_statistics(model)["model_stats"][0]
        finally:
            client.close()

    before = {m: statistics(m)["batch_stats"] for m in ("tiny_prefill", "tiny_sampler")}
    texts(server, "tiny", [f"{p} {i}" for i in range(4) for p in PROMPTS], max_tokens=4, concurrency=16)
    for model, earlier in before.items():
        stats = statistics(model)
        counts = {int(b["batch_size"]): int(b["compute_infer"]["count"]) for b in stats["batch_stats"]}
        old = {int(b["batch_size"]): int(b["compute_infer"]["count"]) for b in earlier}
        merged = {size: n - old.get(size, 0) for size, n in counts.items() if size > 1 and n > old.get(size, 0)}
        assert merged, f"{model}: no batch larger than 1 in {counts}"
        assert int(stats["inference_count"]) >= 24


def test_no_lease_or_block_stays_held_after_a_burst_with_cancellations(server):
    def one(i):
        return grpc_stream(server, "tiny", f"{PROMPTS[i % len(PROMPTS)]} {i}", 60,
                           cancel_after=2 if i % 2 else None)

    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(one, range(32)))
    assert sum(error == "cancelled" for _, _, error in results) == 16
    assert all(error is None for _, _, error in results[::2])
    deadline = time.monotonic() + 30
    while True:
        text = server.metrics()
        held = {name: metric_value(text, name, model=model) for name, model in (
            ("mstriton_prefill_kv_leases", "tiny_prefill"), ("mstriton_prefill_kv_blocks_used", "tiny_prefill"),
            ("mstriton_kv_cache_blocks_used", "tiny_decode"), ("mstriton_requests_running", "tiny_decode"))}
        if not any(held.values()) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert not any(held.values()), held
    assert metric_value(text, "mstriton_prefill_kv_leases_expired_total", model="tiny_prefill") == 0
    assert metric_value(text, "mstriton_prefill_kv_blocks_total", model="tiny_prefill") > 0
