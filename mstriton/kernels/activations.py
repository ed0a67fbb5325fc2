"""Which activations the kernels' weight products use: float32 (the exact path, the default) or int8 (issue 27).

With int8, the products of Q8_0, Q4_0 and Q4_1 weights, and of the K-quants Q4_K, Q5_K and Q6_K that a converted
GGUF keeps (decode steps and prefill) quantize each row of
pre(x) into blocks of 32 int8 with one float32 scale per block and multiply in integers (``csrc/qlinear.h``);
every other product keeps float32 activations. The environment chooses at load,
``MSTRITON_KERNEL_ACTIVATIONS=int8|float32``; ``set_activations`` changes it in this process (tests, benchmarks),
for the ctypes calls and the MindSpore operators alike (one library).

The integer dot products come from the chosen ISA's object, with VNNI where the CPU has it: ``avx512vnni``
(vpdpbusd, EVEX), ``avx512`` (vpmaddubsw), ``avxvnni`` (vpdpbusd, VEX), ``avx2`` (vpmaddubsw), ``generic`` (plain
C++). ``set_int8_isa`` picks one (tests); ``kernels.set_isa`` goes back to the best for the ISA it sets.
"""

from __future__ import annotations

import ctypes

import numpy as np

from . import KernelsUnavailable, library

MODES = ("float32", "int8")
INT8_ISAS = ("avx512vnni", "avx512", "avxvnni", "avx2", "generic")
BLOCK = 32

_declared = False


def _lib() -> ctypes.CDLL:
    global _declared
    lib = library()
    if not _declared:
        i64, ptr = ctypes.c_int64, ctypes.c_void_p
        lib.mst_activations.restype = ctypes.c_int
        lib.mst_set_activations.argtypes = [ctypes.c_int]
        lib.mst_int8_isa.restype = ctypes.c_char_p
        lib.mst_set_int8_isa.argtypes = [ctypes.c_char_p]
        lib.mst_int8_isa_supported.argtypes = [ctypes.c_char_p]
        lib.mst_quantize_rows.argtypes = [ptr, i64, i64, ptr, ptr, ptr]
        _declared = True
    return lib


def activations() -> str:
    return MODES[_lib().mst_activations()]


def set_activations(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"activations must be one of {MODES}, got {mode!r}")
    _lib().mst_set_activations(MODES.index(mode))


# Weight formats whose products take int8 activations when a model is served with its default (see served_default).
INT8_FORMATS = ("Q8_0", "Q4_0", "Q4_1")
ENVIRONMENT = "MSTRITON_KERNEL_ACTIVATIONS"


def served_default(weights: str) -> str:
    """The activations a converted model is served with unless told otherwise: int8 for the 4- and 8-bit block
    formats, whose int8 products score as llama.cpp's do on the same file (benchmarks/activation_fidelity.md:
    perplexity 64.29 against llama.cpp's 64.21 and our float32 path's 64.01 over 4032 tokens) at about twice
    the speed; float32 for the others, which have no int8 products."""
    return "int8" if weights in INT8_FORMATS else "float32"


def apply_configured(configured: str | None, environ=None) -> tuple[str, str]:
    """Set this process's activations for a served model: MSTRITON_KERNEL_ACTIVATIONS when set (the operator's
    override, e.g. float32 for exact parity with transformers), else the model's configured value, else float32.
    Returns (mode, where it came from)."""
    import os

    environ = os.environ if environ is None else environ
    chosen, source = environ.get(ENVIRONMENT, "").strip(), ENVIRONMENT
    if not chosen:
        chosen, source = (configured or "float32").strip(), "the model's kernel_activations parameter"
    if chosen not in MODES:
        raise ValueError(f"{source} is {chosen!r}: allowed values are {', '.join(MODES)}")
    set_activations(chosen)
    return chosen, source


def int8_isa() -> str:
    return _lib().mst_int8_isa().decode()


def supported_int8_isas() -> list[str]:
    return [name for name in INT8_ISAS if _lib().mst_int8_isa_supported(name.encode())]


def set_int8_isa(name: str) -> None:
    if _lib().mst_set_int8_isa(name.encode()) != 0:
        raise KernelsUnavailable(f"int8 dot products {name!r} are not one of {INT8_ISAS} supported by this CPU "
                                 f"({supported_int8_isas()})")


def quantize_rows(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """x [M, K] float32 as the int8 products quantize it (with the current int8 ISA's code): q [M, Kp] int8 (Kp: K
    rounded up to 32, zeros past K), d [M, Kp / 32] float32 (each block's scale, max|x| / 127) and s [M, Kp / 32]
    (d times the sum of the block's q)."""
    x = np.ascontiguousarray(x, np.float32)
    m, k = x.shape
    nb = -(-k // BLOCK)
    q = np.empty((m, nb * BLOCK), np.int8)
    d, s = np.empty((m, nb), np.float32), np.empty((m, nb), np.float32)
    _lib().mst_quantize_rows(x.ctypes.data, m, k, q.ctypes.data, d.ctypes.data, s.ctypes.data)
    return q, d, s
