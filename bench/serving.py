"""Serving benchmark (tools/bench_serving.py, `make bench`): mstriton under tritonserver against the engine alone,
transformers and llama.cpp, on the same weights and prompts, in one run.

    python tools/bench_serving.py [--models demo,r100m,smollm2] [--shapes 128,1024] [--concurrency 1,4,16,64]
                                  [--systems ...] [--out STEM]
    python tools/bench_serving.py --report-from RUN1.json [RUN2.json ...] --out STEM   (report only)

Models: the demo model of `make demo`, and a random LLaMA of about 100M parameters with the same tokenizer
(Hugging Face folders that every system reads); and SmolLM2-135M-Instruct (`smollm2`), which ships as one GGUF
file of Q4_1 matrices and Q8_0 embeddings (mstriton.pretrained.smollm2_gguf()).

Systems (--systems; without it, each model runs its own default list, DEFAULT_SYSTEMS):
- ours, ours-interval4, engine: tritonserver (at 1 and 4 tokens per response) and the engine alone, on the
  model converted with the converter's default float32 weights;
- ours-<w>, engine-<w> for w in f32, bf16, int8, q8_0, q4_0, q4_1: the same, converted with --weights float32,
  bfloat16, int8, Q8_0, Q4_0, Q4_1 (a GGUF model is converted from its file: Q4_1 keeps the file's own blocks);
- hf-sequential, hf-batched: transformers (PyTorch, float32) one request at a time, or static batches, on the
  model's float32 Hugging Face folder (for a GGUF model, the folder transformers makes from the file);
- llamacpp-<t> for t in f32, f16, bf16, q8_0, q4_1: llama.cpp's llama-server on a GGUF of that type: the
  model's own file when it is of that type (SmolLM2: q4_1), else one that llama.cpp's converter writes from the
  Hugging Face folder (f32, f16, bf16, q8_0 only);
- vllm, vllm-bf16, vllm-f32: vLLM CPU's OpenAI server (bench/vllm_peer.py, in its own venv build/vllm-venv, the
  wheel chosen by the CPU's flags) on the model's float32 Hugging Face folder at --dtype bfloat16 / float32
  (`vllm`: bfloat16 where the CPU has AVX-512 BF16, else float32), streamed chat completions through
  bench.frontend.stream_chat.
SmolLM2's default list is ours-q4_1, ours-bf16, ours-f32, llamacpp-q4_1, llamacpp-f16, llamacpp-f32, vllm,
hf-batched, hf-sequential; the report puts each of our formats beside llama.cpp on the same weights (Q4_1 / Q4_1, our
bfloat16 / its f16, float32 / f32) and transformers, with ratios.

For each model and each shape (128 prompt tokens / 128 output tokens; 1024 / 64), every system runs the same
prompts (exactly the requested token count for the model's own tokenizer, checked against llama.cpp's) at each
concurrency with closed-loop clients. Writes STEM.md (table and ratios), STEM.json and STEM_throughput.png /
STEM_ttft.png (default STEM: benchmarks/serving). The demo and 100M models take about an hour on 2 cores.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import NamedTuple

from bench import report
from bench.harness.processes import available_bytes, resident_bytes
from bench.timing import PeerUnavailable, summarize
from bench.workload import CONCURRENCIES, SHAPES, Shape, make_prompts  # noqa: F401 (the tool's defaults)

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("GLOG_v", "3")  # MindSpore: errors only

# what writes the configs, graphs and weights of a converted repository: a repository from other code is redone
CONVERTER_CODE = ["repository.py", "convert.py", "sources.py", "engine/graphs.py", "engine/weight_formats.py",
                  "model/llama.py", "model/gguf.py", "model/gguf_tokenizer.py"]
LLAMACPP_THREADS = os.cpu_count() or 2  # as many as MindSpore uses: every core
# ours-<suffix> / engine-<suffix>: the converter's --weights
OURS_FORMATS = {"f32": "float32", "bf16": "bfloat16", "int8": "int8", "q8_0": "Q8_0", "q4_0": "Q4_0",
                "q4_1": "Q4_1"}
# llamacpp-<type>: a GGUF file of that llama.cpp type, and its name in the report
LLAMACPP_TYPES = {"f32": "f32", "f16": "f16", "bf16": "bf16", "q8_0": "Q8_0", "q4_1": "Q4_1"}
# the llama.cpp files that hold the same weights as each of our formats (bfloat16 against f16: the same two bytes
# a weight, the file llama.cpp's users convert to)
SHARED_WEIGHTS = {"float32": ("f32",), "bfloat16": ("f16", "bf16"), "Q8_0": ("q8_0",), "Q4_1": ("q4_1",)}
SYSTEMS = ["ours", "ours-interval4", "engine", "hf-sequential", "hf-batched", "llamacpp-f32", "llamacpp-f16"]
ALL_SYSTEMS = (SYSTEMS + [f"ours-{s}" for s in OURS_FORMATS] + [f"engine-{s}" for s in OURS_FORMATS]
               + [f"llamacpp-{t}" for t in LLAMACPP_TYPES if f"llamacpp-{t}" not in SYSTEMS]
               + ["vllm", "vllm-bf16", "vllm-f32"])  # bench.vllm_peer.SYSTEMS
MODELS = ("demo", "r100m", "smollm2")
DEFAULT_SYSTEMS = {"demo": SYSTEMS, "r100m": SYSTEMS,
                   "smollm2": ["ours-q4_1", "ours-bf16", "ours-f32", "llamacpp-q4_1", "llamacpp-f16",
                               "llamacpp-f32", "vllm", "hf-batched", "hf-sequential"]}
BUILD = ROOT / "build" / "bench"
STARTED = time.monotonic()


def say(message: str) -> None:
    print(f"[bench {time.monotonic() - STARTED:6.0f}s] {message}", flush=True)


def ours_label(weights: str) -> str:
    return f"mstriton {weights} (tritonserver)"


def engine_label(weights: str) -> str:
    return f"engine alone {weights}"


def llamacpp_label(gguf_type: str) -> str:
    return f"llama.cpp server {LLAMACPP_TYPES[gguf_type]}"


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

def prepare_model(name: str):
    """The model as each system reads it (models.BenchModel), its files made if missing."""
    from bench import models

    if name == "smollm2":
        return models.smollm2(BUILD, progress=say)
    if name not in ("demo", "r100m"):
        raise SystemExit(f"unknown model {name!r} ({', '.join(MODELS)})")
    demo = ROOT / "build" / "demo_model"
    subprocess.run([sys.executable, str(ROOT / "tools" / "make_demo_model.py"), "--out", str(demo), "--if-stale"],
                   check=True)
    if name == "demo":
        return models.hf_model(name, demo)
    return models.hf_model(name, models.random_llama(BUILD / "random100m", demo, progress=say))


def source_mtime(checkpoint: Path) -> int:
    return (checkpoint if checkpoint.is_file() else checkpoint / "model.safetensors").stat().st_mtime_ns


def convert_for_bench(name: str, checkpoint: Path, max_batch: int, max_seq_len: int,
                      weights: str = "float32") -> Path:
    """A model repository of its own per model and weight format, converted once for these limits. The models
    in it are named `name` whatever the format (one repository, one tritonserver at a time)."""
    from mstriton.convert import convert

    repository = BUILD / (f"repo_{name}" if weights == "float32" else f"repo_{name}_{weights.lower()}")
    stamp = repository / "bench_stamp.txt"
    # the code that writes the configs and graphs is part of the stamp: a repository from other code is redone
    code = hashlib.sha256(b"".join((ROOT / "mstriton" / f).read_bytes() for f in CONVERTER_CODE)).hexdigest()[:16]
    wanted = f"{checkpoint.resolve()} {source_mtime(checkpoint)} {max_batch} {max_seq_len} {weights} {code}"
    if stamp.exists() and stamp.read_text() == wanted:
        return repository
    say(f"converting {name} (--weights {weights}, max batch {max_batch}, max_seq_len {max_seq_len}) into "
        f"{repository}")
    convert(checkpoint, name, repository, max_batch_size=max_batch, max_seq_len=max_seq_len, weights=weights,
            progress=lambda line: say("  " + line))
    stamp.write_text(wanted)
    return repository


def check_served_tokenizer(repository: Path, name: str, tokenizer: Path) -> None:
    """The prompts were cut with `tokenizer`: the converted repository must serve the same tokenizer files."""
    served = repository / f"{name}_tokenizer" / "1"
    for file_name in ("tokenizer.json", "tokenizer.model"):
        if (tokenizer / file_name).is_file():
            if not (served / file_name).is_file() or \
                    (served / file_name).read_bytes() != (tokenizer / file_name).read_bytes():
                raise RuntimeError(f"{served / file_name} is not the {tokenizer / file_name} the prompts were "
                                   "made with")
            return


def applicable(model, system: str) -> str | None:
    """Why `system` cannot run on `model` (None: it can)."""
    from bench.llamacpp import GGUF_DTYPES

    if system.startswith("llamacpp-"):
        gguf_type = system.split("-", 1)[1]
        if gguf_type != model.gguf_type and gguf_type not in GGUF_DTYPES:
            return (f"not run: no {LLAMACPP_TYPES[gguf_type]} GGUF of this model (llama.cpp's converter writes "
                    f"{'/'.join(GGUF_DTYPES)} only)")
    return None


# ---- the systems ----------------------------------------------------------------------------------------

class OursRun(NamedTuple):
    """What to measure on one converted repository: the report's names of the server's points (None: not
    measured), at one token per response (`plain`) and at four (`grouped`), and of the engine alone's."""
    weights: str              # the converter's --weights
    tag: str                  # in log names and progress lines
    plain: str | None = None
    grouped: str | None = None
    engine: str | None = None
    prefill_key: str = ""     # results.prefill_ms[prefill_key][shape]: the engine alone's single-request prefill

    @property
    def server(self) -> bool:
        return bool(self.plain or self.grouped)

    def labels(self) -> list[str]:
        return [label for label in (self.plain, self.grouped, self.engine) if label]


def ours_runs(name: str, systems: list[str]) -> list[OursRun]:
    """What to measure on each converted repository the systems need: the default one first (ours, ours-interval4,
    engine), then each format of ours-<w> / engine-<w> in the order asked."""
    runs: dict[str, OursRun] = {}
    if {"ours", "ours-interval4", "engine"} & set(systems):
        runs["default"] = OursRun("float32", "default", plain=report.OURS if "ours" in systems else None,
                                  grouped=report.OURS_GROUPED if "ours-interval4" in systems else None,
                                  engine=report.ENGINE if "engine" in systems else None, prefill_key=name)
    for system in systems:
        kind, _, suffix = system.partition("-")
        if kind in ("ours", "engine") and suffix in OURS_FORMATS and suffix not in runs:
            weights = OURS_FORMATS[suffix]
            runs[suffix] = OursRun(weights, weights, plain=ours_label(weights) if f"ours-{suffix}" in systems else None,
                                   engine=engine_label(weights) if f"engine-{suffix}" in systems else None,
                                   prefill_key=f"{name} {weights}")
    return list(runs.values())


class BenchServer:
    """tritonserver for the benchmark's points, started again when it dies under one. The python backend
    (2.51 here) has an intermittent crash under concurrent decoupled BLS (SIGSEGV, boost lock_exception in
    libtriton_python.so: tritonserver issue 8882, still open in 2.69); on 2026-12-02 it killed the server three
    times in two runs, each at the first burst of a higher concurrency (c=16, c=64). A point the server died
    under is measured again, once, on the new server after a warm-up at its concurrency; every crash is a note
    of the report."""

    def __init__(self, repository: Path, name: str, tag: str, results):
        self.repository, self.name, self.tag, self.results = repository, name, tag, results
        self.starts = 0
        self.server = None
        self.start()

    def start(self) -> None:
        from bench.harness.servers import TritonServer

        self.starts += 1
        suffix = "" if self.starts == 1 else f"_restart{self.starts - 1}"
        log = BUILD / f"tritonserver_{self.name}_{self.tag}{suffix}.log"
        say(f"{self.name}, {self.tag}: starting tritonserver (log {log})")
        self.server = TritonServer(self.repository, log)
        self.server.wait_ready()

    @property
    def process(self):
        return self.server.process

    def stop(self) -> int:
        return self.server.stop()

    def perf(self, prompts, output_tokens, concurrency, workdir, requests_per_window, attempts=2, **options):
        """run_perf_analyzer on the current server; if the server dies under it, start a new one, warm it up at
        this concurrency and run it again, up to `attempts` runs in all."""
        from bench.triton_run import ServerDied, run_perf_analyzer

        for attempt in range(1, attempts + 1):
            try:
                return run_perf_analyzer(self.server.grpc, self.name, prompts, output_tokens, concurrency, workdir,
                                         requests_per_window, server=self.server.process, **options)
            except ServerDied as exc:
                crash = next((line for line in self.server.tail(40).splitlines() if "Signal (" in line), str(exc))
                note = (f"{self.name}, {self.tag}: tritonserver died under perf_analyzer at c={concurrency} "
                        f"({crash.strip()}; log {self.server.log.name}); "
                        + ("started again and the point measured once more" if attempt < attempts
                           else "gave up the point"))
                say(note)
                self.results.notes.append(note)
                self.server.stop()  # removes what the dead server left in /dev/shm
                self.start()
                if attempt == attempts:
                    raise
                self.warm_up(prompts, output_tokens, concurrency, attempts=1)

    def warm_up(self, prompts, output_tokens, concurrency, attempts=2):
        """A burst of `concurrency` prompts, not measured: prefill compiles each new (batch, length) shape once
        (seconds for long prompts), and a measured run must not pay it."""
        self.perf(prompts[:concurrency], output_tokens, concurrency, BUILD / "pa_warmup", max(2, concurrency // 2),
                  attempts=attempts)


def run_ours_and_engine(results, name, repository, workload, concurrencies, max_slots, run: OursRun):
    """tritonserver and the engine alone take turns point by point (the server idles while the engine runs),
    so that a slow spell of this shared machine falls on both rather than on one. The engine alone holds the
    same graphs and cache as the server's model processes; when the memory left beside the loaded server is less
    than twice what the server holds (the 103M model at 64 slots: about 12 GB each, KV caches still to grow),
    the server measures every point first and stops, then the engine alone loads and measures them."""
    server = None
    try:
        if run.server:
            server = BenchServer(repository, name, run.tag, results)
        together = bool(run.engine)
        if server and together:
            served, available = resident_bytes(server.process.pid), available_bytes()
            together = available > 2 * served
            say(f"{name}: the server holds {served / 1e9:.1f} GB, {available / 1e9:.1f} GB are available: "
                + ("the engine alone loads beside it, and they take turns point by point" if together else
                   "the engine alone runs after the server has stopped"))
        if server:
            measure_points(results, name, repository, workload, concurrencies, max_slots, server, run,
                           with_engine=together)
            say(f"{name}: tritonserver stopped ({server.stop()})")
            server = None
        if run.engine and not together:
            measure_points(results, name, repository, workload, concurrencies, max_slots, None, run,
                           with_engine=True)
    finally:
        if server:
            say(f"{name}: tritonserver stopped ({server.stop()})")


def prefill_chunk_length(repository: Path, name: str) -> int:
    """Prompts longer than this prefill alone in chunks (the converted engine's setting; no limit if none)."""
    manifest = json.loads((repository / f"{name}_decode" / "1" / "engine" / "manifest.json").read_text())
    return (manifest.get("prefill_chunk") or {}).get("length") or manifest["max_seq_len"]


def measure_points(results, name, repository, workload, concurrencies, max_slots, server, run: OursRun,
                   with_engine):
    """Every shape and concurrency, on the server (if given: at one token per response, and at 4 if the run
    asks) and the engine alone (if with_engine), taking turns at each point."""
    from bench.engine_alone import EngineAloneProcess

    engine = None
    try:
        if with_engine:
            say(f"{name}, {run.tag}: loading the engine alone")
            engine = EngineAloneProcess(repository, name, max_slots=max_slots)
        for shape, prompts_by_c in workload.items():
            texts, ids = prompts_by_c[concurrencies[0]]
            if server:  # compile this prompt length's graphs before measuring
                server.perf(texts[:4], shape.output_tokens, 2, BUILD / "pa_warmup", 2)
            if engine:
                engine.run(ids[:2], shape.output_tokens, 2)
                times = [engine.prefill_ms(ids[0]) for _ in range(3)]
                results.prefill_ms.setdefault(run.prefill_key or name, {})[shape.name] = sorted(times)[1]
                say(f"{name}, {run.tag}, {shape.name}: single-request prefill {sorted(times)[1]:.0f} ms "
                    "(median of 3)")
            # Prompts longer than the prefill chunk run alone, in chunks whose shapes were all compiled at load.
            batched = shape.prompt_tokens <= prefill_chunk_length(repository, name)
            for c in concurrencies:
                texts, ids = prompts_by_c[c]
                # A burst of c prompts first, not measured: prefill compiles each new (batch, length) shape once
                # (seconds for long prompts), and the measured run must not pay it (it did: the engine alone's
                # first token took 15 s for 16 prompts of 960 tokens, where a batch of 8 prefills in 1.4 s).
                if server and batched:
                    server.warm_up(texts, shape.output_tokens, c)
                if engine and batched:
                    engine.run(ids[:c], shape.output_tokens, c)
                if server and run.plain:
                    point(results, name, shape, run.plain, c, lambda: server.perf(
                        texts, shape.output_tokens, c, BUILD / f"pa_{name}_{c}", max(2, -(-len(texts) // 3)))[0])
                if server and run.grouped:
                    point(results, name, shape, run.grouped, c, lambda: server.perf(
                        texts, shape.output_tokens, c, BUILD / f"pa_{name}_{c}", max(2, -(-len(texts) // 3)),
                        stream_interval=4)[0])
                if engine:
                    point(results, name, shape, run.engine, c, lambda: engine.run(ids, shape.output_tokens, c))
    finally:
        if engine:
            engine.close()


def not_run(results, name, workload, concurrencies, systems, reason) -> None:
    """Every point of `systems` that has no result yet gets `reason` as its error."""
    for system in systems:
        for shape in workload:
            for c in concurrencies:
                if str(c) not in results.points.get(name, {}).get(shape.name, {}).get(system, {}):
                    results.put(name, shape.name, system, c, {"error": reason})
        say(f"{name}, {system}: {reason}")
    results.save_json(BUILD / "results.json")


def run_transformers(results, name, checkpoint, workload, concurrencies, batched, max_sequential):
    from bench.transformers_peer import TransformersPeer

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


def llamacpp_gguf(model, gguf_type: str) -> Path:
    """The GGUF file llama.cpp serves as `gguf_type`: the model's own file if it is of that type, else one that
    llama.cpp's converter writes from the model's float32 Hugging Face folder."""
    from bench import llamacpp

    if model.gguf is not None and gguf_type == model.gguf_type:
        return model.gguf
    say(f"{model.name}: llama.cpp {gguf_type} GGUF from {model.hf_folder()}")
    return llamacpp.convert_to_gguf(model.hf_folder(), BUILD / f"{model.name}-{gguf_type}.gguf", gguf_type,
                                    progress=say)


def run_llamacpp(results, model, workload, concurrencies, gguf_type):
    from bench import llamacpp

    name, system = model.name, llamacpp_label(gguf_type)
    try:
        binary = llamacpp.build_server(ROOT / "build" / "llamacpp", say)
        gguf = llamacpp_gguf(model, gguf_type)
    except Exception as exc:  # noqa: BLE001 - PeerUnavailable, or no Hugging Face folder to convert
        not_run(results, name, workload, concurrencies, [system], f"not built: {type(exc).__name__}: {exc}")
        return
    longest = max(s.prompt_tokens + s.output_tokens for s in workload) + 16
    try:
        with llamacpp.LlamaCppServer(binary, gguf, parallel=max(concurrencies), ctx_per_slot=longest,
                                     threads=LLAMACPP_THREADS,
                                     log_path=BUILD / f"llamacpp_{name}_{gguf_type}.log") as server:
            for shape, prompts_by_c in workload.items():
                # the same prompts must be the same token ids there as here (BOS included where ours adds it)
                llamacpp.check_tokenizer(server, prompts_by_c[concurrencies[0]][0][:4], model.tokenizer)
                say(f"{name}, {shape.name}, {system}: tokenizes the prompts to our ids")
                llamacpp.run(server, prompts_by_c[concurrencies[0]][0][:2], 4, 2)  # warm-up
                for c in concurrencies:
                    point(results, name, shape, system, c,
                          lambda: llamacpp.run(server, prompts_by_c[c][0], shape.output_tokens, c))
    except (PeerUnavailable, AssertionError) as exc:  # the server did not start, or tokenizes otherwise
        not_run(results, name, workload, concurrencies, [system],
                f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}")


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

    from bench.llamacpp import LLAMA_CPP_PYTHON_VERSION

    found = {"tritonserver": "2.51 (nvidia-pytriton 0.7.0)",
             "llama.cpp": f"as vendored in llama-cpp-python {LLAMA_CPP_PYTHON_VERSION}"}
    for package in ("mindspore", "tritonclient", "torch", "transformers"):
        try:
            found[package] = version(package)
        except Exception:  # noqa: BLE001
            found[package] = "not installed"
    from bench.vllm_peer import read_stamp
    stamp = read_stamp()
    if stamp:
        found["vLLM CPU"] = f"{stamp['package']}=={stamp['version']} (torch {stamp.get('torch')}, {stamp.get('kernels')})"
    return found


# ---- the report -----------------------------------------------------------------------------------------

def _cell(value: dict | None, key: str, digits: int) -> str:
    return "n/a" if not value else f"{value[key]:.{digits}f}"


def format_lines(results, model: str, shape: str, concurrencies: list[int]) -> list[str]:
    """Ours at each weight format that was run, each beside llama.cpp on the same weights (SHARED_WEIGHTS),
    the engine alone at that format and transformers (float32), with ratios; [] when no format was run."""
    systems = results.points.get(model, {}).get(shape, {})
    formats = [w for system in systems for w in OURS_FORMATS.values() if system == ours_label(w)]
    if not formats:
        return []
    get = lambda system, c: results.get(model, shape, system, c)  # noqa: E731
    values = lambda system, key="tokens_per_s", digits=1: [_cell(get(system, c), key, digits)  # noqa: E731
                                                           for c in concurrencies]
    ratios = lambda a, b: [report.ratio(get(a, c), get(b, c)) for c in concurrencies]  # noqa: E731
    transformers = [s for s in (report.HF_BATCHED, report.HF_SEQUENTIAL) if s in systems]
    rows, shown = [], set()
    for weights in formats:
        ours = ours_label(weights)
        rows.append((weights, f"{ours}, tokens/s", values(ours)))
        for gguf_type in SHARED_WEIGHTS.get(weights, ()):
            peer = llamacpp_label(gguf_type)
            if peer not in systems:
                continue
            shown.add(peer)
            rows.append((weights, f"{peer}, tokens/s", values(peer)))
            rows.append((weights, f"**ours {weights} / llama.cpp {LLAMACPP_TYPES[gguf_type]}, tokens/s**",
                         [f"**{r}**" for r in ratios(ours, peer)]))
            rows.append((weights, f"TTFT p50 ms, ours / llama.cpp {LLAMACPP_TYPES[gguf_type]}",
                         [f"{a} / {b}" for a, b in zip(values(ours, "ttft_p50_ms", 0),
                                                      values(peer, "ttft_p50_ms", 0))]))
        engine = engine_label(weights)
        if engine in systems:
            rows.append((weights, f"{engine}, tokens/s", values(engine)))
            rows.append((weights, "serving efficiency = ours / engine alone (>= 0.9)", ratios(ours, engine)))
        for peer in transformers:
            rows.append((weights, f"ours {weights} / {peer} (float32), tokens/s", ratios(ours, peer)))
    for peer in transformers:
        rows.append(("float32", f"{peer}, tokens/s", values(peer)))
    for gguf_type, label in LLAMACPP_TYPES.items():  # llama.cpp files none of our formats shares
        peer = llamacpp_label(gguf_type)
        if peer in systems and peer not in shown:
            rows.append((label, f"{peer}, tokens/s", values(peer)))
    lines = ["Ours at each weight format beside llama.cpp on the same weights (our bfloat16 beside its f16, "
             "two bytes a weight both) and transformers (float32); a ratio is ours / the peer:", "",
             "| weights | system or ratio | " + " | ".join(f"c={c}" for c in concurrencies) + " |",
             "|---|---|" + "---:|" * len(concurrencies)]
    lines += [f"| {weights} | {what} | " + " | ".join(cells) + " |" for weights, what, cells in rows]
    prefill = [(w, results.prefill_ms.get(f"{model} {w}", {}).get(shape)) for w in formats]
    if any(ms for _, ms in prefill):
        lines += ["", "- Single-request prefill (the engine alone): "
                  + ", ".join(f"{w} {ms:.0f} ms" for w, ms in prefill if ms) + "."]
    return lines


def markdown(results, concurrencies: list[int]) -> str:
    """report.markdown, with each section that ran our weight formats given their table (format_lines): in place
    of report.py's ratios where the default conversion (`ours`) was not run (all of those are against it), after
    them where it was."""
    lines = report.markdown(results, concurrencies).split("\n")
    unplaced = []
    for model, shapes in results.points.items():
        for shape, systems in shapes.items():
            table = format_lines(results, model, shape, concurrencies)
            if not table:
                continue
            heading = f"## {model}, {shape}"
            try:
                start = lines.index(heading)
                end = next(i for i in range(start + 1, len(lines)) if lines[i].startswith("| system | concurrency"))
            except (ValueError, StopIteration):
                unplaced += [f"### {model}, {shape}", "", *table, ""]
                continue
            if report.OURS in systems:
                lines[end:end] = [*table, ""]
            else:
                lines[start + 1:end] = ["", *table, ""]
    if unplaced:
        lines += ["## Weight formats", "", *unplaced]
    return "\n".join(lines)


def write_report(results, concurrencies, out: Path) -> None:
    paths = report.write_report(results, concurrencies, out)
    report.write_atomically(out.with_suffix(".md"), markdown(results, concurrencies))
    for path in paths:
        say(f"wrote {path}")


# ---- the run --------------------------------------------------------------------------------------------

def tools_measuring(systems: set[str]) -> dict:
    tools = {report.OURS: "perf_analyzer 2.43 --streaming over gRPC against the decoupled front model; figures "
                          "from its --profile-export-file (genai-perf cannot run here: 0.0.16 needs a perf_analyzer "
                          "that writes service_kind and responses into the export, and the PyPI perf-analyzer "
                          "wheel needs glibc 2.38)",
             report.ENGINE: "in-process clock around the same prefill + Scheduler loop, no server",
             report.HF_SEQUENTIAL: "in-process clock; a streamer stamps each generate() step",
             report.HF_BATCHED: "in-process clock; a streamer stamps each generate() step"}
    if any(s.split("-")[0] in ("ours", "engine") and s.partition("-")[2] in OURS_FORMATS for s in systems):
        tools["mstriton <weights> (tritonserver), engine alone <weights>"] = (
            "as the two above, on the model converted with that --weights (a GGUF model from its own file)")
    tools["llama.cpp server <type>"] = (f"llama-server of llama-cpp-python's sdist, {LLAMACPP_THREADS} threads, one "
                                        "parallel slot per client; HTTP /completion streaming client, a timestamp "
                                        "per streamed token; the model's own GGUF file where it is of that type, "
                                        "else one written by the sdist's convert_hf_to_gguf.py")
    if any(s.startswith("vllm") for s in systems):
        tools["vLLM CPU <dtype>"] = ("vllm serve in build/vllm-venv (bench/vllm_peer.py), OpenMP threads bound by "
                                     "vLLM itself (0.32 on 2 cores: one for the model, one kept for its "
                                     "scheduler), prefix caching off; /v1/chat/completions streaming client "
                                     "(bench.frontend.stream_chat: a timestamp per chunk with content, the count "
                                     "from the usage), min_tokens = max_tokens and ignore_eos; the prompt is the "
                                     "user message, so the chat template adds its tokens")
    return tools


def report_from(runs: list[Path], out: Path) -> int:
    """Measure nothing: the report of these results files of earlier runs, merged (a later file wins where two
    measured the same point)."""
    merged = report.Results.load(runs[0])
    for run in runs[1:]:
        merged.merge(report.Results.load(run))
    write_report(merged, merged.concurrencies(), out)
    return 0


def run(names: list[str], shapes: list[Shape], concurrencies: list[int], chosen: list[str] | None,
        hf_sequential_max: int, out: Path) -> int:
    """Every model of `names` on each of its systems (`chosen`, or the model's DEFAULT_SYSTEMS), at each shape
    and concurrency; the report written to OUT.* after each model."""
    BUILD.mkdir(parents=True, exist_ok=True)
    max_batch = max(concurrencies)
    everything = set(chosen or [s for n in names for s in DEFAULT_SYSTEMS[n]])
    results = report.Results(date=datetime.date.today().isoformat(), machine=report.machine_description(),
                             versions=versions(), tools=tools_measuring(everything), prefill_ms={})
    for name in names:
        systems = chosen or DEFAULT_SYSTEMS[name]
        model = prepare_model(name)
        model_shapes = [fit_shape(s, model.max_positions) for s in shapes]
        max_seq_len = min(model.max_positions, max(s.prompt_tokens + s.output_tokens for s in model_shapes) + 64)
        from mstriton.tokenizer import load_tokenizer
        tokenizer = load_tokenizer(model.tokenizer)
        workload = {}
        for shape in model_shapes:
            workload[shape] = {}
            for c in concurrencies:
                texts = make_prompts(tokenizer, requests_for(shape, c), shape.prompt_tokens, seed=c)
                workload[shape][c] = (texts, [tokenizer.encode(t) for t in texts])
        say(f"{name}: prompts ready ({', '.join(s.name for s in model_shapes)}; concurrency {concurrencies}; "
            f"tokenizer {model.tokenizer})")
        if model.gguf is not None:
            note = (f"{name}: {model.gguf.name}. Ours converts that file with each --weights; llama.cpp "
                    f"{LLAMACPP_TYPES.get(model.gguf_type, model.gguf_type)} serves the file itself; transformers "
                    "runs, and llama.cpp's other GGUFs are converted from, the float32 Hugging Face folder that "
                    "transformers makes from the file. Prompts are cut with the tokenizer.json our converter "
                    "writes from the file, and llama.cpp tokenizes them to the same ids.")
            if note not in results.notes:
                results.notes.append(note)
        for run in ours_runs(name, systems):
            try:
                repository = convert_for_bench(name, model.checkpoint, max_batch, max_seq_len, run.weights)
                check_served_tokenizer(repository, name, model.tokenizer)
            except Exception as exc:  # noqa: BLE001 - reported as the run's points, and the run goes on
                not_run(results, name, workload, concurrencies, run.labels(),
                        f"not converted (--weights {run.weights}): {type(exc).__name__}: {str(exc)[:200]}")
                continue
            run_ours_and_engine(results, name, repository, workload, concurrencies, max_batch, run)
        for system, batched in (("hf-sequential", False), ("hf-batched", True)):
            if system not in systems:
                continue
            try:
                folder = model.hf_folder()
            except Exception as exc:  # noqa: BLE001
                not_run(results, name, workload, concurrencies,
                        [report.HF_BATCHED if batched else report.HF_SEQUENTIAL],
                        f"no Hugging Face folder: {type(exc).__name__}: {str(exc)[:200]}")
                continue
            run_transformers(results, name, folder, workload, concurrencies, batched, hf_sequential_max)
        for system in systems:
            if not system.startswith("llamacpp-"):
                continue
            gguf_type = system.split("-", 1)[1]
            reason = applicable(model, system)
            if reason:
                not_run(results, name, workload, concurrencies, [llamacpp_label(gguf_type)], reason)
                continue
            run_llamacpp(results, model, workload, concurrencies, gguf_type)
        for system in systems:
            if system.startswith("vllm"):
                from bench import vllm_peer
                vllm_peer.run_serving(results, model, workload, concurrencies, vllm_peer.SYSTEMS[system], point,
                                      not_run, say, BUILD)
        write_report(results, concurrencies, out)  # after each model: a cut-short run keeps its part
    say(f"done in {time.monotonic() - STARTED:.0f}s")
    return 0
