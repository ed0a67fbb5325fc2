"""aiperf (NVIDIA's LLM benchmark client, genai-perf's successor; PyPI, pure Python) as the frontend benchmark's
client: its own virtual environment, one `aiperf profile` run per point, and the figures read from its export.

aiperf has many dependencies (pandas, pyarrow, dash, datasets, transformers, ...) that must not meet the serving
pins of .venv, so it lives in build/aiperf-venv, made on first use from requirements-aiperf.txt and remade when
that file changes.

What one run leaves in its artifact folder (aiperf 0.13, `--export-level records`):
- profile_export_aiperf.json: the summary, one object per metric tag ({"unit", "avg", "p50", "p99", ...}), plus
  "input_config", "error_summary", "start_time", "end_time", "was_cancelled";
- profile_export.jsonl: one line per request, warm-up ones too ({"metadata": {"benchmark_phase": "warmup" or
  "profiling", "conversation_id", ...}, "metrics": {tag: {"value", "unit"}}, "error": ... when it failed});
- inputs.json: the data set's request bodies, {"data": [{"session_id", "payloads": [body, ...]}, ...]}: with
  synthetic prompts and --request-count N, N entries, each sent once in the profiling phase (the warm-up reuses
  some), and the same entries for the same seed, lengths and N whatever the server.

aiperf's formulas, which figures_of_timings applies to other clients' timings too: time to first token per
request; inter-token latency per request = (request latency - TTFT) / (output tokens - 1); percentiles over
requests (linear interpolation); throughput = output tokens (or requests) over the profiling phase, from the
first request sent to the last response received (aiperf's phase span is a few ms longer than its
benchmark_duration).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import resource
import shlex
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from collections.abc import Callable, Sequence

import numpy as np

from mstriton.params import PARAMETERS, door_fields

from .timing import RequestTiming

ROOT = Path(__file__).resolve().parents[1]
REQUIREMENTS = ROOT / "requirements-aiperf.txt"
DEFAULT_VENV = ROOT / "build" / "aiperf-venv"
SUMMARY_FILE, RECORDS_FILE, INPUTS_FILE = "profile_export_aiperf.json", "profile_export.jsonl", "inputs.json"
# Packages whose versions the report names
REPORTED_PACKAGES = ("aiperf", "transformers", "aiohttp")

Progress = Callable[[str], None]


def _tail(text: str, lines: int = 20) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


# ---------------------------------------------------------------------------------------------------------------
# The environment

def venv_binary(venv: Path = DEFAULT_VENV) -> Path:
    return Path(venv) / "bin" / "aiperf"


def ensure_venv(venv: Path = DEFAULT_VENV, requirements: Path = REQUIREMENTS, progress: Progress = print) -> Path:
    """The aiperf executable of `venv`, which is created (from this interpreter's base Python) and filled with pip
    from `requirements` unless it was already filled from a file of the same content. Takes a few minutes the
    first time (about 140 packages)."""
    venv, requirements = Path(venv), Path(requirements)
    digest = hashlib.sha256(requirements.read_bytes()).hexdigest()
    stamp, binary = venv / "mstriton-requirements.sha256", venv_binary(venv)
    if binary.is_file() and stamp.is_file() and stamp.read_text().strip() == digest:
        return binary
    python = venv / "bin" / "python"
    if not python.is_file():
        progress(f"aiperf: creating its virtual environment {venv}")
        base = getattr(sys, "_base_executable", None) or sys.executable
        done = subprocess.run([base, "-m", "venv", str(venv)], capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"cannot create {venv}: {_tail(done.stdout + done.stderr)}")
    progress(f"aiperf: installing {requirements.name} into {venv} (a few minutes the first time)")
    done = subprocess.run([str(python), "-m", "pip", "install", "--disable-pip-version-check", "-q", "-r",
                           str(requirements)], capture_output=True, text=True)
    if done.returncode != 0 or not binary.is_file():
        raise RuntimeError(f"pip install -r {requirements} into {venv} failed:\n{_tail(done.stdout + done.stderr)}")
    stamp.write_text(digest + "\n")
    return binary


def venv_versions(venv: Path = DEFAULT_VENV, packages: Sequence[str] = REPORTED_PACKAGES) -> dict[str, str]:
    """Versions of `packages` inside the aiperf environment (prefixed 'aiperf venv: ' but for aiperf itself)."""
    code = ("import importlib.metadata as m, json, sys\n"
            "out = {}\n"
            "for p in sys.argv[1:]:\n"
            "    try: out[p] = m.version(p)\n"
            "    except m.PackageNotFoundError: out[p] = 'not installed'\n"
            "print(json.dumps(out))")
    done = subprocess.run([str(Path(venv) / "bin" / "python"), "-c", code, *packages], capture_output=True,
                          text=True)
    found = json.loads(done.stdout) if done.returncode == 0 else {p: "unknown" for p in packages}
    return {(p if p == "aiperf" else f"{p} (aiperf venv)"): v for p, v in found.items()}


# ---------------------------------------------------------------------------------------------------------------
# One run

def shown_path(value) -> str:
    """A path inside the repository relative to it (the report's command lines stay readable)."""
    text = str(value)
    root = str(ROOT) + os.sep
    return text.removeprefix(root)


@dataclasses.dataclass
class ProfileRun:
    """One `aiperf profile` point: streaming chat completions at a fixed concurrency, synthetic prompts of
    input_tokens (no spread) from `seed`, output_tokens asked for with max_tokens, `extra_inputs` merged into
    every body (what fixes the length: min_tokens for vLLM-style servers, ignore_eos for llama.cpp)."""
    aiperf: Path
    url: str
    model: str
    tokenizer: Path
    concurrency: int
    request_count: int
    input_tokens: int
    output_tokens: int
    artifact_dir: Path
    warmup_count: int = 0
    seed: int = 0
    extra_inputs: dict = dataclasses.field(default_factory=dict)
    endpoint_type: str = "chat"
    # aiperf 0.13 with --concurrency alone polls for a free slot without sleeping (its timing_manager took 83% of
    # one of this machine's two cores); a constant request rate above what the server can take keeps the closed
    # loop (no request starts while `concurrency` are in flight) and sleeps between tries: a finished request's
    # successor starts at the next tick, 1 / poll_rate s later at most. 0: concurrency alone.
    poll_rate: float = 100.0
    # a new connection per request: llama-server (cpp-httplib) closes a connection idle for 5 s, and aiperf's
    # pooled connections then fail with ServerDisconnectedError when reused; a loopback connect costs ~0.1 ms
    connection_reuse: str = "never"
    cpu_seconds: float = 0.0   # aiperf's own CPU time (user + system, all its processes), set by run()

    def command(self) -> list[str]:
        cmd = [str(self.aiperf), "profile", "--model", self.model, "--url", self.url,
               "--endpoint-type", self.endpoint_type, "--streaming", "--tokenizer", str(self.tokenizer),
               "--isl", str(self.input_tokens), "--isl-stddev", "0",
               "--osl", str(self.output_tokens), "--osl-stddev", "0", "--random-seed", str(self.seed),
               "--concurrency", str(self.concurrency), "--request-count", str(self.request_count),
               # max_tokens, as every OpenAI-style server reads it (max_completion_tokens is newer)
               "--use-legacy-max-tokens",
               # output tokens as the server counts them (usage of the last chunk), not re-tokenized text
               "--use-server-token-count",
               "--artifact-dir", str(self.artifact_dir), "--export-level", "records",
               "--ui-type", "none", "--no-server-metrics", "--no-gpu-telemetry", "--no-auto-plot",
               "--connection-reuse-strategy", self.connection_reuse]
        if self.poll_rate:
            cmd += ["--request-rate", f"{self.poll_rate:g}", "--arrival-pattern", "constant"]
        if self.warmup_count:
            cmd += ["--warmup-request-count", str(self.warmup_count)]
        if self.extra_inputs:
            cmd += ["--extra-inputs", json.dumps(self.extra_inputs, separators=(",", ":"))]
        return cmd

    def shell_command(self) -> str:
        return shlex.join(shown_path(part) for part in self.command())

    def run(self, timeout: float = 900.0) -> "ProfileResult":
        """Run aiperf (its whole process group is killed after `timeout` seconds) and read its export. Its output
        goes to ARTIFACT_DIR/aiperf.log."""
        shutil.rmtree(self.artifact_dir, ignore_errors=True)
        self.artifact_dir.mkdir(parents=True)
        log_path = self.artifact_dir / "aiperf.log"
        # not HF_HUB_OFFLINE: in offline mode aiperf 0.13 looks a tokenizer up as a hub id in the cache, even a
        # local folder (which it loads directly otherwise, with no network)
        env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE",
                                                                "PYTHONPATH")}
        env["NO_COLOR"] = "1"
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    env=env, cwd=str(self.artifact_dir), start_new_session=True)
            try:
                code = proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                raise RuntimeError(f"aiperf did not finish in {timeout:.0f} s; log {log_path}:\n"
                                   f"{_tail(log_path.read_text(errors='replace'))}") from None
            except BaseException:  # the benchmark is being stopped: aiperf's processes go with it
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                raise
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        self.cpu_seconds = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
        if code != 0 or not (self.artifact_dir / SUMMARY_FILE).is_file():
            raise RuntimeError(f"aiperf exited with {code}; log {log_path}:\n"
                               f"{_tail(log_path.read_text(errors='replace'))}")
        return read_artifacts(self.artifact_dir)

    def payloads(self) -> list[dict]:
        """The request bodies this run sent (after it ran)."""
        return read_inputs(self.artifact_dir / INPUTS_FILE)


# ---------------------------------------------------------------------------------------------------------------
# The export

@dataclasses.dataclass
class ProfileResult:
    summary: dict           # profile_export_aiperf.json
    records: list[dict]     # profile_export.jsonl, one per request (failed ones included)
    payloads: list[dict]    # inputs.json's request bodies

    def metric(self, tag: str, stat: str = "avg") -> float | None:
        entry = self.summary.get(tag)
        if not isinstance(entry, dict) or entry.get(stat) is None:
            return None
        return float(entry[stat])

    def ms(self, tag: str, stat: str) -> float | None:
        """A latency metric in milliseconds, whatever unit the summary gives it."""
        value = self.metric(tag, stat)
        if value is None:
            return None
        return value * {"ns": 1e-6, "us": 1e-3, "ms": 1.0, "s": 1e3, "sec": 1e3}[self.summary[tag].get("unit", "ms")]

    @property
    def measured(self) -> list[dict]:
        """The records of the profiling phase (the export holds the warm-up's too)."""
        return [r for r in self.records if (r.get("metadata") or {}).get("benchmark_phase", "profiling")
                == "profiling"]

    @property
    def errors(self) -> int:
        return sum(1 for r in self.measured if r.get("error"))

    @property
    def first_error(self) -> str | None:
        for record in self.measured:
            if record.get("error"):
                return json.dumps(record["error"])[:500]
        for entry in self.summary.get("error_summary") or []:
            return json.dumps(entry)[:500]
        return None

    @property
    def inputs_digest(self) -> str:
        """A short hash of the prompts sent (the messages only), to show two runs sent the same ones."""
        messages = [p.get("messages") or p.get("prompt") for p in self.payloads]
        return hashlib.sha256(json.dumps(messages, sort_keys=True).encode()).hexdigest()[:12]

    def figures(self) -> dict:
        """The report's figures: request count, output tokens, benchmark seconds, output token and request
        throughput, TTFT and ITL p50/p99 in ms, mean prompt and output tokens per request, failed requests."""
        seconds = self.metric("benchmark_duration")
        if seconds is not None and self.summary["benchmark_duration"].get("unit") in ("ns",):
            seconds /= 1e9
        requests = self.metric("request_count")
        if requests is None:
            raise ValueError(f"aiperf's summary has no request_count (failed requests: {self.errors}; first: "
                             f"{self.first_error})")
        return {"requests": int(requests), "failed": self.errors,
                "output_tokens": int(self.metric("total_output_tokens") or 0),
                "seconds": seconds, "output_tokens_per_s": self.metric("output_token_throughput"),
                "requests_per_s": self.metric("request_throughput"),
                "ttft_p50_ms": self.ms("time_to_first_token", "p50"),
                "ttft_p99_ms": self.ms("time_to_first_token", "p99"),
                "itl_p50_ms": self.ms("inter_token_latency", "p50"),
                "itl_p99_ms": self.ms("inter_token_latency", "p99"),
                "prompt_tokens_avg": self.metric("input_sequence_length"),
                "output_tokens_avg": self.metric("output_sequence_length")}


def read_inputs(path: Path) -> list[dict]:
    """Every request body of an inputs.json, in order."""
    if not Path(path).is_file():
        return []
    data = json.loads(Path(path).read_text())
    return [payload for session in data.get("data", []) for payload in session.get("payloads", [])]


def read_records(path: Path) -> list[dict]:
    if not Path(path).is_file():
        return []
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def read_artifacts(folder: Path) -> ProfileResult:
    folder = Path(folder)
    return ProfileResult(summary=json.loads((folder / SUMMARY_FILE).read_text()),
                         records=read_records(folder / RECORDS_FILE), payloads=read_inputs(folder / INPUTS_FILE))


# ---------------------------------------------------------------------------------------------------------------
# Other clients, by aiperf's formulas

def figures_of_timings(timings: list[RequestTiming]) -> dict:
    """ProfileResult.figures' keys from per-request timings (another client's, e.g. perf_analyzer's), computed
    as aiperf computes them."""
    timings = [t for t in timings if t.token_times]
    if not timings:
        raise ValueError("no request produced a token")
    seconds = max(t.token_times[-1] for t in timings) - min(t.start for t in timings)
    tokens = sum(len(t.token_times) for t in timings)
    ttft = np.array([t.token_times[0] - t.start for t in timings]) * 1e3
    itl = np.array([(t.token_times[-1] - t.token_times[0]) / (len(t.token_times) - 1)
                    for t in timings if len(t.token_times) > 1]) * 1e3
    if not itl.size:
        itl = np.zeros(1)
    return {"requests": len(timings), "failed": 0, "output_tokens": tokens, "seconds": seconds,
            "output_tokens_per_s": tokens / seconds, "requests_per_s": len(timings) / seconds,
            "ttft_p50_ms": float(np.percentile(ttft, 50)), "ttft_p99_ms": float(np.percentile(ttft, 99)),
            "itl_p50_ms": float(np.percentile(itl, 50)), "itl_p99_ms": float(np.percentile(itl, 99)),
            "prompt_tokens_avg": None, "output_tokens_avg": tokens / len(timings)}


# Chat-body fields -> the front model's inputs of the same meaning and their types: what the frontend's OpenAI door
# reads and sends for them (the parameter table's openai door; max_tokens is read below)
KINDS = {p.name: p.kind for p in PARAMETERS}  # int, float, bool: a value's JSON type in perf_analyzer's data
FRONT_MODEL_FIELDS = {field: (name, KINDS[name]) for name, field in door_fields("openai").items()}


def front_model_inputs(payload: dict, output_tokens: int | None = None) -> dict:
    """One perf_analyzer --input-data entry for our front model from an OpenAI chat body aiperf sent: the
    messages as the JSON text of the `messages` input, max_tokens (max_tokens or max_completion_tokens, or
    output_tokens), the sampling fields the frontend passes on, streaming on."""
    if "messages" not in payload:
        raise ValueError("not a chat body: no 'messages'")
    entry: dict = {"messages": [json.dumps(payload["messages"], ensure_ascii=False)]}
    max_tokens = payload.get("max_tokens", payload.get("max_completion_tokens", output_tokens))
    if max_tokens is not None:
        entry["max_tokens"] = [int(max_tokens)]
    for field, (name, kind) in FRONT_MODEL_FIELDS.items():
        if payload.get(field) is not None:
            entry[name] = [kind(payload[field])]
    entry["stream"] = [True]
    return entry
