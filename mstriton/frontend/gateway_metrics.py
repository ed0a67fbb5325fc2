"""vLLM's metrics on the frontend's /metrics: the model-server protocol of Kubernetes' Gateway API Inference
Extension (its endpoint picker scrapes the port it sends requests to, reading vLLM's names) and the queue gauge a
KEDA ScaledObject scales on (docs/replicas.md).

Gauges, read from tritonserver's metrics port at each scrape (the decode models' own gauges, which count every
request whatever door it came through):

    vllm:num_requests_waiting     queued for KV-cache blocks or a decode slot
    vllm:num_requests_running     generating, or having their prompt computed
    vllm:kv_cache_usage_perc      blocks held / blocks in the pool, a fraction from 0 to 1 as vLLM's
    vllm:gpu_cache_usage_perc     the same, under the name endpoint pickers before vLLM 0.10 read
    vllm:cache_config_info        1, with labels block_size (tokens per block) and num_gpu_blocks (the pool's)

vllm:num_requests_waiting also counts the requests this frontend has sent that are neither prefilling nor
generating yet (gateway_gauges). Each comes first as the pod's sum over the LLMs it serves (no label: what an endpoint picker reads when its metric
spec names no label, as it takes a family's first series), then once per LLM with `model_name`.

Counters and histograms of the requests this frontend serves, measured here as each door's chunks arrive, with
`model_name`: vllm:time_to_first_token_seconds, vllm:inter_token_latency_seconds (a chunk of k tokens after a gap
of g seconds counts k gaps of g / k; a first chunk of several tokens counts only its TTFT),
vllm:e2e_request_latency_seconds, vllm:prompt_tokens_total,
vllm:generation_tokens_total, vllm:request_success_total (by finished_reason). Requests sent to tritonserver's own
ports are not in them; the front model's mstriton_* histograms on the metrics port count those.
"""

from __future__ import annotations

import re
import time
import urllib.request
from typing import Callable

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import Metric

# vLLM's buckets for TTFT, ITL and end-to-end latency, cut to what a CPU or an NPU sees
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
ITL_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0)
E2E_BUCKETS = (0.1, 0.3, 0.5, 1.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 60.0, 120.0, 240.0, 480.0)

# the decode models' gauges on tritonserver's metrics port (serving/metrics.py), by the LLM they serve
_DECODE_GAUGE = re.compile(r'^(mstriton_(?:requests_(?:running|prefilling|waiting)|kv_cache_(?:usage_ratio|'
                           r'blocks_total|block_size)))\{[^}]*model="([^"]+)_decode"[^}]*\}\s+([0-9.eE+-]+)$')
SCRAPE_TIMEOUT = 2.0  # seconds for tritonserver's metrics port: a scrape must not hang on a restarting server


def decode_gauges(text: str) -> dict[str, dict[str, float]]:
    """LLM -> {gauge name -> value} from tritonserver's metrics text."""
    gauges: dict[str, dict[str, float]] = {}
    for line in text.splitlines():
        match = _DECODE_GAUGE.match(line)
        if match:
            gauges.setdefault(match.group(2), {})[match.group(1)] = float(match.group(3))
    return gauges


def gateway_gauges(gauges: dict[str, dict[str, float]], pending: dict[str, int] | None = None) -> list[Metric]:
    """The vLLM gauge families of `decode_gauges`' reading: the pod's sum first, then one series per LLM.

    `pending`: LLM -> requests this frontend has sent that have no token yet. Those not yet prefilling are waiting
    too, wherever they are (in the frontend, the front model, the tokenizer step): under a burst on a busy CPU most
    of a burst's requests were still on their way to the decode model's queue (48 sent at once into 16 slots: the
    decode model counted at most 6 waiting)."""
    pending = pending or {}
    gauges = {**{llm: {} for llm in pending}, **gauges}

    def value(llm: str, name: str) -> float:
        if name == "mstriton_requests_waiting":
            queued = gauges[llm].get(name, 0.0)
            return max(queued, pending.get(llm, 0) - gauges[llm].get("mstriton_requests_prefilling", 0.0))
        return gauges[llm].get(name, 0.0)

    def family(name: str, doc: str, per_llm: Callable[[str], float], total: float) -> Metric:
        metric = Metric(name, doc, "gauge")
        metric.add_sample(name, {}, total)
        for llm in sorted(gauges):
            metric.add_sample(name, {"model_name": llm}, per_llm(llm))
        return metric

    def running(llm: str) -> float:
        return value(llm, "mstriton_requests_running") + value(llm, "mstriton_requests_prefilling")

    blocks = {llm: value(llm, "mstriton_kv_cache_blocks_total") for llm in gauges}
    held = {llm: value(llm, "mstriton_kv_cache_usage_ratio") * blocks[llm] for llm in gauges}
    usage_total = sum(held.values()) / max(sum(blocks.values()), 1.0)
    families = [
        family("vllm:num_requests_waiting", "Requests queued for KV-cache blocks or a decode slot",
               lambda llm: value(llm, "mstriton_requests_waiting"),
               sum(value(llm, "mstriton_requests_waiting") for llm in gauges)),
        family("vllm:num_requests_running", "Requests generating or having their prompt computed", running,
               sum(running(llm) for llm in gauges)),
    ]
    for name in ("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc"):
        families.append(family(name, "KV-cache blocks held / blocks in the pool (1 is full)",
                               lambda llm: value(llm, "mstriton_kv_cache_usage_ratio"), usage_total))
    info = Metric("vllm:cache_config_info", "KV-cache configuration (the value is 1)", "gauge")
    sizes = {int(value(llm, "mstriton_kv_cache_block_size")) for llm in gauges}
    info.add_sample("vllm:cache_config_info", {"block_size": str(sizes.pop() if len(sizes) == 1 else 0),
                                               "num_gpu_blocks": str(int(sum(blocks.values())))}, 1.0)
    for llm in sorted(gauges):
        info.add_sample("vllm:cache_config_info", {
            "model_name": llm, "block_size": str(int(value(llm, "mstriton_kv_cache_block_size"))),
            "num_gpu_blocks": str(int(blocks[llm]))}, 1.0)
    return families + [info]


class DecodeGaugeCollector:
    """A prometheus_client collector: at each scrape, tritonserver's decode gauges as vLLM's (none while
    tritonserver's metrics port does not answer: an endpoint picker then keeps its last reading)."""

    def __init__(self, metrics_url: str, timings: "RequestTimings | None" = None):
        self.metrics_url, self.timings = metrics_url, timings

    def collect(self):
        try:
            with urllib.request.urlopen(self.metrics_url, timeout=SCRAPE_TIMEOUT) as response:
                text = response.read().decode()
        except OSError:
            return
        yield from gateway_gauges(decode_gauges(text), self.timings.pending() if self.timings else None)


class RequestTimings:
    """vLLM's request histograms and counters, observed by the request path every door shares."""

    def __init__(self, registry: CollectorRegistry):
        labels = ["model_name"]
        self.ttft = Histogram("vllm:time_to_first_token_seconds", "Request arrival to its first token", labels,
                              buckets=TTFT_BUCKETS, registry=registry)
        self.itl = Histogram("vllm:inter_token_latency_seconds", "Time between two tokens of a request", labels,
                             buckets=ITL_BUCKETS, registry=registry)
        self.e2e = Histogram("vllm:e2e_request_latency_seconds", "Request arrival to its last token", labels,
                             buckets=E2E_BUCKETS, registry=registry)
        self.prompt_tokens = Counter("vllm:prompt_tokens", "Prompt tokens of finished requests", labels,
                                     registry=registry)
        self.generation_tokens = Counter("vllm:generation_tokens", "Tokens generated", labels, registry=registry)
        self.success = Counter("vllm:request_success", "Requests finished, by reason", labels + ["finished_reason"],
                               registry=registry)
        self._pending: dict[str, int] = {}  # model -> requests started that have no token yet (one event loop)

    def start(self, model: str, clock: Callable[[], float] = time.monotonic) -> "RequestTimer":
        self._pending[model] = self._pending.get(model, 0) + 1
        return RequestTimer(self, model, clock)

    def answered(self, model: str) -> None:
        """A request started by `start` has its first token, or has ended without one."""
        self._pending[model] -= 1

    def pending(self) -> dict[str, int]:
        return dict(self._pending)


class RequestTimer:
    """One request's clock (from RequestTimings.start): `chunk()` at each chunk of text, `finished()` at its
    end, `closed()` however it ends."""

    def __init__(self, timings: RequestTimings, model: str, clock: Callable[[], float] = time.monotonic):
        self.timings, self.model, self.clock = timings, model, clock
        self.arrival = self.last = clock()
        self.tokens = 0  # generated so far
        self.pending = True  # counted in timings.pending() until its first token or its end

    def chunk(self, completion_tokens: int) -> None:
        """A chunk arrived carrying the request's first `completion_tokens` tokens."""
        now, new = self.clock(), completion_tokens - self.tokens
        if new <= 0:
            return
        if self.tokens == 0:  # the first token's wait; the first chunk's other tokens have no gap of their own
            self.timings.ttft.labels(self.model).observe(now - self.arrival)
            self.closed()
        else:
            itl, gap = self.timings.itl.labels(self.model), (now - self.last) / new
            for _ in range(new):
                itl.observe(gap)
        self.tokens, self.last = completion_tokens, now

    def closed(self) -> None:
        """No longer waiting for a first token (call at the request's end, whatever ended it)."""
        if self.pending:
            self.pending = False
            self.timings.answered(self.model)

    def finished(self, prompt_tokens: int, reason: str) -> None:
        t = self.timings
        t.e2e.labels(self.model).observe(self.clock() - self.arrival)
        t.prompt_tokens.labels(self.model).inc(prompt_tokens)
        t.generation_tokens.labels(self.model).inc(self.tokens)
        t.success.labels(self.model, reason).inc()
