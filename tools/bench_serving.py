#!/usr/bin/env python3
"""Serving benchmark (`make bench`): mstriton under tritonserver against the engine alone, transformers and
llama.cpp, on the same weights and prompts, in one run.

    python tools/bench_serving.py [--models demo,r100m] [--concurrency 1,4,16,64] [--systems ...] [--out STEM]

For each model (the demo model of `make demo`, and a random LLaMA of about 100M parameters with the same
tokenizer) and each shape (128 prompt tokens / 128 output tokens; 1024 / 64), every system runs the same
prompts at each concurrency with closed-loop clients. Writes STEM.md (table and ratios), STEM.json and
STEM_throughput.png / STEM_ttft.png (default STEM: benchmarks/serving). Takes about an hour on 2 cores.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("GLOG_v", "3")  # MindSpore: errors only

from mstriton.bench import report  # noqa: E402
from mstriton.bench.timing import PeerUnavailable, summarize  # noqa: E402
from mstriton.bench.workload import CONCURRENCIES, SHAPES, Shape, make_prompts  # noqa: E402

CONVERTER_CODE = ["repository.py", "convert.py", "engine/graphs.py", "model/llama.py"]
LLAMACPP_THREADS = os.cpu_count() or 2  # as many as MindSpore uses: every core
SYSTEMS = ["ours", "ours-interval4", "engine", "hf-sequential", "hf-batched", "llamacpp-f32", "llamacpp-f16"]
BUILD = ROOT / "build" / "bench"
STARTED = time.monotonic()


def say(message: str) -> None:
    print(f"[bench {time.monotonic() - STARTED:6.0f}s] {message}", flush=True)


def fit_shape(shape: Shape, max_positions: int) -> Shape:
    """The shape, with a shorter prompt where prompt + output would pass the model's max_position_embeddings
    (the demo model's is 1024: its long shape is 960 in / 64 out)."""
    if shape.prompt_tokens + shape.output_tokens <= max_positions:
        return shape
    prompt = max_positions - shape.output_tokens
    return Shape(f"{prompt} in / {shape.output_tokens} out", prompt, shape.output_tokens)


def requests_for(shape: Shape, concurrency: int) -> int:
    """Enough requests for percentiles without an hour per point: two rounds of the clients for short prompts,
    one round for long ones (a 1024-token prefill of the 100M model takes seconds here)."""
    rounds = 2 if shape.prompt_tokens <= 128 else 1
    return max(rounds * concurrency, 6)


# ---- models ---------------------------------------------------------------------------------------------

def prepare_model(name: str) -> Path:
    """The model's Hugging Face folder, made if missing."""
    demo = ROOT / "build" / "demo_model"
    subprocess.run([sys.executable, str(ROOT / "tools" / "make_demo_model.py"), "--out", str(demo), "--if-stale"],
                   check=True)
    if name == "demo":
        return demo
    if name == "r100m":
        from mstriton.bench.models import random_llama
        return random_llama(BUILD / "random100m", demo, progress=say)
    raise SystemExit(f"unknown model {name!r} (demo, r100m)")


def convert_for_bench(name: str, checkpoint: Path, max_batch: int, max_seq_len: int) -> Path:
    """A model repository of its own per model, converted once for these limits."""
    from mstriton.convert import convert

    repository = BUILD / f"repo_{name}"
    stamp = repository / "bench_stamp.txt"
    # the code that writes the configs and graphs is part of the stamp: a repository from other code is redone
    code = hashlib.sha256(b"".join((ROOT / "mstriton" / f).read_bytes() for f in CONVERTER_CODE)).hexdigest()[:16]
    wanted = (f"{checkpoint.resolve()} {(checkpoint / 'model.safetensors').stat().st_mtime_ns} {max_batch} "
              f"{max_seq_len} {code}")
    if stamp.exists() and stamp.read_text() == wanted:
        return repository
    say(f"converting {name} (max batch {max_batch}, max_seq_len {max_seq_len}) into {repository}")
    convert(checkpoint, name, repository, max_batch_size=max_batch, max_seq_len=max_seq_len,
            progress=lambda line: say("  " + line))
    stamp.write_text(wanted)
    return repository


# ---- the systems ----------------------------------------------------------------------------------------

def resident_bytes(root_pid: int) -> int:
    """Resident memory of a process and all its descendants (tritonserver and its model processes)."""
    children: dict[int, list[int]] = {}
    for status in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = status.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(status.parent.name))
    total, todo = 0, [root_pid]
    while todo:
        pid = todo.pop()
        todo += children.get(pid, [])
        try:
            total += int((Path(f"/proc/{pid}/statm").read_text().split()[1])) * os.sysconf("SC_PAGE_SIZE")
        except OSError:
            pass
    return total


def available_bytes() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


def run_ours_and_engine(results, name, repository, workload, concurrencies, max_slots, systems):
    """tritonserver and the engine alone take turns point by point (the server idles while the engine runs),
    so that a slow spell of this shared machine falls on both rather than on one. The engine alone holds the
    same graphs and cache as the server's model processes; when the memory left beside the loaded server is less
    than twice what the server holds (the 103M model at 64 slots: about 12 GB each, KV caches still to grow),
    the server measures every point first and stops, then the engine alone loads and measures them."""
    from mstriton.server_process import TritonServer

    server = None
    try:
        if "ours" in systems or "ours-interval4" in systems:
            log = BUILD / f"tritonserver_{name}.log"
            say(f"{name}: starting tritonserver (log {log})")
            server = TritonServer(repository, log)
            server.wait_ready()
        together = "engine" in systems
        if server and together:
            served, available = resident_bytes(server.process.pid), available_bytes()
            together = available > 2 * served
            say(f"{name}: the server holds {served / 1e9:.1f} GB, {available / 1e9:.1f} GB are available: "
                + ("the engine alone loads beside it, and they take turns point by point" if together else
                   "the engine alone runs after the server has stopped"))
        if server:
            measure_points(results, name, repository, workload, concurrencies, max_slots, server,
                           with_engine=together, plain="ours" in systems, grouped="ours-interval4" in systems)
            say(f"{name}: tritonserver stopped ({server.stop()})")
            server = None
        if "engine" in systems and not together:
            measure_points(results, name, repository, workload, concurrencies, max_slots, None, with_engine=True)
    finally:
        if server:
            say(f"{name}: tritonserver stopped ({server.stop()})")


def prefill_chunk_length(repository: Path, name: str) -> int:
    """Prompts longer than this prefill alone in chunks (the converted engine's setting; no limit if none)."""
    manifest = json.loads((repository / f"{name}_prefill" / "1" / "engine" / "manifest.json").read_text())
    return (manifest.get("prefill_chunk") or {}).get("length") or manifest["max_seq_len"]


def measure_points(results, name, repository, workload, concurrencies, max_slots, server, with_engine,
                   plain=True, grouped=False):
    """Every shape and concurrency, on the server (if given; with `grouped`, also at 4 tokens per response) and
    the engine alone (if with_engine), taking turns at each point."""
    from mstriton.bench.engine_alone import EngineAloneProcess
    from mstriton.bench.triton_run import run_perf_analyzer

    engine = None
    try:
        if with_engine:
            say(f"{name}: loading the engine alone")
            engine = EngineAloneProcess(repository, name, max_slots=max_slots)
        for shape, prompts_by_c in workload.items():
            texts, ids = prompts_by_c[concurrencies[0]]
            if server:  # compile this prompt length's graphs before measuring
                run_perf_analyzer(server.grpc, name, texts[:4], shape.output_tokens, 2, BUILD / "pa_warmup", 2)
            if engine:
                engine.run(ids[:2], shape.output_tokens, 2)
                times = [engine.prefill_ms(ids[0]) for _ in range(3)]
                results.prefill_ms.setdefault(name, {})[shape.name] = sorted(times)[1]
                say(f"{name}, {shape.name}: single-request prefill {sorted(times)[1]:.0f} ms (median of 3)")
            # Prompts longer than the prefill chunk run alone, in chunks whose shapes were all compiled at load.
            batched = shape.prompt_tokens <= prefill_chunk_length(repository, name)
            for c in concurrencies:
                texts, ids = prompts_by_c[c]
                # A burst of c prompts first, not measured: prefill compiles each new (batch, length) shape once
                # (seconds for long prompts), and the measured run must not pay it (it did: the engine alone's
                # first token took 15 s for 16 prompts of 960 tokens, where a batch of 8 prefills in 1.4 s).
                if server and batched:
                    run_perf_analyzer(server.grpc, name, texts[:c], shape.output_tokens, c, BUILD / "pa_warmup",
                                      max(2, c // 2))
                if engine and batched:
                    engine.run(ids[:c], shape.output_tokens, c)
                if server and plain:
                    point(results, name, shape, report.OURS, c, lambda: run_perf_analyzer(
                        server.grpc, name, texts, shape.output_tokens, c, BUILD / f"pa_{name}_{c}",
                        max(2, -(-len(texts) // 3)))[0])
                if server and grouped:
                    point(results, name, shape, report.OURS_GROUPED, c, lambda: run_perf_analyzer(
                        server.grpc, name, texts, shape.output_tokens, c, BUILD / f"pa_{name}_{c}",
                        max(2, -(-len(texts) // 3)), stream_interval=4)[0])
                if engine:
                    point(results, name, shape, report.ENGINE, c, lambda: engine.run(ids, shape.output_tokens, c))
    finally:
        if engine:
            engine.close()


def run_transformers(results, name, checkpoint, workload, concurrencies, batched, max_sequential):
    from mstriton.bench.transformers_peer import TransformersPeer

    system = report.HF_BATCHED if batched else report.HF_SEQUENTIAL
    peer = TransformersPeer(checkpoint, batched=batched)
    try:
        for shape, prompts_by_c in workload.items():
            peer.run(prompts_by_c[concurrencies[0]][1][:1], 4, 1)  # warm-up
            for c in concurrencies:
                if not batched and c > max_sequential:
                    results.put(name, shape.name, system, c, {"error": f"not run: one request at a time, so its "
                                f"throughput is that of concurrency 1 (limit --hf-sequential-max {max_sequential})"})
                    continue
                point(results, name, shape, system, c, lambda: peer.run(prompts_by_c[c][1], shape.output_tokens, c))
    finally:
        peer.close()


def run_llamacpp(results, name, checkpoint, workload, concurrencies, dtype):
    from mstriton.bench import llamacpp

    system = f"llama.cpp server {dtype}"
    try:
        binary = llamacpp.build_server(ROOT / "build" / "llamacpp", say)
        gguf = llamacpp.convert_to_gguf(checkpoint, BUILD / f"{name}-{dtype}.gguf", dtype)
    except PeerUnavailable as exc:
        for shape in workload:
            for c in concurrencies:
                results.put(name, shape.name, system, c, {"error": f"not built: {exc}"})
        say(f"{system}: not built: {exc}")
        return
    longest = max(s.prompt_tokens + s.output_tokens for s in workload) + 16
    with llamacpp.LlamaCppServer(binary, gguf, parallel=max(concurrencies), ctx_per_slot=longest,
                                 threads=LLAMACPP_THREADS, log_path=BUILD / f"llamacpp_{name}_{dtype}.log") as server:
        for shape, prompts_by_c in workload.items():
            # the same prompts must be the same token ids there as here (BOS included)
            llamacpp.check_tokenizer(server, prompts_by_c[concurrencies[0]][0][:4], checkpoint / "tokenizer.model")
            llamacpp.run(server, prompts_by_c[concurrencies[0]][0][:2], 4, 2)  # warm-up
            for c in concurrencies:
                point(results, name, shape, system, c,
                      lambda: llamacpp.run(server, prompts_by_c[c][0], shape.output_tokens, c))


def point(results, name, shape, system, concurrency, measure) -> None:
    started = time.monotonic()
    try:
        value = summarize(measure()).__dict__
    except Exception as exc:  # noqa: BLE001 - a failed point is reported, and the run goes on
        value = {"error": f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"}
        say(f"{name}, {shape.name}, {system}, c={concurrency}: {value['error']}")
    else:
        say(f"{name}, {shape.name}, {system}, c={concurrency}: {value['requests']} requests, "
            f"{value['tokens_per_s']:.1f} tok/s, TTFT p50 {value['ttft_p50_ms']:.0f} ms, "
            f"ITL p50 {value['itl_p50_ms']:.1f} ms ({time.monotonic() - started:.0f}s)")
    results.put(name, shape.name, system, concurrency, value)
    results.save_json(BUILD / "results.json")  # a run that stops half-way keeps what it measured


def versions() -> dict:
    from importlib.metadata import version

    from mstriton.bench.llamacpp import LLAMA_CPP_PYTHON_VERSION

    found = {"tritonserver": "2.51 (nvidia-pytriton 0.7.0)",
             "llama.cpp": f"as vendored in llama-cpp-python {LLAMA_CPP_PYTHON_VERSION}"}
    for package in ("mindspore", "tritonclient", "torch", "transformers"):
        try:
            found[package] = version(package)
        except Exception:  # noqa: BLE001
            found[package] = "not installed"
    return found


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="demo,r100m")
    parser.add_argument("--shapes", default=",".join(str(s.prompt_tokens) for s in SHAPES),
                        help="prompt lengths of the shapes to run (128, 1024)")
    parser.add_argument("--concurrency", default=",".join(map(str, CONCURRENCIES)))
    parser.add_argument("--systems", default=",".join(SYSTEMS), help=f"any of {','.join(SYSTEMS)}")
    parser.add_argument("--hf-sequential-max", type=int, default=4,
                        help="highest concurrency at which transformers runs one request at a time")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "serving"), help="output path stem")
    args = parser.parse_args(argv)
    concurrencies = [int(c) for c in args.concurrency.split(",")]
    shapes = [s for s in SHAPES if str(s.prompt_tokens) in args.shapes.split(",")]
    systems = args.systems.split(",")
    unknown = set(systems) - set(SYSTEMS)
    if unknown:
        parser.error(f"--systems: unknown {sorted(unknown)}; choose from {SYSTEMS}")
    BUILD.mkdir(parents=True, exist_ok=True)
    max_batch = max(concurrencies)
    tools = {report.OURS: "perf_analyzer 2.43 --streaming over gRPC against the decoupled front model; figures "
                          "from its --profile-export-file (genai-perf cannot run here: 0.0.16 needs a perf_analyzer "
                          "that writes service_kind and responses into the export, and the PyPI perf-analyzer "
                          "wheel needs glibc 2.38)",
             report.ENGINE: "in-process clock around the same prefill + Scheduler loop, no server",
             report.HF_SEQUENTIAL: "in-process clock; a streamer stamps each generate() step",
             report.HF_BATCHED: "in-process clock; a streamer stamps each generate() step",
             "llama.cpp server f32/f16": f"llama-server of llama-cpp-python's sdist, {LLAMACPP_THREADS} threads, "
                                         "one parallel slot per client; HTTP /completion streaming client, a "
                                         "timestamp per streamed token"}
    results = report.Results(date=datetime.date.today().isoformat(), machine=report.machine_description(),
                             versions=versions(), tools=tools, prefill_ms={})
    for name in args.models.split(","):
        checkpoint = prepare_model(name)
        limit = json.loads((checkpoint / "config.json").read_text())["max_position_embeddings"]
        model_shapes = [fit_shape(s, limit) for s in shapes]
        max_seq_len = min(limit, max(s.prompt_tokens + s.output_tokens for s in model_shapes) + 64)
        repository = convert_for_bench(name, checkpoint, max_batch, max_seq_len)
        from mstriton.tokenizer import load_tokenizer
        tokenizer = load_tokenizer(checkpoint / "tokenizer.model")
        workload = {}
        for shape in model_shapes:
            workload[shape] = {}
            for c in concurrencies:
                texts = make_prompts(checkpoint / "tokenizer.model", requests_for(shape, c), shape.prompt_tokens,
                                     seed=c)
                workload[shape][c] = (texts, [tokenizer.encode(t) for t in texts])
        say(f"{name}: prompts ready ({', '.join(s.name for s in shapes)}; concurrency {concurrencies})")
        if {"ours", "ours-interval4", "engine"} & set(systems):
            run_ours_and_engine(results, name, repository, workload, concurrencies, max_batch, systems)
        if "hf-sequential" in systems:
            run_transformers(results, name, checkpoint, workload, concurrencies, False, args.hf_sequential_max)
        if "hf-batched" in systems:
            run_transformers(results, name, checkpoint, workload, concurrencies, True, args.hf_sequential_max)
        for dtype in ("f32", "f16"):
            if f"llamacpp-{dtype}" in systems:
                run_llamacpp(results, name, checkpoint, workload, concurrencies, dtype)
        write_report(results, concurrencies, Path(args.out))  # after each model: a cut-short run keeps its part
    say(f"done in {time.monotonic() - STARTED:.0f}s")
    return 0


def write_report(results, concurrencies, out: Path) -> None:
    for path in report.write_report(results, concurrencies, out):
        say(f"wrote {path}")


if __name__ == "__main__":
    sys.exit(main())
