"""The inference gateway's gauges under a burst (tools/bench_gateway_burst.py, issue 30): what an endpoint picker
and a KEDA ScaledObject would read from one replica's frontend while a burst of requests arrives, queues and drains.

`python -m mstriton.serve` serves a repository (SmolLM2 by default, as `make run` converts it); a burst of
streamed OpenAI completions is sent through the frontend all at once (more than the decode model's slots, fewer
than slots + queue places, so none is refused), while a sampler reads the frontend's /metrics every `interval`
seconds: vllm:num_requests_waiting, vllm:num_requests_running and vllm:kv_cache_usage_perc (the pod's series), and
the time each scrape took. The report: the peaks, when the queue emptied, when the last request ended, the
scrape's p50/p99 (it reads tritonserver's metrics port each time), and the timeline as a table and a plot.
"""

from __future__ import annotations

import http.client
import json
import threading
import time
from pathlib import Path

from .harness.loops import run_clients
from .harness.servers import ServeProcess, metrics_text
from .report import run_results, save_figure, save_run
from .soak import pool_size

GAUGES = {"waiting": "vllm:num_requests_waiting", "running": "vllm:num_requests_running",
          "kv_usage": "vllm:kv_cache_usage_perc"}


def read_gauges(port: int) -> dict[str, float]:
    """The pod's series (no label) of GAUGES from the frontend's /metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    found = {}
    text = metrics_text(port)
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            for key, name in GAUGES.items():
                if sample.name == name and not sample.labels:
                    found[key] = sample.value
    return found


def stream_completion(port: int, model: str, prompt: str, max_tokens: int) -> tuple[int, float]:
    """(HTTP status, seconds) of one streamed completion read to its end."""
    start = time.monotonic()
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    try:
        connection.request("POST", "/v1/completions", body=json.dumps(
            {"model": model, "prompt": prompt, "max_tokens": max_tokens, "min_tokens": max_tokens, "stream": True}),
            headers={"Content-Type": "application/json"})
        response = connection.getresponse()
        response.read()
        return response.status, time.monotonic() - start
    finally:
        connection.close()


def run(args, command: str) -> int:
    slots, waiting = pool_size(args.repository, args.model)
    burst = args.burst or slots + waiting // 2
    if burst > slots + waiting:
        raise SystemExit(f"a burst of {burst} is more than {args.model}'s {slots} slots and {waiting} queue places")
    log = Path("build") / "gateway_burst.server.log"
    log.parent.mkdir(exist_ok=True)
    print(f"gateway burst: serving {args.repository} (log {log}); {args.model}: {slots} slots, {waiting} queue "
          f"places; a burst of {burst} streams of {args.max_tokens} tokens", flush=True)
    served = ServeProcess(args.repository, log)
    try:
        served.wait_ready()
        port = served.ports.frontend
        stream_completion(port, args.model, "Warm up.", 8)  # the frontend's first request reads the configs
        timeline, done = [], threading.Event()

        def sample() -> None:
            while not done.is_set():
                before = time.monotonic()
                gauges = read_gauges(port)
                timeline.append({"t": before - started, "scrape_ms": (time.monotonic() - before) * 1000, **gauges})
                done.wait(args.interval)

        prompts = [f"Request {i}: write about the sea and the ships that cross it." for i in range(burst)]
        outcomes: list[tuple[int, float]] = []
        lock = threading.Lock()
        jobs = iter(prompts)

        def client() -> None:
            with lock:
                prompt = next(jobs)
            outcome = stream_completion(port, args.model, prompt, args.max_tokens)
            with lock:
                outcomes.append(outcome)

        started = time.monotonic()
        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        time.sleep(args.interval * 4)  # the idle baseline
        sent = time.monotonic() - started
        run_clients(client, burst, [])
        ended = time.monotonic() - started
        time.sleep(args.interval * 4)  # the gauges back at rest
        done.set()
        sampler.join()
    finally:
        code = served.stop()
    results = run_results(command, model=args.model, repository=str(args.repository), slots=slots,
                          queue=waiting, burst=burst, max_tokens=args.max_tokens, interval_s=args.interval,
                          sent_s=sent, ended_s=ended, statuses=sorted({s for s, _ in outcomes}),
                          request_seconds=sorted(round(s, 2) for _, s in outcomes), timeline=timeline,
                          server_exit=code)
    save_run(results, args.out, markdown, plot)
    return 0 if set(results["statuses"]) == {200} and len(outcomes) == burst else 1


def summary(results: dict) -> dict:
    timeline = results["timeline"]
    after = [p for p in timeline if p["t"] >= results["sent_s"]]
    queued = [p for p in after if p.get("waiting", 0) > 0]
    scrapes = sorted(p["scrape_ms"] for p in timeline)
    return {
        "peak_waiting": max((p.get("waiting", 0) for p in timeline), default=0),
        "peak_running": max((p.get("running", 0) for p in timeline), default=0),
        "peak_kv_usage": max((p.get("kv_usage", 0) for p in timeline), default=0),
        "queue_empty_s": (queued[-1]["t"] - results["sent_s"]) if queued else 0.0,
        "last_end_s": results["ended_s"] - results["sent_s"],
        "at_rest": timeline[-1] if timeline else {},
        "scrape_p50_ms": scrapes[len(scrapes) // 2] if scrapes else 0,
        "scrape_p99_ms": scrapes[min(len(scrapes) - 1, int(len(scrapes) * 0.99))] if scrapes else 0,
    }


def markdown(results: dict) -> str:
    s = summary(results)
    rest = s["at_rest"]
    lines = [
        "# The gateway's gauges under a burst",
        "",
        f"{results['date']}, {results['machine']}. `{results['command']}`",
        "",
        f"{results['model']} ({results['slots']} decode slots, {results['queue']} queue places): "
        f"{results['burst']} streamed `/v1/completions` of {results['max_tokens']} tokens sent at once through the "
        f"frontend, its `/metrics` read every {results['interval_s']} s (the pod's series, no label). "
        f"HTTP statuses: {results['statuses']}; tritonserver's exit status {results['server_exit']}.",
        "",
        "| measure | value |",
        "|---|---:|",
        f"| vllm:num_requests_waiting, peak | {s['peak_waiting']:.0f} |",
        f"| vllm:num_requests_running, peak | {s['peak_running']:.0f} |",
        f"| vllm:kv_cache_usage_perc, peak | {s['peak_kv_usage']:.3f} |",
        f"| queue empty after the burst was sent (s) | {s['queue_empty_s']:.1f} |",
        f"| last request ended (s) | {s['last_end_s']:.1f} |",
        f"| at rest after: waiting / running / KV usage | {rest.get('waiting', 0):.0f} / "
        f"{rest.get('running', 0):.0f} / {rest.get('kv_usage', 0):.3f} |",
        f"| /metrics scrape p50 / p99 (ms) | {s['scrape_p50_ms']:.1f} / {s['scrape_p99_ms']:.1f} |",
        "",
        "The timeline, one row per second (the sample nearest each second):",
        "",
        "| t (s) | waiting | running | KV usage |",
        "|---:|---:|---:|---:|",
    ]
    shown = set()
    for point in results["timeline"]:
        second = int(point["t"])
        if second in shown:
            continue
        shown.add(second)
        lines.append(f"| {point['t']:.1f} | {point.get('waiting', 0):.0f} | {point.get('running', 0):.0f} | "
                     f"{point.get('kv_usage', 0):.3f} |")
    lines += ["", f"The burst was sent at t = {results['sent_s']:.1f} s.", ""]
    return "\n".join(lines)


def plot(results: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = [p["t"] for p in results["timeline"]]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 5.5), sharex=True)
    top.plot(t, [p.get("waiting", 0) for p in results["timeline"]], label="vllm:num_requests_waiting")
    top.plot(t, [p.get("running", 0) for p in results["timeline"]], label="vllm:num_requests_running")
    top.axvline(results["sent_s"], color="grey", linestyle=":", label="burst sent")
    top.set_ylabel("requests")
    top.legend(loc="upper right", fontsize=8)
    bottom.plot(t, [p.get("kv_usage", 0) for p in results["timeline"]], color="tab:green")
    bottom.set_ylabel("vllm:kv_cache_usage_perc")
    bottom.set_xlabel("seconds")
    fig.suptitle(f"{results['model']}: a burst of {results['burst']} into {results['slots']} slots "
                 f"({results['machine'][:60]})", fontsize=9)
    save_figure(fig, path)
