"""The soak (tools/soak.py, `make soak`): a repository served by `python -m mstriton.serve` on free ports and driven
through every door for a number of minutes of mixed load; one request through any door, classified by its outcome;
the RSS of the server's processes; the summary and its markdown. Clients target 127.0.0.1 only.

Mixed load (the doors are DOORS: tritonclient gRPC streaming, Triton HTTP generate and generate_stream, KServe v2
/infer, OpenAI chat and completions streamed and not, TGI /generate_stream, MindSpore Serving
/models/NAME/generate): greedy and sampled requests, invalid ones (expect 4xx / INVALID_ARG), cancelled ones (a gRPC
stream cancelled after its first token), disconnected ones (an SSE client closing its socket after the first
event), in cycles of a phase at the decode pool's concurrency (its max_batch_size), one at 4x that, and a burst of
more requests than its slots and queue hold (expect 503 / UNAVAILABLE "server busy"). Every client targets
127.0.0.1, every request has a timeout and every loop a count and a time bound.

Reports requests by door and outcome; `unanswered` counts requests that got neither a final answer nor an error
within the timeout; every greedy answer under load is compared with the solo answer of the same door and prompt
taken at the start; the RSS of tritonserver, each model process and the frontend after warm-up, in the middle and
at the end; p50/p99 of time to first token and total time per door.
"""

from __future__ import annotations

import dataclasses
import http.client
import json
import random
import socket
import threading
import time
from pathlib import Path

import numpy as np

from mstriton.params import PARAMETERS
from mstriton.repository import read_config

from .harness.loops import run_clients
from .harness.processes import rss_mib_by_process
from .harness.servers import ServeProcess, metrics_text
from .harness.streams import GrpcStream, StreamTimeout, scalar
from .scenarios import word_stream
from .timing import RequestTiming, summarize

OUTCOMES = ("ok", "refused", "busy", "cancelled", "disconnected", "error", "unanswered")
SAMPLED = {"temperature": 0.8, "top_p": 0.9}
INVALID = {"top_p": 5.0}  # out of (0, 1] at every door
# every request parameter's Triton datatype, as the KServe and gRPC doors take it (the parameter table's types)
DATATYPES = {p.name: "BYTES" if p.triton_type == "TYPE_STRING" else p.triton_type.removeprefix("TYPE_")
             for p in PARAMETERS}


@dataclasses.dataclass
class Result:
    door: str
    kind: str
    outcome: str
    start: float
    times: list[float]          # when each piece of text arrived (one for a unary answer)
    end: float
    text: str = ""
    message: str = ""
    matches: bool | None = None  # greedy under load: equal to its solo answer


class Unanswered(Exception):
    pass


def _params(kind: str, seed: int, greedy: dict) -> dict:
    return {"greedy": greedy, "sampled": dict(SAMPLED, seed=seed), "invalid": INVALID}.get(kind, greedy)


# door -> (port name, path, streamed, body(model, prompt, max_tokens, params), text of an event or answer)
def _triton(model, prompt, n, p):
    return {"text_input": prompt, "max_tokens": n, **p}


def _openai(chat):
    def body(model, prompt, n, p):
        where = {"messages": [{"role": "user", "content": prompt}]} if chat else {"prompt": prompt}
        return {"model": model, **where, "max_tokens": n, **p}
    return body


def _tgi(model, prompt, n, p):
    return {"inputs": prompt, "parameters": {"max_new_tokens": n, "do_sample": bool(p), **p}}


def _ms(model, prompt, n, p):
    p = {k: v for k, v in p.items() if k != "seed"}  # MindSpore Serving has no seed
    return {"inputs": prompt, "parameters": {"max_new_tokens": n, "do_sample": bool(p), **p}}


def _kserve(model, prompt, n, p):
    inputs = [{"name": "text_input", "datatype": "BYTES", "shape": [1, 1], "data": [prompt]}]
    inputs += [{"name": k, "datatype": DATATYPES[k], "shape": [1, 1], "data": [v]}
               for k, v in dict(p, max_tokens=n).items()]
    return {"inputs": inputs}


def _choice(chat, streamed):
    def text(event):
        choices = event.get("choices") or [{}]
        if chat:
            return (choices[0].get("delta" if streamed else "message") or {}).get("content") or ""
        return choices[0].get("text") or ""
    return text


HTTP_DOORS = {
    "triton_generate": ("http", "/v2/models/{model}_unary/generate", False, _triton, lambda e: e["text_output"]),
    "triton_generate_stream": ("http", "/v2/models/{model}/generate_stream", True, _triton,
                               lambda e: e.get("text_output", "")),
    "kserve_infer": ("http", "/v2/models/{model}_unary/infer", False, _kserve,
                     lambda e: next(o["data"][0] for o in e["outputs"] if o["name"] == "text_output")),
    "openai_chat": ("frontend", "/v1/chat/completions", False, _openai(True), _choice(True, False)),
    "openai_chat_stream": ("frontend", "/v1/chat/completions", True, _openai(True), _choice(True, True)),
    "openai_completions": ("frontend", "/v1/completions", False, _openai(False), _choice(False, False)),
    "openai_completions_stream": ("frontend", "/v1/completions", True, _openai(False), _choice(False, True)),
    "tgi_generate_stream": ("frontend", "/generate_stream", True, _tgi,
                            lambda e: (e.get("token") or {}).get("text", "")),
    "ms_generate": ("frontend", "/models/{model}/generate", False, _ms, lambda e: e["generated_text"]),
}
DOORS = ("grpc_stream", *HTTP_DOORS)
STREAMED = {"grpc_stream", *(d for d, spec in HTTP_DOORS.items() if spec[2])}


def _error_outcome(message: str) -> str:
    lower = message.lower()
    if "server busy" in lower or "unavailable" in lower:
        return "busy"
    if "invalid" in lower or "invalid_arg" in lower:
        return "refused"
    return "error"


def send(ports, model: str, door: str, kind: str, prompt: str, max_tokens: int, timeout: float,
         seed: int = 0, reference: str | None = None) -> Result:
    """One request of `kind` (greedy, sampled, invalid, cancel: a gRPC stream cancelled after its first piece,
    disconnect: an SSE client that closes after its first event; on other doors these two are greedy requests)
    through `door`; never raises. A request with no final answer nor error within `timeout` is `unanswered`."""
    start = time.monotonic()
    result = Result(door, kind, "error", start, [], start)
    applies = {"cancel": door == "grpc_stream", "disconnect": door in STREAMED and door != "grpc_stream"}
    if not applies.get(kind, True):
        result.kind = kind = "greedy"
    try:
        if door == "grpc_stream":
            _grpc(ports, model, kind, prompt, max_tokens, timeout, seed, result)
        else:
            _http(ports, model, door, kind, prompt, max_tokens, timeout, seed, result)
    except Unanswered as exc:
        result.outcome, result.message = "unanswered", str(exc)
    except (socket.timeout, TimeoutError):
        result.outcome, result.message = "unanswered", f"no answer within {timeout} s"
    except Exception as exc:  # noqa: BLE001 - every failure is an outcome of the soak
        result.outcome, result.message = "error", f"{type(exc).__name__}: {exc}"
    result.end = time.monotonic()
    if kind == "invalid" and result.outcome == "ok":
        result.outcome, result.message = "error", "an invalid request was answered"
    if reference is not None and result.outcome == "ok":
        result.matches = result.text == reference
    return result


def _http(ports, model, door, kind, prompt, max_tokens, timeout, seed, result) -> None:
    port_name, path, streamed, body, text = HTTP_DOORS[door]
    greedy = {"temperature": 0} if port_name == "frontend" and door.startswith("openai") else {}
    payload = body(model, prompt, max_tokens, _params(kind, seed, greedy))
    if door == "triton_generate_stream":
        payload["stream"] = True
    if door.startswith("openai"):
        payload["stream"] = streamed
    deadline = result.start + timeout
    connection = http.client.HTTPConnection("127.0.0.1", getattr(ports, port_name), timeout=timeout)
    try:
        connection.request("POST", path.format(model=model), json.dumps(payload),
                           {"Content-Type": "application/json"})
        response = connection.getresponse()
        if response.status != 200:
            result.message = f"HTTP {response.status}: {response.read(300).decode(errors='replace')}"
            # tritonserver's generate and generate_stream answer "server busy" with 400, /infer with 500
            result.outcome = ("busy" if response.status == 503 or "server busy" in result.message
                              else "refused" if 400 <= response.status < 500 else "error")
            return
        if not streamed:
            answer = json.loads(response.read())
            result.times.append(time.monotonic())
            result.text, result.outcome = text(answer), "ok"
            return
        pieces = []
        while True:
            if time.monotonic() > deadline:
                raise Unanswered(f"stream not ended within {timeout} s")
            line = response.readline()
            if not line:  # the server ended the stream
                result.text, result.outcome = "".join(pieces), "ok"
                if door.startswith("openai"):  # an OpenAI stream ends with [DONE], else it broke off
                    result.outcome, result.message = "error", "stream ended without [DONE]"
                return
            if not line.startswith(b"data:"):
                continue
            data = line[5:].strip()
            if data == b"[DONE]":
                result.text, result.outcome = "".join(pieces), "ok"
                return
            event = json.loads(data)
            if "error" in event:
                message = json.dumps(event["error"])
                result.outcome, result.message = _error_outcome(message), message
                return
            pieces.append(text(event))
            result.times.append(time.monotonic())
            if kind == "disconnect":
                result.outcome = "disconnected"
                return  # the connection is closed below, mid-stream
            if door == "tgi_generate_stream" and event.get("generated_text") is not None:
                result.text, result.outcome = "".join(pieces), "ok"
                return
            if door == "triton_generate_stream" and event.get("finish_reason"):
                result.text, result.outcome = "".join(pieces), "ok"
                return
    finally:
        connection.close()


def _grpc(ports, model, kind, prompt, max_tokens, timeout, seed, result) -> None:
    values = {"text_input": ("BYTES", prompt), "stream": ("BOOL", True),
              **{k: (DATATYPES[k], v) for k, v in dict(_params(kind, seed, {}), max_tokens=max_tokens).items()}}
    with GrpcStream(f"127.0.0.1:{ports.grpc}", response_timeout=timeout, clock=time.monotonic) as stream:
        try:
            answer = stream.generate(model, {name: scalar(datatype, value) for name, (datatype, value) in values.items()},
                                     timeout=timeout, start=result.start,
                                     cancel_after=1 if kind == "cancel" else None)
        except StreamTimeout:
            raise Unanswered(f"no final response within {timeout} s") from None
    result.times = [arrival for arrival, _ in answer.responses]
    if answer.error is not None:
        result.outcome, result.message = _error_outcome(answer.error), answer.error
    elif answer.cancelled:
        result.outcome = "cancelled"
    else:
        result.text, result.outcome = answer.text, "ok"


def pool_size(repository: Path, model: str) -> tuple[int, int]:
    """The decode model's sequence slots (max_slots, else max_batch_size) and queue places (max_waiting)."""
    config = read_config(repository / f"{model}_decode")
    parameter = lambda name, default: int(config.parameters[name].string_value  # noqa: E731
                                          if name in config.parameters else default)
    return parameter("max_slots", config.max_batch_size), parameter("max_waiting", 64)


# What must be back at zero once the load has ended: (metric, model suffix). The prefill model's rows exist in the
# disaggregated shape only (absent: read as 0).
HELD_AT_END = (("mstriton_requests_running", "_decode"), ("mstriton_requests_waiting", "_decode"),
               ("mstriton_kv_cache_blocks_used", "_decode"), ("mstriton_prefill_kv_leases", "_prefill"),
               ("mstriton_prefill_kv_blocks_used", "_prefill"))
HELD_WAIT_SECONDS = 30  # for the last cancelled requests to leave and the prefill model to reap their leases


def held_at_end(metrics_port: int, model: str) -> dict[str, float]:
    """HELD_AT_END's values once they are all zero, or as they are after HELD_WAIT_SECONDS; with the leases the
    prefill model took back unclaimed (their requests were lost between the steps)."""
    from mstriton.server_process import metric_value

    deadline = time.monotonic() + HELD_WAIT_SECONDS
    while True:
        text = metrics_text(metrics_port)
        held = {name: metric_value(text, name, model=model + suffix) for name, suffix in HELD_AT_END}
        if not any(held.values()) or time.monotonic() > deadline:
            held["leases_expired"] = metric_value(text, "mstriton_prefill_kv_leases_expired_total",
                                                  model=model + "_prefill")
            return held
        time.sleep(0.5)


def _percentiles(values: list[float]) -> tuple[float | None, float | None]:
    if not values:
        return None, None
    return float(np.percentile(values, 50)), float(np.percentile(values, 99))


def summary(results: list[Result], memory_start: dict, memory_end: dict, settings: dict,
            memory_series: list[tuple[float, dict]] = ()) -> dict:
    """`memory_series`: (seconds into the load, rss_mib_by_process) samples taken while it ran."""
    doors = {}
    for door in DOORS:
        mine = [r for r in results if r.door == door]
        ok = [r for r in mine if r.outcome == "ok" and r.times]
        row = {"sent": len(mine), **{o: sum(r.outcome == o for r in mine) for o in OUTCOMES}}
        if ok:
            timing = summarize([RequestTiming(r.start, r.times) for r in ok])
            row.update(ttft_p50_ms=timing.ttft_p50_ms, ttft_p99_ms=timing.ttft_p99_ms)
        total = _percentiles([(r.end - r.start) * 1e3 for r in ok])
        row.update(total_p50_ms=total[0], total_p99_ms=total[1])
        doors[door] = row
    compared = [r for r in results if r.matches is not None]
    mismatched = [r for r in compared if not r.matches]
    memory = {name: {"start_mib": memory_start.get(name), "end_mib": memory_end.get(name),
                     "growth_mib": (memory_end[name] - memory_start[name])
                     if name in memory_start and name in memory_end else None}
              for name in dict.fromkeys([*memory_start, *memory_end])}
    # flat after warm-up: the growth over the second half of the run, from the sample nearest its middle
    if memory_series:
        middle_s, middle = min(memory_series, key=lambda m: abs(m[0] - memory_series[-1][0] / 2))
        for name, m in memory.items():
            m["middle_mib"] = middle.get(name)
            m["second_half_growth_mib"] = (m["end_mib"] - middle[name]) \
                if name in middle and m["end_mib"] is not None else None
        settings = {**settings, "memory_middle_s": round(middle_s)}
    samples = {}
    for r in results:
        if r.outcome in ("error", "unanswered", "busy", "refused") and r.message:
            samples.setdefault(f"{r.outcome} {r.door}", r.message[:300])
    # "server busy" is HTTP 503; count the busy answers that came with another status, by door and status
    busy_status = {}
    for r in results:
        if r.outcome == "busy" and r.message.startswith("HTTP ") and not r.message.startswith("HTTP 503"):
            key = f"{r.door} {r.message.split(':')[0]}"
            busy_status[key] = busy_status.get(key, 0) + 1
    return {"settings": settings, "requests": len(results), "doors": doors, "busy_not_503": busy_status,
            "unanswered": sum(r.outcome == "unanswered" for r in results),
            "greedy": {"compared": len(compared), "mismatched": len(mismatched),
                       "mismatches": [{"door": r.door, "text": r.text} for r in mismatched[:10]]},
            "memory": memory, "memory_series": [{"s": round(t), "mib": m} for t, m in memory_series],
            "messages": samples}


def markdown(report: dict) -> str:
    s = report["settings"]
    f = lambda v: "" if v is None else f"{v:.0f}"  # noqa: E731
    lines = [f"# Soak: {s['model']}, {s['minutes']} min", "",
             f"{s['slots']} decode slots, {s['queue']} queue places; max_tokens {s['max_tokens']}, timeout "
             f"{s['timeout_s']} s; tritonserver's exit status {s['server_exit']}.", "",
             f"**{report['requests']} requests, {report['unanswered']} unanswered; greedy answers equal to their solo "
             f"run: {report['greedy']['compared'] - report['greedy']['mismatched']} of "
             f"{report['greedy']['compared']}.**", "",
             "| door | sent | " + " | ".join(OUTCOMES) + " | TTFT p50 / p99 ms | total p50 / p99 ms |",
             "|---|" + "---:|" * (len(OUTCOMES) + 3)]
    note = "TTFT: the first piece of a streamed answer; a unary door's is its total time."
    for door, row in report["doors"].items():
        lines.append(f"| {door} | {row['sent']} | " + " | ".join(str(row[o]) for o in OUTCOMES)
                     + f" | {f(row.get('ttft_p50_ms'))} / {f(row.get('ttft_p99_ms'))}"
                     + f" | {f(row['total_p50_ms'])} / {f(row['total_p99_ms'])} |")
    if report["busy_not_503"]:
        note += " Busy answers not given as HTTP 503: " + ", ".join(
            f"{key} ({n})" for key, n in report["busy_not_503"].items()) + "."
    columns = [("RSS after warm-up MiB", "start_mib"), ("at the end MiB", "end_mib"), ("growth MiB", "growth_mib")]
    middle = s.get("memory_middle_s")
    if middle is not None:  # sampled while it ran
        columns[1:1] = [(f"at {middle} s MiB", "middle_mib")]
        columns.append(("growth since the middle MiB", "second_half_growth_mib"))
    lines += ["", note, "", "| process | " + " | ".join(title for title, _ in columns) + " |",
              "|---|" + "---:|" * len(columns)]
    for name, m in report["memory"].items():
        lines.append(f"| {name} | " + " | ".join(f(m.get(key)) for _, key in columns) + " |")
    if "held_at_end" in report:
        lines += ["", "Held once the load had ended (all must be 0; the prefill model's rows in the disaggregated shape "
                  "only): " + ", ".join(f"{name} {value:.0f}" for name, value in report["held_at_end"].items()) + "."]
    if report["greedy"]["mismatches"]:
        lines += ["", "Greedy answers that differ from their solo run:", ""]
        lines += [f"- {m['door']}: {m['text']!r}" for m in report["greedy"]["mismatches"]]
    if report["messages"]:
        lines += ["", "One message per outcome and door:", ""]
        lines += [f"- {key}: `{message}`" for key, message in report["messages"].items()]
    return "\n".join(lines) + "\n"


# ---- the load -------------------------------------------------------------------------------------------------

GREEDY_PROMPTS = [" ".join(word_stream(seed, 12)) for seed in (1, 2, 3)]
# request kinds of the mixed load and their weights (cancel and disconnect fall back to greedy on doors without)
KINDS = {"greedy": 4, "sampled": 3, "invalid": 1, "cancel": 1, "disconnect": 1}
MAX_REQUESTS_PER_CLIENT = 10_000  # a bound on each client loop, beside its time
BUSY_PAUSE = 1.0  # seconds a client waits after a "server busy" answer


class Load:
    """The results so far, shared by the client threads."""

    def __init__(self):
        self.lock = threading.Lock()
        self.results: list[Result] = []
        self.started = time.monotonic()
        self.phase = "warm-up"
        self.memory: list[tuple[float, dict]] = []  # (seconds into the load, RSS by process), every 30 s

    def add(self, result: Result) -> None:
        with self.lock:
            self.results.append(result)

    def counts(self) -> dict[str, int]:
        with self.lock:
            return {o: n for o in OUTCOMES if (n := sum(r.outcome == o for r in self.results))}


def client_loop(load: Load, ports, args, seed: int, until: float, references: dict) -> None:
    rng = random.Random(seed)
    for count in range(MAX_REQUESTS_PER_CLIENT):
        if time.monotonic() >= until:
            return
        door = rng.choice(list(DOORS))
        kind = rng.choices(list(KINDS), weights=list(KINDS.values()))[0]
        prompt = rng.choice(GREEDY_PROMPTS) if kind == "greedy" else " ".join(word_stream(seed * 100_000 + count, 12))
        result = send(ports, args.model, door, kind, prompt, args.max_tokens, args.timeout, seed=count,
                      reference=references.get((door, prompt)) if kind == "greedy" else None)
        load.add(result)
        if result.outcome == "busy":
            time.sleep(BUSY_PAUSE)  # a client told to retry later waits, as Retry-After asks


def run_phase(load: Load, ports, args, name: str, clients: int, seconds: float, references) -> None:
    load.phase = f"{name} ({clients} clients)"
    until = time.monotonic() + seconds
    errors: list[BaseException] = []
    seeds = list(range(len(load.results) + 1, 10**9, 7919)[:clients])

    def client() -> None:
        try:
            client_loop(load, ports, args, seeds.pop(), until, references)
        except BaseException as exc:  # noqa: BLE001 - a bug of this script: raised after the phase
            errors.append(exc)

    run_clients(client, clients, errors)


def burst(load: Load, ports, args, size: int) -> None:
    """`size` requests at once, all through the doors in turn, one each."""
    load.phase = f"burst ({size} at once)"
    doors = list(DOORS)
    jobs = iter(range(size))
    lock = threading.Lock()

    def client() -> None:
        with lock:
            index = next(jobs)
        prompt = " ".join(word_stream(10**7 + index, 12))
        load.add(send(ports, args.model, doors[index % len(doors)], "sampled", prompt, args.max_tokens,
                      args.timeout, seed=index))

    run_clients(client, size, [])


def progress(load: Load, stop: threading.Event, serve_pid: int) -> None:
    """A line every 30 s, and a sample of every process's RSS (whether memory is flat after warm-up)."""
    while not stop.wait(30):
        memory = rss_mib_by_process(serve_pid)
        load.memory.append((time.monotonic() - load.started, memory))
        print(f"soak: {time.monotonic() - load.started:5.0f} s, {load.phase}: {len(load.results)} requests "
              f"{load.counts()}; RSS MiB " + ", ".join(f"{k} {v:.0f}" for k, v in memory.items()), flush=True)


def run(args) -> int:
    """tools/soak.py's options (repository, model, minutes, max_tokens, timeout, out): serve, drive, report to
    OUT.md and OUT.json; 1 if any request went unanswered, any greedy answer differed from its solo run, or any
    request, KV block or lease was still held once the load had ended."""
    slots, waiting = pool_size(args.repository, args.model)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    log = Path("build") / f"{args.out.name}.server.log"  # beside the other build outputs, not the report
    log.parent.mkdir(exist_ok=True)
    print(f"soak: serving {args.repository} (log {log}); {args.model}: {slots} decode slots, {waiting} queue places",
          flush=True)
    served = ServeProcess(args.repository, log)
    try:
        served.wait_ready()
    except BaseException:
        served.stop()
        raise
    process, ports = served.process, served.ports
    load = Load()
    stop = threading.Event()
    try:
        # solo greedy answers, one per door and prompt, one at a time: the references, and the warm-up
        references = {}
        for door in DOORS:
            for prompt in GREEDY_PROMPTS:
                solo = send(ports, args.model, door, "greedy", prompt, args.max_tokens, args.timeout)
                if solo.outcome != "ok":
                    raise RuntimeError(f"solo greedy request on {door} failed: {solo.outcome} {solo.message}")
                references[(door, prompt)] = solo.text
        memory_start = rss_mib_by_process(process.pid)
        print("soak: warmed up; RSS MiB " + ", ".join(f"{k} {v:.0f}" for k, v in memory_start.items()), flush=True)
        load.started = time.monotonic()
        threading.Thread(target=progress, args=(load, stop, process.pid), daemon=True).start()
        deadline = load.started + args.minutes * 60
        cycle = min(150.0, args.minutes * 60)  # seconds: at the pool's concurrency, 4x over, then a burst
        while time.monotonic() < deadline - 5:
            left = deadline - time.monotonic()
            run_phase(load, ports, args, "at capacity", slots, min(cycle * 0.45, left / 2), references)
            run_phase(load, ports, args, "4x over", 4 * slots, min(cycle * 0.45, max(deadline - time.monotonic(), 1)),
                      references)
            burst(load, ports, args, slots + waiting + 2 * slots)
        time.sleep(5)  # let cancelled and disconnected requests leave their slots
        memory_end = rss_mib_by_process(process.pid)
        held = held_at_end(ports.metrics, args.model)
    finally:
        stop.set()
        code = served.stop()
        print(f"soak: server stopped (exit status {code})", flush=True)
    report = summary(load.results, memory_start, memory_end,
                     dict(model=args.model, repository=str(args.repository), minutes=args.minutes, slots=slots,
                          queue=waiting, max_tokens=args.max_tokens, timeout_s=args.timeout, server_exit=code),
                     load.memory)
    report["held_at_end"] = held
    args.out.with_suffix(".json").write_text(json.dumps(report, indent=1) + "\n")
    text = markdown(report)
    args.out.with_suffix(".md").write_text(text)
    print(text, flush=True)
    failed = report["unanswered"] or report["greedy"]["mismatched"] or any(
        value for name, value in held.items() if name != "leases_expired")
    return 1 if failed else 0

