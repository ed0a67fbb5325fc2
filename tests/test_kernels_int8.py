"""The int8-activation products (mstriton/kernels/csrc/qlinear.h, issue 27) against numpy, with every integer dot
product this CPU runs (AVX512-VNNI, AVX-512 BW, AVX-VNNI, AVX2, the plain C++ fallback; the others are skipped,
naming the missing feature), every 4- and 8-bit format, rows 1 to 130 (decode steps, prefill, both tilings and
their row tails), K not a
multiple of the 32-value block, N not a multiple of the channel groups.

Two references: numpy doing the same quantization (per block of 32, d = max|x| / 127, q = rint(x / d), ties to
even) and the integer block products in float64 -- a tight tolerance; and the float32 product of the dequantized
matrix (the exact path) -- a loose one, the quantization's own error (about 0.5% on random data).
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from mstriton import kernels
from mstriton.kernels import activations
from mstriton.kernels.formats import (INTERLEAVED, deinterleave, interleave, interleaved_format, pack, row_bytes,
                                     unpack)

# the block formats, plain and interleaved by 8 channels (the served layout of int8 activations)
FORMATS = ("Q8_0", "Q4_0", "Q4_1", "Q8_0X8", "Q4_0X8", "Q4_1X8")
SHAPES = [(1, 32, 1), (1, 576, 577), (2, 100, 33), (3, 64, 7), (4, 96, 9), (5, 45, 66), (7, 130, 13),
          (16, 200, 64), (17, 96, 9), (31, 577, 11), (32, 1536, 70), (33, 96, 9), (130, 200, 41)]
MISSING = {"avx512vnni": "AVX512-VNNI (and AVX-512 F/BW/VL)", "avx512": "AVX-512 F/BW/VL", "avxvnni": "AVX-VNNI",
           "avx2": "AVX2 + FMA + F16C"}


@pytest.fixture(params=activations.INT8_ISAS)
def int8_isa(request):
    name = request.param
    if name not in activations.supported_int8_isas():
        pytest.skip(f"this CPU lacks {MISSING[name]} for the {name} integer dot products")
    activations.set_int8_isa(name)
    activations.set_activations("int8")
    yield name
    activations.set_activations("float32")
    kernels.set_isa(kernels.supported_isas()[0])  # back to the best ISA and its best dot products


def quantize_reference(x: np.ndarray):
    """x [M, K] -> q [M, Kp] int8, d, s [M, Kp / 32] float32, in float32 arithmetic as the kernels do."""
    m, k = x.shape
    nb = -(-k // 32)
    padded = np.zeros((m, nb * 32), np.float32)
    padded[:, :k] = x
    blocks = padded.reshape(m, nb, 32)
    amax = np.abs(blocks).max(-1)
    d = amax / np.float32(127)
    inverse = np.where(amax > 0, np.float32(127) / np.where(amax > 0, amax, np.float32(1)), np.float32(0))
    q = np.rint(blocks * inverse[..., None].astype(np.float32)).astype(np.int8)
    s = d * q.sum(-1, dtype=np.int32).astype(np.float32)
    return q.reshape(m, nb * 32), d.astype(np.float32), s.astype(np.float32)


def weight_blocks(fmt: str, packed: np.ndarray):
    """The integer values [N, nb, 32], scales d and min terms [N, nb] of a packed matrix: w = d * value + min."""
    if fmt in INTERLEAVED:
        fmt, packed = INTERLEAVED[fmt], deinterleave(INTERLEAVED[fmt], packed)
    n = packed.shape[0]
    size = {"Q8_0": 34, "Q4_0": 18, "Q4_1": 20}[fmt]
    blocks = packed.reshape(n, -1, size)
    d = blocks[..., :2].copy().view(np.float16)[..., 0].astype(np.float32)
    if fmt == "Q8_0":
        return blocks[..., 2:].view(np.int8).astype(np.int32), d, np.zeros_like(d)
    qs = blocks[..., 4:] if fmt == "Q4_1" else blocks[..., 2:]
    values = np.concatenate([qs & 15, qs >> 4], -1).astype(np.int32)
    minimum = blocks[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32) if fmt == "Q4_1" else -8 * d
    return values, d, minimum


def product_reference(fmt: str, packed: np.ndarray, x: np.ndarray) -> np.ndarray:
    """y [M, N]: sum over blocks of d_w d_x (integer dot of the block) + min s_x, in float64."""
    q, dx, sx = quantize_reference(x)
    values, dw, minimum = weight_blocks(fmt, packed)
    m, nb = dx.shape
    dots = np.einsum("rbi,cbi->rcb", q.reshape(m, nb, 32).astype(np.int64), values.astype(np.int64))
    return (dots * (dx[:, None, :].astype(np.float64) * dw[None].astype(np.float64))
            + minimum[None].astype(np.float64) * sx[:, None, :]).sum(-1)


def channels(fmt: str, n: int) -> int:
    """N as the format takes it: the interleaved formats hold whole groups of 8 channels."""
    return -(-n // 8) * 8 if fmt in INTERLEAVED else n


def relative(actual, expected) -> float:
    return float(np.abs(actual - expected).max() / max(np.abs(expected).max(), 1e-30))


def frobenius(actual, expected) -> float:
    return float(np.linalg.norm(actual - expected) / max(np.linalg.norm(expected), 1e-30))


def test_the_switch_defaults_to_float32_and_the_int8_isa_follows_the_isa():
    assert activations.activations() == "float32"
    supported = activations.supported_int8_isas()
    assert "generic" in supported and activations.int8_isa() in supported
    best = {"avx512": ("avx512vnni", "avx512"), "avx2": ("avxvnni", "avx2"), "generic": ("generic",)}
    for isa in kernels.supported_isas():
        kernels.set_isa(isa)
        assert activations.int8_isa() == next(name for name in best[isa] if name in supported)
    kernels.set_isa(kernels.supported_isas()[0])
    with pytest.raises(ValueError):
        activations.set_activations("int4")


@pytest.mark.parametrize("value, mode", [("int8", "int8"), ("float32", "float32"), ("", "float32")])
def test_the_environment_chooses_the_activations(value, mode):
    script = "from mstriton.kernels import activations; print(activations.activations())"
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                            env={**os.environ, "MSTRITON_KERNEL_ACTIVATIONS": value})
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == [mode]


def test_weight_blocks_are_the_dequantized_matrix():
    w = np.random.default_rng(1).standard_normal((8, 70)).astype(np.float32)
    for fmt in FORMATS:
        packed = pack(fmt, w)
        values, d, minimum = weight_blocks(fmt, packed)
        dense = (values * d[..., None] + minimum[..., None]).reshape(8, -1)[:, :70]
        np.testing.assert_array_equal(dense, unpack(fmt, packed, 70))
        np.testing.assert_array_equal(dense, unpack(fmt.removesuffix("X8"), pack(fmt.removesuffix("X8"), w), 70))


def test_quantization_equals_numpy(int8_isa):
    rng = np.random.default_rng(2)
    for m, k in [(1, 32), (3, 45), (6, 577), (32, 200)]:
        x = (rng.standard_normal((m, k)) * rng.uniform(0.01, 100, (m, 1))).astype(np.float32)
        x[0, :min(k, 40)] = 0  # an all-zero block: scale 0, q 0
        if m > 1:
            x[1, 3] = 1e4  # one loud value coarsens only its own block
        got, expected = activations.quantize_rows(x), quantize_reference(x)
        for name, a, b in zip("qds", got, expected):
            np.testing.assert_array_equal(a, b, err_msg=f"{int8_isa} m={m} k={k}: {name}")


@pytest.mark.parametrize("fmt", FORMATS)
def test_products_equal_numpy_with_the_same_quantization(int8_isa, fmt):
    rng = np.random.default_rng(3)
    for m, k, n in SHAPES:
        n = channels(fmt, n)
        w = rng.standard_normal((n, k)).astype(np.float32)
        x = rng.standard_normal((m, k)).astype(np.float32)
        packed = pack(fmt, w)
        assert packed.shape == (n, row_bytes(fmt, k))
        got = kernels.linear(fmt, x, packed)
        error = relative(got, product_reference(fmt, packed, x))
        assert error < 2e-5, f"{int8_isa} {fmt} m={m} k={k} n={n}: relative error {error}"
        exact = x.astype(np.float64) @ unpack(fmt, packed, k).T.astype(np.float64)
        error = frobenius(got, exact)
        assert error < 1e-2, f"{int8_isa} {fmt} m={m} k={k} n={n}: against float32 activations {error}"


def test_every_byte_value_of_the_blocks(int8_isa):
    """Blocks of random bytes: Q8_0 values down to -128 (gguf writes -127 .. 127; |w| = 128 must stay exact in
    the sign trick), every nibble, scales of both signs; activations at the block maximum (q = +-127)."""
    rng = np.random.default_rng(6)
    for fmt, size, halves in (("Q8_0", 34, 1), ("Q4_0", 18, 1), ("Q4_1", 20, 2)):
        for m in (1, 2, 3, 4, 9):
            n, nb = 24, 5
            blocks = rng.integers(0, 256, (n, nb, size), dtype=np.uint8)
            blocks[..., :2 * halves] = rng.uniform(-2, 2, (n, nb, halves)).astype(np.float16).view(np.uint8)
            if fmt == "Q8_0":
                blocks[0, :, 2:] = 0x80  # a channel of -128s
            packed = blocks.reshape(n, nb * size)
            x = rng.standard_normal((m, nb * 32)).astype(np.float32)
            x[:, ::32] = 50.0  # the largest value of each block: q = 127
            for layout, matrix in ((fmt, packed[:19]), (interleaved_format(fmt), interleave(fmt, packed))):
                got = kernels.linear(layout, x, matrix)
                error = relative(got, product_reference(layout, matrix, x))
                assert error < 2e-5, f"{int8_isa} {layout} m={m}: relative error {error}"


@pytest.mark.parametrize("m", [1, 3, 8, 32])
def test_fused_norm_swiglu_bias_and_residual(int8_isa, m):
    """pre(x) is the float32 path's (prepare_rows), quantized after: against numpy's float32 product (loose) and
    the int8 product of numpy's pre(x) (tight up to a rounding step of the odd q on a tie's other side)."""
    rng = np.random.default_rng(m)
    k, n, eps = 96, 50, 1e-5
    x = rng.standard_normal((m, k)).astype(np.float32)
    g = rng.standard_normal(k).astype(np.float32)
    bias, residual = rng.standard_normal(n).astype(np.float32), rng.standard_normal((m, n)).astype(np.float32)
    for fmt in FORMATS:
        packed = pack(fmt, rng.standard_normal((channels(fmt, n), k)).astype(np.float32))
        dense = unpack(fmt, packed, k).T.astype(np.float64)
        bias, residual = np.resize(bias, channels(fmt, n)), np.resize(residual, (m, channels(fmt, n)))

        normed = (x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * g).astype(np.float32)
        got = kernels.linear(fmt, x, packed, pre="rmsnorm", norm=g, eps=eps, bias=bias)
        assert frobenius(got, normed @ dense + bias) < 1e-2
        assert relative(got, product_reference(fmt, packed, normed) + bias) < 1e-3

        gate_up = rng.standard_normal((m, 2 * k)).astype(np.float32)
        gate, up = gate_up[:, :k].astype(np.float64), gate_up[:, k:]
        swiglu = (gate / (1 + np.exp(-gate)) * up).astype(np.float32)
        got = kernels.linear(fmt, gate_up, packed, pre="swiglu", residual=residual)
        # silu(g) * u is heavy-tailed (a product of two normals): a block's largest value sets a coarser step
        assert frobenius(got - residual, swiglu @ dense) < 2e-2
        assert relative(got, product_reference(fmt, packed, swiglu) + residual) < 1e-3


def test_other_formats_keep_float32_activations(int8_isa):
    """Only the Q8_0 / Q4_0 / Q4_1 products quantize x: the rest equal the float32 path, decode and prefill."""
    rng = np.random.default_rng(4)
    cases = [(fmt, m, 70, 20) for fmt in ("F32", "BF16", "INT8") for m in (4, 33)]
    for fmt, m, k, n in cases:
        packed = pack(fmt, rng.standard_normal((n, k)).astype(np.float32))
        x = rng.standard_normal((m, k)).astype(np.float32)
        got = kernels.linear(fmt, x, packed)
        activations.set_activations("float32")
        expected = kernels.linear(fmt, x, packed)
        activations.set_activations("int8")
        np.testing.assert_array_equal(got, expected, err_msg=f"{fmt} m={m}")


def test_every_int8_isa_gives_the_same_products():
    """The SIMD dot products against the plain C++ fallback on one case per format and tiling."""
    rng = np.random.default_rng(5)
    supported = activations.supported_int8_isas()
    activations.set_activations("int8")
    try:
        for fmt in FORMATS:
            for m in (1, 2, 3, 4, 9, 32):
                packed = pack(fmt, rng.standard_normal((channels(fmt, 37), 300)).astype(np.float32))
                x = rng.standard_normal((m, 300)).astype(np.float32)
                results = {}
                for name in supported:
                    activations.set_int8_isa(name)
                    results[name] = kernels.linear(fmt, x, packed)
                for name, y in results.items():
                    assert relative(y, results["generic"]) < 1e-5, f"{name} {fmt} m={m}"
    finally:
        activations.set_activations("float32")
        kernels.set_isa(kernels.supported_isas()[0])
