"""The CPU kernels: weight products of every weight format, embedding lookup and decode attention, in C++
(``csrc/``), built into ``libmstriton_kernels.so`` by ``make -C mstriton/kernels`` (``make install`` runs it).

The same library serves two callers:
- MindSpore graphs, as AOT custom operators (``ops.py``), which is how the engine runs them;
- Python, through ctypes (the functions below): the unit tests against numpy and the benchmarks.

CPU features: one object per ISA is linked in and the best the CPU has is chosen at load (AVX-512 F/BW/VL with
FMA and F16C; else AVX2 + FMA + F16C; else plain SSE2 code, the fallback); MSTRITON_KERNEL_ISA forces one.
Threads: MSTRITON_KERNEL_THREADS, else every CPU the process may use (the kernels' own pool, csrc/pool.h).
Activations: float32 (exact, the default) or int8 for the decode-sized Q8_0 / Q4_0 / Q4_1 products,
MSTRITON_KERNEL_ACTIVATIONS=int8|float32 (``activations.py``, ``csrc/qlinear.h``).
"""

from __future__ import annotations

import ctypes
import subprocess
import threading
from pathlib import Path

import numpy as np

from .formats import FORMATS, GROUP, INTERLEAVED, row_bytes

HERE = Path(__file__).resolve().parent
LIBRARY = HERE / "libmstriton_kernels.so"
SOURCES = sorted((HERE / "csrc").glob("*")) + [HERE / "Makefile"]
ISAS = ("avx512", "avx2", "generic")
PRE = {"none": 0, "rmsnorm": 1, "swiglu": 2}

_lock = threading.Lock()
_lib: ctypes.CDLL | None = None


class KernelsUnavailable(RuntimeError):
    pass


def is_stale() -> bool:
    if not LIBRARY.exists():
        return True
    built = LIBRARY.stat().st_mtime
    return any(source.stat().st_mtime > built for source in SOURCES)


def build(progress=print, if_stale: bool = True) -> Path:
    """Build the library with the system compiler if it is missing, or (if_stale) older than its sources. One
    process builds at a time (a file lock): tritonserver starts several model processes at once."""
    if LIBRARY.exists() and not (if_stale and is_stale()):
        return LIBRARY
    import fcntl
    with open(HERE / ".build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if LIBRARY.exists() and not (if_stale and is_stale()):  # another process built it meanwhile
            return LIBRARY
        progress(f"building {LIBRARY.name} (C++ kernels, about a minute)")
        result = subprocess.run(["make", "-C", str(HERE), "-j2"], capture_output=True, encoding="utf-8",
                                errors="replace")
        if result.returncode != 0:
            raise KernelsUnavailable(f"building the kernels failed (make -C {HERE}); it needs g++ "
                                     f"(Debian: build-essential):\n{result.stdout[-2000:]}{result.stderr[-2000:]}")
    return LIBRARY


def ensure_built() -> Path:
    """What serving processes call: build only a missing library (make install builds it, and rebuilds it when
    its sources change); never compile inside a model process over a library that exists."""
    return build(if_stale=False)


def library() -> ctypes.CDLL:
    """The loaded library (built first when needed)."""
    global _lib
    with _lock:
        if _lib is None:
            ensure_built()
            lib = ctypes.CDLL(str(LIBRARY), mode=ctypes.RTLD_GLOBAL)
            i64, u8p = ctypes.c_int64, ctypes.c_void_p
            lib.mst_isa.restype = ctypes.c_char_p
            lib.mst_set_isa.argtypes = [ctypes.c_char_p]
            lib.mst_isa_supported.argtypes = [ctypes.c_char_p]
            lib.mst_row_bytes.argtypes, lib.mst_row_bytes.restype = [ctypes.c_int, i64], i64
            lib.mst_linear.argtypes = [ctypes.c_int, ctypes.c_int, u8p, i64, i64, u8p, ctypes.c_float, u8p, i64,
                                       u8p, u8p, u8p]
            lib.mst_embed.argtypes = [ctypes.c_int, u8p, i64, u8p, i64, i64, u8p]
            lib.mst_decode_attention.argtypes = [u8p, u8p, u8p, u8p, i64, u8p, u8p, u8p, i64, i64, i64, i64, i64,
                                                 i64, u8p]
            lib.mst_read_bandwidth.argtypes, lib.mst_read_bandwidth.restype = [u8p, i64, ctypes.c_int], \
                ctypes.c_double
            lib.mst_fma_peak.argtypes, lib.mst_fma_peak.restype = [i64], ctypes.c_double
            lib.mst_int8_peak.argtypes, lib.mst_int8_peak.restype = [i64], ctypes.c_double
            lib.mst_kernel_time.argtypes, lib.mst_kernel_time.restype = [ctypes.POINTER(i64)], ctypes.c_double
            lib.mst_set_step_profile.argtypes = [ctypes.c_int]
            lib.mst_step_profile.argtypes = [ctypes.POINTER(ctypes.c_double)]
            _lib = lib
    return _lib


def _ptr(array: np.ndarray | None):
    return None if array is None else array.ctypes.data


def isa() -> str:
    return library().mst_isa().decode()


def supported_isas() -> list[str]:
    return [name for name in ISAS if library().mst_isa_supported(name.encode())]


def set_isa(name: str) -> None:
    if library().mst_set_isa(name.encode()) != 0:
        raise KernelsUnavailable(f"ISA {name!r} is not one of {ISAS} supported by this CPU ({supported_isas()})")


def threads() -> int:
    return library().mst_threads()


def set_threads(n: int) -> None:
    library().mst_set_threads(n)


def _f32(a) -> np.ndarray:
    return np.ascontiguousarray(a, np.float32)


def _check_whole_groups(fmt: str, n: int) -> None:
    if fmt in INTERLEAVED and n % GROUP:
        raise ValueError(f"{fmt} matrices hold whole groups of {GROUP} rows (output channels); this one has {n}")


def linear(fmt: str, x: np.ndarray, w: np.ndarray, *, pre: str = "none", norm: np.ndarray | None = None,
           eps: float = 1e-6, bias: np.ndarray | None = None, residual: np.ndarray | None = None) -> np.ndarray:
    """y [M, N] = pre(x) @ unpack(w)^T (+ bias) (+ residual), with x [M, K] ([M, 2K] for pre='swiglu')."""
    x = _f32(x)
    m, k = x.shape[0], x.shape[1] // (2 if pre == "swiglu" else 1)
    w = np.ascontiguousarray(w, np.uint8)
    if w.shape[1] != row_bytes(fmt, k):
        raise ValueError(f"{fmt} rows of K={k} take {row_bytes(fmt, k)} bytes; w has {w.shape[1]}")
    n = w.shape[0]
    _check_whole_groups(fmt, n)
    y = np.empty((m, n), np.float32)
    norm, bias, residual = (None if a is None else _f32(a) for a in (norm, bias, residual))
    status = library().mst_linear(FORMATS[fmt], PRE[pre], _ptr(x), m, k, _ptr(norm), eps, _ptr(w), n, _ptr(bias),
                                  _ptr(residual), _ptr(y))
    if status:
        raise ValueError(f"mst_linear refused its arguments (status {status})")
    return y


def embed(fmt: str, tokens: np.ndarray, table: np.ndarray, dim: int) -> np.ndarray:
    tokens = np.ascontiguousarray(tokens, np.int32)
    table = np.ascontiguousarray(table, np.uint8)
    out = np.empty(tokens.shape + (dim,), np.float32)
    _check_whole_groups(fmt, table.shape[0])
    if library().mst_embed(FORMATS[fmt], _ptr(tokens), tokens.size, _ptr(table), table.shape[0], dim, _ptr(out)):
        raise ValueError(f"mst_embed refused its arguments ({fmt}, a table of {table.shape[0]} rows)")
    return out


def decode_attention(qkv, positions, cos, sin, k_pool, v_pool, block_table, heads: int) -> np.ndarray:
    """out [B, H*D] of attention over a paged cache (csrc/attention.h); writes each new token's K/V into
    k_pool [R, Hkv, D, bs] and v_pool [R, Hkv, bs, D] (float32, C-contiguous: changed in place) at its position
    through block_table [B, blocks] (pool rows)."""
    qkv, cos, sin = (_f32(a) for a in (qkv, cos, sin))
    if not (k_pool.dtype == v_pool.dtype == np.float32 and k_pool.flags.c_contiguous and v_pool.flags.c_contiguous):
        raise ValueError("the pools must be C-contiguous float32 arrays (they are written in place)")
    positions = np.ascontiguousarray(positions, np.int32)
    table = np.ascontiguousarray(block_table, np.int32)
    _, kv, d, bs = k_pool.shape
    b, blocks = table.shape
    out = np.empty((b, heads * d), np.float32)
    library().mst_decode_attention(_ptr(qkv), _ptr(positions), _ptr(cos), _ptr(sin), cos.shape[0], _ptr(k_pool),
                                   _ptr(v_pool), _ptr(table), blocks, bs, b, heads, kv, d, _ptr(out))
    return out


def kernel_time() -> tuple[float, int]:
    """(seconds inside the kernels' MindSpore entry points, calls) since the last call; resets both."""
    calls = ctypes.c_int64(0)
    seconds = library().mst_kernel_time(ctypes.byref(calls))
    return seconds, calls.value


STEP_STAGES = ("qkv", "attention", "o", "gate_up", "down", "head")


def step_profile(on: bool | None = None) -> dict[str, float]:
    """Seconds per stage of the whole-step decode operator (MstDecodeStep) since the last call; resets them.
    step_profile(True) starts the clock (off by default: it costs two clock reads per stage), False stops it."""
    lib = library()
    if on is not None:
        lib.mst_set_step_profile(int(on))
    out = (ctypes.c_double * len(STEP_STAGES))()
    lib.mst_step_profile(out)
    return dict(zip(STEP_STAGES, out))


def read_bandwidth(nbytes: int = 1 << 30, reps: int = 5) -> float:
    """GB/s reading a buffer of `nbytes` (far above the caches), best of `reps`, on every kernel thread."""
    buf = np.ones(nbytes // 4, np.float32)
    return library().mst_read_bandwidth(_ptr(buf), buf.size, reps)


def fma_peak(iterations: int = 20_000_000) -> float:
    """GFLOP/s of float32 FMAs in registers on every kernel thread, with this ISA's vectors."""
    return library().mst_fma_peak(iterations)


def int8_peak(iterations: int | None = None) -> float:
    """GMAC/s of int8 multiply-adds on every kernel thread, by the dot products the int8-activation products use
    (activations.int8_isa(): vpmaddubsw + vpaddw, vpdpbusd, or the plain fallback): their compute floor."""
    from .activations import int8_isa

    if iterations is None:  # about 0.1 s either way
        iterations = 200_000 if int8_isa() == "generic" else 20_000_000
    return library().mst_int8_peak(iterations)
