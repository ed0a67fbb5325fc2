"""KV-cache and scheduling benchmark (tools/bench_kv_cache.py, `make bench-kv-cache`): four scenarios against a
served model, through the real tritonserver, over tritonclient gRPC streaming to the decoupled front model NAME
(one response per token, bench.harness.streams), prompts sent as text.

    python tools/bench_kv_cache.py --repository build/bench/repo_kv_baseline --model smollm2 \
        [--scenarios shared-prefix,multi-turn,long-prompts,capacity] [--out benchmarks/kv_cache] \
        [--server-pythonpath DIR] [--merge]

Scenarios (all greedy; min_tokens = max_tokens, so every request streams exactly its output tokens):

- shared-prefix: a ~1000-token system prompt + a different ~50-token question per request, 16 closed-loop
  clients, 48 requests, 16 output tokens; then the same questions alone. TTFT p50/p90 of both and
  p50(shared) / p50(alone), target <= 1.5 (what a prefix cache buys: the shared part is not prefilled again).
- multi-turn: 8-turn conversations (each turn appends the previous answer and a new ~40-token user message to the
  prompt text, 16 output tokens a turn), 3 of them one after another (after one unmeasured warm-up conversation);
  per turn the prompt length, the tokens the turn added and the TTFT, medians over the conversations.
- long-prompts: 16 streams of 256 tokens (~32-token prompts); once all have their first token, 4 prompts of
  ~900 tokens (8 output tokens) are sent at 1 s intervals. Inter-token latencies of the 16 streams while the long
  prompts are in flight, against the same window of a run without them: p99(with) / p50(without), target <= 3.
- capacity: 64 requests of 128 prompt / 128 output tokens at once; the server's Prometheus gauges of the decode
  model are sampled every 0.2 s: the most sequences running at once (--running-gauge), the KV-cache gauges, and
  every other gauge of that model that the server exports (printed by name, so renamed gauges still show).

The tool starts tritonserver on --repository itself (bench.harness.servers.TritonServer, free ports), waits until
it is ready, warms it up, runs the scenarios (each also sends an unmeasured burst of its own prompt shapes first,
so that prefill shapes compile outside the measurement) and stops the server. --server-pythonpath DIR makes the
server's model processes import the mstriton package from DIR (a copy of an earlier version of the code: the
"before" figures of a change); the kernel library the model processes map is logged and saved, as proof.
Writes STEM.md and STEM.json after each scenario (--merge keeps the scenarios of an earlier STEM.json that this
run does not redo; --report-from STEM.json rewrites STEM.md only). Each scenario also reports the peak resident
memory of the server's processes; when the machine's available memory falls below --min-available-gib, the tool
stops its server (before the OOM killer picks a process, maybe another user's) and the remaining scenarios are
not run. About 10 minutes on 2 cores with SmolLM2-135M Q4_1 (shared-prefix 5 of them).
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

from bench import scenarios as sc
from bench.harness import loops
from bench.harness.processes import MemoryWatch, mapped_files, other_tritonservers
from bench.harness.streams import Generation, GrpcStream, scalar
from bench.report import machine_description, write_atomically

ROOT = Path(__file__).resolve().parents[1]

SCENARIOS = ("shared-prefix", "multi-turn", "long-prompts", "capacity")
# the decode model's gauges (mstriton/serving/metrics.py, DecodeMetrics)
DEFAULT_GAUGES = ("mstriton_requests_running", "mstriton_requests_waiting", "mstriton_kv_cache_slots_used",
                  "mstriton_kv_cache_slots_total", "mstriton_kv_cache_tokens_used", "mstriton_kv_cache_usage_ratio",
                  "mstriton_decode_batch_size")
RUNNING_GAUGE = "mstriton_requests_running"
TARGETS = {"shared_prefix_ttft_ratio": 1.5, "long_prompt_itl_ratio": 3.0}
STARTED = time.monotonic()


def say(message: str) -> None:
    print(f"[kv-bench {time.monotonic() - STARTED:6.0f}s] {message}", flush=True)


# ---- the client -------------------------------------------------------------------------------------------

def generate(stream: GrpcStream, model: str, text: str, max_tokens: int, request_id: str,
             on_first=None) -> Generation:
    """One greedy request of exactly `max_tokens` output tokens (min_tokens = max_tokens), streamed, on
    `stream` (bench.harness.streams: arrival times stamped in its callback, one response per token)."""
    generation = stream.generate(model, {"text_input": scalar("BYTES", text), "max_tokens": scalar("INT32", max_tokens),
                                         "min_tokens": scalar("INT32", max_tokens), "stream": scalar("BOOL", True),
                                         "do_sample": scalar("BOOL", False)},
                                 request_id=request_id, on_first=on_first)
    if generation.error is not None:
        raise RuntimeError(f"{request_id}: {generation.error}")
    if not generation.responses:
        raise RuntimeError(f"{request_id}: the stream ended without a token")
    return generation


def closed_loop(url: str, model: str, prompts: list[str], max_tokens: int, concurrency: int, tag: str,
                progress: bool = True) -> list[Generation]:
    """`concurrency` clients, each with its own stream, share the prompts: a client sends its next prompt when its
    previous one has ended. Results in prompt order; the first error ends the run."""
    every = max(1, len(prompts) // 4)

    def done(count: int, total: int) -> None:
        if progress and (count % every == 0 or count == total):
            say(f"  {tag}: {count}/{total} requests done")

    return loops.closed_loop(prompts, concurrency,
                             lambda index, prompt, stream: generate(stream, model, prompt, max_tokens, f"{tag}-{index}"),
                             session=lambda: GrpcStream(url), on_done=done)


def span_figures(generations: list[Generation]) -> dict:
    begin, end = min(g.start for g in generations), max(g.end for g in generations)
    tokens = sum(len(g.token_times) for g in generations)
    return {"requests": len(generations), "seconds": end - begin, "total_output_tokens": tokens,
            "tokens_per_s": tokens / max(end - begin, 1e-9)}


def ttft_figures(generations: list[Generation]) -> dict:
    summary = sc.latency_summary([g.ttft for g in generations])
    return {"ttft_" + k: v for k, v in summary.items() if k != "count"}


# ---- the scenarios ----------------------------------------------------------------------------------------

class Bench:
    def __init__(self, args, server, tokenizer):
        self.args, self.server, self.tokenizer = args, server, tokenizer
        self.url, self.model = server.grpc, args.model

    def count(self, text: str) -> int:
        return sc.token_count(self.tokenizer, text)

    def burst(self, prompts: list[str], max_tokens: int, concurrency: int, tag: str) -> list[Generation]:
        return closed_loop(self.url, self.model, prompts, max_tokens, concurrency, tag, progress=False)

    # 1 ---------------------------------------------------------------------------------------------------
    def shared_prefix(self) -> dict:
        a = self.args
        system = sc.text_of_tokens(self.tokenizer, a.system_tokens, seed=1000, prefix="System: ")
        questions = [sc.question_text(self.tokenizer, a.question_tokens, seed=i) for i in range(a.prefix_requests)]
        shared = [sc.shared_prefix_prompt(system, q) for q in questions]
        question_counts = [self.count(q) for q in questions]
        say(f"shared-prefix: system prompt {self.count(system)} tokens, questions {min(question_counts)}.."
            f"{max(question_counts)} tokens, whole prompts {min(map(self.count, shared))}.."
            f"{max(map(self.count, shared))}")
        # warm-up: the shapes of both runs, with another system prompt (nothing of the measured one cached)
        other = sc.text_of_tokens(self.tokenizer, a.system_tokens, seed=999, prefix="System: ")
        warm_q = [sc.question_text(self.tokenizer, a.question_tokens, seed=500 + i) for i in range(a.concurrency)]
        say("shared-prefix: warm-up burst (not measured)")
        self.burst(warm_q, 2, a.concurrency, "warm-alone")
        self.burst([sc.shared_prefix_prompt(other, q) for q in warm_q[:4]], 2, 4, "warm-shared")
        say(f"shared-prefix: {len(shared)} requests with the shared system prompt, c={a.concurrency}, "
            f"{a.prefix_output_tokens} output tokens")
        with_prefix = closed_loop(self.url, self.model, shared, a.prefix_output_tokens, a.concurrency, "shared")
        say(f"shared-prefix: the same {len(questions)} questions alone, c={a.concurrency}")
        alone = closed_loop(self.url, self.model, questions, a.prefix_output_tokens, a.concurrency, "alone")
        runs = {}
        for name, generations in (("shared", with_prefix), ("alone", alone)):
            counts = [g.prompt_tokens for g in generations]
            runs[name] = {**ttft_figures(generations), **span_figures(generations),
                          "prompt_tokens_min": min(counts), "prompt_tokens_max": max(counts),
                          "prompt_tokens_median": sc.integral(sc.median(counts))}
        ratio = sc.safe_ratio(runs["shared"]["ttft_p50_ms"], runs["alone"]["ttft_p50_ms"])
        result = {"system_prompt_tokens": self.count(system), "system_prompt_chars": len(system),
                  "question_tokens": {"min": min(question_counts), "max": max(question_counts),
                                      "median": sc.integral(sc.median(question_counts))},
                  "concurrency": a.concurrency, "requests": len(shared), "output_tokens": a.prefix_output_tokens,
                  "runs": runs, "ratio_p50_shared_over_alone":
                      sc.target_check(ratio, TARGETS["shared_prefix_ttft_ratio"])}
        return result

    # 2 ---------------------------------------------------------------------------------------------------
    def conversation(self, stream: GrpcStream, seed: int, tag: str) -> list[sc.TurnResult]:
        a = self.args
        turns: list[tuple[str, str | None]] = []
        counts, ttfts = [], []
        for k in range(a.turns):
            user = sc.text_of_tokens(self.tokenizer, a.user_tokens, seed=seed + k, prefix=f"Message {k + 1}: ")
            turns.append((user, None))
            text = sc.conversation_text(turns)
            generation = generate(stream, self.model, text, a.turn_output_tokens, f"{tag}-turn{k + 1}")
            turns[-1] = (user, generation.text)
            counts.append(generation.prompt_tokens or self.count(text))
            ttfts.append(generation.ttft * 1e3)
        return sc.turn_results(counts, ttfts)

    def multi_turn(self) -> dict:
        a = self.args
        stream = GrpcStream(self.url)
        try:
            say(f"multi-turn: warm-up conversation of {a.turns} turns (not measured)")
            self.conversation(stream, 90000, "warm-conv")
            conversations = []
            for c in range(a.conversations):
                turns = self.conversation(stream, 10000 + 100 * c, f"conv{c}")
                conversations.append(turns)
                say(f"multi-turn: conversation {c + 1}/{a.conversations}: prompt tokens "
                    f"{[t.prompt_tokens for t in turns]}, TTFT ms {[round(t.ttft_ms) for t in turns]}")
        finally:
            stream.close()
        rows = sc.median_turns(conversations)
        result = {"turns": a.turns, "conversations": a.conversations, "user_tokens": a.user_tokens,
                  "output_tokens_per_turn": a.turn_output_tokens, "per_turn": rows,
                  "each": [[dataclasses.asdict(t) for t in c] for c in conversations]}
        return result

    # 3 ---------------------------------------------------------------------------------------------------
    def streams_with_longs(self, shorts: list[str], longs: list[str], tag: str,
                           window_offsets: tuple[float, float] | None = None) -> dict:
        """The short streams, started together; once all have their first token, the long prompts one per
        interval. Returns the streams' token times, the window (long prompts in flight, or `window_offsets` after
        the moment all streams started) and the long prompts' generations."""
        a = self.args
        firsts: list[float] = []
        lock = threading.Lock()
        all_started = threading.Event()

        def on_first(arrival: float) -> None:
            with lock:
                firsts.append(arrival)
                if len(firsts) == len(shorts):
                    all_started.set()

        stream_results: list = [None] * len(shorts)
        long_results: list = [None] * len(longs)

        def run(index: int, prompt: str, max_tokens: int, out: list, name: str, first=None) -> None:
            stream = GrpcStream(self.url)
            try:
                out[index] = generate(stream, self.model, prompt, max_tokens, f"{tag}-{name}{index}", on_first=first)
            except BaseException as exc:  # noqa: BLE001 - reported below
                out[index] = exc
                all_started.set()
            finally:
                stream.close()

        threads = [threading.Thread(target=run, args=(i, p, a.stream_output_tokens, stream_results, "stream",
                                                      on_first), daemon=True) for i, p in enumerate(shorts)]
        for thread in threads:
            thread.start()
        if not all_started.wait(timeout=600):
            raise TimeoutError("the streams did not all start within 600 s")
        started = max(firsts) if len(firsts) == len(shorts) else time.perf_counter()
        say(f"  {tag}: all {len(shorts)} streams have their first token")
        long_threads = []
        for i, prompt in enumerate(longs):
            wait = started + a.long_interval * i - time.perf_counter()
            if wait > 0:
                time.sleep(wait)
            thread = threading.Thread(target=run, args=(i, prompt, a.long_output_tokens, long_results, "long"),
                                      daemon=True)
            thread.start()
            long_threads.append(thread)
            say(f"  {tag}: long prompt {i + 1}/{len(longs)} sent")
        for thread in long_threads:
            thread.join()
        for thread in threads:
            thread.join()
        failed = [r for r in stream_results + long_results if isinstance(r, BaseException)]
        if failed:
            raise failed[0]
        if longs:
            window = (min(g.start for g in long_results), max(g.end for g in long_results))
        else:
            window = (started + window_offsets[0], started + window_offsets[1])
        streams = [g.token_times for g in stream_results]
        gaps = sc.gaps_in_window(streams, *window)
        return {"started": started, "window": window, "window_offsets": (window[0] - started, window[1] - started),
                "window_gaps": gaps, "all_gaps": sc.all_gaps(streams), "streams": stream_results,
                "longs": long_results,
                "running_at_window_end": sum(g.end >= window[1] for g in stream_results)}

    def long_prompts(self) -> dict:
        a = self.args
        shorts = [sc.text_of_tokens(self.tokenizer, a.short_tokens, seed=20000 + i) for i in range(a.streams)]
        longs = [sc.text_of_tokens(self.tokenizer, a.long_tokens, seed=30000 + i) for i in range(a.long_count)]
        say(f"long-prompts: {a.streams} streams of {a.stream_output_tokens} tokens (prompts "
            f"{min(map(self.count, shorts))}..{max(map(self.count, shorts))} tokens), {len(longs)} long prompts of "
            f"{min(map(self.count, longs))}..{max(map(self.count, longs))} tokens at {a.long_interval:g} s intervals")
        say("long-prompts: warm-up burst (not measured)")
        warm = [sc.text_of_tokens(self.tokenizer, a.short_tokens, seed=25000 + i) for i in range(a.streams)]
        self.burst(warm, 2, a.streams, "warm-short")
        self.burst([sc.text_of_tokens(self.tokenizer, a.long_tokens, seed=35000)], 2, 1, "warm-long")
        say("long-prompts: run with the long prompts")
        loaded = self.streams_with_longs(shorts, longs, "with-long")
        say(f"long-prompts: baseline run without them (the same window: {loaded['window_offsets'][0]:.1f} s to "
            f"{loaded['window_offsets'][1]:.1f} s after all streams started)")
        baseline = self.streams_with_longs(shorts, [], "without-long", loaded["window_offsets"])
        runs = {}
        for name, run in (("with_long", loaded), ("without_long", baseline)):
            window = sc.latency_summary(run["window_gaps"])
            runs[name] = {"itl_window_" + k: v for k, v in window.items()}
            runs[name].update({"itl_all_" + k: v for k, v in sc.latency_summary(run["all_gaps"]).items()})
            runs[name].update({"window_s": run["window"][1] - run["window"][0],
                               "window_offsets_s": list(run["window_offsets"]),
                               "streams_running_at_window_end": run["running_at_window_end"],
                               "stream_ttft_p50_ms": sc.median(g.ttft * 1e3 for g in run["streams"]),
                               **span_figures(run["streams"])})
        runs["with_long"]["long_prompt_tokens"] = [g.prompt_tokens for g in loaded["longs"]]
        runs["with_long"]["long_ttft_ms"] = [g.ttft * 1e3 for g in loaded["longs"]]
        ratio = sc.safe_ratio(runs["with_long"]["itl_window_p99_ms"], runs["without_long"]["itl_window_p50_ms"])
        result = {"streams": a.streams, "stream_output_tokens": a.stream_output_tokens,
                  "short_prompt_tokens": [g.prompt_tokens for g in loaded["streams"]],
                  "long_prompts": len(longs), "long_output_tokens": a.long_output_tokens,
                  "long_interval_s": a.long_interval, "runs": runs,
                  "ratio_p99_with_over_p50_without": sc.target_check(ratio, TARGETS["long_prompt_itl_ratio"])}
        return result

    # 4 ---------------------------------------------------------------------------------------------------
    def capacity(self) -> dict:
        a = self.args
        prompts = [sc.text_of_tokens(self.tokenizer, a.capacity_prompt_tokens, seed=40000 + i)
                   for i in range(a.capacity_requests)]
        counts = [self.count(p) for p in prompts]
        decode_model = a.metrics_model or f"{a.model}_decode"
        url = f"http://localhost:{self.server.metrics_port}/metrics"
        first = sc.model_gauges(fetch_metrics(url), decode_model)
        say(f"capacity: gauges of model={decode_model!r} on {url}: {', '.join(sorted(first)) or 'none'}")
        missing = [g for g in [a.running_gauge, *a.gauges] if g not in first]
        if missing:
            say(f"capacity: gauges not exported (yet): {', '.join(missing)}")
        samples: list[tuple[float, str, dict]] = []  # (time, phase, gauges): sampled through warm-up too
        phase, stop = ["warm-up"], threading.Event()

        def sample() -> None:
            while not stop.is_set():
                moment = time.perf_counter()
                try:
                    samples.append((moment, phase[0], sc.model_gauges(fetch_metrics(url), decode_model)))
                except OSError:
                    pass
                stop.wait(max(0.0, a.sample_interval - (time.perf_counter() - moment)))

        def maxima_of(which: str) -> dict:
            return {k: sc.integral(v) for k, v in sc.gauge_maxima(g for _, p, g in samples if p == which).items()}

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        try:
            say(f"capacity: warm-up burst of {len(prompts)} prompts, 2 output tokens (not measured; gauges sampled)")
            warm = [sc.text_of_tokens(self.tokenizer, a.capacity_prompt_tokens, seed=45000 + i)
                    for i in range(a.capacity_requests)]
            self.burst(warm, 2, a.capacity_requests, "warm-capacity")
            phase[0] = "measured"
            say(f"capacity: {len(prompts)} requests of {min(counts)}..{max(counts)} prompt tokens / "
                f"{a.capacity_output_tokens} output tokens at once (c={a.capacity_requests})")
            generations = closed_loop(self.url, self.model, prompts, a.capacity_output_tokens,
                                      a.capacity_requests, "capacity")
        except Exception as exc:
            stop.set()
            sampler.join()
            raise ScenarioFailed(f"{type(exc).__name__}: {exc} (during the {phase[0]} requests)",
                                 {"failed_during": phase[0], "samples": len(samples),
                                  "gauge_max_before_failure": maxima_of(phase[0]),
                                  "gauge_max_warm_up": maxima_of("warm-up")}) from exc
        finally:
            stop.set()
            sampler.join()
        begin = min(g.start for g in generations)
        maxima = maxima_of("measured")
        running = [(t - begin, g[a.running_gauge]) for t, p, g in samples
                   if p == "measured" and a.running_gauge in g]
        result = {"requests": len(prompts), "prompt_tokens": {"min": min(counts), "max": max(counts)},
                  "output_tokens": a.capacity_output_tokens, "concurrency": a.capacity_requests,
                  "metrics_model": decode_model, "running_gauge": a.running_gauge, "gauges_asked": list(a.gauges),
                  "gauges_found": sorted(set(first) | set(maxima)),
                  "samples": sum(p == "measured" for _, p, _ in samples), "sample_interval_s": a.sample_interval,
                  "max_running": maxima.get(a.running_gauge), "gauge_max": maxima,
                  "gauge_max_warm_up": maxima_of("warm-up"),
                  "running_timeline": [[round(t, 2), v] for t, v in running],
                  **span_figures(generations), **ttft_figures(generations)}
        itl = sc.latency_summary(sc.all_gaps(g.token_times for g in generations))
        result.update({"itl_p50_ms": itl["p50_ms"], "itl_p99_ms": itl["p99_ms"]})
        return result


class ScenarioFailed(RuntimeError):
    """A scenario that failed part-way, with what it had measured until then (kept in the report)."""

    def __init__(self, message: str, partial: dict):
        super().__init__(message)
        self.partial = partial


def fetch_metrics(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as response:
        return response.read().decode()


# ---- tables (terminal and Markdown) -------------------------------------------------------------------------

def shared_prefix_table(r: dict):
    rows = []
    for name, label in (("shared", f"{r['system_prompt_tokens']}-token system prompt + question"),
                        ("alone", "question alone")):
        run = r["runs"][name]
        rows.append([label, run["prompt_tokens_median"], run["requests"], run["ttft_p50_ms"], run["ttft_p90_ms"],
                     run["ttft_p99_ms"], run["seconds"]])
    check = r["ratio_p50_shared_over_alone"]
    rows.append([f"p50 shared / p50 alone (target <= {check['target']:g})", None, None, check["value"], None, None,
                 None])
    return (["prompts", "prompt tokens (median)", "requests", "TTFT p50 ms", "TTFT p90 ms", "TTFT p99 ms",
             "run s"], rows)


def multi_turn_table(r: dict):
    rows = [[row["turn"], row["prompt_tokens"], row["new_tokens"], row["ttft_ms"],
             " / ".join(f"{v:.0f}" for v in row["ttft_ms_each"])] for row in r["per_turn"]]
    return (["turn", "prompt tokens", "new tokens", "TTFT ms (median)", "TTFT ms of each conversation"], rows)


def long_prompts_table(r: dict):
    rows = []
    for name, label in (("with_long", f"with {r['long_prompts']} long prompts"), ("without_long", "without")):
        run = r["runs"][name]
        rows.append([label, run["itl_window_count"], run["itl_window_p50_ms"], run["itl_window_p99_ms"],
                     run["itl_window_max_ms"], run["itl_all_p50_ms"], run["itl_all_p99_ms"],
                     run["streams_running_at_window_end"]])
    check = r["ratio_p99_with_over_p50_without"]
    rows.append([f"p99 with / p50 without (target <= {check['target']:g})", None, check["value"], None, None, None,
                 None, None])
    return (["stream ITL", "gaps in window", "p50 ms", "p99 ms", "max ms", "whole run p50 ms",
             "whole run p99 ms", "streams running at window end"], rows)


def capacity_table(r: dict):
    rows = [["max running (" + r["running_gauge"] + ")", r["max_running"]],
            ["requests / concurrency", f"{r['requests']} / {r['concurrency']}"],
            ["total time s", r["seconds"]], ["output tokens/s", r["tokens_per_s"]],
            ["TTFT p50 / p99 ms", f"{sc.fmt(r['ttft_p50_ms'], 0)} / {sc.fmt(r['ttft_p99_ms'], 0)}"],
            ["ITL p50 / p99 ms", f"{sc.fmt(r['itl_p50_ms'])} / {sc.fmt(r['itl_p99_ms'])}"],
            ["metric samples", r["samples"]]]
    rows += [[f"max {name}", value] for name, value in sorted(r["gauge_max"].items())]
    rows += [[f"max {name} during the warm-up burst", value]
             for name, value in sorted(r.get("gauge_max_warm_up", {}).items()) if name == r["running_gauge"]]
    rows += [[f"{name}", "not exported"] for name in r["gauges_asked"] if name not in r["gauge_max"]]
    return (["capacity", "value"], rows)


TABLES = {"shared-prefix": shared_prefix_table, "multi-turn": multi_turn_table, "long-prompts": long_prompts_table,
          "capacity": capacity_table}
TITLES = {"shared-prefix": "1. Shared prefix", "multi-turn": "2. Multi-turn conversation",
          "long-prompts": "3. Long prompts beside running streams", "capacity": "4. Capacity"}


def describe(name: str, r: dict) -> list[str]:
    """What the scenario ran, in a sentence or two, and its verdict."""
    if name == "shared-prefix":
        check = r["ratio_p50_shared_over_alone"]
        q = r["question_tokens"]
        return [f"A {r['system_prompt_tokens']}-token system prompt (exact count, the served tokenizer) followed by a "
                f"different question of {q['min']}..{q['max']} tokens per request; {r['requests']} requests from "
                f"{r['concurrency']} closed-loop clients, {r['output_tokens']} output tokens, greedy; then the same "
                "questions alone.", "",
                f"**p50(shared) / p50(alone) = {sc.fmt(check['value'], 2)}** (target <= {check['target']:g}: "
                f"{'met' if check['met'] else 'not met'})."]
    if name == "multi-turn":
        return [f"{r['conversations']} conversations of {r['turns']} turns, one after another, one request at a time; "
                f"each turn's prompt is the whole conversation so far as text (previous answers included) plus a new "
                f"~{r['user_tokens']}-token user message; {r['output_tokens_per_turn']} output tokens a turn, greedy. "
                "Prompt tokens as the server counted them (num_input_tokens); medians over the conversations."]
    if name == "long-prompts":
        check = r["ratio_p99_with_over_p50_without"]
        w = r["runs"]["with_long"]
        long_ttft = ", ".join(f"{v:.0f}" for v in w["long_ttft_ms"])
        return [f"{r['streams']} streams of {r['stream_output_tokens']} tokens (prompts of "
                f"{min(r['short_prompt_tokens'])}..{max(r['short_prompt_tokens'])} tokens); once all had their first "
                f"token, {r['long_prompts']} prompts of {', '.join(map(str, w['long_prompt_tokens']))} tokens "
                f"({r['long_output_tokens']} output tokens) were sent {r['long_interval_s']:g} s apart. The window is "
                f"from the first long prompt sent to the last one's end ({w['window_s']:.1f} s); the baseline run "
                "(no long prompts) is measured over the same window after its streams started. An ITL is a gap "
                "between two responses of one stream whose later response arrived in the window.", "",
                f"Long prompts' TTFT: {long_ttft} ms."
                + (" The baseline's streams all ended inside the window: its figures are those of its whole run."
                   if r["runs"]["without_long"]["streams_running_at_window_end"] == 0 else ""), "",
                f"**p99(with) / p50(without) = {sc.fmt(check['value'], 2)}** (target <= {check['target']:g}: "
                f"{'met' if check['met'] else 'not met'})."]
    if name == "capacity":
        return [f"{r['requests']} requests of {r['prompt_tokens']['min']}..{r['prompt_tokens']['max']} prompt tokens "
                f"/ {r['output_tokens']} output tokens sent at once; the gauges of model=\"{r['metrics_model']}\" "
                f"sampled every {r['sample_interval_s']:g} s on the metrics port. Gauges found: "
                f"{', '.join(f'`{g}`' for g in r['gauges_found']) or 'none'}.", "",
                f"**Most sequences running at once: {sc.fmt(r['max_running'], 0)}**; total time "
                f"{r['seconds']:.1f} s."]
    return []


def scenario_footer(r: dict) -> list[str]:
    lines = []
    if r.get("memory"):
        m = r["memory"]
        by_process = ", ".join(f"{k} {v:g}" for k, v in m.get("peak_rss_gib_by_process", {}).items())
        lines += [f"Server memory: peak resident {m['server_peak_rss_gib']:g} GiB in all (processes over 0.25 GiB: "
                  f"{by_process or 'none'}); lowest available on the machine {m['lowest_available_gib']} GiB.", ""]
    if r.get("load"):
        lines += [f"Load average before / after: {r['load']['before']} / {r['load']['after']}; other "
                  f"tritonserver processes on the machine: {r['load']['other_tritonservers']}; "
                  f"{r['load']['seconds']:.0f} s.", ""]
    if r.get("command"):
        lines += [f"Measured by: `{r['command']}`.", ""]
    return lines


def markdown(results: dict) -> str:
    meta = results["meta"]
    lines = [f"# KV-cache / scheduling benchmark, {meta['date']}", "",
             f"Machine: {meta['machine']}.", "",
             f"Served: `{meta['model']}` from `{meta['repository']}` "
             f"({meta.get('repository_settings', '')}); tritonserver started by the tool; "
             f"model code: {meta['served_code']}"
             + (f"; the model processes mapped {', '.join(f'`{k}`' for k in meta['kernel_libraries_mapped'])}"
                if meta.get("kernel_libraries_mapped") else "") + ".", "",
             "Client: tritonclient gRPC streaming to the decoupled front model (one stream per client, one response "
             "per token, arrival times stamped in the stream's callback); prompts sent as `text_input`, greedy, "
             "`min_tokens = max_tokens`. Each scenario first sends an unmeasured burst of its own prompt shapes.", ""]
    commands = list(dict.fromkeys(r["command"] for r in results["scenarios"].values() if r.get("command")))
    lines += ["Measured by:", ""] + [f"    {c}" for c in commands or [meta["command"]]] + [""]
    if meta.get("notes"):
        lines += [f"- {n}" for n in meta["notes"]] + [""]
    summary = []
    for name in SCENARIOS:
        r = results["scenarios"].get(name)
        if r and "error" not in r:
            if name == "shared-prefix":
                c = r["ratio_p50_shared_over_alone"]
                summary.append(["shared-prefix TTFT p50 shared / alone", c["value"], f"<= {c['target']:g}", c["met"]])
            if name == "long-prompts":
                c = r["ratio_p99_with_over_p50_without"]
                summary.append(["stream ITL p99 with long prompts / p50 without", c["value"], f"<= {c['target']:g}",
                                c["met"]])
            if name == "capacity":
                summary.append(["most sequences running at once (of "
                                f"{r['concurrency']})", r["max_running"], "", None])
    if summary:
        lines += ["## Summary", ""] + sc.markdown_table(["figure", "measured", "target", "met"], summary, 2) + [""]
    for name in SCENARIOS:
        if name not in results["scenarios"]:
            continue
        r = results["scenarios"][name]
        lines += [f"## {TITLES[name]}", ""]
        if "error" in r:
            lines += [f"Failed: {r['error']}", ""]
            for key in ("gauge_max_before_failure", "gauge_max_warm_up"):
                if r.get(key):
                    lines += [f"{key.replace('_', ' ').capitalize()}: "
                              + ", ".join(f"`{k}` {sc.fmt(v, 2)}" for k, v in sorted(r[key].items())) + ".", ""]
            lines += scenario_footer(r)
            continue
        lines += describe(name, r) + [""]
        headers, rows = TABLES[name](r)
        lines += sc.markdown_table(headers, rows) + [""]
        lines += scenario_footer(r)
    return "\n".join(lines)


def clean(value):
    """JSON without NaN or infinities (null instead)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [clean(v) for v in value]
    return value


def save(results: dict, stem: Path) -> None:
    stem.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(stem.with_suffix(".json"), json.dumps(clean(results), indent=1) + "\n")
    try:  # the figures are saved whatever happens to the report: --report-from writes it again
        write_atomically(stem.with_suffix(".md"), markdown(clean(results)) + "\n")
    except Exception as exc:  # noqa: BLE001
        say(f"the Markdown report failed ({type(exc).__name__}: {exc}); the figures are in {stem.with_suffix('.json')}")


def repository_settings(repository: Path, model: str) -> str:
    try:
        manifest = json.loads((repository / f"{model}_decode" / "1" / "engine" / "manifest.json").read_text())
    except (OSError, ValueError):
        return "no manifest read"
    return (f"max batch {manifest.get('max_batch_size')}, max_seq_len {manifest.get('max_seq_len')}, weights "
            f"{manifest.get('weights_format', manifest.get('dtype'))}, prefill chunk "
            f"{(manifest.get('prefill_chunk') or {}).get('length', 'none')}")


def set_decode_parameters(repository: Path, model: str, settings: list[str]) -> None:
    """KEY=VALUE settings into the decode model's config.pbtxt, as a user would edit them."""
    from mstriton.repository import read_config, write_config

    if not settings:
        return
    folder = repository / f"{model}_decode"
    config = read_config(folder)
    for setting in settings:
        key, sep, value = setting.partition("=")
        if not sep or key not in config.parameters:
            raise SystemExit(f"--decode-parameter {setting!r}: KEY=VALUE with KEY one of {sorted(config.parameters)}")
        config.parameters[key].string_value = value
        say(f"{folder.name}/config.pbtxt: {key} = {value}")
    write_config(folder, config)


def start_server(repository: Path, log: Path, pythonpath: Path | None):
    from bench.harness.servers import TritonServer

    saved_path, saved_cwd = os.environ.get("PYTHONPATH"), os.getcwd()
    try:
        if pythonpath:
            # the model processes import mstriton from this folder; the server's working directory too, so that
            # no '' entry of sys.path finds the checkout's package first
            os.environ["PYTHONPATH"] = str(pythonpath) + (os.pathsep + saved_path if saved_path else "")
            os.chdir(pythonpath)
        return TritonServer(repository, log)
    finally:
        os.chdir(saved_cwd)
        if saved_path is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = saved_path


# ---- main -------------------------------------------------------------------------------------------------

def command_line(argv: list[str]) -> str:
    """The command as a shell would take it, the --note texts left out (the report prints them)."""
    kept, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--note":
            skip = True
        elif not arg.startswith("--note="):
            kept.append(arg)
    return shlex.join(["python", "tools/bench_kv_cache.py", *kept])


def exit_on_signal(signum, frame):
    raise SystemExit(128 + signum)


def main(args, argv=None) -> int:
    """Run the scenarios of `args` (tools/bench_kv_cache.py's options; `argv`: the command line, for the report),
    or with --report-from only write the report again."""
    if args.report_from:
        results = json.loads(args.report_from.read_text())
        stem = args.out if args.out.is_absolute() else Path.cwd() / args.out
        write_atomically(stem.with_suffix(".md"), markdown(results) + "\n")
        say(f"wrote {stem.with_suffix('.md')} from {args.report_from}")
        return 0
    # SIGTERM ends the run through the finally clauses: the server is stopped
    signal.signal(signal.SIGTERM, exit_on_signal)
    repository = args.repository.resolve()
    pythonpath = args.server_pythonpath.resolve() if args.server_pythonpath else None
    if pythonpath and not (pythonpath / "mstriton" / "__init__.py").is_file():
        raise SystemExit(f"--server-pythonpath: {pythonpath} holds no mstriton package")
    from mstriton.tokenizer import load_tokenizer

    set_decode_parameters(repository, args.model, args.decode_parameter)
    tokenizer = load_tokenizer(repository / f"{args.model}_tokenizer" / "1")
    stem = args.out if args.out.is_absolute() else Path.cwd() / args.out
    results = {"scenarios": {}}
    if args.merge and stem.with_suffix(".json").is_file():
        results = json.loads(stem.with_suffix(".json").read_text())
        for name in args.scenarios:
            results["scenarios"].pop(name, None)
    commit = (pythonpath / "COMMIT").read_text().strip() if pythonpath and (pythonpath / "COMMIT").is_file() else None
    if commit is None:
        try:
            commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                                    text=True).stdout.strip() + " (working tree)"
        except OSError:
            commit = "?"
    meta = {"date": datetime.date.today().isoformat(), "machine": machine_description(),
            "model": args.model, "repository": str(repository.relative_to(ROOT) if repository.is_relative_to(ROOT)
                                                   else repository),
            "repository_settings": repository_settings(repository, args.model),
            "served_code": f"mstriton from {pythonpath} (commit {commit})" if pythonpath else
                           f"mstriton from the checkout (commit {commit})",
            "command": command_line(sys.argv[1:] if argv is None else argv),
            "notes": args.note}
    old = results.get("meta", {})
    meta["notes"] = list(dict.fromkeys(old.get("notes", []) + meta["notes"]))
    results["meta"] = {**old, **meta}
    log = (args.log or ROOT / "build" / "bench" / "tritonserver_kv_cache.log").resolve()
    log.parent.mkdir(parents=True, exist_ok=True)
    say(f"starting tritonserver on {repository} (log {log})"
        + (f", model code from {pythonpath}" if pythonpath else ""))
    server = start_server(repository, log, pythonpath)
    watch = MemoryWatch(server, int(args.min_available_gib * 2**30), say=say)
    watch.start()
    try:
        server.wait_ready(timeout=600)
        say(f"ready: gRPC {server.grpc}, metrics port {server.metrics_port}")
        bench = Bench(args, server, tokenizer)
        say("warm-up: 4 requests of ~32 tokens, 8 output tokens, 2 at a time")
        bench.burst([sc.text_of_tokens(tokenizer, 32, seed=7000 + i) for i in range(4)], 8, 2, "warmup")
        libraries = mapped_files(server.process.pid, "libmstriton_kernels")
        say(f"the model processes map {', '.join(libraries) or 'no mstriton kernel library'}")
        results["meta"]["kernel_libraries_mapped"] = libraries
        if pythonpath and libraries and not all(lib.startswith(str(pythonpath)) for lib in libraries):
            raise RuntimeError(f"the server's models do not run the code of {pythonpath}: they map {libraries}")
        for name in args.scenarios:
            if watch.tripped:
                results["scenarios"][name] = {"error": "not run: " + watch.tripped}
                save(results, stem)
                continue
            watch.reset()
            before, started = os.getloadavg()[0], time.monotonic()
            others = other_tritonservers(server.process.pid)
            say(f"=== {name} (load average {before:.2f}, other tritonserver processes: {others}) ===")
            try:
                result = getattr(bench, name.replace("-", "_"))()
            except Exception as exc:  # noqa: BLE001 - a failed scenario is reported, and the others run
                say(f"{name} failed: {type(exc).__name__}: {exc}")
                message = str(exc) if isinstance(exc, ScenarioFailed) else f"{type(exc).__name__}: {exc}"
                result = {"error": message[:500]
                          + (f" ({watch.tripped})" if watch.tripped else ""),
                          **getattr(exc, "partial", {})}
            result["memory"] = watch.figures()
            result["load"] = {"before": round(before, 2), "after": round(os.getloadavg()[0], 2),
                              "other_tritonservers": max(others, other_tritonservers(server.process.pid)),
                              "seconds": time.monotonic() - started}
            result["command"] = meta["command"]
            results["scenarios"][name] = result
            save(results, stem)
            if "error" not in result:
                try:
                    print(sc.text_table(*TABLES[name](clean(result))), flush=True)
                except Exception as exc:  # noqa: BLE001
                    say(f"{name}: printing the table failed: {type(exc).__name__}: {exc}")
            say(f"{name} done in {time.monotonic() - started:.0f}s; saved {stem.with_suffix('.md')}")
    finally:
        watch.halt.set()
        code = server.stop()
        say(f"tritonserver stopped (exit code {code})")
    say(f"done in {time.monotonic() - STARTED:.0f}s")
    return 0 if all("error" not in results["scenarios"][n] for n in args.scenarios) else 1

