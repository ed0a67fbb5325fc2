"""The llama.cpp peer: its own HTTP server (`llama-server`, parallel slots with continuous batching), built from
the llama.cpp source tree that the llama-cpp-python sdist on PyPI vendors, serving our weights converted to GGUF
with the converter vendored in the same sdist (or a model's own GGUF file, served as it is).

Why not llama-cpp-python's own server (`python -m llama_cpp.server`): it guards its one model with a lock and
answers one request at a time, so it has no parallel slots to compare against ours.

Everything is built at benchmark time into a cache folder (build/llamacpp/ by default): the sdist, its unpacked
source, the cmake build and the server binary. A second call finds the binary and returns at once, if it was
built with the same cmake configuration (recorded next to it in <binary>.build.json; another configuration, or a
binary without that record, is built again from a clean build folder).

How the server is built (build_server, isa_arguments): CPU only, static, Release, and on x86-64 with GGML_NATIVE=OFF
and the instruction sets named one by one from the CPU's /proc/cpuinfo flags (GGML_SSE42, GGML_AVX, GGML_AVX2,
GGML_FMA, GGML_F16C, GGML_BMI2, GGML_AVX_VNNI, GGML_AVX512 (F/CD/VL/DQ/BW), GGML_AVX512_VBMI, GGML_AVX512_VNNI,
GGML_AVX512_BF16: each ON only when the CPU has it), and always GGML_AMX_TILE/GGML_AMX_INT8/GGML_AMX_BF16=OFF.
Why: when -march=native detects AMX (a Xeon with AMX whose kernel enables the tile state), the compiler defines
__AMX_INT8__, ggml compiles its AMX kernels and puts Q4_0/Q4_1/Q8_0/K-quant weights in an "AMX model buffer"; on
this 2-core Xeon (AVX-512 + AMX) that server died with SIGSEGV during warm-up on the SmolLM2 Q4_1 GGUF (f32/f16
files, which never use that buffer, ran). Without AMX the quantized matrices run ggml's AVX-512 (VNNI) kernels:
the rebuilt server ran that Q4_1 file at about 76-80 tokens/s for one stream and about 110 tokens/s for 4
streams of 64 tokens (2 threads). Naming the sets also makes the build independent of what -march=native happens
to detect (the crashing build here had the AMX kernels; gcc 12's -march=native later resolved to "cooperlake"
without AMX, with no amx flags in /proc/cpuinfo). Other architectures keep GGML_NATIVE=ON (the AMX options only
matter on x86).

The driver: closed-loop clients, each streaming completions from the native /completion endpoint, one request
after another, with a fixed number of output tokens (end of sequence ignored), greedy, and no prompt cache.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import time
from collections import deque
from pathlib import Path
from typing import Callable, Sequence

from .harness import processes
from .harness.loops import closed_loop
from .harness.servers import free_port
from .timing import PeerUnavailable, RequestTiming

# The sdist this peer is built from; its vendored llama.cpp has tools/server and convert_hf_to_gguf.py.
LLAMA_CPP_PYTHON_VERSION = "0.3.36"
DEFAULT_CACHE_DIR = Path(__file__).resolve().parents[1] / "build" / "llamacpp"
# what convert_to_gguf writes (convert_hf_to_gguf.py --outtype); other types (q4_1, ...) need llama-quantize, so
# only a model's own file of that type is served
GGUF_DTYPES = ("f32", "f16", "bf16", "q8_0")

Progress = Callable[[str], None]


def _tail(text: str, lines: int = 25) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def _quiet(_: str) -> None:
    pass


# ---------------------------------------------------------------------------------------------------------------
# Source and build

def fetch_source(cache_dir: Path = DEFAULT_CACHE_DIR, progress: Progress = _quiet,
                 version: str = LLAMA_CPP_PYTHON_VERSION) -> Path:
    """The llama.cpp source tree vendored in the llama-cpp-python sdist, downloaded with pip and unpacked once
    into cache_dir. Returns the tree's root (the folder holding CMakeLists.txt and convert_hf_to_gguf.py)."""
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    top = cache_dir / f"llama_cpp_python-{version}"
    tree = top / "vendor" / "llama.cpp"
    if (tree / "CMakeLists.txt").is_file():
        return tree
    sdist = cache_dir / f"llama_cpp_python-{version}.tar.gz"
    if not sdist.is_file():
        progress(f"llama.cpp: downloading the llama-cpp-python {version} sdist from PyPI (about 75 MB)")
        cmd = [sys.executable, "-m", "pip", "download", f"llama-cpp-python=={version}", "--no-binary", ":all:",
               "--no-deps", "-d", str(cache_dir)]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0 or not sdist.is_file():
            # pip prepares the sdist's metadata after downloading it; the file may be there even if that failed
            if not sdist.is_file():
                raise PeerUnavailable(f"pip download llama-cpp-python=={version} failed:\n"
                                      f"{_tail(done.stdout + done.stderr)}")
    progress(f"llama.cpp: unpacking {sdist.name}")
    unpack = cache_dir / f"unpack-{version}.partial"
    shutil.rmtree(unpack, ignore_errors=True)
    unpack.mkdir()
    with tarfile.open(sdist) as tar:
        tar.extractall(unpack, filter="data")
    shutil.rmtree(top, ignore_errors=True)
    (unpack / top.name).rename(top)
    shutil.rmtree(unpack, ignore_errors=True)
    if not (tree / "CMakeLists.txt").is_file():
        raise PeerUnavailable(f"the llama-cpp-python {version} sdist has no vendored llama.cpp at {tree}")
    return tree


def _binary_works(binary: Path) -> bool:
    if not binary.is_file():
        return False
    try:
        done = subprocess.run([str(binary), "--version"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0


# ggml's x86 instruction-set options (ggml/CMakeLists.txt) and the /proc/cpuinfo flags each one needs; GGML_AVX512
# compiles with -mavx512f -mavx512cd -mavx512vl -mavx512dq -mavx512bw.
X86_ISA_OPTIONS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("GGML_SSE42", ("sse4_2",)),
    ("GGML_AVX", ("avx",)),
    ("GGML_AVX2", ("avx2",)),
    ("GGML_FMA", ("fma",)),
    ("GGML_F16C", ("f16c",)),
    ("GGML_BMI2", ("bmi2",)),
    ("GGML_AVX_VNNI", ("avx_vnni",)),
    ("GGML_AVX512", ("avx512f", "avx512cd", "avx512vl", "avx512dq", "avx512bw")),
    ("GGML_AVX512_VBMI", ("avx512vbmi",)),
    ("GGML_AVX512_VNNI", ("avx512_vnni",)),
    ("GGML_AVX512_BF16", ("avx512_bf16",)),
)
# ggml's AMX kernels crash the server on Q4_1 weights here (module docstring): never built
AMX_OFF = ("-DGGML_AMX_TILE=OFF", "-DGGML_AMX_INT8=OFF", "-DGGML_AMX_BF16=OFF")


cpu_flags = processes.cpu_flags  # the CPU's /proc/cpuinfo flags (None off x86-64)


def isa_arguments(flags: frozenset[str] | None) -> list[str]:
    """cmake arguments choosing the instruction sets: with x86 CPU flags, GGML_NATIVE=OFF and each ggml option
    ON exactly when the CPU has all its flags; without them (another architecture), GGML_NATIVE=ON. AMX is off
    either way."""
    if flags is None:
        return ["-DGGML_NATIVE=ON", *AMX_OFF]
    return ["-DGGML_NATIVE=OFF", *(f"-D{option}={'ON' if all(f in flags for f in need) else 'OFF'}"
                                   for option, need in X86_ISA_OPTIONS), *AMX_OFF]


def configure_arguments(tree: Path, build: Path, flags: frozenset[str] | None) -> list[str]:
    """The cmake configure command of the server build (CPU, static, Release, no tests/examples/UI/network)."""
    return ["cmake", "-S", str(tree), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release",
            "-DBUILD_SHARED_LIBS=OFF", *isa_arguments(flags), "-DGGML_CUDA=OFF", "-DGGML_CCACHE=OFF",
            "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_TOOLS=ON",
            "-DLLAMA_BUILD_SERVER=ON",
            # no web UI (nothing downloaded from a hub), no HTTPS, no curl
            "-DLLAMA_BUILD_UI=OFF", "-DLLAMA_USE_PREBUILT_UI=OFF", "-DLLAMA_OPENSSL=OFF", "-DLLAMA_CURL=OFF"]


def _build_record(version: str, configure: Sequence[str]) -> dict:
    # the configure arguments without the two paths (-S <tree> -B <build>), which follow from the cache folder
    return {"llama_cpp_python": version, "configure": list(configure[5:])}


def build_server(cache_dir: Path = DEFAULT_CACHE_DIR, progress: Progress = print,
                 version: str = LLAMA_CPP_PYTHON_VERSION) -> Path:
    """The `llama-server` binary (CPU, the instruction sets of this CPU without AMX, static, no network
    features; see the module docstring), built with cmake from the vendored source and cached as
    cache_dir/bin/llama-server-<version> with its configuration in <binary>.build.json. A cached binary is
    used only if it runs and was built with the same configuration; otherwise it is built again from a clean
    build folder. Raises PeerUnavailable with the build's last lines when it cannot be built."""
    cache_dir = Path(cache_dir)
    binary = cache_dir / "bin" / f"llama-server-{version}"
    record_path = binary.with_name(binary.name + ".build.json")
    tree = cache_dir / f"llama_cpp_python-{version}" / "vendor" / "llama.cpp"
    build = cache_dir / f"build-{version}"
    configure = configure_arguments(tree, build, cpu_flags())
    record = _build_record(version, configure)
    recorded = None
    with contextlib.suppress(OSError, ValueError):
        recorded = json.loads(record_path.read_text())
    if recorded == record and _binary_works(binary):
        progress(f"llama.cpp: using the cached {binary}")
        return binary
    if binary.is_file():
        progress(f"llama.cpp: the cached {binary} was built with another configuration; building it again")
    for tool in ("cmake", "c++", "cc"):
        if shutil.which(tool) is None:
            raise PeerUnavailable(f"cannot build llama.cpp: `{tool}` is not installed")
    if fetch_source(cache_dir, progress, version) != tree:
        raise PeerUnavailable(f"the llama.cpp source is not at {tree}")
    if not (tree / "tools" / "server").is_dir():
        raise PeerUnavailable(
            f"the llama.cpp vendored in llama-cpp-python {version} has no tools/server; llama-cpp-python's own "
            "server (llama_cpp.server) answers one request at a time, so it is no parallel-slot peer")
    # a clean build folder: no cmake cache entries or objects left from another configuration
    shutil.rmtree(build, ignore_errors=True)
    record_path.unlink(missing_ok=True)
    log_path = cache_dir / f"build-{version}.log"
    began = time.monotonic()
    _run_build_steps([("configuring", configure), ("compiling llama-server", _compile_command(build, "llama-server"))],
                     log_path, progress)
    built = build / "bin" / "llama-server"
    if not built.is_file():
        raise PeerUnavailable(f"llama.cpp build finished without {built}")
    binary.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(built, binary)
    if not _binary_works(binary):
        raise PeerUnavailable(f"the built {binary} does not run `--version`")
    record_path.write_text(json.dumps(record, indent=1) + "\n")
    progress(f"llama.cpp: built {binary} in {time.monotonic() - began:.0f} s")
    return binary


def _compile_command(build: Path, target: str) -> list[str]:
    return ["cmake", "--build", str(build), "--target", target, "-j", str(max(1, os.cpu_count() or 1))]


def _run_build_steps(steps: Sequence[tuple[str, Sequence[str]]], log_path: Path, progress: Progress,
                     mode: str = "w") -> None:
    """Run each (name, command) in turn, appending their output to log_path (opened with `mode`) and reporting
    the build's percentage every 10 points; raise PeerUnavailable with the last lines when one fails."""
    began = time.monotonic()
    with open(log_path, mode) as log:
        for step, cmd in steps:
            progress(f"llama.cpp: {step} (log: {log_path}; the compile takes several minutes on few cores)")
            log.write("$ " + " ".join(cmd) + "\n")
            log.flush()
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            last: deque[str] = deque(maxlen=40)
            shown = -10
            assert proc.stdout is not None
            for line in proc.stdout:
                log.write(line)
                last.append(line.rstrip())
                m = re.match(r"\[\s*(\d+)%\]", line)
                if m and int(m.group(1)) >= shown + 10:
                    shown = int(m.group(1))
                    progress(f"llama.cpp: build {shown}% after {time.monotonic() - began:.0f} s")
            if proc.wait() != 0:
                raise PeerUnavailable(f"llama.cpp build failed ({step}, exit {proc.returncode}); last lines of "
                                      f"{log_path}:\n" + "\n".join(last))


def _moved_build_folder(build: Path) -> bool:
    """Whether `build` holds a cmake cache written for another folder (a build folder copied from another
    checkout): cmake refuses to configure it again, so it has to be built afresh."""
    cache = build / "CMakeCache.txt"
    with contextlib.suppress(OSError):
        for line in cache.read_text(errors="replace").splitlines():
            if line.startswith("CMAKE_CACHEFILE_DIR:"):
                return Path(line.split("=", 1)[1]).resolve() != build.resolve()
    return False


def _build_tool(name: str, subdir: str, cache_dir: Path, progress: Progress, version: str,
                has_version: bool = True) -> Path:
    """A tool of the vendored llama.cpp (tools/<subdir>, cmake target <name>) built with build_server's source
    and configuration, cached as cache_dir/bin/<name>-<version> with the server's <binary>.build.json record.
    `has_version`: the tool answers `--version` (llama-quantize does not: an executable file is taken as working)."""
    works = _binary_works if has_version else (lambda path: path.is_file() and os.access(path, os.X_OK))
    cache_dir = Path(cache_dir)
    server = build_server(cache_dir, progress, version)
    record_text = server.with_name(server.name + ".build.json").read_text()
    binary = cache_dir / "bin" / f"{name}-{version}"
    record_path = binary.with_name(binary.name + ".build.json")
    with contextlib.suppress(OSError):
        if record_path.read_text() == record_text and works(binary):
            progress(f"llama.cpp: using the cached {binary}")
            return binary
    tree = cache_dir / f"llama_cpp_python-{version}" / "vendor" / "llama.cpp"
    build = cache_dir / f"build-{version}"
    if fetch_source(cache_dir, progress, version) != tree or not (tree / "tools" / subdir).is_dir():
        raise PeerUnavailable(f"the llama.cpp vendored in llama-cpp-python {version} has no tools/{subdir}")
    if _moved_build_folder(build):
        progress(f"llama.cpp: {build} was configured in another folder; building it afresh")
        shutil.rmtree(build, ignore_errors=True)
    record_path.unlink(missing_ok=True)
    began = time.monotonic()
    _run_build_steps([("configuring", configure_arguments(tree, build, cpu_flags())),
                      (f"compiling {name}", _compile_command(build, name))],
                     cache_dir / f"build-{version}.log", progress, mode="a")
    built = build / "bin" / name
    if not built.is_file():
        raise PeerUnavailable(f"llama.cpp build finished without {built}")
    shutil.copy2(built, binary)
    if not works(binary):
        raise PeerUnavailable(f"the built {binary} does not run")
    record_path.write_text(record_text)
    progress(f"llama.cpp: built {binary} in {time.monotonic() - began:.0f} s")
    return binary


def build_quantize(cache_dir: Path = DEFAULT_CACHE_DIR, progress: Progress = print,
                   version: str = LLAMA_CPP_PYTHON_VERSION) -> Path:
    """The `llama-quantize` tool (tools/quantize) of the same vendored source and cmake configuration as
    build_server's llama-server (the libraries are the server's), cached as cache_dir/bin/llama-quantize-<version>;
    reused and rebuilt on the same terms as build_perplexity. Raises PeerUnavailable as build_server does."""
    return _build_tool("llama-quantize", "quantize", cache_dir, progress, version, has_version=False)


def build_perplexity(cache_dir: Path = DEFAULT_CACHE_DIR, progress: Progress = print,
                     version: str = LLAMA_CPP_PYTHON_VERSION) -> Path:
    """The `llama-perplexity` tool (tools/perplexity) of the same vendored source and cmake configuration as
    build_server's llama-server, so that it runs the same ggml kernels: build_server first (reusing its cached
    binary or building it), then the build folder configured again with the same arguments (cheap when it is
    already, and it brings back a build folder deleted since) and only the llama-perplexity target compiled
    (the libraries are the server's). Cached as cache_dir/bin/llama-perplexity-<version> with the same
    <binary>.build.json record as the server's; reused on the same terms (_build_tool). Raises PeerUnavailable as
    build_server does."""
    return _build_tool("llama-perplexity", "perplexity", cache_dir, progress, version)


def convert_to_gguf(hf_dir: Path, out: Path, dtype: str, cache_dir: Path = DEFAULT_CACHE_DIR,
                    progress: Progress = _quiet) -> Path:
    """A Hugging Face LLaMA folder (config.json, model.safetensors, and a sentencepiece tokenizer.model or a
    Hugging Face tokenizer.json) to one GGUF file of f32, f16, bf16 or q8_0 weights (norms stay f32, as the
    converter does), with llama.cpp's own converter and the gguf-py it ships. A converted file is reused while the
    folder's files (names, sizes, modification times) are those it was made from, as recorded next to it in
    <out>.source.json."""
    if dtype not in GGUF_DTYPES:
        raise ValueError(f"dtype must be one of {GGUF_DTYPES}, got {dtype!r}")
    hf_dir, out = Path(hf_dir), Path(out)
    if not any((hf_dir / name).is_file() for name in ("tokenizer.model", "tokenizer.json")):
        raise PeerUnavailable(f"{hf_dir} has neither tokenizer.model nor tokenizer.json; the GGUF needs the "
                              "vocabulary")
    stamp = {"dtype": dtype, "llama_cpp_python": LLAMA_CPP_PYTHON_VERSION, "files": {
        p.name: [p.stat().st_size, p.stat().st_mtime_ns] for p in sorted(hf_dir.iterdir()) if p.is_file()}}
    stamp_path = out.with_name(out.name + ".source.json")
    with contextlib.suppress(OSError, ValueError):
        if out.is_file() and json.loads(stamp_path.read_text()) == stamp:
            return out
    tree = fetch_source(cache_dir, progress)
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(out.name + ".partial")
    cmd = [sys.executable, str(tree / "convert_hf_to_gguf.py"), str(hf_dir), "--outfile", str(partial),
           "--outtype", dtype]
    env = {k: v for k, v in os.environ.items() if k != "NO_LOCAL_GGUF"}  # use the gguf-py of the same tree
    env["HF_HUB_OFFLINE"] = "1"
    progress(f"llama.cpp: converting {hf_dir} to {out.name} ({dtype})")
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=str(tree), env=env)
    if done.returncode != 0 or not partial.is_file():
        partial.unlink(missing_ok=True)
        raise PeerUnavailable(f"convert_hf_to_gguf.py failed on {hf_dir} ({dtype}):\n"
                              f"{_tail(done.stdout + done.stderr)}")
    partial.replace(out)
    stamp_path.write_text(json.dumps(stamp))
    return out


# ---------------------------------------------------------------------------------------------------------------
# The server

class LlamaCppServer:
    """`llama-server` on a free loopback port, with `parallel` slots of `ctx_per_slot` tokens each (separate KV
    per slot), continuous batching, `threads` threads for decoding and prompts, no prompt cache in RAM and no web
    UI. Use as a context manager; `url` is http://127.0.0.1:<port>, `log_path` holds the server's own log."""

    def __init__(self, binary: Path, gguf: Path, parallel: int, ctx_per_slot: int, threads: int,
                 log_path: Path | None = None, extra_args: Sequence[str] = (), start_timeout: float = 180.0):
        self.binary, self.gguf = Path(binary), Path(gguf)
        self.parallel, self.ctx_per_slot, self.threads = parallel, ctx_per_slot, threads
        self.log_path = Path(log_path) if log_path else self.gguf.with_name(
            f"{self.gguf.stem}.np{parallel}.server.log")
        self.extra_args = list(extra_args)
        self.start_timeout = start_timeout
        self.proc: subprocess.Popen | None = None
        self.timings: list[dict] = []  # llama.cpp's own timings of every request that run() sent
        self.port = 0
        self._log = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def command(self, port: int) -> list[str]:
        return [str(self.binary), "--model", str(self.gguf), "--host", "127.0.0.1", "--port", str(port),
                "--parallel", str(self.parallel), "--ctx-size", str(self.parallel * self.ctx_per_slot),
                "--no-kv-unified", "--cont-batching",
                "--threads", str(self.threads), "--threads-batch", str(self.threads),
                "--cache-ram", "0", "--no-ui", "--fit", "off", *self.extra_args]

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def __enter__(self) -> "LlamaCppServer":
        last_error = ""
        for _ in range(3):  # another process may take the port between choosing it and binding it
            self.port = free_port()
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            self._log = open(self.log_path, "w")
            try:
                self.proc = subprocess.Popen(self.command(self.port), stdout=self._log, stderr=subprocess.STDOUT,
                                             stdin=subprocess.DEVNULL)
            except OSError as e:
                self._close_log()
                raise PeerUnavailable(f"cannot start {self.binary}: {e}") from e
            try:
                self._wait_healthy()
                return self
            except PeerUnavailable as e:
                last_error = str(e)
                self.stop()
                if "bind" not in last_error and "address" not in last_error.lower():
                    raise
        raise PeerUnavailable(last_error)

    def _wait_healthy(self) -> None:
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise PeerUnavailable(f"llama-server exited with {self.proc.returncode} while starting:\n"
                                      f"{_tail(self.log_text())}")
            try:
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
                conn.request("GET", "/health")
                resp = conn.getresponse()
                resp.read()
                conn.close()
                if resp.status == 200:
                    return
            except OSError:
                pass
            time.sleep(0.2)
        raise PeerUnavailable(f"llama-server did not become healthy in {self.start_timeout:.0f} s:\n"
                              f"{_tail(self.log_text())}")

    def _close_log(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=15)
        self._close_log()

    def __exit__(self, *exc) -> None:
        self.stop()

    def __del__(self):
        with contextlib.suppress(Exception):
            self.stop()

    # -- small JSON calls -------------------------------------------------------------------------------------
    def post(self, path: str, body: dict, timeout: float = 60.0) -> dict:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            conn.request("POST", path, body=json.dumps(body), headers={"Content-Type": "application/json"})
            resp = conn.getresponse()
            data = resp.read()
        finally:
            conn.close()
        if resp.status != 200:
            raise RuntimeError(f"llama-server {path} answered {resp.status}: {data[:500]!r}")
        return json.loads(data)

    def tokenize(self, text: str) -> list[int]:
        """The server's token ids for `text`, with BOS as a completion prompt gets it."""
        return [int(t) for t in self.post("/tokenize", {"content": text, "add_special": True})["tokens"]]


def check_tokenizer(server, prompts: Sequence[str], tokenizer) -> None:
    """Raise if the GGUF's tokenizer does not give exactly our tokenizer's ids (BOS included, where ours adds
    it) for every prompt: the peer must read the same number of prompt tokens as our server. `tokenizer` is ours:
    a TextTokenizer, or what load_tokenizer takes (a tokenizer.model or tokenizer.json file, or their folder)."""
    from mstriton.tokenizer import load_tokenizer

    ours = load_tokenizer(tokenizer) if isinstance(tokenizer, (str, Path)) else tokenizer
    for i, prompt in enumerate(prompts):
        theirs, mine = server.tokenize(prompt), ours.encode(prompt)
        if theirs != mine:
            raise AssertionError(f"prompt {i}: llama.cpp tokenizes to {len(theirs)} tokens, ours to {len(mine)}; "
                                 f"first difference at {next((k for k, (a, b) in enumerate(zip(theirs, mine)) if a != b), min(len(theirs), len(mine)))}")


# ---------------------------------------------------------------------------------------------------------------
# The driver

def completion_body(prompt: str, output_tokens: int) -> dict:
    return {"prompt": prompt, "n_predict": output_tokens, "ignore_eos": True, "cache_prompt": False,
            "temperature": 0.0, "top_k": 1, "stream": True}


def _one_request(port: int, prompt: str, output_tokens: int) -> tuple[RequestTiming, dict]:
    """Send one streaming completion and time every token. The server sends one event per token, except that a
    token ending in an incomplete UTF-8 character is held back and reported with the next event (its
    `tokens_predicted` jumps by more than one): such tokens get the arrival time of the event that carries them,
    which is when a user sees them. Returns the timing and the server's own `timings` of the request (prompt_ms,
    predicted_per_token_ms, ...). Each request has its own connection (the server closes a stream's
    connection when the stream ends); the send time includes the loopback connect."""
    body = json.dumps(completion_body(prompt, output_tokens))
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    try:
        return _stream(conn, body, output_tokens)
    finally:
        conn.close()


def _stream(conn: http.client.HTTPConnection, body: str, output_tokens: int) -> tuple[RequestTiming, dict]:
    start = time.perf_counter()
    conn.request("POST", "/completion", body=body, headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    if resp.status != 200:
        raise RuntimeError(f"llama-server /completion answered {resp.status}: {resp.read()[:500]!r}")
    times: list[float] = []
    final: dict | None = None
    prompt_tokens = 0
    while True:
        line = resp.readline()
        if not line:
            break
        now = time.perf_counter()
        line = line.strip()
        if not line.startswith(b"data:"):
            continue
        payload = line[5:].strip()
        if payload == b"[DONE]":
            continue
        event = json.loads(payload)
        if "error" in event:
            raise RuntimeError(f"llama-server stream error: {event['error']}")
        predicted = int(event.get("tokens_predicted", len(times)))
        prompt_tokens = int(event.get("tokens_evaluated", prompt_tokens))
        times.extend([now] * (predicted - len(times)))
        if event.get("stop"):
            final = event
            break
    if final is None:
        raise RuntimeError(f"llama-server stream ended without a final event after {len(times)} tokens")
    if final.get("stop_type") not in ("limit", None) or len(times) != output_tokens \
            or int(final.get("tokens_predicted", -1)) != output_tokens:
        raise AssertionError(f"llama.cpp returned {len(times)} tokens (final event: tokens_predicted="
                             f"{final.get('tokens_predicted')}, stop_type={final.get('stop_type')}), "
                             f"expected {output_tokens}")
    reused = int((final.get("timings") or {}).get("cache_n", 0))
    if reused:
        raise AssertionError(f"llama.cpp reused {reused} prompt tokens from its cache despite cache_prompt=false")
    return RequestTiming(start=start, token_times=times, prompt_tokens=prompt_tokens), final.get("timings") or {}


def run(server: LlamaCppServer, prompts: list[str], output_tokens: int, concurrency: int) -> list[RequestTiming]:
    """Closed-loop clients (harness.loops.closed_loop). The server's own per-request timings (llama.cpp's prompt_ms,
    predicted_per_token_ms, ...) are appended to `server.timings` when the server has that list."""
    server_timings = getattr(server, "timings", [])

    def send(_index: int, prompt: str) -> RequestTiming:
        timing, own = _one_request(server.port, prompt, output_tokens)
        server_timings.append(own)  # list.append is atomic under the GIL
        return timing

    return closed_loop(prompts, concurrency, send)
