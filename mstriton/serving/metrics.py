"""Prometheus metrics of our models, exported on Triton's metrics port through the Python backend's
MetricFamily API (the module is passed in: it exists only inside the backend's stub)."""

from __future__ import annotations

# Seconds; wide enough for a CPU (tens of ms per token) and for an NPU (a few ms).
LATENCY_BUCKETS = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0]


class StatsMetrics:
    """Metrics that mirror a stats() dict of counts now and running totals: gauges set only when their value
    changed, counters advanced by what a total grew since the last update."""

    def __init__(self):
        self.families = []  # a MetricFamily must outlive its metrics
        self.last: dict[int, float] = {}  # id(gauge) -> the value last set
        self.counted: dict[str, int] = {}  # stats key -> the total already added to its counter

    def _set(self, gauge, value) -> None:
        # Every set is a message to the server process, and this runs often (after every decode step): a gauge is set
        # only when its value changed (it still changes at once, e.g. when a cancel frees a slot).
        if self.last.get(id(gauge)) != value:
            self.last[id(gauge)] = value
            gauge.set(value)

    def _add_totals(self, counters, stats: dict) -> None:
        """`counters`: (counter, stats key of its running total) pairs."""
        for counter, key in counters:
            added = stats[key] - self.counted.get(key, 0)
            if added:
                counter.increment(added)
                self.counted[key] = stats[key]


class DecodeMetrics(StatsMetrics):
    """What MindSpore Serving's get_bs / get_request_numbers answered: running and waiting requests and
    KV-cache use, as gauges, plus the decode step's batch size and duration."""

    def __init__(self, pb_utils, model: str):
        super().__init__()
        labels = {"model": model}
        gauge = pb_utils.MetricFamily.GAUGE

        def family(name, description, kind=gauge):
            self.families.append(pb_utils.MetricFamily(name=name, description=description, kind=kind))
            return self.families[-1]

        self.running = family("mstriton_requests_running", "Requests generating in the decode batch").Metric(labels)
        self.prefilling = family("mstriton_requests_prefilling", "Admitted requests whose prompt is being computed") \
            .Metric(labels)
        self.waiting = family("mstriton_requests_waiting", "Requests queued for KV-cache blocks or a decode slot") \
            .Metric(labels)
        self.blocks_used = family("mstriton_kv_cache_blocks_used", "KV-cache blocks held by sequences") \
            .Metric(labels)
        self.blocks_total = family("mstriton_kv_cache_blocks_total", "KV-cache blocks in the pool").Metric(labels)
        self.block_size = family("mstriton_kv_cache_block_size", "Tokens per KV-cache block").Metric(labels)
        self.tokens_used = family("mstriton_kv_cache_tokens_used", "Tokens held in the KV cache").Metric(labels)
        self.usage = family("mstriton_kv_cache_usage_ratio", "Blocks held / blocks in the KV-cache pool") \
            .Metric(labels)
        counter = pb_utils.MetricFamily.COUNTER
        # vLLM's names, so that its dashboards read ours: prefix-cache lookups and hits counted in prompt tokens
        self.prefix_queries = family("vllm:prefix_cache_queries_total",
                                     "Prompt tokens looked up in the prefix cache", counter).Metric(labels)
        self.prefix_hits = family("vllm:prefix_cache_hits_total", "Prompt tokens found in the prefix cache",
                                  counter).Metric(labels)
        self.preemptions = family("vllm:num_preemptions_total", "Sequences preempted for KV-cache blocks",
                                  counter).Metric(labels)
        # speculative decoding (serving/speculation.py), under vLLM's names: the acceptance rate is accepted / drafts
        self.spec_drafts = family("vllm:spec_decode_num_draft_tokens_total", "Drafted tokens verified",
                                  counter).Metric(labels)
        self.spec_accepted = family("vllm:spec_decode_num_accepted_tokens_total", "Drafted tokens accepted",
                                    counter).Metric(labels)
        self.adopted = family("mstriton_prompts_adopted_total", "Prompts computed by the prefill model and adopted "
                              "from its shared pool (disaggregated shape)", counter).Metric(labels)
        self.batch = family("mstriton_decode_batch_size", "Sequences in the last decode step").Metric(labels)
        self.step_time = family("mstriton_decode_step_seconds", "Duration of decode steps",
                                pb_utils.MetricFamily.HISTOGRAM).Metric(labels, buckets=LATENCY_BUCKETS)

    def on_queue(self, scheduler) -> None:
        stats = scheduler.stats()
        self._set(self.running, stats["running"])
        self._set(self.prefilling, stats["prefilling"])
        self._set(self.waiting, stats["waiting"])
        self._set(self.blocks_used, stats["kv_blocks_used"])
        self._set(self.blocks_total, stats["kv_blocks_total"])
        self._set(self.block_size, stats["kv_block_size"])
        self._set(self.tokens_used, stats["kv_tokens_used"])
        self._set(self.usage, stats["kv_blocks_used"] / max(stats["kv_blocks_total"], 1))
        self._add_totals(((self.prefix_queries, "prefix_cache_queries"), (self.prefix_hits, "prefix_cache_hits"),
                          (self.preemptions, "preemptions"), (self.spec_drafts, "spec_draft_tokens"),
                          (self.spec_accepted, "spec_accepted_tokens"), (self.adopted, "prompts_adopted")), stats)

    def on_step(self, scheduler, batch: int, seconds: float) -> None:
        self._set(self.batch, batch)
        self.step_time.observe(seconds)


class RequestMetrics:
    """Per-request latencies and token counts, seen where the client's stream is: the front model."""

    def __init__(self, pb_utils, model: str):
        labels = {"model": model}
        self.families = []  # a MetricFamily must outlive its metrics

        def family(name, description, kind):
            self.families.append(pb_utils.MetricFamily(name=name, description=description, kind=kind))
            return self.families[-1]

        def histogram(name, description):
            return family(name, description, pb_utils.MetricFamily.HISTOGRAM).Metric(labels, buckets=LATENCY_BUCKETS)

        def counter(name, description):
            return family(name, description, pb_utils.MetricFamily.COUNTER).Metric(labels)

        self.ttft = histogram("mstriton_time_to_first_token_seconds", "Request arrival to first token")
        self.tpot = histogram("mstriton_time_per_output_token_seconds", "Time between tokens after the first")
        self.e2e = histogram("mstriton_request_latency_seconds", "Request arrival to its last response")
        self.prompt_tokens = counter("mstriton_prompt_tokens_total", "Prompt tokens processed")
        self.generated_tokens = counter("mstriton_generation_tokens_total", "Tokens generated")
        finished = family("mstriton_requests_finished_total", "Finished requests by finish reason",
                          pb_utils.MetricFamily.COUNTER)
        self.requests = {reason: finished.Metric({"model": model, "finish_reason": reason})
                         for reason in ("length", "stop", "end_id", "cancelled", "error")}

    def finished(self, arrival: float, first: float | None, last: float, prompt: int, generated: int,
                 reason: str) -> None:
        if first is not None:
            self.ttft.observe(first - arrival)
            if generated > 1:
                self.tpot.observe((last - first) / (generated - 1))
        self.e2e.observe(last - arrival)
        self.prompt_tokens.increment(prompt)
        self.generated_tokens.increment(generated)
        self.requests.get(reason, self.requests["error"]).increment(1)


class PrefillMetrics(StatsMetrics):
    """The prefill model's pool (disaggregated shape): leases out to the decode model, blocks held, and its
    prefix cache. Set by one thread only (its reaper), see DecodeMetrics' lock for why that matters."""

    def __init__(self, pb_utils, model: str):
        super().__init__()
        labels = {"model": model}
        gauge, counter = pb_utils.MetricFamily.GAUGE, pb_utils.MetricFamily.COUNTER

        def family(name, description, kind=gauge):
            self.families.append(pb_utils.MetricFamily(name=name, description=description, kind=kind))
            return self.families[-1].Metric(labels)

        self.leases = family("mstriton_prefill_kv_leases", "Prompts whose blocks are leased to the decode model")
        self.blocks_used = family("mstriton_prefill_kv_blocks_used",
                                  "Blocks of the prefill model's shared pool held by leased prompts")
        self.blocks_total = family("mstriton_prefill_kv_blocks_total", "Blocks of the prefill model's shared pool")
        self.expired = family("mstriton_prefill_kv_leases_expired_total",
                              "Leases taken back unclaimed after their deadline", counter)
        self.prefix_queries = family("mstriton_prefill_prefix_cache_queries_total",
                                     "Prompt tokens looked up in the prefill model's prefix cache", counter)
        self.prefix_hits = family("mstriton_prefill_prefix_cache_hits_total",
                                  "Prompt tokens found in the prefill model's prefix cache", counter)

    def update(self, stats: dict[str, int]) -> None:
        self._set(self.leases, stats["leases"])
        self._set(self.blocks_used, stats["kv_blocks_used"])
        self._set(self.blocks_total, stats["kv_blocks_total"])
        self._add_totals(((self.expired, "leases_expired"), (self.prefix_queries, "prefix_cache_queries"),
                          (self.prefix_hits, "prefix_cache_hits")), stats)
